//! Operating the server: metrics and path deletion, on local storage and on S3 (`s3s-fs`).

#[macro_use]
mod common;

use common::{hash_part, Backend, Nix, Server};
use flywheel_core::api::v1::chunk_bodies::encode_upload_records;
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

backend_matrix! {
    metrics_follow_traffic => metrics_follow_traffic_local, metrics_follow_traffic_s3;
}

/// The chunk API keeps the frames it sent in memory (`hot-chunk-bytes`): a later read of the
/// chunk is answered without storage, in order among chunks that come from storage, and only
/// while the path the reader names is the reader's and lists it.
fn hot_chunks_answer_reads_of_listed_chunks(backend: Backend) {
    use flywheel_core::api::v1::chunk_bodies::split_framed_chunks;
    use flywheel_core::chunk::decompress_verified;
    use flywheel_core::manifest::ChunkRef;

    let nix = Nix::new();
    let server = Server::start(backend);
    server.create_cache("ci", false);
    server.create_cache("other", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("hot"), &["big", "single"]);
    let admin = server.admin_token();
    for cache in ["ci", "other"] {
        let cache_paths: &[String] = if cache == "ci" { &paths } else { &paths[1..] };
        let out = nix.copy_to(&src, &format!("{}/{cache}", server.url), &server.netrc(&admin), cache_paths);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let client = Client::new();
    let api = |cache: &str, route: &str| format!("{}/_flywheel/v1/{cache}/{route}", server.url);
    let manifest: serde_json::Value =
        client.get(api("ci", &format!("manifest/{}", hash_part(&paths[0])))).bearer_auth(&admin).send().unwrap().json().unwrap();
    let chunks: Vec<ChunkRef> = serde_json::from_value(manifest["manifest"]["chunks"].clone()).unwrap();
    assert!(chunks.len() >= 3, "the big path has {} chunks", chunks.len());
    let hot_sent = || common::metric_value(&common::fetch_metrics(&format!("{}/metrics", server.url)), "flywheel_hot_chunks_sent_total");
    let get_one = |chunk: &ChunkRef| {
        client.get(api("ci", &format!("chunk/{}?path={}", chunk.hash, hash_part(&paths[0])))).bearer_auth(&admin).send().unwrap()
    };
    let check = |frame: &[u8], chunk: &ChunkRef| {
        decompress_verified(frame, &chunk.hash, chunk.size as usize).unwrap_or_else(|e| panic!("chunk {}: {e}", chunk.hash));
    };

    let resp = get_one(&chunks[1]);
    assert_eq!(resp.status(), StatusCode::OK);
    let first = resp.bytes().unwrap();
    check(&first, &chunks[1]);
    assert_eq!(hot_sent(), 0.0);
    // Storage loses the chunk's object: the frame sent a moment ago is still sent, verified
    // once already, so the answer comes from memory.
    let key = format!("chunks/{}/{}", &chunks[1].hash.to_string()[..2], chunks[1].hash);
    server.rewrite_object(&key, |_| b"gone".to_vec());
    let resp = get_one(&chunks[1]);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().unwrap(), first);
    assert_eq!(hot_sent(), 1.0);

    // A batch with the kept chunk between two stored ones comes out in request order.
    let batch = [chunks[0], chunks[1], chunks[2]];
    let body = serde_json::json!({"path": hash_part(&paths[0]), "chunks": batch});
    let resp = client.post(api("ci", "chunks")).bearer_auth(&admin).json(&body).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().unwrap();
    let frames = split_framed_chunks(&body, &batch).expect("three framed chunks");
    for (frame, chunk) in frames.iter().zip(&batch) {
        check(frame, chunk);
    }
    assert_eq!(hot_sent(), 2.0);

    // Memory answers no one storage would not: another cache's reader, a path that does not
    // list the chunk, a chunk under another size.
    let pull_other = server.mint(&["--pull", "other"]);
    for path in [hash_part(&paths[0]), hash_part(&paths[1])] {
        let url = api("other", &format!("chunk/{}?path={path}", chunks[1].hash));
        assert_eq!(client.get(url).bearer_auth(&pull_other).send().unwrap().status(), StatusCode::NOT_FOUND, "other cache, path {path}");
    }
    let url = api("ci", &format!("chunk/{}?path={}", chunks[1].hash, hash_part(&paths[1])));
    assert_eq!(client.get(url).bearer_auth(&admin).send().unwrap().status(), StatusCode::NOT_FOUND);
    let resized = ChunkRef { hash: chunks[1].hash, size: chunks[1].size + 1 };
    let body = serde_json::json!({"path": hash_part(&paths[0]), "chunks": [resized]});
    assert_eq!(client.post(api("ci", "chunks")).bearer_auth(&admin).json(&body).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(hot_sent(), 2.0);

    // Once the path is deleted, its kept chunks go with it (this replica sees its delete at once).
    let narinfo = format!("{}/ci/{}.narinfo", server.url, hash_part(&paths[0]));
    assert_eq!(client.delete(narinfo).bearer_auth(&admin).send().unwrap().status(), StatusCode::OK);
    assert_eq!(get_one(&chunks[1]).status(), StatusCode::NOT_FOUND);
    assert_eq!(hot_sent(), 2.0);
}

backend_matrix! {
    hot_chunks_answer_reads_of_listed_chunks => hot_chunks_answer_reads_of_listed_chunks_local, hot_chunks_answer_reads_of_listed_chunks_s3;
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

backend_matrix! {
    delete_path => delete_path_local, delete_path_s3;
}

/// Corpus derivations built in a store of their own and pushed to the cache `ci`.
struct Pushed {
    src: String,
    url: String,
    push: std::path::PathBuf,
    paths: Vec<String>,
}

/// Builds the corpus derivations `names` with a fresh seed and pushes them with `nix copy`.
fn build_and_push(nix: &Nix, server: &Server, seed: &str, names: &[&str]) -> Pushed {
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed(seed), names);
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let url = format!("{}/ci", server.url);
    let out = nix.copy_to(&src, &url, &push, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Pushed { src, url, push, paths }
}

fn damaged_chunks(backend: Backend) {
    let nix = Nix::new();
    let server = Server::start(backend);
    let key = server.create_cache("ci", false);
    let Pushed { src, url, push, paths } = build_and_push(&nix, &server, "fsck", &["big", "single"]);
    let client = Client::new();
    let admin = server.admin_token();
    let big = hash_part(&paths[0]);
    let manifest: serde_json::Value = client
        .get(format!("{}/_flywheel/v1/ci/manifest/{big}", server.url))
        .bearer_auth(&admin)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let chunks: Vec<String> =
        manifest["manifest"]["chunks"].as_array().unwrap().iter().map(|c| c["hash"].as_str().unwrap().to_string()).collect();
    assert!(chunks.len() > 10, "the big path has {} chunks", chunks.len());
    // Asked for zstd, the manifest comes compressed, and is the same JSON.
    let manifest_url = format!("{}/_flywheel/v1/ci/manifest/{big}", server.url);
    let plain = client.get(&manifest_url).bearer_auth(&admin).send().unwrap().bytes().unwrap();
    let compressed = client.get(&manifest_url).bearer_auth(&admin).header("Accept-Encoding", "gzip, zstd").send().unwrap();
    assert_eq!(compressed.headers()["content-encoding"], "zstd");
    let compressed = compressed.bytes().unwrap();
    assert!(compressed.len() < plain.len(), "{} compressed bytes for {} of JSON", compressed.len(), plain.len());
    assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), plain);
    // Asked again: the manifest's frame kept from the first answer makes the same body.
    let again = client.get(&manifest_url).bearer_auth(&admin).header("Accept-Encoding", "zstd").send().unwrap().bytes().unwrap();
    assert_eq!(again, compressed);
    let object = |hash: &str| server.objects.join("chunks").join(&hash[..2]).join(hash);
    let (lost, rotten) = (&chunks[chunks.len() / 2], &chunks[chunks.len() - 2]);
    std::fs::remove_file(object(lost)).unwrap();
    let garbage = zstd_frame_of(b"these are not the bytes you are looking for");
    std::fs::write(object(rotten), garbage).unwrap();

    // A missing or corrupt chunk anywhere in the NAR is a 5xx before any NAR byte.
    for suffix in [".nar.zst", ".nar"] {
        let resp = client.get(format!("{url}/nar/{big}{suffix}")).bearer_auth(&admin).send().unwrap();
        let status = resp.status();
        let body = resp.text().unwrap();
        assert!(status.is_server_error(), "{suffix}: got {status}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{suffix}: body is not an error: {} bytes", body.len()));
        assert_eq!(error["code"], status.as_u16());
    }

    let fsck = |extra: &[&str]| {
        let out = std::process::Command::new(common::FLYWHEEL).args(["fsck", "--config"]).arg(&server.config).args(extra).output().unwrap();
        assert!(out.status.success(), "fsck failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let narinfo = |hash: &str| client.get(format!("{url}/{hash}.narinfo")).bearer_auth(&admin).send().unwrap().status();
    let report = fsck(&["--dry-run"]);
    assert!(report.contains(&format!("missing chunk {lost}")), "{report}");
    assert!(report.contains(&format!("corrupt chunk {rotten}")), "{report}");
    assert!(report.contains(&paths[0]), "{report}");
    assert!(!report.contains(&paths[1]), "{report}");
    assert_eq!(narinfo(big), StatusCode::OK, "a dry run changed nothing");

    let report = fsck(&[]);
    assert!(report.contains("taken out of service"), "{report}");
    // fsck is another writer on the same storage: the server sees its take-down once the
    // narinfo answer it holds has aged out (the bound the README states for other replicas).
    eventually(|| narinfo(big), StatusCode::NOT_FOUND, "the damaged path");
    assert_eq!(narinfo(hash_part(&paths[1])), StatusCode::OK);
    assert!(!object(rotten).exists(), "the corrupt chunk is still stored");
    let clean = fsck(&["--dry-run"]);
    assert!(!clean.contains("missing chunk") && !clean.contains("corrupt chunk"), "{clean}");

    // An ordinary re-push repairs the path.
    let out = nix.copy_to(&src, &url, &push, &paths[..1]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let dst = nix.store("dst");
    let out = nix.copy_from(&dst, &url, &pull, &key, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(nix.verify(&dst, &paths[0]));
}

/// Waits until `status` answers `wanted`: a change made by another writer (a replica, an
/// offline command) reaches a server's narinfo answers only once its held answer has aged out.
fn eventually(status: impl Fn() -> StatusCode, wanted: StatusCode, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while status() != wanted {
        assert!(std::time::Instant::now() < deadline, "{what} never answered {wanted}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn zstd_frame_of(data: &[u8]) -> Vec<u8> {
    flywheel_core::chunk::compress(data, 3).unwrap()
}

backend_matrix! {
    damaged_chunks => damaged_chunks_local, damaged_chunks_s3;
}


/// Stored bytes of the chunks a published path lists, read through the chunk API.
fn chunk_files(server: &Server, token: &str, cache: &str, path: &str) -> std::collections::BTreeSet<String> {
    let manifest: serde_json::Value = Client::new()
        .get(format!("{}/_flywheel/v1/{cache}/manifest/{}", server.url, hash_part(path)))
        .bearer_auth(token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    manifest["manifest"]["chunks"].as_array().unwrap().iter().map(|c| c["hash"].as_str().unwrap().to_string()).collect()
}

/// The names of the stored chunk objects, read through the harness so that it also works on
/// an external S3 server (`scripts/rustfs.sh`), where no bucket directory exists.
fn stored_chunks(server: &Server) -> std::collections::BTreeSet<String> {
    server.object_sizes("chunks").keys().map(|key| key.rsplit('/').next().unwrap().to_string()).collect()
}

fn retention_and_gc(backend: Backend) {
    let nix = Nix::new();
    // No grace: this test wants unreferenced data gone at once. Access records on every read.
    let server = Server::start_with(backend, "[gc]\ninterval = 0\ngrace-period = 0\naccess-record-interval = 0\n");
    let key = server.create_cache("ci", false);
    let Pushed { url, paths, .. } = build_and_push(&nix, &server, "gc", &["big", "bigNext", "single"]);
    let client = Client::new();
    let admin = server.admin_token();
    let chunks: Vec<_> = paths.iter().map(|p| chunk_files(&server, &admin, "ci", p)).collect();
    // An orphan chunk, uploaded but never committed.
    let orphan = flywheel_core::chunk::ChunkHash::of(b"an orphan chunk");
    let frame = flywheel_core::chunk::compress(b"an orphan chunk", 3).unwrap();
    let resp = client.put(format!("{}/_flywheel/v1/ci/chunk/{orphan}", server.url)).bearer_auth(&admin).body(frame).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Nothing referenced goes; the orphan does.
    let report = server.gc(&["--dry-run"]);
    assert!(report.contains("would free 0 paths, 0 manifests, 1 chunks"), "{report}");
    assert!(stored_chunks(&server).contains(&orphan.to_string()), "a dry run deleted");
    server.gc(&[]);
    let all: std::collections::BTreeSet<String> = chunks.iter().flatten().cloned().collect();
    assert_eq!(stored_chunks(&server), all);

    // Retention of 2 s, then 3 s pass without reads (the stored publication and access times
    // move back, rather than the test waiting; the conformance suite moves the server's clock
    // instead); `big` and `single` are read now, `bigNext` is not.
    let resp = client
        .patch(format!("{}/_api/v1/cache-config/ci", server.url))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"retention_period": {"Period": 2}}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    for path in &paths {
        server.age_path("ci", hash_part(path), std::time::Duration::from_secs(3));
    }
    for path in [&paths[0], &paths[2]] {
        let resp = client.get(format!("{url}/{}.narinfo", hash_part(path))).bearer_auth(&admin).send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let report = server.gc(&[]);
    assert!(report.contains(&format!("expired: ci {}", paths[1].trim_start_matches("/nix/store/"))), "{report}");
    assert_eq!(client.get(format!("{url}/{}.narinfo", hash_part(&paths[1]))).bearer_auth(&admin).send().unwrap().status(), StatusCode::NOT_FOUND);
    // Exactly the chunks only `bigNext` used are gone.
    let kept: std::collections::BTreeSet<String> = chunks[0].union(&chunks[2]).cloned().collect();
    assert_eq!(stored_chunks(&server), kept);
    assert!(chunks[1].difference(&kept).count() >= 1);

    // What stays still substitutes.
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let out = nix.copy_from(&nix.store("dst"), &url, &pull, &key, &[paths[0].clone(), paths[2].clone()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

backend_matrix! {
    retention_and_gc => retention_and_gc_local, retention_and_gc_s3;
}

fn push_during_gc(backend: Backend) {
    let nix = Nix::new();
    // The default grace period: chunks of an upload in flight are young.
    let server = Server::start_with(backend, "[gc]\ninterval = 0\n");
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("gcpush"), &["big", "withRefs"]);
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let url = format!("{}/ci", server.url);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        let config = server.config.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || runs == 0 {
                let status = std::process::Command::new(common::FLYWHEEL).args(["gc", "--config"]).arg(&config).output().unwrap();
                assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
                runs += 1;
            }
            runs
        })
    };
    let out = nix.copy_to(&src, &url, &push, &paths);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = collector.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(runs >= 1);
    server.gc(&[]);
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let dst = nix.store("dst");
    let out = nix.copy_from(&dst, &url, &pull, &key, &paths);
    assert!(out.status.success(), "after {runs} collections during the push: {}", String::from_utf8_lossy(&out.stderr));
    for path in &paths {
        assert!(nix.verify(&dst, path));
    }
}

backend_matrix! {
    push_during_gc => push_during_gc_local, push_during_gc_s3;
}

#[test]
fn two_replicas_over_one_bucket() {
    let nix = Nix::new();
    let a = Server::start_with(Backend::S3, "[gc]\ninterval = 0\n");
    let b = a.replica();
    let key = a.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("replicas"), &["big", "bigNext", "withRefs"]);
    let token = a.mint(&["--push", "ci", "--pull", "ci"]);
    let (netrc_a, netrc_b) = (a.netrc(&token), b.netrc(&token));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // GC on one replica, again and again, while both take overlapping pushes.
    let collector = {
        let stop = stop.clone();
        let config = a.config.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(common::FLYWHEEL).args(["gc", "--config"]).arg(&config).output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
        })
    };
    let (url_a, url_b) = (format!("{}/ci", a.url), format!("{}/ci", b.url));
    // `flywheel push` on both sides: Nix 2.8's `nix copy` fails with "coroutine has finished"
    // when a path it is about to upload becomes valid meanwhile, which overlapping pushes cause.
    let token_file = a.dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let push = |server: &Server, paths: Vec<String>| {
        let mut cmd = nix.cmd(common::FLYWHEEL);
        cmd.args(["push", "--server", &server.url, "--cache", "ci", "--token-file"])
            .arg(&token_file)
            .args(["--store", &format!("local?root={src}")])
            .args(paths);
        cmd.output().unwrap()
    };
    std::thread::scope(|scope| {
        let first = scope.spawn(|| push(&a, vec![paths[0].clone(), paths[2].clone()]));
        let second = scope.spawn(|| push(&b, vec![paths[1].clone(), paths[2].clone()]));
        for out in [first.join().unwrap(), second.join().unwrap()] {
            assert!(
                out.status.success(),
                "{}\nreplica a: {}\nreplica b: {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(a.log_path()).unwrap_or_default(),
                std::fs::read_to_string(b.log_path()).unwrap_or_default()
            );
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    collector.join().unwrap();
    // Every committed path substitutes through either replica.
    for (name, url, netrc) in [("a", &url_a, &netrc_a), ("b", &url_b, &netrc_b)] {
        let dst = nix.store(&format!("dst-{name}"));
        let out = nix.copy_from(&dst, url, netrc, &key, &paths);
        assert!(out.status.success(), "through replica {name}: {}", String::from_utf8_lossy(&out.stderr));
        for path in &paths {
            assert!(nix.verify(&dst, path), "{path} through replica {name}");
        }
    }
}

/// Narinfo answers are kept in memory for a short time (`server/src/narinfo_cache.rs`): a
/// replica sees its own publishes and deletes at once, and another replica's once its kept
/// answer has aged out. The exact bound is checked on a manual clock in that module's tests;
/// here the replicas only have to converge.
#[test]
fn narinfo_answers_follow_publishes_and_deletes() {
    let nix = Nix::new();
    let a = Server::start(Backend::S3);
    let b = a.replica();
    a.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("narinfo-ttl"), &["single", "empty", "tree"]);
    let admin = a.admin_token();
    let push = a.netrc(&a.mint(&["--push", "ci", "--pull", "ci"]));
    let client = Client::new();
    let status = |server: &Server, path: &str| {
        client.get(format!("{}/ci/{}.narinfo", server.url, hash_part(path))).bearer_auth(&admin).send().unwrap().status()
    };
    let copy = |path: &str| {
        let out = nix.copy_to(&src, &format!("{}/ci", a.url), &push, &[path.to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };

    // A 404 answered here ends with a publish here, at once.
    assert_eq!(status(&a, &paths[0]), StatusCode::NOT_FOUND);
    assert_eq!(status(&b, &paths[0]), StatusCode::NOT_FOUND);
    copy(&paths[0]);
    assert_eq!(status(&a, &paths[0]), StatusCode::OK);
    // The other replica held a 404: it sees the path once that has aged out.
    eventually(|| status(&b, &paths[0]), StatusCode::OK, &paths[0]);

    // A delete here is seen here at once, and by the other replica, which held a 200, later;
    // the same for its NAR and its manifest, whose path records are kept the same way.
    let nar_status = |server: &Server, path: &str| {
        client.get(format!("{}/ci/nar/{}.nar.zst", server.url, hash_part(path))).bearer_auth(&admin).send().unwrap().status()
    };
    let manifest_status = |server: &Server, path: &str| {
        let url = format!("{}/_flywheel/v1/ci/manifest/{}", server.url, hash_part(path));
        client.get(url).bearer_auth(&admin).send().unwrap().status()
    };
    copy(&paths[1]);
    assert_eq!(status(&a, &paths[1]), StatusCode::OK);
    assert_eq!(status(&b, &paths[1]), StatusCode::OK);
    for server in [&a, &b] {
        assert_eq!(nar_status(server, &paths[1]), StatusCode::OK);
        assert_eq!(manifest_status(server, &paths[1]), StatusCode::OK);
    }
    let resp = client.delete(format!("{}/ci/{}.narinfo", a.url, hash_part(&paths[1]))).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(status(&a, &paths[1]), StatusCode::NOT_FOUND);
    assert_eq!(nar_status(&a, &paths[1]), StatusCode::NOT_FOUND);
    assert_eq!(manifest_status(&a, &paths[1]), StatusCode::NOT_FOUND);
    eventually(|| status(&b, &paths[1]), StatusCode::NOT_FOUND, &paths[1]);
    eventually(|| nar_status(&b, &paths[1]), StatusCode::NOT_FOUND, &paths[1]);
    eventually(|| manifest_status(&b, &paths[1]), StatusCode::NOT_FOUND, &paths[1]);
    // Deleting it again through the replica that still remembers it reads storage: a 404.
    let resp = client.delete(format!("{}/ci/{}.narinfo", b.url, hash_part(&paths[1]))).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // A path never asked about is seen at once by both.
    copy(&paths[2]);
    assert_eq!(status(&b, &paths[2]), StatusCode::OK);
}

/// A request body that trickles out, so that a kill lands in the middle of an upload.
struct Trickle {
    data: std::io::Cursor<Vec<u8>>,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let n = buf.len().min(32 * 1024);
        self.data.read(&mut buf[..n])
    }
}

#[test]
fn kill_9_during_uploads_never_shows_a_partial_path() {
    use rand::{Rng, SeedableRng};
    use sha2::Digest;
    let nix = Nix::new();
    let mut server = Server::start_with(Backend::Local, "[gc]\ninterval = 0\ngrace-period = 0\n");
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("kill9"), &["big"]);
    let info = upload_info_of(&nix, &src, &paths[0]);
    let nar = nix.dump(&src, &paths[0]);
    let nar_hash = info["nar_hash"].as_str().unwrap().to_string();
    let token = server.admin_token();
    let mut rng = rand::rngs::StdRng::seed_from_u64(common::test_seed("kill timing"));
    let client = Client::builder().timeout(std::time::Duration::from_secs(30)).build().unwrap();
    for round in 0..10 {
        let url = format!("{}/_api/v1/upload-path", server.url);
        let body = reqwest::blocking::Body::new(Trickle { data: std::io::Cursor::new(nar.clone()) });
        let request = client.put(url).bearer_auth(&token).header("X-Attic-Nar-Info", info.to_string()).body(body);
        let upload = std::thread::spawn(move || request.send().map(|r| r.status()));
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(0..900)));
        server.restart(); // SIGKILL, then a new process on the same address
        let _ = upload.join();
        // Never a partial path: missing, or complete and correct.
        let narinfo = client.get(format!("{}/ci/{}.narinfo", server.url, hash_part(&paths[0]))).bearer_auth(&token).send().unwrap();
        match narinfo.status() {
            StatusCode::NOT_FOUND => {}
            StatusCode::OK => {
                let body = client.get(format!("{}/ci/nar/{}.nar", server.url, hash_part(&paths[0]))).bearer_auth(&token).send().unwrap();
                assert_eq!(body.status(), StatusCode::OK, "round {round}");
                let bytes = body.bytes().unwrap();
                let hex: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                assert!(nar_hash.ends_with(&hex) || nix_hash_matches(&nix, &hex, &nar_hash), "round {round}: a published path serves other bytes");
                // Take it out again so the next round uploads anew.
                assert_eq!(client.delete(format!("{}/ci/{}.narinfo", server.url, hash_part(&paths[0]))).bearer_auth(&token).send().unwrap().status(), StatusCode::OK);
            }
            other => panic!("round {round}: narinfo answered {other}"),
        }
    }
    // A re-push succeeds and substitutes; GC then leaves exactly the chunks the path needs.
    let resp = client.put(format!("{}/_api/v1/upload-path", server.url)).bearer_auth(&token).header("X-Attic-Nar-Info", info.to_string()).body(nar).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let out = nix.copy_from(&nix.store("dst"), &format!("{}/ci", server.url), &pull, &key, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    server.gc(&[]);
    assert_eq!(stored_chunks(&server), chunk_files(&server, &token, "ci", &paths[0]));
}

/// Whether `hex` (base16 SHA-256) is the digest Nix writes as `nix_hash` (any encoding).
fn nix_hash_matches(nix: &Nix, hex: &str, nix_hash: &str) -> bool {
    let out = nix.run(nix.cmd("nix").args(["hash", "to-base32", "--type", "sha256", hex]));
    nix_hash.trim_start_matches("sha256:") == out.trim()
}

fn upload_info_of(nix: &Nix, store: &str, path: &str) -> serde_json::Value {
    let info = nix.path_info(store, path);
    serde_json::json!({
        "cache": "ci", "store_path_hash": hash_part(path), "store_path": path,
        "references": info.references.iter().map(|r| r.trim_start_matches("/nix/store/")).collect::<Vec<_>>(),
        "system": null, "deriver": info.deriver.as_deref().map(|d| d.trim_start_matches("/nix/store/")),
        "sigs": [], "ca": null, "nar_hash": info.nar_hash, "nar_size": info.nar_size,
    })
}

/// 64 clients fetching narinfos and 8 downloading NARs for 30 s (at most 100,000 requests
/// each) from a server on S3: not one error, and every client got answers. The latency
/// percentiles go to BENCHMARKS.md through the benchmark, which runs the same load.
#[test]
fn load_run_has_no_errors() {
    let nix = Nix::new();
    let server = Server::start(Backend::S3);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("load"), &["big", "single", "tree", "empty", "withRefs"]);
    let token = server.mint(&["--push", "ci", "--pull", "ci"]);
    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &server.netrc(&token), &paths);
    assert!(out.status.success(), "nix copy --to failed: {}", String::from_utf8_lossy(&out.stderr));
    let hashes: Vec<&str> = paths.iter().map(|p| hash_part(p)).collect();
    let targets = common::load::targets(&format!("{}/ci", server.url), Some(&token), &hashes);
    let result = common::load::run(&targets, Some(&token), 64, 8, std::time::Duration::from_secs(30), 100_000);
    assert!(result.errors.is_empty(), "{} errors, first: {:?}", result.errors.len(), &result.errors[..result.errors.len().min(5)]);
    assert!(result.narinfo.len() >= 64 && result.nar.len() >= 8, "{} narinfos, {} NARs", result.narinfo.len(), result.nar.len());
    eprintln!(
        "narinfo: {} requests, p50 {:.2} ms, p99 {:.2} ms; NAR: {} downloads, p50 {:.1} ms, p99 {:.1} ms",
        result.narinfo.len(),
        common::load::LoadResult::percentile_ms(&result.narinfo, 50.0),
        common::load::LoadResult::percentile_ms(&result.narinfo, 99.0),
        result.nar.len(),
        common::load::LoadResult::percentile_ms(&result.nar, 50.0),
        common::load::LoadResult::percentile_ms(&result.nar, 99.0),
    );
    // The server is still whole afterwards: every path substitutes.
    let out = nix.copy_from(&nix.store("dst"), &format!("{}/ci", server.url), &server.netrc(&token), &key, &paths);
    assert!(out.status.success(), "nix copy --from after the load failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// An upload never counts on an unreferenced chunk older than half the grace period (GC may be
/// about to sweep it): the missing-chunks answer lists it, and an upload writes it again, which
/// makes it young. Then the path substitutes.
///
/// Chunks grow old by having their files' modification times moved back past half the grace
/// period, rather than by waiting (`conformance::reuse_window_makes_old_chunks_written_again`
/// moves the clock instead, on every backend).
#[test]
fn old_unreferenced_chunks_are_written_again_not_trusted() {
    let nix = Nix::new();
    // Grace 1 h: chunks count on for 30 min after they are written.
    let server = Server::start_with(Backend::Local, "[gc]\ninterval = 0\ngrace-period = 3600\n");
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("stale"), &["big"]);
    let admin = server.admin_token();
    let url = format!("{}/ci", server.url);
    let push = server.netrc(&admin);
    let out = nix.copy_to(&src, &url, &push, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chunks: Vec<String> = chunk_files(&server, &admin, "ci", &paths[0]).into_iter().collect();
    let client = Client::new();
    let missing = |chunks: &[String]| -> Vec<String> {
        let answer: serde_json::Value = client
            .post(format!("{}/_flywheel/v1/ci/missing-chunks", server.url))
            .bearer_auth(&admin)
            .json(&serde_json::json!({ "chunks": chunks }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        answer["chunks"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect()
    };
    assert!(missing(&chunks).is_empty(), "fresh chunks count as stored");

    // The path goes; its chunks stay until a collection, and grow older than half the grace.
    let resp = client.delete(format!("{url}/{}.narinfo", hash_part(&paths[0]))).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let chunk_file = |hash: &str| server.objects.join("chunks").join(&hash[..2]).join(hash);
    let mtime = |hash: &str| std::fs::metadata(chunk_file(hash)).map(|m| m.modified().unwrap());
    // Past half the grace period: written 31 minutes ago, as far as storage tells.
    let age_chunks = || -> Vec<std::time::SystemTime> {
        let written = std::time::SystemTime::now() - std::time::Duration::from_secs(31 * 60);
        for chunk in &chunks {
            let file = std::fs::File::options().write(true).open(chunk_file(chunk));
            let file = file.unwrap_or_else(|e| panic!("chunk {chunk} not at its expected place: {e}"));
            file.set_modified(written).unwrap();
        }
        chunks.iter().map(|c| mtime(c).unwrap()).collect()
    };
    let before = age_chunks();
    assert_eq!(missing(&chunks), chunks, "stale chunks must be sent again");

    // A new push of the same path writes them again (now young) and publishes it.
    let out = nix.copy_to(&src, &url, &push, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (chunk, old) in chunks.iter().zip(&before) {
        assert!(mtime(chunk).unwrap() > *old, "chunk {chunk} was trusted, not written again");
    }
    assert!(missing(&chunks).is_empty());

    // The same through the chunk API: a commit that names stale chunks (without uploading them)
    // has the server write them again before it publishes.
    let manifest: serde_json::Value = client
        .get(format!("{}/_flywheel/v1/ci/manifest/{}", server.url, hash_part(&paths[0])))
        .bearer_auth(&admin)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let resp = client.delete(format!("{url}/{}.narinfo", hash_part(&paths[0]))).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let before = age_chunks();
    let commit = serde_json::json!({
        "storePath": manifest["storePath"],
        "narHash": manifest["manifest"]["narHash"],
        "narSize": manifest["manifest"]["narSize"],
        "references": manifest["references"],
        "deriver": manifest["deriver"],
        "sigs": [],
        "ca": manifest["ca"],
        "chunks": manifest["manifest"]["chunks"],
    });
    let resp = client.post(format!("{}/_flywheel/v1/ci/commit", server.url)).bearer_auth(&admin).json(&commit).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    for (chunk, old) in chunks.iter().zip(&before) {
        assert!(mtime(chunk).unwrap() > *old, "chunk {chunk} was trusted by the commit, not written again");
    }
    server.gc(&[]);
    let out = nix.copy_from(&nix.store("dst"), &url, &server.netrc(&admin), &key, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `upload-chunks` stores a batch only when every record checks out, and says what is wrong
/// with a bad one.
#[test]
fn upload_chunks_takes_whole_batches_and_refuses_bad_records() {
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let admin = server.admin_token();
    let client = Client::new();
    let record = |data: &[u8], frame: &[u8]| encode_upload_records(&[(flywheel_core::chunk::ChunkHash::of(data), frame)]);
    let frame = |data: &[u8]| flywheel_core::chunk::compress(data, 3).unwrap();
    let (a, b) = (b"first chunk of the batch".to_vec(), b"second chunk of the batch".to_vec());
    let good = [record(&a, &frame(&a)), record(&b, &frame(&b))].concat();
    let upload = |body: Vec<u8>| {
        client.post(format!("{}/_flywheel/v1/ci/upload-chunks", server.url)).bearer_auth(&admin).body(body).send().unwrap()
    };
    let before = server.storage_snapshot();
    let mut wrong_hash = record(&a, &frame(&b));
    wrong_hash.extend(record(&b, &frame(&b)));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "holds no chunks"),
        ("truncated header", good[..20].to_vec(), "truncated"),
        ("length past the end", good[..good.len() - 3].to_vec(), "more than the body holds"),
        ("wrong hash after a good record", wrong_hash, "does not hash to"),
        ("not zstd", record(&a, b"plain bytes, not a frame"), "not a zstd frame"),
    ];
    for (label, body, needle) in cases {
        let resp = upload(body);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{label}");
        let text = resp.text().unwrap();
        assert!(text.contains(needle), "{label}: {text}");
    }
    assert_eq!(server.storage_snapshot(), before, "a refused batch stored something");
    let resp = client.post(format!("{}/_flywheel/v1/ci/upload-chunks", server.url)).body(good.clone()).send().unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "uploads need a token");

    assert_eq!(upload(good).status(), StatusCode::OK);
    // Chunks are read only as parts of a path, and these belong to none yet: look in storage.
    for data in [&a, &b] {
        let hash = flywheel_core::chunk::ChunkHash::of(data);
        let hex = hash.to_string();
        let frame = std::fs::read(server.objects.join("chunks").join(&hex[..2]).join(&hex)).unwrap();
        let stored = flywheel_core::chunk::decompress_verified(&frame, &hash, data.len()).unwrap();
        assert_eq!(&stored, data);
    }
}

/// A commit may name its chunks by the `missing-chunks` question that preceded it; a question
/// the server does not know (or of another cache), or a malformed reference to one, is refused
/// with a clear message, and the full list always works.
#[test]
fn commit_by_chunk_query() {
    use flywheel_core::chunk::{ChunkHash, ChunkParams, Chunker};
    let nix = Nix::new();
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    server.create_cache("other", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("query"), &["single"]);
    let info = nix.path_info(&src, &paths[0]);
    let nar = nix.dump(&src, &paths[0]);
    let pieces = Chunker::chunk_all(ChunkParams::default(), &nar);
    let hashes: Vec<String> = pieces.iter().map(|c| ChunkHash::of(c).to_string()).collect();
    let admin = server.admin_token();
    let client = Client::new();
    let api = |cache: &str, route: &str| format!("{}/_flywheel/v1/{cache}/{route}", server.url);
    let ask = |cache: &str| -> serde_json::Value {
        client.post(api(cache, "missing-chunks")).bearer_auth(&admin).json(&serde_json::json!({"chunks": hashes})).send().unwrap().json().unwrap()
    };
    let answer = ask("ci");
    let query = answer["query"].as_str().expect("missing-chunks names its question").to_string();
    let body = common::upload_body(pieces.iter().map(Vec::as_slice));
    assert_eq!(client.post(api("ci", "upload-chunks")).bearer_auth(&admin).body(body).send().unwrap().status(), StatusCode::OK);
    let sizes: Vec<usize> = pieces.iter().map(|c| c.len()).collect();
    let commit = |cache: &str, extra: serde_json::Value| {
        let mut request = serde_json::json!({
            "storePath": paths[0], "narHash": info.nar_hash, "narSize": info.nar_size, "references": info.references,
        });
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        client.post(api(cache, "commit")).bearer_auth(&admin).json(&request).send().unwrap()
    };
    let refused: Vec<(&str, reqwest::blocking::Response, &str)> = vec![
        ("unknown query", commit("ci", serde_json::json!({"chunksQuery": "0123", "chunkSizes": sizes})), "unknown chunk query"),
        ("another cache's query", commit("other", serde_json::json!({"chunksQuery": query, "chunkSizes": sizes})), "unknown chunk query"),
        ("sizes do not match", commit("ci", serde_json::json!({"chunksQuery": query, "chunkSizes": [1, 2, 3, 4, 5, 6, 7, 8, 9]})), "chunkSizes"),
        ("order past the list", commit("ci", serde_json::json!({"chunksQuery": query, "chunkOrder": [7], "chunkSizes": [1]})), "past the"),
    ];
    for (label, resp, needle) in refused {
        assert!(resp.status().is_client_error(), "{label}: {}", resp.status());
        let text = resp.text().unwrap();
        assert!(text.contains(needle), "{label}: {text}");
    }
    let resp = commit("ci", serde_json::json!({"chunksQuery": query, "chunkSizes": sizes}));
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    let narinfo = client.get(format!("{}/ci/{}.narinfo", server.url, hash_part(&paths[0]))).bearer_auth(&admin).send().unwrap();
    assert_eq!(narinfo.status(), StatusCode::OK);
}

/// A new version may be committed as changes to the last path of its name: `base/{name}`
/// finds that path's chunks, and a `chunksDelta` naming runs of them plus the new chunks
/// publishes the new version. Runs outside the base, an unknown base, a mixed request and a
/// delta that makes another NAR are refused with a clear message, and publish nothing.
#[test]
fn commit_as_changes_to_a_base() {
    use flywheel_core::api::v1::chunks::{BaseChunks, ChunkDelta};
    use flywheel_core::chunk::{ChunkHash, ChunkParams, Chunker};
    use flywheel_core::manifest::ChunkRef;
    let nix = Nix::new();
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("delta"), &["big", "bigNext"]);
    let admin = server.admin_token();
    let push = server.netrc(&admin);
    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &push, &paths[..1]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client = Client::new();
    let api = |route: &str| format!("{}/_flywheel/v1/ci/{route}", server.url);
    let name_of = |path: &str| path.rsplit('/').next().unwrap()[33..].to_string();

    // The base of the next version is the first one; unknown and malformed names are refused.
    let resp = client.get(api(&format!("base/{}", name_of(&paths[1])))).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let base: BaseChunks = resp.json().unwrap();
    assert_eq!(base.store_path, paths[0]);
    for (name, status) in [("never-pushed-1.0", StatusCode::NOT_FOUND), ("bad%20name", StatusCode::BAD_REQUEST)] {
        let resp = client.get(api(&format!("base/{name}"))).bearer_auth(&admin).send().unwrap();
        assert_eq!(resp.status(), status, "{name}: {}", resp.text().unwrap());
    }

    // Upload the chunks of the new version that the base lacks.
    let info = nix.path_info(&src, &paths[1]);
    let nar = nix.dump(&src, &paths[1]);
    let pieces = Chunker::chunk_all(ChunkParams::default(), &nar);
    let chunks: Vec<ChunkRef> = pieces.iter().map(|p| ChunkRef { hash: ChunkHash::of(p), size: p.len() as u32 }).collect();
    let new_pieces = pieces.iter().filter(|p| !base.chunks.iter().any(|c| c.hash == ChunkHash::of(p)));
    let body = common::upload_body(new_pieces.map(Vec::as_slice));
    assert!(!body.is_empty() && body.len() < nar.len() / 4, "{} bytes of new chunks", body.len());
    assert_eq!(client.post(api("upload-chunks")).bearer_auth(&admin).body(body).send().unwrap().status(), StatusCode::OK);

    let delta = ChunkDelta::between(hash_part(&paths[0]).to_string(), &base.chunks, &chunks);
    assert!(delta.runs.len() < chunks.len() / 4, "{} runs for {} chunks", delta.runs.len(), chunks.len());
    let commit = |extra: serde_json::Value| {
        let mut request = serde_json::json!({
            "storePath": paths[1], "narHash": info.nar_hash, "narSize": info.nar_size, "references": info.references,
        });
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        client.post(api("commit")).bearer_auth(&admin).json(&request).send().unwrap()
    };
    let delta_json = serde_json::to_value(&delta).unwrap();
    let past_end = serde_json::json!({"base": delta.base, "runs": [{"copy": [0, base.chunks.len() + 1]}]});
    let unknown_base = serde_json::json!({"base": hash_part(&paths[1]), "runs": delta_json["runs"]});
    let mut short = delta.clone();
    short.runs.pop();
    let one_chunk = serde_json::json!([{"hash": chunks[0].hash.to_string(), "size": chunks[0].size}]);
    let refused = [
        ("a run past the base", commit(serde_json::json!({"chunksDelta": past_end})), "of a base of"),
        ("an unknown base", commit(serde_json::json!({"chunksDelta": unknown_base})), "is not published"),
        ("delta and chunks", commit(serde_json::json!({"chunksDelta": delta_json, "chunks": one_chunk})), "give one of"),
        ("another NAR", commit(serde_json::json!({"chunksDelta": serde_json::to_value(&short).unwrap()})), "add up to"),
    ];
    for (label, resp, needle) in refused {
        assert!(resp.status().is_client_error(), "{label}: {}", resp.status());
        let text = resp.text().unwrap();
        assert!(text.contains(needle), "{label}: {text}");
    }
    let narinfo = |path: &str| client.get(format!("{}/ci/{}.narinfo", server.url, hash_part(path))).bearer_auth(&admin).send().unwrap();
    assert_eq!(narinfo(&paths[1]).status(), StatusCode::NOT_FOUND, "a refused commit published the path");

    let resp = commit(serde_json::json!({"chunksDelta": delta_json}));
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    assert_eq!(narinfo(&paths[1]).status(), StatusCode::OK);
    // The path is made of the new version's chunks, in order.
    let manifest: serde_json::Value = client.get(api(&format!("manifest/{}", hash_part(&paths[1])))).bearer_auth(&admin).send().unwrap().json().unwrap();
    let listed: Vec<String> = manifest["manifest"]["chunks"].as_array().unwrap().iter().map(|c| c["hash"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, chunks.iter().map(|c| c.hash.to_string()).collect::<Vec<_>>());
    // Now the newest of the name is the new version.
    let base: BaseChunks = client.get(api(&format!("base/{}", name_of(&paths[0])))).bearer_auth(&admin).send().unwrap().json().unwrap();
    assert_eq!(base.store_path, paths[1]);
}
