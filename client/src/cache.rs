//! The local chunk cache: zstd frames within a byte quota, evicted least recently used first,
//! verified on every read, indexed in a sled database.
//!
//! Frames are files, `chunks/<first two hex digits>/<hash>`, written to a temporary name and
//! renamed, so a frame file is always whole. The sled tree `chunks` is the index, in two key
//! spaces changed together in one atomic batch:
//! - `m` + hash: the entry's access sequence number (8 bytes, big endian) and frame length;
//! - `l` + sequence + hash: empty; iterating this space visits entries oldest access first.
//!
//! Frames live outside sled because sled reclaims the space of removed large values only when it
//! cleans a segment, so under eviction its files grow far past any quota (measured: 17 MB of
//! files for a 4 MB quota). With one file per frame, eviction frees the bytes at once and the
//! quota is what the disk holds.
//!
//! A frame is written before its index entry and unindexed before it is deleted, so after a
//! `kill -9` the only possible leftovers are frame files without an entry; opening the cache
//! deletes them. An entry whose file is gone is a miss.
//!
//! Manifests of the paths seen so far live in a second tree, keyed by hash part. They are small
//! metadata and are not counted against the quota.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::chunk::{decompress_verified, ChunkHash};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;

/// Bytes counted for an entry on top of its frame: its keys and sled's per-entry overhead.
const ENTRY_OVERHEAD: u64 = 128;

/// An access is not recorded again while the entry is among the youngest quarter of the cache
/// (or the youngest this many): it spares a write for every read of a chunk that is hot anyway.
const BUMP_SLACK: u64 = 64;

/// Accesses recorded together in one database write.
const TOUCH_BATCH: usize = 64;

/// How to open a [`ChunkCache`].
#[derive(Debug, Clone)]
pub struct LocalCacheConfig {
    /// The directory of the sled database; created if missing.
    pub dir: PathBuf,
    /// Most bytes of chunk entries kept (frames plus a fixed per-entry overhead).
    pub quota: u64,
    /// Memory sled may use for its page cache.
    pub memory: u64,
}

impl LocalCacheConfig {
    /// A config with sled's page cache kept small, since the mount has its own hot-chunk cache.
    pub fn new(dir: impl Into<PathBuf>, quota: u64) -> Self {
        LocalCacheConfig { dir: dir.into(), quota, memory: 16 * 1024 * 1024 }
    }
}

/// Counters of what the cache did since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads of chunks not in the cache.
    pub misses: u64,
    /// Entries that failed verification and were dropped.
    pub corrupt: u64,
    /// Entries evicted to stay within the quota.
    pub evictions: u64,
    /// Writes that failed (a full disk, for instance); the chunk was served without caching.
    pub write_failures: u64,
}

/// The sled-backed chunk cache as its owning process holds it.
pub(crate) struct LocalCache {
    db: sled::Db,
    frames: PathBuf,
    chunks: sled::Tree,
    manifests: sled::Tree,
    quota: u64,
    used: AtomicU64,
    entries: AtomicU64,
    next_seq: AtomicU64,
    /// Serializes changes to the `l` and `m` spaces, so the byte count and the LRU order stay
    /// exact; reads of frames do not take it.
    write_lock: Mutex<()>,
    /// Accesses not yet written to the LRU order: recorded in batches, so a warm read costs no
    /// database write per chunk.
    pending_touches: Mutex<Vec<ChunkHash>>,
    write_failed: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    evictions: AtomicU64,
    write_failures: AtomicU64,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache").field("quota", &self.quota).field("used", &self.used_bytes()).finish()
    }
}

fn key(space: u8, hash: &ChunkHash) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = space;
    key[1..].copy_from_slice(&hash.0);
    key
}

fn lru_key(seq: u64, hash: &ChunkHash) -> [u8; 41] {
    let mut key = [0u8; 41];
    key[0] = b'l';
    key[1..9].copy_from_slice(&seq.to_be_bytes());
    key[9..].copy_from_slice(&hash.0);
    key
}

fn meta_value(seq: u64, frame_len: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&seq.to_be_bytes());
    value[8..].copy_from_slice(&frame_len.to_be_bytes());
    value
}

fn parse_meta(value: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let len = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((seq, len))
}

fn storage_error(err: sled::Error) -> Error {
    Error::internal(format!("chunk cache: {err}"))
}

impl LocalCache {
    /// Opens (or creates) the cache in `config.dir`, counting the bytes already there.
    ///
    /// Fails with [`ErrorKind::AlreadyExists`] when another process holds the database.
    pub fn open(config: &LocalCacheConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| Error::internal(format!("creating cache dir {}: {e}", config.dir.display())))?;
        let db = sled::Config::new()
            .path(&config.dir)
            .cache_capacity(config.memory)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|err| open_error(&config.dir, err))?;
        let chunks = db.open_tree("chunks").map_err(storage_error)?;
        let frames = config.dir.join("chunks");
        let manifests = db.open_tree("manifests").map_err(storage_error)?;
        let (mut used, mut entries) = (0u64, 0u64);
        for item in chunks.scan_prefix(b"m") {
            let (_, value) = item.map_err(storage_error)?;
            if let Some((_, len)) = parse_meta(&value) {
                used += len + ENTRY_OVERHEAD;
                entries += 1;
            }
        }
        let next_seq = match chunks.scan_prefix(b"l").next_back() {
            Some(item) => {
                let (key, _) = item.map_err(storage_error)?;
                key.get(1..9).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0) + 1
            }
            None => 0,
        };
        let cache = LocalCache {
            db,
            frames,
            chunks,
            manifests,
            quota: config.quota,
            used: AtomicU64::new(used),
            entries: AtomicU64::new(entries),
            next_seq: AtomicU64::new(next_seq),
            write_lock: Mutex::new(()),
            pending_touches: Mutex::default(),
            write_failed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
        };
        cache.remove_orphans()?;
        // A quota lowered since the last run takes effect at once.
        {
            let _guard = cache.write_lock.lock();
            cache.evict_until(0)?;
        }
        tracing::info!(dir = %config.dir.display(), used = cache.used_bytes(), quota = cache.quota, "chunk cache opened");
        Ok(cache)
    }

    /// The quota in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Bytes counted against the quota now.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// What the cache did since it was opened.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            write_failures: self.write_failures.load(Ordering::Relaxed),
        }
    }

    /// Whether the cache holds an entry for `hash`, without verifying it.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.chunks.contains_key(key(b'm', hash)).unwrap_or(false)
    }

    /// The verified contents of a chunk, or `None` when it is not cached. An entry that fails
    /// verification is removed and reported as `None`, so the caller fetches it again.
    pub fn get(&self, chunk: &ChunkRef) -> Option<Vec<u8>> {
        // Lock-free first: the common case is a hit or a plain miss.
        match self.read_verified(chunk) {
            Ok(Some(data)) => return Some(self.hit(chunk, data)),
            Ok(None) if !self.contains(&chunk.hash) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => {}
        }
        // A miss or a bad entry. Look again under the write lock before dropping anything: an
        // insert of this very chunk may have landed between the read and now (the mount's
        // readahead and a read race like that), and dropping its fresh entry would lose it.
        let _guard = self.write_lock.lock();
        match self.read_verified(chunk) {
            Ok(Some(data)) => {
                drop(_guard);
                Some(self.hit(chunk, data))
            }
            Ok(None) => {
                if self.contains(&chunk.hash) {
                    // Indexed but its frame is gone: drop the entry so it is fetched again.
                    let _ = self.remove_locked(&chunk.hash);
                }
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(err) => {
                tracing::warn!(chunk = %chunk.hash, "dropping a bad cache entry: {err}");
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = self.remove_locked(&chunk.hash) {
                    tracing::warn!(chunk = %chunk.hash, "removing a bad cache entry failed: {err}");
                }
                None
            }
        }
    }

    fn hit(&self, chunk: &ChunkRef, data: Vec<u8>) -> Vec<u8> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.touch(&chunk.hash);
        data
    }

    /// The verified contents of a chunk's frame file: `Ok(None)` when there is no file, an
    /// error when it cannot be read or fails verification.
    fn read_verified(&self, chunk: &ChunkRef) -> Result<Option<Vec<u8>>> {
        let frame = match std::fs::read(self.frame_path(&chunk.hash)) {
            Ok(frame) => frame,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(Error::unavailable(format!("reading chunk {}: {err}", chunk.hash))),
        };
        decompress_verified(&frame, &chunk.hash, chunk.size as usize).map(Some)
    }

    /// Stores a chunk's zstd frame, evicting the least recently used entries to make room.
    ///
    /// The frame is not checked here: reads check it. A write that fails (a full disk, for
    /// instance) is counted and logged, never returned: the chunk is simply not cached.
    pub fn insert(&self, hash: &ChunkHash, frame: &[u8]) {
        self.insert_many(&[(*hash, frame)]);
    }

    /// Stores several chunks' frames, as [`LocalCache::insert`] does, with one index write for
    /// all of them: a write to sled costs far more than writing a frame file, so a cold NAR
    /// stream, which caches thousands of chunks, indexes them in batches.
    pub fn insert_many(&self, frames: &[(ChunkHash, &[u8])]) {
        if let Err((hash, err)) = self.try_insert_many(frames) {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            // Log the first failure loudly and the rest quietly: on a full disk every insert fails.
            if !self.write_failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(chunk = %hash, "chunk cache write failed, serving without caching: {err}");
            } else {
                tracing::debug!(chunk = %hash, "chunk cache write failed: {err}");
            }
        }
    }

    fn try_insert_many(&self, frames: &[(ChunkHash, &[u8])]) -> std::result::Result<(), (ChunkHash, Error)> {
        // Eviction must see every access so far, or it could drop a chunk just read.
        self.apply_pending_touches();
        let _guard = self.write_lock.lock();
        let mut batch = sled::Batch::default();
        let mut batched = 0usize;
        let mut seen = std::collections::HashSet::new();
        let mut result = Ok(());
        for &(hash, frame) in frames {
            let cost = frame.len() as u64 + ENTRY_OVERHEAD;
            // A hash listed twice would be indexed twice before the batch lands.
            if cost > self.quota || !seen.insert(hash) {
                continue;
            }
            if let Err(err) = self.add_locked(&hash, frame, cost, &mut batch, &mut batched) {
                result = Err((hash, err));
                break;
            }
        }
        // The frames written so far are indexed even when a later one failed.
        if batched > 0 {
            let first = frames.first().map(|(h, _)| *h).unwrap_or(ChunkHash([0; 32]));
            self.chunks.apply_batch(batch).map_err(|e| (first, storage_error(e)))?;
        }
        result
    }

    /// Writes one frame and adds its index entry to `batch`; the caller holds `write_lock`.
    fn add_locked(&self, hash: &ChunkHash, frame: &[u8], cost: u64, batch: &mut sled::Batch, batched: &mut usize) -> Result<()> {
        // Replacing an entry (a repair after corruption, say) first drops the old one.
        self.remove_locked(hash)?;
        if self.used_bytes() + cost > self.quota && *batched > 0 {
            // Eviction walks the index: the entries batched so far must be in it, and counted.
            self.chunks.apply_batch(std::mem::take(batch)).map_err(storage_error)?;
            *batched = 0;
        }
        self.evict_until(cost)?;
        self.write_frame(hash, frame)?;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        batch.insert(&key(b'm', hash)[..], &meta_value(seq, frame.len() as u64)[..]);
        batch.insert(&lru_key(seq, hash)[..], &[][..]);
        *batched += 1;
        self.used.fetch_add(cost, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records an access, moving the entry to the young end of the LRU order; accesses are
    /// written in batches of [`TOUCH_BATCH`].
    fn touch(&self, hash: &ChunkHash) {
        let batch = {
            let mut pending = self.pending_touches.lock();
            pending.push(*hash);
            if pending.len() < TOUCH_BATCH {
                return;
            }
            std::mem::take(&mut *pending)
        };
        self.apply_touches(batch);
    }

    fn apply_pending_touches(&self) {
        let pending = std::mem::take(&mut *self.pending_touches.lock());
        if !pending.is_empty() {
            self.apply_touches(pending);
        }
    }

    /// Writes recorded accesses to the LRU order in one database batch.
    fn apply_touches(&self, mut hashes: Vec<ChunkHash>) {
        // One move per entry: a second would remove an order key the batch has not written.
        hashes.sort_unstable();
        hashes.dedup();
        let _guard = self.write_lock.lock();
        let slack = BUMP_SLACK.min(self.entries.load(Ordering::Relaxed) / 4);
        let mut batch = sled::Batch::default();
        for hash in &hashes {
            let Ok(Some(meta)) = self.chunks.get(key(b'm', hash)) else { continue };
            let Some((old_seq, len)) = parse_meta(&meta) else { continue };
            if old_seq + slack >= self.next_seq.load(Ordering::Relaxed) {
                continue;
            }
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            batch.remove(&lru_key(old_seq, hash)[..]);
            batch.insert(&lru_key(seq, hash)[..], &[][..]);
            batch.insert(&key(b'm', hash)[..], &meta_value(seq, len)[..]);
        }
        if let Err(err) = self.chunks.apply_batch(batch) {
            tracing::debug!(chunks = hashes.len(), "recording cache accesses failed: {err}");
        }
    }

    /// Removes one entry; the caller holds `write_lock`.
    fn remove_locked(&self, hash: &ChunkHash) -> Result<bool> {
        let Some(meta) = self.chunks.get(key(b'm', hash)).map_err(storage_error)? else {
            return Ok(false);
        };
        let Some((seq, len)) = parse_meta(&meta) else {
            return Err(Error::corrupt(format!("cache metadata of chunk {hash} is malformed")));
        };
        let mut batch = sled::Batch::default();
        batch.remove(&key(b'm', hash)[..]);
        batch.remove(&lru_key(seq, hash)[..]);
        self.chunks.apply_batch(batch).map_err(storage_error)?;
        match std::fs::remove_file(self.frame_path(hash)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(chunk = %hash, "deleting an evicted frame failed: {err}"),
        }
        self.used.fetch_sub((len + ENTRY_OVERHEAD).min(self.used_bytes()), Ordering::Relaxed);
        self.entries.fetch_sub(1.min(self.entries.load(Ordering::Relaxed)), Ordering::Relaxed);
        Ok(true)
    }

    fn frame_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.frames.join(&hex[..2]).join(hex)
    }

    fn write_frame(&self, hash: &ChunkHash, frame: &[u8]) -> Result<()> {
        let path = self.frame_path(hash);
        let io = |what: &str, err: std::io::Error| Error::unavailable(format!("{what} {}: {err}", path.display()));
        let parent = path.parent().unwrap_or(&self.frames);
        let tmp = parent.join(format!(".tmp-{}-{}", std::process::id(), self.next_seq.load(Ordering::Relaxed)));
        // The fan-out directory exists for all but the first few chunks: create it only when
        // the write says it is missing.
        let written = match std::fs::write(&tmp, frame) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(parent).map_err(|e| io("creating the directory of", e))?;
                std::fs::write(&tmp, frame)
            }
            other => other,
        };
        let written = written.and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", err));
        }
        Ok(())
    }

    /// Deletes frame files without an index entry and temporary files: what a crash between
    /// writing a frame and indexing it leaves behind.
    fn remove_orphans(&self) -> Result<()> {
        let Ok(dirs) = std::fs::read_dir(&self.frames) else { return Ok(()) };
        let mut removed = 0u64;
        for dir in dirs.flatten() {
            let Ok(files) = std::fs::read_dir(dir.path()) else { continue };
            for file in files.flatten() {
                let name = file.file_name();
                let indexed = name
                    .to_str()
                    .and_then(|n| n.parse::<ChunkHash>().ok())
                    .is_some_and(|hash| self.contains(&hash));
                if !indexed && std::fs::remove_file(file.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "deleted chunk files left without an index entry");
        }
        Ok(())
    }

    /// Evicts the oldest entries until `incoming` more bytes fit; the caller holds `write_lock`.
    fn evict_until(&self, incoming: u64) -> Result<()> {
        while self.used_bytes() + incoming > self.quota {
            let Some(item) = self.chunks.scan_prefix(b"l").next() else {
                // Nothing left to evict: the count drifted (it cannot, but never loop forever).
                self.used.store(0, Ordering::Relaxed);
                return Ok(());
            };
            let (lkey, _) = item.map_err(storage_error)?;
            let hash = lkey
                .get(9..41)
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .map(ChunkHash)
                .ok_or_else(|| Error::corrupt("malformed LRU key in the chunk cache"))?;
            if !self.remove_locked(&hash)? {
                // An LRU key without metadata; drop it so the loop moves on.
                self.chunks.remove(lkey).map_err(storage_error)?;
            }
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The manifest of a path seen before, by hash part.
    pub fn get_manifest(&self, hash_part: &str) -> Option<PathManifest> {
        let bytes = self.manifests.get(hash_part.as_bytes()).ok()??;
        match serde_json::from_slice::<PathManifest>(&bytes) {
            Ok(manifest) if manifest.manifest.validate().is_ok() => Some(manifest),
            _ => {
                tracing::warn!(store_path.hash = hash_part, "dropping a corrupted cached manifest");
                let _ = self.manifests.remove(hash_part.as_bytes());
                None
            }
        }
    }

    /// Remembers a path's manifest; failures are logged, like chunk writes.
    pub fn put_manifest(&self, hash_part: &str, manifest: &PathManifest) {
        let result = serde_json::to_vec(manifest)
            .map_err(|e| Error::internal(e.to_string()))
            .and_then(|bytes| self.manifests.insert(hash_part.as_bytes(), bytes).map_err(storage_error));
        if let Err(err) = result {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(store_path.hash = hash_part, "caching a manifest failed: {err}");
        }
    }

    /// Hash parts of every path whose manifest is cached.
    pub fn manifest_hashes(&self) -> Vec<String> {
        self.manifests
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| String::from_utf8(k.to_vec()).ok())
            .collect()
    }

    /// Writes everything to disk; sled also does this on its own every half second.
    pub fn flush(&self) -> Result<()> {
        self.apply_pending_touches();
        self.db.flush().map(|_| ()).map_err(storage_error)
    }
}

fn open_error(dir: &Path, err: sled::Error) -> Error {
    match &err {
        // sled reports a held lock as an I/O error whose message names it.
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock") => {
            Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "chunk cache {} is in use by another process (sled holds an exclusive lock); \
                     give each process its own --cache-dir",
                    dir.display()
                ),
            )
        }
        _ => Error::internal(format!("opening chunk cache {}: {err}", dir.display())),
    }
}

pub use crate::share::ChunkCache;

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::chunk::compress;
    use rand::RngCore;

    fn chunk(seed: u64, len: usize) -> (ChunkRef, Vec<u8>) {
        let mut data = vec![0u8; len];
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        rng.fill_bytes(&mut data);
        let hash = ChunkHash::of(&data);
        let frame = compress(&data, 1).unwrap();
        (ChunkRef { hash, size: len as u32 }, frame)
    }

    /// Opens a cache that this process has just dropped. sled's flusher thread lets go of the
    /// file lock a moment after the last handle is dropped, so a lock error is retried briefly
    /// (in production `share::open` does the same for a departing owner).
    fn reopen(config: &LocalCacheConfig) -> LocalCache {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match LocalCache::open(config) {
                Ok(cache) => return cache,
                Err(err) if err.kind() == ErrorKind::AlreadyExists && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(err) => panic!("reopening the cache: {err}"),
            }
        }
    }

    fn dir_size(path: &Path) -> u64 {
        let mut total = 0;
        for entry in std::fs::read_dir(path).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            total += if meta.is_dir() { dir_size(&entry.path()) } else { meta.len() };
        }
        total
    }

    #[test]
    fn roundtrip_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let config = LocalCacheConfig::new(dir.path().join("db"), 10 << 20);
        let (c, frame) = chunk(1, 100_000);
        {
            let cache = LocalCache::open(&config).unwrap();
            assert!(cache.get(&c).is_none());
            cache.insert(&c.hash, &frame);
            assert_eq!(cache.get(&c).unwrap().len(), 100_000);
            assert_eq!(cache.used_bytes(), frame.len() as u64 + ENTRY_OVERHEAD);
            cache.flush().unwrap();
        }
        let cache = reopen(&config);
        assert_eq!(cache.used_bytes(), frame.len() as u64 + ENTRY_OVERHEAD);
        assert!(cache.get(&c).is_some());
    }

    #[test]
    fn a_read_racing_an_insert_of_the_same_chunk_never_drops_it() {
        // The mount's readahead inserts a chunk while a read looks it up: the read may see no
        // frame file and then the fresh index entry, and must not take that for a broken entry.
        let dir = tempfile::tempdir().unwrap();
        let cache = std::sync::Arc::new(LocalCache::open(&LocalCacheConfig::new(dir.path(), 100 << 20)).unwrap());
        let chunks: Vec<(ChunkRef, Vec<u8>)> = (0..1000).map(|i| chunk(i, 20_000)).collect();
        let inserted = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                let (cache, chunks, inserted, done) = (&cache, &chunks, &inserted, &done);
                scope.spawn(move || {
                    // Look up the chunk being inserted right now, over and over.
                    while !done.load(Ordering::Relaxed) {
                        let next = inserted.load(Ordering::Relaxed) as usize;
                        if let Some((c, _)) = chunks.get(next) {
                            let _ = cache.get(c);
                        }
                    }
                });
            }
            for (c, frame) in &chunks {
                cache.insert(&c.hash, frame);
                inserted.fetch_add(1, Ordering::Relaxed);
            }
            done.store(true, Ordering::Relaxed);
        });
        let lost = chunks.iter().filter(|(c, _)| !cache.contains(&c.hash)).count();
        assert_eq!(lost, 0, "entries dropped by reads racing their inserts");
    }

    #[test]
    fn the_database_lock_is_exclusive() {
        // `ChunkCache::open` relies on this to pick the owner; see `crate::share`.
        let dir = tempfile::tempdir().unwrap();
        let config = LocalCacheConfig::new(dir.path(), 1 << 20);
        let _first = LocalCache::open(&config).unwrap();
        let err = LocalCache::open(&config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        assert!(err.to_string().contains("in use by another process"), "{err}");
    }

    #[test]
    fn corrupted_entries_are_detected_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(&LocalCacheConfig::new(dir.path(), 10 << 20)).unwrap();
        let (c, frame) = chunk(2, 50_000);
        let (_, other_frame) = chunk(3, 50_000);
        // A frame file that went missing behind the index's back is a miss, not an error.
        cache.insert(&c.hash, &frame);
        std::fs::remove_file(cache.frame_path(&c.hash)).unwrap();
        assert!(cache.get(&c).is_none());
        assert!(!cache.contains(&c.hash));
        // A frame of other content under this name, and a frame with flipped bits.
        cache.insert(&c.hash, &other_frame);
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 1);
        assert!(!cache.contains(&c.hash));
        assert_eq!(cache.used_bytes(), 0);
        let mut flipped = frame.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        cache.insert(&c.hash, &flipped);
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 2);
        cache.insert(&c.hash, &frame);
        assert_eq!(cache.get(&c).unwrap(), {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
            let mut d = vec![0u8; 50_000];
            rng.fill_bytes(&mut d);
            d
        });
    }

    #[test]
    fn quota_holds_under_a_larger_workload_and_evicts_lru() {
        let dir = tempfile::tempdir().unwrap();
        let quota = 4 << 20;
        let cache = LocalCache::open(&LocalCacheConfig::new(dir.path(), quota)).unwrap();
        let chunks: Vec<_> = (0..200).map(|i| chunk(100 + i, 64 * 1024)).collect();
        let (hot, hot_frame) = chunk(7, 64 * 1024);
        cache.insert(&hot.hash, &hot_frame);
        let mut max_used = 0;
        for (i, (c, frame)) in chunks.iter().enumerate() {
            cache.insert(&c.hash, frame);
            max_used = max_used.max(cache.used_bytes());
            if i % 8 == 0 {
                // Keep one chunk hot: LRU must keep it through the whole workload.
                assert!(cache.get(&hot).is_some(), "hot chunk evicted at step {i}");
            }
        }
        // 200 chunks of 64 KiB = 12.8 MiB went through a 4 MiB cache.
        assert!(max_used <= quota, "used {max_used} > quota {quota}");
        assert!(cache.stats().evictions > 100);
        assert!(cache.get(&chunks[0].0).is_none(), "the oldest chunk should be evicted");
        assert!(cache.get(&chunks[199].0).is_some(), "the newest chunk should be kept");
        let kept = chunks.iter().filter(|(c, _)| cache.contains(&c.hash)).count() as u64;
        let frame_len = chunks[0].1.len() as u64 + ENTRY_OVERHEAD;
        assert_eq!(kept + 1, cache.used_bytes() / frame_len);
        cache.flush().unwrap();
        drop(cache);
        // Reopened with a smaller quota, it shrinks at once.
        let cache = reopen(&LocalCacheConfig::new(dir.path(), quota / 2));
        assert!(cache.used_bytes() <= quota / 2);
        cache.flush().unwrap();
        // The frames on disk are within the quota.
        let on_disk = dir_size(&dir.path().join("chunks"));
        assert!(on_disk <= quota / 2, "frames use {on_disk} bytes on disk for a {}-byte quota", quota / 2);
        // An orphaned frame (a crash between file and index) is deleted on open.
        let (orphan, orphan_frame) = chunk(999, 1000);
        cache.write_frame(&orphan.hash, &orphan_frame).unwrap();
        let orphan_path = cache.frame_path(&orphan.hash);
        assert!(orphan_path.exists());
        drop(cache);
        let cache = reopen(&LocalCacheConfig::new(dir.path(), quota / 2));
        assert!(!orphan_path.exists());
        assert!(cache.get(&chunks[199].0).is_some());
    }

    /// Batched inserts keep the accounting of single ones: a batch larger than the quota
    /// evicts its own oldest chunks, a hash listed twice counts once, and after a reopen every
    /// entry counted is one whose frame is on disk.
    #[test]
    fn batched_inserts_keep_the_quota_and_the_count_exact() {
        let dir = tempfile::tempdir().unwrap();
        let quota = 1 << 20;
        let cache = LocalCache::open(&LocalCacheConfig::new(dir.path(), quota)).unwrap();
        let chunks: Vec<_> = (0..40).map(|i| chunk(500 + i, 64 * 1024)).collect();
        let mut batch: Vec<(ChunkHash, &[u8])> = chunks.iter().map(|(c, f)| (c.hash, f.as_slice())).collect();
        batch.push(batch[39]);
        cache.insert_many(&batch);
        let frame_len = chunks[0].1.len() as u64 + ENTRY_OVERHEAD;
        assert!(cache.used_bytes() <= quota, "used {} > quota {quota}", cache.used_bytes());
        let kept: Vec<usize> = (0..40).filter(|&i| cache.contains(&chunks[i].0.hash)).collect();
        assert_eq!(kept.len() as u64, cache.used_bytes() / frame_len);
        assert!(kept.contains(&39) && !kept.contains(&0), "kept {kept:?}");
        for &i in &kept {
            assert!(cache.get(&chunks[i].0).is_some(), "chunk {i} is indexed but does not read back");
        }
        cache.flush().unwrap();
        let used = cache.used_bytes();
        drop(cache);
        let cache = reopen(&LocalCacheConfig::new(dir.path(), quota));
        assert_eq!(cache.used_bytes(), used);
        assert_eq!(dir_size(&dir.path().join("chunks")), kept.len() as u64 * chunks[0].1.len() as u64);
    }
}
