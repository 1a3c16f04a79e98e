//! Real Bazel (4.2.3, Debian's `bazel-bootstrap`) against the cache: a workspace of genrules
//! (`tests/bazel/workspace`) is built with `--remote_cache=grpc://` and with `http://`, then
//! built again from a fresh output base, which must take every action from the cache and run
//! none, by Bazel's own summary. Each Bazel run costs about 2.5 s of JVM start on top of the
//! build (`--batch`, so that no server outlives the test).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Backend, Server};

/// The workspace's actions (`bazel build //:all`).
const ACTIONS: usize = 6;

/// The outputs the workspace builds, compared byte for byte between builds.
const OUTPUTS: [&str; 7] =
    ["hello.txt", "upper.txt", "big.txt", "pair_a.txt", "pair_b.txt", "from_source.txt", "all_joined.txt"];

struct Build {
    summary: String,
    outputs: Vec<Vec<u8>>,
}

/// Runs `bazel build //:all` in a copy of the workspace, in the output base `base`, with the
/// remote-cache flags `cache`.
fn bazel_build(bazel: &Path, root: &Path, base: &str, cache: &[String]) -> Build {
    let workspace = root.join("workspace");
    if !workspace.exists() {
        std::fs::create_dir_all(&workspace).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel/workspace");
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), workspace.join(entry.file_name())).unwrap();
        }
    }
    let output_base = root.join(base);
    let out = Command::new(bazel)
        .current_dir(&workspace)
        .arg("--nohome_rc")
        .arg(format!("--output_user_root={}", root.join("user-root").display()))
        .arg(format!("--output_base={}", output_base.display()))
        .args(["--batch", "--host_jvm_args=-Xmx512m", "build"])
        .args(["--spawn_strategy=local", "--incompatible_strict_action_env", "--symlink_prefix=/", "--noshow_progress"])
        .args(["--color=no", "--curses=no", "--remote_timeout=30", "--remote_retries=0"])
        .args(cache)
        .arg("//:all")
        .env("HOME", root)
        .output()
        .expect("running bazel");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bazel build failed:\n{stderr}");
    let summary = stderr
        .lines()
        .find(|l| l.contains(" processes: ") || l.contains(" process: "))
        .unwrap_or_else(|| panic!("no process summary in Bazel's output:\n{stderr}"))
        .to_string();
    let bin = output_base.join("execroot/flywheel_bazel_test/bazel-out/k8-fastbuild/bin");
    let outputs = OUTPUTS.iter().map(|name| std::fs::read(bin.join(name)).unwrap()).collect();
    Build { summary, outputs }
}

/// The number before `what` in a summary such as `7 processes: 6 remote cache hit, 1 internal.`
fn count(summary: &str, what: &str) -> usize {
    let (_, parts) = summary.split_once(": ").unwrap();
    let parts = parts.split_once(": ").map_or(parts, |(_, p)| p);
    parts
        .trim_end_matches('.')
        .split(", ")
        .find_map(|part| part.strip_suffix(what).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

fn cold_then_cached(bazel: &Path, root: &Path, cache: Vec<String>) {
    let cold = bazel_build(bazel, root, "cold", &cache);
    assert_eq!(count(&cold.summary, "remote cache hit"), 0, "{}", cold.summary);
    assert_eq!(count(&cold.summary, "local"), ACTIONS, "{}", cold.summary);
    let cached = bazel_build(bazel, root, "cached", &cache);
    assert_eq!(count(&cached.summary, "remote cache hit"), ACTIONS, "{}", cached.summary);
    assert_eq!(count(&cached.summary, "local"), 0, "no action may run: {}", cached.summary);
    assert!(cold.outputs == cached.outputs, "cached outputs differ from built ones");
    assert_eq!(cached.outputs[2].len(), 2 << 20);
}

fn bazel_against(backend: Backend) {
    let bazel = common::require_tool("bazel");
    let port = common::free_port();
    let server = Server::start_with(backend, &format!("[bazel]\ngrpc-listen = \"127.0.0.1:{port}\"\n"));
    server.create_cache("bazel-grpc", false);
    server.create_cache("bazel-http", false);
    let token = server.mint(&["--pull", "bazel-*", "--push", "bazel-*"]);
    let dir = tempfile::tempdir().unwrap();

    // gRPC: the instance name is the cache, the token a header (Bazel puts no credentials
    // from a grpc:// URL into requests).
    let grpc_root: PathBuf = dir.path().join("grpc");
    cold_then_cached(
        &bazel,
        &grpc_root,
        vec![
            format!("--remote_cache=grpc://127.0.0.1:{port}"),
            "--remote_instance_name=bazel-grpc".into(),
            format!("--remote_header=authorization=Bearer {token}"),
        ],
    );

    // HTTP: the cache is the URL's prefix, the token the password of the URL (sent as Basic
    // in URL-safe base64).
    let http_root = dir.path().join("http");
    let url = server.url.replacen("http://", &format!("http://bazel:{token}@"), 1);
    cold_then_cached(&bazel, &http_root, vec![format!("--remote_cache={url}/bazel-http")]);

    // A token that may only pull: Bazel reads the hits and uploads nothing.
    let reader = server.mint(&["--pull", "bazel-*"]);
    let read_only = bazel_build(
        &bazel,
        &dir.path().join("read-only"),
        "ro",
        &[
            format!("--remote_cache=grpc://127.0.0.1:{port}"),
            "--remote_instance_name=bazel-grpc".into(),
            format!("--remote_header=authorization=Bearer {reader}"),
            "--noremote_upload_local_results".into(),
        ],
    );
    assert_eq!(count(&read_only.summary, "remote cache hit"), ACTIONS, "{}", read_only.summary);
}

#[test]
fn bazel_builds_from_the_cache_local() {
    bazel_against(Backend::Local);
}

#[test]
fn bazel_builds_from_the_cache_s3() {
    bazel_against(Backend::S3);
}

#[test]
fn summary_counts_parse() {
    assert_eq!(count("INFO: 7 processes: 6 remote cache hit, 1 internal.", "remote cache hit"), 6);
    assert_eq!(count("INFO: 7 processes: 1 internal, 6 local.", "local"), 6);
    assert_eq!(count("INFO: 7 processes: 1 internal, 6 local.", "remote cache hit"), 0);
}
