//! The lazy FUSE store against the real server, real FUSE and real Nix 2.8.

#[macro_use]
mod common_fuse;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common_fuse::{common, dir_size, local_overlay_url, mount_lower_store, mount_overlay, register_lazily, sha256_file, CountingProxy, NixVersion, OverlayStore, Setup};
use flywheel_client::{LocalCacheConfig, ChunkCache};
use flywheel_core::nix::Sha256Hash;

fn nar_hash_of(setup: &Setup, path: &std::path::Path) -> Sha256Hash {
    let out = setup.nix.run(setup.nix.cmd("nix").args(["hash", "path", "--type", "sha256", "--base32"]).arg(path));
    Sha256Hash::parse(&format!("sha256:{}", out.trim())).unwrap()
}

#[test]
fn fuse_nar_hashes_tree_and_executables() {
    let setup = Setup::new();
    let paths = setup.push_corpus(&["single", "tree", "withRefs", "big", "empty"]);
    let busybox = setup.push_fuse_corpus(&["busybox"]).remove(0);
    let cache_dir = tempfile::tempdir().unwrap();
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
    for path in paths.iter().chain([&busybox]) {
        let hash = nar_hash_of(&setup, &mount.path(path));
        assert_eq!(hash, Sha256Hash::parse(&setup.narinfo_hash(path)).unwrap(), "NAR hash of {path} through the mount");
    }
    // The tree is the NAR's: exec bits, symlinks, directories.
    let tree = mount.path(&paths[1]);
    assert_eq!(std::fs::metadata(tree.join("bin/run")).unwrap().permissions().mode() & 0o777, 0o555);
    assert_eq!(std::fs::metadata(tree.join("share/doc/README")).unwrap().permissions().mode() & 0o777, 0o444);
    assert_eq!(std::fs::read_link(tree.join("share/link")).unwrap().to_str(), Some("../bin/run"));
    assert_eq!(std::fs::read_link(tree.join("dangling")).unwrap().to_str(), Some("/nonexistent/target"));
    assert_eq!(std::fs::read_to_string(tree.join("share/doc/README")).unwrap(), "doc\n");
    // The root lists the paths looked up.
    let listed: Vec<String> =
        std::fs::read_dir(&mount.mountpoint).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    for path in &paths {
        assert!(listed.contains(&path.trim_start_matches("/nix/store/").to_string()), "{path} not listed: {listed:?}");
    }
    // Unknown and malformed names do not exist; writes are refused.
    assert!(!mount.mountpoint.join("00000000000000000000000000000000-nope").exists());
    assert!(!mount.mountpoint.join("not-a-store-path").exists());
    assert!(std::fs::write(tree.join("new"), b"x").is_err());
    // A static busybox runs from the mount.
    let out = Command::new(mount.path(&busybox).join("bin/busybox")).args(["echo", "ran from fuse"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran from fuse\n");
    // statfs answers.
    let out = Command::new("stat").args(["-f", "-c", "%b"]).arg(&mount.mountpoint).output().unwrap();
    assert!(out.status.success());
    assert!(mount.terminate(), "SIGTERM must unmount cleanly and exit 0");
}

#[test]
fn fuse_small_read_of_huge_path_fetches_at_most_two_chunks() {
    let setup = Setup::new();
    let huge = setup.push_fuse_corpus(&["huge"]).remove(0);
    let proxy = CountingProxy::start(&setup.server.url, common_fuse::CACHE, None);
    let cache_dir = tempfile::tempdir().unwrap();
    // On-demand reads alone: the background fill would fetch the whole path.
    let mount = setup.mount(&proxy.url, cache_dir.path(), &["--fill-max-nar-size", "0"]);
    let size = std::fs::metadata(setup.physical(&huge).join("data/blob")).unwrap().len();
    assert!(size >= 50 << 20);
    let config = std::fs::read_to_string(mount.path(&huge).join("etc/config")).unwrap();
    assert!(config.starts_with("small config "), "{config}");
    let fetched = proxy.chunks_requested();
    assert!((1..=2).contains(&fetched), "reading a small file fetched {fetched} chunks");
    // Repeat reads never touch the network, even after the page cache is dropped.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read_to_string(mount.path(&huge).join("etc/config")).unwrap(), config);
    assert_eq!(proxy.chunks_requested(), fetched);
}

#[test]
fn fuse_server_down_cached_reads_work_uncached_fail_with_eio() {
    let mut setup = Setup::new();
    let paths = setup.push_corpus(&["tree", "big"]);
    let cache_dir = tempfile::tempdir().unwrap();
    let mount = setup.mount(&setup.server.url, cache_dir.path(), &["--offline-timeout", "3"]);
    let readme = mount.path(&paths[0]).join("share/doc/README");
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), "doc\n");
    // Look the big path up (its manifest is then known) but read none of it.
    let blob = mount.path(&paths[1]).join("blob");
    assert!(std::fs::metadata(&blob).unwrap().len() > 1 << 20);
    setup.server.stop();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), "doc\n", "cached read with the server down");
    let err = std::fs::read(&blob).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "uncached read with the server down: {err}");
    // An unknown path fails instead of hanging.
    assert!(std::fs::metadata(mount.mountpoint.join("0000000000000000000000000000000a-gone")).is_err());
}

/// A reader killed while its read waits for the server: the mount answers that read once the
/// server is back (the kernel drops the answer), serves the next reader correctly, and still
/// unmounts cleanly.
#[test]
fn fuse_interrupted_read_is_answered_and_the_mount_carries_on() {
    let setup = Setup::new();
    let big = setup.push_corpus(&["big"]).remove(0);
    let expected = sha256_file(&setup.physical(&big).join("blob"));
    let cache_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &["--offline-timeout", "30", "--metrics-listen", &metrics]);
    let reads = || common::metric_value(&common::fetch_metrics(&format!("http://{metrics}/metrics")), "flywheel_fuse_reads_total");
    let blob = mount.path(&big).join("blob");
    assert!(std::fs::metadata(&blob).unwrap().len() > 1 << 20);
    assert_eq!(reads(), 0.0, "nothing read the blob yet");
    // Freeze the server: the read below waits on it.
    let pid = setup.server.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let mut reader = std::process::Command::new("cat").arg(&blob).stdout(std::process::Stdio::null()).spawn().unwrap();
    // Until the mount has the READ, which it cannot answer while the server is frozen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while reads() == 0.0 {
        assert!(reader.try_wait().unwrap().is_none(), "the read ended without reaching the mount");
        assert!(std::time::Instant::now() < deadline, "the read never reached the mount");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(reader.try_wait().unwrap().is_none(), "the read did not wait for the frozen server");
    reader.kill().unwrap();
    // A killed reader never waits for the answer (a hang guard, not a timing check).
    let exited = common_fuse::wait_timeout(&mut reader, std::time::Duration::from_secs(60));
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(exited.is_some(), "the killed reader hangs in its read");
    assert_eq!(sha256_file(&blob), expected, "bytes after an interrupted read");
    assert!(mount.terminate(), "the mount did not unmount cleanly after an interrupted read");
}

/// A file read whole is kept on disk and later opens use FUSE passthrough: the kernel reads the
/// copy without asking the mount, and the bytes are right. After a restart, a damaged copy is
/// caught on first open and the file is served through its chunks again.
#[test]
fn fuse_file_read_whole_is_served_by_passthrough_afterwards() {
    let setup = Setup::new();
    let big = setup.push_corpus(&["big"]).remove(0);
    let expected = sha256_file(&setup.physical(&big).join("blob"));
    let cache_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let metric = |name: &str| common::metric_value(&common::fetch_metrics(&format!("http://{addr}/metrics")), name);
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &["--metrics-listen", &addr]);
    let blob = mount.path(&big).join("blob");
    // A handle held open through the page cache from the start.
    let held = std::fs::File::open(&blob).unwrap();
    assert_eq!(sha256_file(&blob), expected);

    // The whole file was served: it is written out in the background.
    let files = cache_dir.path().join("files");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let copy = loop {
        let found = std::fs::read_dir(&files).ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "the file read whole was not materialized");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(sha256_file(&copy), expected, "the materialized copy differs");
    // While a page-cache handle is open, new handles stay in that mode (the kernel refuses to
    // mix the two on one file): the open works, and is not passthrough.
    assert_eq!(sha256_file(&blob), expected, "an open next to a page-cache handle");
    assert_eq!(metric("flywheel_fuse_passthrough_opens_total"), 0.0);
    drop(held);

    // Read again with the page cache dropped: the kernel reads the copy, the mount sees no READ.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let reads = metric("flywheel_fuse_reads_total");
    assert_eq!(sha256_file(&blob), expected, "bytes through passthrough");
    assert_eq!(metric("flywheel_fuse_reads_total"), reads, "reads went through the mount, not passthrough");
    assert!(metric("flywheel_fuse_passthrough_opens_total") >= 1.0);
    assert!(mount.terminate());

    // Damage the copy (same size); a new mount checks it on first open and drops it.
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&copy, &bytes).unwrap();
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &["--metrics-listen", &addr]);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(sha256_file(&mount.path(&big).join("blob")), expected, "a damaged copy was served");
    assert_eq!(metric("flywheel_fuse_passthrough_opens_total"), 0.0, "the damaged copy was handed to the kernel");
    assert!(metric("flywheel_fuse_reads_total") > 0.0);
    assert!(mount.terminate());
}

fn libc_eio() -> i32 {
    5
}

/// Waits until a `kill -9` of the mount would leave the manifest of `hash_part` and every one
/// of its chunks in the cache: a copy of the cache's database taken now (what a crash leaves on
/// disk) opens with all of them indexed. sled writes its log in the background.
fn wait_until_crash_safe(cache_dir: &std::path::Path, hash_part: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let copy = tempfile::tempdir().unwrap();
        copy_database(cache_dir, copy.path());
        let whole = ChunkCache::open(&LocalCacheConfig::new(copy.path(), 10 << 30)).ok().is_some_and(|cache| {
            cache.get_manifest(hash_part).is_some_and(|m| m.manifest.chunks.iter().all(|c| cache.contains(&c.hash)))
        });
        if whole {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the cache's index did not reach the disk within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Copies a cache directory without its chunk packs and whole files, which are plain files
/// outside the database (and many MB).
fn copy_database(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        if name == "packs" || name == "files" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_database(&entry.path(), &target);
        } else {
            // sled may replace a file while this copies; the next round copies it again.
            let _ = std::fs::copy(entry.path(), &target);
        }
    }
}

#[test]
fn fuse_corrupted_entry_is_refetched_and_cache_survives_kill9() {
    let setup = Setup::new();
    let big = setup.push_corpus(&["big"]).remove(0);
    let proxy = CountingProxy::start(&setup.server.url, common_fuse::CACHE, None);
    let cache_dir = tempfile::tempdir().unwrap();
    let expected = sha256_file(&setup.physical(&big).join("blob"));
    // Without whole files on disk: this is about chunks, which passthrough would bypass.
    let mut mount = setup.mount(&proxy.url, cache_dir.path(), &["--files-size", "0"]);
    assert_eq!(sha256_file(&mount.path(&big).join("blob")), expected);
    let first = proxy.chunks_requested();
    assert!(first > 10);
    // sled flushes in the background: crash once everything read is on disk.
    let hash_part = common::hash_part(&big).to_string();
    wait_until_crash_safe(cache_dir.path(), &hash_part);
    mount.kill9();
    let corrupted = {
        let cache = ChunkCache::open(&LocalCacheConfig::new(cache_dir.path(), 10 << 30)).unwrap();
        let manifest = cache.get_manifest(&hash_part).expect("the manifest survived kill -9");
        let victim = manifest.manifest.chunks[manifest.manifest.chunks.len() / 2];
        assert!(cache.contains(&victim.hash), "chunks survived kill -9");
        cache.insert(&victim.hash, b"\x28\xb5\x2f\xfd garbage");
        cache.flush().unwrap();
        victim
    };
    let mut mount = setup.mount(&proxy.url, cache_dir.path(), &["--files-size", "0"]);
    assert_eq!(sha256_file(&mount.path(&big).join("blob")), expected, "bytes after corruption");
    assert_eq!(proxy.chunks_requested() - first, 1, "only the corrupted chunk is fetched again");
    assert!(mount.terminate());
    let cache = ChunkCache::open(&LocalCacheConfig::new(cache_dir.path(), 10 << 30)).unwrap();
    assert!(cache.get(&corrupted).is_some(), "the repaired entry verifies");
}

#[test]
fn fuse_quota_holds_and_concurrent_readers_get_correct_bytes() {
    let setup = Setup::new();
    let big = setup.push_corpus(&["big"]).remove(0);
    let cache_dir = tempfile::tempdir().unwrap();
    let quota: u64 = 2 << 20;
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &["--cache-size", &quota.to_string()]);
    let expected = std::fs::read(setup.physical(&big).join("blob")).unwrap();
    let blob = mount.path(&big).join("blob");
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let blob = blob.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Seek, SeekFrom};
                let mut file = std::fs::File::open(&blob).unwrap();
                // Each reader starts at another place and wraps around.
                let len = file.metadata().unwrap().len();
                let start = len / 8 * i;
                let mut out = vec![0u8; len as usize];
                file.seek(SeekFrom::Start(start)).unwrap();
                file.read_exact(&mut out[start as usize..]).unwrap();
                file.seek(SeekFrom::Start(0)).unwrap();
                file.read_exact(&mut out[..start as usize]).unwrap();
                out
            })
        })
        .collect();
    for reader in readers {
        assert!(reader.join().unwrap() == expected, "a concurrent reader got wrong bytes");
    }
    assert!(expected.len() as u64 > 2 * quota);
    // Measured once the mount is stopped: while it runs, a compaction of its packs may hold
    // the frames it copies over the quota (README, the runner's chunk cache).
    assert!(mount.terminate());
    assert!(dir_size(&cache_dir.path().join("packs")) <= quota, "chunk packs exceed the quota");
    let cache = ChunkCache::open(&LocalCacheConfig::new(cache_dir.path(), quota)).unwrap();
    assert!(cache.used_bytes() <= quota);
    assert!(cache.used_bytes() > quota / 2, "the cache is used");
}

nix_matrix! {
    /// The runner set-up of the README: an overlayfs over the mount, the closure registered
    /// with `nix-store --load-db`, then Nix checks and builds against it.
    fuse_lazy_mode_overlay_dump_db_build => fuse_lazy_mode_overlay_dump_db_build_with;
}

/// Nix sees `root_path` and its references valid in `store`, their contents match their
/// hashes, and a derivation that reads one of them builds; returns what it built.
fn check_lazy_store(nix: &common::Nix, store: &str, root_path: &str, merged: &std::path::Path) -> String {
    let info = nix.path_info(store, root_path);
    assert_eq!(info.references.len(), 2, "{info:?}");
    for path in std::iter::once(root_path).chain(info.references.iter().map(String::as_str)) {
        assert!(nix.verify(store, path), "nix-store --verify-path {path} in {store}");
    }
    let tree = info.references.iter().find(|r| r.contains("-tree-")).unwrap().clone();
    let expr = format!(
        "derivation {{ name = \"reader\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [ \"-c\" \"/bin/busybox cat ${{builtins.storePath \"{tree}\"}}/share/doc/README > $out\" ]; }}"
    );
    let out = nix.run(nix.cmd("nix-build").args(["--store", store, "--no-out-link", "-E", &expr]));
    let built = out.trim().to_string();
    assert_eq!(std::fs::read_to_string(merged.join(built.trim_start_matches("/nix/store/"))).unwrap(), "doc\n");
    built
}

fn fuse_lazy_mode_overlay_dump_db_build_with(version: NixVersion) {
    let setup = Setup::of(version);
    // The closure: withRefs refers to single and tree.
    let paths = setup.push_corpus(&["withRefs"]);
    let cache_dir = tempfile::tempdir().unwrap();
    let mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
    let overlay = OverlayStore::over(&mount.mountpoint);
    register_lazily(&setup, &overlay.url, &paths);
    let built = check_lazy_store(&setup.nix, &overlay.url, &paths[0], &overlay.store_dir);
    // What Nix wrote went to the upper layer.
    assert!(overlay.upper.join(built.trim_start_matches("/nix/store/")).exists());
}

nix_matrix! {
    /// `flywheel lazy` registers a closure from the server's signed narinfo files once, in a
    /// store whose directory is an overlay over the mount, and refuses unsigned ones.
    fuse_lazy_command_registers_closures => fuse_lazy_command_registers_closures_with;
}

fn fuse_lazy_command_registers_closures_with(version: NixVersion) {
    let setup = Setup::of(version);
    let paths = setup.push_corpus(&["withRefs"]);
    let cache_dir = tempfile::tempdir().unwrap();
    let mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
    let overlay = OverlayStore::over(&mount.mountpoint);
    let (store, store_dir) = (overlay.url.as_str(), overlay.store_dir.as_path());
    let lazy = |key: &str, extra: &[&str]| {
        // The settings the tests give Nix, for the nix-store that `flywheel lazy` runs.
        let template = setup.nix.cmd("nix-store");
        let mut cmd = Command::new(common::FLYWHEEL);
        for (name, value) in template.get_envs() {
            match value {
                Some(value) => cmd.env(name, value),
                None => cmd.env_remove(name),
            };
        }
        cmd.args(["lazy", "--server", &setup.server.url, "--cache", common_fuse::CACHE, "--token-file"])
            .arg(&setup.token_file)
            .args(["--store", store, "--trusted-key", key, "--nix-store"])
            .arg(version.bin_dir().join("nix-store"))
            .args(extra)
            .args(&paths);
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let valid = |path: &str| setup.nix.cmd("nix-store").args(["--store", store, "--check-validity", path]).status().unwrap().success();

    let stranger = flywheel_core::nix::SigningKey::generate("stranger-1").unwrap().verifying_key().to_nix_string();
    let (ok, _, err) = lazy(&stranger, &[]);
    assert!(!ok && err.contains("not signed by a trusted key"), "{err}");
    assert!(!valid(&paths[0]), "a refused closure was registered");

    let key = setup.public_key();
    let control = ["--prefetch", "lazy-job", "--cache-dir", cache_dir.path().to_str().unwrap()];
    let (ok, out, err) = lazy(&key, &control);
    assert!(ok, "flywheel lazy: {err}");
    assert!(out.contains("registered 3 paths; 0 of the closure's 3 were valid already"), "{out}");
    assert!(out.contains("no trace under \"lazy-job\" yet"), "the mount was asked to prefetch: {out}");
    check_lazy_store(&setup.nix, store, &paths[0], store_dir);

    let (ok, out, err) = lazy(&key, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("registered 0 paths; 3 of the closure's 3 were valid already"), "{out}");
}

/// Nix 2.30's `local-overlay` store over the mount: the mount is the lower store's directory,
/// the closure is registered in the lower store's own database, and the runner's store is
/// the overlay, whose database starts empty. Only Nix 2.22 and later have this store.
#[test]
fn fuse_lazy_mode_local_overlay_store_nix_2_30() {
    let setup = Setup::of(NixVersion::V2_30);
    let paths = setup.push_corpus(&["withRefs"]);
    let cache_dir = tempfile::tempdir().unwrap();
    let mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    // The lower store: its database is written once by --load-db, read-only afterwards. Nix's
    // local store creates `.links` in its store directory whenever it opens, even read-only,
    // and the mount is read-only: the lower store's directory is a read-only overlay of the
    // mount and a stub layer holding an empty `.links`. The runner's overlay takes the same
    // two layers as its lower layers rather than that overlay, since FUSE with passthrough
    // under two overlays passes the kernel's stacking limit; so Nix's check that the
    // overlay's lowerdir is the lower store's directory is off.
    let lower = work.path().join("lower");
    let lower_store_dir = lower.join("nix/store");
    std::fs::create_dir_all(&lower_store_dir).unwrap();
    register_lazily(&setup, &format!("local?root={}", lower.display()), &paths);
    let stub = work.path().join("stub");
    let _lower_mount = mount_lower_store(&mount.mountpoint, &stub, &lower_store_dir);
    let merged = work.path().join("merged");
    let upper = work.path().join("upper");
    let layers = std::path::PathBuf::from(format!("{}:{}", stub.display(), mount.mountpoint.display()));
    let _overlay = mount_overlay(&layers, &upper, &work.path().join("work"), &merged.join("nix/store"));
    let lower_url = format!("local?root={}&read-only=true", lower.display());
    let store = local_overlay_url(&lower, &merged, &upper);
    let built = check_lazy_store(&setup.nix, &store, &paths[0], &merged.join("nix/store"));
    assert!(upper.join(built.trim_start_matches("/nix/store/")).exists());
    // The lower store's database was not written: the new path is only in the upper one.
    let lower_info = setup.nix.cmd("nix").args(["path-info", "--store", &lower_url, &built]).output().unwrap();
    assert!(!lower_info.status.success(), "{built} appeared in the lower store");
}

#[test]
fn fuse_full_disk_serves_without_caching() {
    let setup = Setup::new();
    let big = setup.push_corpus(&["big"]).remove(0);
    let disk = tempfile::tempdir().unwrap();
    // A 2 MiB filesystem under a cache whose quota is far larger: writes fail with ENOSPC.
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"]).arg(disk.path()).status().unwrap();
    assert!(status.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _tmpfs = Unmount(disk.path().to_path_buf());
    let mut mount = setup.mount(&setup.server.url, &disk.path().join("cache"), &["--cache-size", "1000000000"]);
    let expected = sha256_file(&setup.physical(&big).join("blob"));
    assert_eq!(sha256_file(&mount.path(&big).join("blob")), expected, "bytes with a full disk");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(sha256_file(&mount.path(&big).join("blob")), expected, "bytes again with a full disk");
    let log = std::fs::read_to_string(&mount.log).unwrap();
    assert!(log.contains("serving without caching"), "the full disk was not hit: {log}");
    assert!(mount.terminate(), "the mount survives a full disk and exits cleanly");
}

/// Paths whose chunks the server has packed (`flywheel compact`) read through the mount bit for
/// bit, from a server that remembers nothing of their upload.
#[test]
fn fuse_reads_packed_paths() {
    let mut setup = Setup::new();
    let paths = setup.push_corpus(&["single", "tree", "withRefs", "big"]);
    let report = setup.server.compact(&["--cold-after", "0"]);
    assert!(!report.contains("packed 0 chunks") && !setup.server.object_sizes("packs").is_empty(), "{report}");
    setup.server.restart();
    let cache_dir = tempfile::tempdir().unwrap();
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
    for path in &paths {
        let hash = nar_hash_of(&setup, &mount.path(path));
        assert_eq!(hash, Sha256Hash::parse(&setup.narinfo_hash(path)).unwrap(), "NAR hash of packed {path} through the mount");
    }
    assert!(mount.terminate());
}

/// SIGTERM stops the mount even when a process that unshared its mounts while the store was
/// mounted (as Nix does for a store under another root) holds a copy of it: the kernel keeps
/// the filesystem alive for that copy, so the FUSE session alone would never end. The copy is
/// cut off rather than left answering from a daemon that was told to stop.
#[test]
fn fuse_sigterm_stops_the_mount_while_another_namespace_holds_it() {
    let setup = Setup::new();
    let path = setup.push_corpus(&["single"]).remove(0);
    let cache_dir = tempfile::tempdir().unwrap();
    let mut mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
    let file = mount.path(&path);
    let expected = sha256_file(&setup.physical(&path));
    assert_eq!(sha256_file(&file), expected);
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let holder = Holder(Command::new("unshare").args(["--mount", "--propagation", "private", "sleep", "120"]).spawn().unwrap());
    let in_holder = |args: &[&str]| {
        Command::new("nsenter").args(["-t", &holder.0.id().to_string(), "-m", "--"]).args(args).output().unwrap()
    };
    // Wait until the holder's namespace exists and has its copy of the mount.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = in_holder(&["cat", "/proc/self/mountinfo"]);
        if String::from_utf8_lossy(&seen.stdout).contains(&*mount.mountpoint.to_string_lossy()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the holder's namespace never showed the mount");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let through_holder = in_holder(&["sha256sum", &file.to_string_lossy()]);
    assert!(String::from_utf8_lossy(&through_holder.stdout).starts_with(&expected), "the copy answers while the mount runs");
    assert!(mount.terminate(), "the mount exits on SIGTERM though another namespace holds it");
    let log = std::fs::read_to_string(&mount.log).unwrap();
    assert!(log.contains("another mount namespace still holds the filesystem"), "{log}");
    let after = in_holder(&["cat", &file.to_string_lossy()]);
    assert!(!after.status.success(), "the holder's copy still answered after the mount stopped");
}
