//! Prometheus metrics of the runner daemons (`flywheel mount`, `substitute`, `push-daemon`),
//! and a minimal HTTP endpoint that serves them for daemons without an HTTP server of their
//! own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flywheel_core::metrics::{render_sample, Histogram};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
pub fn render_store(store: &ChunkStore, out: &mut String) {
    let fetch = store.metrics();
    let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
        render_sample(out, name, "counter", help, value.load(Ordering::Relaxed) as f64)
    };
    counter(out, "flywheel_runner_chunks_fetched_total", "Chunks fetched from the server and verified.", &fetch.chunks_fetched);
    counter(out, "flywheel_runner_chunk_bytes_fetched_total", "Compressed bytes of chunks fetched from the server.", &fetch.bytes_fetched);
    counter(out, "flywheel_runner_chunk_fetch_errors_total", "Chunk requests to the server that failed.", &fetch.fetch_errors);
    fetch.fetch_seconds.render(out, "flywheel_runner_chunk_fetch_seconds", "Latency of one chunk request to the server.");
    let cache = store.cache();
    let stats = cache.stats();
    let (quota, used) = (cache.quota(), cache.used_bytes());
    render_sample(out, "flywheel_runner_cache_hits_total", "Chunk reads this process answered from the local cache.", "counter", stats.hits as f64);
    render_sample(out, "flywheel_runner_cache_misses_total", "Chunk reads this process did not find in the local cache.", "counter", stats.misses as f64);
    let lookups = stats.hits + stats.misses;
    let ratio = if lookups == 0 { 0.0 } else { stats.hits as f64 / lookups as f64 };
    render_sample(out, "flywheel_runner_cache_hit_ratio", "Hits over lookups of this process since it started.", "gauge", ratio);
    render_sample(out, "flywheel_runner_cache_corrupt_total", "Cache entries that failed verification and were dropped.", "counter", stats.corrupt as f64);
    render_sample(out, "flywheel_runner_cache_used_bytes", "Bytes of the local chunk cache counted against its quota.", "gauge", used as f64);
    render_sample(out, "flywheel_runner_cache_quota_bytes", "Quota of the local chunk cache.", "gauge", quota as f64);
}

/// Serves `GET /metrics` on `listener` until the task is dropped: one response per
/// connection, anything else is 404. Requests are read with a size and time limit.
pub async fn serve(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::debug!("accepting a metrics connection failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
                // Rendering may ask the cache's owner over its socket: not on a runtime worker.
                let body = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
                ("200 OK", body)
            } else {
                ("404 Not Found", "only GET /metrics is served here\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
