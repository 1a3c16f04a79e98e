//! The cache server against real Nix 2.8: `nix copy` both ways, Attic's upload API, dedup,
//! tokens and bad input, each on local storage and on S3 (`s3s-fs`).

#[macro_use]
mod common;

use common::{hash_part, Backend, Nix, Server, NixVersion};
use flywheel_core::nar::NarWriter;
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// The corpus paths, dependencies first: a several-MB path, a single file, symlinks and
/// executables, an empty directory, and a path with references.
const CORPUS: [&str; 5] = ["big", "single", "tree", "empty", "withRefs"];

fn nix_copy_roundtrip(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    let key = server.create_cache("ci", false);
    let other_key = server.create_cache("other", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("copy"), &CORPUS);
    let url = format!("{}/ci", server.url);

    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let out = nix.copy_to(&src, &url, &push, &paths);
    assert!(out.status.success(), "nix copy --to failed: {}", String::from_utf8_lossy(&out.stderr));

    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let dst = nix.store("dst");
    let out = nix.copy_from(&dst, &url, &pull, &key, &paths);
    assert!(out.status.success(), "nix copy --from failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in &paths {
        assert!(nix.verify(&dst, path), "{path} does not verify after substitution");
        let (a, b) = (nix.path_info(&src, path), nix.path_info(&dst, path));
        assert_eq!((a.nar_hash, a.nar_size, a.references), (b.nar_hash, b.nar_size, b.references));
    }
    let tree = &paths[2];
    let run = std::path::PathBuf::from(format!("{dst}{tree}/bin/run"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&run).unwrap().permissions());
    assert!(mode & 0o100 != 0, "executable bit lost");
    assert_eq!(std::fs::read_link(format!("{dst}{tree}/share/link")).unwrap().to_str(), Some("../bin/run"));
    let empty = std::fs::read_dir(format!("{dst}{}", paths[3])).unwrap().count();
    assert_eq!(empty, 0);

    // Signed by a key Nix does not trust: refused.
    let out = nix.copy_from(&nix.store("dst-wrong-key"), &url, &pull, &other_key, &paths[..1]);
    assert!(!out.status.success(), "substitution with an untrusted key succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature"), "{}", String::from_utf8_lossy(&out.stderr));
}

nix_matrix! {
    nix_copy_roundtrip_local => |version| nix_copy_roundtrip(version, Backend::Local);
}

nix_matrix! {
    nix_copy_roundtrip_s3 => |version| nix_copy_roundtrip(version, Backend::S3);
}

/// Uploads one path through `upload-path`, in the header form or the preamble form.
fn upload_path(
    client: &Client,
    server: &Server,
    token: &str,
    info: &serde_json::Value,
    nar: Vec<u8>,
    preamble: bool,
) -> reqwest::blocking::Response {
    let request = client.put(format!("{}/_api/v1/upload-path", server.url)).bearer_auth(token);
    let request = if preamble {
        let json = serde_json::to_vec(info).unwrap();
        let mut body = json.clone();
        body.extend_from_slice(&nar);
        request.header("X-Attic-Nar-Info-Preamble-Size", json.len().to_string()).body(body)
    } else {
        request.header("X-Attic-Nar-Info", info.to_string()).body(nar)
    };
    request.send().unwrap()
}

fn upload_info(nix: &Nix, store: &str, path: &str, cache: &str) -> serde_json::Value {
    let info = nix.path_info(store, path);
    serde_json::json!({
        "cache": cache,
        "store_path_hash": hash_part(path),
        "store_path": path,
        "references": info.references.iter().map(|r| r.trim_start_matches("/nix/store/")).collect::<Vec<_>>(),
        "system": null,
        "deriver": info.deriver.as_deref().map(|d| d.trim_start_matches("/nix/store/")),
        "sigs": [],
        "ca": null,
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
    })
}

fn missing_paths(client: &Client, server: &Server, token: &str, paths: &[String]) -> Vec<String> {
    let resp: serde_json::Value = client
        .post(format!("{}/_api/v1/get-missing-paths", server.url))
        .bearer_auth(token)
        .json(&serde_json::json!({"cache": "ci", "store_path_hashes": paths.iter().map(|p| hash_part(p)).collect::<Vec<_>>()}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    resp["missing_paths"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect()
}

fn attic_upload(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("attic"), &CORPUS);
    let client = Client::new();
    let token = server.mint(&["--push", "ci", "--pull", "ci"]);

    assert_eq!(missing_paths(&client, &server, &token, &paths).len(), paths.len());
    for (i, path) in paths.iter().enumerate() {
        let info = upload_info(&nix, &src, path, "ci");
        let resp = upload_path(&client, &server, &token, &info, nix.dump(&src, path), i % 2 == 1);
        assert_eq!(resp.status(), StatusCode::OK, "{path}: {}", resp.text().unwrap());
        let result: serde_json::Value = resp.json().unwrap();
        assert_eq!(result["kind"], "Uploaded", "{result}");
    }
    assert!(missing_paths(&client, &server, &token, &paths).is_empty());

    // The same NAR again: nothing new is stored.
    let info = upload_info(&nix, &src, &paths[0], "ci");
    let before = server.chunk_bytes();
    let resp = upload_path(&client, &server, &token, &info, nix.dump(&src, &paths[0]), false);
    let result: serde_json::Value = resp.json().unwrap();
    assert_eq!(result["kind"], "Deduplicated", "{result}");
    assert_eq!(server.chunk_bytes(), before);

    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let dst = nix.store("dst");
    let out = nix.copy_from(&dst, &format!("{}/ci", server.url), &pull, &key, &paths);
    assert!(out.status.success(), "nix copy --from failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in &paths {
        assert!(nix.verify(&dst, path), "{path} does not verify");
    }
}

nix_matrix! {
    attic_upload_local => |version| attic_upload(version, Backend::Local);
}

nix_matrix! {
    attic_upload_s3 => |version| attic_upload(version, Backend::S3);
}

fn dedup(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("dedup"), &["big", "bigNext"]);
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let url = format!("{}/ci", server.url);

    let out = nix.copy_to(&src, &url, &push, &paths[..1]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = server.chunk_bytes();
    assert!(first > 5_000_000, "version one stored only {first} bytes");

    let out = nix.copy_to(&src, &url, &push, &paths[1..]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added = server.chunk_bytes() - first;
    // One insertion changes the chunk around it (FastCDC: at most a few chunks of <= 256 KiB).
    assert!(added > 0, "version two stored nothing");
    assert!(added < 800_000, "version two stored {added} new bytes of {first}");

    // Through Attic's API the response says how much the cache held already. Another cache is
    // told of nothing it did not hold (what other caches store is theirs to know), although
    // storage keeps one copy for both.
    let client = Client::new();
    let stored = server.chunk_bytes();
    let info = upload_info(&nix, &src, &paths[1], "ci");
    let resp = upload_path(&client, &server, &server.admin_token(), &info, nix.dump(&src, &paths[1]), false);
    let result: serde_json::Value = resp.json().unwrap();
    assert!(result["frac_deduplicated"].as_f64().unwrap() > 0.99, "{result}");
    server.create_cache("ci2", false);
    let info = upload_info(&nix, &src, &paths[1], "ci2");
    let resp = upload_path(&client, &server, &server.admin_token(), &info, nix.dump(&src, &paths[1]), false);
    let result: serde_json::Value = resp.json().unwrap();
    assert_eq!(result["frac_deduplicated"].as_f64(), Some(0.0), "{result}");
    assert_eq!(server.chunk_bytes(), stored, "the same NAR in another cache stored chunks again");
}

nix_matrix! {
    dedup_local => |version| dedup(version, Backend::Local);
}

nix_matrix! {
    dedup_s3 => |version| dedup(version, Backend::S3);
}

fn tokens(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    server.create_cache("ci", false);
    server.create_cache("other", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("tokens"), &["single"]);
    let admin = server.admin_token();
    let client = Client::new();
    let info = upload_info(&nix, &src, &paths[0], "ci");
    let nar = nix.dump(&src, &paths[0]);
    assert_eq!(upload_path(&client, &server, &admin, &info, nar.clone(), false).status(), StatusCode::OK);

    // A token signed with another server's secret.
    let foreign_config = server.dir.path().join("foreign.toml");
    std::fs::write(
        &foreign_config,
        std::fs::read_to_string(&server.config)
            .unwrap()
            .lines()
            .map(|l| if l.starts_with("token-hs256") { "token-hs256-secret-base64 = \"AAAAaaaaBBBBbbbbCCCCccccDDDDddddEEEEeeeeFFFF\"".to_string() } else { l.to_string() })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let out = std::process::Command::new(common::FLYWHEEL)
        .args(["token", "mint", "--config"])
        .arg(&foreign_config)
        .args(["--sub", "x", "--validity", "1h", "--pull", "*", "--push", "*"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let foreign = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let for_other = server.mint(&["--pull", "other", "--push", "other"]);
    let pull_only = server.mint(&["--pull", "ci"]);

    let hash = hash_part(&paths[0]);
    let narinfo_url = format!("{}/ci/{hash}.narinfo", server.url);
    let nar_url = format!("{}/ci/nar/{hash}.nar.zst", server.url);
    for (label, token) in [("none", None), ("foreign", Some(&foreign)), ("other cache", Some(&for_other))] {
        let auth = |r: reqwest::blocking::RequestBuilder| match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        };
        let reads = [
            auth(client.get(&narinfo_url)).send().unwrap().status(),
            auth(client.get(&nar_url)).send().unwrap().status(),
            auth(client.get(format!("{}/ci/nix-cache-info", server.url))).send().unwrap().status(),
        ];
        let writes = [
            auth(client.put(&narinfo_url).body("StorePath: x\n")).send().unwrap().status(),
            auth(client.put(format!("{}/ci/nar/x.nar", server.url)).body(nar.clone())).send().unwrap().status(),
            auth(client.put(format!("{}/_api/v1/upload-path", server.url)).header("X-Attic-Nar-Info", info.to_string()).body(nar.clone()))
                .send()
                .unwrap()
                .status(),
            auth(client.post(format!("{}/_api/v1/get-missing-paths", server.url)).json(&serde_json::json!({"cache": "ci", "store_path_hashes": [hash]})))
                .send()
                .unwrap()
                .status(),
        ];
        for status in reads.iter().chain(writes.iter()) {
            assert!(
                *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN,
                "token {label}: got {status} (reads {reads:?}, writes {writes:?})"
            );
        }
    }
    // Basic auth carries the token as Nix's netrc does; a pull token cannot push.
    let resp = client.get(&narinfo_url).basic_auth("anyone", Some(&pull_only)).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = upload_path(&client, &server, &pull_only, &info, nar, false);
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["code"], 403);
    assert_eq!(body["error"], "AccessError");
}

nix_matrix! {
    tokens_local => |version| tokens(version, Backend::Local);
}

nix_matrix! {
    tokens_s3 => |version| tokens(version, Backend::S3);
}

/// A NAR of one directory with entries named as given, in the order given.
fn nar_with_names(names: &[&[u8]]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.start_directory().unwrap();
    for name in names {
        w.entry(name).unwrap();
        w.regular(false, 3, &mut &b"abc"[..]).unwrap();
        w.end_entry().unwrap();
    }
    w.end_directory().unwrap();
    w.into_inner()
}

fn bad_input(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    // No periodic collection: the one at the end is the test's.
    let server = Server::start_with(backend, "[gc]\ninterval = 0\n");
    server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("bad"), &["big", "single"]);
    let token = server.admin_token();
    let client = Client::new();
    let big_info = upload_info(&nix, &src, &paths[0], "ci");
    let big_nar = nix.dump(&src, &paths[0]);
    let single_info = upload_info(&nix, &src, &paths[1], "ci");
    let single_nar = nix.dump(&src, &paths[1]);
    // Some stored state that bad input must leave alone.
    assert_eq!(upload_path(&client, &server, &token, &single_info, single_nar.clone(), false).status(), StatusCode::OK);
    let before = server.storage_snapshot();

    let with_nar = |nar: Vec<u8>| {
        let mut info = big_info.clone();
        info["nar_size"] = serde_json::json!(nar.len());
        info["nar_hash"] = serde_json::json!(format!("sha256:{}", hex_sha256(&nar)));
        upload_path(&client, &server, &token, &info, nar, false)
    };
    let mut cases: Vec<(&str, reqwest::blocking::Response, &str)> = vec![
        ("garbage NAR", with_nar(b"this is not a NAR at all".to_vec()), "NAR"),
        ("truncated NAR", with_nar(big_nar[..big_nar.len() / 2 + 3].to_vec()), "truncated"),
        ("name ..", with_nar(nar_with_names(&[b".."])), "invalid file name"),
        ("name with /", with_nar(nar_with_names(&[b"a/b"])), "invalid file name"),
        ("name with NUL", with_nar(nar_with_names(&[b"a\0b"])), "invalid file name"),
        ("unsorted", with_nar(nar_with_names(&[b"b", b"a"])), "sorted"),
    ];
    let mut wrong_hash = big_info.clone();
    wrong_hash["nar_hash"] = single_info["nar_hash"].clone();
    cases.push(("wrong narHash", upload_path(&client, &server, &token, &wrong_hash, big_nar.clone(), false), "does not match"));
    let mut wrong_size = big_info.clone();
    wrong_size["nar_size"] = serde_json::json!(big_nar.len() + 8);
    cases.push(("wrong narSize", upload_path(&client, &server, &token, &wrong_size, big_nar.clone(), true), "does not match"));
    let mut wrong_hash_part = single_info.clone();
    wrong_hash_part["store_path_hash"] = serde_json::json!("00000000000000000000000000000000");
    cases.push(("store_path_hash", upload_path(&client, &server, &token, &wrong_hash_part, single_nar.clone(), false), "does not match"));
    let put = |path: String, body: Vec<u8>| client.put(format!("{}{path}", server.url)).bearer_auth(&token).body(body).send().unwrap();
    cases.push(("truncated NAR through Nix's PUT", put("/ci/nar/x.nar".into(), big_nar[..big_nar.len() - 100].to_vec()), "truncated"));
    cases.push(("bad xz", put("/ci/nar/x.nar.xz".into(), b"not xz data at all".to_vec()), "decompress"));
    cases.push(("unknown compression", put("/ci/nar/x.nar.gz".into(), single_nar.clone()), "compression"));
    let hash = hash_part(&paths[0]);
    cases.push(("malformed narinfo", put(format!("/ci/{hash}.narinfo"), b"this is no narinfo".to_vec()), "narinfo"));
    let narinfo = format!(
        "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \n",
        paths[0], big_info["nar_hash"].as_str().unwrap(), big_nar.len()
    );
    cases.push(("narinfo without its NAR", put(format!("/ci/{hash}.narinfo"), narinfo.into_bytes()), "has not been uploaded"));
    cases.push((
        "malformed JSON",
        client.post(format!("{}/_api/v1/get-missing-paths", server.url)).bearer_auth(&token).body("{\"cache\": ").send().unwrap(),
        "JSON",
    ));
    cases.push((
        "malformed upload info",
        client.put(format!("{}/_api/v1/upload-path", server.url)).bearer_auth(&token).header("X-Attic-Nar-Info", "{nope").body(single_nar.clone()).send().unwrap(),
        "JSON",
    ));
    cases.push(("unknown cache", client.get(format!("{}/nosuchcache/{hash}.narinfo", server.url)).bearer_auth(&token).send().unwrap(), "does not exist"));
    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let resp = client.put(format!("{}/_api/v1/upload-path", server.url)).bearer_auth(&token).header("X-Attic-Nar-Info", huge).body(single_nar.clone()).send();
    let huge_status = match resp {
        Ok(resp) => resp.status(),
        // The server may close the connection on a header this large; that is a refusal too.
        Err(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    };
    assert!(huge_status.is_client_error(), "oversized header: {huge_status}");

    for (label, resp, needle) in cases {
        let status = resp.status();
        let text = resp.text().unwrap();
        assert!(status.is_client_error(), "{label}: expected a 4xx, got {status}: {text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{label}: body is not JSON: {text}"));
        assert_eq!(body["code"], status.as_u16(), "{label}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(needle), "{label}: message {message:?} lacks {needle:?}");
    }
    // Nothing stored before was changed or lost; failed uploads may only have added chunks
    // (another upload may count on a chunk, so they are left to garbage collection).
    let after = server.storage_snapshot();
    let changed: Vec<_> = before.keys().filter(|k| before.get(*k) != after.get(*k)).collect();
    assert!(changed.is_empty(), "bad input changed stored objects: {changed:?}");
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(added.iter().all(|k| k.starts_with("chunks/")), "bad input stored more than chunks: {added:?}");
    // Once past the grace period, a collection takes storage back to what it was, byte for byte.
    // It runs with no grace period (what the failed uploads left is as old as it needs to be)
    // rather than after waiting one out: the conformance suite checks, on a moved clock, that
    // the grace period keeps young garbage and sweeps it once past.
    let past_grace = server.dir.path().join("past-grace.toml");
    let config = std::fs::read_to_string(&server.config).unwrap();
    assert!(config.contains("[gc]\ninterval = 0\n"), "{config}");
    std::fs::write(&past_grace, config.replace("[gc]\ninterval = 0\n", "[gc]\ninterval = 0\ngrace-period = 0\n")).unwrap();
    let gc = std::process::Command::new(common::FLYWHEEL).args(["gc", "--config"]).arg(&past_grace).output().unwrap();
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    let collected = server.storage_snapshot();
    let changed: Vec<_> = before.keys().chain(collected.keys()).filter(|k| before.get(*k) != collected.get(*k)).collect();
    assert!(changed.is_empty(), "after GC, storage differs from before the bad input: {changed:?}");

    // And the stored path still substitutes.
    let resp = client.get(format!("{}/ci/{}.narinfo", server.url, hash_part(&paths[1]))).bearer_auth(&token).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

nix_matrix! {
    bad_input_local => |version| bad_input(version, Backend::Local);
}

nix_matrix! {
    bad_input_s3 => |version| bad_input(version, Backend::S3);
}

/// A secret key made by real Nix, and its public key.
fn nix_keypair(nix: &Nix, name: &str) -> (String, String) {
    let secret = nix.run(nix.cmd("nix").args(["key", "generate-secret", "--key-name", name]));
    let mut convert = nix.cmd("nix");
    convert.args(["key", "convert-secret-to-public"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = convert.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), secret.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (secret.trim().to_string(), String::from_utf8(out.stdout).unwrap().trim().to_string())
}

nix_matrix! {
    /// A cache declared in the config signs with the key in its file, follows the file when it
    /// changes, and a bad key file is refused by the config check.
    declared_cache_signs_with_the_key_from_its_file => declared_cache_signs_with_the_key_from_its_file_with;
}

fn declared_cache_signs_with_the_key_from_its_file_with(version: NixVersion) {
    let nix = Nix::of(version);
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("declared.key");
    let (secret1, public1) = nix_keypair(&nix, "declared-1");
    let (secret2, public2) = nix_keypair(&nix, "declared-2");
    std::fs::write(&key_file, format!("{secret1}\n")).unwrap();
    let mut server = Server::start_with(
        Backend::S3,
        &format!("[caches.declared]\nsigning-key-file = {:?}\npriority = 30\n", key_file),
    );
    let url = format!("{}/declared", server.url);
    let info = reqwest::blocking::get(format!("{url}/nix-cache-info")).unwrap();
    assert_eq!(info.status(), StatusCode::UNAUTHORIZED, "a declared cache is private unless `public = true`");

    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("declared"), &["single"]);
    let netrc = server.netrc(&server.mint(&["--push", "declared", "--pull", "declared"]));
    let out = nix.copy_to(&src, &url, &netrc, &paths);
    assert!(out.status.success(), "nix copy --to failed: {}", String::from_utf8_lossy(&out.stderr));
    let out = nix.copy_from(&nix.store("dst1"), &url, &netrc, &public1, &paths);
    assert!(out.status.success(), "not signed by the key file's key: {}", String::from_utf8_lossy(&out.stderr));
    let config = Client::new()
        .get(format!("{}/_api/v1/cache-config/declared", server.url))
        .bearer_auth(server.admin_token())
        .send()
        .unwrap()
        .json::<serde_json::Value>()
        .unwrap();
    assert_eq!(config["public_key"], public1.as_str());
    assert_eq!(config["priority"], 30);

    // A new key in the file: after a restart the cache signs with it, and only with it.
    std::fs::write(&key_file, format!("{secret2}\n")).unwrap();
    server.restart();
    let out = nix.copy_from(&nix.store("dst2"), &url, &netrc, &public2, &paths);
    assert!(out.status.success(), "the rotated key is not used: {}", String::from_utf8_lossy(&out.stderr));
    let out = nix.copy_from(&nix.store("dst3"), &url, &netrc, &public1, &paths);
    assert!(!out.status.success(), "still signed by the old key");

    // A key file that holds no key is refused, naming the cache and the file.
    std::fs::write(&key_file, "not a key\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--check-config", "--config"])
        .arg(&server.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad signing key passed the config check");
    assert!(stderr.contains("signing key of cache declared"), "{stderr}");
}
