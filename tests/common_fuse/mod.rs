//! Harness of the FUSE tests: a real server with pushed paths, `flywheel mount` processes, and
//! a counting TCP proxy between mount and server. Missing prerequisites fail, never skip.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
#[macro_use]
pub mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Not every harness uses every helper it re-exports.
#[allow(unused_imports)]
pub use common::{Backend, CountingProxy, Nix, NixVersion, Server, FLYWHEEL};

pub const CACHE: &str = "lazy";

/// Fails the test unless FUSE can be used here.
pub fn require_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: FUSE tests need it");
    common::require_tool("fusermount3");
}

/// A server holding pushed paths, and the store root they were built in.
pub struct Setup {
    pub nix: Nix,
    pub server: Server,
    pub token: String,
    pub token_file: PathBuf,
    pub store_root: String,
}

impl Setup {
    /// A setup whose Nix is Debian's 2.8.
    pub fn new() -> Setup {
        Setup::of(NixVersion::V2_8)
    }

    /// A setup whose Nix is `version`.
    pub fn of(version: NixVersion) -> Setup {
        Setup::on(version, Backend::Local)
    }

    /// A setup whose Nix is `version` and whose server keeps its chunks on `backend`.
    pub fn on(version: NixVersion, backend: Backend) -> Setup {
        require_fuse();
        let nix = Nix::of(version);
        let server = Server::start(backend);
        server.create_cache(CACHE, false);
        let token = server.mint(&["--pull", "*", "--push", "*"]);
        let token_file = server.dir.path().join("token");
        std::fs::write(&token_file, &token).unwrap();
        let store_root = nix.store("build");
        Setup { nix, server, token, token_file, store_root }
    }

    /// Builds attributes of tests/corpus.nix and pushes them (with their closure).
    pub fn push_corpus(&self, attrs: &[&str]) -> Vec<String> {
        let paths = self.nix.build(&self.store_root, &common::unique_seed("fuse"), attrs);
        self.push(&paths);
        paths
    }

    /// Builds attributes of tests/common_fuse/corpus.nix and pushes them.
    pub fn push_fuse_corpus(&self, attrs: &[&str]) -> Vec<String> {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common_fuse/corpus.nix");
        let seed = common::unique_seed("fusec");
        let mut cmd = self.nix.cmd("nix-build");
        cmd.args(["--store", &self.store_root, "--no-out-link", corpus, "--argstr", "seed", &seed]);
        for attr in attrs {
            cmd.args(["-A", attr]);
        }
        let paths: Vec<String> = self.nix.run(&mut cmd).lines().map(str::to_string).collect();
        assert_eq!(paths.len(), attrs.len());
        self.push(&paths);
        paths
    }

    pub fn push(&self, paths: &[String]) {
        let netrc = self.server.netrc(&self.token);
        let out = self.nix.copy_to(&self.store_root, &format!("{}/{CACHE}", self.server.url), &netrc, paths);
        assert!(out.status.success(), "nix copy failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The cache's public key, `name:base64`, as Nix's `trusted-public-keys` lists it.
    pub fn public_key(&self) -> String {
        let config: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}/_api/v1/cache-config/{CACHE}", self.server.url))
            .bearer_auth(self.server.admin_token())
            .send()
            .unwrap()
            .json()
            .unwrap();
        config["public_key"].as_str().unwrap().to_string()
    }

    /// Where a built path's files are on disk, for comparing with the mount.
    pub fn physical(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("{}{path}", self.store_root))
    }

    /// The narinfo's NarHash of a path, from the server.
    pub fn narinfo_hash(&self, path: &str) -> String {
        let text = reqwest::blocking::Client::new()
            .get(format!("{}/{CACHE}/{}.narinfo", self.server.url, common::hash_part(path)))
            .bearer_auth(&self.token)
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines().find_map(|l| l.strip_prefix("NarHash: ")).expect("narinfo has a NarHash").to_string()
    }

    /// Starts `flywheel mount` against `url` (the server or a proxy in front of it).
    pub fn mount(&self, url: &str, cache_dir: &Path, extra: &[&str]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("store");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let log = dir.path().join("mount.log");
        let child = Command::new(FLYWHEEL)
            .args(["mount", "--server", url, "--cache", CACHE, "--token-file"])
            .arg(&self.token_file)
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(extra)
            .arg(&mountpoint)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting flywheel mount");
        let mut mount = Mount { child: Some(child), mountpoint, log, _dir: dir };
        mount.wait_mounted();
        mount
    }
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*path))
}

/// A running `flywheel mount`; dropping it sends SIGTERM and waits.
pub struct Mount {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mount {
    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mountpoint) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("flywheel mount exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "mount did not appear: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The mount daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn path(&self, store_path: &str) -> PathBuf {
        self.mountpoint.join(store_path.trim_start_matches("/nix/store/"))
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
        }
    }

    /// SIGTERM; returns whether the process exited successfully and the mount is gone.
    pub fn terminate(&mut self) -> bool {
        self.signal("-TERM");
        let outcome = match self.child.take() {
            Some(mut child) => match exit_or_describe(&mut child, Duration::from_secs(20)) {
                Ok(status) if status.success() => Ok(()),
                Ok(status) => Err(format!("the mount exited with {status}")),
                Err(threads) => Err(format!("the mount was still running 20 s after SIGTERM; its threads then:\n{threads}")),
            },
            None => Ok(()),
        };
        let outcome = outcome.and_then(|()| match is_mounted(&self.mountpoint) {
            true => Err("the mount exited but its mount point is still mounted".to_string()),
            false => Ok(()),
        });
        if let Err(why) = &outcome {
            // What the mount said is the only account of why it did not exit cleanly.
            eprintln!("{why}\nmount log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        outcome.is_ok()
    }

    /// SIGKILL, then detaches the dead mount.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
    }
}

/// Waits up to `limit` for `child` to exit. If it has not, kills it and describes each of its
/// threads as they were (name, state, where it waits in the kernel, the kernel stack, readable
/// as root) and the processes that see a flywheel mount: what tells a hang in the daemon from
/// one in the kernel or a mount kept alive elsewhere.
fn exit_or_describe(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", child.id())) {
        for task in tasks.flatten() {
            let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
            let state = read("status").lines().find(|l| l.starts_with("State:")).unwrap_or_default().to_string();
            out += &format!("{} {} {state} wchan={}\n{}", task.file_name().to_string_lossy(), read("comm").trim(), read("wchan"), read("stack"));
        }
    }
    // A copy of the mount in another mount namespace keeps the filesystem alive.
    let namespace = |dir: &Path| std::fs::read_link(dir.join("ns/mnt")).ok();
    let ours = namespace(Path::new("/proc/self"));
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if namespace(&proc_dir.path()) == ours {
            continue;
        }
        let mountinfo = std::fs::read_to_string(proc_dir.path().join("mountinfo")).unwrap_or_default();
        let copies: Vec<&str> = mountinfo.lines().filter(|l| l.contains(" flywheel:")).collect();
        if !copies.is_empty() {
            let cmd = std::fs::read_to_string(proc_dir.path().join("cmdline")).unwrap_or_default().replace('\0', " ");
            out += &format!("process {} ({cmd}) in another mount namespace sees flywheel mounts:\n  {}\n", proc_dir.file_name().to_string_lossy(), copies.join("\n  "));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(out)
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex_string(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

pub fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Total size of the files below `dir`. A file that goes while it is walked (a running mount
/// deletes evicted packs) counts for nothing.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() { dir_size(&entry.path()) } else { meta.len() };
    }
    total
}

/// Unmounts (lazily) when dropped, so a failing test leaves no mount behind.
pub struct Unmount(pub std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts an overlayfs of `lower` and `upper` on `target`.
pub fn mount_overlay(lower: &std::path::Path, upper: &std::path::Path, work: &std::path::Path, target: &std::path::Path) -> Unmount {
    for dir in [upper, work, target] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display()))
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "mounting the overlay on {}", target.display());
    Unmount(target.to_path_buf())
}

/// A Nix store (`local?root=...`) whose store directory is a writable overlay over a mount:
/// the lazy mode's runner set-up. Unmounted when dropped.
pub struct OverlayStore {
    /// The store URL to give Nix.
    pub url: String,
    /// The store directory, `<root>/nix/store`.
    pub store_dir: std::path::PathBuf,
    /// The overlay's upper layer: what Nix writes.
    pub upper: std::path::PathBuf,
    // Declared before `_dir`, so that it is unmounted before the directory goes.
    _overlay: Unmount,
    _dir: tempfile::TempDir,
}

impl OverlayStore {
    /// Mounts the overlay over `mountpoint` in a new temporary directory.
    pub fn over(mountpoint: &std::path::Path) -> OverlayStore {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let store_dir = root.join("nix/store");
        let upper = dir.path().join("upper");
        let overlay = mount_overlay(mountpoint, &upper, &dir.path().join("work"), &store_dir);
        OverlayStore { url: format!("local?root={}", root.display()), store_dir, upper, _overlay: overlay, _dir: dir }
    }
}

/// Mounts the lower store directory of a `local-overlay` store on `target`: a read-only
/// overlay of `mount` and a `stub` layer holding an empty `.links`, the directory Nix's local
/// store creates whenever it opens, which the read-only mount cannot hold.
pub fn mount_lower_store(mount: &std::path::Path, stub: &std::path::Path, target: &std::path::Path) -> Unmount {
    std::fs::create_dir_all(stub.join(".links")).unwrap();
    std::fs::create_dir_all(target).unwrap();
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", stub.display(), mount.display()))
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "mounting the lower store directory on {}", target.display());
    Unmount(target.to_path_buf())
}

/// The URL of Nix's `local-overlay` store over `merged`, whose lower store is the read-only
/// local store at `lower` (its URL nested, percent-encoded) and whose upper layer is `upper`.
/// Nix's mount check is off: see `mount_lower_store` and the stacking limit.
pub fn local_overlay_url(lower: &Path, merged: &Path, upper: &Path) -> String {
    let lower_url = format!("local?root={}&read-only=true", lower.display());
    format!(
        "local-overlay://?root={}&lower-store={}&upper-layer={}&check-mount=false",
        merged.display(),
        lower_url.replace('%', "%25").replace('?', "%3F").replace('&', "%26").replace('=', "%3D"),
        upper.display()
    )
}

/// `flywheel dump-db` of `paths`, loaded with `nix-store --load-db` into `store`.
pub fn register_lazily(setup: &Setup, store: &str, paths: &[String]) {
    let dump = Command::new(FLYWHEEL)
        .args(["dump-db", "--server", &setup.server.url, "--cache", CACHE, "--token-file"])
        .arg(&setup.token_file)
        .args(paths)
        .output()
        .unwrap();
    assert!(dump.status.success(), "dump-db: {}", String::from_utf8_lossy(&dump.stderr));
    let text = String::from_utf8(dump.stdout).unwrap();
    assert!(text.lines().filter(|l| l.starts_with("/nix/store/") && l.len() > 44).count() >= paths.len(), "{text}");
    let mut load = setup.nix.cmd("nix-store");
    load.args(["--store", store, "--load-db"]).stdin(std::process::Stdio::piped());
    let mut child = load.spawn().unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    assert!(child.wait().unwrap().success(), "nix-store --load-db into {store}");
}
