//! flywheel's chunk API, under `/_flywheel/v1/{cache}/`. See the README for the routes.
//!
//! - `GET manifest/{store-path-hash}`: [`PathManifest`].
//! - `GET chunk/{blake3}?path={store-path-hash}`: one chunk of that path, a zstd frame.
//! - `POST chunks` with [`ChunkBatch`]: many chunks of one path, framed as
//!   [`chunk_bodies`](super::chunk_bodies) says, in request order.
//!
//! Reads name the path they read for: a cache serves a chunk only as part of one of its
//! paths, so that knowing a chunk's hash never lets a caller read another cache's content.
//! - `POST missing-chunks` with [`ChunkList`]: [`ChunkList`] of those not stored.
//! - `PUT chunk/{blake3}` with a zstd frame: stores it after verification.
//! - `POST upload-chunks` with records as [`chunk_bodies`](super::chunk_bodies) says: stores
//!   several, after verifying each.
//! - `POST commit` with [`CommitRequest`]: publishes a path made of stored chunks.
//! - `GET base/{name}`: [`BaseChunks`] of the newest path published under the same package
//!   name, so that a push of a new version can name its chunks as changes to the old one's.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkHash;
use crate::manifest::{ChunkRef, Manifest};

/// Most chunks one request may name.
pub const MAX_CHUNKS_PER_REQUEST: usize = 100_000;

/// The `Content-Encoding` a [`PathManifest`] answer comes in when the client's
/// `Accept-Encoding` names it. A manifest lists every file of its path: megabytes of JSON for
/// a tool environment, which the runner waits for before the first read; zstd makes it about
/// a third.
pub const MANIFEST_ENCODING: &str = "zstd";

/// Largest zstd window, as a power of two, a compressed manifest may need (8 MiB): a client
/// refuses frames that would make it hold more. [`compress_manifest`] stays within it.
const MANIFEST_WINDOW_LOG: u32 = 23;

/// Compresses the body of a manifest answer (its JSON, in pieces) for [`MANIFEST_ENCODING`]:
/// a frame per piece, one after the other, which decodes as the pieces joined. A server keeps
/// the frame of a manifest's JSON and compresses only the path's fields around it per answer.
pub fn compress_manifest(pieces: &[bytes::Bytes]) -> crate::Result<Vec<u8>> {
    Ok(pieces.iter().map(|piece| compress_manifest_piece(piece)).collect::<crate::Result<Vec<_>>>()?.concat())
}

/// One piece of a manifest answer as a zstd frame within the window a client accepts.
pub fn compress_manifest_piece(piece: &[u8]) -> crate::Result<Vec<u8>> {
    use std::io::Write;
    let failed = |err: std::io::Error| crate::Error::internal(format!("compressing a manifest: {err}"));
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).map_err(failed)?;
    encoder.window_log(MANIFEST_WINDOW_LOG).map_err(failed)?;
    encoder.write_all(piece).map_err(failed)?;
    encoder.finish().map_err(failed)
}

/// Decompresses a manifest answer in [`MANIFEST_ENCODING`], refusing one that holds more than
/// `max` bytes or needs a larger window than a manifest's: a server's answer is outside input.
pub fn decompress_manifest(body: &[u8], max: usize) -> crate::Result<Vec<u8>> {
    use std::io::Read;
    let damaged = |err: std::io::Error| crate::Error::corrupt(format!("the compressed manifest does not decompress: {err}"));
    let mut decoder = zstd::stream::read::Decoder::new(body).map_err(damaged)?;
    decoder.window_log_max(MANIFEST_WINDOW_LOG).map_err(damaged)?;
    let mut json = Vec::new();
    decoder.take(max as u64 + 1).read_to_end(&mut json).map_err(damaged)?;
    if json.len() > max {
        return Err(crate::Error::corrupt(format!("the compressed manifest holds more than {max} bytes")));
    }
    Ok(json)
}

with_path_info_fields! {
    /// A store path's narinfo fields together with its manifest.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PathManifest {
        /// The NAR's chunks and file index (shared: a server keeps parsed manifests in memory).
        pub manifest: std::sync::Arc<Manifest>,
    }
}

/// The fields of a [`PathManifest`] but its manifest, borrowed, serialized alike.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PathFields<'a> {
    store_path: &'a str,
    references: &'a [String],
    deriver: &'a Option<String>,
    sigs: &'a [String],
    ca: &'a Option<String>,
}

impl PathManifest {
    /// The JSON of this, byte for byte as serde writes it, in three pieces around
    /// `manifest_json` (the JSON of `self.manifest`, made once and shared): a server answers
    /// many requests for one large manifest without serializing it again for each.
    pub fn json_pieces(&self, manifest_json: bytes::Bytes) -> [bytes::Bytes; 3] {
        let fields = PathFields {
            store_path: &self.store_path,
            references: &self.references,
            deriver: &self.deriver,
            sigs: &self.sigs,
            ca: &self.ca,
        };
        // Serializing borrowed strings into a Vec cannot fail.
        let mut head = serde_json::to_vec(&fields).unwrap_or_default();
        head.pop(); // the closing brace
        head.extend_from_slice(br#","manifest":"#);
        [head.into(), manifest_json, bytes::Bytes::from_static(b"}")]
    }
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

/// Chunks of one store path, named with their uncompressed sizes as its manifest lists them
/// (`POST chunks`). A size no chunk can have fails to parse, so such a request is refused
/// before any work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkBatch {
    /// Hash part of a path of the cache whose manifest lists every one of `chunks`.
    pub path: String,
    /// The chunks.
    #[serde(deserialize_with = "possible_chunk_refs")]
    pub chunks: Vec<crate::manifest::ChunkRef>,
}

/// Most times one chunk may stand in a committed NAR's list: enough for a gigabyte of
/// identical maximal chunks, and it keeps a small commit from publishing a huge NAR out of one
/// chunk.
pub const MAX_CHUNK_REPEATS: usize = 4096;

fn possible_chunk_refs<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<ChunkRef>, D::Error> {
    let chunks = Vec::<ChunkRef>::deserialize(de)?;
    if let Some(bad) = chunks.iter().find(|c| crate::chunk::check_chunk_len(u64::from(c.size)).is_err()) {
        return Err(serde::de::Error::custom(format!(
            "chunk {} of {} bytes is over the limit of {}",
            bad.hash,
            bad.size,
            crate::chunk::MAX_CHUNK_LEN
        )));
    }
    Ok(chunks)
}

with_path_info_fields! {
    /// Publishes a store path whose chunks are all stored already.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct CommitRequest {
        /// NAR hash, `sha256:` then nixbase32, hex or base64.
        pub nar_hash: String,
        /// NAR size.
        pub nar_size: u64,
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
        /// The chunks as changes to a published path's list: what a new version sends instead of
        /// `chunks`, so that the request grows with the change and not with the NAR.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub chunks_delta: Option<ChunkDelta>,
    }
}

/// The chunk list of the newest path published under a package name (`GET base/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BaseChunks {
    /// Full store path of that path.
    pub store_path: String,
    /// Its NAR's chunks in order.
    pub chunks: Vec<ChunkRef>,
}

/// A NAR's chunk list told as runs of a base path's list and new chunks between them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChunkDelta {
    /// Hash part of the base path (published in the same cache).
    pub base: String,
    /// The NAR's chunks, in order.
    pub runs: Vec<DeltaRun>,
}

/// One piece of a [`ChunkDelta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeltaRun {
    /// `len` chunks of the base's list, from index `start`: `{"copy": [start, len]}`.
    Copy(u32, u32),
    /// A chunk that is not in the base: `{"new": {"hash": ..., "size": ...}}`.
    New(ChunkRef),
}

impl ChunkDelta {
    /// Describes `chunks` as changes to `base_chunks`: each stretch that repeats a stretch of
    /// the base becomes one [`DeltaRun::Copy`], the rest are [`DeltaRun::New`].
    pub fn between(base: String, base_chunks: &[ChunkRef], chunks: &[ChunkRef]) -> ChunkDelta {
        let mut first_at: std::collections::HashMap<ChunkRef, usize> = std::collections::HashMap::new();
        for (i, chunk) in base_chunks.iter().enumerate() {
            first_at.entry(*chunk).or_insert(i);
        }
        let mut runs: Vec<DeltaRun> = Vec::new();
        let mut i = 0;
        while i < chunks.len() {
            match first_at.get(&chunks[i]) {
                Some(&start) => {
                    let len = chunks[i..].iter().zip(&base_chunks[start..]).take_while(|(a, b)| a == b).count();
                    // Indexes fit: a list longer than u32::MAX is refused long before this.
                    runs.push(DeltaRun::Copy(start as u32, len as u32));
                    i += len;
                }
                None => {
                    runs.push(DeltaRun::New(chunks[i]));
                    i += 1;
                }
            }
        }
        ChunkDelta { base, runs }
    }

    /// The full chunk list, given the base's: refuses runs outside the base's list and lists
    /// longer than `max_chunks`.
    pub fn expand(&self, base_chunks: &[ChunkRef], max_chunks: usize) -> crate::Result<Vec<ChunkRef>> {
        let mut out = Vec::new();
        for run in &self.runs {
            let piece = match run {
                &DeltaRun::Copy(start, len) => {
                    let (start, len) = (start as usize, len as usize);
                    start.checked_add(len).and_then(|end| base_chunks.get(start..end)).filter(|p| !p.is_empty()).ok_or_else(|| {
                        crate::Error::invalid(format!(
                            "chunksDelta copies chunks {start}..{} of a base of {} chunks",
                            start.saturating_add(len),
                            base_chunks.len()
                        ))
                    })?
                }
                DeltaRun::New(chunk) => std::slice::from_ref(chunk),
            };
            if out.len() + piece.len() > max_chunks {
                return Err(crate::Error::invalid(format!("chunksDelta makes more than {max_chunks} chunks")));
            }
            out.extend_from_slice(piece);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, size: u32) -> ChunkRef {
        ChunkRef { hash: ChunkHash([n; 32]), size }
    }

    #[test]
    fn chunk_ref_lists_with_impossible_sizes_do_not_parse() {
        let path = "0".repeat(32);
        let ok = ChunkBatch { path: path.clone(), chunks: vec![chunk(1, 100), chunk(2, crate::chunk::MAX_CHUNK_LEN as u32)] };
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<ChunkBatch>(&json).unwrap().chunks, ok.chunks);
        let huge = ChunkBatch { path, chunks: vec![chunk(1, 100), chunk(2, u32::MAX)] };
        let err = serde_json::from_str::<ChunkBatch>(&serde_json::to_string(&huge).unwrap()).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[test]
    fn compressed_manifests_round_trip_and_bad_ones_are_refused() {
        let pieces = [bytes::Bytes::from_static(b"{\"a\":"), bytes::Bytes::from(vec![b'7'; 100_000]), bytes::Bytes::from_static(b"}")];
        let whole: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        let compressed = compress_manifest(&pieces).unwrap();
        assert!(compressed.len() < whole.len() / 10);
        assert_eq!(decompress_manifest(&compressed, whole.len()).unwrap(), whole);
        // One byte over the bound, garbage, a cut frame.
        assert_eq!(decompress_manifest(&compressed, whole.len() - 1).unwrap_err().kind(), crate::ErrorKind::Corrupt);
        assert_eq!(decompress_manifest(b"not zstd at all", 1 << 20).unwrap_err().kind(), crate::ErrorKind::Corrupt);
        assert!(decompress_manifest(&compressed[..compressed.len() / 2], 1 << 20).is_err());
        // A frame that needs a larger window than a manifest's is refused before it costs memory.
        // (A stream of unknown size declares the whole window it was given.)
        let mut wide = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        wide.window_log(27).unwrap();
        std::io::Write::write_all(&mut wide, &[1u8; 1024]).unwrap();
        let wide = wide.finish().unwrap();
        assert_eq!(decompress_manifest(&wide, 128 << 20).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn json_pieces_match_serde() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let mut nar = Vec::new();
        crate::nar::dump_path(dir.path(), &mut nar).unwrap();
        let parsed = crate::nar::parse(&nar[..]).unwrap();
        let manifest = Manifest {
            version: crate::manifest::MANIFEST_VERSION,
            nar_hash: crate::nix::Sha256Hash::digest(&nar),
            nar_size: parsed.nar_size,
            chunks: vec![ChunkRef { hash: ChunkHash::of(&nar), size: nar.len() as u32 }],
            root: parsed.root,
        };
        let path = PathManifest {
            store_path: "/nix/store/00000000000000000000000000000000-x\"y".into(),
            references: vec!["/nix/store/11111111111111111111111111111111-r".into()],
            deriver: None,
            sigs: vec!["k:sig".into()],
            ca: Some("fixed:sha256:x".into()),
            manifest: std::sync::Arc::new(manifest),
        };
        let json = serde_json::to_vec(&path.manifest).unwrap();
        let pieces = path.json_pieces(json.into());
        assert_eq!(pieces.concat(), serde_json::to_vec(&path).unwrap());
    }

    #[test]
    fn a_delta_expands_to_the_list_it_was_made_from() {
        let base: Vec<ChunkRef> = (0..10).map(|n| chunk(n, 100 + u32::from(n))).collect();
        // An insertion in the middle, a changed chunk, a dropped tail, and a repeat.
        let mut new = base[..4].to_vec();
        new.push(chunk(50, 7));
        new.extend_from_slice(&base[5..8]);
        new.push(chunk(2, 102));
        let delta = ChunkDelta::between("b".into(), &base, &new);
        assert_eq!(
            delta.runs,
            vec![DeltaRun::Copy(0, 4), DeltaRun::New(chunk(50, 7)), DeltaRun::Copy(5, 3), DeltaRun::Copy(2, 1)]
        );
        assert_eq!(delta.expand(&base, 1000).unwrap(), new);
        // A chunk with the base's hash but another size is not the base's chunk.
        let resized = vec![chunk(1, 5)];
        assert_eq!(ChunkDelta::between("b".into(), &base, &resized).runs, vec![DeltaRun::New(chunk(1, 5))]);
        let json = serde_json::to_string(&delta).unwrap();
        assert!(json.contains("{\"copy\":[0,4]}"), "{json}");
        assert_eq!(serde_json::from_str::<ChunkDelta>(&json).unwrap(), delta);
    }

    #[test]
    fn a_delta_outside_its_base_or_too_long_is_refused() {
        let base: Vec<ChunkRef> = (0..4).map(|n| chunk(n, 10)).collect();
        let expand = |runs: Vec<DeltaRun>, max: usize| ChunkDelta { base: "b".into(), runs }.expand(&base, max);
        for runs in [vec![DeltaRun::Copy(3, 2)], vec![DeltaRun::Copy(4, 1)], vec![DeltaRun::Copy(u32::MAX, 2)], vec![DeltaRun::Copy(0, 0)]] {
            let err = expand(runs.clone(), 1000).unwrap_err();
            assert!(err.to_string().contains("of a base of 4 chunks"), "{runs:?}: {err}");
        }
        let err = expand(vec![DeltaRun::Copy(0, 4); 3], 10).unwrap_err();
        assert!(err.to_string().contains("more than 10 chunks"), "{err}");
        assert_eq!(expand(vec![DeltaRun::Copy(0, 4), DeltaRun::Copy(0, 4)], 8).unwrap().len(), 8);
    }
}
