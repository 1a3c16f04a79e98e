//! `PUT /_api/v1/upload-path`: upload one store path as a plain NAR.
//!
//! The path's metadata travels as JSON either in the `X-Attic-Nar-Info` header or, when
//! `X-Attic-Nar-Info-Preamble-Size: N` is set, as the first N bytes of the body, before the NAR.

use serde::{Deserialize, Serialize};

/// Header holding the JSON metadata.
pub const NAR_INFO_HEADER: &str = "x-attic-nar-info";
/// Header giving the length of the JSON preamble in the body.
pub const NAR_INFO_PREAMBLE_SIZE_HEADER: &str = "x-attic-nar-info-preamble-size";
/// Largest metadata accepted, in the header or the preamble.
pub const MAX_NAR_INFO_SIZE: usize = 1024 * 1024;

with_path_info_fields! {
    /// Metadata of the uploaded path (Attic's `UploadPathNarInfo`).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct UploadPathNarInfo {
        /// The cache to upload to.
        pub cache: String,
        /// Hash part of the store path.
        pub store_path_hash: String,
        /// System the path was built for.
        #[serde(default)]
        pub system: Option<String>,
        /// NAR hash, `sha256:` then hex or nixbase32.
        pub nar_hash: String,
        /// NAR size.
        pub nar_size: u64,
    }
}

/// Whether the NAR was stored or already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadPathResultKind {
    /// New bytes were stored (possibly only some chunks).
    Uploaded,
    /// The NAR was stored already.
    Deduplicated,
}

/// The response (Attic's `UploadPathResult`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadPathResult {
    /// What happened.
    pub kind: UploadPathResultKind,
    /// Compressed bytes newly stored.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file_size: Option<u64>,
    /// Fraction of the NAR's bytes that were already stored.
    #[serde(default)]
    pub frac_deduplicated: Option<f64>,
}
