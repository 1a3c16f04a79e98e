//! Sharing one cache dir between processes (the FUSE mount and the local substituter).
//!
//! sled holds its database with an exclusive lock, so one process owns the cache dir: the
//! first to open it. The owner also listens on a unix socket in the cache dir,
//! `owner.sock`, and every later opener becomes a client that sends each cache operation
//! there. Both see one cache: one quota, one LRU order, chunks fetched by either are hits for
//! both.
//!
//! When the owner exits, a client's next operation finds the socket dead, takes the lock
//! itself and becomes the owner (starting its own socket), so the cache outlives whichever
//! process opened it first. A client that can neither reach an owner nor take the lock
//! answers misses and drops writes (counted as write failures): the cache is an accelerator,
//! never a reason to fail a read.
//!
//! The protocol is private to this module (both ends are this code): a request is one byte of
//! operation and a length-prefixed body; a response is a status byte and a length-prefixed
//! body.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::{Error, ErrorKind, Result};
use parking_lot::{Mutex, RwLock};

use crate::cache::{CacheConfig, CacheStats, LocalCache};

/// Name of the owner's socket inside the cache dir.
pub const SOCKET_NAME: &str = "owner.sock";

/// How long a new opener waits for the owner's socket to appear (the owner takes the lock a
/// moment before it listens).
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Longest a client waits for one answer of the owner.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a detached cache looks for an owner or a free lock again.
const REATTACH_INTERVAL: Duration = Duration::from_secs(2);

/// Largest body either side accepts (manifests of huge paths are the big ones).
const MAX_BODY: u32 = 256 << 20;

const OP_GET: u8 = 1;
const OP_INSERT: u8 = 2;
const OP_CONTAINS: u8 = 3;
const OP_GET_MANIFEST: u8 = 4;
const OP_PUT_MANIFEST: u8 = 5;
const OP_MANIFEST_HASHES: u8 = 6;
const OP_USAGE: u8 = 7;
const OP_FLUSH: u8 = 8;
const OP_STATS: u8 = 9;
/// Several frames, each as a 32-byte hash, a 4-byte little-endian length and the frame.
const OP_INSERT_MANY: u8 = 10;

const ST_OK: u8 = 0;
const ST_NONE: u8 = 1;
const ST_ERR: u8 = 2;

/// The local chunk cache, owned by this process or shared with the process that owns the
/// cache dir (see the module docs). Share it behind an `Arc`; every method takes `&self`.
pub struct ChunkCache {
    config: CacheConfig,
    role: RwLock<Role>,
    /// Counters of what this process saw (a client counts its own hits and misses).
    stats: ClientStats,
    /// When a detached cache last tried to find an owner or the lock.
    last_attempt: Mutex<Option<Instant>>,
}

enum Role {
    Owner(Owner),
    Client(Client),
    /// Neither an owner is reachable nor the lock free: serve without caching.
    Detached,
}

struct Owner {
    cache: Arc<LocalCache>,
    socket: PathBuf,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // The accept loop holds only a weak reference and stops once the cache is gone.
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct Client {
    socket: PathBuf,
    idle: Mutex<Vec<UnixStream>>,
}

#[derive(Default)]
struct ClientStats {
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    write_failures: AtomicU64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match &*self.role.read() {
            Role::Owner(_) => "owner",
            Role::Client(_) => "client",
            Role::Detached => "detached",
        };
        f.debug_struct("ChunkCache").field("dir", &self.config.dir).field("role", &role).finish()
    }
}

impl ChunkCache {
    /// Opens (or creates) the cache in `config.dir`. When another process owns the dir, this
    /// one shares it through the owner's socket; the quota is then the owner's.
    ///
    /// Fails with [`ErrorKind::AlreadyExists`] only when the dir is locked and no owner
    /// answers on its socket within a few seconds.
    pub fn open(config: &CacheConfig) -> Result<Self> {
        let role = match open_owner(config) {
            Ok(owner) => Role::Owner(owner),
            Err(err) if err.kind() == ErrorKind::AlreadyExists => {
                let socket = config.dir.join(SOCKET_NAME);
                let deadline = Instant::now() + CONNECT_WAIT;
                let stream = loop {
                    match UnixStream::connect(&socket) {
                        Ok(stream) => break stream,
                        Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                        Err(e) => {
                            return Err(Error::new(
                                ErrorKind::AlreadyExists,
                                format!(
                                    "{}; and its owner does not answer on {} ({e})",
                                    err.message(),
                                    socket.display()
                                ),
                            ))
                        }
                    }
                };
                tracing::info!(dir = %config.dir.display(), "chunk cache is owned by another process; sharing it through its socket");
                Role::Client(Client { socket, idle: Mutex::new(vec![stream]) })
            }
            Err(err) => return Err(err),
        };
        Ok(ChunkCache {
            config: config.clone(),
            role: RwLock::new(role),
            stats: ClientStats::default(),
            last_attempt: Mutex::new(None),
        })
    }

    /// Whether this process owns the cache dir (else it shares another process's).
    pub fn is_owner(&self) -> bool {
        matches!(&*self.role.read(), Role::Owner(_))
    }

    /// Runs `local` as the owner, or `remote` as a client; a client that lost its owner takes
    /// over (or detaches) and retries once. `fallback` answers when detached.
    fn with<T>(
        &self,
        local: impl Fn(&LocalCache) -> T,
        remote: impl Fn(&Client) -> std::io::Result<T>,
        fallback: impl Fn() -> T,
    ) -> T {
        for _ in 0..2 {
            let failed = {
                let role = self.role.read();
                match &*role {
                    Role::Owner(owner) => return local(&owner.cache),
                    Role::Detached => None,
                    Role::Client(client) => match remote(client) {
                        Ok(value) => return value,
                        Err(err) => Some(err),
                    },
                }
            };
            match failed {
                Some(err) => self.reconnect_or_take_over(&err),
                None => {
                    // Detached: try again now and then, without making every call pay.
                    {
                        let mut last = self.last_attempt.lock();
                        if last.is_some_and(|t| t.elapsed() < REATTACH_INTERVAL) {
                            return fallback();
                        }
                        *last = Some(Instant::now());
                    }
                    self.reconnect_or_take_over(&std::io::Error::other("detached"));
                    if matches!(&*self.role.read(), Role::Detached) {
                        return fallback();
                    }
                }
            }
        }
        fallback()
    }

    fn reconnect_or_take_over(&self, err: &std::io::Error) {
        let mut role = self.role.write();
        if let Role::Owner(_) = &*role {
            return;
        }
        match open_owner(&self.config) {
            Ok(owner) => {
                tracing::info!(dir = %self.config.dir.display(), "the owner of the chunk cache is gone ({err}); this process owns it now");
                *role = Role::Owner(owner);
            }
            Err(_) => {
                let socket = self.config.dir.join(SOCKET_NAME);
                match UnixStream::connect(&socket) {
                    Ok(stream) => *role = Role::Client(Client { socket, idle: Mutex::new(vec![stream]) }),
                    Err(e) => {
                        if !matches!(&*role, Role::Detached) {
                            tracing::warn!(dir = %self.config.dir.display(), "the chunk cache's owner does not answer ({e}); serving without caching");
                        }
                        *role = Role::Detached;
                    }
                }
            }
        }
    }

    /// The quota in bytes (the owner's).
    pub fn quota(&self) -> u64 {
        self.usage().0
    }

    /// Bytes counted against the quota now.
    pub fn used_bytes(&self) -> u64 {
        self.usage().1
    }

    fn usage(&self) -> (u64, u64) {
        self.with(
            |c| (c.quota(), c.used_bytes()),
            |c| {
                let body = c.call(OP_USAGE, &[])?.unwrap_or_default();
                let quota = body.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
                let used = body.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
                Ok((quota, used))
            },
            || (self.config.quota, 0),
        )
    }

    /// What this process saw of the cache since it opened it (its own hits and misses, whichever
    /// process owns the cache).
    pub fn stats(&self) -> CacheStats {
        let mut mine = CacheStats {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
            corrupt: self.stats.corrupt.load(Ordering::Relaxed),
            evictions: 0,
            write_failures: self.stats.write_failures.load(Ordering::Relaxed),
        };
        if let Role::Owner(owner) = &*self.role.read() {
            let engine = owner.cache.stats();
            mine.corrupt += engine.corrupt;
            mine.evictions = engine.evictions;
            mine.write_failures += engine.write_failures;
        }
        mine
    }

    /// What the cache did for every process sharing it, since its owner opened it (for
    /// `flywheel status`); this process's own view when no owner answers.
    pub fn shared_stats(&self) -> CacheStats {
        self.with(
            |c| c.stats(),
            |c| {
                let body = c.call(OP_STATS, &[])?.unwrap_or_default();
                let field = |i: usize| {
                    body.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
                };
                Ok(CacheStats { hits: field(0), misses: field(1), corrupt: field(2), evictions: field(3), write_failures: field(4) })
            },
            || self.stats(),
        )
    }

    /// Whether the cache holds an entry for `hash`, without verifying it.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.with(|c| c.contains(hash), |c| Ok(c.call(OP_CONTAINS, &hash.0)?.is_some()), || false)
    }

    /// The verified contents of a chunk, or `None` when it is not cached. An entry that fails
    /// verification is removed and reported as `None`, so the caller fetches it again.
    pub fn get(&self, chunk: &ChunkRef) -> Option<Vec<u8>> {
        let found = self.with(
            |c| c.get(chunk),
            |c| {
                let mut body = chunk.hash.0.to_vec();
                body.extend_from_slice(&chunk.size.to_le_bytes());
                match c.call(OP_GET, &body)? {
                    None => Ok(None),
                    Some(data) if data.len() == chunk.size as usize && ChunkHash::of(&data) == chunk.hash => {
                        Ok(Some(data))
                    }
                    Some(_) => {
                        // The owner verified it a moment ago; count it and let the caller refetch.
                        tracing::warn!(chunk = %chunk.hash, "chunk from the cache's owner failed verification");
                        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        Ok(None)
                    }
                }
            },
            || None,
        );
        let counter = if found.is_some() { &self.stats.hits } else { &self.stats.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores a chunk's zstd frame, evicting the least recently used entries to make room.
    /// A write that fails is counted and logged, never returned.
    pub fn insert(&self, hash: &ChunkHash, frame: &[u8]) {
        let ok = self.with(
            |c| {
                c.insert(hash, frame);
                true
            },
            |c| c.call(OP_INSERT, &insert_body(hash, frame)).map(|_| true),
            || false,
        );
        if !ok {
            self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stores several chunks' frames, as [`ChunkCache::insert`] does; the owner indexes them in
    /// one write.
    pub fn insert_many(&self, frames: &[(ChunkHash, &[u8])]) {
        let failed = self.with(
            |c| {
                c.insert_many(frames);
                0
            },
            |c| {
                let mut body = Vec::with_capacity(frames.iter().map(|(_, f)| 36 + f.len()).sum());
                for (hash, frame) in frames {
                    body.extend_from_slice(&hash.0);
                    body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                    body.extend_from_slice(frame);
                }
                if c.call(OP_INSERT_MANY, &body).is_ok() {
                    return Ok(0);
                }
                // An owner from before OP_INSERT_MANY refuses it: one frame at a time then. A
                // failure here reconnects (or takes over) and sends them all again, which is
                // harmless.
                for (hash, frame) in frames {
                    c.call(OP_INSERT, &insert_body(hash, frame))?;
                }
                Ok(0)
            },
            || frames.len() as u64,
        );
        self.stats.write_failures.fetch_add(failed, Ordering::Relaxed);
    }

    /// The manifest of a path seen before, by hash part.
    pub fn get_manifest(&self, hash_part: &str) -> Option<PathManifest> {
        self.with(
            |c| c.get_manifest(hash_part),
            |c| {
                let Some(json) = c.call(OP_GET_MANIFEST, hash_part.as_bytes())? else { return Ok(None) };
                Ok(serde_json::from_slice::<PathManifest>(&json).ok().filter(|m| m.manifest.validate().is_ok()))
            },
            || None,
        )
    }

    /// Remembers a path's manifest; failures are logged, like chunk writes.
    pub fn put_manifest(&self, hash_part: &str, manifest: &PathManifest) {
        self.with(
            |c| c.put_manifest(hash_part, manifest),
            |c| {
                let json = serde_json::to_vec(manifest).map_err(std::io::Error::other)?;
                let mut body = (hash_part.len() as u32).to_le_bytes().to_vec();
                body.extend_from_slice(hash_part.as_bytes());
                body.extend_from_slice(&json);
                c.call(OP_PUT_MANIFEST, &body).map(|_| ())
            },
            || (),
        )
    }

    /// Hash parts of every path whose manifest is cached.
    pub fn manifest_hashes(&self) -> Vec<String> {
        self.with(
            |c| c.manifest_hashes(),
            |c| {
                let body = c.call(OP_MANIFEST_HASHES, &[])?.unwrap_or_default();
                Ok(String::from_utf8_lossy(&body).split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect())
            },
            Vec::new,
        )
    }

    /// Writes everything to disk; sled also does this on its own every half second.
    pub fn flush(&self) -> Result<()> {
        self.with(
            |c| c.flush(),
            |c| {
                c.call(OP_FLUSH, &[])?;
                Ok(Ok(()))
            },
            || Ok(()),
        )
    }
}

/// Opens the database as its owner and starts answering clients on the socket.
fn open_owner(config: &CacheConfig) -> Result<Owner> {
    let cache = Arc::new(LocalCache::open(config)?);
    let socket = config.dir.join(SOCKET_NAME);
    // A socket file left by an owner that died; we hold the lock, so it is stale.
    let _ = std::fs::remove_file(&socket);
    // Sharing is a bonus: an owner that cannot listen (a full disk, say) still serves itself.
    let listening = UnixListener::bind(&socket).and_then(|listener| {
        listener.set_nonblocking(true)?;
        let weak = Arc::downgrade(&cache);
        std::thread::Builder::new().name("cache-share".into()).spawn(move || accept_loop(listener, weak))?;
        Ok(())
    });
    if let Err(err) = listening {
        tracing::warn!(socket = %socket.display(), "cannot listen for processes sharing the cache; others cannot open it while this one runs: {err}");
    }
    Ok(Owner { cache, socket })
}

fn accept_loop(listener: UnixListener, cache: Weak<LocalCache>) {
    loop {
        if cache.strong_count() == 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let cache = cache.clone();
                let _ = stream.set_nonblocking(false);
                let _ = std::thread::Builder::new().name("cache-share-conn".into()).spawn(move || serve_conn(stream, cache));
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(err) => {
                tracing::debug!("accepting a cache client failed: {err}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Answers one client's requests until it hangs up or the cache is closed.
fn serve_conn(mut stream: UnixStream, cache: Weak<LocalCache>) {
    loop {
        let Ok((op, body)) = read_message(&mut stream) else { return };
        let Some(cache) = cache.upgrade() else { return };
        let (status, reply) = answer(&cache, op, &body);
        drop(cache);
        if write_message(&mut stream, status, &reply).is_err() {
            return;
        }
    }
}

/// The body of an `OP_INSERT`: the hash, then the frame.
fn insert_body(hash: &ChunkHash, frame: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + frame.len());
    body.extend_from_slice(&hash.0);
    body.extend_from_slice(frame);
    body
}

fn hash_of(body: &[u8]) -> Option<ChunkHash> {
    body.get(..32).and_then(|b| <[u8; 32]>::try_from(b).ok()).map(ChunkHash)
}

fn answer(cache: &LocalCache, op: u8, body: &[u8]) -> (u8, Vec<u8>) {
    let bad = || (ST_ERR, b"malformed request".to_vec());
    match op {
        OP_GET => {
            let (Some(hash), Some(size)) = (hash_of(body), body.get(32..36).and_then(|b| b.try_into().ok())) else {
                return bad();
            };
            let chunk = ChunkRef { hash, size: u32::from_le_bytes(size) };
            match cache.get(&chunk) {
                // Verified by the owner; the client checks the hash again.
                Some(data) => (ST_OK, data),
                None => (ST_NONE, Vec::new()),
            }
        }
        OP_INSERT => {
            let Some(hash) = hash_of(body) else { return bad() };
            cache.insert(&hash, &body[32..]);
            (ST_OK, Vec::new())
        }
        OP_INSERT_MANY => {
            let mut frames: Vec<(ChunkHash, &[u8])> = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                let (Some(hash), Some(len)) = (hash_of(rest), rest.get(32..36).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes))
                else {
                    return bad();
                };
                let Some(frame) = rest.get(36..36 + len as usize) else { return bad() };
                frames.push((hash, frame));
                rest = &rest[36 + len as usize..];
            }
            cache.insert_many(&frames);
            (ST_OK, Vec::new())
        }
        OP_CONTAINS => match hash_of(body) {
            Some(hash) if cache.contains(&hash) => (ST_OK, Vec::new()),
            Some(_) => (ST_NONE, Vec::new()),
            None => bad(),
        },
        OP_GET_MANIFEST => {
            let hash_part = String::from_utf8_lossy(body);
            match cache.get_manifest(&hash_part).and_then(|m| serde_json::to_vec(&m).ok()) {
                Some(json) => (ST_OK, json),
                None => (ST_NONE, Vec::new()),
            }
        }
        OP_PUT_MANIFEST => {
            let Some(len) = body.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) else { return bad() };
            let Some(hash_part) = body.get(4..4 + len as usize) else { return bad() };
            let Ok(manifest) = serde_json::from_slice::<PathManifest>(&body[4 + len as usize..]) else { return bad() };
            cache.put_manifest(&String::from_utf8_lossy(hash_part), &manifest);
            (ST_OK, Vec::new())
        }
        OP_MANIFEST_HASHES => (ST_OK, cache.manifest_hashes().join("\n").into_bytes()),
        OP_USAGE => {
            let mut out = cache.quota().to_le_bytes().to_vec();
            out.extend_from_slice(&cache.used_bytes().to_le_bytes());
            (ST_OK, out)
        }
        OP_STATS => {
            let stats = cache.stats();
            let fields = [stats.hits, stats.misses, stats.corrupt, stats.evictions, stats.write_failures];
            (ST_OK, fields.iter().flat_map(|f| f.to_le_bytes()).collect())
        }
        OP_FLUSH => match cache.flush() {
            Ok(()) => (ST_OK, Vec::new()),
            Err(err) => (ST_ERR, err.to_string().into_bytes()),
        },
        _ => bad(),
    }
}

impl Client {
    /// One request and its answer: `Some(body)` for OK, `None` for "none"; an error answer or
    /// a broken connection is an I/O error.
    fn call(&self, op: u8, body: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let stream = self.idle.lock().pop();
        let mut stream = match stream {
            Some(stream) => stream,
            None => {
                let stream = UnixStream::connect(&self.socket)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                stream
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        write_request(&mut stream, op, body)?;
        let (status, reply) = read_message(&mut stream)?;
        self.idle.lock().push(stream);
        match status {
            ST_OK => Ok(Some(reply)),
            ST_NONE => Ok(None),
            _ => Err(std::io::Error::other(format!("cache owner: {}", String::from_utf8_lossy(&reply)))),
        }
    }
}

fn write_request(stream: &mut UnixStream, op: u8, body: &[u8]) -> std::io::Result<()> {
    write_message(stream, op, body)
}

fn write_message(stream: &mut UnixStream, tag: u8, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(body)
}

fn read_message(stream: &mut UnixStream) -> std::io::Result<(u8, Vec<u8>)> {
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
    use flywheel_core::chunk::compress;

    fn chunk(byte: u8, len: usize) -> (ChunkRef, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(byte)).collect();
        (ChunkRef { hash: ChunkHash::of(&data), size: len as u32 }, compress(&data, 1).unwrap())
    }

    #[test]
    fn a_second_opener_shares_the_cache_and_takes_over_when_the_owner_goes() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig::new(dir.path(), 10 << 20);
        let first = ChunkCache::open(&config).unwrap();
        let second = ChunkCache::open(&config).unwrap();
        assert!(first.is_owner());
        assert!(!second.is_owner());
        let (a, frame_a) = chunk(1, 100_000);
        let (b, frame_b) = chunk(2, 70_000);
        first.insert(&a.hash, &frame_a);
        second.insert(&b.hash, &frame_b);
        assert!(second.get(&a).is_some(), "the client sees what the owner cached");
        assert!(first.get(&b).is_some(), "the owner sees what the client cached");
        // A batch from the client lands whole; a malformed one is refused and changes nothing.
        let (d, frame_d) = chunk(4, 50_000);
        let (e, frame_e) = chunk(5, 60_000);
        second.insert_many(&[(d.hash, &frame_d), (e.hash, &frame_e)]);
        assert!(first.get(&d).is_some() && first.get(&e).is_some(), "the owner has the client's batch");
        let (f, frame_f) = chunk(6, 1000);
        let mut truncated = f.hash.0.to_vec();
        truncated.extend_from_slice(&(frame_f.len() as u32 + 1).to_le_bytes());
        truncated.extend_from_slice(&frame_f);
        {
            let role = first.role.read();
            let Role::Owner(owner) = &*role else { panic!("the first opener owns the cache") };
            assert_eq!(answer(&owner.cache, OP_INSERT_MANY, &truncated).0, ST_ERR);
            assert!(!owner.cache.contains(&f.hash));
        }
        assert!(second.contains(&b.hash));
        assert_eq!(second.used_bytes(), first.used_bytes());
        assert_eq!(second.quota(), 10 << 20);
        assert_eq!(second.stats().hits, 1);
        assert_eq!(first.stats().hits, 3, "each process counts its own reads");
        assert_eq!(second.shared_stats().hits, 4, "the owner counts every process's reads");
        let (c, _) = chunk(3, 1000);
        assert!(second.get(&c).is_none());
        assert_eq!(second.stats().misses, 1);
        // The owner exits: the client takes the lock and keeps every entry.
        drop(first);
        assert!(second.get(&a).is_some());
        assert!(second.is_owner());
        // And a third opener now shares through the new owner.
        let third = ChunkCache::open(&config).unwrap();
        assert!(!third.is_owner());
        assert!(third.get(&b).is_some());
    }
}
