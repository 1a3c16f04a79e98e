//! Issue 17, hardening: faults between the server and S3. A fault-injecting proxy
//! (`common/faults.rs`) sits between `flywheel serve` and s3s-fs and adds latency, answers
//! 503 SlowDown and 500, resets connections, cuts response bodies, fails PUTs, or refuses
//! every connection. The server must ride out what retries can fix, never publish a path whose
//! writes did not all succeed, never send a cut NAR that looks whole, and answer an S3 outage
//! with a prompt 503.
//!
//! Faults are drawn from a seeded RNG whose seed each test prints (`FAULT_SEED` replays it).
//! Every wait is on a condition and every request has a generous client timeout: a hang fails.

#[macro_use]
mod common;

use std::io::Read;
use std::time::Duration;

use common::faults::{FaultProxy, Plan};
use common::{hash_part, Nix, Server};
use flywheel_core::api::v1::chunks::PathManifest;
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// The longest any one request may take before the test calls it a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Storage settings for tests that want S3 failures to surface quickly rather than be
/// retried away: one retry, within a second or two.
const FEW_RETRIES: &str = "max-retries = 1\nretry-timeout = 2\nretry-backoff-max-ms = 200\n";

fn client() -> Client {
    Client::builder().timeout(CLIENT_TIMEOUT).build().unwrap()
}

/// A server on s3s-fs behind a fault proxy that passes everything through for now.
fn start(storage_extra: &str) -> (Server, FaultProxy) {
    let mut proxy = None;
    let server = Server::start_s3_via("", storage_extra, &mut |s3: &str| {
        let started = FaultProxy::start(s3);
        let url = started.url.clone();
        proxy = Some(started);
        url
    });
    (server, proxy.expect("the harness started the proxy"))
}

/// A store path published through `upload-path`, and its NAR.
struct Published {
    path: String,
    nar: Vec<u8>,
}

/// A NAR of one file of `size` random bytes (so its chunks are new to the store), and a store
/// path for it.
fn random_nar(size: usize) -> Published {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    std::fs::write(root.join("data"), data).unwrap();
    let mut nar = Vec::new();
    flywheel_core::nar::dump_path(&root, &mut nar).unwrap();
    let hash = flywheel_core::nix::base32::encode(&rand::random::<[u8; 20]>());
    Published { path: format!("/nix/store/{hash}-faults"), nar }
}

/// `PUT /_api/v1/upload-path` of `p`; the answer's status and body.
fn upload(server: &Server, cache: &str, token: &str, p: &Published) -> (StatusCode, String) {
    let info = serde_json::json!({
        "cache": cache, "store_path_hash": hash_part(&p.path), "store_path": p.path, "references": [],
        "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": flywheel_core::nix::Sha256Hash::digest(&p.nar).to_nix_base32(), "nar_size": p.nar.len(),
    });
    let resp = client()
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(token)
        .header("X-Attic-Nar-Info", info.to_string())
        .body(p.nar.clone())
        .send()
        .expect("upload-path got no answer");
    let status = resp.status();
    (status, resp.text().unwrap_or_default())
}

fn narinfo_status(server: &Server, cache: &str, token: &str, path: &str) -> StatusCode {
    client()
        .get(format!("{}/{cache}/{}.narinfo", server.url, hash_part(path)))
        .bearer_auth(token)
        .send()
        .expect("narinfo got no answer within the client timeout")
        .status()
}

/// How a download ended. Anything else (a complete-looking wrong or short body) fails the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Every byte, correct.
    Whole,
    /// An error status with an error body, before any NAR byte.
    ErrorStatus,
    /// The connection closed before a status line: the stream failed right after its start,
    /// before the server's first write.
    NoAnswer,
    /// A 200 whose body broke off, which the client sees (length mismatch, broken chunking).
    CutVisibly,
}

/// An error answer must be a 5xx with the server's JSON error body.
fn assert_error_answer(what: &str, resp: reqwest::blocking::Response) {
    let status = resp.status();
    assert!(status.is_server_error(), "{what}: answered {status} under storage faults");
    let body = resp.text().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: {status} without an error body: {body:?}"));
    assert_eq!(json["code"], status.as_u16(), "{what}: {body}");
}

/// `GET nar/{hash}.nar` of `p`, checked byte for byte.
fn download_nar(server: &Server, cache: &str, token: &str, p: &Published) -> Outcome {
    let what = format!("NAR of {}", p.path);
    let resp = client().get(format!("{}/{cache}/nar/{}.nar", server.url, hash_part(&p.path))).bearer_auth(token).send();
    let Some(resp) = answered(server, &what, resp) else { return Outcome::NoAnswer };
    if resp.status() != StatusCode::OK {
        assert_error_answer(&what, resp);
        return Outcome::ErrorStatus;
    }
    assert_eq!(resp.content_length(), Some(p.nar.len() as u64), "{what}: a 200 must declare the NAR's length");
    let mut resp = resp;
    let mut got = Vec::new();
    match resp.read_to_end(&mut got) {
        Ok(_) => {
            assert_eq!(got.len(), p.nar.len(), "{what}: a complete-looking body of the wrong length");
            assert!(got == p.nar, "{what}: a complete-looking body with the wrong bytes");
            Outcome::Whole
        }
        Err(_) => {
            assert!(got.len() < p.nar.len(), "{what}: an error after every byte arrived");
            Outcome::CutVisibly
        }
    }
}

/// `POST chunks` of every chunk of `p`, each verified as `flywheel`'s client does.
fn download_chunks(server: &Server, cache: &str, token: &str, p: &Published, manifest: &PathManifest) -> Outcome {
    let what = format!("chunks of {}", p.path);
    let chunks = &manifest.manifest.chunks;
    let resp = client()
        .post(format!("{}/_flywheel/v1/{cache}/chunks", server.url))
        .bearer_auth(token)
        .json(&serde_json::json!({ "path": hash_part(&p.path), "chunks": chunks }))
        .send();
    let Some(resp) = answered(server, &what, resp) else { return Outcome::NoAnswer };
    if resp.status() != StatusCode::OK {
        assert_error_answer(&what, resp);
        return Outcome::ErrorStatus;
    }
    let mut resp = resp;
    let mut body = Vec::new();
    let complete = resp.read_to_end(&mut body).is_ok();
    // Whatever arrived must verify, chunk by chunk, in order.
    let mut rest = &body[..];
    let mut rebuilt = Vec::new();
    for chunk in chunks {
        if rest.len() < 8 {
            break;
        }
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        if rest.len() < 8 + len {
            break;
        }
        let data = flywheel_core::chunk::decompress_verified(&rest[8..8 + len], &chunk.hash, chunk.size as usize)
            .unwrap_or_else(|e| panic!("{what}: a chunk that does not verify: {e}"));
        rebuilt.extend_from_slice(&data);
        rest = &rest[8 + len..];
    }
    if complete {
        assert!(rest.is_empty(), "{what}: bytes after the last chunk");
        assert!(rebuilt == p.nar, "{what}: a complete-looking answer that is not the NAR ({} of {} bytes)", rebuilt.len(), p.nar.len());
        Outcome::Whole
    } else {
        assert!(rebuilt.len() < p.nar.len(), "{what}: an error after every chunk arrived");
        Outcome::CutVisibly
    }
}

/// The response, or `None` when the connection closed before its status line. A timeout is
/// a hang and fails the test.
fn answered(
    server: &Server,
    what: &str,
    resp: reqwest::Result<reqwest::blocking::Response>,
) -> Option<reqwest::blocking::Response> {
    match resp {
        Ok(resp) => Some(resp),
        Err(e) if e.is_timeout() => panic!("{what}: no answer within {CLIENT_TIMEOUT:?}\n{}", log_tail(server)),
        Err(_) => None,
    }
}

/// The end of the server's log, for failure messages.
fn log_tail(server: &Server) -> String {
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn manifest_of(server: &Server, cache: &str, token: &str, p: &Published) -> PathManifest {
    let resp = client()
        .get(format!("{}/_flywheel/v1/{cache}/manifest/{}", server.url, hash_part(&p.path)))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().unwrap()
}

/// `flywheel fsck --dry-run` over the server's storage; its report.
fn fsck_dry_run(server: &Server) -> String {
    let out = std::process::Command::new(common::FLYWHEEL)
        .args(["fsck", "--config"])
        .arg(&server.config)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(out.status.success(), "fsck failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Latency, one request in five throttled with 503 SlowDown, some 500s and some connection
/// resets (before and after S3 saw the request): with the default retry settings, `nix copy`
/// both ways and `upload-path` succeed and every NAR hash verifies.
#[test]
fn retries_ride_out_throttling_errors_and_resets() {
    let nix = Nix::new();
    let (server, proxy) = start("");
    let key = server.create_cache("ci", false);
    let token = server.mint(&["--push", "ci", "--pull", "ci"]);
    let netrc = server.netrc(&token);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("faults"), &["big", "single", "tree", "withRefs"]);
    let url = format!("{}/ci", server.url);

    proxy.set_plan(Plan {
        latency: Duration::from_millis(3),
        slowdown: 0.2,
        internal_error: 0.05,
        reset: 0.05,
        ..Plan::default()
    });
    let out = nix.copy_to(&src, &url, &netrc, &paths);
    assert!(out.status.success(), "nix copy --to under faults failed: {}", String::from_utf8_lossy(&out.stderr));
    let published = random_nar(1 << 20);
    let (status, body) = upload(&server, "ci", &token, &published);
    assert_eq!(status, StatusCode::OK, "upload-path under faults: {body}");

    let dst = nix.store("dst");
    let out = nix.copy_from(&dst, &url, &netrc, &key, &paths);
    assert!(out.status.success(), "nix copy --from under faults failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in &paths {
        assert!(nix.verify(&dst, path), "{path} does not verify after substitution");
        assert_eq!(nix.path_info(&src, path).nar_hash, nix.path_info(&dst, path).nar_hash);
    }
    assert_eq!(download_nar(&server, "ci", &token, &published), Outcome::Whole);

    let counts = proxy.counts();
    eprintln!("faults injected: {counts:?}");
    assert!(counts.slowdowns > 0 && counts.internal_errors > 0 && counts.resets > 0, "too few faults: {counts:?}");
}

/// Resets and cut bodies on S3 GETs, with a single retry so that many reads fail for good:
/// every NAR download and chunk batch is either bit for bit right or fails visibly, and once
/// the faults stop the server serves everything whole.
#[test]
fn cut_storage_reads_never_make_a_whole_looking_download() {
    let (server, proxy) = start(FEW_RETRIES);
    server.create_cache("ci", false);
    let token = server.mint(&["--push", "ci", "--pull", "ci"]);
    // A NAR of about 50 chunks and one of a single chunk.
    let nars = [random_nar(3 << 20), random_nar(10_000)];
    let mut manifests = Vec::new();
    for p in &nars {
        let (status, body) = upload(&server, "ci", &token, p);
        assert_eq!(status, StatusCode::OK, "{body}");
        manifests.push(manifest_of(&server, "ci", &token, p));
    }

    proxy.set_plan(Plan { methods: vec!["GET"], reset: 0.08, partial: 0.12, ..Plan::default() });
    let mut outcomes = std::collections::BTreeMap::<(&str, Outcome), u32>::new();
    for _ in 0..12 {
        for (p, manifest) in nars.iter().zip(&manifests) {
            *outcomes.entry(("nar", download_nar(&server, "ci", &token, p))).or_default() += 1;
            *outcomes.entry(("chunks", download_chunks(&server, "ci", &token, p, manifest))).or_default() += 1;
        }
    }
    let counts = proxy.counts();
    eprintln!("outcomes under faults: {outcomes:?}; faults injected: {counts:?}");
    assert!(counts.resets > 0 && counts.partials > 0, "too few faults: {counts:?}");
    assert!(outcomes.keys().any(|(_, o)| *o != Outcome::Whole), "no fault ever surfaced; the test tests nothing");

    proxy.clear();
    for (p, manifest) in nars.iter().zip(&manifests) {
        assert_eq!(download_nar(&server, "ci", &token, p), Outcome::Whole);
        assert_eq!(download_chunks(&server, "ci", &token, p, manifest), Outcome::Whole);
    }
}

/// S3 PUTs failing from the first or from the K-th on: every upload (`upload-path` and Nix's
/// NAR PUTs) fails with a 5xx error body and publishes nothing; once the faults stop, every
/// published path downloads whole and fsck finds nothing missing.
#[test]
fn failed_writes_never_publish() {
    let nix = Nix::new();
    let (server, proxy) = start(FEW_RETRIES);
    let key = server.create_cache("ci", false);
    let token = server.mint(&["--push", "ci", "--pull", "ci"]);
    let before = random_nar(1 << 20);
    let (status, body) = upload(&server, "ci", &token, &before);
    assert_eq!(status, StatusCode::OK, "{body}");

    // How many PUTs a clean upload of this size makes, so that K reaches its last write.
    let start_puts = proxy.counts().forwarded_puts;
    let probe = random_nar(2 << 20);
    assert_eq!(upload(&server, "ci", &token, &probe).0, StatusCode::OK);
    let puts_per_upload = proxy.counts().forwarded_puts - start_puts;
    eprintln!("a clean upload made {puts_per_upload} PUTs");

    // The first PUT failing, or a later one, or exactly the chunk grants, the manifest or the
    // path record (the upload's last write).
    let mut plans: Vec<Plan> = [0, 1, 10, puts_per_upload / 2]
        .into_iter()
        .map(|k| Plan { fail_puts_after: Some(k), ..Plan::default() })
        .collect();
    for key in ["/caches/ci/chunks/", "/manifests/", "/caches/ci/paths/"] {
        plans.push(Plan { fail_puts_to: vec![key], ..Plan::default() });
    }
    let mut failed = Vec::new();
    for plan in plans {
        let p = random_nar(2 << 20);
        let k = format!("{plan:?}");
        proxy.set_plan(plan);
        let resp = client()
            .put(format!("{}/_api/v1/upload-path", server.url))
            .bearer_auth(&token)
            .header(
                "X-Attic-Nar-Info",
                serde_json::json!({
                    "cache": "ci", "store_path_hash": hash_part(&p.path), "store_path": p.path, "references": [],
                    "system": null, "deriver": null, "sigs": [], "ca": null,
                    "nar_hash": flywheel_core::nix::Sha256Hash::digest(&p.nar).to_nix_base32(), "nar_size": p.nar.len(),
                })
                .to_string(),
            )
            .body(p.nar.clone())
            .send()
            .expect("upload-path got no answer");
        assert_error_answer(&format!("upload-path with PUTs failing ({k})"), resp);
        assert!(proxy.counts().failed_puts > 0);
        proxy.clear();
        assert_eq!(narinfo_status(&server, "ci", &token, &p.path), StatusCode::NOT_FOUND, "published with {k}");
        failed.push(p);
    }

    // Nix's PUTs: every write fails (the NAR PUT fails), the NAR's manifest write fails, or
    // only the narinfo's path record write fails (the NAR is staged, the narinfo PUT fails).
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("faults-put"), &["big", "single", "tree"]);
    let url = format!("{}/ci", server.url);
    let netrc = server.netrc(&token);
    let plans = [
        Plan { fail_puts_after: Some(0), ..Plan::default() },
        Plan { fail_puts_to: vec!["/manifests/"], ..Plan::default() },
        Plan { fail_puts_to: vec!["/paths/"], ..Plan::default() },
    ];
    for (plan, path) in plans.into_iter().zip(&paths) {
        let described = format!("{plan:?}");
        proxy.set_plan(plan);
        let out = nix.copy_to(&src, &url, &netrc, std::slice::from_ref(path));
        assert!(!out.status.success(), "nix copy --to succeeded with S3 PUTs failing ({described})");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("HTTP error 50"), "nix copy did not fail on a 5xx ({described}): {stderr}");
        proxy.clear();
        assert_eq!(narinfo_status(&server, "ci", &token, path), StatusCode::NOT_FOUND, "{path} published ({described})");
    }

    // Once the faults stop: every published path downloads whole, fsck finds nothing missing,
    // and the failed paths can be pushed again.
    for p in [&before, &probe] {
        assert_eq!(download_nar(&server, "ci", &token, p), Outcome::Whole);
    }
    let report = fsck_dry_run(&server);
    assert!(!report.contains("missing") && !report.contains("damaged") && !report.contains("corrupt"), "fsck: {report}");
    assert!(report.contains("checked 2 paths"), "fsck: {report}");
    for p in &failed {
        assert_eq!(upload(&server, "ci", &token, p).0, StatusCode::OK);
        assert_eq!(download_nar(&server, "ci", &token, p), Outcome::Whole);
    }
    let out = nix.copy_to(&src, &url, &netrc, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = nix.copy_from(&nix.store("dst"), &url, &netrc, &key, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// S3 refusing every connection, with the default retry settings: narinfo and NAR requests
/// answer 503 within the client timeout rather than hang, and the server serves again once S3
/// is back.
#[test]
fn storage_outage_is_a_prompt_503_and_recovers() {
    let (server, proxy) = start("");
    server.create_cache("ci", false);
    let token = server.mint(&["--push", "ci", "--pull", "ci"]);
    let p = random_nar(100_000);
    assert_eq!(upload(&server, "ci", &token, &p).0, StatusCode::OK);
    assert_eq!(download_nar(&server, "ci", &token, &p), Outcome::Whole);

    proxy.set_down(true);
    assert!(!proxy.is_listening(), "the proxy still accepts connections");
    let unknown = random_nar(10);
    let asks = [
        format!("{}/ci/{}.narinfo", server.url, hash_part(&p.path)),
        format!("{}/ci/{}.narinfo", server.url, hash_part(&unknown.path)),
        format!("{}/ci/nar/{}.nar", server.url, hash_part(&p.path)),
    ];
    std::thread::scope(|scope| {
        let handles: Vec<_> = asks
            .iter()
            .map(|url| {
                let token = &token;
                scope.spawn(move || {
                    let resp = client().get(url).bearer_auth(token).send();
                    let resp = resp.unwrap_or_else(|e| panic!("{url} got no answer with S3 down: {e}"));
                    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{url} with S3 down");
                    assert_error_answer(url, resp);
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
    });

    proxy.set_down(false);
    // Recovery: bounded polling until the narinfo is served again.
    let recovered = (0..60).any(|_| {
        let ok = narinfo_status(&server, "ci", &token, &p.path) == StatusCode::OK;
        if !ok {
            std::thread::sleep(Duration::from_millis(500));
        }
        ok
    });
    assert!(recovered, "the server did not serve again once S3 was back");
    assert_eq!(download_nar(&server, "ci", &token, &p), Outcome::Whole);
}
