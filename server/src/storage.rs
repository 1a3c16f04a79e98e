//! What the server keeps in the object store, the source of truth.
//!
//! Layout (all keys relative to the store's root):
//! - `chunks/{hh}/{blake3}`: one zstd frame per chunk, `hh` the first two hex digits, or for a
//!   chunk that compaction packed, a pointer into its pack (see [`flywheel_core::chunk::pack`]);
//! - `packs/{hh}/{blake3}.pack`: a pack of chunks, named by the BLAKE3 of its bytes
//!   (see [`crate::compact`]);
//! - `manifests/{narhash}.json`: the manifest of a NAR, named by its nixbase32 SHA-256;
//! - `caches/{cache}/config.json`: a cache's settings and signing key;
//! - `caches/{cache}/paths/{hash}.json`: a published store path;
//! - `caches/{cache}/names/{name}`: the hash part of the path last published under this
//!   unversioned name, the base a push of its next version is told as changes to;
//! - `caches/{cache}/pending/{narhash}`: a NAR received through a Nix PUT, which its narinfo may
//!   publish until garbage collection finds the marker older than the grace period;
//! - `caches/{cache}/logs/{drv}`: a build log, zstd-compressed;
//! - `caches/{cache}/debuginfo/{build-id}`: where the debug file of an ELF build ID is;
//! - `caches/{cache}/realisations/{drv hash hex}/{output}`: a realisation of a
//!   content-addressed derivation's output, as Nix up to 2.34 uploads it (`realisations/`);
//! - `caches/{cache}/build-trace-v2/{drv}/{output}`: the same as Nix 2.35 and later upload it;
//! - `caches/{cache}/nar-files/{file}`: the hash part of the path whose uploader's narinfo
//!   named `nar/{file}`, so that the NAR is served at that URL too;
//! - `caches/{cache}/chunks/{hh}/{blake3}`: an empty grant: the cache holds that chunk, because
//!   its bytes were uploaded to it (see [`Storage::grant_chunks`]);
//! - `caches/{cache}/traces/{key}`: an access trace (`PUT trace/{key}`), zstd-compressed JSON;
//!   a hint, never a garbage collection root.
//!
//! Writes go chunks, then manifest, then path record, so a reader that finds a path record
//! finds everything it needs.

use std::sync::Arc;

use bytes::Bytes;
use flywheel_core::chunk::pack::{self, PackId, PackIndex, PackPointer};
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::Manifest;
use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::clock::{Clock, SharedClock, SystemClock};
use crate::inline_io::InlineIo;

/// A cache's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The cache name.
    pub name: String,
    /// Secret signing key, Nix format.
    pub signing_key: String,
    /// Whether anyone may pull without a token.
    pub is_public: bool,
    /// Store directory of the cache's paths.
    pub store_dir: String,
    /// Priority announced in `nix-cache-info`.
    pub priority: i32,
    /// Key names of upstream caches.
    pub upstream_cache_key_names: Vec<String>,
    /// Retention in seconds; `None` means the server default.
    #[serde(default)]
    pub retention_period: Option<u32>,
    /// Public keys (`name:base64`) of the uploaders whose signatures
    /// `require_uploader_signature` accepts, such as a key per CI runner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_uploader_keys: Vec<String>,
    /// Whether every path published to the cache must carry a valid signature by one of
    /// `trusted_uploader_keys`; otherwise uploaders' signatures are kept without a check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_uploader_signature: bool,
}

impl CacheRecord {
    /// Checks the uploader settings that every way of configuring a cache (config file, API)
    /// sets: keys in Nix's form, and, when signatures are required, at least one key (with
    /// none, every upload would be refused). Returns the keys in their canonical form.
    pub fn check_uploader_settings(keys: &[String], require: bool) -> Result<Vec<String>> {
        let parsed = flywheel_core::nix::TrustedKeys::parse(keys).map_err(|e| e.context("trusted uploader keys"))?;
        if require && parsed.is_empty() {
            return Err(Error::invalid(
                "require-uploader-signature needs at least one trusted uploader key: list the keys that may sign uploads first",
            ));
        }
        Ok(parsed.to_nix_strings())
    }
}

/// Whether a stored chunk may be counted on by a new path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Not stored.
    Missing,
    /// Stored, but older than the reuse window: write it again before counting on it.
    Stale,
    /// Stored and written recently enough.
    Fresh,
}

/// How old a stored chunk may be and still be counted on by an upload without writing it
/// again.
///
/// Garbage collection deletes unreferenced chunks older than the grace period. An upload that
/// counted on such a chunk and published after the sweep would publish a path with a hole. So
/// uploads count only on chunks written within half the grace period, and write older ones
/// again (which makes them young, so the sweep spares them); and an upload must finish within
/// the other half. With a grace period of 0 (no protection asked for), every chunk counts.
///
/// "Now" is read from the same clock as garbage collection's, so that both judge a chunk's
/// age alike.
#[derive(Debug, Clone)]
pub struct ReuseWindow {
    /// Half the grace period, in milliseconds; 0 for no limit.
    pub window_ms: u64,
    clock: SharedClock,
}

impl ReuseWindow {
    /// The window for a grace period in seconds, reading the time from `clock` (see
    /// [`Storage::reuse_window`], which passes the storage's own).
    pub fn with_clock(grace_secs: u64, clock: SharedClock) -> Self {
        ReuseWindow { window_ms: grace_secs.saturating_mul(1000) / 2, clock }
    }

    /// Chunks written at or after this instant (ms since the epoch) may be counted on now.
    pub fn reusable_after(&self) -> u64 {
        if self.window_ms == 0 {
            return 0;
        }
        self.clock.now_ms().saturating_sub(self.window_ms)
    }

    /// Longest an upload may take between its first reuse decision and its commit.
    pub fn max_upload(&self) -> Option<std::time::Duration> {
        (self.window_ms > 0).then(|| std::time::Duration::from_millis(self.window_ms))
    }
}

/// Milliseconds since the epoch, on the system clock (for what is not judged against a
/// [`Storage`]'s clock).
pub fn now_ms() -> u64 {
    SystemClock.now_ms()
}

/// An object's modification time in milliseconds since the epoch.
pub fn modified_ms(meta: &object_store::ObjectMeta) -> u64 {
    u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0)
}

/// A published store path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathRecord {
    /// Base name `hash-name`.
    pub store_path: String,
    /// NAR hash; names the manifest.
    pub nar_hash: Sha256Hash,
    /// NAR size.
    pub nar_size: u64,
    /// References, base names, sorted.
    pub references: Vec<String>,
    /// Deriver, base name.
    #[serde(default)]
    pub deriver: Option<String>,
    /// System it was built for.
    #[serde(default)]
    pub system: Option<String>,
    /// Signatures received with the path (the cache's own is added when served).
    #[serde(default)]
    pub sigs: Vec<String>,
    /// Content address.
    #[serde(default)]
    pub ca: Option<String>,
    /// Seconds since the epoch when it was published.
    pub created_at: u64,
    /// The file under `nar/` that the uploader's narinfo named (`<filehash>.nar.xz`, ...), if
    /// it was not one of ours: Nix keeps that narinfo and asks for that file later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nar_file: Option<String>,
}

/// The small files a cache keeps beside its paths, each under `caches/{cache}/{dir}/{name}`.
#[derive(Debug, Clone, Copy)]
pub enum CacheFile<'a> {
    /// The zstd-compressed build log of a derivation (its base name).
    Log(&'a str),
    /// What Nix's `index-debug-info` wrote for a build ID.
    DebugInfo(&'a str),
    /// The hash part of the path whose uploader named its NAR `nar/{name}`.
    NarFile(&'a str),
    /// A realisation (Nix up to 2.34), named `{drv hash hex}/{output}`.
    Realisation(&'a str),
    /// A build trace entry's value (Nix 2.35 and later), named `{drv}/{output}`.
    BuildTrace(&'a str),
    /// An access trace, named by its key, as zstd-compressed JSON: the JSON is mostly hex
    /// chunk hashes, which zstd halves, and every PUT reads and writes the whole object.
    Trace(&'a str),
}

impl CacheFile<'_> {
    /// The folder of each kind, below `caches/{cache}/`.
    pub const LOGS: &'static str = "logs";
    /// See [`CacheFile::LOGS`].
    pub const DEBUG_INFO: &'static str = "debuginfo";
    /// See [`CacheFile::LOGS`].
    pub const NAR_FILES: &'static str = "nar-files";
    /// See [`CacheFile::LOGS`].
    pub const REALISATIONS: &'static str = "realisations";
    /// See [`CacheFile::LOGS`].
    pub const BUILD_TRACE: &'static str = "build-trace-v2";
    /// See [`CacheFile::LOGS`].
    pub const TRACES: &'static str = "traces";

    fn key(&self, cache: &str) -> Path {
        let (dir, name) = match *self {
            CacheFile::Log(name) => (Self::LOGS, name),
            CacheFile::DebugInfo(name) => (Self::DEBUG_INFO, name),
            CacheFile::NarFile(name) => (Self::NAR_FILES, name),
            CacheFile::Realisation(name) => (Self::REALISATIONS, name),
            CacheFile::BuildTrace(name) => (Self::BUILD_TRACE, name),
            CacheFile::Trace(name) => (Self::TRACES, name),
        };
        Path::from(format!("caches/{cache}/{dir}/{name}"))
    }

    fn what(&self) -> &'static str {
        match self {
            CacheFile::Log(_) => "build log",
            CacheFile::DebugInfo(_) => "debuginfo",
            CacheFile::NarFile(_) => "NAR file name",
            CacheFile::Realisation(_) => "realisation",
            CacheFile::BuildTrace(_) => "build trace entry",
            CacheFile::Trace(_) => "access trace",
        }
    }
}

/// Requests in flight for one call of [`Storage::chunk_versions`] or
/// [`Storage::get_chunks_versioned`] on a store that is asked concurrently; callers pass small
/// batches, and this keeps a large one from opening a request per chunk at once.
pub const BATCH_CONCURRENCY: usize = 16;

/// Typed access to the object store.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    clock: SharedClock,
    /// Threads that run batches of calls inline, for a store that works in the calling
    /// thread (see [`Storage::with_inline_io`]): reads and lookups.
    inline: Option<Arc<InlineIo>>,
    /// The same for uploads' chunk writes, which compress on these threads.
    inline_writes: Option<Arc<InlineIo>>,
    /// Pack frames read lately, decompressed.
    pack_frames: Arc<parking_lot::Mutex<PackFrames>>,
}

/// Decompressed pack frames read lately: the chunks of one frame are neighbours in a NAR, so a
/// download reads and decompresses each frame once for all of them. Bounded by bytes.
struct PackFrames {
    frames: lru::LruCache<(PackId, u64), Arc<Vec<u8>>>,
    bytes: usize,
}

/// Bytes of decompressed pack frames kept: four frames of the default size, so that a few
/// downloads at once each keep the frame they are reading.
const PACK_FRAMES_KEPT: usize = 16 << 20;

impl PackFrames {
    fn get(&mut self, key: &(PackId, u64)) -> Option<Arc<Vec<u8>>> {
        self.frames.get(key).cloned()
    }

    fn put(&mut self, key: (PackId, u64), frame: Arc<Vec<u8>>) {
        self.bytes += frame.len();
        if let Some(old) = self.frames.put(key, frame) {
            self.bytes -= old.len();
        }
        while self.bytes > PACK_FRAMES_KEPT {
            match self.frames.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

fn storage_error(err: object_store::Error, what: &str) -> Error {
    match err {
        object_store::Error::NotFound { .. } => Error::not_found(format!("{what} not found")),
        other => Error::unavailable(format!("storage failed on {what}: {other}")),
    }
}

fn pack_missing(hash: &ChunkHash) -> Error {
    Error::corrupt(format!("chunk {hash} points into a pack that is missing from storage"))
}

fn version_of(meta: &object_store::ObjectMeta) -> String {
    match &meta.e_tag {
        Some(tag) => tag.clone(),
        None => format!("{}-{}", meta.size, meta.last_modified.timestamp_nanos_opt().unwrap_or(0)),
    }
}

/// Seconds since the epoch, on the system clock (for what is not judged against a
/// [`Storage`]'s clock).
pub fn now() -> u64 {
    SystemClock.now_secs()
}

impl Storage {
    /// Wraps an object store, on the system clock.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self::with_clock(store, SystemClock::shared())
    }

    /// Wraps an object store; access records, staging markers, the reuse window and garbage
    /// collection read the time from `clock`.
    pub fn with_clock(store: Arc<dyn ObjectStore>, clock: SharedClock) -> Self {
        let pack_frames = PackFrames { frames: lru::LruCache::unbounded(), bytes: 0 };
        Storage { store, clock, inline: None, inline_writes: None, pack_frames: Arc::new(parking_lot::Mutex::new(pack_frames)) }
    }

    /// Has batches of chunk reads, lookups and writes run on `threads` threads of their own, a
    /// batch per thread hop (see [`crate::inline_io`]). Only for a store that does its work in the
    /// calling thread when no runtime is entered there: `object_store`'s local and in-memory
    /// stores. (The S3 store needs the runtime, and its requests are better sent at once.)
    ///
    /// Uploads' chunk writes get `threads` threads apart from the reads': they compress there,
    /// and at a high zstd level or on a slow disk a shared queue would hold downloads up
    /// behind them.
    pub fn with_inline_io(mut self, threads: usize) -> std::io::Result<Self> {
        self.inline = Some(Arc::new(InlineIo::new(threads, "storage-read")?));
        self.inline_writes = Some(Arc::new(InlineIo::new(threads, "storage-write")?));
        Ok(self)
    }

    /// Whether chunk reads are best asked for in batches ([`Storage::get_chunks_versioned`],
    /// [`Storage::chunk_versions`]) rather than one call per chunk.
    pub fn reads_in_batches(&self) -> bool {
        self.inline.is_some()
    }

    /// The object store underneath.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The clock this storage judges ages by.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The reuse window for a grace period in seconds, on this storage's clock.
    pub fn reuse_window(&self, grace_secs: u64) -> ReuseWindow {
        ReuseWindow::with_clock(grace_secs, self.clock.clone())
    }

    fn chunk_key(hash: &ChunkHash) -> Path {
        let hex = hash.to_hex();
        Path::from(format!("chunks/{}/{hex}", &hex[..2]))
    }

    fn pack_key(id: &PackId) -> Path {
        let hex = id.to_hex();
        Path::from(format!("packs/{}/{hex}.pack", &hex[..2]))
    }

    /// The pack a key of [`Storage::list_objects`]`("packs")` names.
    pub fn pack_of_key(key: &Path) -> Option<PackId> {
        key.filename()?.strip_suffix(".pack")?.parse().ok()
    }

    fn manifest_key(nar_hash: &Sha256Hash) -> Path {
        Path::from(format!("manifests/{}.json", nar_hash.to_base32_bare()))
    }

    fn cache_key(cache: &str) -> Path {
        Path::from(format!("caches/{cache}/config.json"))
    }

    fn path_key(cache: &str, hash_part: &str) -> Path {
        Path::from(format!("caches/{cache}/paths/{hash_part}.json"))
    }

    fn name_key(cache: &str, unversioned_name: &str) -> Path {
        Path::from(format!("caches/{cache}/names/{unversioned_name}"))
    }

    fn pending_key(cache: &str, nar_hash: &Sha256Hash) -> Path {
        Path::from(format!("caches/{cache}/pending/{}", nar_hash.to_base32_bare()))
    }

    async fn get_bytes(&self, key: &Path, what: &str) -> Result<Option<Bytes>> {
        match self.store.get(key).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(|e| storage_error(e, what))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(err, what)),
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &Path, what: &str) -> Result<Option<T>> {
        let Some(bytes) = self.get_bytes(key, what).await? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| Error::corrupt(format!("stored {what} at {key} does not parse: {err}")))
    }

    async fn put_json<T: Serialize>(&self, key: &Path, value: &T, what: &str) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|err| Error::internal(format!("serializing {what}: {err}")))?;
        self.store.put(key, PutPayload::from(bytes)).await.map_err(|e| storage_error(e, what))?;
        Ok(())
    }

    async fn delete(&self, key: &Path, what: &str) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(storage_error(err, what)),
        }
    }

    /// Stored size of a chunk, or `None` if it is not stored.
    pub async fn chunk_size(&self, hash: &ChunkHash) -> Result<Option<u64>> {
        match self.store.head(&Self::chunk_key(hash)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(err, "chunk")),
        }
    }

    /// A chunk object's size and when it was written (milliseconds since the epoch), or `None`
    /// if it is not stored.
    pub async fn chunk_meta(&self, hash: &ChunkHash) -> Result<Option<(u64, u64)>> {
        match self.store.head(&Self::chunk_key(hash)).await {
            Ok(meta) => Ok(Some((meta.size, modified_ms(&meta)))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(err, "chunk")),
        }
    }

    /// Whether a chunk is stored and written at or after `reusable_after` (milliseconds since
    /// the epoch): only such a chunk may be counted on by a new path (see [`ReuseWindow`]).
    pub async fn chunk_reusable(&self, hash: &ChunkHash, reusable_after: u64) -> Result<Reuse> {
        match self.store.head(&Self::chunk_key(hash)).await {
            Ok(meta) if modified_ms(&meta) >= reusable_after => Ok(Reuse::Fresh),
            Ok(_) => Ok(Reuse::Stale),
            Err(object_store::Error::NotFound { .. }) => Ok(Reuse::Missing),
            Err(err) => Err(storage_error(err, "chunk")),
        }
    }

    /// Which of `hashes` are stored and fresh enough to count on, in order, asking
    /// `parallelism` at a time. Stale ones count as missing, so the uploader sends them again
    /// and the write makes them fresh.
    pub async fn chunks_reusable(&self, hashes: Vec<ChunkHash>, reusable_after: u64, parallelism: usize) -> Result<Vec<bool>> {
        futures::stream::iter(hashes)
            .map(|hash| {
                let storage = self.clone();
                async move { storage.chunk_reusable(&hash, reusable_after).await.map(|r| r == Reuse::Fresh) }
            })
            .buffered(parallelism)
            .try_collect()
            .await
    }

    /// A token that changes whenever a chunk object is rewritten (its e-tag, or its size and
    /// modification time), or `None` if it is not stored.
    pub async fn chunk_version(&self, hash: &ChunkHash) -> Result<Option<String>> {
        match self.store.head(&Self::chunk_key(hash)).await {
            Ok(meta) => Ok(Some(version_of(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(err, "chunk")),
        }
    }

    /// A chunk's stored frame with its version token (see [`Storage::chunk_version`]). A packed
    /// chunk comes out of its pack verified, in a frame of raw blocks (see
    /// [`pack::stored_frame`]); its version is its pointer's.
    pub async fn get_chunk_versioned(&self, hash: &ChunkHash) -> Result<(Bytes, String)> {
        let (object, version) = self.get_chunk_object(hash).await?;
        match self.resolve_chunk(hash, object).await? {
            Some(frame) => Ok((frame, version)),
            // Compaction moved the chunk to a new pack and the old one is gone: once more.
            None => {
                let (object, version) = self.get_chunk_object(hash).await?;
                let frame = self.resolve_chunk(hash, object).await?.ok_or_else(|| pack_missing(hash))?;
                Ok((frame, version))
            }
        }
    }

    async fn get_chunk_object(&self, hash: &ChunkHash) -> Result<(Bytes, String)> {
        let result = match self.store.get(&Self::chunk_key(hash)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::corrupt(format!("chunk {hash} is missing from storage")))
            }
            Err(err) => return Err(storage_error(err, "chunk")),
        };
        let version = version_of(&result.meta);
        let bytes = result.bytes().await.map_err(|e| storage_error(e, "chunk"))?;
        Ok((bytes, version))
    }

    /// The compressed bytes of the pack frame `pointer` names, unverified; `None` when the
    /// pack is gone.
    pub async fn get_pack_frame(&self, pointer: &PackPointer) -> Result<Option<Bytes>> {
        let range = pointer.frame_offset..pointer.frame_offset + u64::from(pointer.frame_len);
        match self.store.get_range(&Self::pack_key(&pointer.pack), range).await {
            Ok(frame) => Ok(Some(frame)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(err, "pack")),
        }
    }

    /// A chunk object as a frame: a stored frame as it is, a packed chunk out of its pack
    /// (`None` when the pack is gone).
    async fn resolve_chunk(&self, hash: &ChunkHash, object: Bytes) -> Result<Option<Bytes>> {
        let Some(pointer) = PackPointer::parse(&object).map_err(|err| err.context(format_args!("chunk {hash}")))? else {
            return Ok(Some(object));
        };
        Ok(self.read_packed(hash, &pointer).await?.map(|data| Bytes::from(pack::stored_frame(&data))))
    }

    /// A packed chunk's bytes, verified; `None` when its pack is gone.
    pub async fn read_packed(&self, hash: &ChunkHash, pointer: &PackPointer) -> Result<Option<Vec<u8>>> {
        let Some(raw) = self.pack_frame_raw(pointer).await.map_err(|err| err.context(format_args!("chunk {hash}")))? else {
            return Ok(None);
        };
        pointer.slice_verified(&raw, hash).map(|data| Some(data.to_vec()))
    }

    /// The uncompressed bytes of the pack frame `pointer` names, unverified (its chunks are
    /// checked against their names as they are sliced out); `None` when the pack is gone.
    /// Frames read lately are kept in memory.
    pub async fn pack_frame_raw(&self, pointer: &PackPointer) -> Result<Option<Arc<Vec<u8>>>> {
        let key = (pointer.pack, pointer.frame_offset);
        let cached = self.pack_frames.lock().get(&key);
        if let Some(raw) = cached {
            return Ok(Some(raw));
        }
        let Some(frame) = self.get_pack_frame(pointer).await? else { return Ok(None) };
        let raw = pack::decompress_frame(&frame, pointer.frame_raw_len as usize)
            .map_err(|err| err.context(format_args!("pack {}", pointer.pack)))?;
        let raw = Arc::new(raw);
        self.pack_frames.lock().put(key, raw.clone());
        Ok(Some(raw))
    }

    /// The pointer a packed chunk's object holds; `None` for a chunk stored as a frame of its
    /// own, or not at all. Only an object of a pointer's length is read.
    pub async fn chunk_pointer(&self, hash: &ChunkHash) -> Result<Option<PackPointer>> {
        if self.chunk_size(hash).await? != Some(pack::POINTER_LEN as u64) {
            return Ok(None);
        }
        match self.get_bytes(&Self::chunk_key(hash), "chunk").await? {
            Some(object) => PackPointer::parse(&object).map_err(|err| err.context(format_args!("chunk {hash}"))),
            None => Ok(None),
        }
    }

    /// Writes a chunk's object again as it is (its frame, or its pointer into a pack), which
    /// makes it young; answers its frame as [`Storage::get_chunk`] does, and its new version
    /// token when the store gives one.
    pub async fn rewrite_chunk(&self, hash: &ChunkHash) -> Result<(Bytes, Option<String>)> {
        let (object, _) = self.get_chunk_object(hash).await?;
        let frame = self.resolve_chunk(hash, object.clone()).await?.ok_or_else(|| pack_missing(hash))?;
        let written =
            self.store.put(&Self::chunk_key(hash), PutPayload::from(object)).await.map_err(|e| storage_error(e, "chunk"))?;
        Ok((frame, written.e_tag))
    }

    /// Makes a chunk's object point into a pack (which must hold the chunk, verified).
    pub async fn put_chunk_pointer(&self, hash: &ChunkHash, pointer: &PackPointer) -> Result<()> {
        self.store
            .put(&Self::chunk_key(hash), PutPayload::from(pointer.encode().to_vec()))
            .await
            .map_err(|e| storage_error(e, "chunk pointer"))?;
        Ok(())
    }

    /// Stores a pack under its name.
    pub async fn put_pack(&self, id: &PackId, bytes: Bytes) -> Result<()> {
        self.store.put(&Self::pack_key(id), PutPayload::from(bytes)).await.map_err(|e| storage_error(e, "pack"))?;
        Ok(())
    }

    /// A pack's size, or `None` if it is not stored.
    pub async fn pack_size(&self, id: &PackId) -> Result<Option<u64>> {
        match self.store.head(&Self::pack_key(id)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(err, "pack")),
        }
    }

    /// A whole pack, or `None` if it is not stored.
    pub async fn get_pack(&self, id: &PackId) -> Result<Option<Bytes>> {
        self.get_bytes(&Self::pack_key(id), "pack").await
    }

    /// A pack's index, read by range, `pack_len` being the pack's size.
    pub async fn get_pack_index(&self, id: &PackId, pack_len: u64) -> Result<PackIndex> {
        let key = Self::pack_key(id);
        let read = |range: std::ops::Range<u64>| {
            let key = key.clone();
            async move { self.store.get_range(&key, range).await.map_err(|e| storage_error(e, "pack")) }
        };
        let prefix = read(0..(PackIndex::PREFIX as u64).min(pack_len)).await?;
        let index_len = PackIndex::len_from_prefix(&prefix).map_err(|err| err.context(format_args!("pack {id}")))?;
        if index_len as u64 > pack_len {
            return Err(Error::corrupt(format!("pack {id} is shorter than its index")));
        }
        let index = read(0..index_len as u64).await?;
        PackIndex::parse(&index, pack_len).map_err(|err| err.context(format_args!("pack {id}")))
    }

    /// Removes a pack.
    pub async fn delete_pack(&self, id: &PackId) -> Result<()> {
        self.delete(&Self::pack_key(id), "pack").await
    }

    /// Runs `work` on `threads` (the storage I/O threads of [`Storage::with_inline_io`]) when
    /// there are some, else here.
    async fn on_threads<T: Send + 'static>(
        threads: &Option<Arc<InlineIo>>,
        work: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        match threads {
            Some(threads) => threads.block_on(move || work).await?,
            None => work.await,
        }
    }

    /// The version of each of `hashes` (`None`: missing), in order, as
    /// [`Storage::chunk_version`] answers: on one thread of their own when the store runs
    /// inline, else up to [`BATCH_CONCURRENCY`] at a time.
    pub async fn chunk_versions(&self, hashes: Vec<ChunkHash>) -> Result<Vec<Option<String>>> {
        let storage = self.clone();
        let lookups = async move {
            futures::stream::iter(hashes)
                .map(|hash| {
                    let storage = storage.clone();
                    async move { storage.chunk_version(&hash).await }
                })
                .buffered(BATCH_CONCURRENCY)
                .try_collect()
                .await
        };
        Self::on_threads(&self.inline, lookups).await
    }

    /// The stored frames of `hashes` with their versions, in order, as
    /// [`Storage::get_chunk_versioned`] answers, up to and including the first that fails
    /// (so that a reader can pass on the frames before it): on one thread of their own when
    /// the store runs inline, else up to [`BATCH_CONCURRENCY`] at a time.
    pub async fn get_chunks_versioned(&self, hashes: Vec<ChunkHash>) -> Vec<Result<(Bytes, String)>> {
        self.read_in_order(hashes, |storage, hash| async move { storage.get_chunk_versioned(&hash).await }).await
    }

    /// The objects of `hashes` as stored (a frame, unverified, or a pack pointer) with their
    /// versions, read as [`Storage::get_chunks_versioned`] reads frames.
    pub async fn get_chunk_objects(&self, hashes: Vec<ChunkHash>) -> Vec<Result<(Bytes, String)>> {
        self.read_in_order(hashes, |storage, hash| async move { storage.get_chunk_object(&hash).await }).await
    }

    async fn read_in_order<F, Fut>(&self, hashes: Vec<ChunkHash>, read: F) -> Vec<Result<(Bytes, String)>>
    where
        F: Fn(Storage, ChunkHash) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(Bytes, String)>> + Send + 'static,
    {
        let storage = self.clone();
        let reads = async move {
            let mut reads =
                futures::stream::iter(hashes).map(move |hash| read(storage.clone(), hash)).buffered(BATCH_CONCURRENCY);
            let mut items = Vec::new();
            while let Some(item) = reads.next().await {
                let failed = item.is_err();
                items.push(item);
                if failed {
                    break;
                }
            }
            Ok(items)
        };
        Self::on_threads(&self.inline, reads).await.unwrap_or_else(|err| vec![Err(err)])
    }

    /// Stores the frame `make_frame` makes for a chunk unless a fresh copy is stored already
    /// (see [`Storage::chunk_reusable`]). Answers what was there, and when it was written, the
    /// frame and its version token. A store that works in the calling thread does all of it
    /// in one hop to a write thread of its own, compression included.
    pub async fn put_chunk_unless_fresh(
        &self,
        hash: ChunkHash,
        reusable_after: u64,
        make_frame: impl FnOnce() -> Result<Bytes> + Send + 'static,
    ) -> Result<(Reuse, Option<(Bytes, Option<String>)>)> {
        let storage = self.clone();
        let work = async move {
            let reuse = storage.chunk_reusable(&hash, reusable_after).await?;
            if reuse == Reuse::Fresh {
                return Ok((reuse, None));
            }
            let frame = make_frame()?;
            let version = storage.put_chunk(&hash, frame.clone()).await?;
            Ok((reuse, Some((frame, version))))
        };
        Self::on_threads(&self.inline_writes, work).await
    }

    /// Stores a chunk's zstd frame; answers its version token (see
    /// [`Storage::chunk_version`]) when the store gives one on a write.
    pub async fn put_chunk(&self, hash: &ChunkHash, frame: Bytes) -> Result<Option<String>> {
        let written =
            self.store.put(&Self::chunk_key(hash), PutPayload::from(frame)).await.map_err(|e| storage_error(e, "chunk"))?;
        // The same token a HEAD answers with (see `version_of`), when the store names one.
        Ok(written.e_tag)
    }

    /// A chunk's stored zstd frame, unverified (a packed chunk as
    /// [`Storage::get_chunk_versioned`] gives it, verified).
    pub async fn get_chunk(&self, hash: &ChunkHash) -> Result<Bytes> {
        self.get_chunk_versioned(hash).await.map(|(frame, _)| frame)
    }

    /// Removes a chunk.
    pub async fn delete_chunk(&self, hash: &ChunkHash) -> Result<()> {
        self.delete(&Self::chunk_key(hash), "chunk").await
    }

    fn grant_key(cache: &str, hash: &ChunkHash) -> Path {
        let hex = hash.to_hex();
        Path::from(format!("caches/{cache}/chunks/{}/{hex}", &hex[..2]))
    }

    /// Records that `cache` holds these chunks, because their bytes were just uploaded to it,
    /// and tells, in order, which it held already.
    ///
    /// Chunks are stored once for all caches, but a cache may count only on chunks it holds
    /// (`missing-chunks`, commits), so that knowing a chunk's hash never stands in for having
    /// its bytes. A grant is written after the chunk itself.
    pub async fn grant_chunks(&self, cache: &str, hashes: &[ChunkHash], parallelism: usize) -> Result<Vec<bool>> {
        let held = self.chunks_held(cache, hashes, parallelism).await?;
        let new: Vec<ChunkHash> = hashes.iter().zip(&held).filter(|(_, held)| !**held).map(|(h, _)| *h).collect();
        self.put_grants(cache, &new, parallelism).await?;
        Ok(held)
    }

    /// Grants these chunks to `cache` (see [`Storage::grant_chunks`]) without asking first
    /// which it held: one write each, for uploads that need not know.
    pub async fn put_grants(&self, cache: &str, hashes: &[ChunkHash], parallelism: usize) -> Result<()> {
        futures::stream::iter(hashes.iter().copied())
            .map(|hash| {
                let storage = self.clone();
                let key = Self::grant_key(cache, &hash);
                async move { storage.store.put(&key, PutPayload::new()).await.map_err(|e| storage_error(e, "chunk grant")) }
            })
            .buffer_unordered(parallelism.max(1))
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Which of `hashes` `cache` holds (see [`Storage::grant_chunks`]), in order.
    pub async fn chunks_held(&self, cache: &str, hashes: &[ChunkHash], parallelism: usize) -> Result<Vec<bool>> {
        futures::stream::iter(hashes.iter().copied())
            .map(|hash| {
                let storage = self.clone();
                let key = Self::grant_key(cache, &hash);
                async move { storage.exists(&key, "chunk grant").await }
            })
            .buffered(parallelism.max(1))
            .try_collect()
            .await
    }

    /// The chunk a grant key names, for garbage collection's listing of `caches/{cache}/chunks`.
    pub fn granted_chunk(key: &Path) -> Option<ChunkHash> {
        key.filename()?.parse().ok()
    }

    /// A NAR's manifest.
    pub async fn get_manifest(&self, nar_hash: &Sha256Hash) -> Result<Option<Manifest>> {
        self.get_json(&Self::manifest_key(nar_hash), "manifest").await
    }

    /// A NAR's manifest as stored (JSON), unparsed.
    pub async fn get_manifest_json(&self, nar_hash: &Sha256Hash) -> Result<Option<Bytes>> {
        self.get_bytes(&Self::manifest_key(nar_hash), "manifest").await
    }

    /// The manifest a published path needs; its absence is damage, not a miss.
    pub async fn manifest_of(&self, path: &PathRecord) -> Result<Manifest> {
        self.get_manifest(&path.nar_hash)
            .await?
            .ok_or_else(|| Error::corrupt(format!("manifest of {} is missing", path.store_path)))
    }

    async fn exists(&self, key: &Path, what: &str) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(storage_error(err, what)),
        }
    }

    /// Stores a manifest, after all of its chunks.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let json = manifest.to_json()?;
        self.store.put(&Self::manifest_key(&manifest.nar_hash), PutPayload::from(json)).await.map_err(|e| storage_error(e, "manifest"))?;
        Ok(())
    }

    /// Stores the manifest of an upload (`what`: "upload", "commit") that began at `started`
    /// (milliseconds, on this storage's clock, which garbage collection also reads); from then
    /// on garbage collection keeps its chunks.
    ///
    /// Fails when the upload took longer than the reuse window (a collection may have swept a
    /// chunk it counted on), or when a chunk it wrote again (`refreshed`) is gone once the
    /// manifest is stored (a collection that listed it before the write deleted it after): the
    /// caller then must not publish the path, and a new upload repairs it.
    pub async fn put_upload_manifest(
        &self,
        manifest: &Manifest,
        started: u64,
        window: ReuseWindow,
        refreshed: &[ChunkHash],
        what: &str,
    ) -> Result<()> {
        self.put_manifest(manifest).await?;
        self.check_upload_finished(started, &window, refreshed, what).await
    }

    /// The checks of [`Storage::put_upload_manifest`] once an upload's chunks are named by
    /// what garbage collection reads (a manifest, a Bazel blob record).
    pub async fn check_upload_finished(
        &self,
        started: u64,
        window: &ReuseWindow,
        refreshed: &[ChunkHash],
        what: &str,
    ) -> Result<()> {
        // Measured once the manifest is stored: from then on a collection keeps the chunks.
        if let Some(limit) = window.max_upload() {
            let took = std::time::Duration::from_millis(self.clock.now_ms().saturating_sub(started));
            if took > limit {
                return Err(Error::unavailable(format!(
                    "the {what} took {took:?}, longer than half the garbage collection grace period ({limit:?}); {what} it again"
                )));
            }
        }
        for hash in refreshed {
            if self.chunk_size(hash).await?.is_none() {
                return Err(Error::unavailable(format!(
                    "chunk {hash} was swept by a garbage collection during the {what}; {what} it again"
                )));
            }
        }
        Ok(())
    }

    /// A cache's settings.
    pub async fn get_cache(&self, cache: &str) -> Result<Option<CacheRecord>> {
        self.get_json(&Self::cache_key(cache), "cache config").await
    }

    /// Stores a cache's settings.
    pub async fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        self.put_json(&Self::cache_key(&record.name), record, "cache config").await
    }

    /// Removes a cache: its settings first, so it disappears at once, then its paths.
    pub async fn delete_cache(&self, cache: &str) -> Result<()> {
        self.delete(&Self::cache_key(cache), "cache config").await?;
        for meta in self.list_objects(&format!("caches/{cache}")).await? {
            self.delete(&meta.location, "cache entry").await?;
        }
        Ok(())
    }

    /// The names of all caches.
    pub async fn list_caches(&self) -> Result<Vec<String>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&Path::from("caches")))
            .await
            .map_err(|e| storage_error(e, "cache listing"))?;
        Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// The hash parts of all paths published in `cache`.
    pub async fn list_paths(&self, cache: &str) -> Result<Vec<String>> {
        let objects = self.list_objects(&format!("caches/{cache}/paths")).await?;
        Ok(objects
            .iter()
            .filter_map(|meta| meta.location.filename()?.strip_suffix(".json").map(str::to_string))
            .collect())
    }

    /// A published path by its hash part.
    pub async fn get_path(&self, cache: &str, hash_part: &str) -> Result<Option<PathRecord>> {
        self.get_json(&Self::path_key(cache, hash_part), "path record").await
    }

    /// Whether a path is published.
    pub async fn has_path(&self, cache: &str, hash_part: &str) -> Result<bool> {
        self.exists(&Self::path_key(cache, hash_part), "path record").await
    }

    /// Takes a path out of a cache.
    pub async fn delete_path(&self, cache: &str, hash_part: &str) -> Result<()> {
        self.delete(&Self::path_key(cache, hash_part), "path record").await?;
        self.delete(&Self::access_key(cache, hash_part), "access record").await
    }

    fn access_key(cache: &str, hash_part: &str) -> Path {
        Path::from(format!("caches/{cache}/access/{hash_part}"))
    }

    /// Records that a path was accessed now.
    pub async fn put_access(&self, cache: &str, hash_part: &str) -> Result<()> {
        self.store
            .put(&Self::access_key(cache, hash_part), PutPayload::from(self.clock.now_secs().to_string().into_bytes()))
            .await
            .map_err(|e| storage_error(e, "access record"))?;
        Ok(())
    }

    /// When a path was last recorded as accessed, in seconds since the epoch.
    pub async fn get_access(&self, cache: &str, hash_part: &str) -> Result<Option<u64>> {
        let bytes = self.get_bytes(&Self::access_key(cache, hash_part), "access record").await?;
        Ok(bytes.and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse().ok()))
    }

    /// Every object under `prefix`, with its metadata.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(&Path::from(prefix)))
            .try_collect()
            .await
            .map_err(|e| storage_error(e, "listing"))
    }

    /// An object by its key, as listed; `None` if it is gone.
    pub async fn get_object(&self, key: &Path) -> Result<Option<Bytes>> {
        self.get_bytes(key, "object").await
    }

    /// Deletes an object by its key, as listed.
    pub async fn delete_object(&self, key: &Path) -> Result<()> {
        self.delete(key, "object").await
    }

    /// Which of the paths named by `hash_parts` are published in `cache`, in order.
    pub async fn paths_present(&self, cache: &str, hash_parts: Vec<String>, parallelism: usize) -> Result<Vec<bool>> {
        futures::stream::iter(hash_parts)
            .map(|hash_part| {
                let storage = self.clone();
                let cache = cache.to_string();
                async move { storage.has_path(&cache, &hash_part).await }
            })
            .buffered(parallelism)
            .try_collect()
            .await
    }

    /// Publishes a path; its manifest and chunks must be stored already. It also becomes the
    /// newest path of its name (see [`Storage::newest_of_name`]).
    pub async fn put_path(&self, cache: &str, record: &PathRecord) -> Result<()> {
        let hash_part = record.store_path.get(..32).ok_or_else(|| Error::internal("short store path"))?;
        self.put_json(&Self::path_key(cache, hash_part), record, "path record").await?;
        // Only a hint for the next push of this name: failing to write it loses nothing.
        if let Ok(path) = flywheel_core::nix::StorePath::from_base_name(&record.store_path) {
            let key = Self::name_key(cache, &path.unversioned_name());
            if let Err(err) = self.store.put(&key, PutPayload::from(hash_part.to_string().into_bytes())).await {
                tracing::warn!(store_path = %record.store_path, "recording the newest path of its name: {err}");
            }
        }
        Ok(())
    }

    /// The hash part of the path last published in `cache` under `unversioned_name` (see
    /// [`flywheel_core::nix::StorePath::unversioned_name`]); it may have been deleted since.
    pub async fn newest_of_name(&self, cache: &str, unversioned_name: &str) -> Result<Option<String>> {
        let bytes = self.get_bytes(&Self::name_key(cache, unversioned_name), "name record").await?;
        Ok(bytes.and_then(|b| String::from_utf8(b.to_vec()).ok()).filter(|h| flywheel_core::nix::store_path::parse_hash_part(h).is_ok()))
    }

    /// Stores one of the small files a cache keeps beside its paths.
    pub async fn put_cache_file(&self, cache: &str, file: CacheFile<'_>, bytes: Bytes) -> Result<()> {
        self.store.put(&file.key(cache), PutPayload::from(bytes)).await.map_err(|e| storage_error(e, file.what()))?;
        Ok(())
    }

    /// One of the small files a cache keeps beside its paths.
    pub async fn get_cache_file(&self, cache: &str, file: CacheFile<'_>) -> Result<Option<Bytes>> {
        self.get_bytes(&file.key(cache), file.what()).await
    }

    /// Records that the uploader of the path `hash_part` named its NAR `nar/{file}`; written
    /// before the path record that names the file.
    pub async fn put_nar_file(&self, cache: &str, file: &str, hash_part: &str) -> Result<()> {
        self.put_cache_file(cache, CacheFile::NarFile(file), Bytes::from(hash_part.to_string())).await
    }

    /// The hash part of the path whose uploader named its NAR `nar/{file}`; the path may be
    /// gone since, or published again under another name.
    pub async fn nar_file_path(&self, cache: &str, file: &str) -> Result<Option<String>> {
        let bytes = self.get_cache_file(cache, CacheFile::NarFile(file)).await?;
        Ok(bytes.and_then(|b| String::from_utf8(b.to_vec()).ok()).filter(|h| flywheel_core::nix::store_path::parse_hash_part(h).is_ok()))
    }

    /// Notes that a NAR arrived through a Nix PUT, so its narinfo may publish it.
    pub async fn put_pending(&self, cache: &str, nar_hash: &Sha256Hash) -> Result<()> {
        self.store
            .put(&Self::pending_key(cache, nar_hash), PutPayload::from(self.clock.now_secs().to_string().into_bytes()))
            .await
            .map_err(|e| storage_error(e, "pending upload"))?;
        Ok(())
    }

    /// Whether a NAR arrived through a Nix PUT to this cache.
    pub async fn has_pending(&self, cache: &str, nar_hash: &Sha256Hash) -> Result<bool> {
        self.exists(&Self::pending_key(cache, nar_hash), "pending upload").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Uploads that compress slowly (a high zstd level, a slow disk) on every write thread do
    /// not hold up reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_do_not_wait_behind_slow_chunk_writes() {
        let storage = Storage::new(Arc::new(object_store::memory::InMemory::new())).with_inline_io(2).unwrap();
        let data = b"read while uploads compress".repeat(10);
        let hash = ChunkHash::of(&data);
        storage.put_chunk(&hash, Bytes::from(flywheel_core::chunk::compress(&data, 3).unwrap())).await.unwrap();
        let (started, mut compressing) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(std::sync::Barrier::new(3));
        let mut uploads = Vec::new();
        for i in 0..2u8 {
            let (storage, started, release) = (storage.clone(), started.clone(), release.clone());
            uploads.push(tokio::spawn(async move {
                let make_frame = move || {
                    let _ = started.send(());
                    release.wait();
                    Ok(Bytes::from(flywheel_core::chunk::compress(&[i; 100], 3)?))
                };
                storage.put_chunk_unless_fresh(ChunkHash::of(&[i; 100]), 0, make_frame).await
            }));
        }
        // Both write threads are busy compressing.
        for _ in 0..2 {
            compressing.recv().await.unwrap();
        }
        let read = tokio::time::timeout(Duration::from_secs(30), storage.get_chunks_versioned(vec![hash]))
            .await
            .expect("a read waited behind the uploads' compression");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].as_ref().unwrap().0, Bytes::from(flywheel_core::chunk::compress(&data, 3).unwrap()));
        let versions = tokio::time::timeout(Duration::from_secs(30), storage.chunk_versions(vec![hash])).await.expect("a lookup waited");
        assert!(versions.unwrap()[0].is_some());
        tokio::task::spawn_blocking(move || release.wait()).await.unwrap();
        for upload in uploads {
            let (reuse, written) = upload.await.unwrap().unwrap();
            assert_eq!(reuse, Reuse::Missing);
            assert!(written.is_some());
        }
    }
}
