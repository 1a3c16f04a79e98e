//! Operating the server: metrics and path deletion, on local storage and on S3 (`s3s-fs`).

mod common;

use common::{hash_part, Backend, Nix, Server};
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// Parses Prometheus text: every sample line is `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample {line:?}"));
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "unterminated labels in {line:?}");
            }
            (series.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}")))
        })
        .collect()
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v).unwrap_or(0.0)
}

fn metrics_follow_traffic(backend: Backend) {
    let nix = Nix::new();
    let server = Server::start(backend);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("metrics"), &["big"]);
    let client = Client::new();
    let before = parse_metrics(&client.get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap());

    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &push, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let out = nix.copy_from(&nix.store("dst"), &format!("{}/ci", server.url), &pull, &key, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(client.get(format!("{}/ci/{}.narinfo", server.url, hash_part(&paths[0]))).send().unwrap().status(), StatusCode::UNAUTHORIZED);

    let resp = client.get(format!("{}/metrics", server.url)).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let after = parse_metrics(&resp.text().unwrap());
    let nar_size = nix.path_info(&src, &paths[0]).nar_size as f64;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta("flywheel_nar_bytes_received_total"), nar_size);
    assert!(delta("flywheel_chunks_stored_total") >= 1.0);
    assert!(delta("flywheel_stored_bytes_total") > 0.0);
    // The NAR went out once, as zstd frames: at least its compressed size, at most a little over its size.
    let sent = delta("flywheel_bytes_sent_total");
    assert!(sent > nar_size * 0.5 && sent < nar_size * 1.1, "sent {sent} of a {nar_size}-byte NAR");
    let fetched = delta("flywheel_chunks_fetched_total");
    assert!(fetched >= 1.0);
    assert_eq!(delta("flywheel_chunk_fetch_seconds_count"), fetched);
    assert!(delta("flywheel_http_requests_total{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\"}") >= 1.0);
    assert!(delta("flywheel_http_requests_total{route=\"/{cache}/{file}\",method=\"GET\",status=\"401\"}") >= 1.0);
    assert!(delta("flywheel_http_requests_total{route=\"/{cache}/nar/{file}\",method=\"PUT\",status=\"200\"}") >= 1.0);
}

#[test]
fn metrics_follow_traffic_local() {
    metrics_follow_traffic(Backend::Local);
}

#[test]
fn metrics_follow_traffic_s3() {
    metrics_follow_traffic(Backend::S3);
}

fn delete_path(backend: Backend) {
    let nix = Nix::new();
    let server = Server::start(backend);
    server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("delete"), &["single", "tree"]);
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &push, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client = Client::new();
    let narinfo = |p: &str| format!("{}/ci/{}.narinfo", server.url, hash_part(p));
    let admin = server.admin_token();

    // Pushing does not allow deleting.
    let pusher = server.mint(&["--push", "ci", "--pull", "ci"]);
    assert_eq!(client.delete(narinfo(&paths[0])).bearer_auth(&pusher).send().unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(client.delete(narinfo(&paths[0])).send().unwrap().status(), StatusCode::UNAUTHORIZED);

    assert_eq!(client.delete(narinfo(&paths[0])).bearer_auth(&admin).send().unwrap().status(), StatusCode::OK);
    assert_eq!(client.get(narinfo(&paths[0])).bearer_auth(&admin).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(client.delete(narinfo(&paths[0])).bearer_auth(&admin).send().unwrap().status(), StatusCode::NOT_FOUND);
    // The other path is untouched, and the deleted one is listed as missing again.
    assert_eq!(client.get(narinfo(&paths[1])).bearer_auth(&admin).send().unwrap().status(), StatusCode::OK);
    let missing: serde_json::Value = client
        .post(format!("{}/_api/v1/get-missing-paths", server.url))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"cache": "ci", "store_path_hashes": [hash_part(&paths[0]), hash_part(&paths[1])]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(missing["missing_paths"], serde_json::json!([hash_part(&paths[0])]));
}

#[test]
fn delete_path_local() {
    delete_path(Backend::Local);
}

#[test]
fn delete_path_s3() {
    delete_path(Backend::S3);
}
