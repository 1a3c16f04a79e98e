//! Shared harness of the end-to-end tests: real Nix 2.8, the real `flywheel` binary, and
//! `s3s-fs` as the S3 server, all on 127.0.0.1. A missing prerequisite fails the test: nothing
//! here skips.
//!
//! With `FLYWHEEL_TEST_S3_ENDPOINT` set (and `FLYWHEEL_TEST_S3_ACCESS_KEY`, `_SECRET_KEY`,
//! `_BUCKET`), S3-backed servers use that S3 server instead of starting s3s-fs:
//! `scripts/rustfs.sh` runs the S3 tests against a real RustFS that way. See [`ExternalS3`].
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest;

pub mod bazel;
pub mod faults;
pub mod load;
#[path = "external_s3.rs"]
mod external_s3;

/// The Prometheus text a `/metrics` endpoint answers.
pub fn fetch_metrics(url: &str) -> String {
    let response = reqwest::blocking::get(url).unwrap();
    assert!(response.status().is_success(), "{url}: {}", response.status());
    response.text().unwrap()
}

/// The value of one Prometheus series in `text` (the whole `name{labels}` as written).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(name, _)| *name == series).map(|(_, v)| v.parse::<f64>().unwrap()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

pub const FLYWHEEL: &str = env!("CARGO_BIN_EXE_flywheel");

/// The path of a tool the tests need, or a failure that says how to get it.
pub fn require_tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/local/bin", "/root/.cargo/bin"]) {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not installed; run `./scripts/test.sh`, which installs what the tests need");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port}");
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The seed of a test's random choices: `FLYWHEEL_TEST_SEED` when set (to replay a failure),
/// else a fresh one. Printed either way, so that a failing run names the seed that replays it.
pub fn test_seed(what: &str) -> u64 {
    let seed = match std::env::var("FLYWHEEL_TEST_SEED") {
        Ok(seed) => seed.trim().parse().unwrap_or_else(|_| panic!("FLYWHEEL_TEST_SEED={seed:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("{what}: seed {seed} (FLYWHEEL_TEST_SEED={seed} replays it)");
    seed
}

/// A unique seed per corpus, so tests never share store paths by accident.
pub fn unique_seed(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{tag}-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// A release of Nix the tests drive as a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NixVersion {
    /// Debian 12's `nix-bin`, in /usr/bin.
    V2_8,
    /// Nix 2.30.5, built from `../shared/third-party/` by `scripts/nix-2.30.sh` into its own
    /// prefix (`$FLYWHEEL_NIX230`, by default /opt/flywheel/nix-2.30.5).
    V2_30,
}

impl NixVersion {
    /// The directory holding this release's programs.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            NixVersion::V2_8 => PathBuf::from("/usr/bin"),
            NixVersion::V2_30 => {
                let prefix = std::env::var("FLYWHEEL_NIX230").unwrap_or_else(|_| "/opt/flywheel/nix-2.30.5".to_string());
                Path::new(&prefix).join("bin")
            }
        }
    }

    /// Whether `stderr` is this release's refusal of a path or realisation that no trusted
    /// key signed: "lacks a valid signature" up to 2.2x, "lacks a signature by a trusted key"
    /// in 2.30.
    pub fn refused_unsigned(self, stderr: &str) -> bool {
        match self {
            NixVersion::V2_8 => stderr.contains("lacks a valid signature"),
            NixVersion::V2_30 => stderr.contains("lacks a signature by a trusted key"),
        }
    }

    /// Whether this release prints `nix path-info --json` as an object keyed by path (2.19 and
    /// later) rather than an array.
    pub fn path_info_keyed_by_path(self) -> bool {
        self == NixVersion::V2_30
    }
}

/// Expands a test body, a function of a [`NixVersion`], into one test per Nix release, named
/// `<name>::nix_2_8` and `<name>::nix_2_30`. Test files bring `NixVersion` into scope.
#[allow(unused_macros)]
macro_rules! nix_matrix {
    ($($(#[$meta:meta])* $name:ident => $body:expr;)+) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn nix_2_8() {
                ($body)(NixVersion::V2_8);
            }
            #[test]
            fn nix_2_30() {
                ($body)(NixVersion::V2_30);
            }
        }
    )+};
}

/// Expands a test body, a function of a [`Backend`], into one test per storage backend, under
/// the two names given (`rustfs.sh` picks the S3 ones by name). Test files bring `Backend` into
/// scope.
#[allow(unused_macros)]
macro_rules! backend_matrix {
    ($($body:path => $local:ident, $s3:ident;)+) => {$(
        #[test]
        fn $local() {
            $body(Backend::Local);
        }
        #[test]
        fn $s3() {
            $body(Backend::S3);
        }
    )+};
}

/// Real Nix, run as root with a store root per test and no shared caches.
pub struct Nix {
    pub dir: tempfile::TempDir,
    pub version: NixVersion,
}

/// Store path metadata as `nix path-info --json` gives it.
#[derive(Debug, Clone)]
pub struct PathInfo {
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub deriver: Option<String>,
}

impl Nix {
    /// Debian's Nix 2.8, for tests where Nix only builds the corpus.
    pub fn new() -> Nix {
        Nix::of(NixVersion::V2_8)
    }

    /// The given release of Nix, failing the test if it is not installed.
    pub fn of(version: NixVersion) -> Nix {
        for program in ["nix", "nix-store", "nix-build", "nix-instantiate"] {
            let path = version.bin_dir().join(program);
            assert!(path.is_file(), "{} is missing: run ./scripts/test.sh, which installs Nix 2.8 and builds Nix 2.30.5", path.display());
        }
        assert!(Path::new("/bin/busybox").is_file(), "/bin/busybox missing: run ./scripts/test.sh (busybox-static)");
        Nix { dir: tempfile::tempdir().unwrap(), version }
    }

    /// A `PATH` that finds this release's programs first, for the `flywheel` commands that run
    /// Nix themselves (push, the post-build hook).
    pub fn path_env(&self) -> String {
        format!("{}:{}", self.version.bin_dir().display(), std::env::var("PATH").unwrap_or_default())
    }

    /// A store root below this test's directory.
    pub fn store(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// A command for a Nix program with the test settings and a fresh cache directory.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.version.bin_dir().join(program));
        let xdg = self.dir.path().join(format!("xdg-{}", COUNTER.fetch_add(1, Ordering::SeqCst)));
        // Only Nix 2.22 and later know the local-overlay store, and 2.8 warns on every unknown
        // setting. Nix 2.30 is built without seccomp (Debian 12's is too old), so it must be
        // told not to filter system calls.
        let version_specific = match self.version {
            NixVersion::V2_8 => "experimental-features = nix-command\n",
            NixVersion::V2_30 => "experimental-features = nix-command local-overlay-store read-only-local-store\nfilter-syscalls = false\n",
        };
        // No default substituter: cache.nixos.org cannot be reached here, and each try costs
        // seconds of retries. Tests that substitute name their substituters.
        let config = format!(
            "{version_specific}substituters =\nsandbox = false\nbuild-users-group =\nnarinfo-cache-negative-ttl = 0\nsandbox-paths = /bin/sh=/bin/busybox /bin/busybox=/bin/busybox\n"
        );
        cmd.env("PATH", self.path_env()).env("NIX_CONFIG", config)
            .env("XDG_CACHE_HOME", xdg)
            .env_remove("NIX_REMOTE");
        cmd
    }

    /// Runs a command, failing the test with its output if it fails.
    pub fn run(&self, cmd: &mut Command) -> String {
        let out = cmd.output().expect("spawning a nix command");
        assert!(
            out.status.success(),
            "{cmd:?} failed with {}:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Builds attributes of tests/corpus.nix in `store`; returns their out paths.
    pub fn build(&self, store: &str, seed: &str, attrs: &[&str]) -> Vec<String> {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus.nix");
        let mut cmd = self.cmd("nix-build");
        cmd.args(["--store", store, "--no-out-link", corpus, "--argstr", "seed", seed]);
        for attr in attrs {
            cmd.args(["-A", attr]);
        }
        let out = self.run(&mut cmd);
        let paths: Vec<String> = out.lines().map(str::to_string).collect();
        assert_eq!(paths.len(), attrs.len(), "nix-build printed {out}");
        paths
    }

    /// The object `nix path-info --json` prints for `path`, whichever shape this release uses.
    pub fn path_info_json(&self, store: &str, path: &str) -> serde_json::Value {
        let out = self.run(self.cmd("nix").args(["path-info", "--json", "--store", store, path]));
        let mut json: serde_json::Value = serde_json::from_str(&out).unwrap();
        if self.version.path_info_keyed_by_path() {
            assert!(json.is_object(), "Nix {:?} printed path-info as {json}", self.version);
            json[path].take()
        } else {
            assert!(json.is_array(), "Nix {:?} printed path-info as {json}", self.version);
            json[0].take()
        }
    }

    pub fn path_info(&self, store: &str, path: &str) -> PathInfo {
        let info = &self.path_info_json(store, path);
        PathInfo {
            path: path.to_string(),
            nar_hash: info["narHash"].as_str().unwrap().to_string(),
            nar_size: info["narSize"].as_u64().unwrap(),
            references: info["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect(),
            deriver: info["deriver"].as_str().map(str::to_string),
        }
    }

    /// The NAR of a path, as `nix-store --dump` writes it.
    pub fn dump(&self, store: &str, path: &str) -> Vec<u8> {
        let physical = format!("{store}{path}");
        let out = self.cmd("nix-store").args(["--dump", &physical]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// `nix copy --to`, with credentials from `netrc`.
    pub fn copy_to(&self, store: &str, url: &str, netrc: &Path, paths: &[String]) -> std::process::Output {
        self.cmd("nix")
            .args(["copy", "--store", store, "--to", url, "--option", "netrc-file"])
            .arg(netrc)
            .args(paths)
            .output()
            .unwrap()
    }

    /// `nix copy --from` into `store`, requiring signatures by `trusted_key`.
    pub fn copy_from(&self, store: &str, url: &str, netrc: &Path, trusted_key: &str, paths: &[String]) -> std::process::Output {
        self.cmd("nix")
            .args(["copy", "--store", store, "--from", url, "--option", "netrc-file"])
            .arg(netrc)
            .args(["--option", "require-sigs", "true", "--option", "trusted-public-keys", trusted_key])
            .args(paths)
            .output()
            .unwrap()
    }

    /// Whether Nix holds `path` as valid in `store`, with contents matching its hash.
    pub fn verify(&self, store: &str, path: &str) -> bool {
        self.cmd("nix-store").args(["--store", store, "--verify-path", path]).status().unwrap().success()
    }
}

/// Which object store the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
}

/// A child process that is killed when dropped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Spawns `command` (whose stdout must be piped) and waits for the `Listening on URL` line
    /// of a `flywheel` server, returning the URL; `log` is read into the panic message when the
    /// process ends before it listens. Its stdout keeps being drained, so that it never blocks
    /// on a full pipe.
    pub fn spawn_listening(command: &mut Command, log: &Path) -> (KillOnDrop, String) {
        let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let child = KillOnDrop(child);
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("Listening on ") {
                        break url.to_string();
                    }
                }
                _ => panic!("{command:?} exited before listening: {}", std::fs::read_to_string(log).unwrap_or_default()),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        (child, url)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub use external_s3::ExternalS3;

/// What the end-to-end tests also do with the external S3 server's objects.
impl ExternalS3 {
    /// Replaces the object `key` with what `edit` makes of its bytes.
    fn rewrite(&self, key: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
        use object_store::ObjectStoreExt;
        let store = self.store();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let key = object_store::path::Path::from(key);
            let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
            store.put(&key, edit(bytes.to_vec()).into()).await.unwrap();
        });
    }

    /// Every object under `prefix`, with its size and (when `hash`) SHA-256: what
    /// `dir_files` reads from s3s-fs's bucket directory, read through S3 instead.
    fn objects(&self, prefix: &str, hash: bool) -> BTreeMap<String, (u64, [u8; 32])> {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let store = self.store();
        // The tests are synchronous; a runtime of their own keeps this callable from anywhere.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let prefix = (!prefix.is_empty()).then(|| object_store::path::Path::from(prefix));
            let metas: Vec<object_store::ObjectMeta> = store.list(prefix.as_ref()).try_collect().await.unwrap();
            let mut out = BTreeMap::new();
            for meta in metas {
                let digest = if hash {
                    let bytes = store.get(&meta.location).await.unwrap().bytes().await.unwrap();
                    sha2::Sha256::digest(&bytes).into()
                } else {
                    [0; 32]
                };
                out.insert(meta.location.to_string(), (meta.size, digest));
            }
            out
        })
    }
}

/// A running `flywheel serve` on 127.0.0.1, with its storage.
pub struct Server {
    child: Option<KillOnDrop>,
    _s3: Option<KillOnDrop>,
    /// The external S3 server and bucket, when `FLYWHEEL_TEST_S3_ENDPOINT` chose one.
    pub external_s3: Option<ExternalS3>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub config: PathBuf,
    /// The directory where stored objects appear as files (the local store, or s3s-fs's bucket).
    /// On an external S3 server it names a directory that does not exist, so that a test
    /// reading files there fails instead of passing on nothing.
    pub objects: PathBuf,
    pub backend: Backend,
}

impl Server {
    pub fn start(backend: Backend) -> Server {
        Self::start_with(backend, "")
    }

    /// Starts a server; `extra` is appended to the top level of its config.
    pub fn start_with(backend: Backend, extra: &str) -> Server {
        Self::start_inner(backend, extra, "", &mut |s3: &str| s3.to_string())
    }

    /// Starts a server on s3s-fs reached through `endpoint(s3s-fs's URL)` (a proxy in
    /// between); `storage_extra` is appended to its `[storage]` table.
    pub fn start_s3_via(extra: &str, storage_extra: &str, endpoint: &mut dyn FnMut(&str) -> String) -> Server {
        Self::start_inner(Backend::S3, extra, storage_extra, endpoint)
    }

    fn start_inner(backend: Backend, extra: &str, storage_extra: &str, endpoint: &mut dyn FnMut(&str) -> String) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, rand::random::<[u8; 32]>());
        let (storage, objects, s3, external_s3) = match backend {
            Backend::Local => {
                let path = dir.path().join("storage");
                (format!("[storage]\ntype = \"local\"\npath = \"{}\"\n", path.display()), path, None, None)
            }
            Backend::S3 => {
                if let Some(s3) = ExternalS3::from_env() {
                    let endpoint = endpoint(&s3.endpoint);
                    let config = format!(
                        "[storage]\ntype = \"s3\"\nbucket = \"{}\"\nendpoint = \"{endpoint}\"\naccess-key-id = \"{}\"\nsecret-access-key = \"{}\"\nallow-http = true\n{storage_extra}",
                        s3.bucket, s3.access_key, s3.secret_key
                    );
                    (config, dir.path().join("objects-are-on-the-external-s3-server"), None, Some(s3))
                } else {
                    let s3s = require_tool("s3s-fs");
                    let root = dir.path().join("s3");
                    std::fs::create_dir_all(root.join("flywheel")).unwrap();
                    let port = free_port();
                    let mut child = Command::new(s3s)
                        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "testkey", "--secret-key", "testsecret"])
                        .arg(&root)
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(dir.path().join("s3s.log")).unwrap())
                        .spawn()
                        .expect("starting s3s-fs");
                    wait_for_port(port, &mut child, "s3s-fs");
                    let endpoint = endpoint(&format!("http://127.0.0.1:{port}"));
                    let config = format!(
                        "[storage]\ntype = \"s3\"\nbucket = \"flywheel\"\nendpoint = \"{endpoint}\"\naccess-key-id = \"testkey\"\nsecret-access-key = \"testsecret\"\nallow-http = true\n{storage_extra}"
                    );
                    (config, root.join("flywheel"), Some(KillOnDrop(child)), None)
                }
            }
        };
        let config = dir.path().join("server.toml");
        std::fs::write(&config, format!("token-hs256-secret-base64 = \"{secret}\"\n{extra}\n{storage}")).unwrap();
        let mut server = Server {
            child: None,
            _s3: s3,
            external_s3,
            url: String::new(),
            config,
            objects,
            backend,
            dir,
        };
        server.launch("127.0.0.1:0");
        server
    }

    fn launch(&mut self, listen: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let (child, url) = KillOnDrop::spawn_listening(
            Command::new(FLYWHEEL)
                .args(["serve", "--config"])
                .arg(&self.config)
                .args(["--listen", listen])
                .env("RUST_LOG", "info,tower_http=warn")
                .stdout(Stdio::piped())
                .stderr(log),
            &self.log_path(),
        );
        self.url = url;
        self.child = Some(child);
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.0.id()).expect("server is running")
    }

    /// Peak resident memory of the server so far, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Runs `flywheel compact` over this server's storage (with `extra` flags), returning its
    /// report.
    pub fn compact(&self, extra: &[&str]) -> String {
        let out = Command::new(FLYWHEEL).args(["compact", "--config"]).arg(&self.config).args(extra).output().unwrap();
        assert!(out.status.success(), "compact failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `flywheel fsck` over this server's storage (with `extra` flags), returning its report.
    pub fn fsck(&self, extra: &[&str]) -> String {
        let out = Command::new(FLYWHEEL).args(["fsck", "--config"]).arg(&self.config).args(extra).output().unwrap();
        assert!(out.status.success(), "fsck failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `flywheel gc` over this server's storage (with `extra` flags), returning its report.
    pub fn gc(&self, extra: &[&str]) -> String {
        let out = Command::new(FLYWHEEL).args(["gc", "--config"]).arg(&self.config).args(extra).output().unwrap();
        assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Stops the server (storage stays).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// A second server process over the same storage and token secret: a replica.
    pub fn replica(&self) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.toml");
        std::fs::copy(&self.config, &config).unwrap();
        let mut replica = Server {
            child: None,
            _s3: None,
            external_s3: self.external_s3.clone(),
            url: String::new(),
            config,
            objects: self.objects.clone(),
            backend: self.backend,
            dir,
        };
        replica.launch("127.0.0.1:0");
        replica
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.stop();
        let listen = self.url.trim_start_matches("http://").to_string();
        self.launch(&listen);
    }

    /// `flywheel token mint` with these permission flags.
    pub fn mint(&self, flags: &[&str]) -> String {
        let out = Command::new(FLYWHEEL)
            .args(["token", "mint", "--config"])
            .arg(&self.config)
            .args(["--sub", "test", "--validity", "1h"])
            .args(flags)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn admin_token(&self) -> String {
        self.mint(&[
            "--pull", "*", "--push", "*", "--delete", "*", "--create-cache", "*", "--configure-cache", "*",
            "--configure-cache-retention", "*", "--destroy-cache", "*",
        ])
    }

    /// Creates a cache through Attic's API; returns its public key.
    pub fn create_cache(&self, name: &str, public: bool) -> String {
        let client = reqwest::blocking::Client::new();
        let token = self.admin_token();
        let resp = client
            .post(format!("{}/_api/v1/cache-config/{name}", self.url))
            .bearer_auth(&token)
            .json(&serde_json::json!({
                "keypair": "Generate", "is_public": public, "store_dir": "/nix/store",
                "priority": 40, "upstream_cache_key_names": []
            }))
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "creating cache: {} {}", resp.status(), resp.text().unwrap());
        let config: serde_json::Value = client
            .get(format!("{}/_api/v1/cache-config/{name}", self.url))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        config["public_key"].as_str().unwrap().to_string()
    }

    /// Sets a cache's retention period, in seconds.
    pub fn set_retention(&self, cache: &str, seconds: u64) {
        let resp = reqwest::blocking::Client::new()
            .patch(format!("{}/_api/v1/cache-config/{cache}", self.url))
            .bearer_auth(self.admin_token())
            .json(&serde_json::json!({"retention_period": {"Period": seconds}}))
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "setting the retention of {cache}: {}", resp.text().unwrap());
    }

    /// A netrc file holding `token` for 127.0.0.1.
    pub fn netrc(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("netrc-{}", COUNTER.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&path, format!("machine 127.0.0.1 password {token}\n")).unwrap();
        path
    }

    /// Bytes of all chunk objects in storage.
    pub fn chunk_bytes(&self) -> u64 {
        self.object_sizes("chunks").values().sum()
    }

    /// The stored objects under `prefix` (a directory of the bucket, like `chunks`), by their
    /// key below it, with their sizes.
    pub fn object_sizes(&self, prefix: &str) -> BTreeMap<String, u64> {
        if let Some(s3) = &self.external_s3 {
            let strip = format!("{prefix}/");
            return s3
                .objects(prefix, false)
                .into_iter()
                .map(|(key, (size, _))| (key.strip_prefix(&strip).unwrap_or(&key).to_string(), size))
                .collect();
        }
        dir_files(&self.objects.join(prefix)).into_iter().map(|(key, (size, _))| (key, size)).collect()
    }

    /// Replaces the stored object `key` (relative to the bucket) with what `edit` makes of its
    /// bytes, in place under the running server.
    pub fn rewrite_object(&self, key: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
        if let Some(s3) = &self.external_s3 {
            return s3.rewrite(key, edit);
        }
        let file = self.objects.join(key);
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("reading stored object {key}: {e}"));
        std::fs::write(&file, edit(bytes)).unwrap();
    }

    /// Makes a published path look `by` older to retention: its publication time and its last
    /// recorded access (if any) move back, as if the test had waited that long without reading
    /// it. Retention counts from those stored times, not from object modification times.
    pub fn age_path(&self, cache: &str, hash_part: &str, by: Duration) {
        let by = by.as_secs();
        self.rewrite_object(&format!("caches/{cache}/paths/{hash_part}.json"), |bytes| {
            let mut record: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let created = record["created_at"].as_u64().expect("a path record has created_at");
            record["created_at"] = serde_json::json!(created.saturating_sub(by));
            serde_json::to_vec(&record).unwrap()
        });
        let access = format!("caches/{cache}/access/{hash_part}");
        if self.object_sizes(&format!("caches/{cache}/access")).contains_key(hash_part) {
            self.rewrite_object(&access, |bytes| {
                let at: u64 = String::from_utf8(bytes).unwrap().trim().parse().expect("an access record holds seconds");
                at.saturating_sub(by).to_string().into_bytes()
            });
        }
    }

    /// Every stored object, with its size and SHA-256. (s3s-fs keeps sidecar files of deleted
    /// objects outside the bucket directory; they are not objects.)
    pub fn storage_snapshot(&self) -> BTreeMap<String, (u64, [u8; 32])> {
        if let Some(s3) = &self.external_s3 {
            return s3.objects("", true);
        }
        dir_files(&self.objects)
    }
}

fn dir_files(root: &Path) -> BTreeMap<String, (u64, [u8; 32])> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
                out.insert(path.strip_prefix(root).unwrap().to_string_lossy().into_owned(), (bytes.len() as u64, digest));
            }
        }
    }
    out
}

/// The hash part of a store path.
pub fn hash_part(path: &str) -> &str {
    &path.trim_start_matches("/nix/store/")[..32]
}

/// A TCP proxy in front of the server. It counts the chunks asked for (one per
/// `GET .../chunk/<hash>` and one per `"hash"` field of `POST .../chunks` bodies), the
/// chunk upload requests (`PUT .../chunk/`, `POST .../upload-chunks`), and every byte the
/// client sends. With `cut_after_puts`, it drops every connection and refuses new ones once
/// that many upload requests went through: the server "goes away" mid-push.
pub struct CountingProxy {
    pub url: String,
    chunk_gets: Arc<AtomicU64>,
    hash_fields: Arc<AtomicU64>,
    puts: Arc<AtomicU64>,
    bytes_up: Arc<AtomicU64>,
    dead: Arc<AtomicBool>,
}

impl CountingProxy {
    pub fn start(target: &str, cache: &str, cut_after_puts: Option<u64>) -> CountingProxy {
        let target = target.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let proxy = CountingProxy {
            url,
            chunk_gets: Arc::default(),
            hash_fields: Arc::default(),
            puts: Arc::default(),
            bytes_up: Arc::default(),
            dead: Arc::default(),
        };
        let get_pattern = format!("GET /_flywheel/v1/{cache}/chunk/").into_bytes();
        let put_pattern = format!("PUT /_flywheel/v1/{cache}/chunk/").into_bytes();
        let batch_pattern = format!("POST /_flywheel/v1/{cache}/upload-chunks").into_bytes();
        let (gets, fields, puts, bytes, dead) =
            (proxy.chunk_gets.clone(), proxy.hash_fields.clone(), proxy.puts.clone(), proxy.bytes_up.clone(), proxy.dead.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if dead.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                // Pieces go on as they come, not after the peer's delayed ACK (Nagle).
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (gets, fields, puts, bytes, dead) = (gets.clone(), fields.clone(), puts.clone(), bytes.clone(), dead.clone());
                let (get_pattern, put_pattern, batch_pattern) = (get_pattern.clone(), put_pattern.clone(), batch_pattern.clone());
                let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (c_kill, s_kill) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut tail: Vec<u8> = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if dead.load(Ordering::SeqCst) {
                            break;
                        }
                        bytes.fetch_add(n as u64, Ordering::SeqCst);
                        let mut scan = std::mem::take(&mut tail);
                        let keep_from = scan.len();
                        scan.extend_from_slice(&buf[..n]);
                        gets.fetch_add(count_new(&scan, &get_pattern, keep_from), Ordering::SeqCst);
                        fields.fetch_add(count_new(&scan, b"\"hash\"", keep_from), Ordering::SeqCst);
                        let new_puts = count_new(&scan, &put_pattern, keep_from) + count_new(&scan, &batch_pattern, keep_from);
                        let total_puts = puts.fetch_add(new_puts, Ordering::SeqCst) + new_puts;
                        tail = scan[scan.len().saturating_sub(64)..].to_vec();
                        if cut_after_puts.is_some_and(|limit| total_puts > limit) {
                            dead.store(true, Ordering::SeqCst);
                            break;
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_kill.shutdown(std::net::Shutdown::Both);
                    let _ = s_kill.shutdown(std::net::Shutdown::Both);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        proxy
    }

    /// Chunks requested so far.
    pub fn chunks_requested(&self) -> u64 {
        self.chunk_gets.load(Ordering::SeqCst) + self.hash_fields.load(Ordering::SeqCst)
    }

    /// Chunk upload requests so far.
    pub fn upload_requests(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }

    /// Bytes the clients sent (requests: headers and bodies).
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(Ordering::SeqCst)
    }

    pub fn reset(&self) {
        for counter in [&self.chunk_gets, &self.hash_fields, &self.puts, &self.bytes_up] {
            counter.store(0, Ordering::SeqCst);
        }
    }
}

fn count_new(hay: &[u8], pattern: &[u8], old_len: usize) -> u64 {
    hay.windows(pattern.len()).enumerate().filter(|(i, w)| *w == pattern && i + pattern.len() > old_len).count() as u64
}

impl Server {
    /// Sends a raw HTTP/1.1 request head (with `Content-Length: announced`), then `body`, and
    /// returns the first bytes of the answer; with `close`, the client then ends its side of the
    /// connection. Reaches what an HTTP client library would not send: a `..` path segment, a
    /// body announced longer than it is.
    #[allow(dead_code)]
    pub fn raw_request(&self, method: &str, path: &str, headers: &[(&str, String)], announced: usize, body: &[u8], close: bool) -> String {
        let addr = self.url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {announced}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        if close {
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut answer = vec![0u8; 4096];
        let n = stream.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    }
}

/// The `upload-chunks` body that stores `pieces` (raw chunk bytes), each as a zstd frame.
#[allow(dead_code)]
pub fn upload_body<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let frames: Vec<_> = pieces
        .into_iter()
        .map(|piece| (flywheel_core::chunk::ChunkHash::of(piece), flywheel_core::chunk::compress(piece, 3).unwrap()))
        .collect();
    let records: Vec<_> = frames.iter().map(|(hash, frame)| (*hash, frame.as_slice())).collect();
    flywheel_core::api::v1::chunk_bodies::encode_upload_records(&records)
}
