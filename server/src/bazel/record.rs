//! The stored record of a CAS blob: either the blob itself (short blobs, one zstd frame) or
//! the list of its chunks.
//!
//! Layout (all integers little-endian):
//! - `FWB1`, then one byte: 0 for inline, 1 for chunks, then the blob's length (u64);
//! - inline: the zstd frame of the blob;
//! - chunks: the number of chunks (u32), then per chunk its BLAKE3 (32 bytes) and length (u32).
//!
//! A record is decoded with every length checked against the others before anything is
//! allocated from it.

use bytes::{BufMut, Bytes, BytesMut};
use flywheel_core::chunk::{self, ChunkHash};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::{Error, Result};

const MAGIC: &[u8; 4] = b"FWB1";
const INLINE: u8 = 0;
const CHUNKS: u8 = 1;
const HEADER: usize = 4 + 1 + 8;
const CHUNK_ENTRY: usize = 32 + 4;

/// An inline blob is shorter than the smallest chunk; this bounds what a record may claim.
pub const MAX_INLINE: u64 = 1 << 20;

/// What a blob's record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobRecord {
    /// The blob itself, compressed.
    Inline {
        /// Its length.
        size: u64,
        /// One zstd frame of it.
        frame: Bytes,
    },
    /// Its chunks, in order.
    Chunks {
        /// Its length: the sum of the chunks' lengths.
        size: u64,
        /// The chunks.
        chunks: Vec<ChunkRef>,
    },
}

impl BlobRecord {
    /// A record holding `data` compressed at `level`.
    pub fn inline(data: &[u8], level: i32) -> Result<Self> {
        if data.len() as u64 > MAX_INLINE {
            return Err(Error::internal(format!("a blob of {} bytes is too long to keep inline", data.len())));
        }
        let frame = zstd::bulk::compress(data, level).map_err(|e| Error::internal(format!("zstd: {e}")))?;
        Ok(BlobRecord::Inline { size: data.len() as u64, frame: Bytes::from(frame) })
    }

    /// The blob's length.
    pub fn size(&self) -> u64 {
        match self {
            BlobRecord::Inline { size, .. } | BlobRecord::Chunks { size, .. } => *size,
        }
    }

    /// The chunks the record names (none for an inline blob).
    pub fn chunks(&self) -> &[ChunkRef] {
        match self {
            BlobRecord::Inline { .. } => &[],
            BlobRecord::Chunks { chunks, .. } => chunks,
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(MAGIC);
        match self {
            BlobRecord::Inline { size, frame } => {
                out.put_u8(INLINE);
                out.put_u64_le(*size);
                out.put_slice(frame);
            }
            BlobRecord::Chunks { size, chunks } => {
                out.reserve(4 + chunks.len() * CHUNK_ENTRY);
                out.put_u8(CHUNKS);
                out.put_u64_le(*size);
                // Blobs are bounded far below 2^32 chunks (bazel.max-blob-size is at most 1 TiB).
                out.put_u32_le(u32::try_from(chunks.len()).unwrap_or(u32::MAX));
                for chunk in chunks {
                    out.put_slice(&chunk.hash.0);
                    out.put_u32_le(chunk.size);
                }
            }
        }
        out.freeze()
    }

    /// Reads a stored record, refusing one whose parts disagree.
    pub fn decode(bytes: &Bytes) -> Result<Self> {
        let bad = |why: &str| Error::corrupt(format!("not a blob record: {why}"));
        if bytes.len() < HEADER || &bytes[..4] != MAGIC {
            return Err(bad("no FWB1 header"));
        }
        let size = u64::from_le_bytes(bytes[5..13].try_into().map_err(|_| bad("short header"))?);
        match bytes[4] {
            INLINE => {
                if size > MAX_INLINE {
                    return Err(bad("an inline blob longer than allowed"));
                }
                Ok(BlobRecord::Inline { size, frame: bytes.slice(HEADER..) })
            }
            CHUNKS => {
                let rest = &bytes[HEADER..];
                if rest.len() < 4 {
                    return Err(bad("no chunk count"));
                }
                let count = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let entries = &rest[4..];
                if entries.len() != count.saturating_mul(CHUNK_ENTRY) {
                    return Err(bad("the chunk count and the record's length disagree"));
                }
                let mut chunks = Vec::with_capacity(count);
                let mut total = 0u64;
                for entry in entries.chunks_exact(CHUNK_ENTRY) {
                    let mut hash = [0u8; 32];
                    hash.copy_from_slice(&entry[..32]);
                    let len = u32::from_le_bytes([entry[32], entry[33], entry[34], entry[35]]);
                    chunk::check_chunk_len(u64::from(len)).map_err(|_| bad("a chunk length out of bounds"))?;
                    total += u64::from(len);
                    chunks.push(ChunkRef { hash: ChunkHash(hash), size: len });
                }
                if total != size {
                    return Err(bad("the chunks' lengths do not add up to the blob's"));
                }
                Ok(BlobRecord::Chunks { size, chunks })
            }
            _ => Err(bad("unknown kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let inline = BlobRecord::inline(b"hello bazel", 3).unwrap();
        assert_eq!(BlobRecord::decode(&inline.encode()).unwrap(), inline);
        let chunks = BlobRecord::Chunks {
            size: 70_000,
            chunks: vec![
                ChunkRef { hash: ChunkHash([7; 32]), size: 40_000 },
                ChunkRef { hash: ChunkHash([9; 32]), size: 30_000 },
            ],
        };
        assert_eq!(BlobRecord::decode(&chunks.encode()).unwrap(), chunks);
    }

    #[test]
    fn damaged_records_are_refused() {
        let chunks = BlobRecord::Chunks { size: 40_000, chunks: vec![ChunkRef { hash: ChunkHash([7; 32]), size: 40_000 }] };
        let good = chunks.encode();
        for cut in [0, 3, 12, 16, good.len() - 1] {
            assert!(BlobRecord::decode(&good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut wrong_total = good.to_vec();
        wrong_total[5] ^= 1;
        assert!(BlobRecord::decode(&Bytes::from(wrong_total)).is_err());
        let mut huge_count = good.to_vec();
        huge_count[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BlobRecord::decode(&Bytes::from(huge_count)).is_err());
        let mut kind = good.to_vec();
        kind[4] = 7;
        assert!(BlobRecord::decode(&Bytes::from(kind)).is_err());
        let mut inline = BlobRecord::inline(b"x", 3).unwrap().encode().to_vec();
        inline[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(BlobRecord::decode(&Bytes::from(inline)).is_err());
    }
}
