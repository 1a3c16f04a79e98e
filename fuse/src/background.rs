//! Fetching chunks ahead of readers, in the background: the chunks an access trace names
//! (first, one request at a time, in the trace's order, and kept in the mount's memory too),
//! and whole store paths once a job starts reading them (then).
//!
//! The job's own reads always go first. They never queue here: a read that misses fetches its
//! chunks itself, at once, and while any such read is waiting for the server no background
//! request starts. Background requests are small (about half a megabyte, a few milliseconds of
//! a 1 Gbit/s link), so a read that arrives while one is in flight shares the link only
//! briefly. Chunks already in the local cache are skipped, and a chunk a read is fetching is
//! waited for, not fetched twice (`ChunkStore` joins them).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flywheel_client::ChunkStore;
use flywheel_core::manifest::ChunkRef;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::{debug, Instrument};

use crate::tree::PathTree;

/// Background requests in flight at once, at most.
const WORKERS: usize = 4;
/// A trace's requests in flight at once. One: a trace lists chunks in the order the job read
/// them, and requests sharing a slow link each arrive later than one alone would, so the job
/// waits longer for its next chunk (Python over 100 Mbit/s: 1.93-1.96 s with four, 1.79-1.82
/// s with one). A request holds up to [`TRACE_BATCH_BYTES`], so its round trip is not the cost.
const TRACE_IN_FLIGHT: usize = 1;
/// Raw bytes of chunks per background request: small enough that a read arriving meanwhile
/// waits little for the link, large enough that a request's round trip is not the cost.
const FILL_BATCH_BYTES: u64 = 512 * 1024;
/// A trace's chunks are what the job will read next, so they go in larger requests.
const TRACE_BATCH_BYTES: u64 = 2 * 1024 * 1024;
/// The first request of a trace's prefetch: the job starts reading at once, and the
/// [`WORKERS`] first requests share the link, so the first ones are small (each next one
/// twice the last, up to [`TRACE_BATCH_BYTES`]); the job's first chunks then arrive after a
/// fraction of a large request's time.
const TRACE_FIRST_BATCH_BYTES: u64 = 128 * 1024;

/// Takes the verified chunks a trace's prefetch fetched (the job reads them next), besides the
/// local cache that every fetch fills.
pub(crate) type KeepTraced = Box<dyn Fn(&[ChunkRef], Vec<Arc<[u8]>>) + Send + Sync>;

/// Where a background fetch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// An access trace of an earlier job.
    Trace,
    /// A store path a job started reading.
    Fill,
}

struct Job {
    tree: Arc<PathTree>,
    chunks: Vec<ChunkRef>,
    source: Source,
}

#[derive(Default)]
struct Queues {
    trace: VecDeque<Job>,
    fill: VecDeque<Job>,
}

/// What the background fetches did, for `/metrics` and `prefetch --wait`.
#[derive(Debug, Default)]
pub(crate) struct BackgroundStats {
    pub trace_chunks: AtomicU64,
    pub fill_chunks: AtomicU64,
    pub failed_requests: AtomicU64,
}

/// The background fetcher. Cheap to share.
pub(crate) struct Background {
    store: ChunkStore,
    timeout: Duration,
    queues: Mutex<Queues>,
    /// Jobs queued or running, per source (index 0: trace, 1: fill).
    pending: [AtomicUsize; 2],
    work: Notify,
    /// Reads of the mount waiting for the server.
    demand: AtomicUsize,
    /// Background requests in flight.
    running: AtomicUsize,
    /// Of those, a trace's.
    trace_running: AtomicUsize,
    /// Background requests allowed in flight while reads wait (see [`Background::start`]).
    alongside_reads: usize,
    /// Notified when a read stops waiting or a background request ends.
    link_freed: Notify,
    /// Notified when the trace's jobs are all done.
    trace_done: Notify,
    /// Trace requests queued since the trace queue was last empty: sets the next one's size.
    trace_batches: AtomicUsize,
    keep_traced: KeepTraced,
    pub stats: BackgroundStats,
}

/// Held while a read of the mount waits for chunks; background requests wait meanwhile.
pub(crate) struct Demand<'a>(&'a Background);

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        if self.0.demand.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.link_freed.notify_waiters();
        }
    }
}

fn slot(source: Source) -> usize {
    match source {
        Source::Trace => 0,
        Source::Fill => 1,
    }
}

impl Background {
    /// Starts the workers on `runtime`. While reads of the mount wait for the server, at most
    /// `alongside_reads` background requests are in flight (0: none start until no read waits).
    /// What a trace's prefetch fetched also goes to `keep_traced`.
    pub fn start(
        store: ChunkStore,
        timeout: Duration,
        alongside_reads: usize,
        keep_traced: KeepTraced,
        runtime: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let background = Arc::new(Background {
            store,
            timeout,
            queues: Mutex::default(),
            pending: Default::default(),
            work: Notify::new(),
            demand: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            trace_running: AtomicUsize::new(0),
            alongside_reads,
            link_freed: Notify::new(),
            trace_done: Notify::new(),
            trace_batches: AtomicUsize::new(0),
            keep_traced,
            stats: BackgroundStats::default(),
        });
        for worker in 0..WORKERS {
            let weak = Arc::downgrade(&background);
            runtime.spawn(Self::work(weak).instrument(tracing::debug_span!("background", worker)));
        }
        background
    }

    /// Marks a read of the mount as waiting for the server until the guard drops.
    pub fn demand(&self) -> Demand<'_> {
        self.demand.fetch_add(1, Ordering::AcqRel);
        Demand(self)
    }

    /// Queues `chunks` of `tree`, in this order, in requests of a size fit for `source`.
    pub fn queue(&self, tree: &Arc<PathTree>, chunks: &[ChunkRef], source: Source) {
        let limit = |batches_before: usize| match source {
            Source::Trace => trace_batch_bytes(batches_before),
            Source::Fill => FILL_BATCH_BYTES,
        };
        let batches_before = match source {
            Source::Trace => self.trace_batches.load(Ordering::Acquire),
            Source::Fill => 0,
        };
        let mut jobs = Vec::new();
        let mut batch: Vec<ChunkRef> = Vec::new();
        let mut bytes = 0;
        for chunk in chunks {
            batch.push(*chunk);
            bytes += u64::from(chunk.size);
            if bytes >= limit(batches_before + jobs.len()) {
                jobs.push(std::mem::take(&mut batch));
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            jobs.push(batch);
        }
        if source == Source::Trace {
            self.trace_batches.store(batches_before + jobs.len(), Ordering::Release);
        }
        if jobs.is_empty() {
            return;
        }
        self.pending[slot(source)].fetch_add(jobs.len(), Ordering::AcqRel);
        {
            let mut queues = self.queues.lock();
            let queue = match source {
                Source::Trace => &mut queues.trace,
                Source::Fill => &mut queues.fill,
            };
            queue.extend(jobs.into_iter().map(|chunks| Job { tree: tree.clone(), chunks, source }));
        }
        self.work.notify_waiters();
    }

    /// Jobs of `source` queued or running.
    pub fn pending(&self, source: Source) -> usize {
        self.pending[slot(source)].load(Ordering::Acquire)
    }

    /// Waits until every queued trace job is done.
    pub async fn trace_drained(&self) {
        loop {
            let notified = self.trace_done.notified();
            if self.pending(Source::Trace) == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn work(weak: std::sync::Weak<Background>) {
        loop {
            let Some(this) = weak.upgrade() else { return };
            // Registered before the queue is looked at, so work queued in between wakes it.
            let notified = this.work.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            // A trace's jobs first, [`TRACE_IN_FLIGHT`] at a time; a fill's only once no trace
            // job waits. Counted under the queues' lock, so two workers never both take the
            // last trace slot.
            let job = {
                let mut queues = this.queues.lock();
                if queues.trace.is_empty() {
                    queues.fill.pop_front()
                } else if this.trace_running.load(Ordering::Acquire) < TRACE_IN_FLIGHT {
                    this.trace_running.fetch_add(1, Ordering::AcqRel);
                    queues.trace.pop_front()
                } else {
                    None
                }
            };
            let Some(job) = job else {
                // Woken by new work, or now and then to notice that the mount is gone (the
                // runtime's shutdown ends the workers too).
                let _ = tokio::time::timeout(Duration::from_secs(5), notified).await;
                continue;
            };
            this.wait_for_link().await;
            this.run(&job).await;
            this.running.fetch_sub(1, Ordering::AcqRel);
            this.link_freed.notify_waiters();
            if job.source == Source::Trace {
                this.trace_running.fetch_sub(1, Ordering::AcqRel);
                // The next trace job may go now; the workers that saw the slot taken wait.
                this.work.notify_waiters();
            }
            let source = slot(job.source);
            if this.pending[source].fetch_sub(1, Ordering::AcqRel) == 1 && job.source == Source::Trace {
                this.trace_batches.store(0, Ordering::Release);
                this.trace_done.notify_waiters();
            }
        }
    }

    /// Waits until a background request may start, and counts it as running: at once when no
    /// read waits for the server, else only while fewer than `alongside_reads` run.
    async fn wait_for_link(&self) {
        loop {
            let notified = self.link_freed.notified();
            let running = self.running.fetch_add(1, Ordering::AcqRel);
            if self.demand.load(Ordering::Acquire) == 0 || running < self.alongside_reads {
                return;
            }
            self.running.fetch_sub(1, Ordering::AcqRel);
            notified.await;
        }
    }

    async fn run(&self, job: &Job) {
        let cache = self.store.cache().clone();
        let wanted = job.chunks.clone();
        // A sled lookup per chunk: cheap, but it may touch the disk.
        let missing: Vec<ChunkRef> = tokio::task::spawn_blocking(move || wanted.into_iter().filter(|c| !cache.contains(&c.hash)).collect())
            .await
            .unwrap_or_default();
        if missing.is_empty() {
            return;
        }
        let fetched = tokio::time::timeout(self.timeout, self.store.get_many(job.tree.hash_part(), &missing)).await;
        match fetched {
            Ok(Ok(chunks)) => {
                let counter = match job.source {
                    Source::Trace => &self.stats.trace_chunks,
                    Source::Fill => &self.stats.fill_chunks,
                };
                counter.fetch_add(missing.len() as u64, Ordering::Relaxed);
                // A fill's chunks may never be read, and a whole path would push out what the
                // job reads; a trace's are what it reads next.
                if job.source == Source::Trace {
                    (self.keep_traced)(&missing, chunks);
                }
            }
            Ok(Err(err)) => {
                self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                debug!(store_path = %job.tree.base_name, "background fetch failed: {err}");
            }
            Err(_) => {
                self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                debug!(store_path = %job.tree.base_name, "background fetch timed out");
            }
        }
    }
}

/// Raw bytes of the trace request that follows `batches_before` others of the same prefetch.
fn trace_batch_bytes(batches_before: usize) -> u64 {
    let doublings = u32::try_from(batches_before).unwrap_or(u32::MAX).min(TRACE_BATCH_BYTES.ilog2());
    (TRACE_FIRST_BATCH_BYTES << doublings).min(TRACE_BATCH_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_requests_start_small_and_grow_to_the_full_size() {
        let sizes: Vec<u64> = (0..7).map(trace_batch_bytes).collect();
        assert_eq!(sizes, [128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 2 << 20, 2 << 20]);
        assert_eq!(trace_batch_bytes(usize::MAX), TRACE_BATCH_BYTES);
    }
}
