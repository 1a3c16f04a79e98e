//! Per-runner signing keys with real Nix 2.8 and 2.30, on local storage and on S3: a path a runner
//! signed is served with its signature beside the cache's, so Nix trusts it with the runner's
//! key alone; and a cache with `require-uploader-signature` refuses (403) every upload whose
//! path carries no valid signature by one of its trusted uploader keys, through every route
//! that publishes a path (Nix's narinfo PUT, Attic's `upload-path`, flywheel's commit), and
//! stores nothing that would make the cache hold more.
//!
//! Each scenario takes the `Nix` to run, so that it can run against other Nix versions.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{hash_part, Backend, Nix, NixVersion, Server, FLYWHEEL};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus.nix");

/// A runner's key pair, made by Nix.
struct RunnerKey {
    secret: PathBuf,
    public: String,
}

fn runner_key(nix: &Nix, name: &str) -> RunnerKey {
    // A file of its own: two keys may share a name (an impostor, a runner's key made again).
    let secret = nix.dir.path().join(format!("{}.key", common::unique_seed(name)));
    let generated = nix.run(nix.cmd("nix").args(["key", "generate-secret", "--key-name", name]));
    std::fs::write(&secret, generated).unwrap();
    let public = nix.run(nix.cmd("nix").args(["key", "convert-secret-to-public"]).stdin(std::fs::File::open(&secret).unwrap()));
    RunnerKey { secret, public: public.trim().to_string() }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Builds `attr` of the corpus; with `key`, nix-daemon's way of signing a runner's builds
/// (`secret-key-files`) signs every path it builds.
fn build(nix: &Nix, store: &str, tag: &str, attr: &str, key: Option<&RunnerKey>) -> String {
    let mut cmd = nix.cmd("nix-build");
    cmd.args(["--store", store, "--no-out-link", CORPUS, "--argstr", "seed", &common::unique_seed(tag), "-A", attr]);
    if let Some(key) = key {
        cmd.args(["--option", "secret-key-files"]).arg(&key.secret);
    }
    nix.run(&mut cmd).trim().to_string()
}

/// The closure of `path`, dependencies first.
fn closure(nix: &Nix, store: &str, path: &str) -> Vec<String> {
    nix.run(nix.cmd("nix-store").args(["--store", store, "--query", "--requisites", path])).lines().map(str::to_string).collect()
}

/// `nix store sign` with a runner's key.
fn sign(nix: &Nix, store: &str, key: &RunnerKey, paths: &[String]) {
    nix.run(nix.cmd("nix").args(["store", "sign", "--store", store, "--key-file"]).arg(&key.secret).args(paths));
}

/// The signatures the local Nix database holds for `path`.
fn local_sigs(nix: &Nix, store: &str, path: &str) -> Vec<String> {
    nix.path_info_json(store, path)["signatures"].as_array().map(|s| s.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// The `Sig:` lines of the narinfo the server serves for `path`, or `None` when it has none.
fn served_sigs(server: &Server, cache: &str, token: &str, path: &str) -> Option<Vec<String>> {
    let resp = Client::new().get(format!("{}/{cache}/{}.narinfo", server.url, hash_part(path))).bearer_auth(token).send().unwrap();
    if resp.status() == StatusCode::NOT_FOUND {
        return None;
    }
    assert_eq!(resp.status(), StatusCode::OK, "narinfo of {path}");
    Some(resp.text().unwrap().lines().filter_map(|l| l.strip_prefix("Sig: ")).map(str::to_string).collect())
}

/// `flywheel push` of `paths` (with their closure) from `store`.
fn flywheel_push(nix: &Nix, server: &Server, cache: &str, token: &str, store: &str, paths: &[String]) -> Output {
    let token_file = nix.dir.path().join(format!("token-{}", common::unique_seed("t")));
    std::fs::write(&token_file, token).unwrap();
    nix.cmd(FLYWHEEL)
        .args(["push", "--server", &server.url, "--cache", cache, "--token-file"])
        .arg(&token_file)
        .args(["--store", &format!("local?root={store}")])
        .args(paths)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// Creates `cache` through Attic's API with flywheel's uploader settings; returns the cache's
/// public key.
fn create_cache(server: &Server, cache: &str, trusted: &[&str], require: bool) -> String {
    let client = Client::new();
    let admin = server.admin_token();
    let resp = client
        .post(format!("{}/_api/v1/cache-config/{cache}", server.url))
        .bearer_auth(&admin)
        .json(&json!({
            "keypair": "Generate", "is_public": false, "store_dir": "/nix/store", "priority": 40,
            "upstream_cache_key_names": [], "trusted_uploader_keys": trusted, "require_uploader_signature": require,
        }))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "creating {cache}: {}", resp.text().unwrap());
    let config: Value =
        client.get(format!("{}/_api/v1/cache-config/{cache}", server.url)).bearer_auth(&admin).send().unwrap().json().unwrap();
    assert_eq!(config["trusted_uploader_keys"], json!(trusted));
    assert_eq!(config["require_uploader_signature"], json!(require));
    config["public_key"].as_str().unwrap().to_string()
}

/// Attic's `upload-path` of a path of `store` with the given signatures.
fn upload_path(nix: &Nix, server: &Server, token: &str, store: &str, path: &str, sigs: &[String]) -> reqwest::blocking::Response {
    let info = nix.path_info(store, path);
    let upload = json!({
        "cache": "ci",
        "store_path_hash": hash_part(path),
        "store_path": path,
        "references": info.references.iter().map(|r| r.trim_start_matches("/nix/store/")).collect::<Vec<_>>(),
        "system": null,
        "deriver": info.deriver.as_deref().map(|d| d.trim_start_matches("/nix/store/")),
        "sigs": sigs,
        "ca": null,
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
    });
    Client::new()
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(token)
        .header("X-Attic-Nar-Info", upload.to_string())
        .body(nix.dump(store, path))
        .send()
        .unwrap()
}

/// `nix copy --from` the cache into a fresh store, trusting only `trusted`.
fn pull(nix: &Nix, server: &Server, token: &str, trusted: &str, paths: &[String]) -> Output {
    let dst = nix.store(&format!("dst-{}", common::unique_seed("d")));
    let out = nix.copy_from(&dst, &format!("{}/ci", server.url), &server.netrc(token), trusted, paths);
    if out.status.success() {
        for path in paths {
            assert!(nix.verify(&dst, path), "{path} does not verify after the pull");
        }
    }
    out
}

/// Which stored objects a refused upload added or changed, apart from what any upload leaves
/// for garbage collection until a publish counts on it: chunks, manifests, and the marker of
/// a NAR staged by Nix's `PUT nar/` (its narinfo comes after it).
fn what_a_refusal_kept(before: &std::collections::BTreeMap<String, (u64, [u8; 32])>, server: &Server) -> Vec<String> {
    let after = server.storage_snapshot();
    let changed = before.keys().filter(|k| before.get(*k) != after.get(*k)).cloned();
    let added = after.keys().filter(|k| !before.contains_key(*k)).cloned();
    changed
        .chain(added.filter(|k| !(k.starts_with("chunks/") || k.starts_with("manifests/") || k.starts_with("caches/ci/pending/"))))
        .collect()
}

/// Without `require-uploader-signature`, uploaders' signatures are kept and served beside the
/// cache's own: paths signed by a runner (as nix-daemon signs its builds with
/// `secret-key-files`, and with `nix store sign`), pushed with `nix copy --to` and with
/// `flywheel push`, are trusted by real Nix with the runner's public key alone.
fn runner_signatures_are_served_and_trusted(nix: &Nix, backend: Backend) {
    let server = Server::start(backend);
    let cache_key = server.create_cache("ci", false);
    let cache_key_name = cache_key.split(':').next().unwrap().to_string();
    let runner = runner_key(nix, "runner-a-1");
    let src = nix.store("src");
    let token = server.mint(&["--pull", "ci", "--push", "ci"]);

    // Built by a runner that signs its builds: the whole closure carries its signature.
    let built_signed = build(nix, &src, "signed-build", "withRefs", Some(&runner));
    let by_copy = closure(nix, &src, &built_signed);
    // Built unsigned, then signed with `nix store sign`.
    let signed_later = build(nix, &src, "signed-later", "withRefs", None);
    let by_push = closure(nix, &src, &signed_later);
    assert!(by_push.iter().all(|p| local_sigs(nix, &src, p).is_empty()), "built without a key, yet signed");
    sign(nix, &src, &runner, &by_push);
    for path in by_copy.iter().chain(&by_push) {
        let sigs = local_sigs(nix, &src, path);
        assert!(sigs.iter().any(|s| s.starts_with("runner-a-1:")), "{path} is not signed by the runner: {sigs:?}");
    }

    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &server.netrc(&token), std::slice::from_ref(&built_signed));
    assert!(out.status.success(), "nix copy --to: {}", stderr(&out));
    let out = flywheel_push(nix, &server, "ci", &token, &src, std::slice::from_ref(&signed_later));
    assert!(out.status.success(), "flywheel push: {}", stderr(&out));

    let all: Vec<String> = by_copy.iter().chain(&by_push).cloned().collect();
    for path in &all {
        let served = served_sigs(&server, "ci", &token, path).unwrap_or_else(|| panic!("{path} is not served"));
        for sig in local_sigs(nix, &src, path) {
            assert!(served.contains(&sig), "{path}: the runner's signature {sig} is not served: {served:?}");
        }
        assert!(served.iter().any(|s| s.starts_with(&format!("{cache_key_name}:"))), "{path}: no signature of the cache: {served:?}");
    }

    // The runner's key alone is enough for Nix; a key that signed nothing is not.
    let out = pull(nix, &server, &token, &runner.public, &all);
    assert!(out.status.success(), "nix copy --from trusting only the runner's key: {}", stderr(&out));
    let stranger = runner_key(nix, "stranger-1");
    let out = pull(nix, &server, &token, &stranger.public, &all[..1]);
    assert!(!out.status.success(), "a path was trusted without a trusted signature");
    assert!(nix.version.refused_unsigned(&stderr(&out)), "{}", stderr(&out));
}

/// With `require-uploader-signature` and the runner's key listed, an unsigned path, a path
/// signed by a key the cache does not list, one whose signature bears the listed name but does
/// not verify, and one carrying a valid signature of another path are all refused with 403,
/// by every route that publishes, and the cache holds nothing more (no path, no chunk grant,
/// no uploaded NAR name). A path the runner signed is accepted by each route.
fn uploads_without_a_trusted_signature_are_refused(nix: &Nix, backend: Backend) {
    let server = Server::start(backend);
    let runner = runner_key(nix, "runner-a-1");
    create_cache(&server, "ci", &[&runner.public], true);
    let token = server.mint(&["--pull", "ci", "--push", "ci"]);
    let push_only = server.mint(&["--push", "ci"]);
    let netrc = server.netrc(&token);
    let url = format!("{}/ci", server.url);
    let src = nix.store("src");
    let unlisted = runner_key(nix, "runner-x-1");
    // A key under the listed name that is not the listed key: its signatures bear the name
    // and do not verify.
    let impostor = runner_key(nix, "runner-a-1");
    assert_ne!(impostor.public, runner.public);

    // Something stored that the refusals must leave alone.
    let first = build(nix, &src, "first", "single", Some(&runner));
    let out = nix.copy_to(&src, &url, &netrc, std::slice::from_ref(&first));
    assert!(out.status.success(), "a signed nix copy --to was refused: {}", stderr(&out));

    // Nix's PUT nar/ then PUT narinfo, refused at the narinfo.
    let refused_by_nix = |path: &str, why: &str| {
        let before = server.storage_snapshot();
        let out = nix.copy_to(&src, &url, &netrc, &[path.to_string()]);
        assert!(!out.status.success(), "{why}: nix copy --to was accepted");
        assert!(stderr(&out).contains("403"), "{why}: {}", stderr(&out));
        assert_eq!(served_sigs(&server, "ci", &token, path), None, "{why}: published");
        let kept = what_a_refusal_kept(&before, &server);
        assert!(kept.is_empty(), "{why}: a refused nix copy changed the cache: {kept:?}");
    };
    let unsigned = build(nix, &src, "unsigned", "single", None);
    refused_by_nix(&unsigned, "unsigned");
    let by_unlisted = build(nix, &src, "unlisted", "single", Some(&unlisted));
    refused_by_nix(&by_unlisted, "signed by an unlisted key");
    let by_impostor = build(nix, &src, "impostor", "single", Some(&impostor));
    refused_by_nix(&by_impostor, "signed under the listed name by another key");

    // Attic's upload-path, refused before its NAR is read: storage is exactly as it was.
    let runner_sig_of = |path: &str| local_sigs(nix, &src, path).into_iter().find(|s| s.starts_with("runner-a-1:")).unwrap();
    let replayed = runner_sig_of(&first);
    let upload_cases: [(&str, &str, Vec<String>, &str); 5] = [
        ("no signature", &unsigned, vec![], "it carries no signature"),
        ("unlisted key", &by_unlisted, local_sigs(nix, &src, &by_unlisted), "runner-x-1 (not a trusted uploader key)"),
        ("listed name, other key", &by_impostor, local_sigs(nix, &src, &by_impostor), "runner-a-1 (does not verify)"),
        ("signature of another path", &unsigned, vec![replayed], "runner-a-1 (does not verify)"),
        ("malformed bytes", &unsigned, vec!["runner-a-1:AAAA".to_string()], "runner-a-1 (does not verify)"),
    ];
    for (why, path, sigs, reason) in upload_cases {
        let before = server.storage_snapshot();
        let resp = upload_path(nix, &server, &token, &src, path, &sigs);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{why}");
        let body: Value = resp.json().unwrap();
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("trusted uploader keys (runner-a-1)") && message.contains(reason), "{why}: {body}");
        assert_eq!(body["error"], "AccessError", "{why}");
        assert_eq!(server.storage_snapshot(), before, "{why}: a refused upload-path changed storage");
    }

    // flywheel push: with pull, it reads the cache's rule and refuses before uploading
    // anything.
    let before = server.storage_snapshot();
    let out = flywheel_push(nix, &server, "ci", &token, &src, std::slice::from_ref(&unsigned));
    assert!(!out.status.success(), "flywheel push of an unsigned path succeeded");
    assert!(stderr(&out).contains("it carries no signature") && stderr(&out).contains("nothing was pushed"), "{}", stderr(&out));
    assert_eq!(server.storage_snapshot(), before, "a refused flywheel push changed storage");
    // Without pull it cannot read the rule: the server refuses the commit, which publishes
    // nothing (the chunks it uploaded before are the pusher's, granted like any chunk upload).
    let out = flywheel_push(nix, &server, "ci", &push_only, &src, std::slice::from_ref(&by_unlisted));
    assert!(!out.status.success(), "flywheel push of a path signed by an unlisted key succeeded");
    assert!(stderr(&out).contains("403") && stderr(&out).contains("runner-x-1 (not a trusted uploader key)"), "{}", stderr(&out));
    assert_eq!(served_sigs(&server, "ci", &token, &by_unlisted), None);
    let kept: Vec<String> = what_a_refusal_kept(&before, &server).into_iter().filter(|k| !k.starts_with("caches/ci/chunks/")).collect();
    assert!(kept.is_empty(), "a refused commit changed the cache: {kept:?}");

    // Signed by the runner: accepted by every route, served with the runner's signature, and
    // pulled by Nix trusting that key alone.
    let mut accepted = vec![first.clone()];
    let signed = build(nix, &src, "signed-copy", "withRefs", Some(&runner));
    let out = nix.copy_to(&src, &url, &netrc, std::slice::from_ref(&signed));
    assert!(out.status.success(), "nix copy --to of a signed closure: {}", stderr(&out));
    accepted.extend(closure(nix, &src, &signed));
    sign(nix, &src, &runner, std::slice::from_ref(&unsigned));
    let resp = upload_path(nix, &server, &token, &src, &unsigned, &local_sigs(nix, &src, &unsigned));
    assert_eq!(resp.status(), StatusCode::OK, "upload-path of a signed path: {}", resp.text().unwrap());
    accepted.push(unsigned.clone());
    let pushed = build(nix, &src, "signed-push", "withRefs", Some(&runner));
    let out = flywheel_push(nix, &server, "ci", &token, &src, std::slice::from_ref(&pushed));
    assert!(out.status.success(), "flywheel push of a signed closure: {}", stderr(&out));
    accepted.extend(closure(nix, &src, &pushed));
    for path in &accepted {
        let served = served_sigs(&server, "ci", &token, path).unwrap_or_else(|| panic!("{path} was not published"));
        assert!(served.contains(&runner_sig_of(path)), "{path}: {served:?}");
    }
    let out = pull(nix, &server, &token, &runner.public, &accepted);
    assert!(out.status.success(), "nix copy --from trusting only the runner's key: {}", stderr(&out));

    // The chunks of a NAR Nix PUT are the cache's once its signed narinfo was accepted.
    let client = Client::new();
    let manifest: Value = client
        .get(format!("{}/_flywheel/v1/ci/manifest/{}", server.url, hash_part(&signed)))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let chunks: Vec<&str> = manifest["manifest"]["chunks"].as_array().unwrap().iter().map(|c| c["hash"].as_str().unwrap()).collect();
    let missing: Value = client
        .post(format!("{}/_flywheel/v1/ci/missing-chunks", server.url))
        .bearer_auth(&token)
        .json(&json!({ "chunks": chunks }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(missing["chunks"], json!([]), "the cache does not hold the chunks of a path published by a signed narinfo");
}

/// Declared in the config: a cache's trusted uploader keys are rotated by adding the new key,
/// then removing the old one (each a config change and a restart). Through the API, the
/// settings are checked: no flag without a key, no malformed key.
fn keys_rotate_through_the_config(nix: &Nix, backend: Backend) {
    let (old, new) = (runner_key(nix, "runner-a-1"), runner_key(nix, "runner-a-2"));
    let cache_secret = nix.dir.path().join("ci.key");
    let generated = nix.run(nix.cmd("nix").args(["key", "generate-secret", "--key-name", "ci-1"]));
    std::fs::write(&cache_secret, generated).unwrap();
    let declared = |keys: &[&str]| {
        format!(
            "[caches.ci]\nsigning-key-file = \"{}\"\ntrusted-uploader-keys = {}\nrequire-uploader-signature = true\n",
            cache_secret.display(),
            serde_json::to_string(keys).unwrap()
        )
    };
    let mut server = Server::start_with(backend, &declared(&[&old.public]));
    let config_text = std::fs::read_to_string(&server.config).unwrap();
    let token = server.mint(&["--pull", "ci", "--push", "ci"]);
    let src = nix.store("src");
    let upload = |server: &Server, key: &RunnerKey, tag: &str| {
        let path = build(nix, &src, tag, "single", Some(key));
        upload_path(nix, server, &token, &src, &path, &local_sigs(nix, &src, &path)).status()
    };
    assert_eq!(upload(&server, &old, "old-1"), StatusCode::OK);
    assert_eq!(upload(&server, &new, "new-1"), StatusCode::FORBIDDEN);

    // Add the new key: both are accepted while runners move over.
    let rotate = |server: &mut Server, keys: &[&str]| {
        std::fs::write(&server.config, config_text.replace(&declared(&[&old.public]), &declared(keys))).unwrap();
        server.restart();
    };
    rotate(&mut server, &[&old.public, &new.public]);
    assert_eq!(upload(&server, &old, "old-2"), StatusCode::OK);
    assert_eq!(upload(&server, &new, "new-2"), StatusCode::OK);
    // Then remove the old one.
    rotate(&mut server, &[&new.public]);
    assert_eq!(upload(&server, &old, "old-3"), StatusCode::FORBIDDEN);
    assert_eq!(upload(&server, &new, "new-3"), StatusCode::OK);

    // A config that would refuse everything, or names a malformed key, does not start.
    for (keys, require, message) in [("[]", "true", "needs at least one trusted uploader key"), ("[\"runner-a-1:AAAA\"]", "false", "public key")] {
        let bad = format!(
            "[caches.ci]\nsigning-key-file = \"{}\"\ntrusted-uploader-keys = {keys}\nrequire-uploader-signature = {require}\n",
            cache_secret.display()
        );
        let path = nix.dir.path().join("bad.toml");
        std::fs::write(&path, config_text.replace(&declared(&[&old.public]), &bad)).unwrap();
        let out = std::process::Command::new(FLYWHEEL).args(["serve", "--check-config", "--config"]).arg(&path).output().unwrap();
        assert!(!out.status.success(), "{bad} passed the check");
        assert!(stderr(&out).contains(message), "{}", stderr(&out));
    }

    // The API checks the same, and a PATCH may rotate a cache made through it.
    create_cache(&server, "api", &[], false);
    let admin = server.admin_token();
    let patch = |body: Value| {
        Client::new().patch(format!("{}/_api/v1/cache-config/api", server.url)).bearer_auth(&admin).json(&body).send().unwrap()
    };
    assert_eq!(patch(json!({ "require_uploader_signature": true })).status(), StatusCode::BAD_REQUEST);
    assert_eq!(patch(json!({ "trusted_uploader_keys": ["not a key"] })).status(), StatusCode::BAD_REQUEST);
    assert_eq!(patch(json!({ "trusted_uploader_keys": [&old.public], "require_uploader_signature": true })).status(), StatusCode::OK);
    assert_eq!(patch(json!({ "trusted_uploader_keys": [] })).status(), StatusCode::BAD_REQUEST, "emptied the keys of a cache that requires them");
    let config: Value = Client::new().get(format!("{}/_api/v1/cache-config/api", server.url)).bearer_auth(&admin).send().unwrap().json().unwrap();
    assert_eq!((&config["trusted_uploader_keys"], &config["require_uploader_signature"]), (&json!([&old.public]), &json!(true)));
}

nix_matrix! {
    runner_signatures_are_served_and_trusted_local => |version| runner_signatures_are_served_and_trusted(&Nix::of(version), Backend::Local);
}

nix_matrix! {
    runner_signatures_are_served_and_trusted_s3 => |version| runner_signatures_are_served_and_trusted(&Nix::of(version), Backend::S3);
}

nix_matrix! {
    uploads_without_a_trusted_signature_are_refused_local => |version| uploads_without_a_trusted_signature_are_refused(&Nix::of(version), Backend::Local);
}

nix_matrix! {
    uploads_without_a_trusted_signature_are_refused_s3 => |version| uploads_without_a_trusted_signature_are_refused(&Nix::of(version), Backend::S3);
}

nix_matrix! {
    keys_rotate_through_the_config_local => |version| keys_rotate_through_the_config(&Nix::of(version), Backend::Local);
}
