//! The mount's metrics.

use super::*;

/// The mount's FUSE requests, reads, passthrough files and background fetches.
pub(super) struct MountMetrics(pub(super) Arc<Inner>);

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
