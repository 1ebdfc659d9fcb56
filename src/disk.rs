//! Full disks: recognised, named and reported the same way everywhere
//! (spill files, checkpoint files, the JSON-lines sink).
//!
//! A full disk is an operational condition, never a bug: the write is
//! retried with backoff, the message says "disk full" with the path and
//! what to do, and `/readyz` and `pgferry_disk_full` show it until a later
//! write there succeeds.

use std::path::Path;

/// `ENOSPC` and `EDQUOT` on Linux.
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// True when `e` says the disk (or the user's quota) is full.
pub fn is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(ENOSPC) | Some(EDQUOT))
}

/// "disk full: writing the spill file /x: No space left on device (os error 28); …"
pub fn full_message(what: &str, path: &Path, e: &std::io::Error) -> String {
    format!(
        "disk full: {what} {}: {e}; free space on that filesystem (or point pgferry elsewhere); pgferry retries with backoff and loses nothing",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_quota_are_full_other_errors_are_not() {
        assert!(is_full(&std::io::Error::from_raw_os_error(28)));
        assert!(is_full(&std::io::Error::from_raw_os_error(122)));
        assert!(!is_full(&std::io::Error::from_raw_os_error(5)));
        let m = full_message(
            "writing",
            Path::new("/x/y"),
            &std::io::Error::from_raw_os_error(28),
        );
        assert!(m.starts_with("disk full: writing /x/y: "), "{m}");
    }
}
