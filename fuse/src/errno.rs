//! The one place where an error kind becomes an errno.

use flywheel_core::ErrorKind;
use fuser::Errno;

/// The errno a FUSE reply carries for an error of `kind`.
pub(crate) fn errno(kind: ErrorKind) -> Errno {
    match kind {
        ErrorKind::NotFound => Errno::ENOENT,
        ErrorKind::Unauthorized | ErrorKind::Forbidden => Errno::EACCES,
        ErrorKind::InvalidInput => Errno::EINVAL,
        // The server is down or slow, data failed verification, or a local failure: the
        // read cannot be answered, and retrying later may work.
        _ => Errno::EIO,
    }
}
