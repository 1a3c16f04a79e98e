//! Where a runner's manifests and chunks come from: the server ([`ApiClient`]) in production,
//! or [`MemorySource`] for in-process tests of the mount and the substituter (no server, no
//! root, no Nix).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::api::v1::traces::{Trace, TraceSummary};
use flywheel_core::chunk::{compress, decompress_verified, ChunkHash, ChunkParams, Chunker};
use flywheel_core::manifest::{ChunkRef, Manifest, MANIFEST_VERSION};
use flywheel_core::nix::{Sha256Hash, StorePath};
use flywheel_core::{Error, Result};
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;

use crate::api::{ApiClient, FetchedChunk};

/// The server's side of a runner, as the mount and the substituter use it. Every chunk handed
/// out is verified against its name and size.
pub trait ChunkSource: Send + Sync + 'static {
    /// The manifest of the path whose hash part is `hash_part`.
    fn manifest<'a>(&'a self, hash_part: &'a str) -> BoxFuture<'a, Result<PathManifest>>;
    /// One chunk of the path whose hash part is `path`.
    fn chunk<'a>(&'a self, path: &'a str, chunk: ChunkRef) -> BoxFuture<'a, Result<FetchedChunk>>;
    /// Many chunks of one path, in order.
    fn chunks<'a>(&'a self, path: &'a str, chunks: &'a [ChunkRef]) -> BoxFuture<'a, Result<Vec<FetchedChunk>>>;
    /// The access trace stored under `key`, if any.
    fn trace<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Trace>>>;
    /// Merges one run's trace into what is stored under `key`.
    fn put_trace<'a>(&'a self, key: &'a str, trace: &'a Trace) -> BoxFuture<'a, Result<TraceSummary>>;
}

impl ChunkSource for ApiClient {
    fn manifest<'a>(&'a self, hash_part: &'a str) -> BoxFuture<'a, Result<PathManifest>> {
        ApiClient::manifest(self, hash_part).boxed()
    }

    fn chunk<'a>(&'a self, path: &'a str, chunk: ChunkRef) -> BoxFuture<'a, Result<FetchedChunk>> {
        ApiClient::chunk(self, path, chunk).boxed()
    }

    fn chunks<'a>(&'a self, path: &'a str, chunks: &'a [ChunkRef]) -> BoxFuture<'a, Result<Vec<FetchedChunk>>> {
        ApiClient::chunks(self, path, chunks).boxed()
    }

    fn trace<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Trace>>> {
        ApiClient::trace(self, key).boxed()
    }

    fn put_trace<'a>(&'a self, key: &'a str, trace: &'a Trace) -> BoxFuture<'a, Result<TraceSummary>> {
        ApiClient::put_trace(self, key, trace).boxed()
    }
}

/// Paths held in memory, served as a cache would serve them: a chunk only as part of a path
/// that lists it. For tests; it counts the chunks it hands out and the manifests asked for,
/// and can be told to damage chunks or hold manifest answers back.
#[derive(Default)]
pub struct MemorySource {
    paths: Mutex<HashMap<String, PathManifest>>,
    frames: Mutex<HashMap<ChunkHash, Vec<u8>>>,
    traces: Mutex<HashMap<String, Trace>>,
    chunks_served: AtomicU64,
    manifest_requests: AtomicU64,
    /// Manifest answers wait for a read lock of this: a test holding the write lock keeps
    /// lookups waiting until it has them all where it wants them.
    manifest_gate: tokio::sync::RwLock<()>,
}

impl MemorySource {
    /// Adds the path `store_path` (absolute) whose NAR is `nar`, cut with `params`.
    pub fn add_path(&self, store_path: &str, nar: &[u8], references: Vec<String>, params: ChunkParams) -> Result<PathManifest> {
        let parsed = flywheel_core::nar::parse(nar)?;
        let mut chunks = Vec::new();
        let mut frames = self.frames.lock();
        for data in Chunker::chunk_all(params, nar) {
            let hash = ChunkHash::of(&data);
            frames.insert(hash, compress(&data, 1)?);
            chunks.push(ChunkRef { hash, size: data.len() as u32 });
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            nar_hash: Sha256Hash::digest(nar),
            nar_size: parsed.nar_size,
            chunks,
            root: parsed.root,
        };
        let path = PathManifest {
            store_path: store_path.to_string(),
            references,
            deriver: None,
            sigs: Vec::new(),
            ca: None,
            manifest: Arc::new(manifest),
        };
        let hash_part = StorePath::from_path_in_any_store(store_path)?.hash_part();
        self.paths.lock().insert(hash_part, path.clone());
        Ok(path)
    }

    /// Replaces a chunk's stored frame with `frame` (to test what readers do with damage).
    pub fn damage(&self, hash: &ChunkHash, frame: Vec<u8>) {
        self.frames.lock().insert(*hash, frame);
    }

    /// Chunks handed out so far.
    pub fn chunks_served(&self) -> u64 {
        self.chunks_served.load(Ordering::Relaxed)
    }

    /// Holds every manifest answer back until the guard is dropped (`None` when held already).
    pub fn hold_manifests(&self) -> Option<tokio::sync::RwLockWriteGuard<'_, ()>> {
        self.manifest_gate.try_write().ok()
    }

    /// Manifests asked for so far, found or not.
    pub fn manifest_requests(&self) -> u64 {
        self.manifest_requests.load(Ordering::Relaxed)
    }

    fn serve(&self, path: &str, chunk: ChunkRef) -> Result<FetchedChunk> {
        let listed = self.paths.lock().get(path).is_some_and(|p| p.manifest.chunks.contains(&chunk));
        if !listed {
            return Err(Error::not_found(format!("path {path} has no chunk {}", chunk.hash)));
        }
        let frame = self.frames.lock().get(&chunk.hash).cloned().ok_or_else(|| Error::corrupt(format!("lost chunk {}", chunk.hash)))?;
        let data = decompress_verified(&frame, &chunk.hash, chunk.size as usize)?;
        self.chunks_served.fetch_add(1, Ordering::Relaxed);
        Ok(FetchedChunk { frame, data: data.into() })
    }
}

impl ChunkSource for MemorySource {
    fn manifest<'a>(&'a self, hash_part: &'a str) -> BoxFuture<'a, Result<PathManifest>> {
        let found = self.paths.lock().get(hash_part).cloned();
        self.manifest_requests.fetch_add(1, Ordering::Relaxed);
        async move {
            // A server's answer takes a while: other callers get to run in between.
            tokio::task::yield_now().await;
            drop(self.manifest_gate.read().await);
            found.ok_or_else(|| Error::not_found(format!("no path {hash_part}")))
        }
        .boxed()
    }

    fn chunk<'a>(&'a self, path: &'a str, chunk: ChunkRef) -> BoxFuture<'a, Result<FetchedChunk>> {
        let served = self.serve(path, chunk);
        async move { served }.boxed()
    }

    fn chunks<'a>(&'a self, path: &'a str, chunks: &'a [ChunkRef]) -> BoxFuture<'a, Result<Vec<FetchedChunk>>> {
        let served = chunks.iter().map(|c| self.serve(path, *c)).collect();
        async move { served }.boxed()
    }

    fn trace<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Trace>>> {
        let found = self.traces.lock().get(key).cloned();
        async move { Ok(found) }.boxed()
    }

    fn put_trace<'a>(&'a self, key: &'a str, trace: &'a Trace) -> BoxFuture<'a, Result<TraceSummary>> {
        // Merged as the server merges, so that aging works as it does against a server.
        let mut traces = self.traces.lock();
        let (merged, dropped) = match traces.get(key) {
            Some(stored) => stored.merge(trace),
            None => (trace.clone(), 0),
        };
        let summary = TraceSummary { paths: merged.paths.len(), chunks: merged.chunks.len(), dropped };
        traces.insert(key.to_string(), merged);
        async move { Ok(summary) }.boxed()
    }
}
