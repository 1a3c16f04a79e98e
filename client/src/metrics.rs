//! Prometheus metrics of the runner daemons (`flywheel mount`, `substitute`, `push-daemon`):
//! what their chunk store fetched, and the endpoint that serves a daemon's
//! [`Registry`] when it has no HTTP server of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flywheel_core::metrics::{Collect, Exposition, Histogram, Registry, CONTENT_TYPE};

use crate::ChunkStore;

/// What a [`ChunkStore`] fetched from the server.
#[derive(Debug, Default)]
pub struct FetchMetrics {
    /// Chunks received from the server and verified.
    pub chunks_fetched: AtomicU64,
    /// Compressed bytes of those chunks.
    pub bytes_fetched: AtomicU64,
    /// Chunk requests that failed.
    pub fetch_errors: AtomicU64,
    /// Latency of one chunk request to the server (a `GET chunk` or a `POST chunks` batch).
    pub fetch_seconds: Histogram,
}

/// The metrics every runner daemon with a chunk store exposes: server fetches and the local
/// chunk cache (this process's hits and misses, and the shared cache's size).
impl Collect for ChunkStore {
    fn collect(&self, out: &mut Exposition) {
        let fetch = self.metrics();
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        out.counter("flywheel_runner_chunks_fetched_total", "Chunks fetched from the server and verified.", load(&fetch.chunks_fetched));
        out.counter("flywheel_runner_chunk_bytes_fetched_total", "Compressed bytes of chunks fetched from the server.", load(&fetch.bytes_fetched));
        out.counter("flywheel_runner_chunk_fetch_errors_total", "Chunk requests to the server that failed.", load(&fetch.fetch_errors));
        out.histogram("flywheel_runner_chunk_fetch_seconds", "Latency of one chunk request to the server.", &fetch.fetch_seconds);
        let cache = self.cache();
        let stats = cache.stats();
        let (quota, used) = (cache.quota(), cache.used_bytes());
        out.counter("flywheel_runner_cache_hits_total", "Chunk reads this process answered from the local cache.", stats.hits);
        out.counter("flywheel_runner_cache_misses_total", "Chunk reads this process did not find in the local cache.", stats.misses);
        let lookups = stats.hits + stats.misses;
        let ratio = if lookups == 0 { 0.0 } else { stats.hits as f64 / lookups as f64 };
        out.gauge("flywheel_runner_cache_hit_ratio", "Hits over lookups of this process since it started.", ratio);
        out.counter("flywheel_runner_cache_corrupt_total", "Cache entries that failed verification and were dropped.", stats.corrupt);
        out.gauge("flywheel_runner_cache_used_bytes", "Bytes of the local chunk cache counted against its quota.", used as f64);
        out.gauge("flywheel_runner_cache_quota_bytes", "Quota of the local chunk cache.", quota as f64);
    }
}

/// Serves `GET /metrics` from `registry` on `listener` until the task is dropped, for daemons
/// without an HTTP server of their own; anything else is 404. One request per connection,
/// whose head must arrive within 5 seconds and whose answer within 30.
pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    // Rendering may ask the cache's owner over its socket: not on a runtime worker.
                    let body = tokio::task::spawn_blocking(move || registry.render()).await.unwrap_or_default();
                    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body)
                }
            }),
        )
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "only GET /metrics is served here\n") });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(5)).keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::debug!("accepting a metrics connection failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        });
    }
}
