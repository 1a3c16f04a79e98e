//! Pack objects: chunks grouped in the order NARs use them and compressed together, a few
//! frames to a pack, at a high zstd level. Neighbouring chunks of a NAR compress much better
//! together than one frame each (the server's compaction writes packs for chunks that stayed
//! cold), while a reader still fetches one frame of a pack by range, not the whole pack.
//!
//! A packed chunk's own object then holds a [`PackPointer`] in place of its frame, so every
//! lookup by chunk name (dedup, grants, garbage collection) works as before, and a read
//! follows the pointer to the frame that holds the chunk.
//!
//! Layout of a pack, all integers little-endian:
//!
//! ```text
//! "FWPACK\0\x01"
//! u32 frame count F, u32 chunk count N
//! F x (u64 offset of the frame in the pack, u32 frame length, u32 uncompressed length)
//! N x (32-byte chunk hash, u32 frame index, u32 offset in the frame's bytes, u32 length)
//! the F zstd frames, one after another
//! ```
//!
//! A pack is named by the BLAKE3 hash of all its bytes, so it is never changed in place.

use super::{check_chunk_len, max_frame_len, ChunkHash};
use crate::error::{Error, Result};

const PACK_MAGIC: &[u8; 8] = b"FWPACK\x00\x01";
const POINTER_MAGIC: &[u8; 8] = b"FWPKREF\x01";
/// Bytes before the frame table: magic and the two counts.
const PREAMBLE_LEN: usize = 16;
const FRAME_ENTRY_LEN: usize = 16;
const CHUNK_ENTRY_LEN: usize = 44;

/// Length of an encoded [`PackPointer`]: a chunk object of this length may be a pointer.
pub const POINTER_LEN: usize = 64;

/// Largest uncompressed frame a pack may hold: a reader decompresses a whole frame to get one
/// chunk, so this bounds what one chunk read costs.
pub const MAX_PACK_FRAME_LEN: usize = 16 << 20;

/// Most frames and chunks one pack may hold; a pack's index is read whole.
const MAX_PACK_FRAMES: usize = 1 << 16;
const MAX_PACK_CHUNKS: usize = 1 << 20;

/// The name of a pack: the BLAKE3 hash of its bytes.
pub type PackId = ChunkHash;

/// Where a packed chunk lies: what its chunk object holds in place of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackPointer {
    /// The pack.
    pub pack: PackId,
    /// Where the frame holding the chunk starts in the pack.
    pub frame_offset: u64,
    /// The frame's length.
    pub frame_len: u32,
    /// The frame's uncompressed length.
    pub frame_raw_len: u32,
    /// Where the chunk starts in the frame's uncompressed bytes.
    pub offset: u32,
    /// The chunk's length.
    pub len: u32,
}

impl PackPointer {
    /// The bytes a packed chunk's object holds.
    pub fn encode(&self) -> [u8; POINTER_LEN] {
        let mut out = [0u8; POINTER_LEN];
        out[..8].copy_from_slice(POINTER_MAGIC);
        out[8..40].copy_from_slice(&self.pack.0);
        out[40..48].copy_from_slice(&self.frame_offset.to_le_bytes());
        out[48..52].copy_from_slice(&self.frame_len.to_le_bytes());
        out[52..56].copy_from_slice(&self.frame_raw_len.to_le_bytes());
        out[56..60].copy_from_slice(&self.offset.to_le_bytes());
        out[60..64].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Reads a chunk object: `None` when it is not a pointer (a zstd frame never starts with
    /// the pointer's magic), an error when it is one that cannot be right.
    pub fn parse(object: &[u8]) -> Result<Option<PackPointer>> {
        if !object.starts_with(POINTER_MAGIC) {
            return Ok(None);
        }
        if object.len() != POINTER_LEN {
            return Err(Error::corrupt(format!("a pack pointer of {} bytes, expected {POINTER_LEN}", object.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes([object[at], object[at + 1], object[at + 2], object[at + 3]]);
        let mut pack = [0u8; 32];
        pack.copy_from_slice(&object[8..40]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&object[40..48]);
        let pointer = PackPointer {
            pack: ChunkHash(pack),
            frame_offset: u64::from_le_bytes(offset),
            frame_len: u32_at(48),
            frame_raw_len: u32_at(52),
            offset: u32_at(56),
            len: u32_at(60),
        };
        pointer.check()?;
        Ok(Some(pointer))
    }

    /// Refuses a pointer whose numbers no pack writes, before they size any read or buffer.
    fn check(&self) -> Result<()> {
        let raw = self.frame_raw_len as usize;
        if raw > MAX_PACK_FRAME_LEN
            || u64::from(self.frame_len) > max_frame_len(raw as u64)
            || u64::from(self.offset) + u64::from(self.len) > raw as u64
        {
            return Err(Error::corrupt(format!(
                "a pack pointer into {} names a frame of {} bytes ({raw} uncompressed) and a chunk at {}+{}",
                self.pack, self.frame_len, self.offset, self.len
            )));
        }
        check_chunk_len(u64::from(self.len))
    }

    /// The chunk's bytes out of its frame, `frame` being the `frame_len` bytes at
    /// `frame_offset` of the pack, verified against `expected`; bytes that fail are never
    /// returned.
    pub fn extract_verified(&self, frame: &[u8], expected: &ChunkHash) -> Result<Vec<u8>> {
        let raw = decompress_frame(frame, self.frame_raw_len as usize)
            .map_err(|err| err.context(format_args!("chunk {expected} in pack {}", self.pack)))?;
        self.slice_verified(&raw, expected).map(<[u8]>::to_vec)
    }

    /// The chunk's bytes out of its frame's uncompressed bytes, verified against `expected`.
    pub fn slice_verified<'a>(&self, frame_raw: &'a [u8], expected: &ChunkHash) -> Result<&'a [u8]> {
        let start = self.offset as usize;
        let data = frame_raw
            .get(start..start + self.len as usize)
            .ok_or_else(|| Error::corrupt(format!("chunk {expected} lies past the end of its frame in pack {}", self.pack)))?;
        let actual = ChunkHash::of(data);
        if &actual != expected {
            return Err(Error::corrupt(format!(
                "chunk {expected} in pack {} has content hashing to {actual}",
                self.pack
            )));
        }
        Ok(data)
    }
}

/// Decompresses one frame of a pack, which must come to exactly `raw_len` bytes (at most
/// [`MAX_PACK_FRAME_LEN`]).
pub fn decompress_frame(frame: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    if raw_len > MAX_PACK_FRAME_LEN {
        return Err(Error::corrupt(format!("a pack frame of {raw_len} bytes is over the limit of {MAX_PACK_FRAME_LEN}")));
    }
    let data = zstd::bulk::decompress(frame, raw_len).map_err(|err| Error::corrupt(format!("a pack frame does not decompress: {err}")))?;
    if data.len() != raw_len {
        return Err(Error::corrupt(format!("a pack frame decompresses to {} bytes, expected {raw_len}", data.len())));
    }
    Ok(data)
}

/// One chunk of a pack's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub hash: ChunkHash,
    /// Which frame holds it.
    pub frame: u32,
    /// Where it starts in that frame's uncompressed bytes.
    pub offset: u32,
    /// Its length.
    pub len: u32,
}

/// One frame of a pack's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackFrame {
    /// Where it starts in the pack.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// Its uncompressed length.
    pub raw_len: u32,
}

/// A pack's index: its frames and chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    /// The frames, in the pack's order.
    pub frames: Vec<PackFrame>,
    /// The chunks, in the pack's order.
    pub chunks: Vec<PackEntry>,
}

impl PackIndex {
    /// How many bytes of a pack its index takes, from the pack's first [`PackIndex::PREFIX`]
    /// bytes: a reader that wants only the index fetches that many.
    pub fn len_from_prefix(prefix: &[u8]) -> Result<usize> {
        if prefix.len() < PREAMBLE_LEN || &prefix[..8] != PACK_MAGIC {
            return Err(Error::corrupt("not a pack: the magic is wrong"));
        }
        let frames = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize;
        let chunks = u32::from_le_bytes([prefix[12], prefix[13], prefix[14], prefix[15]]) as usize;
        if frames > MAX_PACK_FRAMES || chunks > MAX_PACK_CHUNKS {
            return Err(Error::corrupt(format!("a pack claims {frames} frames and {chunks} chunks")));
        }
        Ok(PREAMBLE_LEN + frames * FRAME_ENTRY_LEN + chunks * CHUNK_ENTRY_LEN)
    }

    /// Bytes of a pack that tell how long its index is.
    pub const PREFIX: usize = PREAMBLE_LEN;

    /// Reads the index at the start of `pack` (the whole pack, or at least its index). Every
    /// frame must lie after the index and within `pack_len`, and every chunk within its frame.
    pub fn parse(pack: &[u8], pack_len: u64) -> Result<PackIndex> {
        let index_len = Self::len_from_prefix(pack)?;
        let index = pack.get(..index_len).ok_or_else(|| Error::corrupt("a pack cut short inside its index"))?;
        let frame_count = u32::from_le_bytes([index[8], index[9], index[10], index[11]]) as usize;
        let u32_at = |at: usize| u32::from_le_bytes([index[at], index[at + 1], index[at + 2], index[at + 3]]);
        let mut frames = Vec::with_capacity(frame_count);
        let mut end = index_len as u64;
        for i in 0..frame_count {
            let at = PREAMBLE_LEN + i * FRAME_ENTRY_LEN;
            let mut offset = [0u8; 8];
            offset.copy_from_slice(&index[at..at + 8]);
            let frame = PackFrame { offset: u64::from_le_bytes(offset), len: u32_at(at + 8), raw_len: u32_at(at + 12) };
            // Frames follow the index in order, back to back.
            if frame.offset != end
                || frame.raw_len as usize > MAX_PACK_FRAME_LEN
                || u64::from(frame.len) > max_frame_len(u64::from(frame.raw_len))
            {
                return Err(Error::corrupt(format!("frame {i} of a pack is out of place or over the limits")));
            }
            end += u64::from(frame.len);
            frames.push(frame);
        }
        if end != pack_len {
            return Err(Error::corrupt(format!("a pack of {pack_len} bytes whose frames end at {end}")));
        }
        let chunks_at = PREAMBLE_LEN + frame_count * FRAME_ENTRY_LEN;
        let chunk_count = (index_len - chunks_at) / CHUNK_ENTRY_LEN;
        let mut chunks = Vec::with_capacity(chunk_count);
        for i in 0..chunk_count {
            let at = chunks_at + i * CHUNK_ENTRY_LEN;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&index[at..at + 32]);
            let entry = PackEntry { hash: ChunkHash(hash), frame: u32_at(at + 32), offset: u32_at(at + 36), len: u32_at(at + 40) };
            let fits = frames
                .get(entry.frame as usize)
                .is_some_and(|f| u64::from(entry.offset) + u64::from(entry.len) <= u64::from(f.raw_len));
            if !fits {
                return Err(Error::corrupt(format!("chunk {} of a pack lies outside its frame", entry.hash)));
            }
            chunks.push(entry);
        }
        Ok(PackIndex { frames, chunks })
    }

    /// The pointer a chunk object holds for `entry` of the pack `pack`.
    pub fn pointer(&self, pack: PackId, entry: &PackEntry) -> PackPointer {
        let frame = self.frames[entry.frame as usize];
        PackPointer {
            pack,
            frame_offset: frame.offset,
            frame_len: frame.len,
            frame_raw_len: frame.raw_len,
            offset: entry.offset,
            len: entry.len,
        }
    }

    /// Checks every chunk of `pack` (the whole pack) against its name: what a pack must pass
    /// before any chunk object points into it, and what fsck checks. Answers the chunks whose
    /// bytes are wrong, or an error when a frame cannot be read at all.
    pub fn verify(&self, pack: &[u8]) -> Result<Vec<ChunkHash>> {
        let mut bad = Vec::new();
        // Chunks come in frame order as packs are built, so one frame is held at a time (a
        // frame met again out of order is decompressed again).
        let mut current: Option<(u32, Vec<u8>)> = None;
        for entry in &self.chunks {
            if current.as_ref().is_none_or(|(i, _)| *i != entry.frame) {
                let frame = self.frames[entry.frame as usize];
                let bytes = pack
                    .get(frame.offset as usize..(frame.offset + u64::from(frame.len)) as usize)
                    .ok_or_else(|| Error::corrupt("a pack cut short"))?;
                current = Some((entry.frame, decompress_frame(bytes, frame.raw_len as usize)?));
            }
            let raw = current.as_ref().map(|(_, raw)| raw.as_slice()).unwrap_or_default();
            let data = &raw[entry.offset as usize..(entry.offset + entry.len) as usize];
            if ChunkHash::of(data) != entry.hash {
                bad.push(entry.hash);
            }
        }
        Ok(bad)
    }
}

/// Collects chunks into a pack: frames of about `frame_target` uncompressed bytes, at zstd
/// `level`.
pub struct PackBuilder {
    frame_target: usize,
    level: i32,
    /// Uncompressed frames closed so far: all are compressed in [`PackBuilder::finish`], so
    /// that adding never takes long.
    frames: Vec<Vec<u8>>,
    current: Vec<u8>,
    chunks: Vec<PackEntry>,
    raw_len: u64,
}

impl PackBuilder {
    /// An empty pack. `frame_target` is capped at [`MAX_PACK_FRAME_LEN`].
    pub fn new(frame_target: usize, level: i32) -> Self {
        PackBuilder {
            frame_target: frame_target.clamp(1, MAX_PACK_FRAME_LEN),
            level,
            frames: Vec::new(),
            current: Vec::new(),
            chunks: Vec::new(),
            raw_len: 0,
        }
    }

    /// Adds a chunk, whose bytes the caller has verified against `hash`.
    pub fn add(&mut self, hash: ChunkHash, data: &[u8]) -> Result<()> {
        check_chunk_len(data.len() as u64)?;
        if !self.current.is_empty() && self.current.len() + data.len() > self.frame_target {
            self.close_frame();
        }
        if self.current.capacity() == 0 {
            // A frame's size at once: growing by doubling would hold up to twice as much.
            self.current.reserve_exact(self.frame_target);
        }
        self.chunks.push(PackEntry {
            hash,
            frame: self.frames.len() as u32,
            offset: self.current.len() as u32,
            len: data.len() as u32,
        });
        self.current.extend_from_slice(data);
        self.raw_len += data.len() as u64;
        Ok(())
    }

    /// Uncompressed bytes added so far.
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }

    /// The zstd level its frames are compressed at.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Chunks added so far.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    fn close_frame(&mut self) {
        self.frames.push(std::mem::take(&mut self.current));
    }

    /// The pack's bytes, its name and index. This is where the frames are compressed, which at
    /// a high level takes a while.
    pub fn finish(self) -> Result<(Vec<u8>, PackId, PackIndex)> {
        let mut compressor = pack_compressor(self.level)?;
        self.finish_with(&mut compressor)
    }

    /// [`PackBuilder::finish`] with a context from [`pack_compressor`] (at this pack's level)
    /// that the caller keeps for the next pack: setting one up costs its tables' memory anew.
    pub fn finish_with(mut self, compressor: &mut zstd::bulk::Compressor<'static>) -> Result<(Vec<u8>, PackId, PackIndex)> {
        if !self.current.is_empty() {
            self.close_frame();
        }
        // Each frame's uncompressed bytes are let go once it is compressed.
        let compressed: Vec<(Vec<u8>, u32)> = std::mem::take(&mut self.frames)
            .into_iter()
            .map(|raw| {
                compressor
                    .compress(&raw)
                    .map(|frame| (frame, raw.len() as u32))
                    .map_err(|err| Error::internal(format!("zstd compression of a pack frame failed: {err}")))
            })
            .collect::<Result<_>>()?;
        let index_len = PREAMBLE_LEN + compressed.len() * FRAME_ENTRY_LEN + self.chunks.len() * CHUNK_ENTRY_LEN;
        let body_len: usize = compressed.iter().map(|(f, _)| f.len()).sum();
        let mut out = Vec::with_capacity(index_len + body_len);
        out.extend_from_slice(PACK_MAGIC);
        out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        let mut frames = Vec::with_capacity(compressed.len());
        let mut offset = index_len as u64;
        for (frame, raw_len) in &compressed {
            let entry = PackFrame { offset, len: frame.len() as u32, raw_len: *raw_len };
            out.extend_from_slice(&entry.offset.to_le_bytes());
            out.extend_from_slice(&entry.len.to_le_bytes());
            out.extend_from_slice(&entry.raw_len.to_le_bytes());
            offset += frame.len() as u64;
            frames.push(entry);
        }
        for entry in &self.chunks {
            out.extend_from_slice(&entry.hash.0);
            out.extend_from_slice(&entry.frame.to_le_bytes());
            out.extend_from_slice(&entry.offset.to_le_bytes());
            out.extend_from_slice(&entry.len.to_le_bytes());
        }
        for (frame, _) in &compressed {
            out.extend_from_slice(frame);
        }
        let id = ChunkHash::of(&out);
        Ok((out, id, PackIndex { frames, chunks: self.chunks }))
    }
}

/// Largest match tables of a pack's compression, as powers of two: at level 19 and 4 MiB frames
/// zstd would take 16 MiB of hash table and 32 MiB of chain table per context; these take 4 and
/// 8 MiB, which stored 1.1% more bytes of Nix's NARs in 4 MiB frames (measured with zstd's own
/// `--zstd=hlog=20,clog=21`). Levels up to 9 take no more than these 12 MiB of tables anyway.
const PACK_HASH_LOG: u32 = 20;
const PACK_CHAIN_LOG: u32 = 21;

/// A zstd context for pack frames at `level`, its match tables capped so that compaction's
/// memory stays bounded (see [`PackBuilder::finish_with`]).
pub fn pack_compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    let failed = |err: std::io::Error| Error::internal(format!("setting up zstd for a pack failed: {err}"));
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(failed)?;
    if level > 9 {
        compressor.set_parameter(zstd::zstd_safe::CParameter::HashLog(PACK_HASH_LOG)).map_err(failed)?;
        compressor.set_parameter(zstd::zstd_safe::CParameter::ChainLog(PACK_CHAIN_LOG)).map_err(failed)?;
    }
    Ok(compressor)
}

/// A zstd frame that holds `data` as it is, in raw blocks: what a packed chunk is served as
/// where a frame of its own is wanted (the chunk API, `.nar.zst`), made at the speed of a copy.
/// It declares its content size, as [`super::compress`]'s frames do.
pub fn stored_frame(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 128 * 1024;
    let mut out = Vec::with_capacity(data.len() + 13 + 3 * (data.len() / BLOCK + 1));
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Single segment, an 8-byte content size, no checksum, no dictionary.
    out.push(0b1110_0000);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut blocks = data.chunks(BLOCK).peekable();
    if blocks.peek().is_none() {
        // An empty frame still has one (empty, last) block.
        out.extend_from_slice(&[1, 0, 0]);
    }
    while let Some(block) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        // Block header: last-block bit, type 0 (raw), then the size.
        let header = last | ((block.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::decompress_verified;
    use crate::ErrorKind;

    fn chunk(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 7) as u8).wrapping_mul(seed).wrapping_add(seed)).collect()
    }

    fn sample_pack(frame_target: usize) -> (Vec<Vec<u8>>, Vec<u8>, PackId, PackIndex) {
        let chunks: Vec<Vec<u8>> = (1..=9).map(|s| chunk(s, 3000 + 1000 * s as usize)).collect();
        let mut builder = PackBuilder::new(frame_target, 19);
        for data in &chunks {
            builder.add(ChunkHash::of(data), data).unwrap();
        }
        let (bytes, id, index) = builder.finish().unwrap();
        (chunks, bytes, id, index)
    }

    #[test]
    fn every_chunk_reads_back_through_its_pointer() {
        for frame_target in [1, 10_000, 1 << 20] {
            let (chunks, bytes, id, index) = sample_pack(frame_target);
            assert_eq!(id, ChunkHash::of(&bytes));
            assert_eq!(PackIndex::parse(&bytes, bytes.len() as u64).unwrap(), index);
            let prefix_len = PackIndex::len_from_prefix(&bytes[..PackIndex::PREFIX]).unwrap();
            assert_eq!(PackIndex::parse(&bytes[..prefix_len], bytes.len() as u64).unwrap(), index);
            assert!(index.verify(&bytes).unwrap().is_empty());
            for (data, entry) in chunks.iter().zip(&index.chunks) {
                let pointer = index.pointer(id, entry);
                assert_eq!(PackPointer::parse(&pointer.encode()).unwrap(), Some(pointer));
                let frame = &bytes[pointer.frame_offset as usize..][..pointer.frame_len as usize];
                assert_eq!(&pointer.extract_verified(frame, &entry.hash).unwrap(), data);
            }
        }
        // Frames of about 10 kB hold a few chunks each; of 1 byte, one each.
        assert_eq!(sample_pack(1).3.frames.len(), 9);
        assert!(sample_pack(10_000).3.frames.len() < 9);
        assert_eq!(sample_pack(1 << 20).3.frames.len(), 1);
    }

    #[test]
    fn damage_is_found_and_never_returned() {
        let (_, bytes, id, index) = sample_pack(10_000);
        let entry = index.chunks[4];
        let pointer = index.pointer(id, &entry);
        let frame = &bytes[pointer.frame_offset as usize..][..pointer.frame_len as usize];
        // Another chunk's name, a flipped byte in the frame, a frame cut short.
        let other = index.chunks[0].hash;
        assert_eq!(pointer.extract_verified(frame, &other).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut flipped = frame.to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        assert_eq!(pointer.extract_verified(&flipped, &entry.hash).unwrap_err().kind(), ErrorKind::Corrupt);
        assert_eq!(pointer.extract_verified(&frame[..frame.len() - 3], &entry.hash).unwrap_err().kind(), ErrorKind::Corrupt);
        // A pack whose frame is damaged fails verification or names the damaged chunks.
        let mut damaged = bytes.clone();
        let at = (pointer.frame_offset + u64::from(pointer.frame_len) / 2) as usize;
        damaged[at] ^= 0x55;
        match index.verify(&damaged) {
            Ok(bad) => assert!(!bad.is_empty()),
            Err(err) => assert_eq!(err.kind(), ErrorKind::Corrupt),
        }
        // An index cut short, a wrong magic, a wrong total length.
        assert!(PackIndex::parse(&bytes[..40], bytes.len() as u64).is_err());
        assert!(PackIndex::parse(b"FWPACK\x00\x02aaaaaaaaaaaaaa", 100).is_err());
        assert!(PackIndex::parse(&bytes, bytes.len() as u64 + 1).is_err());
    }

    #[test]
    fn pointers_are_told_from_frames_and_checked() {
        let frame = crate::chunk::compress(b"a chunk", 3).unwrap();
        assert_eq!(PackPointer::parse(&frame).unwrap(), None);
        let (_, _, id, index) = sample_pack(10_000);
        let pointer = index.pointer(id, &index.chunks[2]);
        let encoded = pointer.encode();
        assert!(PackPointer::parse(&encoded[..POINTER_LEN - 1]).is_err());
        for bad in [
            PackPointer { frame_raw_len: (MAX_PACK_FRAME_LEN + 1) as u32, ..pointer },
            PackPointer { frame_len: u32::MAX, ..pointer },
            PackPointer { offset: pointer.frame_raw_len, ..pointer },
        ] {
            assert_eq!(PackPointer::parse(&bad.encode()).unwrap_err().kind(), ErrorKind::Corrupt, "{bad:?}");
        }
    }

    #[test]
    fn stored_frames_decompress_like_compressed_ones() {
        for len in [0, 1, 1000, 128 * 1024, 128 * 1024 + 1, 600_000] {
            let data = chunk(7, len);
            let frame = stored_frame(&data);
            assert_eq!(zstd::zstd_safe::get_frame_content_size(&frame).unwrap(), Some(len as u64));
            assert!(frame.len() as u64 <= crate::chunk::max_frame_len(len as u64));
            assert_eq!(decompress_verified(&frame, &ChunkHash::of(&data), len).unwrap(), data, "{len}");
        }
    }
}
