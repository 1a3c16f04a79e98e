//! Criterion benchmarks of the runner's local chunk cache: caching a cold stream of chunks (what
//! a lazy read or a substitution does on a miss), reading them back verified, and caching under
//! eviction, when the cache is full and every insert makes room first.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flywheel_client::cache::{ChunkCache, LocalCacheConfig};
use flywheel_core::chunk::{compress, ChunkHash};
use flywheel_core::manifest::ChunkRef;
use rand::{RngCore, SeedableRng};

/// Chunks of half random, half zero bytes (frames about half their size, as store paths give).
fn chunks(count: usize, size: usize) -> Vec<(ChunkRef, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data[..size / 2]);
            let frame = compress(&data, 3).expect("compressing a chunk");
            (ChunkRef { hash: ChunkHash::of(&data), size: size as u32 }, frame)
        })
        .collect()
}

/// Inserts in batches of 64, as the substituter and the mount's fetcher hand chunks over.
fn insert_all(cache: &ChunkCache, chunks: &[(ChunkRef, Vec<u8>)]) {
    for batch in chunks.chunks(64) {
        let frames: Vec<(ChunkHash, &[u8])> = batch.iter().map(|(c, f)| (c.hash, f.as_slice())).collect();
        cache.insert_many(&frames);
    }
}

fn benches(c: &mut Criterion) {
    let chunks = chunks(2000, 64 * 1024);
    let frame_bytes: u64 = chunks.iter().map(|(_, f)| f.len() as u64).sum();
    let mut group = c.benchmark_group("chunk_cache");
    group.throughput(Throughput::Bytes(frame_bytes));
    group.sample_size(10);

    let open = |quota: u64| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cache = ChunkCache::open(&LocalCacheConfig::new(dir.path(), quota)).expect("opening the cache");
        (dir, cache)
    };
    group.bench_function("insert_cold", |b| {
        b.iter_batched(
            || open(1 << 30),
            |(dir, cache)| {
                insert_all(&cache, black_box(&chunks));
                (dir, cache)
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("insert_under_eviction", |b| {
        b.iter_batched(
            || {
                let (dir, cache) = open(frame_bytes / 4);
                insert_all(&cache, &chunks);
                (dir, cache)
            },
            |(dir, cache)| {
                insert_all(&cache, black_box(&chunks));
                (dir, cache)
            },
            BatchSize::PerIteration,
        )
    });
    let (_dir, cache) = open(1 << 30);
    insert_all(&cache, &chunks);
    group.bench_function("hit", |b| {
        b.iter(|| chunks.iter().map(|(c, _)| cache.get(black_box(c)).map_or(0, |d| d.len())).sum::<usize>())
    });
    group.finish();
}

criterion_group!(chunk_cache, benches);
criterion_main!(chunk_cache);
