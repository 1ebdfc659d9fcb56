//! [`SinkError`]: how a sink tells the pipeline that a batch failed.
//!
//! One classification, [`SinkError::is_transient`], which the pipeline's
//! single retry layer reads (as Vector's `RetryLogic` and Materialize's
//! definite/indefinite split do): a sink classifies, it never sleeps.
//! - transient (the destination is unreachable, busy or restarting; a
//!   full disk): the same batch is retried with the pipeline's backoff, so
//!   `apply` must be idempotent;
//! - fatal: retrying cannot help; pgferry stops with the message.
//!
//! Invariants:
//! - the message is the operator's text and is complete on its own: it
//!   names the cause in words, and a fatal one says what to fix. It is
//!   what `Display` prints, what `/metrics` and the logs show, and what
//!   tests grep, so print the `Display`, do not walk the chain;
//! - the typed cause (an `io::Error`, a client library's error) is kept as
//!   the `source()`, for code that inspects it (a full disk, an error
//!   code) and for `{:?}`.
//!
//! Sinks build errors through the constructors ([`SinkError::transient`],
//! [`SinkError::fatal`], [`SinkError::io`]) and attach a cause with
//! [`SinkError::caused_by`]; nothing outside this file needs the variants.

use std::path::{Path, PathBuf};

/// The typed cause of an error, kept as its `source()`.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A sink failure, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: the destination is unreachable, busy or restarting.
    #[error("{message}")]
    Transient {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// Retrying cannot help; the message tells the operator what to do.
    #[error("{message}")]
    Fatal {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// A disk is full (or over quota): retried like a transient failure,
    /// and reported with its path on `/readyz` and in the metrics.
    #[error("{message}")]
    DiskFull {
        path: PathBuf,
        message: String,
        #[source]
        cause: std::io::Error,
    },
}

impl SinkError {
    /// A failure worth retrying; `message` says what failed.
    pub fn transient(message: impl Into<String>) -> SinkError {
        SinkError::Transient {
            message: message.into(),
            cause: None,
        }
    }

    /// A failure no retry can mend; `message` says what to fix.
    pub fn fatal(message: impl Into<String>) -> SinkError {
        SinkError::Fatal {
            message: message.into(),
            cause: None,
        }
    }

    /// Keeps `cause` as this error's `source()` (the message is unchanged:
    /// it already names the cause in words).
    pub fn caused_by(mut self, cause: impl Into<Cause>) -> SinkError {
        match &mut self {
            SinkError::Transient { cause: c, .. } | SinkError::Fatal { cause: c, .. } => {
                *c = Some(cause.into())
            }
            // Its cause is the I/O error, set when it was built.
            SinkError::DiskFull { .. } => {}
        }
        self
    }

    /// An I/O error while writing `path`: [`SinkError::DiskFull`] when the
    /// disk is full, transient otherwise; the `io::Error` is the cause.
    pub fn io(what: &str, path: &Path, e: std::io::Error) -> SinkError {
        if crate::disk::is_full(&e) {
            SinkError::DiskFull {
                path: path.to_path_buf(),
                message: crate::disk::full_message(what, path, &e),
                cause: e,
            }
        } else {
            SinkError::transient(format!("{what} {}: {e}", path.display())).caused_by(e)
        }
    }

    /// The one classification: `true` when the pipeline retries the batch
    /// (a transient failure or a full disk), `false` when pgferry stops.
    pub fn is_transient(&self) -> bool {
        !matches!(self, SinkError::Fatal { .. })
    }

    /// The full disk this error reports, if it is one.
    pub fn disk_full(&self) -> Option<&Path> {
        match self {
            SinkError::DiskFull { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The operator's text (what `Display` prints).
    pub fn message(&self) -> &str {
        match self {
            SinkError::Transient { message, .. }
            | SinkError::Fatal { message, .. }
            | SinkError::DiskFull { message, .. } => message,
        }
    }

    /// The same error, its message prefixed with `context` (`"sink \"x\""`):
    /// the class and the cause are kept.
    pub fn context(mut self, context: impl std::fmt::Display) -> SinkError {
        match &mut self {
            SinkError::Transient { message, .. }
            | SinkError::Fatal { message, .. }
            | SinkError::DiskFull { message, .. } => *message = format!("{context}: {message}"),
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn the_cause_is_kept_and_the_message_is_unchanged() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = SinkError::transient("connecting to x: refused").caused_by(io);
        assert!(e.is_transient());
        assert_eq!(e.to_string(), "connecting to x: refused");
        let cause = e.source().expect("the cause is kept");
        let io = cause.downcast_ref::<std::io::Error>().expect("typed");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        let e = SinkError::fatal("bad").context("sink \"a\"");
        assert!(!e.is_transient());
        assert_eq!(e.to_string(), "sink \"a\": bad");
    }

    #[test]
    fn a_full_disk_is_transient_and_names_its_path() {
        let full = std::io::Error::from_raw_os_error(28); // ENOSPC
        let e = SinkError::io("writing", Path::new("/x/y"), full);
        assert!(e.is_transient());
        assert_eq!(e.disk_full(), Some(Path::new("/x/y")));
        assert!(e.source().is_some());
        let other = std::io::Error::from_raw_os_error(5); // EIO
        let e = SinkError::io("writing", Path::new("/x/y"), other);
        assert!(e.is_transient() && e.disk_full().is_none());
    }
}
