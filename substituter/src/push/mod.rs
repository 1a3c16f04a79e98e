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
//!
//! - `nar_pass`: the two passes over the NAR;
//! - `upload`: the missing chunks, asked about and uploaded;
//! - `commit`: the ways a path is committed.

mod commit;
mod nar_pass;
mod upload;

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
use commit::DELTA_MIN_CHUNKS;
use nar_pass::chunk_nar;

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
        self.commit(&request, &unique, query).await
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
