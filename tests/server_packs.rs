//! Packed storage end to end (issue 12): paths pushed by real Nix 2.8 and packed by
//! `flywheel compact` substitute bit for bit through Nix, both NAR forms and the chunk API; a
//! server killed (`kill -9`) at random points of its scheduled compaction loses no path while
//! another replica reads and pushes; a damaged pack is named by fsck and repaired by a re-push.

#[macro_use]
mod common;

use common::{hash_part, Backend, Nix, Server};
use rand::{Rng, SeedableRng};
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// Every path is cold at once; packs of 256 KiB in frames of 64 KiB, so the corpus makes many.
const PACKING: &str = "[compaction]\ninterval = 0\ncold-after = 0\npack-size = 262144\nframe-size = 65536\n";

const CORPUS: [&str; 5] = ["big", "bigNext", "tree", "withRefs", "single"];

/// Length of a chunk object that points into a pack.
const POINTER_LEN: u64 = flywheel_core::chunk::pack::POINTER_LEN as u64;

backend_matrix! {
    packed_paths_substitute_bit_for_bit => packed_paths_substitute_bit_for_bit_local, packed_paths_substitute_bit_for_bit_s3;
    damaged_pack_is_named_and_repaired => damaged_pack_is_named_and_repaired_local, damaged_pack_is_named_and_repaired_s3;
}

fn push_all(nix: &Nix, server: &Server, src: &str, paths: &[String]) {
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let out = nix.copy_to(src, &format!("{}/ci", server.url), &push, paths);
    assert!(out.status.success(), "nix copy --to: {}", String::from_utf8_lossy(&out.stderr));
}

/// Substitutes `paths` through `server` into a fresh store and checks them against `src`.
fn substitute_and_compare(nix: &Nix, server: &Server, key: &str, src: &str, paths: &[String], what: &str) {
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let dst = nix.store(&format!("dst-{}", rand::random::<u32>()));
    let out = nix.copy_from(&dst, &format!("{}/ci", server.url), &pull, key, paths);
    assert!(out.status.success(), "{what}: nix copy --from: {}", String::from_utf8_lossy(&out.stderr));
    for path in paths {
        assert!(nix.verify(&dst, path), "{what}: {path} does not verify");
        assert_eq!(nix.dump(src, path), nix.dump(&dst, path), "{what}: {path}");
    }
}

fn packed_paths_substitute_bit_for_bit(backend: Backend) {
    let nix = Nix::new();
    let mut server = Server::start_with(backend, PACKING);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("packs"), &CORPUS);
    push_all(&nix, &server, &src, &paths);
    let loose = server.object_sizes("chunks");

    let report = server.compact(&[]);
    assert!(report.contains(&format!("packed {} chunks", loose.len())), "{report}");
    let packs = server.object_sizes("packs");
    assert!(packs.len() >= 20, "{} packs for 12 MB of chunks: {report}", packs.len());
    let pointers = server.object_sizes("chunks");
    assert_eq!(pointers.keys().collect::<Vec<_>>(), loose.keys().collect::<Vec<_>>(), "chunk objects keep their names");
    assert!(pointers.values().all(|&len| len == POINTER_LEN), "every chunk object points into a pack");
    // Nothing left to pack.
    assert!(server.compact(&[]).contains("packed 0 chunks"));

    // A fresh process: every chunk is read from its pack, nothing is remembered from the upload.
    server.restart();
    substitute_and_compare(&nix, &server, &key, &src, &paths, "packed");
    let client = Client::new();
    let token = server.mint(&["--pull", "ci"]);
    for path in &paths {
        let nar = nix.dump(&src, path);
        let url = format!("{}/ci/nar/{}", server.url, hash_part(path));
        let plain = client.get(format!("{url}.nar")).bearer_auth(&token).send().unwrap();
        assert_eq!(plain.status(), StatusCode::OK);
        assert!(plain.bytes().unwrap() == nar, "{path}: .nar differs");
        // Twice: whole pack frames go out verified by decompressing, then known by digest.
        for round in ["first", "second"] {
            let compressed = client.get(format!("{url}.nar.zst")).bearer_auth(&token).send().unwrap();
            assert_eq!(compressed.status(), StatusCode::OK);
            let compressed = compressed.bytes().unwrap();
            assert!(zstd::decode_all(&compressed[..]).unwrap() == nar, "{path}: {round} .nar.zst differs");
        }
    }
    // Compaction packs chunks in NAR order, so most frames hold a run of one NAR's chunks
    // and go out compressed as they are stored (each pack has four frames).
    let metrics = common::fetch_metrics(&format!("{}/metrics", server.url));
    let sent_whole = common::metric_value(&metrics, "flywheel_pack_frames_sent_total");
    assert!(sent_whole >= 2.0 * packs.len() as f64, "{sent_whole} pack frames sent whole for {} packs", packs.len());
    // The chunk API serves packed chunks as frames that verify.
    let manifest: serde_json::Value = client
        .get(format!("{}/_flywheel/v1/ci/manifest/{}", server.url, hash_part(&paths[0])))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    for chunk in manifest["manifest"]["chunks"].as_array().unwrap() {
        let hash: flywheel_core::chunk::ChunkHash = chunk["hash"].as_str().unwrap().parse().unwrap();
        let size = chunk["size"].as_u64().unwrap() as usize;
        let chunk_url = format!("{}/_flywheel/v1/ci/chunk/{hash}?path={}", server.url, hash_part(&paths[0]));
        let resp = client.get(chunk_url).bearer_auth(&token).send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        flywheel_core::chunk::decompress_verified(&resp.bytes().unwrap(), &hash, size).expect("a packed chunk that verifies");
    }

    // Garbage collection keeps what the paths point into.
    server.gc(&[]);
    assert_eq!(server.object_sizes("packs"), packs);
    substitute_and_compare(&nix, &server, &key, &src, &paths, "after gc");
}

fn damaged_pack_is_named_and_repaired(backend: Backend) {
    let nix = Nix::new();
    let mut server = Server::start_with(backend, PACKING);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("damaged-pack"), &["big"]);
    push_all(&nix, &server, &src, &paths);
    server.compact(&[]);
    // Flip a byte in the middle of one pack.
    let (pack, len) = server.object_sizes("packs").into_iter().next().unwrap();
    server.rewrite_object(&format!("packs/{pack}"), |mut bytes| {
        bytes[len as usize - 100] ^= 0x20;
        bytes
    });
    server.restart();

    // Never a byte of it: the download fails before its first byte.
    let token = server.mint(&["--pull", "ci"]);
    let resp = Client::new().get(format!("{}/ci/nar/{}.nar", server.url, hash_part(&paths[0]))).bearer_auth(&token).send().unwrap();
    assert!(resp.status().is_server_error(), "a damaged pack served {}", resp.status());

    let report = server.fsck(&[]);
    let name = pack.rsplit('/').next().unwrap().trim_end_matches(".pack");
    assert!(report.contains(&format!("damaged pack {name}")), "{report}");
    assert!(report.contains(&format!("taken out of service: ci /nix/store/{}", paths[0].trim_start_matches("/nix/store/"))), "{report}");

    // A re-push stores the damaged chunks again, and the path substitutes whole.
    push_all(&nix, &server, &src, &paths);
    substitute_and_compare(&nix, &server, &key, &src, &paths, "re-pushed");
    assert!(!server.fsck(&[]).contains("damaged"), "fsck still finds damage after the re-push");
}

/// `kill -9` of a server at random points of its scheduled compaction loses no path, while a
/// replica over the same storage (compacting on its own schedule as well) takes pushes and
/// serves substitutions without an error.
#[test]
fn kill_9_during_compaction_loses_nothing() {
    let nix = Nix::new();
    let schedule = "[compaction]\ninterval = 1\ncold-after = 0\npack-size = 65536\nframe-size = 16384\nzstd-level = 3\n[gc]\ninterval = 0\n";
    let mut server = Server::start_with(Backend::Local, schedule);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed("kill9-compact"), &CORPUS);
    let (first, later) = paths.split_at(2);
    push_all(&nix, &server, &src, first);
    let replica = server.replica();
    let mut rng = rand::rngs::StdRng::seed_from_u64(common::test_seed("compaction kill timing"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            // Pushes of the other paths, and substitutions of what is pushed, through the replica.
            push_all(&nix, &replica, &src, later);
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds == 0 {
                substitute_and_compare(&nix, &replica, &key, &src, &paths, "through the replica");
                rounds += 1;
            }
            rounds
        });
        for _ in 0..8 {
            std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(900..2500)));
            server.restart(); // SIGKILL, then a new process on the same address
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = traffic.join().unwrap();
        assert!(rounds >= 1);
    });
    assert!(!server.object_sizes("packs").is_empty(), "no scheduled compaction ran between the kills");
    // Whatever the kills left, a last run finishes the job and everything reads whole.
    server.stop();
    server.compact(&[]);
    assert!(server.object_sizes("chunks").values().all(|&len| len == POINTER_LEN), "a chunk was left loose");
    server.gc(&[]);
    server.restart();
    substitute_and_compare(&nix, &server, &key, &src, &paths, "after the kills");
    let report = server.fsck(&["--dry-run"]);
    assert!(!report.contains("damaged") && !report.contains("missing") && !report.contains("corrupt"), "{report}");
}
