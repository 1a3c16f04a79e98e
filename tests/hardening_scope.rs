//! Chunks are stored once for all caches, but each cache answers only for its own: a chunk is
//! read only as part of one of the cache's paths, and an upload counts only on chunks the cache
//! holds. Tokens are checked before any body byte is read. On local storage and on S3.

#[macro_use]
mod common;


use common::{hash_part, Backend, Nix, Server};
use flywheel_core::chunk::{ChunkHash, ChunkParams, Chunker};
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The error code and message of a refusal, for comparing two refusals.
fn refusal(resp: Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: Value = resp.json().unwrap_or(Value::Null);
    (status, body["error"].as_str().unwrap_or_default().to_string())
}

/// The chunk list of a path, as its manifest names it.
fn manifest_chunks(client: &Client, server: &Server, cache: &str, path: &str, token: &str) -> Vec<Value> {
    let url = format!("{}/_flywheel/v1/{cache}/manifest/{}", server.url, hash_part(path));
    let manifest: Value = client.get(url).bearer_auth(token).send().unwrap().json().unwrap();
    manifest["manifest"]["chunks"].as_array().expect("a manifest lists chunks").clone()
}

fn cross_cache_reads_and_publishes_are_refused(backend: Backend) {
    let nix = Nix::new();
    let server = Server::start(backend);
    let key_b = server.create_cache("b", false);
    server.create_cache("a", false);
    server.create_cache("open", true);
    let src = nix.store("src");
    let seed = common::unique_seed("scope");
    let paths = nix.build(&src, &seed, &["big", "single"]);
    let (secret, own) = (&paths[0], &paths[1]);
    let admin = server.admin_token();
    let client = Client::new();
    let api = |cache: &str, route: &str| format!("{}/_flywheel/v1/{cache}/{route}", server.url);

    // Cache b holds the secret path; caches a and open hold only a path of their own.
    let out = nix.copy_to(&src, &format!("{}/b", server.url), &server.netrc(&admin), std::slice::from_ref(secret));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for cache in ["a", "open"] {
        let out = nix.copy_to(&src, &format!("{}/{cache}", server.url), &server.netrc(&admin), std::slice::from_ref(own));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let secret_chunks = manifest_chunks(&client, &server, "b", secret, &admin);
    assert!(secret_chunks.len() > 10, "the big path has {} chunks", secret_chunks.len());
    let first = secret_chunks[0]["hash"].as_str().unwrap().to_string();
    let unknown = ChunkHash::of(format!("never stored {seed}").as_bytes()).to_string();

    // Pull on b reads b's chunks as parts of b's path (the control). The server now keeps them
    // in memory (`hot-chunk-bytes`): the refusals below hold for kept chunks too.
    let pull_b = server.mint(&["--pull", "b"]);
    let resp = client.get(api("b", &format!("chunk/{first}?path={}", hash_part(secret)))).bearer_auth(&pull_b).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let batch = json!({"path": hash_part(secret), "chunks": secret_chunks[..3]});
    let resp = client.post(api("b", "chunks")).bearer_auth(&pull_b).json(&batch).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().unwrap().len() > 3 * 8);

    // A pull token of a, and anyone on the public cache, learn nothing of b's chunks through
    // any read route: the answer for a chunk b stores is the answer for a chunk nobody stores.
    let pull_a = server.mint(&["--pull", "a"]);
    for (cache, token) in [("a", Some(pull_a.as_str())), ("open", None)] {
        let send = |req: reqwest::blocking::RequestBuilder| match token {
            Some(t) => req.bearer_auth(t).send().unwrap(),
            None => req.send().unwrap(),
        };
        for chunk in [&first, &unknown] {
            for path in [hash_part(secret), hash_part(own)] {
                let got = refusal(send(client.get(api(cache, &format!("chunk/{chunk}?path={path}")))));
                assert_eq!(got, (StatusCode::NOT_FOUND, "NotFound".into()), "{cache}: GET chunk {chunk} of {path}");
                let size = if *chunk == first { secret_chunks[0]["size"].clone() } else { json!(100) };
                let body = json!({"path": path, "chunks": [{"hash": chunk, "size": size}]});
                let got = refusal(send(client.post(api(cache, "chunks")).json(&body)));
                assert_eq!(got, (StatusCode::NOT_FOUND, "NotFound".into()), "{cache}: POST chunks {chunk} of {path}");
            }
        }
        // A read that names no path is refused outright.
        let got = refusal(send(client.get(api(cache, &format!("chunk/{first}")))));
        assert_eq!(got.0, StatusCode::BAD_REQUEST, "{cache}: GET chunk without a path");
        let got = refusal(send(client.post(api(cache, "chunks")).json(&json!({"chunks": secret_chunks[..1]}))));
        assert_eq!(got.0, StatusCode::BAD_REQUEST, "{cache}: POST chunks without a path");
        for route in [format!("manifest/{}", hash_part(secret)), format!("base/{}", &secret.rsplit('/').next().unwrap()[33..])] {
            assert_eq!(send(client.get(api(cache, &route))).status(), StatusCode::NOT_FOUND, "{cache}: {route}");
        }
        for file in [format!("{}.narinfo", hash_part(secret)), format!("{}.ls", hash_part(secret)), format!("nar/{}.nar", hash_part(secret))] {
            assert_eq!(send(client.get(format!("{}/{cache}/{file}", server.url))).status(), StatusCode::NOT_FOUND, "{cache}: {file}");
        }
        // The cache's own chunks are read as parts of its own path.
        let own_chunks = manifest_chunks(&client, &server, cache, own, &admin);
        let body = json!({"path": hash_part(own), "chunks": own_chunks});
        assert_eq!(send(client.post(api(cache, "chunks")).json(&body)).status(), StatusCode::OK, "{cache}: own chunks");
    }

    // A push token of a cannot make a publish b's path without uploading its bytes.
    let push_a = server.mint(&["--push", "a"]);
    let hashes: Vec<&str> = secret_chunks.iter().map(|c| c["hash"].as_str().unwrap()).collect();
    let answer: Value =
        client.post(api("a", "missing-chunks")).bearer_auth(&push_a).json(&json!({"chunks": hashes})).send().unwrap().json().unwrap();
    assert_eq!(answer["chunks"].as_array().unwrap().len(), hashes.len(), "a holds none of b's chunks: {answer}");
    let info = nix.path_info(&src, secret);
    let commit = |extra: Value| {
        let mut request = json!({"storePath": secret, "narHash": info.nar_hash, "narSize": info.nar_size, "references": info.references});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        client.post(api("a", "commit")).bearer_auth(&push_a).json(&request).send().unwrap()
    };
    let by_list = commit(json!({"chunks": secret_chunks}));
    assert_eq!(by_list.status(), StatusCode::BAD_REQUEST);
    assert!(by_list.text().unwrap().contains("not uploaded to cache"));
    let by_query = commit(json!({"chunksQuery": answer["query"], "chunkSizes": secret_chunks.iter().map(|c| c["size"].clone()).collect::<Vec<_>>()}));
    assert_eq!(by_query.status(), StatusCode::BAD_REQUEST);
    let by_delta = commit(json!({"chunksDelta": {"base": hash_part(secret), "runs": [{"copy": [0, secret_chunks.len()]}]}}));
    assert_eq!(by_delta.status(), StatusCode::NOT_FOUND, "a delta on another cache's path");
    // A push-only token reads no chunk lists either.
    let name = &secret.rsplit('/').next().unwrap()[33..];
    assert_eq!(client.get(api("b", &format!("base/{name}"))).bearer_auth(server.mint(&["--push", "b"])).send().unwrap().status(), StatusCode::FORBIDDEN);
    let narinfo = |cache: &str| client.get(format!("{}/{cache}/{}.narinfo", server.url, hash_part(secret))).bearer_auth(&admin).send().unwrap();
    assert_eq!(narinfo("a").status(), StatusCode::NOT_FOUND, "a refused commit published the path");

    // Uploading the bytes themselves is the proof: upload-path then publishes it in a, tells
    // a's uploader of no deduplication (b's copy is b's business), and writes no chunk again.
    let chunks_before = server.chunk_bytes();
    let upload = |token: &str| {
        let nar_info = json!({
            "cache": "a", "store_path_hash": hash_part(secret), "store_path": secret, "references": [],
            "system": null, "deriver": null, "sigs": [], "ca": null, "nar_hash": info.nar_hash, "nar_size": info.nar_size,
        });
        client
            .put(format!("{}/_api/v1/upload-path", server.url))
            .bearer_auth(token)
            .header("X-Attic-Nar-Info", nar_info.to_string())
            .body(nix.dump(&src, secret))
            .send()
            .unwrap()
    };
    let first_upload: Value = upload(&push_a).json().unwrap();
    assert_eq!(first_upload["frac_deduplicated"].as_f64(), Some(0.0), "{first_upload}");
    assert_eq!(narinfo("a").status(), StatusCode::OK);
    assert_eq!(server.chunk_bytes(), chunks_before, "chunks stored for b were written again");
    let again: Value = upload(&push_a).json().unwrap();
    assert_eq!(again["frac_deduplicated"].as_f64(), Some(1.0), "{again}");
    let answer: Value =
        client.post(api("a", "missing-chunks")).bearer_auth(&push_a).json(&json!({"chunks": hashes})).send().unwrap().json().unwrap();
    assert_eq!(answer["chunks"].as_array().unwrap().len(), 0, "a now holds them: {answer}");

    // And real Nix pulls it from a with a's key untouched by any of this: b still serves it.
    let out = nix.copy_from(&nix.store("dst"), &format!("{}/b", server.url), &server.netrc(&pull_b), &key_b, std::slice::from_ref(secret));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

backend_matrix! {
    cross_cache_reads_and_publishes_are_refused => cross_cache_reads_and_publishes_are_refused_local, cross_cache_reads_and_publishes_are_refused_s3;
}

/// Every route that takes a body refuses a caller without the permission before it reads the
/// body: 16 MiB announced, 1 KiB sent, and the refusal comes anyway.
#[test]
fn permissions_are_checked_before_the_body() {
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let pull_only = format!("Bearer {}", server.mint(&["--pull", "ci"]));
    let announced = 16 * 1024 * 1024;
    let routes = [
        ("POST", "/_flywheel/v1/ci/chunks"),
        ("POST", "/_flywheel/v1/ci/missing-chunks"),
        ("POST", "/_flywheel/v1/ci/upload-chunks"),
        ("POST", "/_flywheel/v1/ci/commit"),
        ("PUT", "/_flywheel/v1/ci/chunk/0000000000000000000000000000000000000000000000000000000000000000"),
        ("PUT", "/ci/00000000000000000000000000000000.narinfo"),
        ("PUT", "/ci/nar/00000000000000000000000000000000.nar"),
        ("POST", "/_api/v1/get-missing-paths"),
        ("PUT", "/_api/v1/upload-path"),
        ("POST", "/_api/v1/cache-config/new"),
        ("PATCH", "/_api/v1/cache-config/ci"),
    ];
    for (method, path) in routes {
        let anonymous = server.raw_request(method, path, &[], announced, &[b'{'; 1024], false);
        assert!(anonymous.starts_with("HTTP/1.1 401"), "{method} {path} without a token: {anonymous:?}");
        if path.ends_with("/chunks") {
            continue; // pull is what it needs
        }
        let preamble = [("X-Attic-Nar-Info-Preamble-Size", "100".to_string()), ("Authorization", pull_only.clone())];
        let headers: &[(&str, String)] = if path.ends_with("upload-path") { &preamble } else { &preamble[1..] };
        let pull = server.raw_request(method, path, headers, announced, &[b'{'; 1024], false);
        assert!(pull.starts_with("HTTP/1.1 403"), "{method} {path} with a pull token: {pull:?}");
    }
}

/// Small defects of the chunk routes: padded frames, commits blamed on storage for the
/// caller's mistake, endless repeats of a chunk, empty questions remembered, a bad entry
/// answered with a 200 cut short, and a Host header echoed into cache-config.
#[test]
fn chunk_routes_refuse_bad_input_cleanly() {
    let nix = Nix::new();
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let admin = server.admin_token();
    let client = Client::new();
    let api = |route: &str| format!("{}/_flywheel/v1/ci/{route}", server.url);

    // A 1 KiB chunk padded into a large object: skippable frames before or after, bytes
    // after, or a frame grown with empty blocks.
    let data = vec![7u8; 1024];
    let hash = ChunkHash::of(&data);
    let frame = flywheel_core::chunk::compress(&data, 3).unwrap();
    let skippable = |len: usize| -> Vec<u8> {
        let mut out = vec![0x50, 0x2a, 0x4d, 0x18];
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend(std::iter::repeat_n(0u8, len));
        out
    };
    let padded_blocks = {
        // The frame header of `frame`, then empty raw blocks, then its blocks.
        let (header, blocks) = frame.split_at(frame_header_len(&frame));
        let mut out = header.to_vec();
        for _ in 0..100_000 {
            out.extend_from_slice(&[0, 0, 0]);
        }
        out.extend_from_slice(blocks);
        out
    };
    let before = server.storage_snapshot();
    for (label, body) in [
        ("skippable frame after", [frame.clone(), skippable(1 << 20)].concat()),
        ("skippable frame before", [skippable(1 << 20), frame.clone()].concat()),
        ("bytes after", [frame.clone(), vec![1, 2, 3]].concat()),
        ("empty blocks", padded_blocks),
    ] {
        let resp = client.put(api(&format!("chunk/{hash}"))).bearer_auth(&admin).body(body).send().unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{label}");
    }
    assert_eq!(server.storage_snapshot(), before, "a padded frame was stored");
    assert_eq!(client.put(api(&format!("chunk/{hash}"))).bearer_auth(&admin).body(frame.clone()).send().unwrap().status(), StatusCode::OK);

    // A commit whose chunk sizes are off by one is the caller's mistake, not storage damage.
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("commit-sizes"), &["big"]);
    let info = nix.path_info(&src, &paths[0]);
    let nar = nix.dump(&src, &paths[0]);
    let pieces = Chunker::chunk_all(ChunkParams::default(), &nar);
    let body = common::upload_body(pieces.iter().map(Vec::as_slice));
    assert_eq!(client.post(api("upload-chunks")).bearer_auth(&admin).body(body).send().unwrap().status(), StatusCode::OK);
    let mut chunks: Vec<Value> = pieces.iter().map(|p| json!({"hash": ChunkHash::of(p).to_string(), "size": p.len()})).collect();
    let last = chunks.len() - 1;
    let (a, b) = (chunks[0]["size"].as_u64().unwrap(), chunks[last]["size"].as_u64().unwrap());
    chunks[0]["size"] = json!(a + 1);
    chunks[last]["size"] = json!(b - 1);
    let commit = |chunks: &[Value]| {
        let request = json!({"storePath": paths[0], "narHash": info.nar_hash, "narSize": info.nar_size, "references": [], "chunks": chunks});
        client.post(api("commit")).bearer_auth(&admin).json(&request).send().unwrap()
    };
    let resp = commit(&chunks);
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let text = resp.text().unwrap();
    assert!(text.contains("as the commit says"), "{text}");

    // One chunk repeated past the bound is refused before any verification.
    let many = vec![json!({"hash": hash.to_string(), "size": 1024}); flywheel_core::api::v1::chunks::MAX_CHUNK_REPEATS + 1];
    let request = json!({"storePath": paths[0], "narHash": info.nar_hash, "narSize": 1024 * many.len(), "references": [], "chunks": many});
    let resp = client.post(api("commit")).bearer_auth(&admin).json(&request).send().unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().unwrap().contains("times in the list"));

    // An empty question names nothing to commit by.
    let answer: Value = client.post(api("missing-chunks")).bearer_auth(&admin).json(&json!({"chunks": []})).send().unwrap().json().unwrap();
    assert!(answer.get("query").is_none(), "{answer}");

    // A bad entry in POST chunks is a 4xx before any byte, never a 200 cut short.
    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &server.netrc(&admin), &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = manifest_chunks(&client, &server, "ci", &paths[0], &admin);
    let mut wrong_size = listed[1].clone();
    wrong_size["size"] = json!(wrong_size["size"].as_u64().unwrap() + 1);
    let body = json!({"path": hash_part(&paths[0]), "chunks": [listed[0].clone(), wrong_size]});
    let resp = client.post(api("chunks")).bearer_auth(&admin).json(&body).send().unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // cache-config does not echo a Host header that is not a plain host and port.
    let resp: Value = client
        .get(format!("{}/_api/v1/cache-config/ci", server.url))
        .bearer_auth(&admin)
        .header("Host", "evil.example/phish?x=")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let endpoint = resp["api_endpoint"].as_str().unwrap();
    assert!(!endpoint.contains("evil") && !endpoint.contains('?'), "{endpoint}");
}

/// The length of a zstd frame header: magic, descriptor, window byte, dictionary id and
/// content size fields (RFC 8878, section 3.1.1.1).
fn frame_header_len(frame: &[u8]) -> usize {
    let descriptor = frame[4];
    let single_segment = descriptor & 0x20 != 0;
    let fcs = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let dict = [0, 1, 2, 4][(descriptor & 3) as usize];
    4 + 1 + usize::from(!single_segment) + dict + fcs
}

/// A body shorter than its `Content-Length` is the client's mistake: a 400, not a 500.
#[test]
fn short_bodies_are_the_callers_mistake() {
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let auth = [("Authorization", format!("Bearer {}", server.admin_token()))];
    let routes = [
        ("PUT", "/ci/nar/00000000000000000000000000000000.nar".to_string(), vec![]),
        ("PUT", "/_api/v1/upload-path".to_string(), vec![("X-Attic-Nar-Info-Preamble-Size", "100".to_string())]),
        ("POST", "/_flywheel/v1/ci/upload-chunks".to_string(), vec![]),
        ("POST", "/_flywheel/v1/ci/missing-chunks".to_string(), vec![]),
    ];
    for (method, path, extra) in routes {
        let headers: Vec<(&str, String)> = auth.iter().cloned().chain(extra).collect();
        let answer = server.raw_request(method, &path, &headers, 100_000, &[b'{'; 50], true);
        assert!(answer.starts_with("HTTP/1.1 400"), "{method} {path}: {answer:?}");
    }
}

/// Garbage collection takes back what a cache held for a path it no longer has: the grants of
/// chunks no live path of the cache uses, and the record of the NAR file name Nix uploaded.
/// Another cache holding the same chunks keeps its grants.
#[test]
fn gc_takes_back_grants_of_deleted_paths() {
    let nix = Nix::new();
    let server = Server::start_with(Backend::Local, "[gc]\ninterval = 0\ngrace-period = 0\n");
    server.create_cache("a", false);
    let key_b = server.create_cache("b", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("gc-grants"), &["big"]);
    let admin = server.admin_token();
    for cache in ["a", "b"] {
        let out = nix.copy_to(&src, &format!("{}/{cache}", server.url), &server.netrc(&admin), &paths);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let client = Client::new();
    let chunks = manifest_chunks(&client, &server, "a", &paths[0], &admin);
    let hashes: Vec<&str> = chunks.iter().map(|c| c["hash"].as_str().unwrap()).collect();
    let distinct: std::collections::BTreeSet<&str> = hashes.iter().copied().collect();
    let missing_in = |cache: &str| -> usize {
        let answer: Value = client
            .post(format!("{}/_flywheel/v1/{cache}/missing-chunks", server.url))
            .bearer_auth(&admin)
            .json(&json!({"chunks": hashes}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        answer["chunks"].as_array().unwrap().len()
    };
    assert_eq!((missing_in("a"), missing_in("b")), (0, 0));
    let gc = |extra: &[&str]| {
        let out = std::process::Command::new(common::FLYWHEEL).args(["gc", "--config"]).arg(&server.config).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let report = gc(&[]);
    assert!(report.contains("freed 0 chunk grants, 0 uploaded NAR file names"), "nothing is dead yet: {report}");

    let resp = client.delete(format!("{}/a/{}.narinfo", server.url, hash_part(&paths[0]))).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let report = gc(&["--dry-run"]);
    assert!(report.contains(&format!("would free {} chunk grants, 1 uploaded NAR file names", distinct.len())), "{report}");
    assert_eq!(missing_in("a"), 0, "a dry run deleted grants");
    let report = gc(&[]);
    assert!(report.contains(&format!("freed {} chunk grants, 1 uploaded NAR file names", distinct.len())), "{report}");
    assert_eq!(missing_in("a"), hashes.len(), "a holds nothing of the deleted path");
    assert_eq!(missing_in("b"), 0, "b's grants went with a's");
    // b still serves the path, its chunks untouched.
    let out = nix.copy_from(&nix.store("dst"), &format!("{}/b", server.url), &server.netrc(&admin), &key_b, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
