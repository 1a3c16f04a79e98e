//! The OpenTofu/Terraform state backend over HTTP, as the clients use it, on local storage and
//! on S3 (`s3s-fs`): the protocol, locks, permissions, limits, versions, and a lock race
//! between two replicas over one store.

#[macro_use]
mod common;

use base64::Engine;
use common::{Backend, Server};
use md5::Digest;
use reqwest::blocking::{Body, Client, Response};
use reqwest::{Method, StatusCode};

const LIMIT: usize = 4096;

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).unwrap()
}

fn md5_b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(bytes))
}

fn lock_info(id: &str) -> String {
    format!(r#"{{"ID":"{id}","Operation":"OperationTypeApply","Info":"","Who":"ci@runner","Version":"1.15.5","Created":"2026-12-03T00:00:00Z","Path":""}}"#)
}

/// A JSON state of exactly `size` bytes.
fn state_of_size(size: usize, marker: &str) -> Vec<u8> {
    let head = format!(r#"{{"version":4,"serial":1,"marker":"{marker}","pad":""#);
    let mut bytes = head.into_bytes();
    bytes.resize(size - 2, b'x');
    bytes.extend_from_slice(b"\"}");
    bytes
}

struct Stack<'a> {
    client: Client,
    url: String,
    token: &'a str,
}

impl Stack<'_> {
    fn send(&self, verb: &str, suffix: &str, body: Option<Vec<u8>>) -> Response {
        let mut request = self.client.request(method(verb), format!("{}{suffix}", self.url));
        if !self.token.is_empty() {
            request = request.basic_auth("tofu", Some(self.token));
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        request.send().unwrap()
    }

    fn write(&self, suffix: &str, state: &[u8]) -> Response {
        let mut request =
            self.client.post(format!("{}{suffix}", self.url)).header("Content-MD5", md5_b64(state)).body(state.to_vec());
        request = request.basic_auth("tofu", Some(self.token));
        request.send().unwrap()
    }

    fn get(&self) -> Response {
        self.send("GET", "", None)
    }
}

fn protocol(backend: Backend) {
    let server = Server::start_with(backend, &format!("[tfstate]\nmax-size = {LIMIT}\nkeep-versions = 3\n"));
    let full = server.mint(&["--state", "infra/*"]);
    let read_only = server.mint(&["--state-read", "infra/prod"]);
    let other = server.mint(&["--state", "apps/a"]);
    let cache_only = server.admin_token();
    let client = Client::new();
    let url = format!("{}/_state/v1/infra/prod", server.url);
    let stack = |token| Stack { client: client.clone(), url: url.clone(), token };
    let owner = stack(&full);

    // No state yet.
    assert_eq!(owner.get().status(), StatusCode::NOT_FOUND);

    // Who may do what: 401 without a token, 403 for a token of another stack, or of caches only.
    assert_eq!(stack("").get().status(), StatusCode::UNAUTHORIZED);
    for token in [&other, &cache_only] {
        let outsider = stack(token);
        assert_eq!(outsider.get().status(), StatusCode::FORBIDDEN);
        assert_eq!(outsider.write("", b"{}").status(), StatusCode::FORBIDDEN);
        assert_eq!(outsider.send("LOCK", "", Some(lock_info("x").into_bytes())).status(), StatusCode::FORBIDDEN);
        assert_eq!(outsider.send("GET", "/versions", None).status(), StatusCode::FORBIDDEN);
    }
    let bad_names = stack(&full);
    for path in ["/_state/v1/infra/..%2Fprod", "/_state/v1/infra/.hidden", "/_state/v1/in%20fra/prod"] {
        let resp = bad_names.client.get(format!("{}{path}", server.url)).basic_auth("t", Some(&full)).send().unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
    }

    // A write, read back whole with its checksum.
    let v1 = state_of_size(200, "secret-marker-v1");
    assert_eq!(owner.write("", &v1).status(), StatusCode::OK);
    let got = owner.get();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.headers()["content-md5"].to_str().unwrap(), md5_b64(&v1));
    assert_eq!(got.bytes().unwrap().as_ref(), &v1[..]);

    // A damaged body, or one that is not JSON, is refused and changes nothing.
    let v2 = state_of_size(300, "v2");
    let damaged = client
        .post(&url)
        .basic_auth("t", Some(&full))
        .header("Content-MD5", md5_b64(&v1))
        .body(v2.clone())
        .send()
        .unwrap();
    assert_eq!(damaged.status(), StatusCode::BAD_REQUEST);
    assert_eq!(owner.write("", b"not json").status(), StatusCode::BAD_REQUEST);
    assert_eq!(owner.get().bytes().unwrap().as_ref(), &v1[..]);

    // The size limit: exactly the limit is taken; one byte more is refused, with a length or
    // sent chunked.
    let at_limit = state_of_size(LIMIT, "at-limit");
    assert_eq!(owner.write("", &at_limit).status(), StatusCode::OK);
    let over = state_of_size(LIMIT + 1, "over");
    assert_eq!(owner.write("", &over).status(), StatusCode::PAYLOAD_TOO_LARGE);
    let chunked = client
        .post(&url)
        .basic_auth("t", Some(&full))
        .body(Body::new(std::io::Cursor::new(over.clone())))
        .send()
        .unwrap();
    assert_eq!(chunked.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(owner.get().bytes().unwrap().as_ref(), &at_limit[..]);

    // Locks: the holder's description comes back with 423 to anyone else.
    assert_eq!(owner.send("LOCK", "", Some(lock_info("A").into_bytes())).status(), StatusCode::OK);
    let refused = owner.send("LOCK", "", Some(lock_info("B").into_bytes()));
    assert_eq!(refused.status(), StatusCode::LOCKED);
    let holder: serde_json::Value = refused.json().unwrap();
    assert_eq!(holder["ID"], "A");
    assert_eq!(holder["Who"], "ci@runner");
    // Writes and deletes while it is held must name it.
    assert_eq!(owner.write("", &v2).status(), StatusCode::LOCKED);
    assert_eq!(owner.write("?ID=B", &v2).status(), StatusCode::LOCKED);
    assert_eq!(owner.send("DELETE", "", None).status(), StatusCode::LOCKED);
    assert_eq!(owner.get().bytes().unwrap().as_ref(), &at_limit[..]);
    assert_eq!(owner.write("?ID=A", &v2).status(), StatusCode::OK);
    assert_eq!(owner.get().bytes().unwrap().as_ref(), &v2[..]);
    // Only the holder unlocks (without forcing).
    assert_eq!(owner.send("UNLOCK", "", Some(lock_info("B").into_bytes())).status(), StatusCode::LOCKED);
    assert_eq!(owner.send("UNLOCK", "", Some(lock_info("A").into_bytes())).status(), StatusCode::OK);
    // A write naming a lock that is no longer held is refused.
    assert_eq!(owner.write("?ID=A", &v1).status(), StatusCode::CONFLICT);

    // The lock address, with the methods GitLab-style configurations use; an empty UNLOCK
    // (what `force-unlock` sends) breaks any holder's lock.
    assert_eq!(owner.send("POST", "/lock", Some(lock_info("C").into_bytes())).status(), StatusCode::OK);
    let shown: serde_json::Value = owner.send("GET", "/lock", None).json().unwrap();
    assert_eq!(shown["ID"], "C");
    assert_eq!(owner.send("PUT", "/lock", Some(lock_info("D").into_bytes())).status(), StatusCode::LOCKED);
    assert_eq!(owner.send("DELETE", "/lock", Some(lock_info("C").into_bytes())).status(), StatusCode::OK);
    assert_eq!(owner.send("LOCK", "", Some(lock_info("E").into_bytes())).status(), StatusCode::OK);
    assert_eq!(owner.send("UNLOCK", "", None).status(), StatusCode::OK);
    assert_eq!(owner.send("GET", "/lock", None).status(), StatusCode::NOT_FOUND);
    assert_eq!(owner.send("LOCK", "", Some(b"{\"no\":\"id\"}".to_vec())).status(), StatusCode::BAD_REQUEST);

    // A read-only token reads, and does nothing else.
    let reader = stack(&read_only);
    assert_eq!(reader.get().bytes().unwrap().as_ref(), &v2[..]);
    assert_eq!(reader.write("", &v1).status(), StatusCode::FORBIDDEN);
    assert_eq!(reader.send("LOCK", "", Some(lock_info("R").into_bytes())).status(), StatusCode::FORBIDDEN);
    assert_eq!(reader.send("DELETE", "", None).status(), StatusCode::FORBIDDEN);

    // Versions: the newest three are kept, and any of them can be made current again.
    let v3 = state_of_size(150, "v3");
    assert_eq!(owner.write("", &v3).status(), StatusCode::OK);
    let listed: serde_json::Value = owner.send("GET", "/versions", None).json().unwrap();
    let versions: Vec<String> =
        listed["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(versions.len(), 3, "{listed}");
    let oldest = owner.send("GET", &format!("/versions/{}", versions[0]), None).bytes().unwrap();
    assert_eq!(oldest.as_ref(), &at_limit[..]);
    assert_eq!(owner.send("GET", "/versions/../current", None).status(), StatusCode::NOT_FOUND);
    assert_eq!(owner.send("GET", "/versions/0000000000000-zzzzzzzz", None).status(), StatusCode::BAD_REQUEST);
    assert_eq!(reader.send("POST", &format!("/rollback/{}", versions[0]), None).status(), StatusCode::FORBIDDEN);
    assert_eq!(owner.send("POST", &format!("/rollback/{}", versions[0]), None).status(), StatusCode::OK);
    assert_eq!(owner.get().bytes().unwrap().as_ref(), &at_limit[..]);

    // Deleting takes the current state away, and leaves the versions to roll back to.
    assert_eq!(owner.send("DELETE", "", None).status(), StatusCode::OK);
    assert_eq!(owner.get().status(), StatusCode::NOT_FOUND);
    let listed: serde_json::Value = owner.send("GET", "/versions", None).json().unwrap();
    assert_eq!(listed["versions"].as_array().unwrap().len(), 3);

    // Other stacks are apart: the token of apps/a has its own.
    let apps = Stack { client: client.clone(), url: format!("{}/_state/v1/apps/a", server.url), token: &other };
    assert_eq!(apps.get().status(), StatusCode::NOT_FOUND);
    assert_eq!(apps.write("", &v1).status(), StatusCode::OK);

    let metrics = common::fetch_metrics(&format!("{}/metrics", server.url));
    // Locks A, C and E; refused: LOCK B, two writes and a delete, UNLOCK B, and PUT lock D.
    assert_eq!(common::metric_value(&metrics, "flywheel_tfstate_locks_total"), 3.0);
    assert_eq!(common::metric_value(&metrics, "flywheel_tfstate_lock_conflicts_total"), 6.0);
    assert_eq!(common::metric_value(&metrics, "flywheel_tfstate_locks_broken_total"), 1.0);
    // States hold secrets: none of their content reaches the log.
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(log.contains("state written"), "the log should show the writes");
    assert!(!log.contains("secret-marker"), "state content in the log");
}

backend_matrix! {
    protocol => protocol_local, protocol_s3;
}

/// Two replicas over one store race for the lock of a fresh stack, again and again: each
/// round has exactly one winner, and the loser is told the winner's ID.
///
/// `s3s-fs` checks `If-None-Match: *` apart from its write (two creates at once can both
/// succeed), so on it the server is told to lock with claims; an external S3 server
/// (`scripts/rustfs.sh`) runs the default, conditional creates.
fn lock_race(backend: Backend) {
    let s3s_fs = backend == Backend::S3 && common::ExternalS3::from_env().is_none();
    let server = Server::start_with(backend, if s3s_fs { "[tfstate]\nlocking = \"claims\"\n" } else { "" });
    let replica = server.replica();
    let token = server.mint(&["--state", "race/*"]);
    let urls = [server.url.clone(), replica.url.clone()];
    for round in 0..20 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(i, base)| {
                let url = format!("{base}/_state/v1/race/stack-{round}");
                let token = token.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let client = Client::new();
                    let request = client.request(method("LOCK"), url).bearer_auth(token).body(lock_info(&format!("racer-{i}")));
                    barrier.wait();
                    let resp = request.send().unwrap();
                    let status = resp.status();
                    (status, resp.text().unwrap())
                })
            })
            .collect();
        let results: Vec<(StatusCode, String)> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let winners: Vec<usize> = (0..2).filter(|&i| results[i].0 == StatusCode::OK).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = &results[1 - winners[0]];
        assert_eq!(loser.0, StatusCode::LOCKED, "round {round}: {results:?}");
        let holder: serde_json::Value = serde_json::from_str(&loser.1).unwrap();
        assert_eq!(holder["ID"], format!("racer-{}", winners[0]), "round {round}");
    }
}

backend_matrix! {
    lock_race => lock_race_between_replicas_local, lock_race_between_replicas_s3;
}

/// The operator's commands work on the storage directly: list, versions, get, rollback, and
/// breaking a stale lock.
#[test]
fn operator_commands() {
    let server = Server::start(Backend::Local);
    let token = server.mint(&["--state", "ops/main"]);
    let client = Client::new();
    let url = format!("{}/_state/v1/ops/main", server.url);
    let stack = Stack { client: client.clone(), url: url.clone(), token: &token };
    let first = state_of_size(100, "first");
    let second = state_of_size(120, "second");
    assert_eq!(stack.write("", &first).status(), StatusCode::OK);
    assert_eq!(stack.write("", &second).status(), StatusCode::OK);
    assert_eq!(stack.send("LOCK", "", Some(lock_info("dead-job").into_bytes())).status(), StatusCode::OK);

    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::FLYWHEEL)
            .arg("state")
            .arg(args[0])
            .arg("--config")
            .arg(&server.config)
            .args(&args[1..])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, listed, _) = run(&["list"]);
    assert!(ok);
    assert_eq!(listed.trim(), "ops/main");
    let (ok, versions, _) = run(&["versions", "ops/main"]);
    assert!(ok);
    let versions: Vec<&str> = versions.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(versions.len(), 2);
    let (ok, got, _) = run(&["get", "ops/main", "--version", versions[0]]);
    assert!(ok);
    assert_eq!(got.as_bytes(), &first[..]);
    // A rollback under a held lock is refused; breaking the lock lets it through.
    let (ok, _, err) = run(&["rollback", "ops/main", versions[0]]);
    assert!(!ok);
    assert!(err.contains("dead-job"), "{err}");
    let (ok, _, _) = run(&["unlock", "ops/main"]);
    assert!(ok);
    assert_eq!(stack.send("GET", "/lock", None).status(), StatusCode::NOT_FOUND);
    let (ok, _, err) = run(&["rollback", "ops/main", versions[0]]);
    assert!(ok, "{err}");
    assert_eq!(stack.get().bytes().unwrap().as_ref(), &first[..]);
    // Garbage collection is for the caches: it leaves states and their versions alone.
    server.gc(&[]);
    assert_eq!(stack.get().bytes().unwrap().as_ref(), &first[..]);
    let (_, after_gc, _) = run(&["versions", "ops/main"]);
    assert_eq!(after_gc.lines().count(), 3);
    let (ok, _, err) = run(&["get", "bad name"]);
    assert!(!ok);
    assert!(err.contains("project/stack"), "{err}");
}
