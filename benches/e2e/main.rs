//! The end-to-end benchmark: runs the real binaries on this machine and writes BENCHMARKS.md.
//! Run it with `./scripts/bench.sh` (which installs the reference tools, then runs
//! `cargo bench --bench e2e`). Every figure stands beside a reference measured in the same run;
//! each is the median of several runs, because the machine is shared and noisy.

// Both harnesses carry the shared helpers of tests/common; two copies of them are harmless.
#![allow(clippy::duplicate_mod)]

#[path = "../../tests/common_fuse/mod.rs"]
mod common_fuse;
#[path = "../../tests/substituter_common/mod.rs"]
mod substituter_common;

mod attic;
mod bazel;
mod compression;
mod fuse;
mod job;
mod lazy;
mod load;
mod packs;
mod server;
mod substituter;
mod support;
mod tfstate;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common_fuse::common::{self, Backend, Server};
use compression::compression_section;
use fuse::fuse_section;
use job::job_section;
use lazy::lazy_section;
use load::load_section;
use packs::packs_section;
use server::server_section;
use substituter::substituter_section;
use tfstate::tfstate_section;
use attic::Attic;
use bazel::bazel_section;
use support::*;

const RUNS: usize = 3;

/// Runs of the server's ingest (and twice as many downloads): its targets are absolute figures,
/// so their medians take more runs to sit still on a shared machine.
const SERVER_RUNS: usize = 5;
/// Extra runs of the sub-second hot reads.
const HOT_RUNS: usize = 8;
/// Passes over the tree that one of those hot samples times.
const HOT_PASSES: usize = 4;
const MB: f64 = 1e6;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks sections.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let work = tempfile::tempdir().unwrap();
    let commit = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut report = Report {
        header: format!(
            "# Benchmarks\n\nWritten by `./scripts/bench.sh` (`cargo bench --bench e2e`) on {} cores. Each section names the \
             commit it was measured at and the load average when the run started: `./scripts/bench.sh SECTION` measures only \
             the sections whose names contain SECTION (server, packs, compression, lazy, job, load, fuse, substituter, tfstate, bazel) and keeps the others. \
             Medians of several runs; ratios compare figures taken in the same run.\n\
             Per-function figures come from `cargo bench -p flywheel-core` (criterion).\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        ),
        stamp: format!("(Measured at commit {commit}; load average at start: {load}.)"),
        sections: Vec::new(),
    };
    type Section = fn(&mut Report, &Path);
    let sections: [(&str, Section); 10] = [
        ("server", server_section),
        ("packs", packs_section),
        ("compression", compression_section),
        ("lazy", lazy_section),
        ("job", job_section),
        ("load", load_section),
        ("fuse", fuse_section),
        ("substituter", substituter_section),
        ("tfstate", tfstate_section),
        ("bazel", bazel_section),
    ];
    for (name, run) in sections {
        if wants(name) {
            run(&mut report, work.path());
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let previous = if filter.is_empty() { None } else { std::fs::read_to_string(&path).ok() };
    let out = report.render(previous.as_deref());
    std::fs::write(&path, &out).unwrap();
    println!("{out}");
    eprintln!("wrote {}", path.display());
}
