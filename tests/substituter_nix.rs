//! `flywheel substitute` with real Nix 2.8 and the real server: signatures required, a plain
//! second cache behind it, only missing chunks fetched, and every failure a fast 404 that lets
//! Nix fall back.

#[macro_use]
mod substituter_common;

use flywheel_core::api::v1::chunk_bodies::framed_chunk;
use substituter_common::{new_chunks, CountingProxy, NixVersion, Setup, StaticCache};

nix_matrix! {
    substituter_serves_nix_with_sigs_and_falls_back_when_the_server_is_down => substituter_serves_nix_with_sigs_and_falls_back_when_the_server_is_down_with;
}

fn substituter_serves_nix_with_sigs_and_falls_back_when_the_server_is_down_with(version: NixVersion) {
    let mut setup = Setup::of("ci", version);
    let first = setup.build("sub-a", &["single", "tree", "withRefs", "big"]);
    let later = setup.build("sub-b", &["single", "tree"]);
    let all: Vec<String> = first.iter().chain(&later).cloned().collect();
    setup.nix_copy_to_server(&all);
    let second = StaticCache::new(&setup.nix, &setup.src, &all);
    let proxy = CountingProxy::start(&setup.server.url, "ci", None);
    let cache_dir = tempfile::tempdir().unwrap();
    let sub = setup.substitute(&proxy.url, cache_dir.path());
    let keys = [setup.key.as_str(), second.public_key.as_str()];

    // The narinfo keeps the server's signature and points at an uncompressed NAR served here.
    let narinfo = sub.get(&format!("{}.narinfo", substituter_common::hash_part(&first[0]))).text().unwrap();
    assert!(narinfo.contains("Compression: none"), "{narinfo}");
    let key_name = setup.key.split(':').next().unwrap();
    assert!(narinfo.lines().any(|l| l.starts_with(&format!("Sig: {key_name}:"))), "{narinfo}");

    // Our substituter first, the static cache second, signatures required.
    let dst = setup.nix.store("dst");
    let out = setup.realise(&dst, &[&sub.url, &second.url], &keys, &first);
    assert!(out.status.success(), "substitution failed: {}\n{}", String::from_utf8_lossy(&out.stderr), sub.log_text());
    for path in &first {
        assert!(setup.nix.verify(&dst, path), "{path} does not verify");
        assert_eq!(setup.nix.path_info(&dst, path).nar_hash, setup.nix.path_info(&setup.src, path).nar_hash);
    }
    assert!(proxy.chunks_requested() > 0, "nothing came through our substituter");

    // With only our substituter and an untrusted key, Nix refuses: the signatures are the server's.
    let out = setup.realise(&setup.nix.store("dst-untrusted"), &[&sub.url], &[second.public_key.as_str()], &first[..1]);
    assert!(!out.status.success(), "substitution without the server's key succeeded");

    // The server stops. Paths never seen locally: a fast 404 from us, the static cache serves.
    setup.server.stop();
    let resp = sub.get(&format!("{}.narinfo", substituter_common::hash_part(&later[0])));
    assert_eq!(resp.status(), 404);
    let dst2 = setup.nix.store("dst-fallback");
    let out = setup.realise(&dst2, &[&sub.url, &second.url], &keys, &later);
    assert!(out.status.success(), "fallback failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in &later {
        assert!(setup.nix.verify(&dst2, path), "{path} does not verify after fallback");
    }
    // Paths whose chunks are all cached are still served by us alone, server down.
    let dst3 = setup.nix.store("dst-offline");
    let out = setup.realise(&dst3, &[&sub.url], &[setup.key.as_str()], &first);
    assert!(out.status.success(), "offline substitution of cached paths failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in &first {
        assert!(setup.nix.verify(&dst3, path), "{path} does not verify offline");
    }
}

nix_matrix! {
    substituter_fetches_only_missing_chunks_of_a_path_sharing_chunks => substituter_fetches_only_missing_chunks_of_a_path_sharing_chunks_with;
}

fn substituter_fetches_only_missing_chunks_of_a_path_sharing_chunks_with(version: NixVersion) {
    let setup = Setup::of("ci", version);
    let paths = setup.build("sub-shared", &["big", "bigNext"]);
    setup.nix_copy_to_server(&paths);
    let (old_nar, new_nar) = (setup.nix.dump(&setup.src, &paths[0]), setup.nix.dump(&setup.src, &paths[1]));
    let (new_count, new_bytes) = new_chunks(&old_nar, &new_nar);
    let total = substituter_common::chunks_of(&new_nar).len() as u64;
    assert!(new_count * 4 < total, "the corpus should share most chunks: {new_count} new of {total}");

    let proxy = CountingProxy::start(&setup.server.url, "ci", None);
    let cache_dir = tempfile::tempdir().unwrap();
    let sub = setup.substitute(&proxy.url, cache_dir.path());
    let keys = [setup.key.as_str()];
    let out = setup.realise(&setup.nix.store("dst1"), &[&sub.url], &keys, &paths[..1]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = proxy.chunks_requested();
    assert_eq!(first, substituter_common::chunks_of(&old_nar).len() as u64, "a cold cache fetches every chunk once");

    proxy.reset();
    let dst2 = setup.nix.store("dst2");
    let out = setup.realise(&dst2, &[&sub.url], &keys, &paths[1..]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(setup.nix.verify(&dst2, &paths[1]));
    let fetched = proxy.chunks_requested();
    eprintln!("version 2: {fetched} chunks fetched, {new_count} new chunks ({new_bytes} bytes) of {total}");
    assert!(fetched <= new_count, "fetched {fetched} chunks, but only {new_count} are new");
    assert!(fetched >= 1);

    // A warm repeat fetches nothing.
    proxy.reset();
    let out = setup.realise(&setup.nix.store("dst3"), &[&sub.url], &keys, &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(proxy.chunks_requested(), 0);
}

nix_matrix! {
    substituter_refuses_wrong_chunks_and_garbage_and_nix_falls_back => substituter_refuses_wrong_chunks_and_garbage_and_nix_falls_back_with;
}

fn substituter_refuses_wrong_chunks_and_garbage_and_nix_falls_back_with(version: NixVersion) {
    let setup = Setup::of("ci", version);
    let paths = setup.build("sub-bad", &["big", "tree"]);
    setup.nix_copy_to_server(&paths);
    let second = StaticCache::new(&setup.nix, &setup.src, &paths);
    let keys = [setup.key.as_str(), second.public_key.as_str()];

    // A server that answers every chunk with a valid zstd frame of the wrong bytes.
    let target = setup.server.url.clone();
    let wrong = fake_wrong_chunks(target);
    let cache_dir = tempfile::tempdir().unwrap();
    let sub = setup.substitute(&wrong, cache_dir.path());
    let dst = setup.nix.store("dst-wrong");
    let out = setup.realise(&dst, &[&sub.url, &second.url], &keys, &paths);
    assert!(out.status.success(), "fallback after wrong chunks failed: {}", String::from_utf8_lossy(&out.stderr));
    for path in &paths {
        assert!(setup.nix.verify(&dst, path));
    }
    let log = sub.log_text();
    assert!(log.contains("content hashing to") || log.contains("does not decompress"), "no verification failure logged:\n{log}");
    // Nothing wrong was cached: through the real server, the same cache dir serves correct NARs.
    drop(sub);
    let sub = setup.substitute(&setup.server.url, cache_dir.path());
    let dst = setup.nix.store("dst-after-wrong");
    let out = setup.realise(&dst, &[&sub.url], &keys[..1], &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(sub);

    // A server answering garbage: narinfo is a fast 404 and Nix uses the second cache.
    let garbage = substituter_common::fake_http(|_, _, _, _| (200, b"<html>garbage</html>".to_vec()));
    let sub = setup.substitute(&garbage, tempfile::tempdir().unwrap().path());
    assert_eq!(sub.get(&format!("{}.narinfo", substituter_common::hash_part(&paths[0]))).status(), 404);
    let dst = setup.nix.store("dst-garbage");
    let out = setup.realise(&dst, &[&sub.url, &second.url], &keys, &paths);
    assert!(out.status.success(), "fallback after garbage failed: {}", String::from_utf8_lossy(&out.stderr));
    // A server that accepts connections and never answers: still a 404, not a hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let sub = setup.substitute(&silent_url, tempfile::tempdir().unwrap().path());
    assert_eq!(sub.get(&format!("{}.narinfo", substituter_common::hash_part(&paths[1]))).status(), 404);
    drop(silent);
}

/// Forwards everything to `target` but replaces every chunk with a frame of other bytes.
fn fake_wrong_chunks(target: String) -> String {
    substituter_common::fake_http(move |method, path, headers, body| {
        let wrong = |size: usize| flywheel_core::chunk::compress(&vec![0x5a; size], 1).unwrap();
        if method == "GET" && path.contains("/chunk/") {
            return (200, wrong(1000));
        }
        if method == "POST" && path.ends_with("/chunks") {
            let request: serde_json::Value = serde_json::from_slice(body).unwrap();
            let frames = request["chunks"].as_array().unwrap().iter().map(|chunk| wrong(chunk["size"].as_u64().unwrap() as usize));
            return (200, frames.flat_map(|frame| framed_chunk(&frame)).collect());
        }
        substituter_common::forward(&target, method, path, headers, body)
    })
}

/// Paths whose chunks the server has packed (`flywheel compact`) substitute through our
/// substituter, from a server that remembers nothing of their upload.
#[test]
fn substituter_serves_packed_paths() {
    let mut setup = Setup::of("ci", NixVersion::V2_8);
    let paths = setup.build("sub-packed", &["single", "tree", "withRefs", "big"]);
    setup.nix_copy_to_server(&paths);
    let report = setup.server.compact(&["--cold-after", "0"]);
    assert!(!report.contains("packed 0 chunks") && !setup.server.object_sizes("packs").is_empty(), "{report}");
    setup.server.restart();
    let cache_dir = tempfile::tempdir().unwrap();
    let sub = setup.substitute(&setup.server.url, cache_dir.path());
    let dst = setup.nix.store("dst");
    let out = setup.realise(&dst, &[&sub.url], &[setup.key.as_str()], &paths);
    assert!(out.status.success(), "substitution failed: {}\n{}", String::from_utf8_lossy(&out.stderr), sub.log_text());
    for path in &paths {
        assert!(setup.nix.verify(&dst, path), "{path} does not verify");
        assert_eq!(setup.nix.dump(&dst, path), setup.nix.dump(&setup.src, path), "{path}");
    }
}
