//! Retention and garbage collection.
//!
//! 1. **Retention**: a path not accessed within its cache's retention period (or the server's
//!    default; 0 keeps paths forever) loses its path record. Accesses are narinfo, NAR and
//!    manifest reads, recorded at most once per `access-record-interval` per path.
//! 2. **Mark**: the manifests of all published paths, and of NARs staged by a Nix PUT within the
//!    grace period, and every chunk they list, are live.
//! 3. **Sweep**: manifests and chunks that are not live and older than the grace period are
//!    deleted, as are stale staging markers. Before chunks go, manifests written since the mark
//!    began are marked too, so a push that finished during the run keeps its chunks. Per
//!    cache, what it keeps beside its paths goes with them: chunk grants, uploaded NAR file
//!    names and realisations once no live path needs them, logs and debug info after the
//!    retention period, access traces not rewritten within the retention period or
//!    [`TRACE_MAX_AGE`]. Traces are hints: they keep no chunk and no path alive. Bazel's
//!    blob records keep the chunks they list; they and action results expire once not
//!    written within the retention period (a rebuild writes them again).
//!
//! The grace period protects uploads in flight: uploads count only on chunks written within
//! half of it, write older ones again, and must store their manifest within the other half
//! (see [`crate::storage::ReuseWindow`]), so every chunk an unfinished upload counts on is
//! younger than the grace period. A chunk written again after the sweep listed it is looked at
//! once more right before it is deleted.
//!
//! What remains is the moment between that last look and the delete: an upload that writes the
//! chunk again exactly then loses it. The upload checks the chunks it wrote again once its
//! manifest is stored and fails instead of publishing when one is gone; only a delete that
//! lands after that check as well slips through, and then the path reads as damaged (a 5xx
//! before any byte, never wrong bytes) until `flywheel fsck` takes it out and a push repairs
//! it. Object stores offer no conditional delete that would close this.

use std::collections::HashSet;
use std::time::Duration;

use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ManifestChunks;
use flywheel_core::nix::{BuildTraceValue, Realisation, Sha256Hash};
use flywheel_core::Result;
use object_store::ObjectStoreExt;

use crate::config::GcConfig;
use crate::clock::Clock;
use crate::storage::{modified_ms, CacheFile, Reuse, Storage};

/// What a collection did (or, in a dry run, would do).
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    /// `(cache, store path)` of expired paths.
    pub expired_paths: Vec<(String, String)>,
    /// Manifests deleted.
    pub manifests_deleted: usize,
    /// Chunks deleted.
    pub chunks_deleted: usize,
    /// Bytes of chunk objects deleted.
    pub chunk_bytes_freed: u64,
    /// Chunks kept (live or within the grace period).
    pub chunks_kept: usize,
    /// Packs deleted: no chunk object pointed into them any more.
    pub packs_deleted: usize,
    /// Bytes of packs deleted.
    pub pack_bytes_freed: u64,
    /// Packs kept.
    pub packs_kept: usize,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Objects that could not be read, or an action that failed, each naming its object.
    /// The collection carried on past them, keeping whatever they might have made live.
    pub problems: Vec<String>,
    /// Every manifest was kept, because a path record or a listing could not be read, so the
    /// live ones were not known.
    pub manifests_sweep_skipped: bool,
    /// No chunk was deleted, because a live (or young) manifest could not be read, so its
    /// chunks were not known.
    pub chunks_sweep_skipped: bool,
    /// Chunk grants deleted: chunks no live path of their cache uses any more.
    pub grants_deleted: usize,
    /// Records of uploaded NAR file names deleted, for paths gone or published anew.
    pub nar_files_deleted: usize,
    /// Build logs and debug info records expired with their cache's retention period.
    pub logs_deleted: usize,
    /// Realisations whose output path is no longer in their cache.
    pub realisations_deleted: usize,
    /// Access traces not rewritten within their cache's retention period or [`TRACE_MAX_AGE`].
    pub traces_deleted: usize,
    /// Bazel blobs and action results not written within their cache's retention period.
    pub bazel_records_deleted: usize,
}

/// Longest an access trace is kept without a run rewriting it, whatever the retention
/// period (also when it is 0, forever). A trace nobody has sent for a month belongs to a
/// job that is gone or changed: its order no longer predicts reads, and it would otherwise
/// stay forever, since nothing else refers to it.
pub const TRACE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

impl GcReport {
    fn problem(&mut self, message: String) {
        tracing::warn!(problem = %message, "garbage collection carries on past a problem");
        self.problems.push(message);
    }

    /// A listing's entries; a listing that failed is reported and read as empty, and since a
    /// path or staged NAR missing from it could still need its manifest, no manifest is swept.
    fn listed<T>(&mut self, listing: flywheel_core::Result<Vec<T>>, what: impl FnOnce() -> String) -> Vec<T> {
        listing.unwrap_or_else(|err| {
            self.problem(format!("{} could not be listed: {err}", what()));
            self.manifests_sweep_skipped = true;
            Vec::new()
        })
    }
}

/// Runs one collection over all caches.
///
/// A bad or unreadable object never stops it, and never gets something live deleted: it is
/// named in [`GcReport::problems`] and makes the run conservative. An unreadable path record
/// (or a cache whose paths cannot be listed) keeps every manifest, so the chunks of the path's
/// manifest, whichever it is, stay marked; an unreadable manifest that a path needs (or that
/// is young) keeps every chunk in this run; an unreadable manifest nothing needs is garbage
/// like any other. A failed delete is reported and the rest goes on. Only a failure to list
/// the store itself ends a run: then nothing is known.
///
/// "Now" is the storage's clock (see [`Storage::with_clock`]).
pub async fn collect(storage: &Storage, config: &GcConfig, dry_run: bool) -> Result<GcReport> {
    let started_ms = storage.clock().now_ms();
    let started = started_ms / 1000;
    // Objects modified after this instant are within the grace period.
    let grace_cutoff_ms = started_ms.saturating_sub(config.grace_period.saturating_mul(1000));
    let young = |meta: &object_store::ObjectMeta| modified_ms(meta) > grace_cutoff_ms;
    let mut report = GcReport { dry_run, ..Default::default() };

    // Retention, then the mark of what stays.
    let mut live_nars: HashSet<Sha256Hash> = HashSet::new();
    let mut caches: Vec<CacheLive> = Vec::new();
    for cache in storage.list_caches().await? {
        // Unknown settings: keep every path of the cache.
        let period = match storage.get_cache(&cache).await {
            Ok(Some(record)) => record.retention_period.map(u64::from).unwrap_or(config.default_retention_period),
            Ok(None) => continue,
            Err(err) => {
                report.problem(format!("cache {cache}: settings unreadable, no path expires: {err}"));
                0
            }
        };
        caches.push(CacheLive { name: cache.clone(), retention: period, ..Default::default() });
        let hash_parts = report.listed(storage.list_paths(&cache).await, || format!("cache {cache}: paths"));
        for hash_part in hash_parts {
            let path = match storage.get_path(&cache, &hash_part).await {
                Ok(Some(path)) => path,
                Ok(None) => continue,
                Err(err) => {
                    report.problem(format!("path record caches/{cache}/paths/{hash_part}: {err}"));
                    report.manifests_sweep_skipped = true;
                    continue;
                }
            };

            if period > 0 {
                let accessed = match storage.get_access(&cache, &hash_part).await {
                    Ok(accessed) => accessed.unwrap_or(0),
                    Err(err) => {
                        report.problem(format!("access record of {cache}/{hash_part}: {err}; kept"));
                        u64::MAX
                    }
                };
                let last = path.created_at.max(accessed);
                if started.saturating_sub(last) > period {
                    if !dry_run {
                        if let Err(err) = storage.delete_path(&cache, &hash_part).await {
                            report.problem(format!("expiring {cache}/{}: {err}", path.store_path));
                            live_nars.insert(path.nar_hash);
            if let Some(live) = caches.last_mut() {
                live.keep(&path);
            }
                            continue;
                        }
                    }
                    report.expired_paths.push((cache.clone(), path.store_path.clone()));
                    continue;
                }
            }
            live_nars.insert(path.nar_hash);
            if let Some(live) = caches.last_mut() {
                live.keep(&path);
            }
        }
        let pending = report.listed(
            storage.list_objects(&format!("caches/{cache}/pending")).await,
            || format!("cache {cache}: staged NARs"),
        );
        for pending in pending {
            let young = young(&pending);
            match pending.location.filename().and_then(|n| Sha256Hash::parse(&format!("sha256:{n}")).ok()) {
                Some(nar_hash) if young => {
                    live_nars.insert(nar_hash);
                }
                _ if !dry_run && !young => {
                    if let Err(err) = storage.delete_object(&pending.location).await {
                        report.problem(format!("{}: {err}", pending.location));
                    }
                }
                _ => {}
            }
        }
    }

    // Manifests: keep the live ones; sweep the rest once past the grace period.
    let mut live_chunks: HashSet<ChunkHash> = HashSet::new();
    // The chunk lists of the manifests of published paths, for each cache's grants below.
    let mut nar_chunks: std::collections::HashMap<Sha256Hash, Vec<ChunkHash>> = std::collections::HashMap::new();
    for meta in storage.list_objects("manifests").await? {
        let Some(nar_hash) = manifest_nar_hash(&meta.location) else { continue };
        let live = live_nars.contains(&nar_hash) || young(&meta) || report.manifests_sweep_skipped;
        if !live {
            if !dry_run {
                if let Err(err) = storage.delete_object(&meta.location).await {
                    report.problem(format!("{}: {err}", meta.location));
                    continue;
                }
            }
            report.manifests_deleted += 1;
            continue;
        }
        if let Some(chunks) = mark(storage, &meta.location, &mut live_chunks, &mut report).await {
            if caches.iter().any(|c| c.nars.contains(&nar_hash)) {
                nar_chunks.insert(nar_hash, chunks);
            }
        }
    }

    // Manifests written while this ran belong to pushes that just finished.
    for meta in storage.list_objects("manifests").await? {
        if manifest_nar_hash(&meta.location).is_some() && modified_ms(&meta) >= started_ms {
            mark(storage, &meta.location, &mut live_chunks, &mut report).await;
        }
    }

    // Bazel's records: expire them, and mark the chunks of those that stay. Listed after the
    // manifests, so that a record written while this ran is marked too (its chunks, written
    // before it, are young in any case).
    for cache in &caches {
        mark_bazel(storage, cache, started_ms, &young, dry_run, &mut live_chunks, &mut report).await;
    }

    if report.chunks_sweep_skipped {
        tracing::warn!("no chunk is deleted in this run: a manifest in use could not be read");
    }
    for meta in storage.list_objects("chunks").await? {
        let Some(hash) = meta.location.filename().and_then(|n| n.parse::<ChunkHash>().ok()) else { continue };
        if report.chunks_sweep_skipped || live_chunks.contains(&hash) || young(&meta) {
            report.chunks_kept += 1;
            continue;
        }
        // An upload may have written this chunk again since the listing (it was too old to
        // count on, see `ReuseWindow`): look once more right before deleting.
        if !dry_run {
            match storage.chunk_reusable(&hash, grace_cutoff_ms.saturating_add(1)).await {
                Ok(Reuse::Stale) => {}
                Ok(_) => {
                    report.chunks_kept += 1;
                    continue;
                }
                Err(err) => {
                    report.problem(format!("chunk {hash}: {err}; kept"));
                    report.chunks_kept += 1;
                    continue;
                }
            }
            if let Err(err) = storage.delete_chunk(&hash).await {
                report.problem(format!("deleting chunk {hash}: {err}"));
                report.chunks_kept += 1;
                continue;
            }
        }
        report.chunks_deleted += 1;
        report.chunk_bytes_freed += meta.size;
    }
    sweep_packs(storage, grace_cutoff_ms, dry_run, &mut report).await;
    sweep_cache_records(storage, &caches, &nar_chunks, grace_cutoff_ms, dry_run, &mut report).await;
    tracing::info!(
        expired = report.expired_paths.len(),
        manifests = report.manifests_deleted,
        chunks = report.chunks_deleted,
        bytes = report.chunk_bytes_freed,
        packs = report.packs_deleted,
        traces = report.traces_deleted,
        bazel = report.bazel_records_deleted,
        problems = report.problems.len(),
        dry_run,
        "garbage collection finished"
    );
    Ok(report)
}

/// Deletes the packs that no chunk object points into any more, once past the grace period (a
/// compaction points chunks into its pack moments after writing it). A chunk's object is read
/// only if it has a pointer's size, and a pack is kept as soon as one points into it. Runs
/// after the chunk sweep, so the pointers of chunks deleted in this run no longer count.
async fn sweep_packs(storage: &Storage, grace_cutoff_ms: u64, dry_run: bool, report: &mut GcReport) {
    let packs = match storage.list_objects("packs").await {
        Ok(packs) => packs,
        Err(err) => return report.problem(format!("packs could not be listed: {err}; all kept")),
    };
    for meta in packs {
        let Some(id) = Storage::pack_of_key(&meta.location) else { continue };
        if modified_ms(&meta) > grace_cutoff_ms || report.chunks_sweep_skipped {
            report.packs_kept += 1;
            continue;
        }
        let index = match storage.get_pack_index(&id, meta.size).await {
            Ok(index) => index,
            Err(err) => {
                report.problem(format!("pack {id}: {err}; kept"));
                report.packs_kept += 1;
                continue;
            }
        };
        let mut used = false;
        for entry in &index.chunks {
            match storage.chunk_pointer(&entry.hash).await {
                Ok(Some(pointer)) if pointer.pack == id => used = true,
                Ok(_) => {}
                Err(err) => {
                    report.problem(format!("chunk {}: {err}; pack {id} kept", entry.hash));
                    used = true;
                }
            }
            if used {
                break;
            }
        }
        if used {
            report.packs_kept += 1;
            continue;
        }
        if !dry_run {
            if let Err(err) = storage.delete_pack(&id).await {
                report.problem(format!("deleting pack {id}: {err}"));
                report.packs_kept += 1;
                continue;
            }
        }
        report.packs_deleted += 1;
        report.pack_bytes_freed += meta.size;
    }
}

/// Marks the chunks of the manifest at `key` live. Only the chunk list is read, so a manifest
/// whose file index does not parse still keeps its chunks. A manifest that cannot be read at
/// all (or is gone since the listing, if a collection elsewhere took it) leaves its chunks
/// unknown, so no chunk is deleted in this run.
async fn mark(
    storage: &Storage,
    key: &object_store::path::Path,
    live: &mut HashSet<ChunkHash>,
    report: &mut GcReport,
) -> Option<Vec<ChunkHash>> {
    let read = match storage.object_store().get(key).await {
        Ok(result) => result.bytes().await.map_err(|e| e.to_string()),
        Err(object_store::Error::NotFound { .. }) => return None,
        Err(err) => Err(err.to_string()),
    };
    match read.and_then(|bytes| ManifestChunks::from_json(&bytes).map_err(|e| e.to_string())) {
        Ok(manifest) => {
            let chunks: Vec<ChunkHash> = manifest.chunks.iter().map(|c| c.hash).collect();
            live.extend(chunks.iter().copied());
            Some(chunks)
        }
        Err(err) => {
            report.problem(format!("manifest {key} is in use but unreadable, so no chunk is deleted: {err}"));
            report.chunks_sweep_skipped = true;
            None
        }
    }
}

/// Expires a cache's Bazel records (CAS blobs and action results) not written within its
/// retention period, and marks the chunks of the blobs that stay. A blob record that cannot be
/// read keeps every chunk in this run, as an unreadable manifest does.
async fn mark_bazel(
    storage: &Storage,
    cache: &CacheLive,
    started_ms: u64,
    young: &(dyn Fn(&object_store::ObjectMeta) -> bool + Sync),
    dry_run: bool,
    live: &mut HashSet<ChunkHash>,
    report: &mut GcReport,
) {
    use crate::bazel::{records_prefix, record::BlobRecord, Store};
    let expired = |meta: &object_store::ObjectMeta| {
        cache.retention > 0
            && !young(meta)
            && started_ms.saturating_sub(modified_ms(meta)) / 1000 > cache.retention
    };
    for store in [Store::Ac, Store::Cas] {
        let prefix = records_prefix(&cache.name, store);
        let records = match storage.list_objects(&prefix).await {
            Ok(records) => records,
            Err(err) => {
                report.problem(format!("cache {}: Bazel records unlisted, so no chunk is deleted: {err}", cache.name));
                if store == Store::Cas {
                    report.chunks_sweep_skipped = true;
                }
                continue;
            }
        };
        for meta in records {
            if expired(&meta) {
                // Written again since the listing (an upload, or a refresh of a record in
                // use): it stays.
                match storage.object_store().head(&meta.location).await {
                    // Compared in whole seconds: S3 lists times in milliseconds, but a HEAD
                    // answers them in seconds.
                    Ok(now) if modified_ms(&now) / 1000 > modified_ms(&meta) / 1000 => {
                        if store == Store::Cas {
                            if let Ok(Some(bytes)) = storage.get_object(&meta.location).await {
                                if let Ok(record) = BlobRecord::decode(&bytes) {
                                    live.extend(record.chunks().iter().map(|c| c.hash));
                                }
                            }
                        }
                        continue;
                    }
                    Err(object_store::Error::NotFound { .. }) => continue,
                    _ => {}
                }
                if !dry_run {
                    if let Err(err) = storage.delete_object(&meta.location).await {
                        report.problem(format!("{}: {err}", meta.location));
                    }
                }
                report.bazel_records_deleted += 1;
                continue;
            }
            if store == Store::Ac {
                continue;
            }
            match storage.get_object(&meta.location).await {
                Ok(Some(bytes)) => match BlobRecord::decode(&bytes) {
                    Ok(record) => live.extend(record.chunks().iter().map(|c| c.hash)),
                    Err(err) => {
                        // A damaged record names no chunk anyone can read through it; taken
                        // out, the blob reads as missing and the next upload repairs it.
                        report.problem(format!("{}: {err}; deleted", meta.location));
                        if !dry_run {
                            if let Err(err) = storage.delete_object(&meta.location).await {
                                report.problem(format!("{}: {err}", meta.location));
                            }
                        }
                        report.bazel_records_deleted += 1;
                    }
                },
                Ok(None) => {}
                Err(err) => {
                    report.problem(format!("Bazel blob record {} is unreadable, so no chunk is deleted: {err}", meta.location));
                    report.chunks_sweep_skipped = true;
                }
            }
        }
    }
}

/// What a collection learned of one cache: what its live paths use.
#[derive(Default)]
struct CacheLive {
    name: String,
    /// Retention period in seconds; 0 keeps forever.
    retention: u64,
    nars: HashSet<Sha256Hash>,
    nar_files: HashSet<String>,
    /// Hash parts of the paths that stay.
    paths: HashSet<String>,
}

impl CacheLive {
    /// Notes a path that stays (live, or whose expiry failed).
    fn keep(&mut self, path: &crate::storage::PathRecord) {
        self.nars.insert(path.nar_hash);
        self.nar_files.extend(path.nar_file.clone());
        self.paths.extend(path.store_path.get(..32).map(str::to_string));
    }
}

/// Sweeps what each cache keeps beside its paths: grants of chunks none of its live paths uses,
/// records of uploaded NAR file names whose path is gone (or was published anew), realisations
/// whose output path is gone, build logs and debug info older than the retention period, and
/// access traces not rewritten within the retention period or [`TRACE_MAX_AGE`]. Young objects
/// stay (uploads in flight); grants stay entirely when the chunk lists of live
/// paths are not all known, and realisations when the live paths are not all known.
async fn sweep_cache_records(
    storage: &Storage,
    caches: &[CacheLive],
    nar_chunks: &std::collections::HashMap<Sha256Hash, Vec<ChunkHash>>,
    grace_cutoff_ms: u64,
    dry_run: bool,
    report: &mut GcReport,
) {
    let now = storage.clock().now_ms();
    let grants_known = !report.manifests_sweep_skipped && !report.chunks_sweep_skipped;
    for cache in caches {
        let young = |meta: &object_store::ObjectMeta| modified_ms(meta) > grace_cutoff_ms;
        let mut doomed: Vec<(object_store::path::Path, &str)> = Vec::new();
        if grants_known {
            let used: HashSet<ChunkHash> = cache.nars.iter().filter_map(|n| nar_chunks.get(n)).flatten().copied().collect();
            let all_known = cache.nars.iter().all(|n| nar_chunks.contains_key(n));
            match storage.list_objects(&format!("caches/{}/chunks", cache.name)).await {
                Ok(grants) if all_known => doomed.extend(
                    grants
                        .into_iter()
                        .filter(|g| !young(g) && Storage::granted_chunk(&g.location).is_some_and(|h| !used.contains(&h)))
                        .map(|g| (g.location, "grant")),
                ),
                Ok(_) => {}
                Err(err) => report.problem(format!("cache {}: grants could not be listed: {err}", cache.name)),
            }
        }
        if !report.manifests_sweep_skipped {
            match storage.list_objects(&format!("caches/{}/{}", cache.name, CacheFile::NAR_FILES)).await {
                Ok(files) => doomed.extend(
                    files
                        .into_iter()
                        .filter(|f| !young(f) && f.location.filename().is_some_and(|name| !cache.nar_files.contains(name)))
                        .map(|f| (f.location, "nar-file")),
                ),
                Err(err) => report.problem(format!("cache {}: NAR file names could not be listed: {err}", cache.name)),
            }
        }
        if !report.manifests_sweep_skipped {
            let orphans = realisations_without_output(storage, cache, grace_cutoff_ms, report).await;
            doomed.extend(orphans.into_iter().map(|key| (key, "realisation")));
        }
        if cache.retention > 0 {
            let expired_before = now.saturating_sub(cache.retention.saturating_mul(1000));
            for kind in [CacheFile::LOGS, CacheFile::DEBUG_INFO] {
                match storage.list_objects(&format!("caches/{}/{kind}", cache.name)).await {
                    Ok(records) => doomed.extend(
                        records.into_iter().filter(|r| modified_ms(r) < expired_before).map(|r| (r.location, "log")),
                    ),
                    Err(err) => report.problem(format!("cache {}: {kind} could not be listed: {err}", cache.name)),
                }
            }
        }
        // Traces are never marked: whether a trace goes depends only on its own age, so it
        // is swept even when the rest of the run is conservative. A PUT that rewrites a trace
        // between the listing and the delete loses that run's merge; a hint can afford it.
        let mut trace_max_age_ms = TRACE_MAX_AGE.as_millis() as u64;
        if cache.retention > 0 {
            trace_max_age_ms = trace_max_age_ms.min(cache.retention.saturating_mul(1000));
        }
        let traces_expired_before = now.saturating_sub(trace_max_age_ms);
        match storage.list_objects(&format!("caches/{}/{}", cache.name, CacheFile::TRACES)).await {
            Ok(traces) => doomed.extend(
                traces.into_iter().filter(|t| modified_ms(t) < traces_expired_before).map(|t| (t.location, "trace")),
            ),
            Err(err) => report.problem(format!("cache {}: access traces could not be listed: {err}", cache.name)),
        }
        for (key, kind) in doomed {
            if !dry_run {
                if let Err(err) = storage.delete_object(&key).await {
                    report.problem(format!("deleting {key}: {err}"));
                    continue;
                }
            }
            match kind {
                "grant" => report.grants_deleted += 1,
                "nar-file" => report.nar_files_deleted += 1,
                "realisation" => report.realisations_deleted += 1,
                "trace" => report.traces_deleted += 1,
                _ => report.logs_deleted += 1,
            }
        }
    }
}

/// The realisations of `cache` (both layouts) past the grace period whose output path is not
/// among the cache's live paths: a realisation lives as long as its output. Each is read to
/// learn its output; one that cannot be read or parsed is named as a problem and kept.
async fn realisations_without_output(
    storage: &Storage,
    cache: &CacheLive,
    grace_cutoff_ms: u64,
    report: &mut GcReport,
) -> Vec<object_store::path::Path> {
    let mut doomed = Vec::new();
    for dir in [CacheFile::REALISATIONS, CacheFile::BUILD_TRACE] {
        let listed = match storage.list_objects(&format!("caches/{}/{dir}", cache.name)).await {
            Ok(listed) => listed,
            Err(err) => {
                report.problem(format!("cache {}: {dir} could not be listed: {err}", cache.name));
                continue;
            }
        };
        for meta in listed.into_iter().filter(|m| modified_ms(m) <= grace_cutoff_ms) {
            let out_path = match storage.get_object(&meta.location).await {
                Ok(Some(json)) if dir == CacheFile::REALISATIONS => Realisation::parse_json(&json).map(|r| r.out_path),
                Ok(Some(json)) => BuildTraceValue::parse_json(&json).map(|v| v.out_path),
                Ok(None) => continue,
                Err(err) => Err(err),
            };
            match out_path {
                Ok(out_path) if !cache.paths.contains(&out_path.hash_part()) => doomed.push(meta.location),
                Ok(_) => {}
                Err(err) => report.problem(format!("{}: {err}; kept", meta.location)),
            }
        }
    }
    doomed
}

fn manifest_nar_hash(key: &object_store::path::Path) -> Option<Sha256Hash> {
    let name = key.filename()?.strip_suffix(".json")?;
    Sha256Hash::parse(&format!("sha256:{name}")).ok()
}

/// Collects every `interval` until the process ends; `local_root` is the storage directory of
/// local storage, whose crash leftovers are swept too.
pub async fn periodic(storage: Storage, config: GcConfig, local_root: Option<std::path::PathBuf>) {
    if config.interval == 0 {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(config.interval));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(err) = collect(&storage, &config, false).await {
            tracing::warn!(error = %err, "garbage collection failed; it runs again later");
        }
        if let Some(root) = &local_root {
            let grace = Duration::from_secs(config.grace_period);
            if let Err(err) = sweep_local_staging(root, grace, storage.clock().as_ref(), false) {
                tracing::warn!(error = %err, "sweeping staging files failed; it runs again later");
            }
        }
    }
}

/// Deletes the staging files that a crash (a `kill -9` in the middle of a write) leaves in a
/// local storage directory: `object_store` writes each object to `{key}#{n}` and renames it,
/// and listings never show those names, so the mark and sweep above cannot see them. Returns
/// the files and bytes freed (or that would be, in a dry run). A file is old when `clock` is
/// more than `grace` past its modification time.
pub fn sweep_local_staging(root: &std::path::Path, grace: Duration, clock: &dyn Clock, dry_run: bool) -> Result<(usize, u64)> {
    let mut freed = (0usize, 0u64);
    let old_before_ms = clock.now_ms().saturating_sub(grace.as_millis() as u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err.into()),
        };
        for entry in entries {
            let entry = entry?;
            // Uploads keep writing while this runs: a staging file listed a moment ago may have
            // been renamed into place since.
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err.into()),
            };
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            let staging = entry.file_name().to_str().is_some_and(|name| name.contains('#'));
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64);
            let old = modified_ms.is_some_and(|m| m < old_before_ms);
            if staging && old {
                freed.0 += 1;
                freed.1 += meta.len();
                if !dry_run {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => return Err(err.into()),
                    }
                }
            }
        }
    }
    Ok(freed)
}
