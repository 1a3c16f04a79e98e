//! Criterion benchmarks of the per-byte work on the ingest and serve paths: FastCDC, BLAKE3,
//! SHA-256, zstd both ways, and NAR parsing, over a NAR of real executables.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flywheel_core::chunk::{self, ChunkHash, ChunkParams, Chunker, DEFAULT_ZSTD_LEVEL};
use flywheel_core::nar;
use sha2::Digest;

/// The NAR of the toolchain's `bin` directory: real executables, present wherever this crate
/// builds.
fn sample_nar() -> Vec<u8> {
    let sysroot = std::process::Command::new("rustc").args(["--print", "sysroot"]).output().expect("running rustc");
    let bin = std::path::Path::new(String::from_utf8(sysroot.stdout).unwrap().trim()).join("bin");
    let mut nar = Vec::new();
    nar::dump_path(&bin, &mut nar).expect("dumping the toolchain's bin directory");
    nar
}

fn benches(c: &mut Criterion) {
    let data = sample_nar();
    let mut group = c.benchmark_group("per_byte");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.bench_function("fastcdc", |b| b.iter(|| Chunker::chunk_all(ChunkParams::default(), black_box(&data)).len()));
    group.bench_function("blake3", |b| b.iter(|| ChunkHash::of(black_box(&data))));
    group.bench_function("sha256", |b| b.iter(|| sha2::Sha256::digest(black_box(&data))));
    let chunks = Chunker::chunk_all(ChunkParams::default(), &data);
    group.bench_function("zstd_compress_chunks", |b| {
        b.iter(|| chunks.iter().map(|c| chunk::compress(c, DEFAULT_ZSTD_LEVEL).unwrap().len()).sum::<usize>())
    });
    let frames: Vec<(Vec<u8>, ChunkHash, usize)> = chunks
        .iter()
        .map(|c| (chunk::compress(c, DEFAULT_ZSTD_LEVEL).unwrap(), ChunkHash::of(c), c.len()))
        .collect();
    group.bench_function("zstd_decompress_verify_chunks", |b| {
        b.iter(|| {
            frames
                .iter()
                .map(|(f, h, n)| chunk::decompress_verified(f, h, *n).unwrap().len())
                .sum::<usize>()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("nar");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.bench_function("parse_and_index", |b| b.iter(|| nar::parse(black_box(&data[..])).unwrap().nar_size));
    group.finish();
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
