//! The FUSE filesystem: a read-only store directory whose paths appear on lookup and whose
//! file contents arrive chunk by chunk on first read.
//!
//! Inode numbers: 1 is the store directory; node `n` of the `p`-th path registered is
//! `(p + 1) << 32 | n`. Paths are immutable and never unregistered, so an inode number stays
//! valid for the life of the mount and `forget` has nothing to do.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flywheel_client::ChunkStore;
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::metrics::{Collect, Exposition, Kind, Labels};
use flywheel_core::nix::StorePath;
use flywheel_core::{Error, ErrorKind, Result};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use parking_lot::{Mutex, RwLock};
use tracing::{debug, debug_span, info_span, warn, Instrument};

use crate::background::{Background, Source};
use crate::errno::errno;
use crate::files::{self, MaterializedFiles};
use crate::trace::Recorder;
use crate::tree::{NodeKind, PathTree};

/// Store paths never change, so the kernel may keep what it learns about them for long.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The store directory's attributes change as paths are registered; the mount tells the
/// kernel when (see [`Inner::root_changed`]), so this is only a fallback. Not zero: with
/// `default_permissions`, every path lookup through the root checks the root's attributes.
const ROOT_TTL: Duration = Duration::from_secs(1);
/// How often the mount looks for paths that other processes sharing the cache dir cached.
const CACHED_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// A path missing now may be pushed in a moment.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// How far ahead of a sequential reader chunks are fetched.
const READAHEAD: u64 = 8 * 1024 * 1024;
/// NAR bytes between the end of one file's contents and the start of the next file's in NAR
/// order (closing tokens, the next entry's name and headers), at most, for a walk to count as
/// sequential.
const NAR_GAP: u64 = 4096;
/// Cross-file readahead starts once a walk through a path in NAR order has read this much, and
/// reaches at most this far ahead.
const PATH_READAHEAD_MIN: u64 = 256 * 1024;
const PATH_READAHEAD_MAX: u64 = 8 * 1024 * 1024;
/// Nix's canonical modification time.
fn mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1)
}

/// Settings of the filesystem itself.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Longest wait for the server on any operation.
    pub offline_timeout: Duration,
    /// Bytes of decompressed chunks kept in memory.
    pub hot_bytes: usize,
    /// Where whole files read through the mount are kept decompressed for passthrough, and
    /// their byte budget; `None` turns passthrough off.
    pub materialized: Option<(std::path::PathBuf, u64)>,
    /// Store paths up to this NAR size are fetched whole in the background once a job reads
    /// from them (and no trace covers them); 0 turns the background fill off.
    pub fill_max_nar_size: u64,
    /// In which order the fill fetches a path's chunks.
    pub fill_order: FillOrder,
    /// Background requests allowed in flight while reads of the mount wait for the server.
    pub fill_alongside_reads: usize,
}

/// The order in which the background fill fetches a store path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOrder {
    /// The NAR's order: what a walk through the tree reads next.
    Nar,
    /// The chunks of the smallest files first (modules, headers, configs: what a job opens
    /// one by one), then the rest in NAR order.
    SmallFilesFirst,
}

/// Decompressed chunks in memory, least recently used dropped first, bounded in bytes.
struct HotChunks {
    map: lru::LruCache<ChunkHash, Arc<[u8]>>,
    bytes: usize,
    limit: usize,
}

impl HotChunks {
    fn get(&mut self, hash: &ChunkHash) -> Option<Arc<[u8]>> {
        self.map.get(hash).cloned()
    }

    fn put(&mut self, hash: ChunkHash, data: Arc<[u8]>) {
        if data.len() > self.limit {
            return;
        }
        self.bytes += data.len();
        if let Some(old) = self.map.put(hash, data) {
            self.bytes -= old.len();
        }
        while self.bytes > self.limit {
            match self.map.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

/// Per open file: how far a sequential reader got, how far readahead reached, and which bytes
/// were served (a file served whole gets materialized).
struct OpenFile {
    ino: INodeNo,
    mode: IoMode,
    last_end: AtomicU64,
    prefetched_to: AtomicU64,
    served: Mutex<ServedRanges>,
}

impl OpenFile {
    fn new(ino: INodeNo) -> Self {
        OpenFile {
            ino,
            mode: IoMode::Cached,
            last_end: AtomicU64::default(),
            prefetched_to: AtomicU64::default(),
            served: Mutex::default(),
        }
    }
}

/// The byte ranges a handle was served, merged; gives up on a reader that jumps around a lot.
#[derive(Default)]
struct ServedRanges {
    ranges: Vec<(u64, u64)>,
    given_up: bool,
}

impl ServedRanges {
    /// Records `[start, end)`; true when, with it, `[0, size)` has been served whole.
    fn add(&mut self, start: u64, end: u64, size: u64) -> bool {
        if self.given_up {
            return false;
        }
        let at = self.ranges.partition_point(|&(s, _)| s < start);
        self.ranges.insert(at, (start, end));
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
        if self.ranges.len() > 64 {
            self.given_up = true;
            self.ranges.clear();
            return false;
        }
        self.covers(size)
    }

    /// Whether `[0, size)` has been served whole.
    fn covers(&self, size: u64) -> bool {
        self.ranges.first().is_some_and(|&(s, e)| s == 0 && e >= size)
    }
}

/// What the filesystem served, for `/metrics`.
#[derive(Debug, Default)]
struct FsStats {
    lookups: AtomicU64,
    getattrs: AtomicU64,
    readdirs: AtomicU64,
    opendirs: AtomicU64,
    opens: AtomicU64,
    /// READ requests answered by the mount.
    reads: AtomicU64,
    /// Bytes those reads returned.
    read_bytes: AtomicU64,
    /// Opens answered with a backing file (the kernel reads it without the mount).
    passthrough_opens: AtomicU64,
    /// Files written whole to the materialized files.
    materialized_files: AtomicU64,
}

/// The kernel refuses to have an inode open through the page cache and through passthrough at
/// once (the second kind of open fails), so the mount tracks both kinds per inode.
struct IoModes {
    /// The backing file of each inode in passthrough mode, and its open handles: the kernel
    /// wants one backing id per inode for as long as any handle is open. Ids outlive their
    /// handles (up to [`BACKING_KEPT`] unused ones), so reopening a hot file costs no file
    /// open and no ioctl.
    backing: lru::LruCache<INodeNo, (Arc<fuser::BackingId>, usize)>,
    /// Handles open through the page cache, per inode.
    cached: HashMap<INodeNo, usize>,
}

impl IoModes {
    /// When handles of the inode are open, a new one joins their mode: `Some(Some(id))` for
    /// passthrough, `Some(None)` for the page cache (counted here); `None` when none is open.
    fn join_open(&mut self, ino: INodeNo) -> Option<Option<Arc<fuser::BackingId>>> {
        if let Some((id, handles)) = self.backing.get_mut(&ino) {
            if *handles > 0 {
                *handles += 1;
                return Some(Some(id.clone()));
            }
        }
        let cached = self.cached.get_mut(&ino)?;
        *cached += 1;
        Some(None)
    }

    /// A kept backing id of the inode, now held by one more handle.
    fn reuse_backing(&mut self, ino: INodeNo) -> Option<Arc<fuser::BackingId>> {
        let (id, handles) = self.backing.get_mut(&ino)?;
        *handles += 1;
        Some(id.clone())
    }
}

/// How an open handle reads its file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IoMode {
    Cached,
    Passthrough,
}

/// Backing ids kept open for files no handle holds.
const BACKING_KEPT: usize = 256;

/// Materializations running at once; more files read to the end meanwhile are skipped (and
/// materialized on a later full read).
const MATERIALIZING_MAX: usize = 2;

pub(crate) struct Inner {
    pub(crate) store: ChunkStore,
    runtime: tokio::runtime::Handle,
    pub(crate) config: FsConfig,
    paths: RwLock<Vec<Arc<PathTree>>>,
    by_hash: RwLock<HashMap<String, usize>>,
    hot: Mutex<HotChunks>,
    open_files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    /// Tells the kernel to drop what it cached about the root; set once the session exists.
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// Whole files on disk for passthrough, when enabled.
    files: Option<MaterializedFiles>,
    /// Whether the kernel accepted passthrough.
    passthrough: AtomicBool,
    /// How each inode's open handles read it; see [`IoModes`].
    io: Mutex<IoModes>,
    materializing: std::sync::atomic::AtomicUsize,
    stats: FsStats,
    /// What readers needed, for an access trace.
    pub(crate) recorder: Recorder,
    /// Chunks fetched ahead of readers.
    pub(crate) background: Arc<Background>,
}

/// The filesystem. Hand it to `fuser`; every operation takes `&self`, so a multi-threaded
/// session serves concurrent requests in parallel, and reads that wait for the network run on
/// the tokio runtime without holding a FUSE thread.
#[derive(Clone)]
pub struct FlywheelFs {
    inner: Arc<Inner>,
}

fn ino(path: usize, node: u32) -> INodeNo {
    INodeNo(((path as u64 + 1) << 32) | u64::from(node))
}

fn split_ino(ino: INodeNo) -> Option<(usize, u32)> {
    let path = (ino.0 >> 32).checked_sub(1)?;
    Some((path as usize, ino.0 as u32))
}

fn attr(ino: INodeNo, kind: &NodeKind) -> FileAttr {
    let (kind, perm, size, nlink) = match kind {
        NodeKind::Directory { children } => (FileType::Directory, 0o555, 0, 2 + children.len() as u32),
        NodeKind::File { size, executable, .. } => {
            (FileType::RegularFile, if *executable { 0o555 } else { 0o444 }, *size, 1)
        }
        NodeKind::Symlink { target } => (FileType::Symlink, 0o777, target.len() as u64, 1),
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: mtime(),
        mtime: mtime(),
        ctime: mtime(),
        crtime: mtime(),
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The store directory's attributes; its modification time moves by a nanosecond per path
/// registered, so the kernel drops its cached listing when paths appear.
fn root_attr(registered: usize) -> FileAttr {
    let mut attr = attr(INodeNo::ROOT, &NodeKind::Directory { children: Vec::new() });
    attr.perm = 0o555;
    attr.mtime = mtime() + Duration::from_nanos(registered as u64);
    attr.ctime = attr.mtime;
    attr
}

fn negative_entry() -> FileAttr {
    let mut attr = root_attr(0);
    attr.ino = INodeNo(0);
    attr
}

impl FlywheelFs {
    /// A filesystem over `store`, running network work on `runtime`.
    pub fn new(store: ChunkStore, runtime: tokio::runtime::Handle, config: FsConfig) -> Self {
        let limit = config.hot_bytes;
        let files = config.materialized.as_ref().and_then(|(dir, budget)| match MaterializedFiles::open(dir, *budget) {
            Ok(files) => Some(files),
            Err(err) => {
                warn!(dir = %dir.display(), "materialized files are off: {err}");
                None
            }
        });
        let background = Background::start(store.clone(), config.offline_timeout, config.fill_alongside_reads, &runtime);
        FlywheelFs {
            inner: Arc::new(Inner {
                store,
                runtime,
                config,
                paths: RwLock::default(),
                by_hash: RwLock::default(),
                hot: Mutex::new(HotChunks { map: lru::LruCache::unbounded(), bytes: 0, limit }),
                open_files: Mutex::default(),
                next_fh: AtomicU64::new(1),
                notifier: std::sync::OnceLock::new(),
                files,
                passthrough: AtomicBool::new(false),
                io: Mutex::new(IoModes { backing: lru::LruCache::unbounded(), cached: HashMap::new() }),
                materializing: Default::default(),
                stats: FsStats::default(),
                recorder: Recorder::new(),
                background,
            }),
        }
    }
}

impl FlywheelFs {
    /// The shared state, for the control socket.
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Hands over the session's notifier, so that new paths show up in cached listings of the
    /// root; and starts looking for paths other processes sharing the cache dir cached.
    pub fn start_notifications(&self, notifier: fuser::Notifier) {
        let _ = self.inner.notifier.set(notifier);
        let inner = Arc::downgrade(&self.inner);
        self.inner.runtime.spawn(async move {
            loop {
                tokio::time::sleep(CACHED_SCAN_INTERVAL).await;
                let Some(inner) = inner.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || inner.register_cached()).await;
            }
        });
    }

    /// The filesystem's metrics, for `/metrics`.
    pub fn metrics(&self) -> Arc<dyn Collect> {
        Arc::new(MountMetrics(self.inner.clone()))
    }
}

/// The mount's FUSE requests, reads, passthrough files and background fetches.
struct MountMetrics(Arc<Inner>);

impl Collect for MountMetrics {
    fn collect(&self, out: &mut Exposition) {
        let inner = &self.0;
        let stats = &inner.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let ops = [
            ("lookup", &stats.lookups),
            ("getattr", &stats.getattrs),
            ("opendir", &stats.opendirs),
            ("readdir", &stats.readdirs),
            ("open", &stats.opens),
            ("read", &stats.reads),
        ];
        out.family(
            "flywheel_fuse_requests_total",
            Kind::Counter,
            "FUSE requests by operation.",
            ops.map(|(op, counter)| (Labels::of(&[("op", op)]), load(counter) as f64)),
        );
        out.counter("flywheel_fuse_reads_total", "READ requests the mount answered.", load(&stats.reads));
        out.counter("flywheel_fuse_read_bytes_total", "Bytes those reads returned.", load(&stats.read_bytes));
        out.counter("flywheel_fuse_passthrough_opens_total", "Opens answered with a backing file, read by the kernel directly.", load(&stats.passthrough_opens));
        out.counter("flywheel_fuse_materialized_files_total", "Files written whole to disk for passthrough.", load(&stats.materialized_files));
        let bytes = inner.files.as_ref().map_or(0, |f| f.used_bytes());
        out.gauge("flywheel_fuse_materialized_bytes", "Bytes of files kept whole on disk for passthrough.", bytes as f64);
        out.gauge("flywheel_fuse_paths", "Store paths known to the mount.", inner.paths.read().len() as f64);
        let background = &inner.background.stats;
        out.family(
            "flywheel_fuse_prefetched_chunks_total",
            Kind::Counter,
            "Chunks fetched ahead of readers, by source.",
            [("trace", &background.trace_chunks), ("fill", &background.fill_chunks)]
                .map(|(source, counter)| (Labels::of(&[("source", source)]), load(counter) as f64)),
        );
        out.counter("flywheel_fuse_prefetch_failures_total", "Background requests that failed (the chunks are fetched on demand instead).", load(&background.failed_requests));
        let pending = inner.background.pending(Source::Trace) + inner.background.pending(Source::Fill);
        out.gauge("flywheel_fuse_prefetch_pending", "Background requests queued or running.", pending as f64);
        out.gauge("flywheel_fuse_trace_chunks", "Chunks the current access trace recording holds.", inner.recorder.len() as f64);
    }
}

impl Inner {
    fn node(&self, ino: INodeNo) -> Option<(Arc<PathTree>, usize, u32)> {
        let (path, node) = split_ino(ino)?;
        let tree = self.paths.read().get(path)?.clone();
        if (node as usize) < tree.nodes.len() {
            Some((tree, path, node))
        } else {
            None
        }
    }

    fn registered(&self, hash_part: &str) -> Option<(usize, Arc<PathTree>)> {
        let index = *self.by_hash.read().get(hash_part)?;
        Some((index, self.paths.read()[index].clone()))
    }

    /// Makes a path known to the mount; idempotent.
    fn register(&self, hash_part: &str, base_name: String, manifest: &flywheel_core::api::v1::chunks::PathManifest) -> (usize, Arc<PathTree>) {
        let mut by_hash = self.by_hash.write();
        if let Some(&index) = by_hash.get(hash_part) {
            return (index, self.paths.read()[index].clone());
        }
        let tree = PathTree::build(base_name, manifest);
        let mut paths = self.paths.write();
        paths.push(tree.clone());
        by_hash.insert(hash_part.to_string(), paths.len() - 1);
        self.root_changed();
        (paths.len() - 1, tree)
    }

    /// Drops the kernel's cached listing and attributes of the root after a path appeared.
    /// Sent from the blocking pool: the kernel may hold the root while it waits for the lookup
    /// that registered the path.
    fn root_changed(&self) {
        if let Some(notifier) = self.notifier.get().cloned() {
            self.runtime.spawn_blocking(move || {
                if let Err(err) = notifier.inval_inode(INodeNo::ROOT, 0, 0) {
                    debug!("invalidating the root's listing failed: {err}");
                }
            });
        }
    }

    /// Finds a store path by base name: already registered, in the local cache, or on the
    /// server. `NotFound` when the server does not have it (or has it under another name).
    async fn resolve(&self, base_name: &str) -> Result<(usize, Arc<PathTree>)> {
        let path = StorePath::from_base_name(base_name)?;
        let hash_part = path.hash_part();
        if let Some((index, tree)) = self.registered(&hash_part) {
            return if tree.base_name == base_name { Ok((index, tree)) } else { Err(Error::not_found(base_name)) };
        }
        let manifest = match self.store.cache().get_manifest(&hash_part) {
            Some(manifest) => manifest,
            None => {
                let fetched = tokio::time::timeout(self.config.offline_timeout, self.store.api().manifest(&hash_part))
                    .await
                    .map_err(|_| Error::unavailable("the server did not answer within the offline timeout"))??;
                self.store.cache().put_manifest(&hash_part, &fetched);
                fetched
            }
        };
        let served_name = manifest.store_path.rsplit('/').next().unwrap_or_default();
        if served_name != base_name {
            return Err(Error::not_found(format!("{base_name} is not in the cache (its hash names {served_name})")));
        }
        Ok(self.register(&hash_part, base_name.to_string(), &manifest))
    }

    /// Registers every path whose manifest the local cache holds, for a listing of the root.
    fn register_cached(&self) {
        for hash_part in self.store.cache().manifest_hashes() {
            if self.by_hash.read().contains_key(&hash_part) {
                continue;
            }
            if let Some(manifest) = self.store.cache().get_manifest(&hash_part) {
                if let Some(base_name) = manifest.store_path.rsplit('/').next() {
                    self.register(&hash_part, base_name.to_string(), &manifest);
                }
            }
        }
    }

    /// Chunks of `tree` from memory when there, else from the store (cache or server), bounded
    /// by the offline timeout.
    async fn chunks(&self, tree: &PathTree, chunks: &[ChunkRef]) -> Result<Vec<Arc<[u8]>>> {
        let mut out: Vec<Option<Arc<[u8]>>> = {
            let mut hot = self.hot.lock();
            chunks.iter().map(|c| hot.get(&c.hash)).collect()
        };
        let missing: Vec<ChunkRef> =
            chunks.iter().zip(&out).filter(|(_, d)| d.is_none()).map(|(c, _)| *c).collect();
        if !missing.is_empty() {
            let demand = self.background.demand();
            let fetched = tokio::time::timeout(self.config.offline_timeout, self.store.get_many(tree.hash_part(), &missing))
                .await
                .map_err(|_| Error::unavailable("chunks did not arrive within the offline timeout"))??;
            drop(demand);
            let mut hot = self.hot.lock();
            let mut fetched = missing.iter().zip(fetched);
            for slot in out.iter_mut().filter(|d| d.is_none()) {
                if let Some((chunk, data)) = fetched.next() {
                    hot.put(chunk.hash, data.clone());
                    *slot = Some(data);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Copies file bytes out of the covering chunks.
    fn assemble(chunks: &[Arc<[u8]>], first_offset: u64, start: u64, end: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut at = first_offset;
        for chunk in chunks {
            let chunk_end = at + chunk.len() as u64;
            let from = start.max(at);
            let to = end.min(chunk_end);
            if from < to {
                out.extend_from_slice(&chunk[(from - at) as usize..(to - at) as usize]);
            }
            at = chunk_end;
        }
        out
    }

    /// Writes a file that was just served whole to the materialized files, in the background,
    /// from its (now local) chunks, so that later opens use passthrough.
    fn materialize(self: &Arc<Self>, tree: &Arc<PathTree>, nar_offset: u64, size: u64) {
        let Some(files) = &self.files else { return };
        if !self.passthrough.load(Ordering::Relaxed) {
            return;
        }
        let key = files::key(&tree.nar_hash, nar_offset);
        if !files.claim(&key, size) {
            return;
        }
        if self.materializing.fetch_add(1, Ordering::Relaxed) >= MATERIALIZING_MAX {
            self.materializing.fetch_sub(1, Ordering::Relaxed);
            files.release_claim(&key);
            return;
        }
        let (inner, tree) = (self.clone(), tree.clone());
        self.runtime.spawn_blocking(move || {
            let span = debug_span!("materialize", store_path = %tree.base_name, nar_offset, size);
            let _entered = span.enter();
            if let Err(err) = inner.write_materialized(&tree, &key, nar_offset, size) {
                debug!("materializing failed: {err}");
            }
            inner.materializing.fetch_sub(1, Ordering::Relaxed);
        });
    }

    fn write_materialized(&self, tree: &PathTree, key: &str, nar_offset: u64, size: u64) -> Result<()> {
        let Some(files) = &self.files else { return Ok(()) };
        let io = |e: std::io::Error| Error::unavailable(format!("writing a materialized file: {e}"));
        let mut writer = files.writer(key).map_err(io)?;
        let (mut at, end) = (nar_offset, nar_offset + size);
        while at < end {
            let to = (at + READAHEAD).min(end);
            let (covering, first) = tree.covering(at, to);
            let chunks = self.runtime.block_on(self.chunks(tree, covering))?;
            writer.write(&Inner::assemble(&chunks, first, at, to)).map_err(io)?;
            at = to;
        }
        writer.finish().map_err(io)?;
        self.stats.materialized_files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Opens a handle of a regular file: through passthrough when the file is materialized
    /// (or other handles of it already are), through the page cache otherwise; returns the
    /// backing id for passthrough.
    fn open_io(&self, ino_: INodeNo, tree: &PathTree, nar_offset: u64, size: u64, reply: &ReplyOpen) -> Option<Arc<fuser::BackingId>> {
        {
            let mut io = self.io.lock();
            if let Some(settled) = io.join_open(ino_) {
                return settled;
            }
            let passthrough = self.passthrough.load(Ordering::Relaxed) && size >= files::MIN_FILE_SIZE;
            if !passthrough || self.files.is_none() {
                *io.cached.entry(ino_).or_default() += 1;
                return None;
            }
            if let Some(id) = io.reuse_backing(ino_) {
                return Some(id);
            }
        }
        // Checking the copy hashes it (once per process): not under the lock.
        let file = self.files.as_ref().and_then(|files| files.get(&files::key(&tree.nar_hash, nar_offset), size));
        let mut io = self.io.lock();
        // Other opens may have decided meanwhile; the two modes never mix.
        if let Some(settled) = io.join_open(ino_) {
            return settled;
        }
        if let Some(id) = io.reuse_backing(ino_) {
            return Some(id);
        }
        let opened = match &file {
            Some(file) => match reply.open_backing(file) {
                Ok(id) => Some(Arc::new(id)),
                Err(err) => {
                    warn!("the kernel refused a backing file, passthrough is off: {err}");
                    self.passthrough.store(false, Ordering::Relaxed);
                    None
                }
            },
            _ => None,
        };
        let Some(id) = opened else {
            *io.cached.entry(ino_).or_default() += 1;
            return None;
        };
        io.backing.put(ino_, (id.clone(), 1));
        // Close the least recently used ids no handle holds (dropping one closes it).
        while io.backing.len() > BACKING_KEPT {
            let idle = io.backing.iter().rev().find(|(_, (_, handles))| *handles == 0).map(|(ino, _)| *ino);
            match idle {
                Some(ino) => {
                    io.backing.pop(&ino);
                }
                None => break,
            }
        }
        Some(id)
    }

    /// Forgets a handle opened by [`Inner::open_io`].
    fn release_io(&self, ino_: INodeNo, mode: IoMode) {
        let mut io = self.io.lock();
        match mode {
            // The id stays for the next open; `open_io` closes idle ones past the limit.
            IoMode::Passthrough => {
                if let Some((_, handles)) = io.backing.peek_mut(&ino_) {
                    *handles = handles.saturating_sub(1);
                }
            }
            IoMode::Cached => {
                if let Some(handles) = io.cached.get_mut(&ino_) {
                    *handles = handles.saturating_sub(1);
                    if *handles == 0 {
                        io.cached.remove(&ino_);
                    }
                }
            }
        }
    }

    /// Queues the whole path for the background fill the first time a job reads from it,
    /// unless a trace covers it or it is larger than the fill's limit.
    fn start_fill(&self, tree: &Arc<PathTree>) {
        if tree.fill_claimed.load(Ordering::Relaxed) || tree.fill_claimed.swap(true, Ordering::Relaxed) {
            return;
        }
        let limit = self.config.fill_max_nar_size;
        if limit == 0 || tree.nar_size() > limit {
            return;
        }
        debug!(store_path = %tree.base_name, chunks = tree.chunks.len(), "background fill queued");
        match self.config.fill_order {
            FillOrder::Nar => self.background.queue(tree, &tree.chunks, Source::Fill),
            FillOrder::SmallFilesFirst => self.background.queue(tree, &small_files_first(tree), Source::Fill),
        }
    }

    /// Queues the chunks `trace` names for the background, in trace order, path by path:
    /// each path is looked up (registering it), and chunks its manifest does not list (the
    /// path changed, or the trace is stale) are left out. Paths the cache no longer has are
    /// skipped. Returns (paths, chunks queued, paths skipped).
    pub(crate) async fn prefetch_trace(self: &Arc<Self>, trace: &flywheel_core::api::v1::traces::Trace) -> (usize, usize, usize) {
        // Per path the trace names: its tree and the chunks its manifest lists, or `None` when
        // the mount cannot open it.
        type Listed = Option<(Arc<PathTree>, std::collections::HashSet<ChunkRef>)>;
        let mut trees: HashMap<&str, Listed> = HashMap::new();
        let (mut queued, mut skipped) = (0, 0);
        for (base_name, chunks) in trace.runs() {
            if !trees.contains_key(base_name) {
                let resolved = match self.resolve(base_name).await {
                    Ok((_, tree)) => {
                        // The trace decides what of this path is fetched, not a whole-path fill.
                        tree.fill_claimed.store(true, Ordering::Relaxed);
                        let listed = tree.chunks.iter().copied().collect();
                        Some((tree, listed))
                    }
                    Err(err) => {
                        debug!(store_path = %base_name, "trace names a path the mount cannot open: {err}");
                        skipped += 1;
                        None
                    }
                };
                trees.insert(base_name, resolved);
            }
            let Some(Some((tree, listed))) = trees.get(base_name) else { continue };
            let wanted: Vec<ChunkRef> = chunks.into_iter().filter(|c| listed.contains(c)).collect();
            queued += wanted.len();
            self.background.queue(tree, &wanted, Source::Trace);
        }
        (trees.len(), queued, skipped)
    }

    /// Readahead across files: a file whose first read starts right after where the last read
    /// of this path ended (the next file in NAR order, as a `cp -r`, `tar` or a build reading
    /// a tree goes) loads the following chunks of the NAR in the background, whatever files
    /// they hold. The window is at most the bytes this walk has read so far, so a walk that
    /// stops has fetched at most twice what it read; a jump ends the walk.
    fn path_readahead(self: &Arc<Self>, tree: &Arc<PathTree>, file_start: bool, start: u64, end: u64) {
        let last = tree.last_read_end.swap(end, Ordering::Relaxed);
        let continues = last != u64::MAX && start >= last && start - last <= NAR_GAP;
        if !continues {
            tree.walk_bytes.store(end - start, Ordering::Relaxed);
            return;
        }
        let walked = tree.walk_bytes.fetch_add(end - start, Ordering::Relaxed) + (end - start);
        // Within a file, the per-file readahead does the work.
        if !file_start || walked < PATH_READAHEAD_MIN {
            return;
        }
        let nar_size = tree.offsets.last().copied().unwrap_or(0);
        self.prefetch(tree, &tree.prefetched_to, end, walked.min(PATH_READAHEAD_MAX), nar_size, "path");
    }

    /// Loads, in the background, the chunks of the next [`READAHEAD`] bytes of a file that is
    /// read sequentially, from the local cache or the server, into the hot chunks.
    fn readahead(self: &Arc<Self>, tree: &Arc<PathTree>, open: &OpenFile, from: u64, file_end: u64) {
        self.prefetch(tree, &open.prefetched_to, from, READAHEAD, file_end, "file");
    }

    /// Loads the chunks of NAR bytes up to `window` past `from` (never past `end`) into the
    /// hot chunks in the background, unless `reached` (how far this readahead got, updated
    /// here) is still more than half a window ahead.
    fn prefetch(self: &Arc<Self>, tree: &Arc<PathTree>, reached: &AtomicU64, from: u64, window: u64, end: u64, kind: &'static str) {
        let start = reached.load(Ordering::Relaxed).max(from);
        if start >= end || start > from + window / 2 {
            return;
        }
        let to = (from + window).min(end);
        reached.store(to, Ordering::Relaxed);
        let (chunks, _) = tree.covering(start, to);
        let wanted: Vec<ChunkRef> = {
            let mut hot = self.hot.lock();
            // Chunks in the local cache count too: loading them into memory ahead of the reader
            // (decompressed and verified, in parallel) is what makes warm reads fast.
            chunks.iter().filter(|c| hot.get(&c.hash).is_none()).copied().collect()
        };
        if wanted.is_empty() {
            return;
        }
        let (inner, tree) = (self.clone(), tree.clone());
        let span = debug_span!("readahead", kind, store_path = %tree.base_name, chunks = wanted.len());
        self.runtime.spawn(
            async move {
                if let Err(err) = inner.chunks(&tree, &wanted).await {
                    tracing::debug!("readahead failed: {err}");
                }
            }
            .instrument(span),
        );
    }
}

impl Filesystem for FlywheelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_CACHE_SYMLINKS);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // A listing of the root then checks the root's attributes (and so its modification
        // time) first. Files never change, so for them it costs nothing.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_AUTO_INVAL_DATA);
        if self.inner.files.is_some() {
            // Depth 1: the backing files sit on a plain filesystem, and an overlayfs may still
            // use this mount as its lower layer (lazy mode).
            let accepted = config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !accepted {
                warn!("the kernel does not offer FUSE passthrough; files are always served through chunks");
            }
            self.inner.passthrough.store(accepted, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.inner.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        if parent == INodeNo::ROOT {
            if StorePath::from_base_name(name).is_err() {
                return reply.entry(&NEGATIVE_TTL, &negative_entry(), Generation(0));
            }
            let inner = self.inner.clone();
            let name = name.to_string();
            let span = info_span!("lookup", store_path = %name);
            self.inner.runtime.spawn(async move {
                match inner.resolve(&name).await {
                    Ok((index, tree)) => reply.entry(&TTL, &attr(ino(index, 0), &tree.nodes[0].kind), Generation(0)),
                    Err(err) if err.kind() == ErrorKind::NotFound || err.kind() == ErrorKind::InvalidInput => {
                        reply.entry(&NEGATIVE_TTL, &negative_entry(), Generation(0))
                    }
                    Err(err) => {
                        warn!("lookup of {name} failed: {err}");
                        reply.error(errno(err.kind()))
                    }
                }
            }.instrument(span));
            return;
        }
        let Some((tree, path, node)) = self.inner.node(parent) else { return reply.error(Errno::ENOENT) };
        let NodeKind::Directory { children } = &tree.nodes[node as usize].kind else {
            return reply.error(Errno::ENOTDIR);
        };
        match children.binary_search_by(|(child, _)| child.as_str().cmp(name)) {
            Ok(i) => {
                let child = children[i].1;
                reply.entry(&TTL, &attr(ino(path, child), &tree.nodes[child as usize].kind), Generation(0))
            }
            Err(_) => reply.entry(&TTL, &negative_entry(), Generation(0)),
        }
    }

    fn getattr(&self, _req: &Request, ino_: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.inner.stats.getattrs.fetch_add(1, Ordering::Relaxed);
        if ino_ == INodeNo::ROOT {
            return reply.attr(&ROOT_TTL, &root_attr(self.inner.paths.read().len()));
        }
        match self.inner.node(ino_) {
            Some((tree, _, node)) => reply.attr(&TTL, &attr(ino_, &tree.nodes[node as usize].kind)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino_: INodeNo, reply: ReplyData) {
        match self.inner.node(ino_) {
            Some((tree, _, node)) => match &tree.nodes[node as usize].kind {
                NodeKind::Symlink { target } => reply.data(target.as_bytes()),
                _ => reply.error(Errno::EINVAL),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino_: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.inner.stats.opens.fetch_add(1, Ordering::Relaxed);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some((tree, _, node)) = self.inner.node(ino_) else { return reply.error(Errno::ENOENT) };
        let NodeKind::File { size, nar_offset, .. } = tree.nodes[node as usize].kind else {
            return reply.error(Errno::EISDIR);
        };
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = self.inner.open_io(ino_, &tree, nar_offset, size, &reply) {
            // The kernel reads this file without the mount: count it read whole, for the trace.
            self.inner.recorder.note(&tree, tree.chunk_range(nar_offset, nar_offset + size));
            self.inner.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            let open = OpenFile { mode: IoMode::Passthrough, ..OpenFile::new(ino_) };
            self.inner.open_files.lock().insert(fh, Arc::new(open));
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        }
        self.inner.open_files.lock().insert(fh, Arc::new(OpenFile::new(ino_)));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        if let Some(open) = self.inner.open_files.lock().remove(&fh.0) {
            self.inner.release_io(open.ino, open.mode);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino_: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((tree, _, node)) = self.inner.node(ino_) else { return reply.error(Errno::ENOENT) };
        let NodeKind::File { size: file_size, nar_offset, .. } = tree.nodes[node as usize].kind else {
            return reply.error(Errno::EISDIR);
        };
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        if offset >= end {
            return reply.data(&[]);
        }
        let (start_nar, end_nar) = (nar_offset + offset, nar_offset + end);
        self.inner.recorder.note(&tree, tree.chunk_range(start_nar, end_nar));
        self.inner.start_fill(&tree);
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.read_bytes.fetch_add(end - offset, Ordering::Relaxed);
        if let Some(open) = self.inner.open_files.lock().get(&fh.0).cloned() {
            // Sequential: this read starts where the last one ended.
            if open.last_end.swap(end, Ordering::Relaxed) == offset && offset > 0 {
                self.inner.readahead(&tree, &open, end_nar, nar_offset + file_size);
            }
            // A handle that has been served every byte of the file read it whole.
            let materializable = self.inner.files.is_some() && file_size >= files::MIN_FILE_SIZE;
            let whole = materializable && {
                let mut served = open.served.lock();
                !served.covers(file_size) && served.add(offset, end, file_size)
            };
            if whole {
                self.inner.materialize(&tree, nar_offset, file_size);
            }
        }
        self.inner.path_readahead(&tree, offset == 0, start_nar, end_nar);
        let (covering, first_offset) = tree.covering(start_nar, end_nar);
        let covering = covering.to_vec();
        // Hot chunks are answered on this thread; anything else waits on the runtime.
        let hot: Option<Vec<Arc<[u8]>>> = {
            let mut hot = self.inner.hot.lock();
            covering.iter().map(|c| hot.get(&c.hash)).collect()
        };
        if let Some(chunks) = hot {
            return reply.data(&Inner::assemble(&chunks, first_offset, start_nar, end_nar));
        }
        let inner = self.inner.clone();
        let span = debug_span!("read", store_path = %tree.base_name, rq.inode = ino_.0, offset, size);
        self.inner.runtime.spawn(async move {
            match inner.chunks(&tree, &covering).await {
                Ok(chunks) => reply.data(&Inner::assemble(&chunks, first_offset, start_nar, end_nar)),
                Err(err) => {
                    warn!(store_path = %tree.base_name, "read failed: {err}");
                    reply.error(errno(err.kind()))
                }
            }
        }.instrument(span));
    }

    /// Directories need no per-open state. Answering ENOSYS once makes the kernel stop sending
    /// OPENDIR and RELEASEDIR altogether (two round trips per directory of a `find`) and cache
    /// every listing (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR is its default then); the root's
    /// cached listing is dropped when a path is registered (see [`Inner::root_changed`]).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.inner.stats.opendirs.fetch_add(1, Ordering::Relaxed);
        reply.error(Errno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino_: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.inner.stats.readdirs.fetch_add(1, Ordering::Relaxed);
        let mut entries: Vec<(INodeNo, FileType, String)> = Vec::new();
        if ino_ == INodeNo::ROOT {
            self.inner.register_cached();
            entries.push((INodeNo::ROOT, FileType::Directory, ".".into()));
            entries.push((INodeNo::ROOT, FileType::Directory, "..".into()));
            let paths = self.inner.paths.read();
            let mut listed: Vec<(INodeNo, FileType, String)> = paths
                .iter()
                .enumerate()
                .map(|(i, tree)| (ino(i, 0), file_type(&tree.nodes[0].kind), tree.base_name.clone()))
                .collect();
            listed.sort_by(|a, b| a.2.cmp(&b.2));
            entries.extend(listed);
        } else {
            let Some((tree, path, node)) = self.inner.node(ino_) else { return reply.error(Errno::ENOENT) };
            let NodeKind::Directory { children } = &tree.nodes[node as usize].kind else {
                return reply.error(Errno::ENOTDIR);
            };
            let parent = tree.nodes[node as usize].parent;
            let parent_ino = if node == 0 { INodeNo::ROOT } else { ino(path, parent) };
            entries.push((ino_, FileType::Directory, ".".into()));
            entries.push((parent_ino, FileType::Directory, "..".into()));
            for (name, child) in children {
                entries.push((ino(path, *child), file_type(&tree.nodes[*child as usize].kind), name.clone()));
            }
        }
        for (i, (entry_ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(entry_ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Answered from counters only: `df` on a runner must not wait for the network.
        let cache = self.inner.store.cache();
        let block = 4096u64;
        let blocks = cache.quota() / block;
        let free = cache.quota().saturating_sub(cache.used_bytes()) / block;
        let files = self.inner.paths.read().iter().map(|t| t.nodes.len() as u64).sum::<u64>();
        reply.statfs(blocks, free, free, files, 0, block as u32, 255, block as u32);
    }
}

/// The chunks of `tree`: those of its files from the smallest file up, then any left (between
/// files, or of no file), each once.
fn small_files_first(tree: &PathTree) -> Vec<ChunkRef> {
    let mut files: Vec<(u64, u64)> = tree
        .nodes
        .iter()
        .filter_map(|node| match node.kind {
            NodeKind::File { size, nar_offset, .. } if size > 0 => Some((size, nar_offset)),
            _ => None,
        })
        .collect();
    files.sort_unstable();
    let mut taken = vec![false; tree.chunks.len()];
    let mut order = Vec::with_capacity(tree.chunks.len());
    let ranges = files.into_iter().map(|(size, offset)| tree.chunk_range(offset, offset + size)).chain(std::iter::once(0..tree.chunks.len()));
    for range in ranges {
        for index in range {
            if !std::mem::replace(&mut taken[index], true) {
                order.push(tree.chunks[index]);
            }
        }
    }
    order
}

fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Directory { .. } => FileType::Directory,
        NodeKind::File { .. } => FileType::RegularFile,
        NodeKind::Symlink { .. } => FileType::Symlink,
    }
}

#[cfg(test)]
mod tests {
    use super::ServedRanges;

    #[test]
    fn small_files_first_orders_chunks_by_file_size() {
        use crate::tree::{NodeKind, PathTree, TreeNode};
        use flywheel_core::chunk::ChunkHash;
        use flywheel_core::manifest::ChunkRef;
        let file = |size, nar_offset| TreeNode { kind: NodeKind::File { size, executable: false, nar_offset }, parent: 0 };
        let chunks: Vec<ChunkRef> = (0..5u8).map(|i| ChunkRef { hash: ChunkHash::of(&[i]), size: 64 }).collect();
        let tree = PathTree {
            base_name: "x".into(),
            nar_hash: flywheel_core::nix::Sha256Hash([0; 32]),
            // A big file over chunks 0 and 1, a small one in chunk 2, a middling one in chunk 3;
            // chunk 4 holds no file's bytes.
            nodes: vec![
                TreeNode { kind: NodeKind::Directory { children: Vec::new() }, parent: 0 },
                file(120, 0),
                file(10, 140),
                file(50, 200),
            ],
            offsets: (0..=5u64).map(|i| i * 64).collect(),
            traced: (0..5).map(|_| Default::default()).collect(),
            chunks: chunks.clone(),
            last_read_end: Default::default(),
            prefetched_to: Default::default(),
            walk_bytes: Default::default(),
            fill_claimed: Default::default(),
        };
        let order = super::small_files_first(&tree);
        assert_eq!(order, vec![chunks[2], chunks[3], chunks[0], chunks[1], chunks[4]]);
    }

    #[test]
    fn served_ranges_know_when_a_file_was_read_whole() {
        let mut served = ServedRanges::default();
        assert!(!served.add(4096, 8192, 10_000));
        assert!(!served.add(4096, 8192, 10_000), "a range read twice does not count twice");
        assert!(!served.add(8192, 10_000, 10_000));
        assert!(served.add(0, 4096, 10_000), "the last gap closed");
        let mut jumpy = ServedRanges::default();
        for i in 0..100u64 {
            jumpy.add(i * 200, i * 200 + 100, 1 << 20);
        }
        assert!(jumpy.given_up);
        assert!(!jumpy.add(0, 1 << 20, 1 << 20), "a reader that jumps around is not tracked");
    }
}
