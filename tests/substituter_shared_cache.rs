//! `flywheel substitute` and a running `flywheel mount` on one cache dir (real FUSE, real
//! Nix 2.8, real server): what one process fetched is a hit for the other, and when the mount
//! exits, the substituter takes the cache over.

// Both harnesses carry the shared helpers of tests/common; two copies of them are harmless.
#![allow(clippy::duplicate_mod)]

#[path = "common_fuse/mod.rs"]
#[macro_use]
mod common_fuse;
#[macro_use]
mod substituter_common;

use common_fuse::common::{fetch_metrics as metrics, metric_value as sample};
use common_fuse::{CountingProxy, NixVersion, Setup, CACHE};

fn realise(setup: &Setup, dst: &str, url: &str, key: &str, paths: &[String]) {
    let out = setup
        .nix
        .cmd("nix-store")
        .args(["--store", dst, "--realise"])
        .args(paths)
        .args(["--option", "substituters", url, "--option", "trusted-public-keys", key, "--option", "require-sigs", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "substitution failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in paths {
        assert!(setup.nix.verify(dst, path), "{path} does not verify");
    }
}

fn read_tree(dir: &std::path::Path) {
    if dir.is_dir() && !dir.is_symlink() {
        for entry in std::fs::read_dir(dir).unwrap() {
            read_tree(&entry.unwrap().path());
        }
    } else if dir.is_file() && !dir.is_symlink() {
        std::fs::read(dir).unwrap();
    }
}

nix_matrix! {
    substituter_shares_its_cache_dir_with_a_running_mount => substituter_shares_its_cache_dir_with_a_running_mount_with;
}

fn substituter_shares_its_cache_dir_with_a_running_mount_with(version: NixVersion) {
    let setup = Setup::of(version);
    let paths = setup.push_corpus(&["big", "tree", "single"]);
    let key = setup.public_key();
    let cache_dir = tempfile::tempdir().unwrap();
    let mount_proxy = CountingProxy::start(&setup.server.url, common_fuse::CACHE, None);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut mount = setup.mount(&mount_proxy.url, cache_dir.path(), &["--metrics-listen", &metrics_addr]);

    // The mount reads `big` and `tree` whole: their chunks land in the shared cache.
    for path in &paths[..2] {
        read_tree(&mount.path(path));
    }
    // Fetched frames reach the cache in the background (and readahead may still be fetching):
    // wait until every frame the mount fetched is in the cache, and nothing more arrives.
    let mount_url = format!("http://{metrics_addr}/metrics");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = (0.0, -1.0);
    loop {
        let text = metrics(&mount_url);
        let now = (sample(&text, "flywheel_runner_chunk_bytes_fetched_total"), sample(&text, "flywheel_runner_cache_used_bytes"));
        if now.0 > 0.0 && now.1 >= now.0 && now == last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the mount's cache never caught up with its fetches: {now:?}");
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mount_fetched = mount_proxy.chunks_requested();
    assert!(mount_fetched > 0);

    // The substituter opens the same cache dir while the mount runs.
    let sub_proxy = CountingProxy::start(&setup.server.url, common_fuse::CACHE, None);
    let sub = substituter_common::Substitute::start(&sub_proxy.url, CACHE, &setup.token_file, cache_dir.path());
    assert!(sub.log_text().contains("sharing it through its socket"), "{}", sub.log_text());
    realise(&setup, &setup.nix.store("dst1"), &sub.url, &key, &paths[..2]);
    assert_eq!(sub_proxy.chunks_requested(), 0, "the substituter fetched chunks the mount had cached");

    // What the substituter fetches is a hit for the mount.
    realise(&setup, &setup.nix.store("dst2"), &sub.url, &key, &paths[2..]);
    assert_eq!(sub_proxy.chunks_requested(), 1);
    read_tree(&mount.path(&paths[2]));
    assert_eq!(mount_proxy.chunks_requested(), mount_fetched, "the mount fetched a chunk the substituter had cached");

    // Both daemons' metrics follow what they did: the chunks fetched are the ones the proxies
    // saw, the substituter's hits are the mount's chunks.
    let mount_metrics = metrics(&format!("http://{metrics_addr}/metrics"));
    assert_eq!(sample(&mount_metrics, "flywheel_runner_chunks_fetched_total"), mount_fetched as f64);
    assert!(sample(&mount_metrics, "flywheel_runner_chunk_fetch_seconds_count") >= 1.0);
    assert!(sample(&mount_metrics, "flywheel_runner_cache_used_bytes") > 0.0);
    let sub_metrics = metrics(&format!("{}/metrics", sub.url));
    assert_eq!(sample(&sub_metrics, "flywheel_runner_chunks_fetched_total"), 1.0);
    assert!(sample(&sub_metrics, "flywheel_runner_cache_hits_total") >= 1.0, "no cache hits counted");
    assert!(sample(&sub_metrics, "flywheel_substituter_nar_bytes_sent_total") > 0.0);
    assert!(
        sample(&sub_metrics, "flywheel_substituter_requests_total{route=\"/{file}\",status=\"200\"}") >= 3.0,
        "narinfo requests not counted"
    );

    // `flywheel status` sees the shared cache, the mount and the substituter.
    let status = status_of(cache_dir.path(), &mount.mountpoint, &sub.url);
    assert_eq!(status["mount"]["state"], "mounted", "{status}");
    assert!(status["substituter"]["state"].as_str().unwrap().starts_with("up"), "{status}");
    assert_eq!(status["push_daemon"]["state"], "not running", "{status}");
    assert_eq!(status["cache"]["owned_by_a_daemon"], true, "{status}");
    assert!(status["cache"]["used_bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(status["cache"]["hits"].as_u64().unwrap() >= 1, "{status}");

    // The mount exits; the substituter takes the cache over and keeps every entry.
    assert!(mount.terminate(), "the mount did not exit cleanly");
    realise(&setup, &setup.nix.store("dst3"), &sub.url, &key, &paths);
    assert_eq!(sub_proxy.chunks_requested(), 1, "entries were lost when the owner changed");
    assert!(sub.log_text().contains("this process owns it now"), "{}", sub.log_text());
    let status = status_of(cache_dir.path(), &mount.mountpoint, &sub.url);
    assert_eq!(status["mount"]["state"], "not mounted", "{status}");
    drop(sub);
    let status = status_of(cache_dir.path(), &mount.mountpoint, "http://127.0.0.1:9");
    assert!(status["substituter"]["state"].as_str().unwrap().starts_with("down"), "{status}");
}

fn status_of(cache_dir: &std::path::Path, mountpoint: &std::path::Path, substituter: &str) -> serde_json::Value {
    let out = std::process::Command::new(common_fuse::common::FLYWHEEL)
        .args(["status", "--json", "--cache-dir"])
        .arg(cache_dir)
        .arg("--mountpoint")
        .arg(mountpoint)
        .args(["--substituter", substituter, "--push-socket", "/nonexistent/push.sock"])
        .output()
        .unwrap();
    assert!(out.status.success(), "flywheel status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
