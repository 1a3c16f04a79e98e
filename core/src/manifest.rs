//! The manifest of a NAR: its hash and size, the ordered chunk list, and the file index.
//!
//! With the index and the chunk list, a read of bytes `[a, b)` of a file maps to the few
//! chunks that cover `[narOffset + a, narOffset + b)` of the NAR.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkHash;
use crate::error::{Error, Result};
use crate::nar::Node;
use crate::nix::Sha256Hash;

/// Version of the manifest format written by this crate.
pub const MANIFEST_VERSION: u32 = 1;

/// One chunk of a NAR, in NAR order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the uncompressed bytes.
    pub hash: ChunkHash,
    /// Uncompressed length.
    pub size: u32,
}

/// How a NAR is made of chunks, and what it contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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

impl Manifest {
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
        for entry in self.root.walk() {
            if let Node::Regular { size, nar_offset, .. } = entry.node {
                if nar_offset.checked_add(*size).is_none_or(|end| end > self.nar_size) {
                    return Err(Error::invalid(format!("file {:?} lies outside the NAR", entry.path)));
                }
            }
        }
        Ok(())
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
