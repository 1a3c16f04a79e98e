//! `GET|PUT /_flywheel/v1/{cache}/trace/{key}`: access traces, which chunks of which store
//! paths a CI job read, in the order it first read them.
//!
//! A runner's mount records a trace while a job runs and saves it under a key the job chooses
//! (its name, or its closure's root). The next job with that key fetches the traced chunks
//! before it reads them. A trace is a hint beside a cache's content: it never changes a NAR or
//! a chunk, and a chunk it names that the cache no longer has is skipped, not an error.
//!
//! `PUT` sends the trace of one run; the server merges it into the stored one (see
//! [`Trace::merge`]) and answers [`TraceSummary`]. `GET` answers the stored [`Trace`].

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkHash;
use crate::manifest::ChunkRef;
use crate::nix::StorePath;
use crate::{Error, Result};

/// The trace format this build reads and writes.
pub const TRACE_VERSION: u32 = 1;
/// Most chunks a trace names: 4 GiB of data at the average chunk size, far more than a job's
/// working set, and a stored trace of a few megabytes.
pub const MAX_TRACE_CHUNKS: usize = 65_536;
/// Most store paths a trace names.
pub const MAX_TRACE_PATHS: usize = 8_192;
/// Largest trace body accepted, on either side.
pub const MAX_TRACE_BODY: usize = 8 << 20;
/// Runs in a row a chunk may go unread before a merge drops it from the trace.
pub const MAX_TRACE_AGE: u8 = 3;
/// Longest trace key.
pub const MAX_TRACE_KEY_LEN: usize = 128;

/// Checks a trace key: 1 to 128 letters, digits, `-`, `_`, `.` or `+`, starting with a letter or
/// digit. Keys become object names, so nothing that could climb out of the cache's folder.
pub fn validate_trace_key(key: &str) -> Result<()> {
    let first_ok = key.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if first_ok && rest_ok && key.len() <= MAX_TRACE_KEY_LEN {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid trace key {key:?}: use 1 to {MAX_TRACE_KEY_LEN} letters, digits, '-', '_', '.' or '+', starting with a letter or digit"
        )))
    }
}

/// One traced chunk read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u32, ChunkHash, u32, u8)", into = "(u32, ChunkHash, u32, u8)")]
pub struct TraceEntry {
    /// Index into [`Trace::paths`].
    pub path: u32,
    /// The chunk, as the path's manifest lists it.
    pub chunk: ChunkRef,
    /// Runs since a job last read it: 0 in the trace of one run.
    pub age: u8,
}

impl From<(u32, ChunkHash, u32, u8)> for TraceEntry {
    fn from((path, hash, size, age): (u32, ChunkHash, u32, u8)) -> Self {
        TraceEntry { path, chunk: ChunkRef { hash, size }, age }
    }
}

impl From<TraceEntry> for (u32, ChunkHash, u32, u8) {
    fn from(entry: TraceEntry) -> Self {
        (entry.path, entry.chunk.hash, entry.chunk.size, entry.age)
    }
}

/// An access trace: chunks in the order jobs first read them. On the wire, each entry is a
/// compact array `[path index, chunk hash, size, age]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    /// [`TRACE_VERSION`].
    pub version: u32,
    /// Store path base names (`<hash>-<name>`) that entries name by index.
    pub paths: Vec<String>,
    /// The chunks, first read first.
    pub chunks: Vec<TraceEntry>,
}

/// What the server holds under a key after a `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSummary {
    /// Paths the stored trace names.
    pub paths: usize,
    /// Chunks it names.
    pub chunks: usize,
    /// Chunks of the earlier trace that the merge dropped: unread for too many runs, or past
    /// [`MAX_TRACE_CHUNKS`].
    pub dropped: usize,
}

impl Default for Trace {
    fn default() -> Self {
        Trace { version: TRACE_VERSION, paths: Vec::new(), chunks: Vec::new() }
    }
}

impl Trace {
    /// Builds the trace of one run from reads in order; repeated reads count once, and reads
    /// past [`MAX_TRACE_CHUNKS`] are left out.
    pub fn from_reads<'a>(reads: impl IntoIterator<Item = (&'a str, ChunkRef)>) -> Trace {
        let mut builder = Builder::default();
        for (path, chunk) in reads {
            builder.push(path, chunk, 0);
        }
        builder.finish()
    }

    /// Parses and checks a trace body.
    pub fn parse(body: &[u8]) -> Result<Trace> {
        if body.len() > MAX_TRACE_BODY {
            return Err(Error::invalid(format!("a trace is at most {MAX_TRACE_BODY} bytes")));
        }
        let trace: Trace = serde_json::from_slice(body).map_err(|e| Error::invalid(format!("trace: {e}")))?;
        trace.validate()?;
        Ok(trace)
    }

    /// Checks the bounds and that every entry names a listed path and a possible chunk.
    pub fn validate(&self) -> Result<()> {
        if self.version != TRACE_VERSION {
            return Err(Error::invalid(format!("trace version {} is not {TRACE_VERSION}", self.version)));
        }
        if self.paths.len() > MAX_TRACE_PATHS || self.chunks.len() > MAX_TRACE_CHUNKS {
            return Err(Error::invalid(format!(
                "a trace names at most {MAX_TRACE_PATHS} paths and {MAX_TRACE_CHUNKS} chunks"
            )));
        }
        for path in &self.paths {
            StorePath::from_base_name(path).map_err(|e| Error::invalid(format!("trace path {path:?}: {e}")))?;
        }
        for entry in &self.chunks {
            if entry.path as usize >= self.paths.len() {
                return Err(Error::invalid(format!("trace entry names path {} of {}", entry.path, self.paths.len())));
            }
            crate::chunk::check_chunk_len(u64::from(entry.chunk.size))
                .map_err(|e| Error::invalid(format!("trace chunk {}: {e}", entry.chunk.hash)))?;
            if entry.age > MAX_TRACE_AGE {
                return Err(Error::invalid(format!("trace entry age {} is over {MAX_TRACE_AGE}", entry.age)));
            }
        }
        Ok(())
    }

    /// The stored trace after a run: the run's reads first, in its order, then what earlier
    /// runs read and this one did not, one run older; entries older than [`MAX_TRACE_AGE`]
    /// are dropped, and so is anything past [`MAX_TRACE_CHUNKS`]. The newest order wins
    /// because it is the likeliest order of the next run. Returns the merge and how many of
    /// `self`'s entries it dropped.
    pub fn merge(&self, run: &Trace) -> (Trace, usize) {
        let mut builder = Builder::default();
        for entry in &run.chunks {
            builder.push(&run.paths[entry.path as usize], entry.chunk, entry.age);
        }
        let mut dropped = 0;
        for entry in &self.chunks {
            let path = &self.paths[entry.path as usize];
            if builder.contains(path, &entry.chunk) {
                continue;
            }
            let age = entry.age.saturating_add(1);
            if age > MAX_TRACE_AGE || !builder.push(path, entry.chunk, age) {
                dropped += 1;
            }
        }
        (builder.finish(), dropped)
    }

    /// The entries as runs of consecutive chunks of one path: `(base name, chunks)`, in trace
    /// order. A path read, left and read again makes two runs.
    pub fn runs(&self) -> Vec<(&str, Vec<ChunkRef>)> {
        let mut runs: Vec<(&str, Vec<ChunkRef>)> = Vec::new();
        for entry in &self.chunks {
            let path = self.paths[entry.path as usize].as_str();
            match runs.last_mut() {
                Some((last, chunks)) if *last == path => chunks.push(entry.chunk),
                _ => runs.push((path, vec![entry.chunk])),
            }
        }
        runs
    }

    /// A summary after a merge that dropped `dropped` entries.
    pub fn summary(&self, dropped: usize) -> TraceSummary {
        TraceSummary { paths: self.paths.len(), chunks: self.chunks.len(), dropped }
    }
}

/// Builds a trace, keeping each (path, chunk) once, in first-pushed order.
#[derive(Default)]
struct Builder {
    trace: Trace,
    path_index: HashMap<String, u32>,
    seen: HashSet<(u32, ChunkHash)>,
}

impl Builder {
    fn contains(&self, path: &str, chunk: &ChunkRef) -> bool {
        self.path_index.get(path).is_some_and(|&i| self.seen.contains(&(i, chunk.hash)))
    }

    /// Adds an entry unless it is there already; false when the trace is full.
    fn push(&mut self, path: &str, chunk: ChunkRef, age: u8) -> bool {
        if self.trace.chunks.len() >= MAX_TRACE_CHUNKS {
            return false;
        }
        let index = match self.path_index.get(path) {
            Some(&i) => i,
            None => {
                if self.trace.paths.len() >= MAX_TRACE_PATHS {
                    return false;
                }
                let i = self.trace.paths.len() as u32;
                self.trace.paths.push(path.to_string());
                self.path_index.insert(path.to_string(), i);
                i
            }
        };
        if self.seen.insert((index, chunk.hash)) {
            self.trace.chunks.push(TraceEntry { path: index, chunk, age });
        }
        true
    }

    fn finish(self) -> Trace {
        self.trace
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-numpy";
    const B: &str = "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-python3";

    fn chunk(n: u8) -> ChunkRef {
        ChunkRef { hash: ChunkHash::of(&[n]), size: 1 }
    }

    #[test]
    fn round_trips_in_the_compact_form() {
        let trace = Trace::from_reads([(A, chunk(1)), (B, chunk(2)), (A, chunk(1)), (A, chunk(3))]);
        assert_eq!(trace.chunks.len(), 3, "a repeated read counts once");
        let json = serde_json::to_string(&trace).unwrap();
        assert!(json.contains(&format!("[0,\"{}\",1,0]", chunk(1).hash)), "{json}");
        assert_eq!(Trace::parse(json.as_bytes()).unwrap(), trace);
    }

    #[test]
    fn runs_follow_the_read_order() {
        let trace = Trace::from_reads([(A, chunk(1)), (A, chunk(2)), (B, chunk(3)), (A, chunk(4))]);
        let runs: Vec<(&str, usize)> = trace.runs().iter().map(|(p, c)| (*p, c.len())).collect();
        assert_eq!(runs, vec![(A, 2), (B, 1), (A, 1)]);
    }

    #[test]
    fn merge_puts_the_newest_run_first_and_ages_out_what_it_no_longer_reads() {
        let mut stored = Trace::from_reads([(A, chunk(1)), (A, chunk(2))]);
        let run = Trace::from_reads([(B, chunk(3)), (A, chunk(2))]);
        let (merged, dropped) = stored.merge(&run);
        assert_eq!(dropped, 0);
        let order: Vec<(ChunkRef, u8)> = merged.chunks.iter().map(|e| (e.chunk, e.age)).collect();
        assert_eq!(order, vec![(chunk(3), 0), (chunk(2), 0), (chunk(1), 1)]);
        stored = merged;
        // Chunk 1 stays unread: it survives MAX_TRACE_AGE more runs, then goes.
        let mut drops = 0;
        for _ in 0..MAX_TRACE_AGE {
            let (merged, dropped) = stored.merge(&run);
            drops += dropped;
            stored = merged;
        }
        assert_eq!(drops, 1);
        assert!(stored.chunks.iter().all(|e| e.chunk != chunk(1)));
        assert_eq!(stored.paths.len(), 2, "paths no entry names are gone too");
    }

    #[test]
    fn merge_is_bounded() {
        let many: Vec<ChunkRef> = (0..MAX_TRACE_CHUNKS as u32 + 10)
            .map(|i| ChunkRef { hash: ChunkHash::of(&i.to_le_bytes()), size: 1 })
            .collect();
        let run = Trace::from_reads(many.iter().map(|c| (A, *c)));
        assert_eq!(run.chunks.len(), MAX_TRACE_CHUNKS);
        let older = Trace::from_reads([(B, chunk(1))]);
        let (merged, dropped) = older.merge(&run);
        assert_eq!(merged.chunks.len(), MAX_TRACE_CHUNKS);
        assert_eq!(dropped, 1);
    }

    #[test]
    fn bad_traces_are_refused() {
        let good = serde_json::to_value(Trace::from_reads([(A, chunk(1))])).unwrap();
        let mut cases: Vec<(String, serde_json::Value)> = Vec::new();
        let mut with = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value = good.clone();
            edit(&mut value);
            cases.push((name.to_string(), value));
        };
        with("version", &|v| v["version"] = 2.into());
        with("path index", &|v| v["chunks"][0][0] = 1.into());
        with("path name", &|v| v["paths"][0] = "../../etc".into());
        with("chunk size", &|v| v["chunks"][0][2] = (u32::MAX).into());
        with("age", &|v| v["chunks"][0][3] = (MAX_TRACE_AGE + 1).into());
        with("hash", &|v| v["chunks"][0][1] = "zz".into());
        with("unknown field", &|v| v["extra"] = 1.into());
        with("short entry", &|v| v["chunks"][0] = serde_json::json!([0, chunk(1).hash, 1]));
        for (name, value) in cases {
            assert!(Trace::parse(&serde_json::to_vec(&value).unwrap()).is_err(), "{name}: {value}");
        }
        assert!(Trace::parse(b"not json").is_err());
        assert!(Trace::parse(&vec![b' '; MAX_TRACE_BODY + 1]).is_err());
    }

    #[test]
    fn trace_keys() {
        for good in ["ci-job", "numpy.test+py3_11", "a", &"k".repeat(MAX_TRACE_KEY_LEN)] {
            assert!(validate_trace_key(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"k".repeat(MAX_TRACE_KEY_LEN + 1), "-x"] {
            assert!(validate_trace_key(bad).is_err(), "{bad}");
        }
    }
}
