//! Formats and the chunk model shared by every flywheel role.
//!
//! This crate knows Nix's formats (NAR, narinfo, nixbase32, store paths, signing keys), the
//! chunk model (FastCDC boundaries, BLAKE3 names, zstd frames), the manifest that ties a NAR to
//! its chunks and file index, and the wire types of the HTTP APIs. It does no I/O beyond
//! `std::io::Read`/`Write` and knows nothing of HTTP servers or FUSE.
#![warn(missing_docs)]

pub mod api;
pub mod chunk;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod nar;
pub mod nix;
pub mod xz;
mod text_form;

pub use error::{Error, ErrorKind, Result};
