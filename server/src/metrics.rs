//! Prometheus metrics of the server, rendered in the text exposition format at `/metrics`
//! (through [`flywheel_core::metrics`], as every process's metrics are).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use flywheel_core::metrics::{Collect, Exposition, Kind, Labels};
pub use flywheel_core::metrics::Histogram;
use parking_lot::Mutex;

/// Everything the server counts.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// Uncompressed NAR bytes received by uploads.
    pub nar_bytes_in: AtomicU64,
    /// Bytes of NARs and chunks sent to clients.
    pub bytes_out: AtomicU64,
    /// Chunks an upload found stored already.
    pub chunks_deduplicated: AtomicU64,
    /// Chunks an upload had to store.
    pub chunks_stored: AtomicU64,
    /// Compressed bytes written for new chunks.
    pub stored_bytes: AtomicU64,
    /// Chunks received through the chunk API (`PUT chunk`, `upload-chunks`), each verified.
    pub chunks_received: AtomicU64,
    /// Chunks read from storage (each verified).
    pub chunks_fetched: AtomicU64,
    /// Of those, frames sent after matching the digest of a frame that verified before,
    /// without being decompressed (see [`crate::preflight`]).
    pub frames_known: AtomicU64,
    /// Pack frames sent whole, compressed as stored, in `.nar.zst` downloads.
    pub pack_frames_sent: AtomicU64,
    /// Chunk API frames sent from memory (see [`crate::hot_chunks`]), storage not asked.
    pub hot_chunks_sent: AtomicU64,
    /// Latency of reading and verifying one chunk from storage.
    pub chunk_fetch_seconds: Histogram,
    /// OpenTofu/Terraform states written (rollbacks included).
    pub tfstate_writes: AtomicU64,
    /// Bytes of those states.
    pub tfstate_bytes_written: AtomicU64,
    /// State locks taken.
    pub tfstate_locks: AtomicU64,
    /// Lock requests, writes and unlocks refused because another holder has the lock.
    pub tfstate_lock_conflicts: AtomicU64,
    /// Locks broken by a forced unlock.
    pub tfstate_locks_broken: AtomicU64,
    /// Time the object store took for one state request (read, write, lock or unlock).
    pub tfstate_seconds: Histogram,
}

impl Metrics {
    /// Counts a finished request by route template, method and status.
    pub fn count_request(&self, route: &str, method: &str, status: u16) {
        *self.requests.lock().entry((route.to_string(), method.to_string(), status)).or_default() += 1;
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        self.collect(&mut out);
        out.finish()
    }
}

impl Collect for Metrics {
    fn collect(&self, out: &mut Exposition) {
        let requests = self.requests.lock();
        out.family(
            "flywheel_http_requests_total",
            Kind::Counter,
            "Requests by route, method and status.",
            requests.iter().map(|((route, method, status), n)| {
                (Labels::of(&[("route", route), ("method", method), ("status", &status.to_string())]), *n as f64)
            }),
        );
        drop(requests);
        let counters: [(&str, &str, &AtomicU64); 15] = [
            ("flywheel_nar_bytes_received_total", "Uncompressed NAR bytes received by uploads.", &self.nar_bytes_in),
            ("flywheel_bytes_sent_total", "Bytes of NARs and chunks sent.", &self.bytes_out),
            ("flywheel_chunks_deduplicated_total", "Uploaded chunks that were stored already.", &self.chunks_deduplicated),
            ("flywheel_chunks_stored_total", "Uploaded chunks that were new.", &self.chunks_stored),
            ("flywheel_stored_bytes_total", "Compressed bytes written for new chunks.", &self.stored_bytes),
            ("flywheel_chunks_fetched_total", "Chunks read from storage and verified.", &self.chunks_fetched),
            ("flywheel_frames_checked_by_digest_total", "Stored frames sent after matching the digest of a frame that verified before, not decompressed.", &self.frames_known),
            ("flywheel_pack_frames_sent_total", "Pack frames sent whole, compressed as stored, in .nar.zst downloads.", &self.pack_frames_sent),
            ("flywheel_hot_chunks_sent_total", "Chunk API frames sent from memory, storage not asked.", &self.hot_chunks_sent),
            ("flywheel_chunks_received_total", "Chunks received through the chunk API and verified.", &self.chunks_received),
            ("flywheel_tfstate_writes_total", "OpenTofu/Terraform states written, rollbacks included.", &self.tfstate_writes),
            ("flywheel_tfstate_bytes_written_total", "Bytes of the states written.", &self.tfstate_bytes_written),
            ("flywheel_tfstate_locks_total", "State locks taken.", &self.tfstate_locks),
            ("flywheel_tfstate_lock_conflicts_total", "Lock requests, writes and unlocks refused because another holder has the lock.", &self.tfstate_lock_conflicts),
            ("flywheel_tfstate_locks_broken_total", "State locks broken by a forced unlock.", &self.tfstate_locks_broken),
        ];
        for (name, help, value) in counters {
            out.counter(name, help, value.load(Ordering::Relaxed));
        }
        out.histogram("flywheel_chunk_fetch_seconds", "Time to read and verify one chunk from storage; where chunks are read in batches (local storage), a batch's time divided among its chunks.", &self.chunk_fetch_seconds);
        out.histogram("flywheel_tfstate_seconds", "Time the object store took for one state request.", &self.tfstate_seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_counters_and_histogram() {
        let metrics = Metrics::default();
        metrics.count_request("/{cache}/{file}", "GET", 200);
        metrics.count_request("/{cache}/{file}", "GET", 200);
        metrics.chunk_fetch_seconds.observe(Duration::from_millis(3));
        metrics.nar_bytes_in.fetch_add(42, Ordering::Relaxed);
        let text = metrics.render();
        assert!(text.contains("flywheel_http_requests_total{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\"} 2"));
        assert!(text.contains("flywheel_nar_bytes_received_total 42"));
        assert!(text.contains("flywheel_chunk_fetch_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("flywheel_chunk_fetch_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("flywheel_chunk_fetch_seconds_count 1"));
    }
}
