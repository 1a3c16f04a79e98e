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
//! - `owner`: the owning process's side, answering on the socket;
//! - `protocol`: the socket's requests and replies, both ends in one place (private: both ends
//!   are this code).

mod owner;
mod protocol;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::{Error, ErrorKind, Result};
use parking_lot::{Mutex, RwLock};

use crate::cache::{CacheStats, LocalCache, LocalCacheConfig};
use owner::{open_owner, Owner};
use protocol::{read_message, write_message, Reply, Request};

/// Name of the owner's socket inside the cache dir.
pub const SOCKET_NAME: &str = "owner.sock";

/// How long a new opener waits for the owner's socket to appear (the owner takes the lock a
/// moment before it listens).
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Longest a client waits for one answer of the owner.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a detached cache looks for an owner or a free lock again.
const REATTACH_INTERVAL: Duration = Duration::from_secs(2);

/// The local chunk cache, owned by this process or shared with the process that owns the
/// cache dir (see the module docs). Share it behind an `Arc`; every method takes `&self`.
pub struct ChunkCache {
    config: LocalCacheConfig,
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
    pub fn open(config: &LocalCacheConfig) -> Result<Self> {
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
            |c| match c.call(&Request::Usage)? {
                Reply::Usage { quota, used } => Ok((quota, used)),
                other => Err(unexpected(other)),
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
            |c| match c.call(&Request::Stats)? {
                Reply::Stats(stats) => Ok(stats),
                other => Err(unexpected(other)),
            },
            || self.stats(),
        )
    }

    /// Whether the cache holds an entry for `hash`, without verifying it.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.with(
            |c| c.contains(hash),
            |c| match c.call(&Request::Contains(*hash))? {
                Reply::Present(present) => Ok(present),
                other => Err(unexpected(other)),
            },
            || false,
        )
    }

    /// The verified contents of a chunk, or `None` when it is not cached. An entry that fails
    /// verification is removed and reported as `None`, so the caller fetches it again.
    pub fn get(&self, chunk: &ChunkRef) -> Option<Vec<u8>> {
        let found = self.with(
            |c| c.get(chunk),
            |c| {
                let Reply::Chunk(found) = c.call(&Request::Get(*chunk))? else {
                    return Err(std::io::Error::other("the cache's owner answered a chunk read with something else"));
                };
                match found {
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
            |c| c.call(&Request::Insert(*hash, frame)).and_then(done).map(|()| true),
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
                if c.call(&Request::InsertMany(frames.to_vec())).and_then(done).is_ok() {
                    return Ok(0);
                }
                // An owner from before InsertMany refuses it: one frame at a time then. A
                // failure here reconnects (or takes over) and sends them all again, which is
                // harmless.
                for (hash, frame) in frames {
                    c.call(&Request::Insert(*hash, frame)).and_then(done)?;
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
            |c| match c.call(&Request::GetManifest(hash_part.to_string()))? {
                Reply::Manifest(manifest) => Ok(manifest),
                other => Err(unexpected(other)),
            },
            || None,
        )
    }

    /// Remembers a path's manifest; failures are logged, like chunk writes.
    pub fn put_manifest(&self, hash_part: &str, manifest: &PathManifest) {
        self.with(
            |c| c.put_manifest(hash_part, manifest),
            |c| c.call(&Request::PutManifest(hash_part.to_string(), manifest.clone())).and_then(done),
            || (),
        )
    }

    /// Hash parts of every path whose manifest is cached.
    pub fn manifest_hashes(&self) -> Vec<String> {
        self.with(
            |c| c.manifest_hashes(),
            |c| match c.call(&Request::ManifestHashes)? {
                Reply::ManifestHashes(hashes) => Ok(hashes),
                other => Err(unexpected(other)),
            },
            Vec::new,
        )
    }

    /// Writes everything to disk; sled also does this on its own every half second.
    pub fn flush(&self) -> Result<()> {
        self.with(
            |c| c.flush(),
            |c| c.call(&Request::Flush).and_then(done).map(Ok),
            || Ok(()),
        )
    }
}

impl Client {
    /// One request and its answer; a broken connection or a reply that does not parse is an
    /// I/O error.
    fn call(&self, request: &Request) -> std::io::Result<Reply> {
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
        let (op, body) = request.encode();
        write_message(&mut stream, op, &body)?;
        let (status, reply) = read_message(&mut stream)?;
        self.idle.lock().push(stream);
        request.decode_reply(status, reply).map_err(|_| std::io::Error::other("the cache's owner sent a malformed reply"))
    }
}

/// A reply that does not answer the request sent: the owner is not this code.
fn unexpected(reply: Reply) -> std::io::Error {
    match reply {
        Reply::Failed(why) => std::io::Error::other(format!("cache owner: {why}")),
        other => std::io::Error::other(format!("the cache's owner answered {other:?}")),
    }
}

/// Success for requests answered with [`Reply::Done`].
fn done(reply: Reply) -> std::io::Result<()> {
    match reply {
        Reply::Done => Ok(()),
        other => Err(unexpected(other)),
    }
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
        let config = LocalCacheConfig::new(dir.path(), 10 << 20);
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
        let (op, mut truncated) = Request::InsertMany(vec![(f.hash, &frame_f)]).encode();
        truncated.pop();
        {
            let role = first.role.read();
            let Role::Owner(owner) = &*role else { panic!("the first opener owns the cache") };
            assert!(matches!(owner::answer_message(&owner.cache, op, &truncated), Reply::Failed(_)));
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
        // The owner exits: the client takes the lock and keeps every entry. sled lets go of
        // the lock a moment after the last handle is dropped: a client that finds it still
        // held serves without caching and tries again every REATTACH_INTERVAL.
        drop(first);
        let deadline = Instant::now() + 5 * REATTACH_INTERVAL;
        while second.get(&a).is_none() {
            assert!(Instant::now() < deadline, "the client did not take over the cache");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(second.is_owner());
        // And a third opener now shares through the new owner.
        let third = ChunkCache::open(&config).unwrap();
        assert!(!third.is_owner());
        assert!(third.get(&b).is_some());
    }
}
