//! The manifest of a NAR: its hash and size, the ordered chunk list, and the file index.
//!
//! With the index and the chunk list, a read of bytes `[a, b)` of a file maps to the few
//! chunks that cover `[narOffset + a, narOffset + b)` of the NAR.
//!
//! Stored and sent as JSON. Version 2 (written since) keeps the file index flat, under `index`
//! (see [`crate::nar::FlatIndex`]), so a manifest of any depth the NAR reader accepts reads back;
//! version 1 kept it nested, under `root`, which serde_json cannot read past about 62 levels.
//! Both are read.

use std::ops::Range;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chunk::ChunkHash;
use crate::error::{Error, Result};
use crate::nar::{FlatIndex, Node};
use crate::nix::Sha256Hash;

/// Version of the manifest format written by this crate; a manifest read in an older
/// version is held in memory as this one.
pub const MANIFEST_VERSION: u32 = 2;

/// One chunk of a NAR, in NAR order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the uncompressed bytes.
    pub hash: ChunkHash,
    /// Uncompressed length.
    pub size: u32,
}

/// How a NAR is made of chunks, and what it contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// SHA-256 of the whole NAR.
    pub nar_hash: Sha256Hash,
    /// Length of the NAR.
    pub nar_size: u64,
    /// The chunks, in order; their sizes add up to `nar_size`.
    pub chunks: Vec<ChunkRef>,
    /// The file index.
    pub root: Node,
}

impl Serialize for Manifest {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("Manifest", 5)?;
        out.serialize_field("version", &MANIFEST_VERSION)?;
        out.serialize_field("narHash", &self.nar_hash)?;
        out.serialize_field("narSize", &self.nar_size)?;
        out.serialize_field("chunks", &self.chunks)?;
        out.serialize_field("index", &FlatIndex(&self.root))?;
        out.end()
    }
}

/// A manifest as stored, in either version.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredManifest {
    version: u32,
    nar_hash: Sha256Hash,
    nar_size: u64,
    chunks: Vec<ChunkRef>,
    /// Version 1: the nested index.
    #[serde(default)]
    root: Option<Node>,
    /// Version 2: the flat index.
    #[serde(default, deserialize_with = "flat_index")]
    index: Option<Node>,
}

fn flat_index<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<Node>, D::Error> {
    crate::nar::from_flat(deserializer).map(Some)
}

impl<'de> Deserialize<'de> for Manifest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let stored = StoredManifest::deserialize(deserializer)?;
        let root = match (stored.version, stored.root, stored.index) {
            (1, Some(root), None) => root,
            (2, None, Some(index)) => index,
            (1 | 2, _, _) => return Err(D::Error::custom("manifest has no file index, or two")),
            (other, _, _) => return Err(D::Error::custom(format!("unsupported manifest version {other}"))),
        };
        Ok(Manifest {
            version: MANIFEST_VERSION,
            nar_hash: stored.nar_hash,
            nar_size: stored.nar_size,
            chunks: stored.chunks,
            root,
        })
    }
}

/// The chunk list of a stored manifest, read without its file index: enough to know what a
/// NAR needs, and readable even where the index is not (serde_json skips what it ignores
/// without recursion).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestChunks {
    /// Format version.
    pub version: u32,
    /// SHA-256 of the whole NAR.
    pub nar_hash: Sha256Hash,
    /// The chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

impl ManifestChunks {
    /// Reads the chunk list of a stored manifest.
    pub fn from_json(json: &[u8]) -> Result<Self> {
        serde_json::from_slice(json).map_err(|e| Error::corrupt(format!("manifest chunk list does not parse: {e}")))
    }
}

/// An `io::Write` that only counts what it is given.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Manifest {
    /// The JSON of this manifest in a buffer of exactly its size. A manifest of many MB
    /// serialized the ordinary way grows its buffer by doubling, holding up to three times
    /// its size for a moment; measuring first costs a second pass instead.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let fail = |e: serde_json::Error| Error::internal(format!("serializing a manifest: {e}"));
        let mut counter = ByteCounter(0);
        serde_json::to_writer(&mut counter, self).map_err(fail)?;
        let mut out = Vec::with_capacity(counter.0);
        serde_json::to_writer(&mut out, self).map_err(fail)?;
        Ok(out)
    }

    /// Nix's `.ls` listing of the NAR (`{"version":1,"root":...}`), in a buffer of exactly its
    /// size (see [`Manifest::to_json`]).
    pub fn listing(&self) -> Vec<u8> {
        let write = |out: &mut dyn std::io::Write| -> std::io::Result<()> {
            out.write_all(br#"{"version":1,"root":"#)?;
            self.root.write_listing(out)?;
            out.write_all(b"}")
        };
        let mut counter = ByteCounter(0);
        // Neither writer fails.
        let _ = write(&mut counter);
        let mut out = Vec::with_capacity(counter.0);
        let _ = write(&mut out);
        out
    }

    /// A rough count of the heap bytes the manifest holds, for caches bounded in bytes.
    pub fn approx_heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.chunks.len() * std::mem::size_of::<ChunkRef>() + self.root.approx_heap_bytes()
    }

    /// Checks the internal consistency of a manifest that came from outside.
    pub fn validate(&self) -> Result<()> {
        if self.version != MANIFEST_VERSION {
            return Err(Error::invalid(format!("unsupported manifest version {}", self.version)));
        }
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.size)).sum();
        if total != self.nar_size {
            return Err(Error::invalid(format!(
                "manifest chunks add up to {total} bytes, but the NAR has {}",
                self.nar_size
            )));
        }
        if self.chunks.iter().any(|c| c.size == 0) && self.chunks.len() > 1 {
            return Err(Error::invalid("manifest lists an empty chunk"));
        }
        self.root.walk(|names, node| match node {
            Node::Regular { size, nar_offset, .. }
                if nar_offset.checked_add(*size).is_none_or(|end| end > self.nar_size) =>
            {
                Err(Error::invalid(format!("file {:?} lies outside the NAR", names.join("/"))))
            }
            _ => Ok(()),
        })
    }

    /// Start offset of every chunk, plus the NAR size at the end.
    pub fn chunk_offsets(&self) -> Vec<u64> {
        let mut offsets = Vec::with_capacity(self.chunks.len() + 1);
        let mut at = 0u64;
        for chunk in &self.chunks {
            offsets.push(at);
            at += u64::from(chunk.size);
        }
        offsets.push(at);
        offsets
    }

    /// Indices of the chunks that cover NAR bytes `range`, given [`Manifest::chunk_offsets`].
    pub fn chunks_covering(offsets: &[u64], range: Range<u64>) -> Range<usize> {
        if range.start >= range.end || offsets.len() < 2 {
            return 0..0;
        }
        let chunk_count = offsets.len() - 1;
        // The chunk holding byte `b` is the last one starting at or before it.
        let first = offsets.partition_point(|&start| start <= range.start).saturating_sub(1);
        let last = offsets.partition_point(|&start| start < range.end).saturating_sub(1);
        first.min(chunk_count)..(last + 1).min(chunk_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkParams, Chunker};

    fn manifest_of(nar: &[u8]) -> Manifest {
        let parsed = crate::nar::parse(nar).unwrap();
        let chunks = Chunker::chunk_all(ChunkParams::default(), nar)
            .iter()
            .map(|c| ChunkRef { hash: ChunkHash::of(c), size: c.len() as u32 })
            .collect();
        Manifest {
            version: MANIFEST_VERSION,
            nar_hash: Sha256Hash::digest(nar),
            nar_size: parsed.nar_size,
            chunks,
            root: parsed.root,
        }
    }

    #[test]
    fn covering_chunks_map_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(dir.path().join("big"), &big).unwrap();
        std::fs::write(dir.path().join("small"), b"tiny").unwrap();
        let mut nar = Vec::new();
        crate::nar::dump_path(dir.path(), &mut nar).unwrap();
        let manifest = manifest_of(&nar);
        manifest.validate().unwrap();
        assert!(manifest.chunks.len() > 10);
        let offsets = manifest.chunk_offsets();
        let chunks = Chunker::chunk_all(ChunkParams::default(), &nar);
        let Some(Node::Regular { nar_offset, size, .. }) = manifest.root.lookup("big") else { panic!() };
        for (a, b) in [(0u64, 1u64), (100_000, 700_000), (size - 10, *size)] {
            let range = Manifest::chunks_covering(&offsets, nar_offset + a..nar_offset + b);
            let joined: Vec<u8> = chunks[range.clone()].concat();
            let skip = (nar_offset + a - offsets[range.start]) as usize;
            assert_eq!(&joined[skip..skip + (b - a) as usize], &big[a as usize..b as usize]);
            // Minimal: dropping the first or last chunk loses bytes.
            assert!(offsets[range.start + 1] > nar_offset + a);
            assert!(offsets[range.end - 1] < nar_offset + b);
        }
        let Some(Node::Regular { nar_offset, .. }) = manifest.root.lookup("small") else { panic!() };
        assert_eq!(Manifest::chunks_covering(&offsets, *nar_offset..nar_offset + 4).len(), 1);
        assert_eq!(Manifest::chunks_covering(&offsets, 5..5), 0..0);
    }

    #[test]
    fn both_versions_read_and_version_2_is_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"content").unwrap();
        std::os::unix::fs::symlink("b/f", dir.path().join("a/l")).unwrap();
        let mut nar = Vec::new();
        crate::nar::dump_path(dir.path(), &mut nar).unwrap();
        let manifest = manifest_of(&nar);
        let json = serde_json::to_value(&manifest).unwrap();
        assert_eq!(json["version"], 2);
        assert!(json.get("root").is_none() && json["index"].is_array());
        assert_eq!(serde_json::from_value::<Manifest>(json.clone()).unwrap(), manifest);
        let exact = manifest.to_json().unwrap();
        assert_eq!(exact.len(), exact.capacity());
        assert_eq!(exact, serde_json::to_vec(&manifest).unwrap());
        let listing = manifest.listing();
        assert_eq!(listing.len(), listing.capacity());
        let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
        assert_eq!(listing, serde_json::json!({ "version": 1, "root": manifest.root }));
        let chunks = ManifestChunks::from_json(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(chunks.chunks, manifest.chunks);
        // Version 1, as written before: nested under `root`.
        let mut v1 = json.clone();
        v1["version"] = 1.into();
        v1.as_object_mut().unwrap().remove("index");
        v1["root"] = serde_json::to_value(&manifest.root).unwrap();
        assert_eq!(serde_json::from_value::<Manifest>(v1.clone()).unwrap(), manifest);
        let mut both = v1;
        both["index"] = json["index"].clone();
        assert!(serde_json::from_value::<Manifest>(both).is_err());
        let mut v3 = json;
        v3["version"] = 3.into();
        assert!(serde_json::from_value::<Manifest>(v3).is_err());
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"content").unwrap();
        let mut nar = Vec::new();
        crate::nar::dump_path(dir.path(), &mut nar).unwrap();
        let good = manifest_of(&nar);
        good.validate().unwrap();
        let mut bad = good.clone();
        bad.nar_size += 1;
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.version = 99;
        assert!(bad.validate().is_err());
        let mut bad = good;
        if let Node::Directory { entries } = &mut bad.root {
            entries.insert("x".into(), Node::Regular { size: 10, executable: false, nar_offset: 1 << 40 });
        }
        assert!(bad.validate().is_err());
    }
}
