//! `flywheel substitute` and a running `flywheel mount` on one cache dir (real FUSE, real
//! Nix 2.8, real server): what one process fetched is a hit for the other, and when the mount
//! exits, the substituter takes the cache over.

#[path = "common_fuse/mod.rs"]
mod common_fuse;
mod substituter_common;

use common_fuse::{CountingProxy, Setup, CACHE};

fn public_key(setup: &Setup) -> String {
    let config: serde_json::Value = reqwest::blocking::Client::new()
        .get(format!("{}/_api/v1/cache-config/{CACHE}", setup.server.url))
        .bearer_auth(setup.server.admin_token())
        .send()
        .unwrap()
        .json()
        .unwrap();
    config["public_key"].as_str().unwrap().to_string()
}

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

#[test]
fn substituter_shares_its_cache_dir_with_a_running_mount() {
    let setup = Setup::new();
    let paths = setup.push_corpus(&["big", "tree", "single"]);
    let key = public_key(&setup);
    let cache_dir = tempfile::tempdir().unwrap();
    let mount_proxy = CountingProxy::start(&setup.server.url);
    let mut mount = setup.mount(&mount_proxy.url, cache_dir.path(), &[]);

    // The mount reads `big` and `tree` whole: their chunks land in the shared cache.
    for path in &paths[..2] {
        read_tree(&mount.path(path));
    }
    let mount_fetched = mount_proxy.chunks_requested();
    assert!(mount_fetched > 0);

    // The substituter opens the same cache dir while the mount runs.
    let sub_proxy = CountingProxy::start(&setup.server.url);
    let sub = substituter_common::Substitute::start(&sub_proxy.url, CACHE, &setup.token_file, cache_dir.path());
    assert!(sub.log_text().contains("sharing it through its socket"), "{}", sub.log_text());
    realise(&setup, &setup.nix.store("dst1"), &sub.url, &key, &paths[..2]);
    assert_eq!(sub_proxy.chunks_requested(), 0, "the substituter fetched chunks the mount had cached");

    // What the substituter fetches is a hit for the mount.
    realise(&setup, &setup.nix.store("dst2"), &sub.url, &key, &paths[2..]);
    assert_eq!(sub_proxy.chunks_requested(), 1);
    read_tree(&mount.path(&paths[2]));
    assert_eq!(mount_proxy.chunks_requested(), mount_fetched, "the mount fetched a chunk the substituter had cached");

    // The mount exits; the substituter takes the cache over and keeps every entry.
    assert!(mount.terminate(), "the mount did not exit cleanly");
    realise(&setup, &setup.nix.store("dst3"), &sub.url, &key, &paths);
    assert_eq!(sub_proxy.chunks_requested(), 1, "entries were lost when the owner changed");
    assert!(sub.log_text().contains("this process owns it now"), "{}", sub.log_text());
}
