//! What every request handler shares.

use std::sync::Arc;

use anyhow::Context;
use axum::response::IntoResponse;

use crate::auth::TokenAuthority;
use crate::config::ServerConfig;
use crate::chunk_reader::ChunkReader;
use crate::ingest::{IngestSettings, Ingester};
use crate::metrics::Metrics;
use crate::narinfo_cache::NarinfoCache;
use crate::preflight::VerifiedChunks;
use crate::storage::{CacheRecord, PathRecord, ReuseWindow, Storage};
use crate::tfstate::StateStore;
use bytes::Bytes;
use flywheel_core::manifest::Manifest;
use flywheel_core::nix::Sha256Hash;

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<ServerConfig>,
    /// The object store.
    pub storage: Storage,
    /// Token verification.
    pub tokens: TokenAuthority,
    /// NAR ingestion.
    pub ingester: Ingester,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Chunk frames verified lately: for the check before a NAR is sent, and so that a frame
    /// read again is checked by its digest rather than decompressed.
    pub verified: Arc<VerifiedChunks>,
    /// Frames the chunk API sent lately (`hot-chunk-bytes`).
    pub hot_chunks: Arc<crate::hot_chunks::HotChunks>,
    /// Chunk reads in flight against storage, server-wide (`chunk-parallelism`): one big NAR
    /// gets all of them, many streams at once share them, so the object store sees a bounded
    /// queue however many clients download. On local storage one permit covers a batch of
    /// reads (the storage I/O threads bound those reads in any case).
    pub chunk_reads: Arc<tokio::sync::Semaphore>,
    /// When each path's access was last recorded by this process.
    recorded_access: Arc<parking_lot::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>>,
    /// Cache settings read lately, by name: every request needs them, and reading them from
    /// the object store each time doubled the cost of a narinfo.
    cache_records: Arc<parking_lot::Mutex<CacheRecords>>,
    /// Chunk lists of recent `missing-chunks` questions, for the commits that follow them.
    chunk_queries: Arc<parking_lot::Mutex<ChunkQueries>>,
    /// Parsed manifests, shared by the requests that need them.
    manifests: Arc<ManifestCache>,
    /// Narinfos (and 404s) answered lately; see [`crate::narinfo_cache`] for how stale they
    /// may be.
    pub narinfos: Arc<NarinfoCache>,
    /// OpenTofu/Terraform states, on the same object store.
    pub tfstates: StateStore,
    /// The Bazel remote cache, on the same chunks.
    pub bazel: crate::bazel::BazelStore,
}

/// Bytes (approximate, in memory) of parsed manifests kept between requests.
pub const MANIFEST_CACHE_BYTES: usize = 64 << 20;

/// Manifests parsed at once: parsing takes memory in proportion to the manifest (a path of
/// 100,000 files has a manifest of several MB), so distinct manifests wait their turn.
const MANIFEST_PARSES: usize = 2;

/// Threads that read batches of chunks from a store that works in the calling thread: a few
/// more than the two cores, so that a read waiting on the disk does not hold up the others.
const INLINE_IO_THREADS: usize = 4;

/// Parsed manifests by NAR hash. Manifests never change once stored (they are named by the
/// NAR's hash), so an entry never goes stale; it is only evicted, least recently used first,
/// to stay within [`MANIFEST_CACHE_BYTES`] (or to the one last loaded, when it alone is
/// larger). Loads are single-flight: the requests that want a manifest being loaded wait for
/// that load instead of parsing it again.
struct ManifestCache {
    kept: parking_lot::Mutex<KeptManifests>,
    /// Jobs for the threads that parse manifests and render listings.
    work: parking_lot::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
    loading: parking_lot::Mutex<std::collections::HashMap<Sha256Hash, Arc<tokio::sync::OnceCell<Arc<CachedManifest>>>>>,
    parses: tokio::sync::Semaphore,
}

struct KeptManifests {
    by_hash: lru::LruCache<Sha256Hash, Arc<CachedManifest>>,
    bytes: usize,
}

/// A parsed manifest with its JSON as stored, and its `.ls` listing once a request asked for
/// it: responses share these instead of each serializing the manifest again.
struct CachedManifest {
    manifest: Arc<Manifest>,
    /// Approximate bytes of the manifest, of its JSON and of its listing.
    bytes: usize,
    json: Bytes,
    listing: tokio::sync::OnceCell<Bytes>,
    /// `json` as one zstd frame, once a request asked for it compressed: a fleet of runners
    /// looking the path up at once would each compress megabytes again.
    json_zstd: tokio::sync::OnceCell<Bytes>,
}

impl ManifestCache {
    fn new() -> Self {
        // A few long-lived threads rather than the blocking pool: the allocator keeps an arena
        // per thread, and a tree of many MB built on a different pool thread each time would
        // leave the memory freed by the last one in another arena, unused.
        let (work, jobs) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let jobs = Arc::new(parking_lot::Mutex::new(jobs));
        for n in 0..MANIFEST_PARSES {
            let jobs = jobs.clone();
            let spawned = std::thread::Builder::new().name(format!("manifest-{n}")).spawn(move || loop {
                let job = jobs.lock().recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "could not start a manifest thread");
            }
        }
        ManifestCache {
            work: parking_lot::Mutex::new(work),
            kept: parking_lot::Mutex::new(KeptManifests { by_hash: lru::LruCache::unbounded(), bytes: 0 }),
            loading: Default::default(),
            parses: tokio::sync::Semaphore::new(MANIFEST_PARSES),
        }
    }

    async fn get(&self, storage: &Storage, path: &PathRecord) -> flywheel_core::Result<Arc<CachedManifest>> {
        let key = path.nar_hash;
        if let Some(hit) = self.kept.lock().by_hash.get(&key) {
            return Ok(hit.clone());
        }
        let cell = self.loading.lock().entry(key).or_default().clone();
        let loaded = cell.get_or_try_init(|| self.load(storage, path)).await.cloned();
        // The load is over (or failed, and each waiter tries again on its own): later
        // requests find the manifest kept, or start afresh.
        let mut loading = self.loading.lock();
        if loading.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            loading.remove(&key);
        }
        loaded
    }

    /// Runs `job` on one of the manifest threads.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> flywheel_core::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.work.lock().send(Box::new(move || {
            let _ = tx.send(job());
        }));
        if sent.is_err() {
            return Err(flywheel_core::Error::internal("the manifest threads are gone"));
        }
        rx.await.map_err(|_| flywheel_core::Error::internal("a manifest job failed"))
    }

    async fn load(&self, storage: &Storage, path: &PathRecord) -> flywheel_core::Result<Arc<CachedManifest>> {
        let key = path.nar_hash;
        // Kept by a load that ended between the look-up and joining the load.
        if let Some(hit) = self.kept.lock().by_hash.get(&key) {
            return Ok(hit.clone());
        }
        let _permit = self.parses.acquire().await.map_err(|_| flywheel_core::Error::internal("manifest cache closed"))?;
        let json = storage
            .get_manifest_json(&key)
            .await?
            .ok_or_else(|| flywheel_core::Error::corrupt(format!("manifest of {} is missing", path.store_path)))?;
        // Parsing a manifest of many MB takes a while: keep it off the request workers.
        let parse_json = json.clone();
        let manifest = self
            .run(move || {
                serde_json::from_slice::<Manifest>(&parse_json)
                    .map_err(|e| flywheel_core::Error::corrupt(format!("stored manifest of {key} does not parse: {e}")))
            })
            .await??;
        // The stored JSON is what `GET manifest` sends, kept as read; the `.ls` listing, once
        // made, takes about as much again.
        // The compressed JSON, once made, about a third of it.
        let bytes = manifest.approx_heap_bytes() + json.len() * 2 + json.len() / 3;
        let cached = Arc::new(CachedManifest {
            manifest: Arc::new(manifest),
            bytes,
            json,
            listing: Default::default(),
            json_zstd: Default::default(),
        });
        // Least recently used first out, down to the budget; a manifest larger than the whole
        // budget stays alone until the next one comes, so the requests that follow it (a
        // fleet of runners pulling one path) still share it.
        let mut kept = self.kept.lock();
        if let Some(old) = kept.by_hash.put(key, cached.clone()) {
            kept.bytes -= old.bytes;
        }
        kept.bytes += bytes;
        while kept.bytes > MANIFEST_CACHE_BYTES && kept.by_hash.len() > 1 {
            match kept.by_hash.pop_lru() {
                Some((_, old)) => kept.bytes -= old.bytes,
                None => break,
            }
        }
        drop(kept);
        Ok(cached)
    }
}

/// Remembered `missing-chunks` questions, least recently used first, bounded in chunks.
struct ChunkQueries {
    by_name: lru::LruCache<String, ChunkQuery>,
    chunks: usize,
}

/// A `missing-chunks` question remembered for the commit that follows it.
#[derive(Clone)]
pub struct ChunkQuery {
    /// The cache it was asked about.
    pub cache: String,
    /// The chunks asked about, in order.
    pub chunks: Arc<Vec<flywheel_core::chunk::ChunkHash>>,
    at: std::time::Instant,
}

/// How long a `missing-chunks` question is remembered: enough for the uploads between it and
/// the commit.
const CHUNK_QUERY_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Chunks of all remembered questions together (32 bytes each): 32 MiB.
const CHUNK_QUERIES_MAX_CHUNKS: usize = 1 << 20;

/// Remembered questions, at most, whatever their lengths.
const CHUNK_QUERIES_MAX: usize = 65_536;

/// Cache settings by name, with when they were read.
type CacheRecords = std::collections::HashMap<String, (std::time::Instant, Option<CacheRecord>)>;

/// How long a cache's settings read from storage are used before being read again: the delay
/// after which a change made through another replica is seen here.
pub const CACHE_RECORD_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl AppState {
    /// Records that a path was read, for retention: at most once per `access-record-interval`
    /// per path and process, so reads cost a write only rarely. A failed write is logged, not
    /// returned: serving the read matters more.
    pub async fn record_access(&self, cache: &str, hash_part: &str) {
        let interval = std::time::Duration::from_secs(self.config.gc.access_record_interval);
        let key = (cache.to_string(), hash_part.to_string());
        {
            let mut recorded = self.recorded_access.lock();
            if recorded.get(&key).is_some_and(|at| at.elapsed() < interval) {
                return;
            }
            // Bounded: forget everything rather than grow without end.
            if recorded.len() > 1_000_000 {
                recorded.clear();
            }
            recorded.insert(key, std::time::Instant::now());
        }
        if let Err(err) = self.storage.put_access(cache, hash_part).await {
            tracing::warn!(cache, hash_part, error = %err, "could not record an access");
        }
    }

    /// The response to `GET manifest/{hash}`: `path` as JSON, with the JSON of its manifest as
    /// stored, shared by the responses (one evicted meanwhile is serialized again); with
    /// `compressed`, in [`MANIFEST_ENCODING`](flywheel_core::api::v1::chunks::MANIFEST_ENCODING),
    /// the manifest's frame made once and shared likewise.
    pub async fn manifest_response(
        &self,
        path: flywheel_core::api::v1::chunks::PathManifest,
        compressed: bool,
    ) -> flywheel_core::Result<axum::response::Response> {
        use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE, VARY};
        use flywheel_core::api::v1::chunks::{compress_manifest, compress_manifest_piece, MANIFEST_ENCODING};
        let kept = self.manifests.kept.lock().by_hash.get(&path.manifest.nar_hash).cloned();
        let json = match &kept {
            Some(cached) => cached.json.clone(),
            None => serde_json::to_vec(&*path.manifest)
                .map(Bytes::from)
                .map_err(|e| flywheel_core::Error::internal(format!("serializing a manifest: {e}")))?,
        };
        let pieces = path.json_pieces(json);
        if !compressed {
            let body = axum::body::Body::from_stream(futures::stream::iter(pieces.map(Ok::<_, std::convert::Infallible>)));
            return Ok(([(CONTENT_TYPE, "application/json"), (VARY, "accept-encoding")], body).into_response());
        }
        // Megabytes of JSON for a large path: compressed off the runtime's workers.
        let compress = |job: Box<dyn FnOnce() -> flywheel_core::Result<Vec<u8>> + Send>| async move {
            tokio::task::spawn_blocking(job)
                .await
                .map_err(|e| flywheel_core::Error::internal(format!("compressing a manifest: {e}")))?
                .map(Bytes::from)
        };
        let [head, manifest_json, tail] = pieces;
        let frames: Vec<Bytes> = match kept {
            Some(cached) => {
                let manifest_frame = cached
                    .json_zstd
                    .get_or_try_init(|| compress(Box::new(move || compress_manifest_piece(&manifest_json))))
                    .await?
                    .clone();
                // The path's own fields are small (its references, some KB at most): inline.
                vec![Bytes::from(compress_manifest_piece(&head)?), manifest_frame, Bytes::from(compress_manifest_piece(&tail)?)]
            }
            None => vec![compress(Box::new(move || compress_manifest(&[head, manifest_json, tail]))).await?],
        };
        let headers = [(CONTENT_TYPE, "application/json"), (CONTENT_ENCODING, MANIFEST_ENCODING), (VARY, "accept-encoding")];
        let body = axum::body::Body::from_stream(futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>)));
        Ok((headers, body).into_response())
    }

    /// Opens storage and sets everything up from a config.
    pub fn new(config: ServerConfig) -> anyhow::Result<Self> {
        config.check()?;
        let mut storage = Storage::new(config.open_store()?);
        if config.storage.works_in_calling_thread() {
            storage = storage.with_inline_io(INLINE_IO_THREADS).context("starting the storage I/O threads")?;
        }
        let tokens = TokenAuthority::from_base64(&config.token_hs256_secret_base64)?;
        let metrics = Arc::new(Metrics::default());
        let settings = IngestSettings { params: config.chunking, zstd_level: config.zstd_level, parallelism: config.chunk_parallelism };
        let ingester = Ingester::new(
            storage.clone(),
            settings,
            storage.reuse_window(config.gc.grace_period),
            metrics.clone(),
        )
        .with_reader_limit(config.limits.max_uploads, std::time::Duration::from_secs(config.limits.upload_queue_timeout));
        let verified = Arc::new(VerifiedChunks::default());
        let ingester = ingester.with_verified_chunks(verified.clone());
        let chunk_reads = Arc::new(tokio::sync::Semaphore::new(config.chunk_parallelism));
        let config_tfstate = config.tfstate.clone();
        let bazel = crate::bazel::BazelStore::new(
            storage.clone(),
            ingester.clone(),
            ChunkReader {
                storage: storage.clone(),
                parallelism: config.chunk_parallelism,
                reads: chunk_reads.clone(),
                metrics: metrics.clone(),
                verified: verified.clone(),
            },
            verified.clone(),
            &config,
        );
        let hot_chunks = Arc::new(crate::hot_chunks::HotChunks::new(usize::try_from(config.hot_chunk_bytes).unwrap_or(usize::MAX)));
        Ok(AppState {
            bazel,
            config: Arc::new(config),
            tokens,
            ingester,
            metrics,
            verified,
            hot_chunks,
            chunk_reads,
            recorded_access: Arc::default(),
            cache_records: Arc::default(),
            chunk_queries: Arc::new(parking_lot::Mutex::new(ChunkQueries { by_name: lru::LruCache::unbounded(), chunks: 0 })),
            manifests: Arc::new(ManifestCache::new()),
            narinfos: Arc::new(NarinfoCache::new(storage.clock().clone())),
            tfstates: StateStore::for_config(storage.clone(), &config_tfstate),
            storage,
        })
    }

    /// A reader of stored chunks within the server-wide bound on reads (`chunk-parallelism`).
    pub fn chunk_reader(&self) -> ChunkReader {
        ChunkReader {
            storage: self.storage.clone(),
            parallelism: self.config.chunk_parallelism,
            reads: self.chunk_reads.clone(),
            metrics: self.metrics.clone(),
            verified: self.verified.clone(),
        }
    }

    /// The manifest a published path needs, parsed once and shared (see `ManifestCache`);
    /// its absence is damage, not a miss.
    pub async fn manifest_of(&self, path: &PathRecord) -> flywheel_core::Result<Arc<Manifest>> {
        Ok(self.manifests.get(&self.storage, path).await?.manifest.clone())
    }

    /// The body of a path's `.ls` listing (Nix's format: `{"version":1,"root":...}`), made once
    /// per cached manifest and shared by the requests for it.
    pub async fn listing_of(&self, path: &PathRecord) -> flywheel_core::Result<Bytes> {
        let cached = self.manifests.get(&self.storage, path).await?;
        let listing = cached
            .listing
            .get_or_try_init(|| async {
                let manifest = cached.manifest.clone();
                // Rendering many MB takes a while: keep it off the request workers.
                self.manifests.run(move || Bytes::from(manifest.listing())).await
            })
            .await?;
        Ok(listing.clone())
    }

    /// A cache's settings, from memory if read within [`CACHE_RECORD_TTL`], else from storage.
    pub async fn cache_record(&self, cache: &str) -> flywheel_core::Result<Option<CacheRecord>> {
        if let Some((at, record)) = self.cache_records.lock().get(cache) {
            if at.elapsed() < CACHE_RECORD_TTL {
                return Ok(record.clone());
            }
        }
        let record = self.storage.get_cache(cache).await?;
        let mut records = self.cache_records.lock();
        // Names come from requests: bound the map rather than let it grow.
        if records.len() > 10_000 {
            records.clear();
        }
        records.insert(cache.to_string(), (std::time::Instant::now(), record.clone()));
        Ok(record)
    }

    /// How young a stored chunk must be for an upload to count on it.
    pub fn reuse_window(&self) -> ReuseWindow {
        self.storage.reuse_window(self.config.gc.grace_period)
    }

    /// Remembers the chunk list of a `missing-chunks` question; returns its name, or `None`
    /// for a list too long to keep (the commit then lists the chunks itself).
    pub fn remember_chunk_query(&self, cache: &str, chunks: Vec<flywheel_core::chunk::ChunkHash>) -> Option<String> {
        // An empty list names nothing a commit could use, and would let the remembered
        // questions grow without bound in count while staying at zero chunks.
        if chunks.is_empty() || chunks.len() > CHUNK_QUERIES_MAX_CHUNKS / 16 {
            return None;
        }
        // Unguessable, so that a question's list serves only the client that asked it.
        let mut bytes = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let count = chunks.len();
        let query = ChunkQuery { cache: cache.to_string(), chunks: Arc::new(chunks), at: std::time::Instant::now() };
        let mut queries = self.chunk_queries.lock();
        queries.chunks += count;
        queries.by_name.put(name.clone(), query);
        while queries.chunks > CHUNK_QUERIES_MAX_CHUNKS || queries.by_name.len() > CHUNK_QUERIES_MAX {
            match queries.by_name.pop_lru() {
                Some((_, old)) => queries.chunks -= old.chunks.len(),
                None => break,
            }
        }
        Some(name)
    }

    /// The chunk list of a remembered question about `cache`, if it is known and fresh.
    pub fn chunk_query(&self, cache: &str, name: &str) -> Option<ChunkQuery> {
        let mut queries = self.chunk_queries.lock();
        let query = queries.by_name.get(name)?.clone();
        if query.cache != cache {
            return None;
        }
        if query.at.elapsed() > CHUNK_QUERY_TTL {
            if let Some(old) = queries.by_name.pop(name) {
                queries.chunks -= old.chunks.len();
            }
            return None;
        }
        Some(query)
    }

    /// Drops a cache's remembered settings after this process changed them.
    pub fn forget_cache_record(&self, cache: &str) {
        self.cache_records.lock().remove(cache);
        // Narinfos are signed with the cache's key and name its store dir.
        self.narinfos.forget_cache(cache);
    }

    /// Publishes a path: its record is stored, and the next narinfo request on this replica
    /// sees it (a 404 remembered for it is dropped).
    pub async fn publish_path(&self, cache: &str, record: &PathRecord) -> flywheel_core::Result<()> {
        self.storage.put_path(cache, record).await?;
        self.narinfos.forget(cache, record.store_path.get(..32).unwrap_or_default());
        Ok(())
    }

    /// Takes a path out of a cache; the next narinfo request on this replica answers 404.
    pub async fn delete_path(&self, cache: &str, hash_part: &str) -> flywheel_core::Result<()> {
        // Forgotten after the delete, whatever its outcome: a request that read the record
        // before it holds an older ticket, so what it read is not kept either.
        let deleted = self.storage.delete_path(cache, hash_part).await;
        self.narinfos.forget(cache, hash_part);
        deleted
    }
}

