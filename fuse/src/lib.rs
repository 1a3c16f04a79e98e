//! The lazy FUSE store of the runner. Not implemented yet: see issue 3 and the README.
