//! The storage conformance suite: one set of scenarios (`conformance/scenarios.rs`), run over
//! every backend the server stores on: in memory, a local directory, and S3 through a real
//! `s3s-fs` on 127.0.0.1. A behaviour the server counts on that one backend lacks fails here,
//! by name, rather than in an end-to-end test much later.
//!
//! Time is a [`ManualClock`]: scenarios move it past grace and retention periods instead of
//! sleeping through them.
//!
//! With `FLYWHEEL_TEST_S3_ENDPOINT` set, the S3 cases run against that server instead, each in
//! a fresh bucket (`scripts/rustfs.sh` runs them on a real RustFS).
//!
//! `s3s-fs` missing fails the S3 cases under `CI=true` (`cargo install s3s-fs --version 0.14.1
//! --features binary`, which `scripts/test.sh` does); elsewhere they say so and pass, so that
//! the crate's own tests run on a machine without it.

#[path = "conformance/scenarios.rs"]
mod scenarios;
#[path = "../../tests/common/external_s3.rs"]
mod external_s3;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_server::clock::ManualClock;
use flywheel_server::storage::Storage;
use object_store::ObjectStore;

/// One backend, fresh, with a manual clock standing at the real time.
pub struct Fixture {
    /// The storage under test.
    pub storage: Storage,
    /// The clock `storage` (and every replica) reads.
    pub clock: Arc<ManualClock>,
    /// The directory of local storage, where crash leftovers can be planted.
    pub local_root: Option<PathBuf>,
    /// Opens another client of the same objects.
    open: Box<dyn Fn() -> Arc<dyn ObjectStore> + Send + Sync>,
    /// Whether storage runs batches of calls on threads of its own, as the server has it
    /// for local and in-memory stores.
    inline: bool,
    /// What must live as long as the fixture: the temporary directory, s3s-fs.
    _keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Fixture {
    fn new(
        open: Box<dyn Fn() -> Arc<dyn ObjectStore> + Send + Sync>,
        local_root: Option<PathBuf>,
        keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
        inline: bool,
    ) -> Self {
        let clock = ManualClock::starting_now();
        let storage = Self::storage(open(), clock.clone(), inline);
        Fixture { storage, clock, local_root, open, inline, _keep: keep }
    }

    /// Storage over `store` as the server makes it (see `AppState::new`).
    fn storage(store: Arc<dyn ObjectStore>, clock: Arc<ManualClock>, inline: bool) -> Storage {
        let storage = Storage::with_clock(store, clock);
        match inline {
            true => storage.with_inline_io(2).expect("starting the storage I/O threads"),
            false => storage,
        }
    }

    /// Another server over the same objects, through a client of its own where the backend
    /// allows one, on the same clock (replicas run on hosts whose clocks agree).
    pub fn replica(&self) -> Storage {
        Self::storage((self.open)(), self.clock.clone(), self.inline)
    }

    fn memory() -> Self {
        // The one store: an in-memory store cannot be reached by a second client.
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        Self::new(Box::new(move || store.clone()), None, Vec::new(), true)
    }

    fn local() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root).expect("creating the storage directory");
        let open_root = root.clone();
        let open = move || -> Arc<dyn ObjectStore> {
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&open_root).expect("opening local storage"))
        };
        Self::new(Box::new(open), Some(root), vec![Box::new(dir)], true)
    }

    /// Over a fresh s3s-fs, or `None` (after saying why) when it is not installed outside CI;
    /// over a fresh bucket of the S3 server `FLYWHEEL_TEST_S3_ENDPOINT` names, when it is set.
    fn s3() -> Option<Self> {
        if let Some(external) = external_s3::ExternalS3::from_env() {
            return Some(Self::new(Box::new(move || Arc::new(external.store())), None, Vec::new(), false));
        }
        let s3s = S3sFs::start()?;
        let endpoint = s3s.endpoint.clone();
        let open = move || -> Arc<dyn ObjectStore> {
            let store = object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&endpoint)
                .with_bucket_name(S3sFs::BUCKET)
                .with_region("us-east-1")
                .with_access_key_id("testkey")
                .with_secret_access_key("testsecret")
                .with_virtual_hosted_style_request(false)
                .with_allow_http(true)
                .build()
                .expect("configuring the S3 client");
            Arc::new(store)
        };
        Some(Self::new(Box::new(open), None, vec![Box::new(s3s)], false))
    }
}

/// A running s3s-fs over a temporary directory, killed on drop.
struct S3sFs {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl S3sFs {
    const BUCKET: &'static str = "flywheel";

    fn start() -> Option<Self> {
        let Some(binary) = find_tool("s3s-fs") else {
            let hint = "`s3s-fs` is not installed: `cargo install s3s-fs --version 0.14.1 --features binary` (or run ./scripts/test.sh)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{hint}");
            }
            eprintln!("NOT RUN: {hint}");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir_all(dir.path().join(Self::BUCKET)).expect("creating the bucket directory");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let log = std::fs::File::create(dir.path().join("s3s.log")).expect("creating the s3s-fs log");
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "testkey", "--secret-key", "testsecret"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting s3s-fs");
        let mut s3s = S3sFs { child, endpoint: format!("http://127.0.0.1:{port}"), _dir: dir };
        s3s.wait_for_port(port);
        Some(s3s)
    }

    fn wait_for_port(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("s3s-fs exited early with {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("s3s-fs did not listen on port {port}");
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let home = std::env::var("HOME").map(|h| format!("{h}/.cargo/bin")).unwrap_or_default();
    let found = path
        .split(':')
        .chain([home.as_str(), "/root/.cargo/bin", "/usr/local/bin", "/usr/bin"])
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file());
    found
}

/// One test per scenario and backend, named `<backend>::<scenario>`.
macro_rules! conformance {
    ($($scenario:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::scenarios::$scenario(&super::Fixture::memory()).await;
                }
            )+
        }
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::scenarios::$scenario(&super::Fixture::local()).await;
                }
            )+
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(fixture) = super::Fixture::s3() {
                        super::scenarios::$scenario(&fixture).await;
                    }
                }
            )+
        }
    };
}

conformance! {
    chunks,
    compaction_packs_cold_chunks,
    compaction_interrupted_loses_nothing,
    compaction_damaged_pack_is_found_and_repaired,
    compaction_rewrites_mostly_dead_packs,
    chunk_batches,
    manifests_and_paths,
    listings,
    cache_files,
    grants,
    gc_sweeps_garbage_only_after_the_grace_period,
    retention_expires_unread_paths,
    reuse_window_makes_old_chunks_written_again,
    staging,
    fsck_finds_and_repairs_damage,
    replicas,
    conditional_writes,
}
