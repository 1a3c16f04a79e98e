//! Real Bazel (4.2.3, Debian's `bazel-bootstrap`) against the cache: a workspace of genrules
//! (`tests/bazel/workspace`) is built with `--remote_cache=grpc://` and with `http://`, then
//! built again from a fresh output base, which must take every action from the cache and run
//! none, by Bazel's own summary. Each Bazel run costs about 2.5 s of JVM start on top of the
//! build (`--batch`, so that no server outlives the test).

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::bazel::count;
use common::{Backend, Server};

/// The workspace's actions (`bazel build //:all`).
const ACTIONS: usize = 6;

/// The outputs the workspace builds, compared byte for byte between builds.
const OUTPUTS: [&str; 7] =
    ["hello.txt", "upper.txt", "big.txt", "pair_a.txt", "pair_b.txt", "from_source.txt", "all_joined.txt"];

fn build(bazel: &Path, root: &Path, base: &str, flags: &[String]) -> (String, Vec<Vec<u8>>) {
    let flags: Vec<String> = flags.iter().cloned().chain(["--remote_timeout=30".into(), "--remote_retries=0".into()]).collect();
    let run = common::bazel::build(bazel, root, base, &flags);
    (run.summary, common::bazel::outputs(root, base, &OUTPUTS))
}

fn cold_then_cached(bazel: &Path, root: &Path, cache: Vec<String>) {
    let (cold, cold_outputs) = build(bazel, root, "cold", &cache);
    assert_eq!(count(&cold, "remote cache hit"), 0, "{cold}");
    assert_eq!(count(&cold, "local"), ACTIONS, "{cold}");
    let (cached, cached_outputs) = build(bazel, root, "cached", &cache);
    assert_eq!(count(&cached, "remote cache hit"), ACTIONS, "{cached}");
    assert_eq!(count(&cached, "local"), 0, "no action may run: {cached}");
    assert!(cold_outputs == cached_outputs, "cached outputs differ from built ones");
    assert_eq!(cached_outputs[2].len(), 2 << 20);
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
    let (read_only, _) = build(
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
    assert_eq!(count(&read_only, "remote cache hit"), ACTIONS, "{read_only}");
}

backend_matrix! {
    bazel_against => bazel_builds_from_the_cache_local, bazel_builds_from_the_cache_s3;
}

#[test]
fn summary_counts_parse() {
    assert_eq!(count("INFO: 7 processes: 6 remote cache hit, 1 internal.", "remote cache hit"), 6);
    assert_eq!(count("INFO: 7 processes: 1 internal, 6 local.", "local"), 6);
    assert_eq!(count("INFO: 7 processes: 1 internal, 6 local.", "remote cache hit"), 0);
}
