//! Recording which chunks readers of the mount needed, in the order they first needed them,
//! for an access trace (`flywheel_core::api::v1::traces`).
//!
//! A recording starts when the mount starts, and again at each `prefetch` request of a job.
//! Each chunk is logged once per recording: every chunk of a path carries the number of the
//! recording that last logged it, so a read checks one atomic per chunk and takes no lock
//! unless the chunk is new to this recording.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use flywheel_core::api::v1::traces::{Trace, MAX_TRACE_CHUNKS};
use parking_lot::Mutex;

use crate::tree::PathTree;

/// The current recording.
pub(crate) struct Recorder {
    /// Number of the current recording; chunks logged under an older number count as new.
    epoch: AtomicU32,
    state: Mutex<Recording>,
}

#[derive(Default)]
struct Recording {
    /// The trace key it will be saved under, if a job named one.
    key: Option<String>,
    /// (path, chunk index) in first-read order, at most [`MAX_TRACE_CHUNKS`].
    reads: Vec<(Arc<PathTree>, u32)>,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder { epoch: AtomicU32::new(1), state: Mutex::new(Recording::default()) }
    }

    /// Notes that the chunks `range` of `tree` were read.
    pub fn note(&self, tree: &Arc<PathTree>, range: Range<usize>) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        for index in range {
            let Some(slot) = tree.traced.get(index) else { return };
            if slot.load(Ordering::Relaxed) == epoch || slot.swap(epoch, Ordering::Relaxed) == epoch {
                continue;
            }
            let mut state = self.state.lock();
            // A new recording may have started since `epoch` was read; the read still belongs
            // to the job that made it, which is the one recording now.
            if state.reads.len() < MAX_TRACE_CHUNKS {
                state.reads.push((tree.clone(), index as u32));
            }
        }
    }

    /// Starts a new recording under `key`, dropping what the current one holds.
    pub fn restart(&self, key: Option<String>) {
        let mut state = self.state.lock();
        self.epoch.fetch_add(1, Ordering::Relaxed);
        *state = Recording { key, reads: Vec::new() };
    }

    /// The key the current recording will be saved under.
    pub fn key(&self) -> Option<String> {
        self.state.lock().key.clone()
    }

    /// Chunks the current recording holds.
    pub fn len(&self) -> usize {
        self.state.lock().reads.len()
    }

    /// The trace of the current recording.
    pub fn trace(&self) -> Trace {
        let reads: Vec<(Arc<PathTree>, u32)> = self.state.lock().reads.clone();
        Trace::from_reads(reads.iter().filter_map(|(tree, index)| {
            let chunk = *tree.chunks.get(*index as usize)?;
            Some((tree.base_name.as_str(), chunk))
        }))
    }
}
