//! The local chunk cache: zstd frames within a byte quota, evicted least recently used first,
//! verified on every read, indexed in a sled database.
//!
//! Frames are appended to pack files, `packs/<id>.pack` (16 hex digits), about a sixteenth of
//! the quota each, up to 64 MiB. The sled tree `chunks` is the index, in two key spaces changed
//! together in one atomic batch:
//! - `m` + hash: the entry's access sequence number, pack, offset and frame length (8 bytes
//!   each, big endian);
//! - `l` + sequence + hash: empty; iterating this space visits entries oldest access first.
//!
//! Frames live outside sled because sled reclaims the space of removed large values only when it
//! cleans a segment, so under eviction its files grow far past any quota (measured: 17 MB of
//! files for a 4 MB quota). They share pack files rather than having a file each because
//! creating, renaming and deleting a file per chunk was most of the cost of caching a cold
//! stream (`cargo bench --bench chunk_cache`: 53 MiB/s with a file per frame).
//!
//! The quota holds what the disk holds: pack bytes, evicted frames included, plus a fixed
//! overhead per entry. Eviction unindexes the least recently used entries; a pack whose last
//! entry goes is deleted at once. LRU order and write order mostly agree, so old packs empty
//! out whole; the frames a pack still holds when the dead bytes push the disk over the quota
//! (chunks that stayed hot) are copied forward into the pack being written, and the old pack
//! is deleted ("compaction"). Eviction keeps the live entries a pack's size below the quota, so
//! that there is always dead space to reclaim. While a compaction copies frames, the disk holds
//! at most those frames (one pack's worth) over the quota.
//!
//! Crash safety (`kill -9`) comes from the order of writes, as before packs: a frame is appended
//! before its index entry, a compaction's index changes reach the disk (a sled flush) before the
//! old pack is deleted, and packs are never overwritten or their ids reused. A crash can leave
//! frames without an entry (dead bytes, reclaimed by compaction) and packs without entries
//! (deleted on open); an entry whose pack or bytes are gone is a miss, and an entry whose bytes
//! are wrong fails verification and is dropped.
//!
//! Manifests of the paths seen so far live in a second tree, keyed by hash part. They are small
//! metadata and are not counted against the quota.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::chunk::{decompress_verified, max_frame_len, ChunkHash, MAX_CHUNK_LEN};
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

/// Bounds of a pack's size, which is otherwise a sixteenth of the quota: small enough that a
/// compaction copies little, large enough that a cold stream opens few files.
const PACK_SIZE_MIN: u64 = 64 * 1024;
const PACK_SIZE_MAX: u64 = 64 * 1024 * 1024;

/// Open pack files kept for reads; packs beyond this are reopened when read.
const OPEN_PACKS: usize = 256;

/// How to open a [`ChunkCache`].
#[derive(Debug, Clone)]
pub struct LocalCacheConfig {
    /// The directory of the sled database; created if missing.
    pub dir: PathBuf,
    /// Most bytes the cache keeps on disk: pack files plus a fixed per-entry overhead.
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

/// Where an indexed frame is, and when it was last used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    pack: u64,
    offset: u64,
    len: u64,
}

impl Entry {
    fn to_bytes(self) -> [u8; 32] {
        let mut value = [0u8; 32];
        for (i, field) in [self.seq, self.pack, self.offset, self.len].into_iter().enumerate() {
            value[i * 8..(i + 1) * 8].copy_from_slice(&field.to_be_bytes());
        }
        value
    }

    /// `None` for a value of another length, such as the 16-byte entries of the file-per-frame
    /// layout before packs.
    fn parse(value: &[u8]) -> Option<Entry> {
        if value.len() != 32 {
            return None;
        }
        let field = |i: usize| value.get(i * 8..(i + 1) * 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        Some(Entry { seq: field(0)?, pack: field(1)?, offset: field(2)?, len: field(3)? })
    }
}

/// A pack's bytes on disk and how many of them indexed entries still use.
#[derive(Debug, Clone, Copy, Default)]
struct PackUsage {
    size: u64,
    live: u64,
}

impl PackUsage {
    fn dead(&self) -> u64 {
        self.size.saturating_sub(self.live)
    }
}

/// The pack being appended to.
#[derive(Debug)]
struct ActivePack {
    id: u64,
    file: File,
    size: u64,
}

/// The writer's view of the packs, behind the cache's write lock.
#[derive(Debug, Default)]
struct Packs {
    usage: HashMap<u64, PackUsage>,
    active: Option<ActivePack>,
    next_id: u64,
}

/// The sled-backed chunk cache as its owning process holds it.
pub(crate) struct LocalCache {
    db: sled::Db,
    packs_dir: PathBuf,
    chunks: sled::Tree,
    manifests: sled::Tree,
    quota: u64,
    pack_size: u64,
    /// Bytes of indexed entries: their frames plus the per-entry overhead.
    live: AtomicU64,
    /// Bytes of pack files on disk.
    packed: AtomicU64,
    entries: AtomicU64,
    next_seq: AtomicU64,
    /// Frame bytes compaction copied forward since the cache was opened.
    copied: AtomicU64,
    /// Serializes changes to the index and the packs, so the byte counts and the LRU order stay
    /// exact; reads of frames do not take it.
    writer: Mutex<Packs>,
    /// Pack files open for reading. Opening one and deleting one both hold this lock, so a
    /// deleted pack is never put back here.
    readers: Mutex<lru::LruCache<u64, Arc<File>>>,
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
        f.debug_struct("LocalCache").field("quota", &self.quota).field("used", &self.live_bytes()).finish()
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

fn hash_of_key(key: &[u8], at: usize) -> Option<ChunkHash> {
    key.get(at..at + 32).and_then(|h| <[u8; 32]>::try_from(h).ok()).map(ChunkHash)
}

fn storage_error(err: sled::Error) -> Error {
    Error::internal(format!("chunk cache: {err}"))
}

fn pack_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

fn pack_id(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
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
        let manifests = db.open_tree("manifests").map_err(storage_error)?;
        let packs_dir = config.dir.join("packs");
        std::fs::create_dir_all(&packs_dir)
            .map_err(|e| Error::internal(format!("creating {}: {e}", packs_dir.display())))?;
        drop_file_per_frame_layout(&config.dir, &chunks)?;

        let (mut live, mut entries, mut last_pack) = (0u64, 0u64, None::<u64>);
        let mut usage: HashMap<u64, PackUsage> = HashMap::new();
        for item in chunks.scan_prefix(b"m") {
            let (_, value) = item.map_err(storage_error)?;
            if let Some(entry) = Entry::parse(&value) {
                live += entry.len + ENTRY_OVERHEAD;
                entries += 1;
                usage.entry(entry.pack).or_default().live += entry.len;
                last_pack = last_pack.max(Some(entry.pack));
            }
        }
        let mut packed = 0u64;
        let mut unused = Vec::new();
        for file in std::fs::read_dir(&packs_dir).map_err(|e| Error::internal(format!("listing {}: {e}", packs_dir.display())))? {
            let file = file.map_err(|e| Error::internal(format!("listing {}: {e}", packs_dir.display())))?;
            let Some(id) = file.file_name().to_str().and_then(pack_id) else { continue };
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            last_pack = last_pack.max(Some(id));
            match usage.get_mut(&id) {
                Some(pack) => {
                    pack.size = size;
                    packed += size;
                }
                None => unused.push(file.path()),
            }
        }
        // Packs no entry uses: what a crash between emptying a pack and deleting it leaves.
        for path in &unused {
            if let Err(err) = std::fs::remove_file(path) {
                tracing::warn!(pack = %path.display(), "deleting an unused pack failed: {err}");
            }
        }
        if !unused.is_empty() {
            tracing::info!(deleted = unused.len(), "deleted packs without an index entry");
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
            packs_dir,
            chunks,
            manifests,
            quota: config.quota,
            pack_size: (config.quota / 16).clamp(PACK_SIZE_MIN, PACK_SIZE_MAX).min(config.quota / 4).max(1),
            live: AtomicU64::new(live),
            packed: AtomicU64::new(packed),
            entries: AtomicU64::new(entries),
            next_seq: AtomicU64::new(next_seq),
            copied: AtomicU64::new(0),
            // A new pack after a restart: the last one may end in bytes a crash left unindexed.
            writer: Mutex::new(Packs { usage, active: None, next_id: last_pack.map_or(0, |id| id + 1) }),
            readers: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(OPEN_PACKS).unwrap_or(std::num::NonZeroUsize::MIN))),
            pending_touches: Mutex::default(),
            write_failed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
        };
        // A quota lowered since the last run takes effect at once.
        {
            let mut packs = cache.writer.lock();
            cache.evict_until(&mut packs, 0)?;
        }
        tracing::info!(
            dir = %config.dir.display(),
            live = cache.live_bytes(),
            on_disk = cache.used_bytes(),
            quota = cache.quota,
            "chunk cache opened"
        );
        Ok(cache)
    }

    /// The quota in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Bytes of the entries cached now: their frames plus a fixed overhead each.
    fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Bytes the cache takes on disk, which the quota bounds: its pack files (frames evicted
    /// but not yet reclaimed included) plus a fixed overhead per entry. Up to about one pack
    /// more than the entries themselves ([`LocalCacheConfig::quota`] / 16, at most 64 MiB).
    pub fn used_bytes(&self) -> u64 {
        self.packed.load(Ordering::Relaxed) + self.entries.load(Ordering::Relaxed) * ENTRY_OVERHEAD
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

    fn entry(&self, hash: &ChunkHash) -> Option<Entry> {
        self.chunks.get(key(b'm', hash)).ok().flatten().and_then(|value| Entry::parse(&value))
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
        // readahead and a read race like that), or a compaction may have moved it, and
        // dropping its entry would lose it.
        let mut packs = self.writer.lock();
        match self.read_verified(chunk) {
            Ok(Some(data)) => {
                drop(packs);
                Some(self.hit(chunk, data))
            }
            Ok(None) => {
                if let Some(entry) = self.entry(&chunk.hash) {
                    // Indexed but its pack is gone (deleted behind the cache's back): drop the
                    // entry so it is fetched again, and stop appending to that pack.
                    if packs.active.as_ref().is_some_and(|active| active.id == entry.pack) {
                        packs.active = None;
                    }
                    let _ = self.remove_locked(&mut packs, &chunk.hash);
                }
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(err) => {
                tracing::warn!(chunk = %chunk.hash, "dropping a bad cache entry: {err}");
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = self.remove_locked(&mut packs, &chunk.hash) {
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

    /// The verified contents of a chunk's frame: `Ok(None)` when it has no entry or its pack is
    /// gone, an error when the frame cannot be read or fails verification.
    fn read_verified(&self, chunk: &ChunkRef) -> Result<Option<Vec<u8>>> {
        let Some(value) = self.chunks.get(key(b'm', &chunk.hash)).map_err(storage_error)? else {
            return Ok(None);
        };
        let entry = Entry::parse(&value).ok_or_else(|| Error::corrupt(format!("cache entry of chunk {} is malformed", chunk.hash)))?;
        let Some(frame) = self.read_frame(&chunk.hash, &entry, max_frame_len(u64::from(chunk.size)))? else { return Ok(None) };
        decompress_verified(&frame, &chunk.hash, chunk.size as usize).map(Some)
    }

    /// The frame `entry` names, unverified, or `None` when its pack is gone. The index is not
    /// trusted with the size of an allocation: a frame longer than `max_len` is an error.
    fn read_frame(&self, hash: &ChunkHash, entry: &Entry, max_len: u64) -> Result<Option<Vec<u8>>> {
        if entry.len > max_len {
            return Err(Error::corrupt(format!("cache entry of chunk {hash} claims a {}-byte frame", entry.len)));
        }
        let Some(pack) = self.pack_reader(entry.pack)? else { return Ok(None) };
        let mut frame = vec![0u8; entry.len as usize];
        pack.read_exact_at(&mut frame, entry.offset).map_err(|err| match err.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::corrupt(format!("the frame of chunk {hash} is cut short")),
            _ => Error::unavailable(format!("reading chunk {hash}: {err}")),
        })?;
        Ok(Some(frame))
    }

    /// A pack open for reading, or `None` when the pack is gone.
    fn pack_reader(&self, id: u64) -> Result<Option<Arc<File>>> {
        let mut readers = self.readers.lock();
        if let Some(file) = readers.get(&id) {
            return Ok(Some(file.clone()));
        }
        let path = self.packs_dir.join(pack_name(id));
        match File::open(&path) {
            Ok(file) => {
                let file = Arc::new(file);
                readers.put(id, file.clone());
                Ok(Some(file))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(Error::unavailable(format!("opening {}: {err}", path.display()))),
        }
    }

    /// Stores a chunk's zstd frame, evicting the least recently used entries to make room.
    ///
    /// The frame is not checked here: reads check it. A write that fails (a full disk, for
    /// instance) is counted and logged, never returned: the chunk is simply not cached.
    pub fn insert(&self, hash: &ChunkHash, frame: &[u8]) {
        self.insert_many(&[(*hash, frame)]);
    }

    /// Stores several chunks' frames, as [`LocalCache::insert`] does, with one index write for
    /// all of them: a write to sled costs far more than appending a frame, so a cold NAR
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
        let mut packs = self.writer.lock();
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
            if let Err(err) = self.add_locked(&mut packs, &hash, frame, cost, &mut batch, &mut batched) {
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

    /// Appends one frame and adds its index entry to `batch`; the caller holds the write lock.
    fn add_locked(&self, packs: &mut Packs, hash: &ChunkHash, frame: &[u8], cost: u64, batch: &mut sled::Batch, batched: &mut usize) -> Result<()> {
        // Replacing an entry (a repair after corruption, say) first drops the old one.
        self.remove_locked(packs, hash)?;
        if self.used_bytes() + cost > self.quota && *batched > 0 {
            // Eviction and compaction walk the index: the entries batched so far must be in it,
            // and counted.
            self.chunks.apply_batch(std::mem::take(batch)).map_err(storage_error)?;
            *batched = 0;
        }
        self.evict_until(packs, cost)?;
        let (pack, offset) = self.append_locked(packs, frame)?;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { seq, pack, offset, len: frame.len() as u64 };
        batch.insert(&key(b'm', hash)[..], &entry.to_bytes()[..]);
        batch.insert(&lru_key(seq, hash)[..], &[][..]);
        *batched += 1;
        packs.usage.entry(pack).or_default().live += entry.len;
        self.live.fetch_add(cost, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Appends a frame to the pack being written, starting a new one when it is full, and
    /// returns where the frame is; the caller holds the write lock and indexes the frame.
    fn append_locked(&self, packs: &mut Packs, frame: &[u8]) -> Result<(u64, u64)> {
        let len = frame.len() as u64;
        if packs.active.as_ref().is_some_and(|active| active.size > 0 && active.size + len > self.pack_size) {
            self.seal_locked(packs);
        }
        let active = match &mut packs.active {
            Some(active) => active,
            none => {
                let id = packs.next_id;
                let path = self.packs_dir.join(pack_name(id));
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| Error::unavailable(format!("creating {}: {e}", path.display())))?;
                packs.next_id += 1;
                packs.usage.insert(id, PackUsage::default());
                none.insert(ActivePack { id, file, size: 0 })
            }
        };
        let offset = active.size;
        if let Err(err) = active.file.write_all_at(frame, offset) {
            // Drop what part of the frame made it, so the pack's size is what is counted.
            let _ = active.file.set_len(offset);
            return Err(Error::unavailable(format!("appending to pack {}: {err}", pack_name(active.id))));
        }
        active.size += len;
        let id = active.id;
        packs.usage.entry(id).or_default().size += len;
        self.packed.fetch_add(len, Ordering::Relaxed);
        Ok((id, offset))
    }

    /// Stops appending to the current pack, deleting it if no entry uses it any more.
    fn seal_locked(&self, packs: &mut Packs) {
        if let Some(active) = packs.active.take() {
            if packs.usage.get(&active.id).is_some_and(|pack| pack.live == 0) {
                self.delete_pack_locked(packs, active.id);
            }
        }
    }

    /// Deletes a pack file that no entry uses; the caller holds the write lock.
    fn delete_pack_locked(&self, packs: &mut Packs, id: u64) {
        let size = packs.usage.remove(&id).map_or(0, |pack| pack.size);
        let path = self.packs_dir.join(pack_name(id));
        let mut readers = self.readers.lock();
        readers.pop(&id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(pack = %path.display(), "deleting an unused pack failed: {err}"),
        }
        drop(readers);
        self.packed.fetch_sub(size.min(self.packed.load(Ordering::Relaxed)), Ordering::Relaxed);
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
        let _packs = self.writer.lock();
        let slack = BUMP_SLACK.min(self.entries.load(Ordering::Relaxed) / 4);
        let mut batch = sled::Batch::default();
        for hash in &hashes {
            let Ok(Some(value)) = self.chunks.get(key(b'm', hash)) else { continue };
            let Some(entry) = Entry::parse(&value) else { continue };
            if entry.seq + slack >= self.next_seq.load(Ordering::Relaxed) {
                continue;
            }
            let moved = Entry { seq: self.next_seq.fetch_add(1, Ordering::Relaxed), ..entry };
            batch.remove(&lru_key(entry.seq, hash)[..]);
            batch.insert(&lru_key(moved.seq, hash)[..], &[][..]);
            batch.insert(&key(b'm', hash)[..], &moved.to_bytes()[..]);
        }
        if let Err(err) = self.chunks.apply_batch(batch) {
            tracing::debug!(chunks = hashes.len(), "recording cache accesses failed: {err}");
        }
    }

    /// Removes one entry, and its pack when no other entry uses it; the caller holds the write
    /// lock.
    fn remove_locked(&self, packs: &mut Packs, hash: &ChunkHash) -> Result<bool> {
        let Some(value) = self.chunks.get(key(b'm', hash)).map_err(storage_error)? else {
            return Ok(false);
        };
        let mut batch = sled::Batch::default();
        batch.remove(&key(b'm', hash)[..]);
        let Some(entry) = Entry::parse(&value) else {
            // Nothing is counted for a malformed entry: drop it alone.
            self.chunks.apply_batch(batch).map_err(storage_error)?;
            return Ok(true);
        };
        batch.remove(&lru_key(entry.seq, hash)[..]);
        self.chunks.apply_batch(batch).map_err(storage_error)?;
        let emptied = packs.usage.get_mut(&entry.pack).is_some_and(|pack| {
            pack.live = pack.live.saturating_sub(entry.len);
            pack.live == 0
        });
        if emptied && packs.active.as_ref().is_none_or(|active| active.id != entry.pack) {
            self.delete_pack_locked(packs, entry.pack);
        }
        self.uncount(&entry);
        Ok(true)
    }

    /// Takes an unindexed entry out of the live byte and entry counts.
    fn uncount(&self, entry: &Entry) {
        self.live.fetch_sub((entry.len + ENTRY_OVERHEAD).min(self.live_bytes()), Ordering::Relaxed);
        self.entries.fetch_sub(1.min(self.entries.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    /// Makes room for `incoming` more bytes within the quota; the caller holds the write lock.
    ///
    /// Evicts the oldest entries until the live ones leave a pack's size free, then reclaims
    /// the dead bytes of packs by compaction.
    fn evict_until(&self, packs: &mut Packs, incoming: u64) -> Result<()> {
        while self.used_bytes() + incoming > self.quota {
            let live_fits = self.live_bytes() + incoming + self.pack_size <= self.quota;
            // While the oldest entries lie in the pack with the most dead bytes, evicting them
            // empties that pack and frees it without copying frames that would be evicted next.
            let evict = !live_fits || self.oldest_entry_pack() == Self::most_dead_pack(packs);
            if evict && self.entries.load(Ordering::Relaxed) > 0 {
                self.evict_oldest(packs)?;
            } else if self.compact_locked(packs)? == 0 {
                if self.entries.load(Ordering::Relaxed) == 0 {
                    return Ok(());
                }
                self.evict_oldest(packs)?;
            }
        }
        Ok(())
    }

    /// The pack of the least recently used entry.
    fn oldest_entry_pack(&self) -> Option<u64> {
        let (lkey, _) = self.chunks.scan_prefix(b"l").next()?.ok()?;
        self.entry(&hash_of_key(&lkey, 9)?).map(|entry| entry.pack)
    }

    /// The pack with the most dead bytes; of equals, the newest, whose live entries are the
    /// furthest from eviction (copying the oldest would copy what eviction takes next).
    fn most_dead_pack(packs: &Packs) -> Option<u64> {
        packs.usage.iter().filter(|(_, pack)| pack.dead() > 0).max_by_key(|(&id, pack)| (pack.dead(), id)).map(|(&id, _)| id)
    }

    /// Evicts the least recently used entry; the caller holds the write lock.
    fn evict_oldest(&self, packs: &mut Packs) -> Result<()> {
        let Some(item) = self.chunks.scan_prefix(b"l").next() else {
            // Nothing left to evict: the count drifted (it cannot, but never loop forever).
            self.live.store(0, Ordering::Relaxed);
            self.entries.store(0, Ordering::Relaxed);
            return Ok(());
        };
        let (lkey, _) = item.map_err(storage_error)?;
        let hash = hash_of_key(&lkey, 9).ok_or_else(|| Error::corrupt("malformed LRU key in the chunk cache"))?;
        if !self.remove_locked(packs, &hash)? {
            // An LRU key without metadata; drop it so the loop moves on.
            self.chunks.remove(lkey).map_err(storage_error)?;
        }
        self.evictions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the live frames of the packs with the most dead bytes into the pack being
    /// written, then deletes those packs; returns the bytes freed. The caller holds the write
    /// lock.
    ///
    /// One pass takes every pack at least half dead (and at least the one with the most dead
    /// bytes), since finding a pack's entries walks the whole index.
    fn compact_locked(&self, packs: &mut Packs) -> Result<u64> {
        let packed_before = self.packed.load(Ordering::Relaxed);
        let Some(worst) = Self::most_dead_pack(packs) else { return Ok(0) };
        // The pack being written is compacted like any other: seal it first.
        if packs.active.as_ref().is_some_and(|active| active.id == worst) {
            self.seal_locked(packs);
        }
        let victims: Vec<u64> = packs
            .usage
            .iter()
            .filter(|(&id, pack)| id == worst || (pack.size > 0 && pack.dead() * 2 >= pack.size))
            .filter(|(&id, _)| packs.active.as_ref().is_none_or(|active| active.id != id))
            .map(|(&id, _)| id)
            .collect();
        let mut moving = Vec::new();
        for item in self.chunks.scan_prefix(b"m") {
            let (mkey, value) = item.map_err(storage_error)?;
            if let (Some(hash), Some(entry)) = (hash_of_key(&mkey, 1), Entry::parse(&value)) {
                if victims.contains(&entry.pack) {
                    moving.push((hash, entry));
                }
            }
        }
        moving.sort_by_key(|(_, entry)| (entry.pack, entry.offset));
        let mut batch = sled::Batch::default();
        let mut failure = None;
        for (hash, entry) in &moving {
            let moved = match self.read_frame(hash, entry, max_frame_len(MAX_CHUNK_LEN as u64)) {
                Ok(Some(frame)) => match self.append_locked(packs, &frame) {
                    Ok((pack, offset)) => Some(Entry { pack, offset, ..*entry }),
                    Err(err) => {
                        failure = Some(err);
                        break;
                    }
                },
                // Unreadable where it is, so unreadable anywhere: the entry goes.
                Ok(None) | Err(_) => None,
            };
            if let Some(old) = packs.usage.get_mut(&entry.pack) {
                old.live = old.live.saturating_sub(entry.len);
            }
            match moved {
                Some(moved) => {
                    batch.insert(&key(b'm', hash)[..], &moved.to_bytes()[..]);
                    packs.usage.entry(moved.pack).or_default().live += moved.len;
                }
                None => {
                    batch.remove(&key(b'm', hash)[..]);
                    batch.remove(&lru_key(entry.seq, hash)[..]);
                    self.uncount(entry);
                }
            }
        }
        self.chunks.apply_batch(batch).map_err(storage_error)?;
        // The index must point at the copies on disk before the originals go.
        self.db.flush().map_err(storage_error)?;
        for id in victims {
            if packs.usage.get(&id).is_some_and(|pack| pack.live == 0) {
                self.delete_pack_locked(packs, id);
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        let freed = packed_before.saturating_sub(self.packed.load(Ordering::Relaxed));
        let copied: u64 = moving.iter().map(|(_, entry)| entry.len).sum();
        self.copied.fetch_add(copied, Ordering::Relaxed);
        tracing::debug!(moved = moving.len(), copied, freed, "compacted chunk cache packs");
        Ok(freed)
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

/// Drops the entries of the layout before packs (a file per frame under `chunks/`), which a
/// runner's persistent cache directory may still hold: those chunks are fetched again.
fn drop_file_per_frame_layout(dir: &Path, chunks: &sled::Tree) -> Result<()> {
    let frames = dir.join("chunks");
    if !frames.exists() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let mut dropped = 0u64;
    for item in chunks.scan_prefix(b"m") {
        let (mkey, value) = item.map_err(storage_error)?;
        if Entry::parse(&value).is_some() {
            continue;
        }
        batch.remove(mkey.clone());
        if let (Some(hash), Some(seq)) = (hash_of_key(&mkey, 1), value.get(..8).and_then(|s| s.try_into().ok())) {
            batch.remove(&lru_key(u64::from_be_bytes(seq), &hash)[..]);
        }
        dropped += 1;
    }
    chunks.apply_batch(batch).map_err(storage_error)?;
    std::fs::remove_dir_all(&frames).map_err(|e| Error::internal(format!("deleting {}: {e}", frames.display())))?;
    tracing::info!(dropped, "dropped the chunks of the file-per-frame cache layout");
    Ok(())
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
            assert_eq!(cache.live_bytes(), frame.len() as u64 + ENTRY_OVERHEAD);
            cache.flush().unwrap();
        }
        let cache = reopen(&config);
        assert_eq!(cache.live_bytes(), frame.len() as u64 + ENTRY_OVERHEAD);
        assert!(cache.get(&c).is_some());
    }

    #[test]
    fn a_read_racing_an_insert_of_the_same_chunk_never_drops_it() {
        // The mount's readahead inserts a chunk while a read looks it up: the read may see no
        // entry and then the fresh one, and must not take that for a broken entry.
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
        // A pack that went missing behind the index's back is a miss, not an error, and the
        // cache stops appending to it.
        cache.insert(&c.hash, &frame);
        std::fs::remove_file(pack_of(&cache, &c.hash)).unwrap();
        assert!(cache.get(&c).is_none());
        assert!(!cache.contains(&c.hash));
        assert_eq!(cache.stats().corrupt, 0);
        // A frame of other content under this name, and a frame with flipped bits.
        cache.insert(&c.hash, &other_frame);
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 1);
        assert!(!cache.contains(&c.hash));
        assert_eq!(cache.live_bytes(), 0);
        let mut flipped = frame.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        cache.insert(&c.hash, &flipped);
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 2);
        cache.insert(&c.hash, &frame);
        let expected = {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
            let mut d = vec![0u8; 50_000];
            rng.fill_bytes(&mut d);
            d
        };
        assert_eq!(cache.get(&c).unwrap(), expected);
        // Bytes flipped inside the pack, and a pack cut short, are caught by the read.
        let entry = cache.entry(&c.hash).unwrap();
        let pack = pack_of(&cache, &c.hash);
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[(entry.offset + entry.len / 2) as usize] ^= 0x55;
        std::fs::write(&pack, &bytes).unwrap();
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 3);
        cache.insert(&c.hash, &frame);
        let entry = cache.entry(&c.hash).unwrap();
        std::fs::OpenOptions::new().write(true).open(pack_of(&cache, &c.hash)).unwrap().set_len(entry.offset + entry.len - 1).unwrap();
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 4);
        // An entry claiming a frame far larger than its chunk is refused before any allocation.
        let huge = Entry { len: 1 << 40, ..entry };
        cache.insert(&c.hash, &frame);
        cache.chunks.insert(key(b'm', &c.hash), &huge.to_bytes()[..]).unwrap();
        assert!(cache.get(&c).is_none());
        assert_eq!(cache.stats().corrupt, 5);
        cache.insert(&c.hash, &frame);
        assert_eq!(cache.get(&c).unwrap(), expected);
    }

    #[test]
    fn quota_holds_under_a_larger_workload_and_evicts_lru() {
        let quota = 4 << 20;
        let (dir, cache) = fresh(quota);
        let chunks: Vec<_> = (0..200).map(|i| chunk(100 + i, 64 * 1024)).collect();
        let (hot, hot_frame) = chunk(7, 64 * 1024);
        cache.insert(&hot.hash, &hot_frame);
        let mut max_used = 0;
        for (i, (c, frame)) in chunks.iter().enumerate() {
            cache.insert(&c.hash, frame);
            max_used = max_used.max(cache.used_bytes());
            assert_eq!(dir_size(&dir.path().join("packs")) + cache.entries.load(Ordering::Relaxed) * ENTRY_OVERHEAD, cache.used_bytes());
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
        assert_eq!(kept + 1, cache.live_bytes() / frame_len);
        cache.flush().unwrap();
        drop(cache);
        // Reopened with a smaller quota, it shrinks at once.
        let cache = reopen(&LocalCacheConfig::new(dir.path(), quota / 2));
        assert!(cache.live_bytes() <= quota / 2);
        cache.flush().unwrap();
        // The packs on disk are within the quota.
        let on_disk = dir_size(&dir.path().join("packs"));
        assert!(on_disk <= quota / 2, "packs use {on_disk} bytes on disk for a {}-byte quota", quota / 2);
        // A pack without entries (a crash between emptying it and deleting it) is deleted on open.
        let orphan_path = dir.path().join("packs").join(pack_name(cache.writer.lock().next_id + 5));
        std::fs::write(&orphan_path, b"frames nobody indexed").unwrap();
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
        let quota = 1 << 20;
        let (dir, cache) = fresh(quota);
        let chunks: Vec<_> = (0..40).map(|i| chunk(500 + i, 64 * 1024)).collect();
        let mut batch: Vec<(ChunkHash, &[u8])> = chunks.iter().map(|(c, f)| (c.hash, f.as_slice())).collect();
        batch.push(batch[39]);
        cache.insert_many(&batch);
        let frame_len = chunks[0].1.len() as u64 + ENTRY_OVERHEAD;
        assert!(cache.live_bytes() <= quota, "used {} > quota {quota}", cache.live_bytes());
        let kept: Vec<usize> = (0..40).filter(|&i| cache.contains(&chunks[i].0.hash)).collect();
        assert_eq!(kept.len() as u64, cache.live_bytes() / frame_len);
        assert!(kept.contains(&39) && !kept.contains(&0), "kept {kept:?}");
        for &i in &kept {
            assert!(cache.get(&chunks[i].0).is_some(), "chunk {i} is indexed but does not read back");
        }
        cache.flush().unwrap();
        let used = cache.live_bytes();
        drop(cache);
        let cache = reopen(&LocalCacheConfig::new(dir.path(), quota));
        assert_eq!(cache.live_bytes(), used);
        let packs = dir_size(&dir.path().join("packs"));
        assert_eq!(packs + kept.len() as u64 * ENTRY_OVERHEAD, cache.used_bytes());
        assert!(cache.used_bytes() <= quota);
        assert!(packs >= kept.len() as u64 * chunks[0].1.len() as u64);
    }

    /// A cache with `quota` in a new temporary directory.
    fn fresh(quota: u64) -> (tempfile::TempDir, LocalCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(&LocalCacheConfig::new(dir.path(), quota)).unwrap();
        (dir, cache)
    }

    fn pack_of(cache: &LocalCache, hash: &ChunkHash) -> PathBuf {
        cache.packs_dir.join(pack_name(cache.entry(hash).unwrap().pack))
    }

    /// Chunks read often stay through a workload many times the quota: their packs empty out
    /// around them, and compaction copies them forward and frees the rest.
    #[test]
    fn compaction_keeps_hot_chunks_and_frees_dead_space() {
        let quota = 4 << 20;
        let (dir, cache) = fresh(quota);
        let hot: Vec<_> = (0..8).map(|i| chunk(2000 + i, 32 * 1024)).collect();
        // Each hot chunk shares its pack with chunks that are never read again.
        for (i, (c, frame)) in hot.iter().enumerate() {
            cache.insert(&c.hash, frame);
            for j in 0..4 {
                let (cold, cold_frame) = chunk(2100 + 4 * i as u64 + j, 32 * 1024);
                cache.insert(&cold.hash, &cold_frame);
            }
        }
        let first_packs: Vec<u64> = hot.iter().map(|(c, _)| cache.entry(&c.hash).unwrap().pack).collect();
        for i in 0..400 {
            let (c, frame) = chunk(3000 + i, 64 * 1024);
            cache.insert(&c.hash, &frame);
            for (h, _) in &hot {
                assert!(cache.get(h).is_some(), "hot chunk evicted at step {i}");
            }
            cache.apply_pending_touches();
            assert!(cache.used_bytes() <= quota, "{} bytes on disk at step {i}", cache.used_bytes());
        }
        let moved = hot.iter().zip(&first_packs).filter(|((c, _), &first)| cache.entry(&c.hash).unwrap().pack != first).count();
        assert_eq!(moved, hot.len(), "the hot chunks were not copied forward");
        // Compaction copied the hot chunks (again each time their pack aged: six times over
        // here), not the oldest of the stream around them, which eviction takes next (copying
        // those too, as compacting whatever pack is most dead does, came to ten times the hot
        // bytes).
        let copied = cache.copied.load(Ordering::Relaxed);
        let hot_bytes: u64 = hot.iter().map(|(_, frame)| frame.len() as u64).sum();
        assert!(copied > 0 && copied <= 8 * hot_bytes, "{copied} bytes copied for {hot_bytes} hot bytes");
        assert_eq!(cache.stats().corrupt, 0);
        assert!(!first_packs.iter().any(|&id| dir.path().join("packs").join(pack_name(id)).exists()), "old packs were kept");
        // The live entries fill the cache: eviction freed what compaction could not.
        assert!(cache.live_bytes() > quota / 2, "only {} bytes live", cache.live_bytes());
    }

    /// A stream of chunks that are never read again leaves packs in the order they were
    /// written and in LRU order alike: eviction empties them whole, and nothing is copied.
    #[test]
    fn a_stream_read_once_is_evicted_pack_by_pack_without_copies() {
        let quota = 4 << 20;
        let (_dir, cache) = fresh(quota);
        for i in 0..300 {
            let (c, frame) = chunk(8000 + i, 40 * 1024 + i as usize);
            cache.insert(&c.hash, &frame);
            assert!(cache.used_bytes() <= quota, "{} bytes on disk at step {i}", cache.used_bytes());
        }
        assert!(cache.stats().evictions > 150);
        assert_eq!(cache.copied.load(Ordering::Relaxed), 0, "compaction copied frames of a stream");
        assert!(cache.live_bytes() > quota * 3 / 4, "only {} bytes live", cache.live_bytes());
    }

    /// Reads of chunks that compaction moves, and evictions, never return wrong bytes or take a
    /// moved entry for a broken one.
    #[test]
    fn reads_racing_eviction_and_compaction_get_right_bytes_or_a_miss() {
        let (_dir, cache) = fresh(2 << 20);
        let hot: Vec<_> = (0..16).map(|i| chunk(4000 + i, 16 * 1024)).collect();
        let data = |seed: u64| {
            let mut d = vec![0u8; 16 * 1024];
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed).fill_bytes(&mut d);
            d
        };
        let expected: Vec<Vec<u8>> = (0..16).map(|i| data(4000 + i)).collect();
        for (c, frame) in &hot {
            cache.insert(&c.hash, frame);
        }
        let done = AtomicBool::new(false);
        let hits = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                let (cache, hot, expected, done, hits) = (&cache, &hot, &expected, &done, &hits);
                scope.spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        for ((c, _), want) in hot.iter().zip(expected) {
                            if let Some(got) = cache.get(c) {
                                assert!(&got == want, "wrong bytes for a hot chunk");
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            for i in 0..300 {
                let (c, frame) = chunk(5000 + i, 48 * 1024);
                cache.insert(&c.hash, &frame);
            }
            done.store(true, Ordering::Relaxed);
        });
        assert_eq!(cache.stats().corrupt, 0, "a moved or evicted entry was taken for a bad one");
        assert!(hits.load(Ordering::Relaxed) > 0);
        assert!(cache.used_bytes() <= 2 << 20);
    }

    /// What `kill -9` between appending frames and indexing them leaves: bytes in a pack that
    /// no entry names. They are counted on open, and the next pack is a new one.
    #[test]
    fn frames_a_crash_left_unindexed_are_counted_and_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let quota = 2 << 20;
        let config = LocalCacheConfig::new(dir.path(), quota);
        let (kept, kept_frame) = chunk(6000, 1000);
        let crashed_pack = {
            let cache = LocalCache::open(&config).unwrap();
            cache.insert(&kept.hash, &kept_frame);
            let mut packs = cache.writer.lock();
            for i in 0..4 {
                cache.append_locked(&mut packs, &chunk(6001 + i, 20 * 1024).1).unwrap();
            }
            let id = packs.active.as_ref().unwrap().id;
            drop(packs);
            cache.flush().unwrap();
            id
        };
        let cache = reopen(&config);
        assert_eq!(cache.live_bytes(), kept_frame.len() as u64 + ENTRY_OVERHEAD);
        let on_disk = dir_size(&dir.path().join("packs"));
        assert!(on_disk > 4 * 20 * 1024, "the unindexed frames are gone already: {on_disk}");
        assert_eq!(cache.used_bytes(), on_disk + ENTRY_OVERHEAD, "dead bytes are counted against the quota");
        let (next, next_frame) = chunk(6100, 1000);
        cache.insert(&next.hash, &next_frame);
        assert!(cache.entry(&next.hash).unwrap().pack > crashed_pack, "appended after bytes a crash left");
        for i in 0..100 {
            let (c, frame) = chunk(6200 + i, 64 * 1024);
            cache.insert(&c.hash, &frame);
        }
        assert!(dir_size(&dir.path().join("packs")) <= quota);
        assert!(!dir.path().join("packs").join(pack_name(crashed_pack)).exists());
    }

    /// A cache directory from before packs (a file per frame under `chunks/`) opens: its
    /// entries are dropped, so those chunks are fetched again, and its files are deleted.
    #[test]
    fn the_file_per_frame_layout_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = LocalCacheConfig::new(dir.path(), 10 << 20);
        let (old, old_frame) = chunk(7000, 10_000);
        let (new, new_frame) = chunk(7001, 10_000);
        {
            let cache = LocalCache::open(&config).unwrap();
            cache.insert(&new.hash, &new_frame);
            let mut legacy = [0u8; 16];
            legacy[..8].copy_from_slice(&99u64.to_be_bytes());
            legacy[8..].copy_from_slice(&(old_frame.len() as u64).to_be_bytes());
            cache.chunks.insert(key(b'm', &old.hash), &legacy[..]).unwrap();
            cache.chunks.insert(lru_key(99, &old.hash), &[][..]).unwrap();
            let hex = old.hash.to_hex();
            std::fs::create_dir_all(dir.path().join("chunks").join(&hex[..2])).unwrap();
            std::fs::write(dir.path().join("chunks").join(&hex[..2]).join(&hex), &old_frame).unwrap();
            cache.flush().unwrap();
        }
        let cache = reopen(&config);
        assert!(!dir.path().join("chunks").exists());
        assert!(!cache.contains(&old.hash));
        assert!(cache.chunks.get(lru_key(99, &old.hash)).unwrap().is_none());
        assert!(cache.get(&old).is_none());
        assert!(cache.get(&new).is_some(), "entries of the pack layout were dropped too");
        assert_eq!(cache.live_bytes(), new_frame.len() as u64 + ENTRY_OVERHEAD);
    }
}
