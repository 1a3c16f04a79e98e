//! Threads outside the async runtime, for the store calls that block.
//!
//! `object_store`'s local and in-memory stores do their work in the calling thread when that
//! thread has not entered a tokio runtime; inside one, each call hops to the blocking pool
//! (a read hops twice: open, then read). Serving a NAR of 12,000 chunk files that way spent
//! about half of the server's CPU time switching and waking threads. Here a batch of calls
//! takes one hop: it is run on one of a few threads of our own, where those stores run
//! inline.

use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc};

use flywheel_core::{Error, Result};
use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// A few threads, outside the tokio runtime, that run blocking work handed to them.
pub struct InlineIo {
    jobs: mpsc::Sender<Job>,
}

impl InlineIo {
    /// Starts `threads` threads (at least one), named `name-N`. They end when this is dropped.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || loop {
                // The lock is held only while this thread waits for the next job.
                let job = queue.lock().recv();
                match job {
                    // A panicking job loses its answer (its caller sees an error), not the thread.
                    Ok(job) => drop(std::panic::catch_unwind(AssertUnwindSafe(job))),
                    Err(_) => return,
                }
            })?;
        }
        Ok(InlineIo { jobs })
    }

    /// Runs `work` on one of the threads and answers what it returns.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller may have gone (a client that hung up); its answer is then dropped.
            let _ = answer.send(work());
        });
        self.jobs.send(job).map_err(|_| Error::internal("the storage I/O threads have stopped"))?;
        answered.await.map_err(|_| Error::internal("a storage I/O job failed without an answer"))
    }

    /// Runs the future `work` makes to completion on one of the threads, where stores that work
    /// in the calling thread do so.
    pub async fn block_on<F, T>(&self, work: impl FnOnce() -> F + Send + 'static) -> Result<T>
    where
        F: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        self.run(move || futures::executor::block_on(work())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_outside_the_runtime_and_answers() {
        let io = InlineIo::new(2, "test-io").unwrap();
        let outside = io.run(|| tokio::runtime::Handle::try_current().is_err()).await.unwrap();
        assert!(outside, "the job ran where a tokio runtime was entered");
        let sum = io.block_on(|| async { (1..=10u64).sum::<u64>() }).await.unwrap();
        assert_eq!(sum, 55);
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let io = InlineIo::new(1, "test-io").unwrap();
        let err = io.run(|| -> u32 { panic!("a job that fails") }).await.unwrap_err();
        assert_eq!(err.kind(), flywheel_core::ErrorKind::Internal);
        // The one thread is still there for the next job.
        assert_eq!(io.run(|| 7).await.unwrap(), 7);
    }
}
