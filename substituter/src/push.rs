//! `flywheel push`: uploads store paths, moving only the chunks the server lacks.
//!
//! Per path: the NAR is made from the local store's files and cut into chunks on the client
//! (hashing it too, so a path whose files no longer match the Nix database is refused); the
//! server is asked which chunks it lacks; the NAR is made again and only those chunks are
//! compressed and uploaded, several at once; then the path is committed. Memory stays bounded
//! whatever the NAR's size: only the chunk list is kept between the two passes.
//!
//! Paths go dependencies first, so the cache never holds a path whose references it lacks
//! because a push stopped half-way; a push that stops leaves its uploaded chunks on the
//! server, and the next push of the path sends only the rest. A cache that requires uploader
//! signatures has every path checked against its trusted keys before anything is sent.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flywheel_client::ApiClient;
use flywheel_core::api::v1::chunks::{ChunkDelta, CommitRequest};
use flywheel_core::chunk::{compress, ChunkHash, ChunkParams, Chunker, DEFAULT_ZSTD_LEVEL};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::nix::{Sha256Hash, StorePath, TrustedKeys};
use flywheel_core::{Error, ErrorKind, Result};
use futures::{StreamExt, TryStreamExt};
use sha2::Digest;

use crate::local_store::{LocalPathInfo, LocalStore};
use crate::retry::RetryPolicy;

/// How a push behaves.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Push the closure of the given paths (the default), or only the paths.
    pub closure: bool,
    /// Names of upstream keys (such as `cache.nixos.org-1`): paths signed by one are skipped,
    /// like `attic push` does, since they can be substituted from upstream.
    pub upstream_keys: Vec<String>,
    /// Chunk uploads in flight at once.
    pub jobs: usize,
    /// Paths processed at once (within one dependency level).
    pub path_jobs: usize,
    /// zstd level of uploaded chunks.
    pub zstd_level: i32,
    /// Chunk sizes; they must be the server's for chunks to deduplicate against its own.
    pub chunking: ChunkParams,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            closure: true,
            upstream_keys: vec!["cache.nixos.org-1".to_string()],
            jobs: 8,
            path_jobs: 4,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            chunking: ChunkParams::default(),
            progress: true,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Paths considered (the closure, or the paths given).
    pub considered: usize,
    /// Skipped because signed by an upstream key.
    pub skipped_upstream: usize,
    /// Already in the cache.
    pub already_cached: usize,
    /// Pushed and committed by this push, full store paths.
    pub pushed: Vec<String>,
    /// Total NAR bytes of the pushed paths.
    pub nar_bytes: u64,
    /// Chunks of the pushed paths.
    pub chunks: u64,
    /// Chunks uploaded (the rest were on the server already).
    pub chunks_uploaded: u64,
    /// Uncompressed bytes of the uploaded chunks.
    pub uploaded_bytes: u64,
    /// Bytes of the zstd frames sent for them.
    pub uploaded_frame_bytes: u64,
    /// Pushed paths committed as changes to an earlier version in the cache.
    pub pushed_as_changes: u64,
}

/// Pushes local store paths to one cache.
#[derive(Debug, Clone)]
pub struct Pusher {
    api: ApiClient,
    store: LocalStore,
    config: PushConfig,
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    chunks_uploaded: AtomicU64,
    uploaded_bytes: AtomicU64,
    uploaded_frame_bytes: AtomicU64,
    as_changes: AtomicU64,
}

impl Pusher {
    /// A pusher from `store` to the cache `api` talks to.
    pub fn new(api: ApiClient, store: LocalStore, config: PushConfig) -> Self {
        Pusher { api, store, config }
    }

    /// The local store paths are read from.
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// Pushes `paths` (store paths or symlinks to them) and, by default, their closure.
    ///
    /// Stops at the first dependency level where a path fails; paths committed before stay
    /// committed, and uploaded chunks stay on the server for the next attempt.
    pub async fn push(&self, paths: &[String]) -> Result<PushReport> {
        if paths.is_empty() {
            return Ok(PushReport::default());
        }
        let all = if self.config.closure { self.store.closure(paths).await? } else { paths.to_vec() };
        let infos = self.store.path_infos(&all).await?;
        let mut report = PushReport { considered: infos.len(), ..PushReport::default() };
        let infos: Vec<LocalPathInfo> = infos
            .into_iter()
            .filter(|info| {
                let upstream = info
                    .signatures
                    .iter()
                    .any(|sig| self.config.upstream_keys.iter().any(|key| sig.strip_prefix(key.as_str()).is_some_and(|r| r.starts_with(':'))));
                if upstream {
                    report.skipped_upstream += 1;
                }
                !upstream
            })
            .collect();
        let mut missing: HashSet<String> = HashSet::new();
        for batch in infos.chunks(1000) {
            let hashes: Vec<String> = batch.iter().map(|i| hash_part(&i.path)).collect::<Result<_>>()?;
            missing.extend(self.api.missing_paths(&hashes).await?);
        }
        let todo: Vec<LocalPathInfo> = infos.into_iter().filter(|i| hash_part(&i.path).is_ok_and(|h| missing.contains(&h))).collect();
        report.already_cached = report.considered - report.skipped_upstream - todo.len();
        if todo.is_empty() {
            return Ok(report);
        }
        self.check_uploader_signatures(&todo).await?;
        let total: u64 = todo.iter().map(|i| i.nar_size).sum();
        let bar = progress_bar(self.config.progress, total, todo.len());
        let counters = Arc::new(Counters::default());
        for level in dependency_levels(todo) {
            let results: Vec<(String, u64, Result<()>)> = futures::stream::iter(level)
                .map(|info| {
                    let counters = counters.clone();
                    let bar = bar.clone();
                    async move {
                        let result = self.push_one(&info, &counters, &bar).await;
                        (info.path, info.nar_size, result)
                    }
                })
                .buffer_unordered(self.config.path_jobs.max(1))
                .collect()
                .await;
            let mut first_error = None;
            let mut failed = 0usize;
            for (path, size, result) in results {
                match result {
                    Ok(()) => {
                        bar.set_message(short_name(&path));
                        tracing::info!(store_path = %path, "pushed");
                        report.pushed.push(path);
                        report.nar_bytes += size;
                    }
                    Err(err) => {
                        failed += 1;
                        tracing::warn!(store_path = %path, "push failed: {err}");
                        first_error.get_or_insert(err.context(format!("pushing {path}")));
                    }
                }
            }
            if let Some(err) = first_error {
                bar.abandon();
                let more = if failed > 1 { format!(" (and {} more paths failed)", failed - 1) } else { String::new() };
                return Err(Error::new(err.kind(), format!("{}{more}; {} paths were pushed before", err.message(), report.pushed.len())));
            }
        }
        bar.finish_and_clear();
        report.chunks = counters.chunks.load(Ordering::Relaxed);
        report.chunks_uploaded = counters.chunks_uploaded.load(Ordering::Relaxed);
        report.uploaded_bytes = counters.uploaded_bytes.load(Ordering::Relaxed);
        report.uploaded_frame_bytes = counters.uploaded_frame_bytes.load(Ordering::Relaxed);
        report.pushed_as_changes = counters.as_changes.load(Ordering::Relaxed);
        Ok(report)
    }

    /// Refuses the push before anything is uploaded when the cache requires uploader
    /// signatures and a path lacks a valid one: the server would refuse its commit (403) only
    /// after its chunks were sent, and pushing the rest could leave a path without its
    /// references. The message is the one the server would give (the same check, in the core
    /// crate). The server's check is what counts: when the
    /// cache's settings cannot be read (a push-only token cannot), the push goes on and the
    /// server refuses what it must.
    async fn check_uploader_signatures(&self, todo: &[LocalPathInfo]) -> Result<()> {
        let config = match self.api.cache_config().await {
            Ok(config) => config,
            Err(err) => {
                tracing::debug!("cannot read the cache's settings, the server checks signatures alone: {err}");
                return Ok(());
            }
        };
        if config.require_uploader_signature != Some(true) {
            return Ok(());
        }
        let keys = match TrustedKeys::parse(config.trusted_uploader_keys.as_deref().unwrap_or_default()) {
            Ok(keys) => keys,
            Err(err) => {
                tracing::debug!("the cache's trusted uploader keys do not parse, the server checks signatures alone: {err}");
                return Ok(());
            }
        };
        let store_dir = config.store_dir.as_deref().unwrap_or(flywheel_core::nix::DEFAULT_STORE_DIR);
        let refused: Vec<Error> = todo.iter().filter_map(|info| uploader_signature(&keys, store_dir, info).err()).collect();
        match refused.split_first() {
            None => Ok(()),
            Some((first, rest)) => {
                let more = if rest.is_empty() { String::new() } else { format!(" (and {} more paths lack one)", rest.len()) };
                Err(Error::new(first.kind(), format!("{}{more}; nothing was pushed", first.message())))
            }
        }
    }

    async fn push_one(&self, info: &LocalPathInfo, counters: &Counters, bar: &indicatif::ProgressBar) -> Result<()> {
        let physical = self.store.physical(&info.path);
        let expected = Sha256Hash::parse(&info.nar_hash)?;
        // Pass 1: chunk and hash.
        let params = self.config.chunking;
        let (chunks, nar_hash, nar_size) = {
            let physical = physical.clone();
            let bar = bar.clone();
            tokio::task::spawn_blocking(move || chunk_nar(&physical, params, &bar))
                .await
                .map_err(|e| Error::internal(format!("chunking task failed: {e}")))??
        };
        if nar_hash != expected || nar_size != info.nar_size {
            return Err(Error::corrupt(format!(
                "the files of {} (NAR hash {nar_hash}, {nar_size} bytes) do not match the Nix database ({}, {} bytes); \
                 run `nix-store --verify --check-contents`",
                info.path, info.nar_hash, info.nar_size
            )));
        }
        counters.chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
        let mut unique: Vec<ChunkHash> = Vec::new();
        let mut seen = HashSet::new();
        for chunk in &chunks {
            if seen.insert(chunk.hash) {
                unique.push(chunk.hash);
            }
        }
        let request = CommitRequest {
            store_path: info.path.clone(),
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: info.signatures.clone(),
            ca: info.ca.clone(),
            chunks,
            chunks_query: None,
            chunk_order: None,
            chunk_sizes: Vec::new(),
            chunks_delta: None,
        };
        if unique.len() >= DELTA_MIN_CHUNKS {
            match self.push_as_changes(&physical, &request, &unique, counters).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(err) if matches!(err.kind(), ErrorKind::Unauthorized | ErrorKind::Forbidden) => return Err(err),
                // The base may have been deleted or swept meanwhile: the full way repairs that.
                Err(err) => tracing::info!(store_path = %info.path, "push as changes to an earlier version failed, sending the whole chunk list: {err}"),
            }
        }
        let query = self.upload_missing(&physical, &request.chunks, &unique, counters).await?;
        if let Some(query) = query {
            // The server remembers the list asked about: name it instead of listing the chunks
            // again. Any refusal (the server forgot it, another replica answered) falls back to
            // the full list, which also reports the real error if there is one.
            let short = by_query(&request, &unique, query);
            match self.api.commit(&short).await {
                Ok(()) => return Ok(()),
                Err(err) if matches!(err.kind(), ErrorKind::Unauthorized | ErrorKind::Forbidden) => return Err(err),
                Err(err) => tracing::debug!("commit by chunk query refused, sending the chunk list: {err}"),
            }
        }
        RetryPolicy::REQUEST.run("committing a path", || self.api.commit(&request)).await
    }

    /// Pushes a path as changes to the last one the cache holds under its unversioned name
    /// (a new version of a package): asks only about the chunks that one lacks, and commits the
    /// chunk list as runs of its list. What goes over the wire then grows with the change, not
    /// with the NAR. `Ok(false)` when there is no such path, or it shares too little.
    async fn push_as_changes(
        &self,
        physical: &std::path::Path,
        request: &CommitRequest,
        unique: &[ChunkHash],
        counters: &Counters,
    ) -> Result<bool> {
        let base = match self.api.base(&short_name(&request.store_path)).await {
            Ok(base) => base,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err),
        };
        let in_base: HashSet<ChunkHash> = base.chunks.iter().map(|c| c.hash).collect();
        let ask: Vec<ChunkHash> = unique.iter().filter(|h| !in_base.contains(h)).copied().collect();
        // Sharing less than half, the delta would save little over the full list.
        if ask.len() * 2 > unique.len() {
            return Ok(false);
        }
        if !ask.is_empty() {
            self.upload_missing(physical, &request.chunks, &ask, counters).await?;
        }
        let delta = ChunkDelta::between(hash_part(&base.store_path)?, &base.chunks, &request.chunks);
        let as_changes = CommitRequest { chunks: Vec::new(), chunks_delta: Some(delta), ..request.clone() };
        self.api.commit(&as_changes).await?;
        counters.as_changes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(store_path = %request.store_path, base = %base.store_path, "pushed as changes");
        Ok(true)
    }

    /// Asks the server which of `ask` it lacks and uploads those; returns the name of the
    /// question, for a commit that follows (see [`by_query`]).
    async fn upload_missing(
        &self,
        physical: &std::path::Path,
        chunks: &[ChunkRef],
        ask: &[ChunkHash],
        counters: &Counters,
    ) -> Result<Option<String>> {
        let (missing, query) = self.api.missing_chunks(ask).await?;
        let missing: HashSet<ChunkHash> = missing.into_iter().collect();
        if !missing.is_empty() {
            self.upload(physical, chunks, missing, counters).await?;
        }
        Ok(query)
    }

    /// Pass 2: makes the NAR again and uploads the chunks in `missing`, `jobs` at once.
    async fn upload(
        &self,
        physical: &std::path::Path,
        chunks: &[ChunkRef],
        missing: HashSet<ChunkHash>,
        counters: &Counters,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<(ChunkHash, usize, Vec<u8>)>(self.config.jobs.max(UPLOAD_BATCH));
        // A push of a few new chunks (the common case: a new version of a path) waits for all
        // of them and sends one request; a bigger one sends whatever is ready, in parallel.
        let missing_bytes: u64 = {
            let mut seen = HashSet::new();
            chunks.iter().filter(|c| missing.contains(&c.hash) && seen.insert(c.hash)).map(|c| u64::from(c.size)).sum()
        };
        let one_request = missing.len() <= UPLOAD_BATCH && missing_bytes <= UPLOAD_BATCH_BYTES as u64;
        let physical = physical.to_path_buf();
        let expected: Vec<ChunkRef> = chunks.to_vec();
        let (params, level) = (self.config.chunking, self.config.zstd_level);
        let producer = tokio::task::spawn_blocking(move || compress_missing(&physical, params, level, &expected, missing, tx));
        // Chunks ready together go in one request: fewer requests, fewer headers.
        let batches: futures::stream::BoxStream<'_, Vec<(ChunkHash, usize, Vec<u8>)>> = if one_request {
            tokio_stream_from(rx).chunks(UPLOAD_BATCH).boxed()
        } else {
            tokio_stream_from(rx).ready_chunks(UPLOAD_BATCH).boxed()
        };
        let uploads = batches
            .flat_map(|ready| futures::stream::iter(split_by_bytes(ready, UPLOAD_BATCH_BYTES)))
            .map(|batch| async move {
                let frames: Vec<(ChunkHash, &[u8])> = batch.iter().map(|(hash, _, frame)| (*hash, frame.as_slice())).collect();
                RetryPolicy::REQUEST.run("uploading chunks", || self.api.put_chunks(&frames)).await?;
                for (_, raw, frame) in &batch {
                    counters.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
                    counters.uploaded_bytes.fetch_add(*raw as u64, Ordering::Relaxed);
                    counters.uploaded_frame_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, Error>(())
            })
            .buffer_unordered(self.config.jobs.max(1))
            .try_collect::<()>();
        // An upload error drops the receiver, which stops the producer.
        let uploaded = uploads.await;
        let produced = producer.await.map_err(|e| Error::internal(format!("chunking task failed: {e}")))?;
        uploaded?;
        produced
    }
}

/// Whether `info` carries a valid signature by one of `keys`, as the server checks it. A path
/// whose metadata does not parse is left to the server, which refuses it with the reason.
fn uploader_signature(keys: &TrustedKeys, store_dir: &str, info: &LocalPathInfo) -> Result<()> {
    let parsed = (|| {
        let path = StorePath::from_absolute(&info.path, store_dir)?;
        let references = info.references.iter().map(|r| StorePath::from_absolute(r, store_dir)).collect::<Result<Vec<_>>>()?;
        Ok::<_, Error>((path, Sha256Hash::parse(&info.nar_hash)?, references))
    })();
    let Ok((path, nar_hash, references)) = parsed else { return Ok(()) };
    let fingerprint = flywheel_core::nix::fingerprint(store_dir, &path, &nar_hash, info.nar_size, &references);
    keys.require_signature(&info.path, &fingerprint, &info.signatures)
}

/// The commit `full` with its chunks named by the `missing-chunks` question `query`, which
/// asked about `asked` (the unique chunks, in order of first appearance).
fn by_query(full: &CommitRequest, asked: &[ChunkHash], query: String) -> CommitRequest {
    let index: std::collections::HashMap<ChunkHash, u32> = asked.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect();
    let order: Vec<u32> = full.chunks.iter().map(|c| index.get(&c.hash).copied().unwrap_or(u32::MAX)).collect();
    let identity = order.iter().enumerate().all(|(i, &o)| o as usize == i) && order.len() == asked.len();
    CommitRequest {
        chunks: Vec::new(),
        chunks_query: Some(query),
        chunk_order: (!identity).then_some(order),
        chunk_sizes: full.chunks.iter().map(|c| c.size).collect(),
        ..full.clone()
    }
}

/// Paths of fewer chunks are not pushed as changes to an earlier version: their chunk list
/// is short anyway, and looking the earlier version up would cost a round trip per path.
const DELTA_MIN_CHUNKS: usize = 16;

/// Most chunks in one upload request.
const UPLOAD_BATCH: usize = 16;
/// Most frame bytes in one upload request, well under the server's 16 MiB request limit
/// whatever the chunk sizes.
const UPLOAD_BATCH_BYTES: usize = 4 << 20;

/// Splits ready chunks into batches of at most `max_bytes` of frames (a single larger frame
/// goes alone).
fn split_by_bytes(ready: Vec<(ChunkHash, usize, Vec<u8>)>, max_bytes: usize) -> Vec<Vec<(ChunkHash, usize, Vec<u8>)>> {
    let mut batches: Vec<Vec<(ChunkHash, usize, Vec<u8>)>> = Vec::new();
    let mut bytes = 0;
    for item in ready {
        if batches.is_empty() || bytes + item.2.len() > max_bytes {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += item.2.len();
        if let Some(batch) = batches.last_mut() {
            batch.push(item);
        }
    }
    batches
}

fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A `Write` that hashes the NAR and cuts it into chunks.
struct ChunkingSink<'a, F: FnMut(usize, Vec<u8>) -> std::io::Result<()>> {
    chunker: Option<Chunker>,
    sha: sha2::Sha256,
    size: u64,
    index: usize,
    emit: F,
    bar: Option<&'a indicatif::ProgressBar>,
}

impl<F: FnMut(usize, Vec<u8>) -> std::io::Result<()>> Write for ChunkingSink<'_, F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sha.update(buf);
        self.size += buf.len() as u64;
        if let Some(bar) = self.bar {
            bar.inc(buf.len() as u64);
        }
        let (index, emit) = (&mut self.index, &mut self.emit);
        let chunker = self.chunker.as_mut().ok_or_else(|| std::io::Error::other("chunker finished"))?;
        chunker.push(buf, &mut |chunk: Vec<u8>| {
            let i = *index;
            *index += 1;
            emit(i, chunk)
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(usize, Vec<u8>) -> std::io::Result<()>> ChunkingSink<'_, F> {
    fn finish(mut self) -> std::io::Result<(Sha256Hash, u64)> {
        let (index, emit) = (&mut self.index, &mut self.emit);
        if let Some(chunker) = self.chunker.take() {
            chunker.finish(&mut |chunk: Vec<u8>| {
                let i = *index;
                *index += 1;
                emit(i, chunk)
            })?;
        }
        Ok((Sha256Hash(self.sha.finalize().into()), self.size))
    }
}

fn io_error(path: &std::path::Path, err: std::io::Error) -> Error {
    let kind = if err.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Unavailable };
    Error::new(kind, format!("making the NAR of {}: {err}", path.display()))
}

/// Pass 1: the chunk list, NAR hash and size of the path at `physical`.
fn chunk_nar(physical: &std::path::Path, params: ChunkParams, bar: &indicatif::ProgressBar) -> Result<(Vec<ChunkRef>, Sha256Hash, u64)> {
    let mut chunks = Vec::new();
    let mut sink = ChunkingSink {
        chunker: Some(Chunker::new(params)),
        sha: sha2::Sha256::new(),
        size: 0,
        index: 0,
        bar: Some(bar),
        emit: |_, chunk: Vec<u8>| {
            chunks.push(ChunkRef { hash: ChunkHash::of(&chunk), size: chunk.len() as u32 });
            Ok(())
        },
    };
    flywheel_core::nar::dump_path(physical, &mut sink).map_err(|e| io_error(physical, e))?;
    let (hash, size) = sink.finish().map_err(|e| io_error(physical, e))?;
    Ok((chunks, hash, size))
}

/// Pass 2: makes the NAR again, checks it cuts into the same chunks, and sends the missing
/// ones compressed to the uploader; stops once the last missing chunk is sent.
fn compress_missing(
    physical: &std::path::Path,
    params: ChunkParams,
    level: i32,
    expected: &[ChunkRef],
    mut missing: HashSet<ChunkHash>,
    tx: tokio::sync::mpsc::Sender<(ChunkHash, usize, Vec<u8>)>,
) -> Result<()> {
    let mut failure: Option<Error> = None;
    let mut sink = ChunkingSink {
        chunker: Some(Chunker::new(params)),
        sha: sha2::Sha256::new(),
        size: 0,
        index: 0,
        bar: None,
        emit: |i: usize, chunk: Vec<u8>| {
            let hash = ChunkHash::of(&chunk);
            if expected.get(i).map(|c| c.hash) != Some(hash) {
                failure = Some(Error::corrupt(format!("{} changed while it was being pushed", physical.display())));
                return Err(std::io::Error::other(EarlyStop::Changed));
            }
            if missing.remove(&hash) {
                let frame = compress(&chunk, level).map_err(std::io::Error::other)?;
                if tx.blocking_send((hash, chunk.len(), frame)).is_err() {
                    return Err(std::io::Error::other(EarlyStop::UploaderStopped));
                }
                if missing.is_empty() {
                    return Err(std::io::Error::other(EarlyStop::AllSent));
                }
            }
            Ok(())
        },
    };
    let dumped = flywheel_core::nar::dump_path(physical, &mut sink).and_then(|_| sink.finish().map(|_| ()));
    if let Some(err) = failure {
        return Err(err);
    }
    match dumped {
        Ok(()) => Ok(()),
        Err(err) => match err.get_ref().and_then(|inner| inner.downcast_ref::<EarlyStop>()) {
            Some(EarlyStop::AllSent | EarlyStop::UploaderStopped) => Ok(()),
            Some(EarlyStop::Changed) | None => Err(io_error(physical, err)),
        },
    }
}

/// Why pass 2 ended the NAR walk early. It travels as the NAR writer's `io::Error` and is
/// read back by type: only a real I/O error is reported as one.
#[derive(Debug)]
enum EarlyStop {
    /// Every missing chunk was sent: the rest of the NAR is not needed.
    AllSent,
    /// The uploader stopped (an upload failed); its error is the one reported.
    UploaderStopped,
    /// The path no longer cuts into the chunks of pass 1 (reported through `failure`).
    Changed,
}

impl std::fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EarlyStop::AllSent => "all missing chunks sent",
            EarlyStop::UploaderStopped => "the uploader stopped",
            EarlyStop::Changed => "the path changed while it was read",
        })
    }
}

impl std::error::Error for EarlyStop {}

/// The paths in dependency levels: every path's references (within the set) are in earlier
/// levels. Cycles cannot occur in a Nix store (self-references are ignored).
fn dependency_levels(infos: Vec<LocalPathInfo>) -> Vec<Vec<LocalPathInfo>> {
    let in_set: HashSet<String> = infos.iter().map(|i| i.path.clone()).collect();
    let mut remaining: BTreeMap<String, LocalPathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done: HashSet<String> = HashSet::new();
    let mut levels = Vec::new();
    while !remaining.is_empty() {
        let ready: Vec<String> = remaining
            .values()
            .filter(|i| i.references.iter().all(|r| r == &i.path || !in_set.contains(r) || done.contains(r)))
            .map(|i| i.path.clone())
            .collect();
        // A cycle would be a broken database; push the rest together rather than loop.
        let ready = if ready.is_empty() { remaining.keys().cloned().collect() } else { ready };
        let level: Vec<LocalPathInfo> = ready.iter().filter_map(|p| remaining.remove(p)).collect();
        done.extend(ready);
        levels.push(level);
    }
    levels
}

fn hash_part(path: &str) -> Result<String> {
    Ok(StorePath::from_path_in_any_store(path)?.hash_part())
}

fn short_name(path: &str) -> String {
    StorePath::from_path_in_any_store(path).map_or_else(|_| path.to_string(), |p| p.name)
}

fn progress_bar(enabled: bool, total: u64, paths: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} pushing {prefix} paths [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(paths.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_by_query_names_chunks_by_their_place_in_the_question() {
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        let full = CommitRequest {
            store_path: "/nix/store/00000000000000000000000000000000-x".into(),
            nar_hash: "sha256:x".into(),
            nar_size: 7,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
            chunks: vec![ChunkRef { hash: a, size: 3 }, ChunkRef { hash: b, size: 4 }],
            chunks_query: None,
            chunk_order: None,
            chunk_sizes: Vec::new(),
            chunks_delta: None,
        };
        let short = by_query(&full, &[a, b], "q".into());
        assert!(short.chunks.is_empty());
        assert_eq!(short.chunk_order, None, "the question's own order needs no list");
        assert_eq!(short.chunk_sizes, vec![3, 4]);
        let repeated = CommitRequest { chunks: vec![full.chunks[0], full.chunks[1], full.chunks[0]], ..full.clone() };
        let short = by_query(&repeated, &[a, b], "q".into());
        assert_eq!(short.chunk_order, Some(vec![0, 1, 0]));
        assert_eq!(short.chunk_sizes, vec![3, 4, 3]);
    }

    #[test]
    fn upload_batches_stay_under_the_byte_limit() {
        let item = |len: usize| (ChunkHash::of(&len.to_le_bytes()), len, vec![0u8; len]);
        let batches = split_by_bytes(vec![item(3), item(4), item(2), item(9), item(1)], 8);
        let sizes: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|(_, raw, _)| *raw).collect()).collect();
        assert_eq!(sizes, vec![vec![3, 4], vec![2], vec![9], vec![1]]);
        assert!(split_by_bytes(Vec::new(), 8).is_empty());
    }

    #[test]
    fn uploader_signatures_are_checked_as_the_server_checks_them() {
        let key = flywheel_core::nix::SigningKey::generate("runner-1").unwrap();
        let keys = TrustedKeys::parse(&[key.verifying_key().to_nix_string()]).unwrap();
        let (path, dep) = ("/nix/store/00000000000000000000000000000000-x", "/nix/store/11111111111111111111111111111111-dep");
        let mut info = LocalPathInfo {
            path: path.into(),
            nar_hash: format!("{}", Sha256Hash::digest(b"nar")),
            nar_size: 3,
            references: vec![dep.into(), path.into()],
            deriver: None,
            signatures: vec![],
            ca: None,
        };
        let err = uploader_signature(&keys, "/nix/store", &info).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Forbidden);
        let refs = [StorePath::from_absolute(path, "/nix/store").unwrap(), StorePath::from_absolute(dep, "/nix/store").unwrap()];
        let fingerprint = flywheel_core::nix::fingerprint("/nix/store", &refs[0], &Sha256Hash::digest(b"nar"), 3, &refs);
        info.signatures = vec![key.sign(&fingerprint)];
        uploader_signature(&keys, "/nix/store", &info).unwrap();
        // Metadata that does not parse is left to the server.
        info.nar_hash = "md5:x".into();
        info.signatures.clear();
        uploader_signature(&keys, "/nix/store", &info).unwrap();
    }

    fn info(path: &str, refs: &[&str]) -> LocalPathInfo {
        LocalPathInfo {
            path: path.into(),
            nar_hash: String::new(),
            nar_size: 0,
            references: refs.iter().map(|s| s.to_string()).collect(),
            deriver: None,
            signatures: vec![],
            ca: None,
        }
    }

    #[test]
    fn levels_put_dependencies_first() {
        let levels = dependency_levels(vec![info("c", &["b", "c"]), info("b", &["a", "outside"]), info("a", &[]), info("d", &[])]);
        let names: Vec<Vec<&str>> = levels.iter().map(|l| l.iter().map(|i| i.path.as_str()).collect()).collect();
        assert_eq!(names, vec![vec!["a", "d"], vec!["b"], vec!["c"]]);
    }
}
