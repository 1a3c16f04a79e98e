//! In-process tests of the filesystem's logic over an in-memory source: paths resolved from
//! manifests, file bytes assembled from chunks, the local cache after a restart, and damaged
//! chunks. No kernel, no server, no root; the mounted filesystem is tested in `tests/`.

use std::collections::BTreeMap;

use flywheel_client::{ChunkCache, LocalCacheConfig, MemorySource};
use flywheel_core::chunk::ChunkParams;

use super::*;

const BASE_NAME: &str = "0c0ckjhibxyvhrxdb55dp3iwzal15ppw-tree";
/// Small chunks, so that files span several.
const PARAMS: ChunkParams = ChunkParams { min_size: 4096, avg_size: 8192, max_size: 16384 };

/// Files of the test path, by relative name: small, spanning chunks, nested, empty.
fn files() -> BTreeMap<&'static str, Vec<u8>> {
    let mut seed = 7u64;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect()
    };
    BTreeMap::from([
        ("small", b"hello".to_vec()),
        ("big", noise(200_000)),
        ("dir/nested", noise(30_000)),
        ("dir/empty", Vec::new()),
    ])
}

struct Fixture {
    fs: FlywheelFs,
    source: Arc<MemorySource>,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    /// A filesystem over `source` with its local cache in `cache_dir`.
    fn new(source: Arc<MemorySource>, cache_dir: &std::path::Path) -> Fixture {
        Fixture::through(source.clone(), source, cache_dir)
    }

    /// A filesystem that reaches `source` through `via` (a wrapper that watches or slows it).
    fn through(via: Arc<dyn flywheel_client::ChunkSource>, source: Arc<MemorySource>, cache_dir: &std::path::Path) -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // sled lets go of a dropped cache's lock from its own thread, a moment later.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let cache = loop {
            match ChunkCache::open(&LocalCacheConfig::new(cache_dir, 64 << 20)) {
                Ok(cache) => break Arc::new(cache),
                Err(err) if err.kind() == ErrorKind::AlreadyExists && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => panic!("opening the chunk cache: {err}"),
            }
        };
        let store = ChunkStore::new(via, cache);
        let config = FsConfig {
            offline_timeout: Duration::from_secs(10),
            hot_bytes: 1 << 20,
            materialized: None,
            fill_max_nar_size: 0,
            fill_order: crate::FillOrder::Nar,
            fill_alongside_reads: 1,
        };
        let fs = FlywheelFs::new(store, runtime.handle().clone(), config);
        Fixture { fs, source, runtime }
    }

    fn resolve(&self, base_name: &str) -> Result<Arc<PathTree>> {
        self.runtime.block_on(self.fs.inner.resolve(base_name)).map(|(_, tree)| tree)
    }

    /// The bytes `[offset, offset + len)` of file `name`, as a READ assembles them.
    fn read(&self, tree: &Arc<PathTree>, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let node = name.split('/').try_fold(0u32, |node, part| tree.child(node, part)).expect("no such file");
        let NodeKind::File { size, nar_offset, .. } = tree.nodes[node as usize].kind else { panic!("{name} is no file") };
        let (start, end) = (nar_offset + offset, nar_offset + (offset + len).min(size));
        let (covering, first_offset) = tree.covering(start, end);
        let found = self.fs.inner.lookup_here(covering);
        let chunks = self.runtime.block_on(self.fs.inner.fetch_rest(tree, covering, found))?;
        Ok(Inner::assemble(&chunks, first_offset, start, end))
    }
}

/// A source holding the test path.
fn source() -> Arc<MemorySource> {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files() {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let mut nar = Vec::new();
    flywheel_core::nar::dump_path(dir.path(), &mut nar).unwrap();
    let source = Arc::new(MemorySource::default());
    source.add_path(&format!("/nix/store/{BASE_NAME}"), &nar, Vec::new(), PARAMS).unwrap();
    source
}

#[test]
fn paths_resolve_and_read_back_byte_for_byte() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let tree = fixture.resolve(BASE_NAME).unwrap();
    assert!(tree.chunks.len() > 10, "the path spans many chunks");
    for (name, bytes) in files() {
        assert_eq!(fixture.read(&tree, name, 0, bytes.len() as u64 + 10).unwrap(), bytes, "{name}");
    }
    // A range across chunk boundaries, and reading it again needs no further chunk.
    let big = &files()["big"];
    assert_eq!(fixture.read(&tree, "big", 12_345, 50_000).unwrap(), big[12_345..62_345]);
    let served = fixture.source.chunks_served();
    assert_eq!(fixture.read(&tree, "big", 1000, 100_000).unwrap(), big[1000..101_000]);
    assert_eq!(fixture.source.chunks_served(), served, "chunks read before came from memory or the local cache");
}

#[test]
fn a_restarted_mount_reads_from_its_local_cache_alone() {
    let cache_dir = tempfile::tempdir().unwrap();
    {
        let fixture = Fixture::new(source(), cache_dir.path());
        let tree = fixture.resolve(BASE_NAME).unwrap();
        for (name, bytes) in files() {
            fixture.read(&tree, name, 0, bytes.len() as u64).unwrap();
        }
        // Fetched chunks are written to the cache in the background: wait until every one is.
        let cache = fixture.fs.inner.store.cache().clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !tree.chunks.iter().all(|c| cache.contains(&c.hash)) {
            assert!(std::time::Instant::now() < deadline, "fetched chunks never reached the local cache");
            std::thread::sleep(Duration::from_millis(10));
        }
        cache.flush().unwrap();
    }
    // The server now holds nothing: the manifest and every chunk come from the cache.
    let fixture = Fixture::new(Arc::new(MemorySource::default()), cache_dir.path());
    let tree = fixture.resolve(BASE_NAME).unwrap();
    for (name, bytes) in files() {
        assert_eq!(fixture.read(&tree, name, 0, bytes.len() as u64).unwrap(), bytes, "{name}");
    }
    assert_eq!(fixture.source.chunks_served(), 0);
}

#[test]
fn damaged_chunks_are_never_served() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let tree = fixture.resolve(BASE_NAME).unwrap();
    let node = tree.child(0, "big").unwrap();
    let NodeKind::File { nar_offset, .. } = tree.nodes[node as usize].kind else { unreachable!() };
    let (covering, _) = tree.covering(nar_offset, nar_offset + 1);
    let damaged = covering[0];
    let other = flywheel_core::chunk::compress(&vec![0u8; damaged.size as usize], 1).unwrap();
    fixture.source.damage(&damaged.hash, other);
    let err = fixture.read(&tree, "big", 0, 100).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(crate::errno::FsError::from(&err).errno(), fuser::Errno::EIO);
    // Files in other chunks still read.
    assert_eq!(fixture.read(&tree, "small", 0, 5).unwrap(), b"hello");
}

#[test]
fn unknown_and_misnamed_paths_are_not_found() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let unknown = fixture.resolve("1c0ckjhibxyvhrxdb55dp3iwzal15ppw-tree").unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::NotFound);
    let misnamed = fixture.resolve("0c0ckjhibxyvhrxdb55dp3iwzal15ppw-other").unwrap_err();
    assert_eq!(misnamed.kind(), ErrorKind::NotFound);
    assert!(fixture.resolve("not-a-store-path").is_err());
    // Refused names register nothing; the real one still resolves.
    assert!(fixture.fs.inner.paths.read().is_empty());
    assert_eq!(fixture.resolve(BASE_NAME).unwrap().base_name, BASE_NAME);
}

#[test]
fn a_path_is_trace_covered_until_its_trace_is_fetched() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let tree = fixture.resolve(BASE_NAME).unwrap();
    let inner = &fixture.fs.inner;
    let trace = flywheel_core::api::v1::traces::Trace::from_reads(tree.chunks.iter().map(|c| (BASE_NAME, *c)));
    let (paths, queued, skipped) = fixture.runtime.block_on(inner.prefetch_trace(&trace));
    assert_eq!((paths, skipped), (1, 0));
    assert!(queued > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tree.trace_covered.load(Ordering::Relaxed) {
        assert!(std::time::Instant::now() < deadline, "the path stayed trace-covered after its trace was fetched");
        std::thread::sleep(Duration::from_millis(10));
    }
    let distinct: std::collections::HashSet<_> = tree.chunks.iter().map(|c| c.hash).collect();
    assert_eq!(fixture.source.chunks_served(), distinct.len() as u64, "the trace fetched each chunk once");
    // What the job reads next is in memory, decompressed: its reads need neither the disk
    // nor the server.
    let raw: u64 = tree.chunks.iter().map(|c| u64::from(c.size)).sum();
    assert!(raw <= inner.config.hot_bytes as u64, "the test path ({raw} bytes) fits in the mount's memory");
    assert!(distinct.iter().all(|hash| inner.hot.lock().map.contains(hash)), "a traced chunk is not in memory");
    let before = inner.store.cache().stats();
    for (name, bytes) in files() {
        assert_eq!(fixture.read(&tree, name, 0, bytes.len() as u64).unwrap(), bytes, "{name}");
    }
    let after = inner.store.cache().stats();
    assert_eq!((after.hits, after.misses), (before.hits, before.misses), "a read went to the local cache");
    assert_eq!(fixture.source.chunks_served(), distinct.len() as u64);
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A source whose chunk requests take a while, counting how many are in flight at once.
struct SlowChunks {
    inner: Arc<MemorySource>,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
    requests: AtomicU64,
    /// Every chunk asked for, in the order asked.
    asked: Mutex<Vec<ChunkHash>>,
}

impl SlowChunks {
    async fn slowly<T>(&self, request: impl std::future::Future<Output = T>) -> T {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.most_in_flight.fetch_max(now, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let answer = request.await;
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        answer
    }
}

impl flywheel_client::ChunkSource for SlowChunks {
    fn manifest<'a>(&'a self, hash_part: &'a str) -> BoxFuture<'a, Result<flywheel_core::api::v1::chunks::PathManifest>> {
        self.inner.manifest(hash_part)
    }
    fn chunk<'a>(&'a self, path: &'a str, chunk: ChunkRef) -> BoxFuture<'a, Result<flywheel_client::FetchedChunk>> {
        self.asked.lock().push(chunk.hash);
        Box::pin(self.slowly(self.inner.chunk(path, chunk)))
    }
    fn chunks<'a>(&'a self, path: &'a str, chunks: &'a [ChunkRef]) -> BoxFuture<'a, Result<Vec<flywheel_client::FetchedChunk>>> {
        self.asked.lock().extend(chunks.iter().map(|c| c.hash));
        Box::pin(self.slowly(self.inner.chunks(path, chunks)))
    }
    fn trace<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<flywheel_core::api::v1::traces::Trace>>> {
        self.inner.trace(key)
    }
    fn put_trace<'a>(
        &'a self,
        key: &'a str,
        trace: &'a flywheel_core::api::v1::traces::Trace,
    ) -> BoxFuture<'a, Result<flywheel_core::api::v1::traces::TraceSummary>> {
        self.inner.put_trace(key, trace)
    }
}

#[test]
fn a_trace_is_fetched_one_request_at_a_time_in_its_order() {
    let cache_dir = tempfile::tempdir().unwrap();
    let source = source();
    let slow = Arc::new(SlowChunks {
        inner: source.clone(),
        in_flight: AtomicU64::new(0),
        most_in_flight: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        asked: Mutex::default(),
    });
    let fixture = Fixture::through(slow.clone(), source, cache_dir.path());
    let tree = fixture.resolve(BASE_NAME).unwrap();
    let inner = &fixture.fs.inner;
    // Backwards: the order is the trace's, not the NAR's.
    let trace = flywheel_core::api::v1::traces::Trace::from_reads(tree.chunks.iter().rev().map(|c| (BASE_NAME, *c)));
    fixture.runtime.block_on(inner.prefetch_trace(&trace));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tree.trace_covered.load(Ordering::Relaxed) {
        assert!(std::time::Instant::now() < deadline, "the trace was not fetched");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Several requests (the first ones small), and never two at once: on a slow link each
    // would arrive later than one alone.
    assert!(slow.requests.load(Ordering::Acquire) >= 2, "{} requests", slow.requests.load(Ordering::Acquire));
    assert_eq!(slow.most_in_flight.load(Ordering::Acquire), 1);
    let mut seen = std::collections::HashSet::new();
    let expected: Vec<ChunkHash> = tree.chunks.iter().rev().map(|c| c.hash).filter(|h| seen.insert(*h)).collect();
    assert_eq!(*slow.asked.lock(), expected, "the chunks were not asked for in the trace's order");
}

#[test]
fn readahead_of_a_traced_path_loads_from_the_local_cache_alone() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let tree = fixture.resolve(BASE_NAME).unwrap();
    tree.trace_covered.store(true, Ordering::Relaxed);
    let inner = &fixture.fs.inner;
    fixture.runtime.block_on(inner.read_ahead(&tree, &tree.chunks));
    assert_eq!(fixture.source.chunks_served(), 0, "the trace, not readahead, fetches a traced path's chunks");
    assert!(inner.hot.lock().map.is_empty());
    // A chunk the local cache holds is loaded into memory all the same.
    assert_eq!(fixture.read(&tree, "small", 0, 5).unwrap(), b"hello");
    assert_eq!(fixture.source.chunks_served(), 1);
    let node = tree.child(0, "small").unwrap();
    let NodeKind::File { nar_offset, .. } = tree.nodes[node as usize].kind else { unreachable!() };
    let small = tree.covering(nar_offset, nar_offset + 5).0[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !inner.store.cache().contains(&small.hash) {
        assert!(std::time::Instant::now() < deadline, "the fetched chunk never reached the local cache");
        std::thread::sleep(Duration::from_millis(10));
    }
    inner.hot.lock().map.pop(&small.hash);
    fixture.runtime.block_on(inner.read_ahead(&tree, &tree.chunks));
    assert_eq!(fixture.source.chunks_served(), 1);
    assert!(inner.hot.lock().map.contains(&small.hash), "the cached chunk is hot again");
    // Without a trace, readahead fetches what it wants from the server.
    tree.trace_covered.store(false, Ordering::Relaxed);
    fixture.runtime.block_on(inner.read_ahead(&tree, &tree.chunks));
    let distinct: std::collections::HashSet<_> = tree.chunks.iter().map(|c| c.hash).collect();
    assert_eq!(fixture.source.chunks_served(), distinct.len() as u64);
}

#[test]
fn lookups_of_one_path_at_once_fetch_its_manifest_once() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let inner = &fixture.fs.inner;
    let resolved: Vec<usize> = fixture.runtime.block_on(async {
        let lookups: Vec<_> = (0..8)
            .map(|_| {
                let inner = inner.clone();
                tokio::spawn(async move { inner.resolve(BASE_NAME).await.map(|(index, _)| index) })
            })
            .collect();
        let mut resolved = Vec::new();
        for lookup in lookups {
            resolved.push(lookup.await.unwrap().unwrap());
        }
        resolved
    });
    assert!(resolved.iter().all(|&index| index == resolved[0]), "every lookup finds the one registered path");
    assert_eq!(fixture.source.manifest_requests(), 1);
    assert!(inner.resolving.lock().is_empty(), "nothing is left waiting");
}

#[test]
fn lookups_of_one_missing_path_at_once_share_one_answer() {
    let cache_dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(source(), cache_dir.path());
    let inner = &fixture.fs.inner;
    let missing = format!("{}-absent", "1".repeat(32));
    let outcomes: Vec<ErrorKind> = fixture.runtime.block_on(async {
        // The answer waits until all eight lookups are under way.
        let held = fixture.source.hold_manifests().unwrap();
        let lookups: Vec<_> = (0..8)
            .map(|_| {
                let (inner, missing) = (inner.clone(), missing.clone());
                tokio::spawn(async move { inner.resolve(&missing).await.map(|_| ()).map_err(|err| err.kind()) })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while inner.resolving.lock().get(&missing).map_or(0, Arc::strong_count) < 9 {
            assert!(std::time::Instant::now() < deadline, "the lookups never all started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(held);
        let mut outcomes = Vec::new();
        for lookup in lookups {
            outcomes.push(lookup.await.unwrap().unwrap_err());
        }
        outcomes
    });
    assert!(outcomes.iter().all(|&kind| kind == ErrorKind::NotFound), "{outcomes:?}");
    assert_eq!(fixture.source.manifest_requests(), 1, "the waiting lookups take the first one's answer");
    assert!(inner.resolving.lock().is_empty(), "nothing is left waiting");
    // A later lookup asks again: the path may have been pushed since.
    assert!(fixture.runtime.block_on(inner.resolve(&missing)).is_err());
    assert_eq!(fixture.source.manifest_requests(), 2);
}
