//! Chunks from the local cache when present, from the server otherwise.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::{Error, ErrorKind, Result};
use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

use crate::api::{ApiClient, ClientConfig};
use crate::cache::{ChunkCache, LocalCacheConfig};
use crate::metrics::FetchMetrics;
use crate::source::ChunkSource;

/// Up to this many missing chunks are fetched with one `GET` each (in parallel); more go in
/// `POST chunks` batches. Single GETs are what a small read needs, and they show up one per chunk
/// in the server's request log.
const SINGLE_GET_LIMIT: usize = 2;

/// Chunks per `POST chunks` request: about 1 MiB at the average chunk size, so one request
/// never needs long, and several run at once.
const BATCH: usize = 16;

/// Frame bytes fetched but not yet written to the cache, at most, in units of
/// [`PENDING_UNIT`]: on a slow disk the fetches wait for the writes instead of piling
/// frames up in memory.
const PENDING_WRITE_UNITS: u32 = 16 * 1024;
const PENDING_UNIT: usize = 4096;

/// A fetch's result, cloneable so concurrent waiters can share it.
type SharedResult = Result<Arc<[u8]>, (ErrorKind, String)>;
type InFlight = Shared<BoxFuture<'static, SharedResult>>;

/// The background write of fetched chunks into the cache.
type Caching = tokio::task::JoinHandle<()>;

/// Chunks from the cache, or else from the server (then cached). Cheap to clone.
#[derive(Clone)]
pub struct ChunkStore {
    source: Arc<dyn ChunkSource>,
    cache: Arc<ChunkCache>,
    in_flight: Arc<Mutex<HashMap<ChunkHash, InFlight>>>,
    pending_writes: Arc<tokio::sync::Semaphore>,
    metrics: Arc<FetchMetrics>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore").field("cache", &self.cache).finish()
    }
}

impl ChunkStore {
    /// Combines a source of chunks (the server's client, or memory in tests) and a cache.
    pub fn new(source: Arc<dyn ChunkSource>, cache: Arc<ChunkCache>) -> Self {
        ChunkStore {
            source,
            cache,
            in_flight: Arc::default(),
            pending_writes: Arc::new(tokio::sync::Semaphore::new(PENDING_WRITE_UNITS as usize)),
            metrics: Arc::default(),
        }
    }

    /// Opens the local cache in `cache` (or joins the process that owns it) and builds the
    /// client of `server`: what every runner daemon reading chunks starts with.
    pub fn open(server: ClientConfig, cache: &LocalCacheConfig) -> Result<Self> {
        let cache = Arc::new(ChunkCache::open(cache)?);
        Ok(ChunkStore::new(Arc::new(ApiClient::new(server)?), cache))
    }

    /// Where chunks the cache lacks come from: the server.
    pub fn source(&self) -> &dyn ChunkSource {
        self.source.as_ref()
    }

    /// The local cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// What this store fetched from the server.
    pub fn metrics(&self) -> &FetchMetrics {
        &self.metrics
    }

    /// The verified contents of `chunks`, in order, all listed by the manifest of the path
    /// whose hash part is `path` (the server serves a chunk only as part of a path).
    ///
    /// Chunks missing locally are fetched from the server, in parallel, and cached; a chunk
    /// another caller is already fetching is waited for instead of fetched twice.
    pub async fn get_many(&self, path: &str, chunks: &[ChunkRef]) -> Result<Vec<Arc<[u8]>>> {
        let found = self.cached(chunks).await;
        self.get_rest(path, chunks, found).await
    }

    /// Completes a lookup the caller made itself ([`ChunkStore::cached_here`]): `found` holds
    /// what the cache had, in the order of `chunks`; the rest is fetched as
    /// [`ChunkStore::get_many`] fetches it.
    pub async fn get_rest(&self, path: &str, chunks: &[ChunkRef], found: Vec<Option<Arc<[u8]>>>) -> Result<Vec<Arc<[u8]>>> {
        let mut out = found;
        if out.len() != chunks.len() {
            return Err(Error::internal("a cache lookup answered for other chunks than asked"));
        }
        let missing: Vec<usize> = (0..chunks.len()).filter(|&i| out[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        // Claim the chunks nobody is fetching; wait for the others.
        let mut waits: Vec<(usize, InFlight)> = Vec::new();
        let mut claimed: Vec<ChunkRef> = Vec::new();
        {
            let mut in_flight = self.in_flight.lock();
            let mut claimed_index: HashMap<ChunkHash, usize> = HashMap::new();
            let mut pending: Vec<(usize, ChunkHash)> = Vec::new();
            for &i in &missing {
                let chunk = chunks[i];
                if let Some(fetch) = in_flight.get(&chunk.hash) {
                    waits.push((i, fetch.clone()));
                } else {
                    if let std::collections::hash_map::Entry::Vacant(slot) = claimed_index.entry(chunk.hash) {
                        slot.insert(claimed.len());
                        claimed.push(chunk);
                    }
                    pending.push((i, chunk.hash));
                }
            }
            if !claimed.is_empty() {
                let store = self.clone();
                let hashes: Vec<ChunkHash> = claimed.iter().map(|c| c.hash).collect();
                let fetch = self.clone().fetch_claimed(Arc::from(path), claimed.clone());
                // The fetch itself clears its in-flight entries, so they go even when the
                // claimant stops waiting (a timed-out read) and another waiter finishes it.
                let batch = async move {
                    let (result, caching) = match fetch.await {
                        Ok((chunks, caching)) => (Ok(chunks), caching),
                        Err(err) => (Err(err), None),
                    };
                    let forget = move || {
                        let mut in_flight = store.in_flight.lock();
                        for hash in &hashes {
                            in_flight.remove(hash);
                        }
                    };
                    // The entries stay until the chunks are in the cache: a caller that comes
                    // in between takes the finished result instead of fetching again.
                    match caching {
                        Some(caching) => {
                            tokio::spawn(async move {
                                let _ = caching.await;
                                forget();
                            });
                        }
                        None => forget(),
                    }
                    result
                }
                .boxed()
                .shared();
                for (n, chunk) in claimed.iter().enumerate() {
                    let one: InFlight = batch
                        .clone()
                        .map(move |all| all.map(|v: Vec<Arc<[u8]>>| v[n].clone()))
                        .boxed()
                        .shared();
                    in_flight.insert(chunk.hash, one);
                }
                for (i, hash) in pending {
                    if let Some(fetch) = in_flight.get(&hash) {
                        waits.push((i, fetch.clone()));
                    }
                }
            }
        }
        let results = futures::future::join_all(waits.into_iter().map(|(i, f)| f.map(move |r| (i, r)))).await;
        for (i, result) in results {
            out[i] = Some(result.map_err(|(kind, message)| Error::new(kind, message))?);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Looks chunks up in the local cache on the calling thread, which may block on the disk
    /// (or on the process owning the cache): for threads that are allowed to, such as the
    /// FUSE request threads, which then answer a cached read without handing it to the
    /// runtime and its blocking pool (two thread switches each way).
    pub fn cached_here(&self, chunks: &[ChunkRef]) -> Vec<Option<Arc<[u8]>>> {
        chunks.iter().map(|chunk| self.cache.get(chunk).map(Arc::<[u8]>::from)).collect()
    }

    /// Looks chunks up in the local cache. Reading and verifying a cached chunk is disk I/O and
    /// decompression, so it runs on the blocking pool, split over a few tasks when there are many
    /// (readahead asks for dozens at once): the cores decompress in parallel and the runtime's
    /// workers stay free.
    pub async fn cached(&self, chunks: &[ChunkRef]) -> Vec<Option<Arc<[u8]>>> {
        const PER_TASK: usize = 8;
        let tasks = chunks.chunks(PER_TASK).map(|group| {
            let cache = self.cache.clone();
            let group = group.to_vec();
            tokio::task::spawn_blocking(move || {
                group.iter().map(|chunk| cache.get(chunk).map(Arc::<[u8]>::from)).collect::<Vec<_>>()
            })
        });
        let groups = futures::future::join_all(tasks).await;
        let mut out = Vec::with_capacity(chunks.len());
        for (group, chunk_group) in groups.into_iter().zip(chunks.chunks(PER_TASK)) {
            match group {
                Ok(found) => out.extend(found),
                // A panicked lookup counts as a miss: the chunk is fetched again.
                Err(_) => out.extend(chunk_group.iter().map(|_| None)),
            }
        }
        out
    }

    /// Fetches claimed chunks. A fetch by another caller may have finished (and cached its
    /// chunks) between the caller's cache lookup and its claim; those are taken from the cache
    /// instead of being fetched twice.
    async fn fetch_claimed(self, path: Arc<str>, chunks: Vec<ChunkRef>) -> Result<(Vec<Arc<[u8]>>, Option<Caching>), (ErrorKind, String)> {
        let cache = self.cache.clone();
        // `contains` first: it costs no verification and counts nothing, and it is false for
        // almost every claimed chunk. In the owning process it reads sled's index in memory, so
        // it runs here, and only the rare chunk it finds is read on the blocking pool.
        let present: Vec<ChunkRef> = if cache.is_owner() {
            chunks.iter().filter(|c| cache.contains(&c.hash)).copied().collect()
        } else {
            chunks.clone()
        };
        let found: Vec<Option<Arc<[u8]>>> = if present.is_empty() {
            vec![None; chunks.len()]
        } else {
            let lookup = chunks.clone();
            tokio::task::spawn_blocking(move || {
                lookup
                    .iter()
                    .map(|c| if present.contains(c) && cache.contains(&c.hash) { cache.get(c).map(Arc::<[u8]>::from) } else { None })
                    .collect()
            })
            .await
            .unwrap_or_else(|_| vec![None; chunks.len()])
        };
        let missing: Vec<ChunkRef> = chunks.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(c, _)| *c).collect();
        if missing.len() == chunks.len() {
            return self.fetch_from_server(path, chunks).await;
        }
        let (fetched, caching) = if missing.is_empty() { (Vec::new(), None) } else { self.fetch_from_server(path, missing).await? };
        let mut fetched = fetched.into_iter();
        let all = found
            .into_iter()
            .map(|f| f.or_else(|| fetched.next()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| (ErrorKind::Internal, "the server answered fewer chunks than asked for".to_string()))?;
        Ok((all, caching))
    }

    /// Fetches chunks from the server, verifies and caches them.
    ///
    /// The chunks are returned at once; they are written to the cache in the background, by the
    /// returned task, so that a cold NAR stream does not wait for the disk.
    async fn fetch_from_server(self, path: Arc<str>, chunks: Vec<ChunkRef>) -> Result<(Vec<Arc<[u8]>>, Option<Caching>), (ErrorKind, String)> {
        let metrics = self.metrics.clone();
        let timed = |request: BoxFuture<'static, Result<Vec<crate::FetchedChunk>>>| {
            let metrics = metrics.clone();
            async move {
                let started = std::time::Instant::now();
                let result = request.await;
                metrics.fetch_seconds.observe(started.elapsed());
                match &result {
                    Ok(chunks) => {
                        metrics.chunks_fetched.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                        let bytes: usize = chunks.iter().map(|c| c.frame.len()).sum();
                        metrics.bytes_fetched.fetch_add(bytes as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        metrics.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                result
            }
        };
        let requests: Vec<_> = if chunks.len() <= SINGLE_GET_LIMIT {
            chunks
                .iter()
                .map(|c| {
                    let (source, chunk, path) = (self.source.clone(), *c, path.clone());
                    timed(async move { source.chunk(&path, chunk).await.map(|f| vec![f]) }.boxed())
                })
                .collect()
        } else {
            chunks
                .chunks(BATCH)
                .map(|batch| {
                    let (source, batch, path) = (self.source.clone(), batch.to_vec(), path.clone());
                    timed(async move { source.chunks(&path, &batch).await }.boxed())
                })
                .collect()
        };
        let fetched: Result<Vec<crate::FetchedChunk>> =
            futures::future::try_join_all(requests).await.map(|parts| parts.into_iter().flatten().collect());
        let fetched = fetched.map_err(|e| (e.kind(), e.to_string()))?;
        let cache = self.cache.clone();
        let mut data = Vec::with_capacity(fetched.len());
        let mut frames = Vec::with_capacity(fetched.len());
        for (f, c) in fetched.into_iter().zip(&chunks) {
            data.push(f.data);
            frames.push((c.hash, f.frame));
        }
        let bytes: usize = frames.iter().map(|(_, frame)| frame.len()).sum();
        let units = (bytes.div_ceil(PENDING_UNIT) as u32).clamp(1, PENDING_WRITE_UNITS);
        // The semaphore is never closed, so this waits and never fails.
        let permit = self.pending_writes.clone().acquire_many_owned(units).await.ok();
        // sled writes can block on I/O; keep them off the async workers.
        let caching = tokio::task::spawn_blocking(move || {
            let frames: Vec<(ChunkHash, &[u8])> = frames.iter().map(|(hash, frame)| (*hash, frame.as_slice())).collect();
            cache.insert_many(&frames);
            drop(permit);
        });
        Ok((data, Some(caching)))
    }
}
