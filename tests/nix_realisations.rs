//! Realisations of content-addressed derivations (`ca-derivations`): `nix copy --to` uploads a
//! CA derivation's output and its realisation, and a fresh store substitutes the output by its
//! derivation instead of building it. Over HTTP: both layouts (`realisations/` up to Nix 2.34,
//! `build-trace-v2/` from 2.35) keep the uploader's signatures and add the cache's, bad input
//! is refused with nothing stored, and realisations go when their output path goes.
//!
//! Every test body takes the `Nix` to run, so the same scenarios can run against another Nix.

#[macro_use]
mod common;

use common::{Backend, Nix, NixVersion, Server};
use flywheel_core::nix::{SigningKey, VerifyingKey};
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// The options every Nix command here takes: CA derivations are experimental.
const CA: [&str; 3] = ["--option", "experimental-features", "nix-command ca-derivations"];

/// A floating content-addressed derivation whose output holds `seed`.
fn ca_expr(seed: &str) -> String {
    format!(
        r#"derivation {{ name = "ca-{seed}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo built {seed} > $out" ]; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }}"#
    )
}

/// A CA derivation built in `store`.
struct Built {
    /// The derivation, `/nix/store/...drv`.
    drv: String,
    /// Its output `out`.
    out: String,
    /// The realisation's id, `sha256:<hex>!out`, as Nix names it.
    id: String,
}

impl Built {
    fn drv_base(&self) -> &str {
        self.drv.trim_start_matches("/nix/store/")
    }

    fn out_base(&self) -> &str {
        self.out.trim_start_matches("/nix/store/")
    }

    /// The drv hash in hex, as the server files the realisation.
    fn drv_hash_hex(&self) -> &str {
        self.id.trim_start_matches("sha256:").split('!').next().unwrap()
    }
}

/// The installable naming the outputs of `drv`: Nix 2.13 and later read a bare `.drv` path as
/// the derivation file itself, and name its outputs `drv^*`.
fn outputs_of(nix: &Nix, drv: &str) -> String {
    match nix.version {
        NixVersion::V2_8 => drv.to_string(),
        NixVersion::V2_30 => format!("{drv}^*"),
    }
}

/// Instantiates and builds a CA derivation in `store`, and reads its realisation's id.
fn build_ca(nix: &Nix, store: &str, seed: &str) -> Built {
    let expr = ca_expr(seed);
    let drv = nix.run(nix.cmd("nix-instantiate").args(CA).args(["--store", store, "-E", &expr])).trim().to_string();
    let out = nix
        .run(nix.cmd("nix-store").args(CA).args(["--option", "substituters", "", "--store", store, "--realise", &drv]))
        .trim()
        .to_string();
    let info = nix.run(nix.cmd("nix").args(CA).args(["realisation", "info", "--json", "--store", store, &outputs_of(nix, &drv)]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info[0]["outPath"].as_str().map(|p| p.trim_start_matches("/nix/store/")), Some(out.trim_start_matches("/nix/store/")), "{info}");
    let id = info[0]["id"].as_str().unwrap().to_string();
    Built { drv, out, id }
}

/// `nix copy --to` of the derivation's outputs, which with `ca-derivations` sends the output
/// path and then its realisation.
fn push_ca(nix: &Nix, store: &str, url: &str, netrc: &std::path::Path, built: &Built) {
    let out = nix.cmd("nix").args(CA).args(["copy", "--store", store, "--to", url, "--option", "netrc-file"]).arg(netrc).arg(outputs_of(nix, &built.drv)).output().unwrap();
    assert!(out.status.success(), "nix copy --to of {}: {}", built.drv, String::from_utf8_lossy(&out.stderr));
}

/// Prints the server's log when the test fails, before the server's directory goes.
struct DumpLog(std::path::PathBuf);

impl Drop for DumpLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("server log:\n{}", std::fs::read_to_string(&self.0).unwrap_or_default());
        }
    }
}

/// The JSON a GET answers, failing unless it is a 200.
fn get_json(client: &Client, url: &str, token: &str) -> serde_json::Value {
    let resp = client.get(url).bearer_auth(token).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    resp.json().unwrap()
}

fn ca_substitution(nix: &Nix, backend: Backend) {
    let server = Server::start(backend);
    let _dump = DumpLog(server.log_path());
    let key = server.create_cache("ci", false);
    let url = format!("{}/ci", server.url);
    let src = nix.store("src");
    let seed = common::unique_seed("ca");
    let built = build_ca(nix, &src, &seed);
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    push_ca(nix, &src, &url, &push, &built);

    // The realisation is served with the cache's signature.
    let client = Client::new();
    let pull_token = server.mint(&["--pull", "ci"]);
    let served = get_json(&client, &format!("{url}/realisations/{}.doi", built.id), &pull_token);
    assert_eq!(served["id"], built.id.as_str(), "{served}");
    assert_eq!(served["outPath"], built.out_base(), "{served}");
    let fingerprint = format!(r#"{{"dependentRealisations":{{}},"id":"{}","outPath":"{}"}}"#, built.id, built.out_base());
    let cache_key = VerifyingKey::parse(&key).unwrap();
    let sigs: Vec<&str> = served["signatures"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(sigs.iter().any(|s| cache_key.verify(&fingerprint, s)), "no signature by {key} in {served}");

    // A fresh store builds the derivation by substituting its output. It could not build it:
    // `--max-jobs 0` forbids local builds, and without sandbox paths its builder, /bin/sh,
    // does not exist in the build's chroot.
    let pull = server.netrc(&pull_token);
    let dst = nix.store("dst");
    let out = nix
        .cmd("nix")
        .args(CA)
        .args(["build", "--impure", "--no-link", "--store", &dst, "--max-jobs", "0", "--option", "sandbox-paths", ""])
        .args(["--option", "substituters", &url, "--option", "trusted-public-keys", &key, "--option", "netrc-file"])
        .arg(&pull)
        .args(["--expr", &ca_expr(&seed)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix build in a fresh store: {stderr}");
    assert!(!stderr.contains("building '"), "the output was built, not substituted: {stderr}");
    assert!(nix.verify(&dst, &built.out), "{} is not valid in the fresh store", built.out);
    let contents = std::fs::read_to_string(format!("{dst}{}", built.out)).unwrap();
    assert_eq!(contents.trim(), format!("built {seed}"));
    let info = nix.run(nix.cmd("nix").args(CA).args(["realisation", "info", "--json", "--store", &dst, &outputs_of(nix, &built.drv)]));
    assert!(info.contains(built.out_base()), "the fresh store has no realisation of {}: {info}", built.drv);

    // Nix 2.8 checks a realisation's signatures when it copies one with require-sigs: the
    // cache's signature is accepted with the cache's key, and a store trusting another key
    // refuses the realisation.
    // `nix copy --from` reads the derivation from the cache to learn its realisations'
    // ids, so the derivation goes there too.
    let drv_pushed = nix.cmd("nix").args(CA).args(["copy", "--derivation", "--store", &src, "--to", &url, "--option", "netrc-file"]).arg(&push).arg(&built.drv).output().unwrap();
    assert!(drv_pushed.status.success(), "{}", String::from_utf8_lossy(&drv_pushed.stderr));
    let copied = nix.store("copied");
    let refused = nix.store("refused");
    // Same name as the cache's key, other bytes.
    let other_key = SigningKey::generate(cache_key.name()).unwrap().verifying_key().to_nix_string();
    for store in [&copied, &refused] {
        // The derivation first (nix copy reads it to find the realisation), then the output.
        nix.run(nix.cmd("nix").args(CA).args(["copy", "--derivation", "--from", &url, "--to", store, "--option", "trusted-public-keys", &key, "--option", "netrc-file"]).arg(&pull).arg(&built.drv));
    }
    let copy_from = |store: &str, trusted: &str| {
        nix.cmd("nix")
            .args(CA)
            .args(["copy", "--from", &url, "--to", store, "--option", "require-sigs", "true", "--option", "trusted-public-keys", trusted, "--option", "netrc-file"])
            .arg(&pull)
            .arg(outputs_of(nix, &built.drv))
            .output()
            .unwrap()
    };
    let ok = copy_from(&copied, &key);
    assert!(ok.status.success(), "nix copy --from with the cache's key: {}", String::from_utf8_lossy(&ok.stderr));
    let info = nix.run(nix.cmd("nix").args(CA).args(["realisation", "info", "--json", "--store", &copied, &outputs_of(nix, &built.drv)]));
    assert!(info.contains(built.out_base()), "{info}");
    // The output path is content-addressed, so it is trusted by its hash; only the realisation
    // needs the key.
    let no = copy_from(&refused, &other_key);
    let stderr = String::from_utf8_lossy(&no.stderr);
    assert!(!no.status.success() && nix.version.refused_unsigned(&stderr), "a realisation signed by an unknown key was taken: {stderr}");
}

nix_matrix! {
    ca_substitution_local => |version| ca_substitution(&Nix::of(version), Backend::Local);
}

nix_matrix! {
    ca_substitution_s3 => |version| ca_substitution(&Nix::of(version), Backend::S3);
}

/// A well-formed signature by a key the server does not know.
fn uploader_sig(name: &str, byte: u8) -> String {
    use base64::Engine;
    format!("{name}:{}", base64::engine::general_purpose::STANDARD.encode([byte; 64]))
}

/// Both layouts over HTTP: the uploader's signatures are kept as sent, the cache's is added
/// when served, HEAD answers, and an entry is served only while its output is in the cache.
fn realisations_over_http(nix: &Nix, backend: Backend) {
    let server = Server::start(backend);
    let _dump = DumpLog(server.log_path());
    let key = server.create_cache("ci", false);
    let cache_key = VerifyingKey::parse(&key).unwrap();
    let url = format!("{}/ci", server.url);
    let src = nix.store("src");
    let built = build_ca(nix, &src, &common::unique_seed("http"));
    // Only the output path: the realisations come over HTTP below.
    let push = server.netrc(&server.mint(&["--push", "ci"]));
    let copied = nix.copy_to(&src, &url, &push, std::slice::from_ref(&built.out));
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let client = Client::new();
    let admin = server.admin_token();
    let pull = server.mint(&["--pull", "ci"]);

    // The old layout, as Nix up to 2.34 sends it, with the hash in nixbase32 in the URL this
    // time: it is filed under the hex form Nix asks for.
    let text_sig = uploader_sig("runner-1", 7);
    let body = serde_json::json!({
        "dependentRealisations": {}, "id": built.id, "outPath": built.out_base(), "signatures": [text_sig],
    });
    let hash = flywheel_core::nix::Sha256Hash::parse(&format!("sha256:{}", built.drv_hash_hex())).unwrap();
    let b32_url = format!("{url}/realisations/sha256:{}!out.doi", hash.to_base32_bare());
    let b32_body = serde_json::json!({"id": format!("sha256:{}!out", hash.to_base32_bare()), "outPath": built.out_base(), "signatures": [text_sig]});
    let resp = client.put(&b32_url).bearer_auth(&admin).json(&b32_body).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    let v1_url = format!("{url}/realisations/{}.doi", built.id);
    let served = get_json(&client, &v1_url, &pull);
    let sigs = served["signatures"].as_array().unwrap();
    assert_eq!(sigs[0], text_sig.as_str(), "the uploader's signature is kept: {served}");
    let fingerprint = format!(r#"{{"dependentRealisations":{{}},"id":"{}","outPath":"{}"}}"#, built.id, built.out_base());
    assert!(sigs[1..].iter().any(|s| cache_key.verify(&fingerprint, s.as_str().unwrap())), "{served}");
    assert_eq!(served["id"], built.id.as_str(), "served with Nix's hex id: {served}");
    // Nix's own upload replaces it.
    assert_eq!(client.put(&v1_url).bearer_auth(&admin).json(&body).send().unwrap().status(), StatusCode::OK);
    assert_eq!(client.head(&v1_url).bearer_auth(&pull).send().unwrap().status(), StatusCode::OK);

    // The new layout, keyed by the derivation's path and the output's name; signatures in
    // both forms Nix 2.35 reads.
    let object_sig = serde_json::json!({"keyName": "runner-2", "sig": uploader_sig("x", 9).trim_start_matches("x:")});
    let value = serde_json::json!({"outPath": built.out_base(), "signatures": [text_sig, object_sig]});
    let v2_url = format!("{url}/build-trace-v2/{}/out.doi", built.drv_base());
    let resp = client.put(&v2_url).bearer_auth(&admin).json(&value).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    let served = get_json(&client, &v2_url, &pull);
    assert_eq!(served["outPath"], built.out_base(), "{served}");
    let sigs = served["signatures"].as_array().unwrap();
    assert_eq!(&sigs[..2], &[serde_json::json!(text_sig), object_sig], "the uploader's signatures are kept as sent: {served}");
    let fingerprint = format!(r#"{{"key":{{"drvPath":"{}","outputName":"out"}},"value":{{"outPath":"{}"}}}}"#, built.drv_base(), built.out_base());
    let ours = &sigs[2];
    assert_eq!(ours["keyName"], cache_key.name(), "{served}");
    let text = format!("{}:{}", cache_key.name(), ours["sig"].as_str().unwrap());
    assert!(cache_key.verify(&fingerprint, &text), "the cache's signature does not verify: {served}");
    assert_eq!(served.as_object().unwrap().len(), 2, "only outPath and signatures: {served}");
    assert_eq!(client.head(&v2_url).bearer_auth(&pull).send().unwrap().status(), StatusCode::OK);

    // Entries that were never uploaded are 404s.
    let other_output = format!("{url}/build-trace-v2/{}/dev.doi", built.drv_base());
    assert_eq!(client.get(&other_output).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(client.head(&other_output).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);
    let other_id = format!("{url}/realisations/sha256:{}!out.doi", "0".repeat(64));
    assert_eq!(client.get(&other_id).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);

    // An entry may arrive before its output path (no closure check on upload, as for
    // narinfo), but is served only once the path is there.
    let missing_out = format!("{}-not-pushed", "1".repeat(32));
    let early = serde_json::json!({"outPath": missing_out, "signatures": []});
    assert_eq!(client.put(&other_output).bearer_auth(&admin).json(&early).send().unwrap().status(), StatusCode::OK);
    assert_eq!(client.get(&other_output).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);

    // Once the output path is taken out of the cache, neither layout serves it.
    let resp = client.delete(format!("{url}/{}.narinfo", &built.out_base()[..32])).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(client.get(&v1_url).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(client.get(&v2_url).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);
}

#[test]
fn realisations_over_http_local() {
    realisations_over_http(&Nix::new(), Backend::Local);
}

#[test]
fn realisations_over_http_s3() {
    realisations_over_http(&Nix::new(), Backend::S3);
}

/// Bad names, bodies, sizes and credentials get a 4xx and leave storage as it was.
fn bad_realisations_refused(nix: &Nix, backend: Backend) {
    let server = Server::start(backend);
    let _dump = DumpLog(server.log_path());
    server.create_cache("ci", false);
    let url = format!("{}/ci", server.url);
    let src = nix.store("src");
    let built = build_ca(nix, &src, &common::unique_seed("bad"));
    let push = server.netrc(&server.mint(&["--push", "ci"]));
    push_ca(nix, &src, &url, &push, &built);
    let client = Client::new();
    let admin = server.admin_token();
    let pull = server.mint(&["--pull", "ci"]);
    let v1_url = format!("{url}/realisations/{}.doi", built.id);
    let v2_url = format!("{url}/build-trace-v2/{}/out.doi", built.drv_base());
    let good_v1 = serde_json::json!({"dependentRealisations": {}, "id": built.id, "outPath": built.out_base(), "signatures": []}).to_string();
    let good_v2 = serde_json::json!({"outPath": built.out_base(), "signatures": []}).to_string();
    let before = server.storage_snapshot();

    // Credentials: pulling needs pull, pushing needs push.
    for target in [&v1_url, &v2_url] {
        assert_eq!(client.get(target).send().unwrap().status(), StatusCode::UNAUTHORIZED, "{target}");
        assert_eq!(client.head(target).send().unwrap().status(), StatusCode::UNAUTHORIZED, "{target}");
        let body = if target == &v1_url { &good_v1 } else { &good_v2 };
        assert_eq!(client.put(target).body(body.clone()).send().unwrap().status(), StatusCode::UNAUTHORIZED, "{target}");
        assert_eq!(client.put(target).bearer_auth(&pull).body(body.clone()).send().unwrap().status(), StatusCode::FORBIDDEN, "{target}");
    }
    let other_cache = server.mint(&["--pull", "other", "--push", "other"]);
    assert_eq!(client.put(&v1_url).bearer_auth(&other_cache).body(good_v1.clone()).send().unwrap().status(), StatusCode::UNAUTHORIZED);

    let hex = built.drv_hash_hex();
    let drv = built.drv_base();
    let out = built.out_base();
    let v1 = |name: &str| format!("{url}/realisations/{name}");
    let v2 = |drv: &str, file: &str| format!("{url}/build-trace-v2/{drv}/{file}");
    let with_id = |id: &str| serde_json::json!({"id": id, "outPath": out}).to_string();
    let padded = serde_json::json!({"id": built.id, "outPath": out, "signatures": [], "dependentRealisations": {}})
        .to_string()
        .replace("\"signatures\"", &format!("{}\"signatures\"", " ".repeat(64 * 1024)));
    let bomb = zstd::bulk::compress(padded.as_bytes(), 19).unwrap();
    let bad_sig = serde_json::json!({"id": built.id, "outPath": out, "signatures": ["runner-1:AAAA"]}).to_string();
    let refused: Vec<(&str, String, Option<&str>, Vec<u8>)> = vec![
        // Names.
        ("no .doi", v1(&format!("sha256:{hex}!out")), None, good_v1.clone().into()),
        ("no sha256: prefix", v1(&format!("{hex}!out.doi")), None, good_v1.clone().into()),
        ("no output", v1(&format!("sha256:{hex}.doi")), None, good_v1.clone().into()),
        ("empty output", v1(&format!("sha256:{hex}!.doi")), None, good_v1.clone().into()),
        ("short hash", v1(&format!("sha256:{}!out.doi", &hex[1..])), None, good_v1.clone().into()),
        ("upper-case hex", v1(&format!("sha256:{}!out.doi", hex.to_uppercase())), None, good_v1.clone().into()),
        ("sha1", v1(&format!("sha1:{}!out.doi", &hex[..40])), None, good_v1.clone().into()),
        ("slash in the output", v1(&format!("sha256:{hex}!a%2Fb.doi")), None, good_v1.clone().into()),
        ("dot-dot output", v1(&format!("sha256:{hex}!...doi")), None, good_v1.clone().into()),
        ("not a derivation", v2(&drv[..drv.len() - 4], "out.doi"), None, good_v2.clone().into()),
        ("not a store path", v2("ca-x.drv", "out.doi"), None, good_v2.clone().into()),
        ("v2 without .doi", v2(drv, "out"), None, good_v2.clone().into()),
        ("v2 escape", v2(drv, "..%2F..%2Fx.doi"), None, good_v2.clone().into()),
        // Bodies.
        ("not JSON", v1_url.clone(), None, b"realisation".to_vec()),
        ("truncated JSON", v1_url.clone(), None, good_v1.as_bytes()[..good_v1.len() - 2].to_vec()),
        ("empty object", v1_url.clone(), None, b"{}".to_vec()),
        ("an array", v1_url.clone(), None, b"[]".to_vec()),
        ("unknown field", v1_url.clone(), None, good_v1.replace("\"signatures\"", "\"extra\":1,\"signatures\"").into()),
        ("absolute outPath", v1_url.clone(), None, good_v1.replace(&format!("\"{out}\""), &format!("\"/nix/store/{out}\"")).into()),
        ("outPath not a store path", v1_url.clone(), None, good_v1.replace(&format!("\"{out}\""), "\"hello\"").into()),
        ("bad signature", v1_url.clone(), None, bad_sig.into()),
        ("signature not a string", v1_url.clone(), None, good_v1.replace("\"signatures\":[]", "\"signatures\":[7]").into()),
        ("bad dependency", v1_url.clone(), None, good_v1.replace("\"dependentRealisations\":{}", "\"dependentRealisations\":{\"x\":\"y\"}").into()),
        ("id of another output", v1_url.clone(), None, with_id(&format!("sha256:{hex}!dev")).into()),
        ("id of another derivation", v1_url.clone(), None, with_id(&format!("sha256:{}!out", "0".repeat(64))).into()),
        ("id missing", v1_url.clone(), None, serde_json::json!({"outPath": out}).to_string().into()),
        ("old shape in the new layout", v2_url.clone(), None, good_v1.clone().into()),
        ("v2 absolute outPath", v2_url.clone(), None, good_v2.replace(&format!("\"{out}\""), &format!("\"/nix/store/{out}\"")).into()),
        ("v2 bad signature object", v2_url.clone(), None, good_v2.replace("[]", "[{\"keyName\":\"k\",\"sig\":\"AAAA\"}]").into()),
        // Sizes and encodings.
        ("past the size limit", v1_url.clone(), None, padded.clone().into()),
        ("decompresses past the limit", v1_url.clone(), Some("zstd"), bomb),
        ("unknown encoding", v1_url.clone(), Some("gzip"), good_v1.clone().into()),
        ("not zstd", v1_url.clone(), Some("zstd"), good_v1.clone().into()),
    ];
    for (label, target, encoding, body) in refused {
        let mut request = client.put(&target).bearer_auth(&admin).body(body);
        if let Some(encoding) = encoding {
            request = request.header("Content-Encoding", encoding);
        }
        let resp = request.send().unwrap();
        let status = resp.status();
        assert!(status.is_client_error(), "{label}: {status} {}", resp.text().unwrap_or_default());
    }
    assert_eq!(server.storage_snapshot(), before, "a refused realisation changed storage");

    // Reads of names that cannot exist say so.
    assert_eq!(client.get(v1(&format!("{hex}!out.doi"))).bearer_auth(&pull).send().unwrap().status(), StatusCode::BAD_REQUEST);
    assert_eq!(client.get(v2(&drv[..drv.len() - 4], "out.doi")).bearer_auth(&pull).send().unwrap().status(), StatusCode::BAD_REQUEST);
    // What Nix uploaded is still served.
    assert_eq!(get_json(&client, &v1_url, &pull)["outPath"], out);
}

#[test]
fn bad_realisations_refused_local() {
    bad_realisations_refused(&Nix::new(), Backend::Local);
}

#[test]
fn bad_realisations_refused_s3() {
    bad_realisations_refused(&Nix::new(), Backend::S3);
}

/// Realisations live as long as their output path: garbage collection drops those whose path
/// left the cache, in both layouts, and keeps the rest.
fn realisations_follow_their_outputs(nix: &Nix, backend: Backend) {
    // No grace period: what is dead goes in the first collection.
    let server = Server::start_with(backend, "[gc]\ninterval = 0\ngrace-period = 0\n");
    let _dump = DumpLog(server.log_path());
    server.create_cache("ci", false);
    let url = format!("{}/ci", server.url);
    let src = nix.store("src");
    let gone = build_ca(nix, &src, &common::unique_seed("gone"));
    let kept = build_ca(nix, &src, &common::unique_seed("kept"));
    let push = server.netrc(&server.mint(&["--push", "ci"]));
    let client = Client::new();
    let admin = server.admin_token();
    for built in [&gone, &kept] {
        push_ca(nix, &src, &url, &push, built);
        let value = serde_json::json!({"outPath": built.out_base(), "signatures": []});
        let resp = client.put(format!("{url}/build-trace-v2/{}/out.doi", built.drv_base())).bearer_auth(&admin).json(&value).send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let stored = |built: &Built| {
        [
            server.objects.join(format!("caches/ci/realisations/{}/out", built.drv_hash_hex())),
            server.objects.join(format!("caches/ci/build-trace-v2/{}/out", built.drv_base())),
        ]
    };
    for file in stored(&gone).iter().chain(&stored(&kept)) {
        assert!(file.is_file(), "{} is not stored", file.display());
    }

    // Nothing is dead yet.
    let report = server.gc(&[]);
    assert!(report.contains(", 0 realisations"), "{report}");
    let resp = client.delete(format!("{url}/{}.narinfo", &gone.out_base()[..32])).bearer_auth(&admin).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let report = server.gc(&[]);
    assert!(report.contains(", 2 realisations"), "{report}");
    for file in stored(&gone) {
        assert!(!file.exists(), "{} outlived its output path", file.display());
    }
    for file in stored(&kept) {
        assert!(file.is_file(), "{} was deleted with a live output", file.display());
    }
    let pull = server.mint(&["--pull", "ci"]);
    assert_eq!(get_json(&client, &format!("{url}/realisations/{}.doi", kept.id), &pull)["outPath"], kept.out_base());
}


#[test]
fn realisations_follow_their_outputs_local() {
    realisations_follow_their_outputs(&Nix::new(), Backend::Local);
}

#[test]
fn realisations_follow_their_outputs_s3() {
    realisations_follow_their_outputs(&Nix::new(), Backend::S3);
}

/// `nix copy --to` with a push-only token, as a runner pushes its realisations, cannot read
/// `nix-cache-info`, so it PUTs one, with `Expect: 100-continue` as curl sends every upload.
/// The server must take that body before answering: bytes sent after the answer were read as
/// the start of the next request on the connection, and Nix's next narinfo lookup failed with
/// a 400 now and then.
#[test]
fn put_nix_cache_info_takes_its_body() {
    use std::io::{BufRead, BufReader, Read, Write};

    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let _dump = DumpLog(server.log_path());
    let token = server.mint(&["--push", "ci"]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    // Only so that a server that never answers fails the test instead of hanging it.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let body = "StoreDir: /nix/store\n";
    write!(
        writer,
        "PUT /ci/nix-cache-info HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    // Like curl, wait for the server's first answer, then send the body whatever it was.
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    // A server that closed the connection refuses these writes and answers nothing more:
    // the statuses below tell.
    let get = format!("GET /ci/nix-cache-info HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    let _ = writer.write_all(body.as_bytes()).and_then(|()| writer.write_all(get.as_bytes()));
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    let statuses: Vec<&str> = std::iter::once(first.as_str())
        .chain(rest.lines())
        .filter_map(|line| line.strip_prefix("HTTP/1.1 "))
        .map(|status| &status[..3])
        .collect();
    // 100 Continue, the PUT's 200, and the GET's 403 (a push-only token may not read).
    assert_eq!(statuses, ["100", "200", "403"], "{first}{rest}");
}
