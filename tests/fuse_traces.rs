//! Access traces and the background fill of the lazy mount, with real FUSE and a real server:
//! a trace recorded by one job's mount makes the next job's reads local before it makes them;
//! bad or missing traces leave the mount working; the background fill never holds a read up.

#[macro_use]
mod common_fuse;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common_fuse::common::faults::{FaultProxy, Plan};
use common_fuse::common::{fetch_metrics, metric_value, FLYWHEEL};
use common_fuse::{CountingProxy, Setup, CACHE};

/// The modules of the `tree` corpus path that the test job reads: every fourth.
fn job(root: &Path) -> Vec<Vec<u8>> {
    (0..240).step_by(4).map(|i| std::fs::read(root.join(format!("lib/mod{i}.py"))).unwrap()).collect()
}

/// Runs `flywheel ARGS`, returning (success, stdout, stderr).
fn flywheel(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(FLYWHEEL).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn stored_trace(setup: &Setup, cache: &str, key: &str) -> Option<serde_json::Value> {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/_flywheel/v1/{cache}/trace/{key}", setup.server.url))
        .bearer_auth(&setup.token)
        .send()
        .unwrap();
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    assert!(response.status().is_success(), "GET trace: {}", response.status());
    Some(response.json().unwrap())
}

fn put_trace(setup: &Setup, cache: &str, key: &str, body: &serde_json::Value) {
    let response = reqwest::blocking::Client::new()
        .put(format!("{}/_flywheel/v1/{cache}/trace/{key}", setup.server.url))
        .bearer_auth(&setup.token)
        .json(body)
        .send()
        .unwrap();
    assert!(response.status().is_success(), "PUT trace: {} {}", response.status(), response.text().unwrap_or_default());
}

#[test]
fn trace_of_one_job_makes_the_next_jobs_reads_local() {
    let setup = Setup::new();
    let tree = setup.push_fuse_corpus(&["tree"]).remove(0);
    let expected = job(&setup.physical(&tree));
    let proxy = CountingProxy::start(&setup.server.url, CACHE, None);
    // The fill is off, so that what the network carries is what the job read, or the trace.
    let no_fill = ["--fill-max-nar-size", "0"];

    // First job: nothing stored yet; the mount records under the key and saves at unmount.
    let dir_a = tempfile::tempdir().unwrap();
    let mut mount_a = setup.mount(&proxy.url, dir_a.path(), &[&no_fill[..], &["--prefetch", "ci-job"]].concat());
    assert_eq!(job(&mount_a.path(&tree)), expected);
    let fetched_by_first_job = proxy.chunks_requested();
    assert!(fetched_by_first_job > 0);
    assert!(mount_a.terminate(), "mount: {}", std::fs::read_to_string(&mount_a.log).unwrap_or_default());
    let trace = stored_trace(&setup, CACHE, "ci-job").expect("the trace was saved at unmount");
    let traced = trace["chunks"].as_array().unwrap().len();
    assert!(traced > 0 && traced as u64 <= fetched_by_first_job, "trace of {traced} chunks, job fetched {fetched_by_first_job}");
    assert_eq!(trace["paths"], serde_json::json!([tree.trim_start_matches("/nix/store/")]));

    // Second job, on a fresh runner: prefetch, then the job reads only local chunks.
    proxy.reset();
    let dir_b = tempfile::tempdir().unwrap();
    let mount_b = setup.mount(&proxy.url, dir_b.path(), &no_fill);
    let control = ["--cache-dir", dir_b.path().to_str().unwrap()];
    let (ok, out, err) = flywheel(&[&["prefetch", "ci-job", "--wait"], &control[..]].concat());
    assert!(ok, "prefetch: {err}");
    assert!(out.contains(&format!("{traced} chunks of 1 paths fetched")), "{out}");
    let prefetched = proxy.chunks_requested();
    assert_eq!(prefetched, traced as u64, "the prefetch fetched what the trace names");
    proxy.reset();
    assert_eq!(job(&mount_b.path(&tree)), expected);
    assert_eq!(proxy.chunks_requested(), 0, "the job's reads were all prefetched");

    // The second job's reads were recorded too, served locally or not.
    let (ok, out, err) = flywheel(&[&["save-trace"], &control[..]].concat());
    assert!(ok, "save-trace: {err}");
    assert!(out.contains(&format!("saved {traced} chunks")), "{out}");
}

#[test]
fn bad_or_missing_traces_leave_the_mount_working() {
    let setup = Setup::new();
    let tree = setup.push_fuse_corpus(&["tree"]).remove(0);
    let base_name = tree.trim_start_matches("/nix/store/").to_string();
    let expected = job(&setup.physical(&tree));
    let dir = tempfile::tempdir().unwrap();
    let mount = setup.mount(&setup.server.url, dir.path(), &["--fill-max-nar-size", "0"]);
    let control = ["--cache-dir", dir.path().to_str().unwrap()];
    let prefetch = |key: &str| flywheel(&[&["prefetch", key, "--wait"], &control[..]].concat());

    // No trace under the key yet.
    let (ok, out, err) = prefetch("never-saved");
    assert!(ok && out.contains("no trace"), "{out} {err}");

    // A stale trace: a chunk the path does not have, and a path the cache does not have.
    let unknown_chunk = flywheel_core::chunk::ChunkHash::of(b"not a chunk of this path").to_hex();
    let gone = format!("{}-gone", "0".repeat(32));
    put_trace(&setup, CACHE, "stale", &serde_json::json!({
        "version": 1,
        "paths": [base_name, gone],
        "chunks": [[0, unknown_chunk, 1000, 0], [1, unknown_chunk, 1000, 0]],
    }));
    let (ok, out, err) = prefetch("stale");
    assert!(ok, "{err}");
    assert!(out.contains("0 chunks of 2 paths fetched") && out.contains("1 paths no longer in the cache"), "{out}");

    // An empty trace.
    put_trace(&setup, CACHE, "empty", &serde_json::json!({"version": 1, "paths": [], "chunks": []}));
    let (ok, out, err) = prefetch("empty");
    assert!(ok && out.contains("0 chunks of 0 paths"), "{out} {err}");

    // A trace of another cache is not this cache's.
    setup.server.create_cache("other", false);
    put_trace(&setup, "other", "elsewhere", &serde_json::json!({"version": 1, "paths": [base_name], "chunks": []}));
    let (ok, out, err) = prefetch("elsewhere");
    assert!(ok && out.contains("no trace"), "{out} {err}");

    // A stored trace damaged on the server is no reason to fail the job.
    put_trace(&setup, CACHE, "damaged", &serde_json::json!({"version": 1, "paths": [], "chunks": []}));
    let stored = setup.server.objects.join(format!("caches/{CACHE}/traces/damaged"));
    assert!(stored.is_file(), "the trace is stored at {}", stored.display());
    std::fs::write(&stored, b"\x00garbage{{").unwrap();
    let (ok, out, err) = prefetch("damaged");
    assert!(ok, "{out} {err}");
    assert!(!out.contains("fetched"), "{out}");

    // Keys that could name other files, and a mount that is not there, are refused clearly.
    let (ok, _, err) = prefetch("../../etc/passwd");
    assert!(!ok && err.contains("invalid trace key"), "{err}");
    let (ok, _, err) = flywheel(&["prefetch", "k", "--control-socket", "/nonexistent/control.sock"]);
    assert!(!ok && err.contains("no mount answers"), "{err}");
    let (ok, _, err) = flywheel(&[&["save-trace", "../x"], &control[..]].concat());
    assert!(!ok && err.contains("invalid trace key"), "{err}");

    // Through all of it, the mount serves the right bytes.
    assert_eq!(job(&mount.path(&tree)), expected);
}

#[test]
fn background_fill_lets_reads_go_first() {
    let setup = Setup::new();
    let huge = setup.push_fuse_corpus(&["huge"]).remove(0);
    // A slow link: every request waits, so the fill of the 52 MB path takes many seconds.
    let link = FaultProxy::start(&setup.server.url);
    link.set_plan(Plan { latency: Duration::from_millis(150), ..Plan::default() });
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let dir = tempfile::tempdir().unwrap();
    let mount = setup.mount(&link.url, dir.path(), &["--metrics-listen", &format!("127.0.0.1:{metrics_port}"), "--fill-max-nar-size", "268435456"]);

    // The job's first read of the path starts the fill of all of it.
    {
        use std::io::Read;
        let mut head = [0u8; 4096];
        std::fs::File::open(mount.path(&huge).join("data/blob")).unwrap().read_exact(&mut head).unwrap();
    }
    // A read at the other end of the NAR is answered while the fill is still queued.
    let config = std::fs::read_to_string(mount.path(&huge).join("etc/config")).unwrap();
    assert_eq!(config, std::fs::read_to_string(setup.physical(&huge).join("etc/config")).unwrap());
    let text = fetch_metrics(&metrics);
    let pending = metric_value(&text, "flywheel_fuse_prefetch_pending");
    assert!(pending > 0.0, "the read waited for the whole fill: {text}");

    // The fill then completes: reading the whole path needs no further request.
    let deadline = Instant::now() + Duration::from_secs(300);
    while metric_value(&fetch_metrics(&metrics), "flywheel_fuse_prefetch_pending") > 0.0 {
        assert!(Instant::now() < deadline, "the fill did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = fetch_metrics(&metrics);
    assert!(metric_value(&text, "flywheel_fuse_prefetched_chunks_total{source=\"fill\"}") > 100.0, "{text}");
    assert_eq!(metric_value(&text, "flywheel_fuse_prefetch_failures_total"), 0.0, "{text}");
    let before = link.counts().requests;
    let blob = std::fs::read(mount.path(&huge).join("data/blob")).unwrap();
    assert!(blob == std::fs::read(setup.physical(&huge).join("data/blob")).unwrap(), "the blob's bytes differ");
    assert_eq!(link.counts().requests, before, "the fill left nothing to fetch");
}
