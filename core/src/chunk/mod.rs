//! The chunk model: FastCDC 2020 boundaries, BLAKE3 names, one zstd frame per stored chunk
//! (or, once the server has packed it, a place in a [`pack`]).
//!
//! A chunk is named by the BLAKE3 hash of its uncompressed bytes, so every store is idempotent
//! and every read can be verified against the name it was asked for.

mod chunker;
mod hash;
pub mod pack;

pub use chunker::{ChunkParams, Chunker};
pub use hash::ChunkHash;

use crate::error::{Error, Result};

/// The zstd level used when nothing else is configured: fast enough that ingest is bound by
/// hashing, and still well compressed.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Compresses a chunk into one zstd frame (with the frame's content size, so readers can size
/// their buffer exactly).
pub fn compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    thread_local! {
        // A compression context per thread and level: setting one up costs about as much as
        // compressing a small chunk.
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                *slot = Some((level, zstd::bulk::Compressor::new(level)?));
            }
            match slot.as_mut() {
                Some((_, compressor)) => compressor.compress(data),
                None => Err(std::io::Error::other("no compressor")),
            }
        })
        .map_err(|err| Error::internal(format!("zstd compression failed: {err}")))
}

/// The largest chunk any valid [`ChunkParams`] can cut (FastCDC 2020's largest maximum). A
/// chunk length from outside (a request, a manifest, a server's answer) above it names no
/// chunk, and is refused before it sizes a buffer. The configured maximum is no bound here:
/// chunks cut under an earlier, larger setting must stay readable.
pub const MAX_CHUNK_LEN: usize = fastcdc::v2020::MAXIMUM_MAX;

/// Refuses a chunk length that no chunk can have (see [`MAX_CHUNK_LEN`]).
pub fn check_chunk_len(len: u64) -> Result<()> {
    if len > MAX_CHUNK_LEN as u64 {
        return Err(Error::invalid(format!("a chunk of {len} bytes is over the limit of {MAX_CHUNK_LEN}")));
    }
    Ok(())
}

/// Longest zstd frame a chunk of `len` bytes can take: zstd never grows data by more than a
/// small bound, so a longer frame is not that chunk (or is padded, with empty blocks say, to
/// take more room than its content).
pub fn max_frame_len(len: u64) -> u64 {
    len + len / 64 + 1024
}

/// Decompresses one stored chunk and checks it against its name and length; bytes that fail
/// verification are never returned. The output buffer is sized from `expected_len` only once
/// it is known to be possible ([`check_chunk_len`]) and to agree with the length the frame
/// declares, so a wrong length costs no memory.
pub fn decompress_verified(frame: &[u8], expected: &ChunkHash, expected_len: usize) -> Result<Vec<u8>> {
    check_chunk_len(expected_len as u64)?;
    // Frames written by `compress` declare their content size; one that declares another
    // size than expected cannot verify, and is refused before anything is allocated.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(frame) {
        if declared != expected_len as u64 {
            return Err(Error::corrupt(format!(
                "chunk {expected} is a frame of {declared} bytes, expected {expected_len}"
            )));
        }
    }
    thread_local! {
        // A decompression context per thread: making one per chunk costs more than small
        // chunks take to decompress.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let data = DECOMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            match slot.as_mut() {
                Some(decompressor) => decompressor.decompress(frame, expected_len),
                None => Err(std::io::Error::other("no decompressor")),
            }
        })
        .map_err(|err| Error::corrupt(format!("chunk {expected} does not decompress: {err}")))?;
    if data.len() != expected_len {
        return Err(Error::corrupt(format!(
            "chunk {expected} decompresses to {} bytes, expected {expected_len}",
            data.len()
        )));
    }
    let actual = ChunkHash::of(&data);
    if &actual != expected {
        return Err(Error::corrupt(format!("chunk {expected} has content hashing to {actual}")));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn compress_roundtrip_verifies() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let hash = ChunkHash::of(&data);
        let frame = compress(&data, DEFAULT_ZSTD_LEVEL).unwrap();
        assert!(frame.len() < data.len());
        assert_eq!(decompress_verified(&frame, &hash, data.len()).unwrap(), data);
    }

    #[test]
    fn corrupt_frames_are_refused() {
        let data = b"hello chunk".repeat(100);
        let hash = ChunkHash::of(&data);
        let frame = compress(&data, 1).unwrap();
        let other = ChunkHash::of(b"other");
        assert_eq!(decompress_verified(&frame, &other, data.len()).unwrap_err().kind(), ErrorKind::Corrupt);
        assert_eq!(decompress_verified(&frame, &hash, data.len() - 1).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut flipped = frame.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert_eq!(decompress_verified(&flipped, &hash, data.len()).unwrap_err().kind(), ErrorKind::Corrupt);
        assert_eq!(decompress_verified(b"garbage", &hash, data.len()).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn impossible_lengths_are_refused_before_allocating() {
        let data = b"small chunk".repeat(10);
        let hash = ChunkHash::of(&data);
        let frame = compress(&data, 1).unwrap();
        // 4 GiB - 1, the most a manifest's u32 can claim: refused as input, not attempted. (A
        // 4 GiB buffer would abort the test under a small address-space limit.)
        for len in [u32::MAX as usize, MAX_CHUNK_LEN + 1] {
            let err = decompress_verified(&frame, &hash, len).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        }
        assert!(check_chunk_len(MAX_CHUNK_LEN as u64).is_ok());
        assert_eq!(check_chunk_len(u64::MAX).unwrap_err().kind(), ErrorKind::InvalidInput);
        // A possible length that the frame contradicts is corrupt, found from the frame header.
        assert_eq!(decompress_verified(&frame, &hash, MAX_CHUNK_LEN).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn frames_without_a_declared_size_still_verify() {
        let data = b"no size in the header".repeat(50);
        let hash = ChunkHash::of(&data);
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &data).unwrap();
        let frame = encoder.finish().unwrap();
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)));
        assert_eq!(decompress_verified(&frame, &hash, data.len()).unwrap(), data);
        assert_eq!(decompress_verified(&frame, &hash, data.len() + 1).unwrap_err().kind(), ErrorKind::Corrupt);
        assert_eq!(
            decompress_verified(&frame, &hash, u32::MAX as usize).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
