//! The one place where a filesystem error becomes an errno.

use flywheel_core::ErrorKind;
use fuser::Errno;

/// Why a FUSE request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsError {
    /// No such name or inode.
    NotFound,
    /// A directory operation on something else.
    NotADirectory,
    /// A file operation on a directory.
    IsADirectory,
    /// Anything but reading: the store is read-only.
    ReadOnly,
    /// `readlink` of something that is not a symlink.
    NotASymlink,
    /// An operation the mount answers once so the kernel stops asking (see `opendir`).
    Unsupported,
    /// A failure of the work behind the request (the server, the cache, verification).
    Failed(ErrorKind),
}

impl FsError {
    /// The errno a FUSE reply carries.
    pub(crate) fn errno(self) -> Errno {
        match self {
            FsError::NotFound | FsError::Failed(ErrorKind::NotFound) => Errno::ENOENT,
            FsError::NotADirectory => Errno::ENOTDIR,
            FsError::IsADirectory => Errno::EISDIR,
            FsError::ReadOnly => Errno::EROFS,
            FsError::NotASymlink | FsError::Failed(ErrorKind::InvalidInput) => Errno::EINVAL,
            FsError::Unsupported => Errno::ENOSYS,
            FsError::Failed(ErrorKind::Unauthorized | ErrorKind::Forbidden) => Errno::EACCES,
            // The server is down or slow, data failed verification, or a local failure: the
            // read cannot be answered, and retrying later may work.
            FsError::Failed(_) => Errno::EIO,
        }
    }
}

impl From<&flywheel_core::Error> for FsError {
    fn from(err: &flywheel_core::Error) -> Self {
        FsError::Failed(err.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_by_kind() {
        assert_eq!(FsError::Failed(ErrorKind::NotFound).errno(), Errno::ENOENT);
        assert_eq!(FsError::Failed(ErrorKind::Forbidden).errno(), Errno::EACCES);
        assert_eq!(FsError::Failed(ErrorKind::Corrupt).errno(), Errno::EIO);
        assert_eq!(FsError::Failed(ErrorKind::Unavailable).errno(), Errno::EIO);
        assert_eq!(FsError::ReadOnly.errno(), Errno::EROFS);
    }
}
