//! The chunk API's bodies: JSON wire types, chunk names, chunk-list deltas and the
//! `upload-chunks` records.

use flywheel_core::api::v1::chunks::{
    BaseChunks, ChunkBatch, ChunkDelta, ChunkList, CommitRequest, DeltaRun, MAX_CHUNKS_PER_REQUEST,
};
use flywheel_core::api::v1::chunk_bodies::parse_upload_records;
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::ErrorKind;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config;

pub fn chunk_hash() -> impl Strategy<Value = ChunkHash> {
    // Mostly a few distinct hashes, so that lists repeat chunks and deltas find runs.
    prop_oneof![
        3 => (0u8..6).prop_map(|n| ChunkHash([n; 32])),
        1 => any::<[u8; 32]>().prop_map(ChunkHash),
    ]
}

pub fn chunk_ref() -> impl Strategy<Value = ChunkRef> {
    let size = prop_oneof![3 => 1u32..4, 1 => any::<u32>()];
    (chunk_hash(), size).prop_map(|(hash, size)| ChunkRef { hash, size })
}

fn chunk_refs(max: usize) -> impl Strategy<Value = Vec<ChunkRef>> {
    proptest::collection::vec(chunk_ref(), 0..max)
}

fn record(hash: &ChunkHash, frame: &[u8]) -> Vec<u8> {
    let mut out = hash.0.to_vec();
    out.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    out.extend_from_slice(frame);
    out
}

fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![Just(u64::MAX), (0u64..64).prop_map(|k| u64::MAX - k), Just(1 << 63), any::<u64>(), 0u64..100]
}

fn text() -> impl Strategy<Value = String> {
    ".{0,20}"
}

fn delta_run() -> impl Strategy<Value = DeltaRun> {
    let index = || prop_oneof![4 => 0u32..12, 1 => any::<u32>(), 1 => (0u32..4).prop_map(|k| u32::MAX - k)];
    prop_oneof![
        (index(), index()).prop_map(|(start, len)| DeltaRun::Copy(start, len)),
        chunk_ref().prop_map(DeltaRun::New),
    ]
}

fn chunk_delta() -> impl Strategy<Value = ChunkDelta> {
    (text(), proptest::collection::vec(delta_run(), 0..12)).prop_map(|(base, runs)| ChunkDelta { base, runs })
}

fn chunk_list() -> impl Strategy<Value = ChunkList> {
    (proptest::collection::vec(chunk_hash(), 0..10), proptest::option::of(text()))
        .prop_map(|(chunks, query)| ChunkList { chunks, query })
}

/// A batch as a client may send it: sizes no chunk can have fail to parse (tested apart).
fn chunk_batch() -> impl Strategy<Value = ChunkBatch> {
    let possible = (chunk_hash(), 1u32..=flywheel_core::chunk::MAX_CHUNK_LEN as u32).prop_map(|(hash, size)| ChunkRef { hash, size });
    (text(), proptest::collection::vec(possible, 0..10)).prop_map(|(path, chunks)| ChunkBatch { path, chunks })
}

fn base_chunks() -> impl Strategy<Value = BaseChunks> {
    (text(), chunk_refs(10)).prop_map(|(store_path, chunks)| BaseChunks { store_path, chunks })
}

fn commit_request() -> impl Strategy<Value = CommitRequest> {
    let texts = (text(), text(), proptest::collection::vec(text(), 0..4), proptest::option::of(text()));
    let more = (proptest::collection::vec(text(), 0..3), proptest::option::of(text()), any::<u64>());
    let chunks = (
        chunk_refs(8),
        proptest::option::of(text()),
        proptest::option::of(proptest::collection::vec(any::<u32>(), 0..8)),
        proptest::collection::vec(any::<u32>(), 0..8),
        proptest::option::of(chunk_delta()),
    );
    (texts, more, chunks).prop_map(
        |((store_path, nar_hash, references, deriver), (sigs, ca, nar_size), (chunks, chunks_query, chunk_order, chunk_sizes, chunks_delta))| {
            CommitRequest {
                store_path,
                nar_hash,
                nar_size,
                references,
                deriver,
                sigs,
                ca,
                chunks,
                chunks_query,
                chunk_order,
                chunk_sizes,
                chunks_delta,
            }
        },
    )
}

/// JSON through the type and back is the same JSON.
pub fn json_round_trips<T: Serialize + DeserializeOwned>(value: &T) -> Result<(), TestCaseError> {
    let json = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(format!("{e}: {json}")))?;
    prop_assert_eq!(serde_json::to_string(&back).unwrap(), json);
    Ok(())
}

/// Damages JSON text: drops, repeats or replaces a piece of it, or splices in a JSON token.
pub fn damage(json: &str, at: usize, len: usize, how: u8, token: &str) -> Vec<u8> {
    let mut bytes = json.as_bytes().to_vec();
    let at = at % (bytes.len() + 1);
    let end = (at + len).min(bytes.len());
    match how % 4 {
        0 => {
            bytes.drain(at..end);
        }
        1 => {
            let piece = bytes[at..end].to_vec();
            bytes.splice(at..at, piece);
        }
        2 => {
            bytes.splice(at..end, token.bytes());
        }
        _ => {
            bytes.splice(at..at, token.bytes());
        }
    }
    bytes
}

pub fn json_token() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "{", "}", "[", "]", ",", ":", "\"", "null", "true", "-1", "1e999", "18446744073709551616",
            "4294967296", "\"\\ud800\"", "\"copy\"", "\"new\"", "{\"copy\":[0,1]}", "\"chunks\"",
            "\"hash\"", "\"size\"", "\"type\"", "\"regular\"", "\"directory\"", "\"symlink\"",
        ])
        .prop_map(str::to_string),
        ".{0,6}",
    ]
}

/// Decoding damaged or arbitrary JSON never panics, and what decodes encodes again.
fn decode_untrusted<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        json_round_trips(&value)?;
    }
    Ok(())
}

/// What `expand` must do, written the plain way.
fn expand_model(runs: &[DeltaRun], base: &[ChunkRef], max: usize) -> Option<Vec<ChunkRef>> {
    let mut out = Vec::new();
    for run in runs {
        match *run {
            DeltaRun::Copy(start, len) => {
                let (start, len) = (start as u64, len as u64);
                if len == 0 || start + len > base.len() as u64 {
                    return None;
                }
                if out.len() as u64 + len > max as u64 {
                    return None;
                }
                out.extend_from_slice(&base[start as usize..(start + len) as usize]);
            }
            DeltaRun::New(chunk) => {
                if out.len() + 1 > max {
                    return None;
                }
                out.push(chunk);
            }
        }
    }
    Some(out)
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn wire_types_round_trip(
        list in chunk_list(),
        batch in chunk_batch(),
        commit in commit_request(),
        base in base_chunks(),
        delta in chunk_delta(),
    ) {
        json_round_trips(&list)?;
        json_round_trips(&batch)?;
        json_round_trips(&commit)?;
        json_round_trips(&base)?;
        let json = serde_json::to_string(&delta).unwrap();
        prop_assert_eq!(serde_json::from_str::<ChunkDelta>(&json).unwrap(), delta);
    }

    #[test]
    fn damaged_wire_json_never_panics(
        commit in commit_request(),
        batch in chunk_batch(),
        at in any::<usize>(),
        len in 0usize..12,
        how in any::<u8>(),
        token in json_token(),
    ) {
        let commit = damage(&serde_json::to_string(&commit).unwrap(), at, len, how, &token);
        decode_untrusted::<CommitRequest>(&commit)?;
        decode_untrusted::<ChunkDelta>(&commit)?;
        let batch = damage(&serde_json::to_string(&batch).unwrap(), at, len, how, &token);
        decode_untrusted::<ChunkBatch>(&batch)?;
        decode_untrusted::<ChunkList>(&batch)?;
        decode_untrusted::<BaseChunks>(&batch)?;
    }

    #[test]
    fn arbitrary_wire_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        decode_untrusted::<CommitRequest>(&bytes)?;
        decode_untrusted::<ChunkBatch>(&bytes)?;
        decode_untrusted::<ChunkList>(&bytes)?;
        decode_untrusted::<BaseChunks>(&bytes)?;
        decode_untrusted::<ChunkDelta>(&bytes)?;
    }

    #[test]
    fn chunk_names_parse_only_their_canonical_form(
        s in prop_oneof!["[0-9a-f]{64}", "[0-9a-fA-F]{62,66}", ".{0,70}"],
        hash in any::<[u8; 32]>(),
    ) {
        match s.parse::<ChunkHash>() {
            Ok(parsed) => prop_assert_eq!(parsed.to_hex(), s),
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
        }
        let hash = ChunkHash(hash);
        prop_assert_eq!(hash.to_hex().parse::<ChunkHash>().unwrap(), hash);
    }

    #[test]
    fn a_delta_expands_to_the_list_it_describes(base in chunk_refs(40), chunks in chunk_refs(40)) {
        let delta = ChunkDelta::between("base".into(), &base, &chunks);
        prop_assert_eq!(delta.expand(&base, chunks.len()).unwrap(), chunks.clone());
        // Every copy is as long as it can be: the chunk after it does not continue the run.
        let mut at = 0;
        for run in &delta.runs {
            match *run {
                DeltaRun::Copy(start, len) => {
                    let end = (start + len) as usize;
                    at += len as usize;
                    prop_assert!(len > 0);
                    prop_assert!(base.get(end).is_none() || chunks.get(at) != base.get(end));
                }
                DeltaRun::New(chunk) => {
                    prop_assert!(!base.contains(&chunk));
                    at += 1;
                }
            }
        }
        if !chunks.is_empty() {
            let err = delta.expand(&base, chunks.len() - 1).unwrap_err();
            prop_assert_eq!(err.kind(), ErrorKind::InvalidInput);
        }
    }

    /// Any runs against any base: the list a plain reading makes, or InvalidInput, never a
    /// panic or an overflow.
    #[test]
    fn any_delta_expands_like_the_model_or_is_refused(
        delta in chunk_delta(),
        base in chunk_refs(16),
        max in prop_oneof![0usize..30, Just(MAX_CHUNKS_PER_REQUEST), Just(usize::MAX)],
    ) {
        match (delta.expand(&base, max), expand_model(&delta.runs, &base, max)) {
            (Ok(got), Some(want)) => prop_assert_eq!(got, want),
            (Err(err), None) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
            (got, want) => prop_assert!(false, "expand gave {:?}, the model {:?}", got, want),
        }
    }

    #[test]
    fn upload_records_round_trip(records in proptest::collection::vec((any::<[u8; 32]>(), proptest::collection::vec(any::<u8>(), 0..50)), 1..6)) {
        let body: Vec<u8> = records.iter().flat_map(|(h, frame)| record(&ChunkHash(*h), frame)).collect();
        let parsed = parse_upload_records(&body).unwrap();
        prop_assert_eq!(parsed.len(), records.len());
        for ((hash, range), (h, frame)) in parsed.iter().zip(&records) {
            prop_assert_eq!(hash.0, *h);
            prop_assert_eq!(&body[range.clone()], &frame[..]);
        }
    }

    /// Garbage is refused with InvalidInput; what parses tiles the body exactly.
    #[test]
    fn upload_record_garbage_never_panics(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (any::<[u8; 32]>(), huge(), proptest::collection::vec(any::<u8>(), 0..100)).prop_map(|(h, len, rest)| {
                let mut body = h.to_vec();
                body.extend_from_slice(&len.to_le_bytes());
                body.extend(rest);
                body
            }),
        ],
    ) {
        match parse_upload_records(&body) {
            Ok(records) => {
                let mut at = 0;
                for (hash, range) in records {
                    prop_assert_eq!(&hash.0[..], &body[at..at + 32]);
                    prop_assert_eq!(range.start, at + 40);
                    prop_assert_eq!(range.len() as u64, u64::from_le_bytes(body[at + 32..at + 40].try_into().unwrap()));
                    at = range.end;
                }
                prop_assert_eq!(at, body.len());
            }
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
        }
    }
}
