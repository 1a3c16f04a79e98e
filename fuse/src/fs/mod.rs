//! The FUSE filesystem: a read-only store directory whose paths appear on lookup and whose
//! file contents arrive chunk by chunk on first read.
//!
//! Inode numbers: 1 is the store directory; node `n` of the `p`-th path registered is
//! `(p + 1) << 32 | n`. Paths are immutable and never unregistered, so an inode number stays
//! valid for the life of the mount and `forget` has nothing to do.
//!
//! - `ops`: the FUSE operations;
//! - `registry`: store paths appearing on lookup, or from the local cache;
//! - `readahead`: fetching ahead of readers, and the background fill;
//! - `passthrough`: files served whole, written to disk and handed to the kernel;
//! - `metrics`: what the mount did, for `/metrics`.

mod metrics;
mod ops;
mod passthrough;
mod readahead;
mod registry;
#[cfg(test)]
mod tests;

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
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use parking_lot::{Mutex, RwLock};
use tracing::{debug, debug_span, info_span, warn, Instrument};

use crate::background::{Background, Source};
use crate::files::{self, MaterializedFiles};
use crate::trace::Recorder;
use crate::tree::{NodeKind, PathTree};
use metrics::MountMetrics;
use passthrough::{IoMode, IoModes, ServedRanges};

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

/// A chunk's bytes where a lookup found them, or `None`.
type Found = Option<Arc<[u8]>>;

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

pub(crate) struct Inner {
    pub(crate) store: ChunkStore,
    runtime: tokio::runtime::Handle,
    pub(crate) config: FsConfig,
    paths: RwLock<Vec<Arc<PathTree>>>,
    by_hash: RwLock<HashMap<String, usize>>,
    /// Per store path (base name) being looked up on the server: one lookup fetches its
    /// manifest, and the others (the job's processes and a trace's prefetch, at once) share its
    /// outcome, a failure included, so a server that is down costs them one offline timeout,
    /// not one each.
    resolving: Mutex<HashMap<String, Arc<registry::Lookup>>>,
    hot: Arc<Mutex<HotChunks>>,
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
        let hot = Arc::new(Mutex::new(HotChunks { map: lru::LruCache::unbounded(), bytes: 0, limit }));
        // A trace's chunks are what the job reads next: kept decompressed, its reads need no
        // disk and no second decompression.
        let keep_traced = {
            let hot = Arc::downgrade(&hot);
            Box::new(move |chunks: &[ChunkRef], data: Vec<Arc<[u8]>>| {
                if let Some(hot) = hot.upgrade() {
                    let mut hot = hot.lock();
                    for (chunk, data) in chunks.iter().zip(data) {
                        hot.put(chunk.hash, data);
                    }
                }
            })
        };
        let background = Background::start(store.clone(), config.offline_timeout, config.fill_alongside_reads, keep_traced, &runtime);
        FlywheelFs {
            inner: Arc::new(Inner {
                store,
                runtime,
                config,
                paths: RwLock::default(),
                by_hash: RwLock::default(),
                resolving: Mutex::default(),
                hot,
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


    /// Loads those of `chunks` the local cache holds into the hot chunks; asks the server
    /// for none.
    async fn load_cached(&self, chunks: &[ChunkRef]) {
        // Those in memory already would only be read and decompressed again.
        let wanted: Vec<ChunkRef> = {
            let hot = self.hot.lock();
            chunks.iter().filter(|c| !hot.map.contains(&c.hash)).copied().collect()
        };
        if wanted.is_empty() {
            return;
        }
        let found = self.store.cached(&wanted).await;
        let mut hot = self.hot.lock();
        for (chunk, data) in wanted.iter().zip(found) {
            if let Some(data) = data {
                hot.put(chunk.hash, data);
            }
        }
    }

    /// What memory holds of `chunks`, in order, and those it lacks.
    fn hot_lookup(&self, chunks: &[ChunkRef]) -> (Vec<Found>, Vec<ChunkRef>) {
        let found: Vec<Found> = {
            let mut hot = self.hot.lock();
            chunks.iter().map(|c| hot.get(&c.hash)).collect()
        };
        let cold = chunks.iter().zip(&found).filter(|(_, d)| d.is_none()).map(|(c, _)| *c).collect();
        (found, cold)
    }

    /// Fills the gaps of `found` with what the local cache answered for `cold` (the gaps'
    /// chunks, in order), keeping those hot.
    fn take_cached(&self, found: &mut [Found], cold: &[ChunkRef], cached: Vec<Found>) {
        let mut hot = self.hot.lock();
        let mut cached = cold.iter().zip(cached);
        for slot in found.iter_mut().filter(|d| d.is_none()) {
            if let Some((chunk, Some(data))) = cached.next() {
                hot.put(chunk.hash, data.clone());
                *slot = Some(data);
            }
        }
    }

    /// What memory or the local cache holds of `chunks`, in order, looked up on the calling
    /// thread, which may block on the disk: a FUSE request thread, or the blocking pool.
    fn lookup_here(&self, chunks: &[ChunkRef]) -> Vec<Found> {
        let (mut found, cold) = self.hot_lookup(chunks);
        if !cold.is_empty() {
            let cached = self.store.cached_here(&cold);
            self.take_cached(&mut found, &cold, cached);
        }
        found
    }

    /// Chunks of `tree` from memory, the local cache (read on the blocking pool, in parallel)
    /// or the server: for the runtime's tasks.
    async fn chunks(&self, tree: &PathTree, chunks: &[ChunkRef]) -> Result<Vec<Arc<[u8]>>> {
        let (mut found, cold) = self.hot_lookup(chunks);
        if !cold.is_empty() {
            let cached = self.store.cached(&cold).await;
            self.take_cached(&mut found, &cold, cached);
        }
        self.fetch_rest(tree, chunks, found).await
    }

    /// `chunks` of `tree`, of which `found` holds what [`Inner::lookup_here`] found; the rest
    /// come from the server, bounded by the offline timeout, and are kept hot.
    async fn fetch_rest(&self, tree: &PathTree, chunks: &[ChunkRef], found: Vec<Found>) -> Result<Vec<Arc<[u8]>>> {
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        let was_missing: Vec<bool> = found.iter().map(Option::is_none).collect();
        let demand = self.background.demand();
        let all = tokio::time::timeout(self.config.offline_timeout, self.store.get_rest(tree.hash_part(), chunks, found))
            .await
            .map_err(|_| Error::unavailable("chunks did not arrive within the offline timeout"))??;
        drop(demand);
        let mut hot = self.hot.lock();
        for ((chunk, data), missing) in chunks.iter().zip(&all).zip(was_missing) {
            if missing {
                hot.put(chunk.hash, data.clone());
            }
        }
        Ok(all)
    }
}
