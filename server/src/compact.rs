//! Compaction: the chunks of paths that nobody has read for a while are rewritten into packs
//! (see [`flywheel_core::chunk::pack`]): neighbours in a NAR, and NARs of one package name (its
//! versions) one after another, compressed together at a high zstd level, which stores them in far fewer bytes than a frame each at the level uploads use.
//! Uploads stay at their fast level; this runs later, on the server's schedule or as
//! `flywheel compact`.
//!
//! Order of writes, so that a crash or another replica at any point loses nothing:
//! 1. the pack is written, read back whole and every chunk in it verified;
//! 2. only then does each chunk's object become a pointer into the pack (the pointer replaces
//!    the chunk's own frame, which is how the loose copy goes).
//!
//! A crash between the two leaves a pack that nothing points into (garbage collection deletes
//! it) and chunks still loose (the next run packs them). A reader always finds a chunk object
//! that is either a frame or a pointer into a pack that is stored, verified, and never changed
//! (packs are named by their hash). An upload that writes a chunk again meanwhile just puts a
//! frame back in place of a pointer, which is as good.
//!
//! What stays as it is: chunks of paths read (or published) within `cold-after`, chunk
//! objects written within it (a new upload counts on them), chunks that are packed already, and
//! chunks that only Bazel records use. A pack older than `cold-after` whose chunks mostly went
//! (less than half its bytes still pointed to) is written anew with the chunks that remain.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use flywheel_core::chunk::pack::{self, PackBuilder, PackId, PackIndex, PackPointer};
use flywheel_core::chunk::{self, ChunkHash};
use flywheel_core::manifest::{ChunkRef, ManifestChunks};
use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, Result};
use futures::StreamExt;

use crate::config::CompactionConfig;
use crate::storage::{modified_ms, Storage};

/// Lookups and reads in flight at once.
const PARALLELISM: usize = 16;

/// What a compaction did (or, in a dry run, would do).
#[derive(Debug, Default, Clone)]
pub struct CompactReport {
    /// NARs of cold paths looked over.
    pub cold_nars: usize,
    /// NARs left alone because a path of theirs was read or published lately.
    pub hot_nars: usize,
    /// Chunks moved into packs.
    pub chunks_packed: usize,
    /// Bytes of the chunk frames they replaced.
    pub frame_bytes: u64,
    /// Packs written.
    pub packs_written: usize,
    /// Packs whose chunks were mostly gone, written anew.
    pub packs_rewritten: usize,
    /// Chunks moved out of those into new packs.
    pub chunks_repacked: usize,
    /// Bytes of those packs, with the pointers that replaced the frames.
    pub pack_bytes: u64,
    /// Whether nothing was changed (the pack figures are then not known).
    pub dry_run: bool,
    /// What could not be read or written, each naming its object; compaction carried on past
    /// it, leaving those chunks as they were.
    pub problems: Vec<String>,
}

impl CompactReport {
    fn problem(&mut self, message: String) {
        tracing::warn!(problem = %message, "compaction carries on past a problem");
        self.problems.push(message);
    }
}

/// Packs the cold chunks of every published path, as the module describes.
pub async fn compact(storage: &Storage, config: &CompactionConfig, dry_run: bool) -> Result<CompactReport> {
    let mut report = CompactReport { dry_run, ..Default::default() };
    let now = storage.clock().now_secs();
    let cold_before_ms = storage.clock().now_ms().saturating_sub(config.cold_after.saturating_mul(1000));

    // Which NARs are cold: no path of theirs (in any cache) read or published within
    // `cold-after`. A path whose access record cannot be read counts as hot.
    let mut hot: HashSet<Sha256Hash> = HashSet::new();
    // By package name (the store path's name), so that versions of one package are packed
    // next to each other: their files are much alike, and a frame that holds two versions
    // stores the second for little.
    let mut cold: Vec<(String, Sha256Hash)> = Vec::new();
    for cache in storage.list_caches().await? {
        for hash_part in storage.list_paths(&cache).await? {
            let Some(path) = storage.get_path(&cache, &hash_part).await.unwrap_or(None) else { continue };
            let accessed = storage.get_access(&cache, &hash_part).await.unwrap_or(Some(u64::MAX)).unwrap_or(0);
            if now.saturating_sub(path.created_at.max(accessed)) < config.cold_after {
                hot.insert(path.nar_hash);
            } else {
                let name = path.store_path.split_once('-').map_or("", |(_, name)| name).to_string();
                cold.push((name, path.nar_hash));
            }
        }
    }
    cold.retain(|(_, nar)| !hot.contains(nar));
    cold.sort_unstable();
    let mut seen = HashSet::new();
    let cold: Vec<Sha256Hash> = cold.into_iter().map(|(_, nar)| nar).filter(|nar| seen.insert(*nar)).collect();
    report.hot_nars = hot.len();
    report.cold_nars = cold.len();

    // Chunks a hot NAR uses stay loose, and so fast to read.
    let mut done: HashSet<ChunkHash> = HashSet::new();
    for nar in &hot {
        match chunk_list(storage, nar).await {
            Ok(chunks) => done.extend(chunks.into_iter().map(|c| c.hash)),
            Err(err) => report.problem(format!("manifest {}: {err}", nar.to_base32_bare())),
        }
    }

    let mut packer = Packer::new(storage, config);
    for nar in &cold {
        let chunks = match chunk_list(storage, nar).await {
            Ok(chunks) => chunks,
            Err(err) => {
                report.problem(format!("manifest {}: {err}", nar.to_base32_bare()));
                continue;
            }
        };
        let wanted: Vec<ChunkRef> = chunks.into_iter().filter(|c| done.insert(c.hash)).collect();
        // Loose and old enough, in the NAR's order, read and verified.
        let mut loose = futures::stream::iter(wanted)
            .map(|chunk_ref| {
                let storage = storage.clone();
                async move { (chunk_ref, loose_chunk(&storage, &chunk_ref, cold_before_ms, dry_run).await) }
            })
            .buffered(PARALLELISM);
        while let Some((chunk_ref, found)) = loose.next().await {
            match found {
                Ok(Some((frame_len, data))) => {
                    report.chunks_packed += 1;
                    report.frame_bytes += frame_len;
                    if dry_run {
                        continue;
                    }
                    packer.add(chunk_ref.hash, &data, &mut report).await?;
                }
                Ok(None) => {}
                Err(err) => report.problem(format!("chunk {}: {err}; left as it is", chunk_ref.hash)),
            }
        }
    }

    // Packs whose chunks mostly went (their paths expired or deleted, or the chunks written
    // loose again by an upload) are written anew: their live chunks join the packs of this
    // run, and the old pack, with nothing pointing into it any more, goes at the next garbage
    // collection. A reader holding an old pointer finds the pack gone and reads the chunk's
    // object again.
    // This run's packs first, pointers and all, so that none is taken for a dead one.
    packer.wait(&mut report).await;
    let packs = match storage.list_objects("packs").await {
        Ok(packs) => packs,
        Err(err) => {
            report.problem(format!("packs could not be listed: {err}; none rewritten"));
            Vec::new()
        }
    };
    for meta in packs {
        let Some(id) = Storage::pack_of_key(&meta.location) else { continue };
        if modified_ms(&meta) >= cold_before_ms {
            continue;
        }
        let live = match live_entries(storage, &id, meta.size).await {
            Ok(live) => live,
            Err(err) => {
                report.problem(format!("pack {id}: {err}; left as it is"));
                continue;
            }
        };
        // A pack nothing points into is garbage collection's to delete.
        if live.chunks.is_empty() || live.live_bytes * 2 >= live.total_bytes {
            continue;
        }
        report.packs_rewritten += 1;
        for (hash, pointer) in live.chunks {
            report.chunks_repacked += 1;
            if dry_run {
                continue;
            }
            let data = match storage.read_packed(&hash, &pointer).await {
                Ok(Some(data)) => data,
                Ok(None) => continue,
                Err(err) => {
                    report.problem(format!("chunk {hash} in pack {id}: {err}; left as it is"));
                    continue;
                }
            };
            packer.add(hash, &data, &mut report).await?;
        }
    }
    packer.finish(&mut report).await;
    tracing::info!(
        cold_nars = report.cold_nars,
        chunks = report.chunks_packed,
        packs = report.packs_written,
        rewritten = report.packs_rewritten,
        frame_bytes = report.frame_bytes,
        pack_bytes = report.pack_bytes,
        problems = report.problems.len(),
        dry_run,
        "compaction finished"
    );
    Ok(report)
}

/// Fills packs and writes each one as it is full: compressed on as many blocking threads as
/// there are cores, while the next one is read.
struct Packer<'a> {
    storage: &'a Storage,
    config: &'a CompactionConfig,
    pack: PackBuilder,
    writing: futures::stream::FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = PackOutcome> + Send + 'a>>>,
    workers: usize,
    /// zstd contexts between packs, at most one per writer: kept rather than set up for each
    /// pack, whose tables (12 MiB at level 19) freed and taken again on other threads only
    /// fragmented the heap (a compaction's peak RSS was 250 MiB and more).
    compressors: Compressors,
}

/// zstd contexts for packs, taken by a writer and given back.
type Compressors = Arc<parking_lot::Mutex<Vec<zstd::bulk::Compressor<'static>>>>;

impl<'a> Packer<'a> {
    fn new(storage: &'a Storage, config: &'a CompactionConfig) -> Self {
        Packer {
            storage,
            config,
            pack: PackBuilder::new(config.frame_size as usize, config.zstd_level),
            writing: futures::stream::FuturesUnordered::new(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            compressors: Compressors::default(),
        }
    }

    /// Adds a verified chunk; a full pack goes to be written, once a writer is free.
    async fn add(&mut self, hash: ChunkHash, data: &[u8], report: &mut CompactReport) -> Result<()> {
        self.pack.add(hash, data)?;
        if self.pack.raw_len() >= self.config.pack_size {
            let fresh = PackBuilder::new(self.config.frame_size as usize, self.config.zstd_level);
            let full = std::mem::replace(&mut self.pack, fresh);
            if self.writing.len() >= self.workers {
                if let Some(outcome) = self.writing.next().await {
                    report.add(outcome);
                }
            }
            self.writing.push(Box::pin(write_pack(self.storage, full, self.compressors.clone())));
        }
        Ok(())
    }

    /// Waits until every full pack is written.
    async fn wait(&mut self, report: &mut CompactReport) {
        while let Some(outcome) = self.writing.next().await {
            report.add(outcome);
        }
    }

    /// Writes the last pack, however full, and waits for all.
    async fn finish(self, report: &mut CompactReport) {
        let Packer { storage, pack, mut writing, compressors, .. } = self;
        if pack.chunk_count() > 0 {
            writing.push(Box::pin(write_pack(storage, pack, compressors)));
        }
        while let Some(outcome) = writing.next().await {
            report.add(outcome);
        }
    }
}

/// The chunks of a pack that still point into it, and its bytes, live and all.
struct LiveEntries {
    chunks: Vec<(ChunkHash, PackPointer)>,
    live_bytes: u64,
    total_bytes: u64,
}

async fn live_entries(storage: &Storage, id: &PackId, pack_len: u64) -> Result<LiveEntries> {
    let index = storage.get_pack_index(id, pack_len).await?;
    let total_bytes = index.chunks.iter().map(|e| u64::from(e.len)).sum();
    let hashes: Vec<ChunkHash> = index.chunks.iter().map(|e| e.hash).collect();
    let pointers: Vec<Result<Option<PackPointer>>> = futures::stream::iter(hashes)
        .map(|hash| {
            let storage = storage.clone();
            async move { storage.chunk_pointer(&hash).await }
        })
        .buffered(PARALLELISM)
        .collect()
        .await;
    let mut chunks = Vec::new();
    let mut live_bytes = 0;
    for (entry, pointer) in index.chunks.iter().zip(pointers) {
        if let Some(pointer) = pointer?.filter(|p| p.pack == *id) {
            live_bytes += u64::from(entry.len);
            chunks.push((entry.hash, pointer));
        }
    }
    Ok(LiveEntries { chunks, live_bytes, total_bytes })
}

async fn chunk_list(storage: &Storage, nar: &Sha256Hash) -> Result<Vec<ChunkRef>> {
    let json = storage
        .get_manifest_json(nar)
        .await?
        .ok_or_else(|| Error::not_found(format!("manifest {} is missing", nar.to_base32_bare())))?;
    Ok(ManifestChunks::from_json(&json)?.chunks)
}

/// A chunk stored as a frame of its own and written before `cold_before_ms`: its frame's
/// length and its bytes, verified (in a dry run, no bytes). `None` for a chunk that is packed
/// already, young, or not stored (which is fsck's to report).
async fn loose_chunk(storage: &Storage, chunk_ref: &ChunkRef, cold_before_ms: u64, dry_run: bool) -> Result<Option<(u64, Vec<u8>)>> {
    let Some((size, written_ms)) = storage.chunk_meta(&chunk_ref.hash).await? else { return Ok(None) };
    // Only an object of a pointer's length may be one; no second lookup for the others.
    let pointer_sized = size == flywheel_core::chunk::pack::POINTER_LEN as u64;
    if written_ms >= cold_before_ms || (pointer_sized && storage.chunk_pointer(&chunk_ref.hash).await?.is_some()) {
        return Ok(None);
    }
    if dry_run {
        return Ok(Some((size, Vec::new())));
    }
    let frame = storage.get_chunk(&chunk_ref.hash).await?;
    let data = chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize)?;
    Ok(Some((frame.len() as u64, data)))
}

/// What writing one pack came to.
#[derive(Default)]
struct PackOutcome {
    written: bool,
    bytes: u64,
    problems: Vec<String>,
}

impl CompactReport {
    fn add(&mut self, outcome: PackOutcome) {
        self.packs_written += usize::from(outcome.written);
        self.pack_bytes += outcome.bytes;
        for problem in outcome.problems {
            self.problem(problem);
        }
    }
}

/// Writes a pack, reads it back and verifies it, then points its chunks' objects into it.
async fn write_pack(storage: &Storage, pack: PackBuilder, compressors: Compressors) -> PackOutcome {
    let failed = |problem: String| PackOutcome { problems: vec![problem], ..Default::default() };
    // zstd at a high level takes a while: off the runtime's threads.
    let level = pack.level();
    let finish = move || {
        let taken = compressors.lock().pop();
        let mut compressor = match taken {
            Some(compressor) => compressor,
            None => pack::pack_compressor(level)?,
        };
        let built = pack.finish_with(&mut compressor);
        compressors.lock().push(compressor);
        built
    };
    let (bytes, id, index) = match tokio::task::spawn_blocking(finish).await {
        Ok(Ok(built)) => built,
        Ok(Err(err)) => return failed(format!("making a pack: {err}")),
        Err(err) => return failed(format!("making a pack: {err}")),
    };
    let pack_len = bytes.len() as u64;
    if let Err(err) = storage.put_pack(&id, Bytes::from(bytes)).await {
        return failed(format!("writing pack {id}: {err}"));
    }
    // What is stored, not what was sent, must hold every chunk before anything points to it.
    let checked = match storage.get_pack(&id).await {
        Ok(Some(stored)) if ChunkHash::of(&stored) == id => tokio::task::spawn_blocking(move || {
            PackIndex::parse(&stored, pack_len).and_then(|stored_index| stored_index.verify(&stored).map(|bad| bad.is_empty()))
        })
        .await
        .unwrap_or_else(|err| Err(Error::internal(format!("verifying a pack: {err}")))),
        Ok(_) => Ok(false),
        Err(err) => Err(err),
    };
    match checked {
        Ok(true) => {}
        Ok(false) => return failed(format!("pack {id} did not read back as written; nothing points into it")),
        Err(err) => return failed(format!("reading pack {id} back: {err}; nothing points into it")),
    }
    let mut outcome = PackOutcome { written: true, bytes: pack_len, problems: Vec::new() };
    let pointers: Vec<_> = index.chunks.iter().map(|entry| (entry.hash, index.pointer(id, entry))).collect();
    let written: Vec<(ChunkHash, Result<()>)> = futures::stream::iter(pointers)
        .map(|(hash, pointer)| {
            let storage = storage.clone();
            async move { (hash, storage.put_chunk_pointer(&hash, &pointer).await) }
        })
        .buffer_unordered(PARALLELISM)
        .collect()
        .await;
    for (hash, result) in written {
        match result {
            Ok(()) => outcome.bytes += flywheel_core::chunk::pack::POINTER_LEN as u64,
            // The chunk stays a frame of its own: as good, only bigger.
            Err(err) => outcome.problems.push(format!("pointing chunk {hash} into pack {id}: {err}")),
        }
    }
    outcome
}

/// Compacts every `interval` until the process ends.
pub async fn periodic(storage: Storage, config: CompactionConfig) {
    if config.interval == 0 {
        return;
    }
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(config.interval));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(err) = compact(&storage, &config, false).await {
            tracing::warn!(error = %err, "compaction failed; it runs again later");
        }
    }
}
