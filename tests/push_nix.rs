//! `flywheel push` and the post-build hook mode with real Nix 2.8 and the real server: only
//! new chunks are sent, Nix substitutes the result, a hooked `nix-build` ends pushed after
//! `flush`, and bad input fails clearly without losing anything.

#[macro_use]
mod substituter_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use substituter_common::common::{fetch_metrics, metric_value};
use substituter_common::{new_chunks, CountingProxy, NixVersion, Setup, FLYWHEEL};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Substitutes `paths` from the server's cache `ci` into a fresh store with real Nix,
/// signatures required; answers that store.
fn substitute(setup: &Setup, paths: &[String]) -> String {
    let netrc = setup.server.netrc(&setup.token);
    let dst = setup.nix.store("dst");
    let out = setup.nix.copy_from(&dst, &format!("{}/ci", setup.server.url), &netrc, &setup.key, paths);
    assert!(out.status.success(), "nix copy --from failed: {}", stderr(&out));
    dst
}

nix_matrix! {
    push_of_a_new_version_sends_only_new_chunks_and_nix_substitutes_it => push_of_a_new_version_sends_only_new_chunks_and_nix_substitutes_it_with;
}

fn push_of_a_new_version_sends_only_new_chunks_and_nix_substitutes_it_with(version: NixVersion) {
    let setup = Setup::of("ci", version);
    let paths = setup.build("push-v", &["big", "bigNext", "withRefs"]);
    let proxy = CountingProxy::start(&setup.server.url, "ci", None);

    // Version N, and a path with references (its closure goes along).
    let out = setup.push(&proxy.url, &[paths[0].clone(), paths[2].clone()], &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    assert!(stderr(&out).contains("pushed 4 of 4 paths"), "{}", stderr(&out));

    // Version N+1: only the new chunks go over the wire.
    let (old_nar, new_nar) = (setup.nix.dump(&setup.src, &paths[0]), setup.nix.dump(&setup.src, &paths[1]));
    let (new_count, new_bytes) = new_chunks(&old_nar, &new_nar);
    proxy.reset();
    let received = chunks_received(&setup);
    let out = setup.push(&proxy.url, &paths[1..2], &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    let sent = proxy.bytes_up();
    eprintln!(
        "version N+1: {sent} bytes sent for {new_count} new chunks of {new_bytes} bytes (NAR {} bytes); {}",
        new_nar.len(),
        stderr(&out).lines().last().unwrap_or("")
    );
    assert_eq!(chunks_received(&setup) - received, new_count, "uploaded chunks");
    // It went as changes to version N, so the metadata does not grow with the NAR: headers of
    // five requests, the new chunks' names and a few runs of N's chunk list.
    assert!(stderr(&out).contains("1 as changes to an earlier version"), "{}", stderr(&out));
    assert!(sent <= new_bytes + new_bytes / 20 + 4096, "sent {sent} bytes for {new_bytes} new bytes");

    // Pushing again sends nothing but the question.
    proxy.reset();
    let out = setup.push(&proxy.url, &paths, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(proxy.upload_requests(), 0);
    assert!(stderr(&out).contains("pushed 0 of"), "{}", stderr(&out));

    // Real Nix substitutes what was pushed, signatures required.
    let dst = substitute(&setup, &paths);
    for path in &paths {
        assert!(setup.nix.verify(&dst, path), "{path} does not verify");
        let (a, b) = (setup.nix.path_info(&setup.src, path), setup.nix.path_info(&dst, path));
        assert_eq!((a.nar_hash, a.references, a.deriver), (b.nar_hash, b.references, b.deriver));
    }
}

nix_matrix! {
    push_hook_pushes_a_real_nix_build_by_flush => push_hook_pushes_a_real_nix_build_by_flush_with;
}

fn push_hook_pushes_a_real_nix_build_by_flush_with(version: NixVersion) {
    let setup = Setup::of("ci", version);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("push.sock");
    let store = format!("local?root={}", setup.src);
    let log = dir.path().join("daemon.log");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut daemon = setup
        .nix
        .cmd(FLYWHEEL)
        .args(["push-daemon", "--server", &setup.server.url, "--cache", "ci", "--token-file"])
        .arg(&setup.token_file)
        .args(["--store", &store, "--socket"])
        .arg(&socket)
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "daemon did not listen: {}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let hook = dir.path().join("hook.sh");
    std::fs::write(&hook, format!("#!/bin/sh\nexec {FLYWHEEL} hook --socket {}\n", socket.display())).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus.nix");
    let seed = substituter_common::common::unique_seed("hook");
    let mut cmd = setup.nix.cmd("nix-build");
    cmd.args(["--store", &store, "--no-out-link", corpus, "--argstr", "seed", &seed, "-A", "withRefs"])
        .args(["--option", "post-build-hook"])
        .arg(&hook);
    let out = setup.nix.run(&mut cmd);
    let built = out.trim().to_string();
    assert!(built.starts_with("/nix/store/"), "{out}");

    let flush = Command::new(FLYWHEEL).args(["flush", "--socket"]).arg(&socket).output().unwrap();
    assert!(flush.status.success(), "flush failed: {}\n{}", stderr(&flush), std::fs::read_to_string(&log).unwrap());
    // The output and its closure (three built paths) are on the server now.
    let closure = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &store, "-qR", &built]));
    for path in closure.lines() {
        assert!(setup.server_has(path), "{path} was not pushed:\n{}", std::fs::read_to_string(&log).unwrap());
    }
    // The daemon's metrics count what it pushed.
    let metrics = fetch_metrics(&metrics_url);
    let value = |series: &str| metric_value(&metrics, series);
    assert_eq!(value("flywheel_push_paths_pushed_total"), closure.lines().count() as f64, "{metrics}");
    assert!(value("flywheel_push_chunks_uploaded_total") >= 1.0, "{metrics}");
    assert_eq!(value("flywheel_push_queue_length"), 0.0);
    assert_eq!(value("flywheel_push_batches_failed_total"), 0.0);
    let dst = substitute(&setup, std::slice::from_ref(&built));
    assert!(setup.nix.verify(&dst, &built));

    // The hook never fails the build, even with no daemon listening.
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_file(&socket);
    let seed = substituter_common::common::unique_seed("hook-nodaemon");
    let mut cmd = setup.nix.cmd("nix-build");
    cmd.args(["--store", &store, "--no-out-link", corpus, "--argstr", "seed", &seed, "-A", "single"])
        .args(["--option", "post-build-hook"])
        .arg(&hook);
    setup.nix.run(&mut cmd);
}

nix_matrix! {
    push_bad_input_fails_clearly_and_loses_nothing => push_bad_input_fails_clearly_and_loses_nothing_with;
}

fn push_bad_input_fails_clearly_and_loses_nothing_with(version: NixVersion) {
    let setup = Setup::of("ci", version);
    let paths = setup.build("push-bad", &["big", "single"]);

    // A path that is not in the store.
    let missing = format!("/nix/store/{}-not-there", "0".repeat(32));
    let out = setup.push(&setup.server.url, &[missing], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not valid") || stderr(&out).contains("does not exist"), "{}", stderr(&out));

    // A server that answers garbage.
    let garbage = substituter_common::fake_http(|_, _, _, _| (200, b"<html>garbage</html>".to_vec()));
    let out = setup.push(&garbage, &paths, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not parse"), "{}", stderr(&out));

    // A server that goes away after a few chunk uploads: the push fails, the path is not
    // published half-way, and a later push completes it, sending only the rest.
    let total = substituter_common::chunks_of(&setup.nix.dump(&setup.src, &paths[0])).len() as u64;
    // One upload at a time, so the uploads before the cut have completed.
    let cut = CountingProxy::start(&setup.server.url, "ci", Some(2));
    let out = setup.push(&cut.url, &paths[..1], &["--jobs", "1"]);
    assert!(!out.status.success(), "push through a dying server succeeded");
    assert!(!setup.server_has(&paths[0]), "a half-pushed path was published");
    let received = chunks_received(&setup);
    let out = setup.push(&setup.server.url, &paths[..1], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(chunks_received(&setup) - received < total, "the second push sent all {total} chunks again");
    assert!(setup.server_has(&paths[0]));
    let dst = substitute(&setup, &paths[..1]);
    assert!(setup.nix.verify(&dst, &paths[0]));

    // A path whose files no longer match the Nix database is refused, not pushed.
    let physical = format!("{}{}", setup.src, paths[1]);
    let mut perms = std::fs::metadata(&physical).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&physical, perms).unwrap();
    std::fs::write(&physical, "tampered\n").unwrap();
    let out = setup.push(&setup.server.url, &paths[1..], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("do not match the Nix database"), "{}", stderr(&out));
    assert!(!setup.server_has(&paths[1]));
}

nix_matrix! {
    push_skips_paths_signed_by_upstream_keys => push_skips_paths_signed_by_upstream_keys_with;
}

fn push_skips_paths_signed_by_upstream_keys_with(version: NixVersion) {
    let setup = Setup::of("ci", version);
    let paths = setup.build("push-upstream", &["single", "tree"]);
    // A path signed by a key named like cache.nixos.org's, as paths substituted from it are.
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("sk"), keys.path().join("pk"));
    setup.nix.run(setup.nix.cmd("nix-store").arg("--generate-binary-cache-key").arg("cache.nixos.org-1").arg(&sk).arg(&pk));
    setup.nix.run(
        setup.nix.cmd("nix").args(["store", "sign", "--store", &setup.src, "--key-file"]).arg(&sk).arg(&paths[0]),
    );

    let out = setup.push(&setup.server.url, &paths, &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    assert!(stderr(&out).contains("1 from upstream"), "{}", stderr(&out));
    assert!(!setup.server_has(&paths[0]), "a path signed by cache.nixos.org-1 was pushed");
    assert!(setup.server_has(&paths[1]));

    // With other upstream keys configured, it is an ordinary path.
    let out = setup.push(&setup.server.url, &paths[..1], &["--ignore-upstream-key", "some-other-cache-1"]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    assert!(setup.server_has(&paths[0]));
}

/// A new version pushed over a base whose chunks the server has packed (`flywheel compact`)
/// goes as changes, sends only its new chunks (`missing-chunks` sees packed chunks as stored),
/// and real Nix substitutes both bit for bit.
#[test]
fn push_of_a_new_version_over_a_packed_base_sends_only_new_chunks() {
    let mut setup = Setup::new("ci");
    let paths = setup.build("push-packed", &["big", "bigNext"]);
    let out = setup.push(&setup.server.url, &paths[..1], &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    let report = setup.server.compact(&["--cold-after", "0"]);
    assert!(!report.contains("packed 0 chunks"), "{report}");
    setup.server.restart();

    let (old_nar, new_nar) = (setup.nix.dump(&setup.src, &paths[0]), setup.nix.dump(&setup.src, &paths[1]));
    let (new_count, new_bytes) = new_chunks(&old_nar, &new_nar);
    let proxy = CountingProxy::start(&setup.server.url, "ci", None);
    let received = chunks_received(&setup);
    let out = setup.push(&proxy.url, &paths[1..2], &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    assert_eq!(chunks_received(&setup) - received, new_count, "uploaded chunks");
    assert!(stderr(&out).contains("1 as changes to an earlier version"), "{}", stderr(&out));
    let sent = proxy.bytes_up();
    assert!(sent <= new_bytes + new_bytes / 20 + 4096, "sent {sent} bytes for {new_bytes} new bytes");

    let dst = substitute(&setup, &paths);
    for path in &paths {
        assert!(setup.nix.verify(&dst, path), "{path} does not verify");
        assert_eq!(setup.nix.dump(&setup.src, path), setup.nix.dump(&dst, path), "{path}");
    }
}

/// A new version goes as changes to the old one only while the old one's chunks are all
/// there: with one of them lost from storage, the push falls back to asking about every
/// chunk, uploads the lost one again, and real Nix substitutes the result.
#[test]
fn push_of_a_new_version_over_a_damaged_base_repairs_it() {
    use flywheel_core::chunk::{ChunkHash, ChunkParams, Chunker};
    let setup = Setup::new("ci");
    let paths = setup.build("push-damaged", &["big", "bigNext"]);
    let out = setup.push(&setup.server.url, &paths[..1], &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    // A chunk both versions share goes missing from the server's storage.
    let (old_nar, new_nar) = (setup.nix.dump(&setup.src, &paths[0]), setup.nix.dump(&setup.src, &paths[1]));
    let old: std::collections::HashSet<ChunkHash> = Chunker::chunk_all(ChunkParams::default(), &old_nar).iter().map(|c| ChunkHash::of(c)).collect();
    let shared = Chunker::chunk_all(ChunkParams::default(), &new_nar).iter().map(|c| ChunkHash::of(c)).find(|h| old.contains(h)).unwrap();
    let hex = shared.to_string();
    std::fs::remove_file(setup.server.objects.join("chunks").join(&hex[..2]).join(&hex)).unwrap();

    let out = setup.push(&setup.server.url, &paths[1..], &[]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    assert!(stderr(&out).contains("pushed 1 of 1 paths"), "{}", stderr(&out));
    assert!(stderr(&out).contains("0 as changes to an earlier version"), "{}", stderr(&out));
    assert!(setup.server.objects.join("chunks").join(&hex[..2]).join(&hex).exists(), "the lost chunk was not uploaded again");
    let dst = substitute(&setup, &paths[1..]);
    assert!(setup.nix.verify(&dst, &paths[1]));
}

/// Chunks the server received through its chunk API so far (its `/metrics`).
fn chunks_received(setup: &Setup) -> u64 {
    let text = fetch_metrics(&format!("{}/metrics", setup.server.url));
    metric_value(&text, "flywheel_chunks_received_total") as u64
}
