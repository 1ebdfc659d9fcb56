//! CONTRACT STUB: bounds-checked reader over Bytes, and DecodeError.

/// A message could not be parsed. Names the message kind and the byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} message at byte {offset}: {reason}")]
pub struct DecodeError {
    /// The message kind, such as "Insert" or "XLogData" ("unknown" if the tag itself is bad).
    pub kind: &'static str,
    /// Offset into the message where the problem was found.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
}
