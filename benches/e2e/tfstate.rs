//! The OpenTofu/Terraform state backend under 64 stacks at once: lock, write and unlock
//! latency, beside the object store's own operations on the same store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use md5::Digest;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::*;

const STACKS: usize = 64;
const SECS: u64 = 10;

/// Latencies of each step of lock, write, unlock cycles.
#[derive(Default)]
struct Cycles {
    lock: Vec<Duration>,
    write: Vec<Duration>,
    unlock: Vec<Duration>,
    errors: Vec<String>,
}

impl Cycles {
    fn merge(&mut self, other: Cycles) {
        self.lock.extend(other.lock);
        self.write.extend(other.write);
        self.unlock.extend(other.unlock);
        self.errors.extend(other.errors);
    }
}

/// A state like a mid-sized stack's: about 40 KB of Terraform's JSON.
fn sample_state() -> Vec<u8> {
    let resources: Vec<serde_json::Value> = (0..60)
        .map(|i| {
            serde_json::json!({
                "mode": "managed", "type": "terraform_data", "name": format!("r{i}"),
                "provider": "provider[\"terraform.io/builtin/terraform\"]",
                "instances": [{ "schema_version": 0, "attributes": {
                    "id": format!("{:032x}", i * 7919), "input": { "value": "x".repeat(400), "type": "string" },
                    "output": { "value": "x".repeat(100), "type": "string" }, "triggers_replace": null } }]
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "version": 4, "terraform_version": "1.15.5", "serial": 7, "lineage": "bench", "outputs": {}, "resources": resources
    }))
    .unwrap()
}

/// `STACKS` clients, each on its own stack and keep-alive connection, cycling LOCK, POST with
/// the lock's ID and Content-MD5, UNLOCK for `SECS` seconds.
fn http_cycles(base: &str, token: &str, state: &[u8]) -> Cycles {
    let deadline = Instant::now() + Duration::from_secs(SECS);
    let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(state));
    let threads: Vec<_> = (0..STACKS)
        .map(|i| {
            let url = format!("{base}/_state/v1/bench/stack-{i}");
            let token = token.to_string();
            let state = state.to_vec();
            let md5 = md5.clone();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let lock_method = reqwest::Method::from_bytes(b"LOCK").unwrap();
                let unlock_method = reqwest::Method::from_bytes(b"UNLOCK").unwrap();
                let mut cycles = Cycles::default();
                let mut n = 0;
                while Instant::now() < deadline {
                    n += 1;
                    let info = format!(r#"{{"ID":"bench-{i}-{n}","Operation":"OperationTypeApply","Who":"bench"}}"#);
                    let step = |request: reqwest::blocking::RequestBuilder| -> Result<Duration, String> {
                        let started = Instant::now();
                        let resp = request.send().map_err(|e| e.to_string())?;
                        let status = resp.status();
                        let _ = resp.bytes();
                        if !status.is_success() {
                            return Err(format!("status {status}"));
                        }
                        Ok(started.elapsed())
                    };
                    let lock = step(client.request(lock_method.clone(), &url).bearer_auth(&token).body(info.clone()));
                    let write = step(
                        client
                            .post(format!("{url}?ID=bench-{i}-{n}"))
                            .bearer_auth(&token)
                            .header("Content-MD5", &md5)
                            .body(state.clone()),
                    );
                    let unlock = step(client.request(unlock_method.clone(), &url).bearer_auth(&token).body(info));
                    for (result, into) in [(lock, &mut cycles.lock), (write, &mut cycles.write), (unlock, &mut cycles.unlock)] {
                        match result {
                            Ok(latency) => into.push(latency),
                            Err(err) => cycles.errors.push(err),
                        }
                    }
                }
                cycles
            })
        })
        .collect();
    let mut all = Cycles::default();
    for thread in threads {
        all.merge(thread.join().unwrap());
    }
    all
}

/// The same cycles straight on the object store: a conditional create of a lock object, a
/// PUT of the state and a DELETE of the lock, `STACKS` at once.
fn store_cycles(store: Arc<dyn ObjectStore>, state: &[u8]) -> Cycles {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let state = object_store::PutPayload::from(state.to_vec());
    runtime.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(SECS);
        let tasks: Vec<_> = (0..STACKS)
            .map(|i| {
                let store = store.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    let lock = object_store::path::Path::from(format!("bench-reference/{i}/lock"));
                    let current = object_store::path::Path::from(format!("bench-reference/{i}/current"));
                    let mut cycles = Cycles::default();
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
                        match store.put_opts(&lock, PutPayload::from_static(b"{\"ID\":\"x\"}"), options).await {
                            Ok(_) => cycles.lock.push(started.elapsed()),
                            Err(err) => cycles.errors.push(err.to_string()),
                        }
                        let started = Instant::now();
                        match store.put(&current, state.clone()).await {
                            Ok(_) => cycles.write.push(started.elapsed()),
                            Err(err) => cycles.errors.push(err.to_string()),
                        }
                        let started = Instant::now();
                        match store.delete(&lock).await {
                            Ok(()) => cycles.unlock.push(started.elapsed()),
                            Err(err) => cycles.errors.push(err.to_string()),
                        }
                    }
                    cycles
                })
            })
            .collect();
        let mut all = Cycles::default();
        for task in tasks {
            all.merge(task.await.unwrap());
        }
        all
    })
}

/// The object store a test server runs on, opened from its config file as the server does.
fn server_store(server: &Server) -> Arc<dyn ObjectStore> {
    let text = std::fs::read_to_string(&server.config).unwrap();
    let value = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")).and_then(|rest| rest.strip_suffix('"')))
            .unwrap_or_else(|| panic!("no {key} in the server's config"))
            .to_string()
    };
    match server.backend {
        Backend::Local => Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&server.objects).unwrap()),
        Backend::S3 => Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(value("bucket"))
                .with_endpoint(value("endpoint"))
                .with_access_key_id(value("access-key-id"))
                .with_secret_access_key(value("secret-access-key"))
                .with_region("us-east-1")
                .with_allow_http(true)
                .build()
                .unwrap(),
        ),
    }
}

pub(crate) fn tfstate_section(report: &mut Report, _work: &Path) {
    let state = sample_state();
    let mut measured = Vec::new();
    // S3 twice: with conditional creates (what `auto` picks on s3s-fs, and on RustFS and AWS),
    // and with claims, which s3s-fs needs for locks to be exclusive under races (its
    // If-None-Match check is not atomic; no two clients race here, each having its own stack).
    let runs = [(Backend::S3, "conditional"), (Backend::S3, "claims"), (Backend::Local, "conditional")];
    for (backend, locking) in runs {
        let server = Server::start_with(backend, &format!("[tfstate]\nlocking = \"{locking}\"\n"));
        let token = server.mint(&["--state", "bench/*"]);
        let ours = http_cycles(&server.url, &token, &state);
        let reference = store_cycles(server_store(&server), &state);
        measured.push((backend, locking, ours, reference));
    }
    report.section(
        "State backend",
        &format!(
            "{STACKS} clients, each on a stack of its own over one keep-alive connection, cycling LOCK, POST (a {} KB state \
             with its lock ID and Content-MD5) and UNLOCK for {SECS} s against `flywheel serve`, on S3 (s3s-fs; locks by \
             conditional create, then by claims) and on local storage. The reference is the same cycle straight on the same object store \
             from {STACKS} tasks, with no server: a conditional create of a lock object, a PUT of the state, a DELETE. A \
             state write in the server does more than that PUT: it reads the lock and writes a version and the current state \
             at once, and every 7th write of a stack (`keep-versions` 30, divided by 4) lists the versions to prune \
             them; a claims lock writes, lists and reads, and a claims unlock lists, reads and deletes. Clients, server and S3 share the \
             machine's 2 cores.",
            state.len() / 1000
        ),
    );
    let pct = common::load::LoadResult::percentile_ms;
    for (backend, locking, ours, reference) in &measured {
        let name = match backend {
            Backend::S3 => format!("S3, {locking}"),
            Backend::Local => "local".to_string(),
        };
        assert!(ours.errors.is_empty(), "state backend errors on {name}: {:?}", &ours.errors[..ours.errors.len().min(5)]);
        assert!(reference.errors.is_empty(), "object store errors on {name}: {:?}", &reference.errors[..reference.errors.len().min(5)]);
        for (op, a, b) in [("lock", &ours.lock, &reference.lock), ("write", &ours.write, &reference.write), ("unlock", &ours.unlock, &reference.unlock)] {
            for p in [50.0, 99.0] {
                report.row(
                    &format!("{op} latency, {name}, p{p:.0}"),
                    format!("{:.1} ms", pct(a, p)),
                    format!("object store directly: {:.1} ms", pct(b, p)),
                    format!("{:.2}x", pct(a, p) / pct(b, p)),
                    "zero errors",
                );
            }
        }
        report.row(
            &format!("lock-write-unlock cycles, {name}"),
            format!("{:.0}/s", ours.write.len() as f64 / SECS as f64),
            format!("object store directly: {:.0}/s", reference.write.len() as f64 / SECS as f64),
            format!("{:.2}x", ours.write.len() as f64 / reference.write.len().max(1) as f64),
            "",
        );
    }
}
