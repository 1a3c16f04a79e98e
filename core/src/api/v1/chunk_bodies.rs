//! The two binary bodies of the chunk API, each written and read here only, so that server
//! and client cannot drift apart:
//!
//! - the answer of `POST chunks`: per chunk asked for, in request order, an 8-byte
//!   little-endian frame length, then the zstd frame;
//! - the body of `POST upload-chunks`: per chunk, its 32-byte BLAKE3 hash, an 8-byte
//!   little-endian frame length, then the zstd frame.

use std::ops::Range;

use crate::chunk::{max_frame_len, ChunkHash};
use crate::manifest::ChunkRef;
use crate::{Error, Result};

/// Bytes before each frame of a `POST chunks` answer: its length.
pub const FRAME_PREFIX_LEN: usize = 8;

/// Bytes before each frame of an `upload-chunks` record: the hash, then the length.
pub const UPLOAD_RECORD_HEADER_LEN: usize = 32 + 8;

/// One frame of a `POST chunks` answer, with its length prefix.
pub fn framed_chunk(frame: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(FRAME_PREFIX_LEN + frame.len());
    framed.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    framed.extend_from_slice(frame);
    framed
}

/// Splits a `POST chunks` answer into the frames of `chunks`, in order, unverified. A frame
/// longer than any frame of its chunk's size, or an answer cut short, is
/// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) (a stream that broke off is a
/// failed fetch, worth retrying); bytes after the last frame are
/// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt).
pub fn split_framed_chunks<'a>(body: &'a [u8], chunks: &[ChunkRef]) -> Result<Vec<&'a [u8]>> {
    let mut rest = body;
    let mut frames = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let Some((len, after)) = rest.split_first_chunk::<FRAME_PREFIX_LEN>() else {
            return Err(Error::unavailable(format!("chunk stream ended before chunk {}", chunk.hash)));
        };
        let len = u64::from_le_bytes(*len);
        if len > max_frame_len(u64::from(chunk.size)) || len > after.len() as u64 {
            return Err(Error::unavailable(format!("chunk stream is cut or malformed at chunk {}", chunk.hash)));
        }
        let (frame, after) = after.split_at(len as usize);
        frames.push(frame);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(Error::corrupt("chunk stream has bytes after the last chunk"));
    }
    Ok(frames)
}

/// The `upload-chunks` body of these (hash, frame) pairs.
pub fn encode_upload_records(chunks: &[(ChunkHash, &[u8])]) -> Vec<u8> {
    let size: usize = chunks.iter().map(|(_, frame)| UPLOAD_RECORD_HEADER_LEN + frame.len()).sum();
    let mut body = Vec::with_capacity(size);
    for (hash, frame) in chunks {
        body.extend_from_slice(&hash.0);
        body.extend_from_slice(&(frame.len() as u64).to_le_bytes());
        body.extend_from_slice(frame);
    }
    body
}

/// Splits an `upload-chunks` body into (hash, frame range) records; the frames are not checked
/// here. A body with no record, or a record that claims more bytes than follow, is
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput).
pub fn parse_upload_records(body: &[u8]) -> Result<Vec<(ChunkHash, Range<usize>)>> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        let Some((hash, len)) = body.get(at..).and_then(|rest| rest.split_first_chunk::<32>()).and_then(|(hash, rest)| {
            rest.first_chunk::<8>().map(|len| (ChunkHash(*hash), u64::from_le_bytes(*len)))
        }) else {
            return Err(Error::invalid(format!(
                "upload-chunks body is truncated at byte {at}: a record needs {UPLOAD_RECORD_HEADER_LEN} header bytes"
            )));
        };
        let start = at + UPLOAD_RECORD_HEADER_LEN;
        let end = usize::try_from(len).ok().and_then(|len| start.checked_add(len)).filter(|&end| end <= body.len()).ok_or_else(|| {
            Error::invalid(format!("upload-chunks record of chunk {hash} claims {len} bytes, more than the body holds"))
        })?;
        records.push((hash, start..end));
        at = end;
    }
    if records.is_empty() {
        return Err(Error::invalid("upload-chunks body holds no chunks"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn chunk(n: u8, size: u32) -> ChunkRef {
        ChunkRef { hash: ChunkHash([n; 32]), size }
    }

    #[test]
    fn framed_chunks_round_trip() {
        let frames: [&[u8]; 3] = [b"first frame", b"", b"third"];
        let chunks = [chunk(1, 100), chunk(2, 1), chunk(3, 100)];
        let body: Vec<u8> = frames.iter().flat_map(|f| framed_chunk(f)).collect();
        assert_eq!(split_framed_chunks(&body, &chunks).unwrap(), frames);
    }

    #[test]
    fn framed_chunks_cut_oversized_or_padded_are_refused() {
        let body: Vec<u8> = [framed_chunk(b"one"), framed_chunk(b"two")].concat();
        let chunks = [chunk(1, 10), chunk(2, 10)];
        for cut in [body.len() - 1, 11, 5, 0] {
            let err = split_framed_chunks(&body[..cut], &chunks).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unavailable, "cut at {cut}: {err}");
        }
        let mut padded = body.clone();
        padded.push(0);
        assert_eq!(split_framed_chunks(&padded, &chunks).unwrap_err().kind(), ErrorKind::Corrupt);
        // A length no frame of a 10-byte chunk can have, even if the bytes are there.
        let huge = framed_chunk(&vec![0; 2048]);
        assert_eq!(split_framed_chunks(&huge, &chunks[..1]).unwrap_err().kind(), ErrorKind::Unavailable);
        let claims_too_much = [u64::MAX.to_le_bytes().as_slice(), b"x"].concat();
        assert_eq!(split_framed_chunks(&claims_too_much, &chunks[..1]).unwrap_err().kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn encoded_upload_records_parse_back() {
        let records: [(ChunkHash, &[u8]); 3] =
            [(ChunkHash([1; 32]), b"a frame"), (ChunkHash([2; 32]), b""), (ChunkHash([3; 32]), b"last")];
        let body = encode_upload_records(&records);
        let parsed = parse_upload_records(&body).unwrap();
        let decoded: Vec<(ChunkHash, &[u8])> = parsed.into_iter().map(|(hash, range)| (hash, &body[range])).collect();
        assert_eq!(decoded, records);
    }

    #[test]
    fn bad_upload_bodies_are_refused() {
        let body = encode_upload_records(&[(ChunkHash([1; 32]), b"frame".as_slice())]);
        for (bad, why) in [
            (&[][..], "no chunks"),
            (&body[..39], "truncated at byte 0"),
            (&body[..body.len() - 1], "more than the body holds"),
        ] {
            let err = parse_upload_records(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.message().contains(why), "{err}");
        }
        let second_cut = [body.clone(), body[..20].to_vec()].concat();
        assert!(parse_upload_records(&second_cut).unwrap_err().message().contains(&format!("byte {}", body.len())));
        let mut lies = body.clone();
        lies[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_upload_records(&lies).unwrap_err().message().contains("more than the body holds"));
    }
}
