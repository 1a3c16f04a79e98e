//! The owner's socket protocol, both ends in one place. A request is one byte of operation
//! and a length-prefixed body; a reply is one status byte (ok, none, error) and a
//! length-prefixed body, whose meaning depends on the request it answers.
//!
//! The bytes stay as they were before this module existed, so that a runner upgraded while an
//! older mount owns the cache still shares it.

use std::io::{Read, Write};

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;

use crate::cache::CacheStats;

/// Largest body either side accepts (manifests of huge paths are the big ones).
const MAX_BODY: u32 = 256 << 20;

/// The operation a request asks for: the first byte of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Get = 1,
    Insert,
    Contains,
    GetManifest,
    PutManifest,
    ManifestHashes,
    Usage,
    Flush,
    Stats,
    InsertMany,
}

impl Op {
    const ALL: [Op; 10] = [
        Op::Get,
        Op::Insert,
        Op::Contains,
        Op::GetManifest,
        Op::PutManifest,
        Op::ManifestHashes,
        Op::Usage,
        Op::Flush,
        Op::Stats,
        Op::InsertMany,
    ];

    fn from_byte(byte: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == byte)
    }
}

/// The first byte of a reply: how the owner answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    /// Done, or found: the body holds the answer.
    Found = 0,
    /// Not found; the body is empty.
    NotFound,
    /// The owner failed; the body says why.
    Failed,
}

impl Status {
    fn from_byte(byte: u8) -> Option<Status> {
        [Status::Found, Status::NotFound, Status::Failed].into_iter().find(|status| *status as u8 == byte)
    }
}

/// One operation on the owner's cache.
#[derive(Debug, Clone)]
pub(super) enum Request<'a> {
    /// The verified contents of a chunk.
    Get(ChunkRef),
    /// Store one frame.
    Insert(ChunkHash, &'a [u8]),
    /// Store several frames in one write (owners older than this operation refuse it).
    InsertMany(Vec<(ChunkHash, &'a [u8])>),
    /// Whether an entry exists.
    Contains(ChunkHash),
    /// A path's manifest, by hash part.
    GetManifest(String),
    /// Remember a path's manifest.
    PutManifest(String, PathManifest),
    /// Hash parts of every cached manifest.
    ManifestHashes,
    /// Quota and bytes used.
    Usage,
    /// Write everything to disk.
    Flush,
    /// The owner's counters.
    Stats,
}

/// The owner's answer to a [`Request`]; which variant answers which request is fixed.
#[derive(Debug, Clone)]
pub(super) enum Reply {
    /// To `Get`: the contents, or `None` when not cached.
    Chunk(Option<Vec<u8>>),
    /// To `Contains`.
    Present(bool),
    /// To `GetManifest`: `None` when not cached (or when what came back does not parse).
    Manifest(Option<PathManifest>),
    /// To `ManifestHashes`.
    ManifestHashes(Vec<String>),
    /// To `Usage`.
    Usage { quota: u64, used: u64 },
    /// To `Stats`.
    Stats(CacheStats),
    /// To `Insert`, `InsertMany`, `PutManifest` and `Flush`.
    Done,
    /// The request failed, or was malformed.
    Failed(String),
}

/// A request or reply that breaks the protocol.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed;

impl<'a> Request<'a> {
    /// The operation byte and body.
    pub(super) fn encode(&self) -> (u8, Vec<u8>) {
        let (op, body) = match self {
            Request::Get(chunk) => (Op::Get, [&chunk.hash.0[..], &chunk.size.to_le_bytes()].concat()),
            Request::Insert(hash, frame) => (Op::Insert, [&hash.0[..], frame].concat()),
            Request::InsertMany(frames) => {
                let mut body = Vec::with_capacity(frames.iter().map(|(_, f)| 36 + f.len()).sum());
                for (hash, frame) in frames {
                    body.extend_from_slice(&hash.0);
                    body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                    body.extend_from_slice(frame);
                }
                (Op::InsertMany, body)
            }
            Request::Contains(hash) => (Op::Contains, hash.0.to_vec()),
            Request::GetManifest(hash_part) => (Op::GetManifest, hash_part.as_bytes().to_vec()),
            Request::PutManifest(hash_part, manifest) => {
                let mut body = (hash_part.len() as u32).to_le_bytes().to_vec();
                body.extend_from_slice(hash_part.as_bytes());
                // Serializing a manifest into a Vec cannot fail.
                body.extend_from_slice(&serde_json::to_vec(manifest).unwrap_or_default());
                (Op::PutManifest, body)
            }
            Request::ManifestHashes => (Op::ManifestHashes, Vec::new()),
            Request::Usage => (Op::Usage, Vec::new()),
            Request::Flush => (Op::Flush, Vec::new()),
            Request::Stats => (Op::Stats, Vec::new()),
        };
        (op as u8, body)
    }

    /// Reads a request from its operation byte and body (which it borrows frames from).
    pub(super) fn decode(op: u8, body: &'a [u8]) -> Result<Self, Malformed> {
        Ok(match Op::from_byte(op).ok_or(Malformed)? {
            Op::Get => {
                let (hash, rest) = hash_and_rest(body)?;
                Request::Get(ChunkRef { hash, size: u32::from_le_bytes(*exact::<4>(rest)?) })
            }
            Op::Insert => {
                let (hash, frame) = hash_and_rest(body)?;
                Request::Insert(hash, frame)
            }
            Op::InsertMany => {
                let mut frames = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (hash, after) = hash_and_rest(rest)?;
                    let (len, after) = after.split_first_chunk::<4>().ok_or(Malformed)?;
                    let len = u32::from_le_bytes(*len) as usize;
                    let frame = after.get(..len).ok_or(Malformed)?;
                    frames.push((hash, frame));
                    rest = &after[len..];
                }
                Request::InsertMany(frames)
            }
            Op::Contains => Request::Contains(ChunkHash(*exact::<32>(body)?)),
            Op::GetManifest => Request::GetManifest(utf8(body)?),
            Op::PutManifest => {
                let (len, rest) = body.split_first_chunk::<4>().ok_or(Malformed)?;
                let len = u32::from_le_bytes(*len) as usize;
                let hash_part = utf8(rest.get(..len).ok_or(Malformed)?)?;
                let manifest = serde_json::from_slice::<PathManifest>(&rest[len..]).map_err(|_| Malformed)?;
                Request::PutManifest(hash_part, manifest)
            }
            Op::ManifestHashes => Request::ManifestHashes,
            Op::Usage => Request::Usage,
            Op::Flush => Request::Flush,
            Op::Stats => Request::Stats,
        })
    }

    /// Reads the owner's answer to this request from its status byte and body.
    pub(super) fn decode_reply(&self, status: u8, body: Vec<u8>) -> Result<Reply, Malformed> {
        if status == Status::Failed as u8 {
            return Ok(Reply::Failed(String::from_utf8_lossy(&body).into_owned()));
        }
        let found = match Status::from_byte(status) {
            Some(Status::Found) => true,
            Some(Status::NotFound) => false,
            _ => return Err(Malformed),
        };
        Ok(match self {
            Request::Get(_) => Reply::Chunk(found.then_some(body)),
            Request::Contains(_) => Reply::Present(found),
            Request::GetManifest(_) => Reply::Manifest(
                found
                    .then(|| serde_json::from_slice::<PathManifest>(&body).ok())
                    .flatten()
                    .filter(|m| m.manifest.validate().is_ok()),
            ),
            Request::ManifestHashes => Reply::ManifestHashes(
                String::from_utf8_lossy(&body).split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            ),
            Request::Usage => {
                let [quota, used] = u64_fields::<2>(&body)?;
                Reply::Usage { quota, used }
            }
            Request::Stats => {
                let [hits, misses, corrupt, evictions, write_failures] = u64_fields::<5>(&body)?;
                Reply::Stats(CacheStats { hits, misses, corrupt, evictions, write_failures })
            }
            Request::Insert(..) | Request::InsertMany(_) | Request::PutManifest(..) | Request::Flush => Reply::Done,
        })
    }
}

impl Reply {
    /// The status byte and body; taken by value so that a chunk's bytes are not copied.
    pub(super) fn encode(self) -> (u8, Vec<u8>) {
        let (status, body) = match self {
            Reply::Chunk(Some(data)) => (Status::Found, data),
            Reply::Chunk(None) | Reply::Manifest(None) | Reply::Present(false) => (Status::NotFound, Vec::new()),
            Reply::Present(true) | Reply::Done => (Status::Found, Vec::new()),
            // Serializing a manifest into a Vec cannot fail.
            Reply::Manifest(Some(manifest)) => (Status::Found, serde_json::to_vec(&manifest).unwrap_or_default()),
            Reply::ManifestHashes(hashes) => (Status::Found, hashes.join("\n").into_bytes()),
            Reply::Usage { quota, used } => (Status::Found, [quota.to_le_bytes(), used.to_le_bytes()].concat()),
            Reply::Stats(s) => {
                let fields = [s.hits, s.misses, s.corrupt, s.evictions, s.write_failures];
                (Status::Found, fields.iter().flat_map(|f| f.to_le_bytes()).collect())
            }
            Reply::Failed(why) => (Status::Failed, why.as_bytes().to_vec()),
        };
        (status as u8, body)
    }

    /// The answer to a request that did not parse.
    pub(super) fn malformed() -> Reply {
        Reply::Failed("malformed request".to_string())
    }
}

fn hash_and_rest(body: &[u8]) -> Result<(ChunkHash, &[u8]), Malformed> {
    body.split_first_chunk::<32>().map(|(hash, rest)| (ChunkHash(*hash), rest)).ok_or(Malformed)
}

fn exact<const N: usize>(body: &[u8]) -> Result<&[u8; N], Malformed> {
    body.try_into().map_err(|_| Malformed)
}

fn utf8(bytes: &[u8]) -> Result<String, Malformed> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Malformed)
}

fn u64_fields<const N: usize>(body: &[u8]) -> Result<[u64; N], Malformed> {
    if body.len() != N * 8 {
        return Err(Malformed);
    }
    let mut fields = [0u64; N];
    for (field, bytes) in fields.iter_mut().zip(body.chunks_exact(8)) {
        *field = u64::from_le_bytes(*exact::<8>(bytes)?);
    }
    Ok(fields)
}

/// Writes one message: a tag (operation or status) and a length-prefixed body.
pub(super) fn write_message(stream: &mut impl Write, tag: u8, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len()).ok().filter(|&len| len <= MAX_BODY).ok_or_else(|| std::io::Error::other("message too large"))?;
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(body)
}

/// Reads one message; a body over the bound is refused before it is allocated.
pub(super) fn read_message(stream: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_BODY {
        return Err(std::io::Error::other("message too large"));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    Ok((head[0], body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> PathManifest {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        let mut nar = Vec::new();
        flywheel_core::nar::dump_path(dir.path(), &mut nar).unwrap();
        let path = format!("/nix/store/{}-f", "0".repeat(32));
        crate::MemorySource::default().add_path(&path, &nar, vec![], Default::default()).unwrap()
    }

    /// Requests and replies have no `PartialEq` (manifests do not); their debug forms show
    /// every field.
    fn same(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// Every request, written and read back through a byte stream, is the same request, and
    /// each reply it can get reads back as itself.
    #[test]
    fn requests_and_replies_round_trip() {
        let frame_a = b"frame a".to_vec();
        let frame_b = Vec::new();
        let hash = ChunkHash([7; 32]);
        let stats = CacheStats { hits: 1, misses: 2, corrupt: 3, evictions: 4, write_failures: 5 };
        let cases: Vec<(Request, Vec<Reply>)> = vec![
            (Request::Get(ChunkRef { hash, size: 123 }), vec![Reply::Chunk(Some(b"data".to_vec())), Reply::Chunk(None)]),
            (Request::Insert(hash, &frame_a), vec![Reply::Done]),
            (Request::InsertMany(vec![(hash, &frame_a), (ChunkHash([8; 32]), &frame_b)]), vec![Reply::Done]),
            (Request::Contains(hash), vec![Reply::Present(true), Reply::Present(false)]),
            (Request::GetManifest("abc".into()), vec![Reply::Manifest(Some(manifest())), Reply::Manifest(None)]),
            (Request::PutManifest("abc".into(), manifest()), vec![Reply::Done]),
            (Request::ManifestHashes, vec![Reply::ManifestHashes(vec!["a".into(), "b".into()]), Reply::ManifestHashes(vec![])]),
            (Request::Usage, vec![Reply::Usage { quota: 10, used: u64::MAX }]),
            (Request::Flush, vec![Reply::Done, Reply::Failed("disk full".into())]),
            (Request::Stats, vec![Reply::Stats(stats)]),
        ];
        for (request, replies) in cases {
            let (op, body) = request.encode();
            let mut wire = Vec::new();
            write_message(&mut wire, op, &body).unwrap();
            let (op, body) = read_message(&mut wire.as_slice()).unwrap();
            let decoded = Request::decode(op, &body).unwrap();
            assert!(same(&decoded, &request), "{decoded:?} != {request:?}");
            for reply in replies {
                let (status, body) = reply.clone().encode();
                let decoded = request.decode_reply(status, body).unwrap();
                assert!(same(&decoded, &reply), "{request:?}: {decoded:?} != {reply:?}");
            }
        }
    }

    #[test]
    fn operation_and_status_bytes_read_back() {
        for op in Op::ALL {
            assert_eq!(Op::from_byte(op as u8), Some(op));
        }
        assert_eq!(Op::from_byte(0), None);
        for status in [Status::Found, Status::NotFound, Status::Failed] {
            assert_eq!(Status::from_byte(status as u8), Some(status));
        }
        assert_eq!(Status::from_byte(3), None);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let (op, body) = Request::InsertMany(vec![(ChunkHash([1; 32]), b"frame".as_slice())]).encode();
        assert!(Request::decode(op, &body).is_ok());
        assert!(Request::decode(op, &body[..body.len() - 1]).is_err());
        assert!(Request::decode(op, &body[..20]).is_err());
        assert!(Request::decode(Op::Contains as u8, &[0; 31]).is_err());
        assert!(Request::decode(Op::Get as u8, &[0; 35]).is_err());
        assert!(Request::decode(Op::PutManifest as u8, &[200, 0, 0, 0, b'x']).is_err());
        assert!(Request::decode(99, &[]).is_err());
        assert!(Request::Usage.decode_reply(Status::Found as u8, vec![0; 15]).is_err());
        assert!(Request::Usage.decode_reply(7, vec![]).is_err());
        let mut oversized = vec![Op::Get as u8];
        oversized.extend_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert!(read_message(&mut oversized.as_slice()).is_err());
    }
}
