//! flywheel's chunk API, under `/_flywheel/v1/{cache}/`. See the README for the routes.
//!
//! - `GET manifest/{store-path-hash}`: [`PathManifest`].
//! - `GET chunk/{blake3}`: one stored chunk, a zstd frame.
//! - `POST chunks` with [`ChunkRefList`]: many chunks, each as an 8-byte little-endian length
//!   then the zstd frame, in request order. Sizes come along because the server verifies each
//!   chunk before sending it.
//! - `POST missing-chunks` with [`ChunkList`]: [`ChunkList`] of those not stored.
//! - `PUT chunk/{blake3}` with a zstd frame: stores it after verification.
//! - `POST commit` with [`CommitRequest`]: publishes a path made of stored chunks.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkHash;
use crate::manifest::Manifest;

/// Most chunks one request may name.
pub const MAX_CHUNKS_PER_REQUEST: usize = 100_000;

/// A store path's narinfo fields together with its manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathManifest {
    /// Full store path.
    pub store_path: String,
    /// References, full store paths.
    pub references: Vec<String>,
    /// Deriver, full store path.
    #[serde(default)]
    pub deriver: Option<String>,
    /// Signatures, including the cache's own.
    #[serde(default)]
    pub sigs: Vec<String>,
    /// Content address.
    #[serde(default)]
    pub ca: Option<String>,
    /// The NAR's chunks and file index.
    pub manifest: Manifest,
}

/// A list of chunk names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    /// The chunks.
    pub chunks: Vec<ChunkHash>,
    /// In a `missing-chunks` answer: names the chunk list that was asked about, for a `commit`
    /// that follows (see [`CommitRequest::chunks_query`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// Chunks named with their uncompressed sizes, as a manifest lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRefList {
    /// The chunks.
    pub chunks: Vec<crate::manifest::ChunkRef>,
}

/// Publishes a store path whose chunks are all stored already.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommitRequest {
    /// Full store path.
    pub store_path: String,
    /// NAR hash, `sha256:...`.
    pub nar_hash: String,
    /// NAR size.
    pub nar_size: u64,
    /// References, full paths or base names.
    pub references: Vec<String>,
    /// Deriver.
    #[serde(default)]
    pub deriver: Option<String>,
    /// Signatures to keep.
    #[serde(default)]
    pub sigs: Vec<String>,
    /// Content address.
    #[serde(default)]
    pub ca: Option<String>,
    /// The NAR's chunks in order, with their uncompressed sizes. May be left empty when
    /// `chunks_query` names them instead.
    #[serde(default)]
    pub chunks: Vec<crate::manifest::ChunkRef>,
    /// The `query` of a `missing-chunks` answer: the chunks are the ones asked about then (in
    /// `chunk_order`, with `chunk_sizes`), so the commit need not list their names again. A
    /// server that does not know the query (another replica, or expired) refuses the commit,
    /// and the client sends it again with `chunks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_query: Option<String>,
    /// With `chunks_query`: for each chunk of the NAR in order, its index in the list asked
    /// about; absent when it is that list itself, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_order: Option<Vec<u32>>,
    /// With `chunks_query`: the uncompressed size of each chunk of the NAR, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_sizes: Vec<u32>,
}
