//! Deep store paths end to end with real Nix 2.8 and 2.30, a path deeper than the limit refused, and
//! garbage collection and fsck carrying on past damaged objects.

#[macro_use]
mod common;

use std::process::Command;

use common::{hash_part, Backend, Nix, Server, FLYWHEEL, NixVersion};
use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::nar::{from_flat, parse, FlatIndex, NarWriter, Node, MAX_DEPTH};
use flywheel_core::nix::Sha256Hash;
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// Adds a store path that is a directory holding `depth - 1` nested directories named `d`,
/// with an executable file at the bottom, `depth` components below the top.
fn add_deep_path(nix: &Nix, store: &str, depth: usize) -> String {
    let top = nix.dir.path().join(format!("deep{depth}"));
    std::fs::create_dir(&top).unwrap();
    // A relative path from the top: the absolute one would exceed what one system call takes
    // for the deepest trees, though each stays under PATH_MAX.
    let rel = vec!["d"; depth - 1].join("/");
    let status = Command::new("sh")
        .current_dir(&top)
        .args(["-c", &format!("mkdir -p {rel} && echo deep > {rel}/file && chmod +x {rel}/file")])
        .status()
        .unwrap();
    assert!(status.success());
    let out = nix.run(nix.cmd("nix-store").args(["--store", store, "--add"]).arg(&top));
    out.trim().to_string()
}

nix_matrix! {
    deep_paths_round_trip_through_nix => deep_paths_round_trip_through_nix_with;
}

fn deep_paths_round_trip_through_nix_with(version: NixVersion) {
    let nix = Nix::of(version);
    let server = Server::start(Backend::Local);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let dst = nix.store("dst");
    // 100 levels, past serde_json's nesting limit; 1900, close to the deepest Nix 2.8 can
    // dump and restore under Linux's PATH_MAX with this store root (and within MAX_DEPTH).
    // Nix 2.30 refuses to dump or restore a NAR nested 64 directories deep or more, so it gets
    // the deepest path it takes.
    let depths: &[usize] = match version {
        NixVersion::V2_8 => &[100, 1900],
        NixVersion::V2_30 => &[60],
    };
    assert!(depths.iter().all(|&d| d <= MAX_DEPTH));
    let paths: Vec<String> = depths.iter().map(|&d| add_deep_path(&nix, &src, d)).collect();
    let push = server.netrc(&server.mint(&["--push", "ci", "--pull", "ci"]));
    let out = nix.copy_to(&src, &format!("{}/ci", server.url), &push, &paths);
    assert!(out.status.success(), "nix copy --to: {}", String::from_utf8_lossy(&out.stderr));
    let pull = server.netrc(&server.mint(&["--pull", "ci"]));
    let out = nix.copy_from(&dst, &format!("{}/ci", server.url), &pull, &key, &paths);
    assert!(out.status.success(), "nix copy --from: {}", String::from_utf8_lossy(&out.stderr));

    let client = Client::new();
    let token = server.mint(&["--pull", "ci"]);
    for (path, &depth) in paths.iter().zip(depths) {
        let (from, to) = (nix.path_info(&src, path), nix.path_info(&dst, path));
        assert_eq!(from.nar_hash, to.nar_hash, "{path}");
        assert!(nix.verify(&dst, path), "{path} does not verify in the destination store");
        assert_eq!(nix.dump(&src, path), nix.dump(&dst, path));

        let hash = hash_part(path);
        let ls = client.get(format!("{}/ci/{hash}.ls", server.url)).bearer_auth(&token).send().unwrap();
        assert_eq!(ls.status(), StatusCode::OK);
        let listing = ls.text().unwrap();
        assert!(listing.starts_with(r#"{"version":1,"root":{"type":"directory","entries":{"d":"#), "{}", &listing[..80]);
        assert_eq!(listing.matches(r#""type":"directory""#).count(), depth);
        assert!(listing.contains(r#""file":{"type":"regular","size":5,"executable":true,"narOffset":"#));

        let resp = client.get(format!("{}/_flywheel/v1/ci/manifest/{hash}", server.url)).bearer_auth(&token).send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let manifest: PathManifest = serde_json::from_slice(&resp.bytes().unwrap()).unwrap();
        manifest.manifest.validate().unwrap();
        assert_eq!(manifest.manifest.root.depth(), depth);
        assert_eq!(manifest.manifest.nar_size, from.nar_size);
    }
}

/// A NAR of `depth` nested directories named `d` with a file at the bottom (the file is at
/// depth `depth`).
fn deep_nar(depth: usize) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    for _ in 0..depth - 1 {
        w.start_directory().unwrap();
        w.entry(b"d").unwrap();
    }
    w.start_directory().unwrap();
    w.entry(b"f").unwrap();
    w.regular(false, 2, &mut &b"hi"[..]).unwrap();
    w.end_entry().unwrap();
    w.end_directory().unwrap();
    for _ in 0..depth - 1 {
        w.end_entry().unwrap();
        w.end_directory().unwrap();
    }
    w.into_inner()
}

/// Core's forms of a tree at the deepest nesting allowed, on a small stack: nothing may
/// recurse over the tree.
#[test]
fn the_deepest_tree_round_trips_through_every_form() {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let nar = deep_nar(MAX_DEPTH);
            let root = parse(&nar[..]).unwrap().root;
            assert_eq!(root.depth(), MAX_DEPTH);
            let flat = serde_json::to_vec(&FlatIndex(&root)).unwrap();
            let back = from_flat(&mut serde_json::Deserializer::from_slice(&flat)).unwrap();
            let mut listing = Vec::new();
            back.write_listing(&mut listing).unwrap();
            assert!(listing.ends_with(&b"}}".repeat(MAX_DEPTH)[..]));
            assert_eq!(back.lookup(&format!("{}f", "d/".repeat(MAX_DEPTH - 1))).map(|n| matches!(n, Node::Regular { size: 2, .. })), Some(true));
            drop((root, back));
            let err = parse(&deep_nar(MAX_DEPTH + 1)[..]).unwrap_err();
            assert!(err.message().contains("deeper"), "{err}");
        })
        .unwrap()
        .join()
        .unwrap();
}

/// A small NAR whose contents depend on `seed`.
fn small_nar(seed: &str) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.start_directory().unwrap();
    w.entry(b"data").unwrap();
    let contents: Vec<u8> = seed.bytes().cycle().take(200_000).collect();
    w.regular(false, contents.len() as u64, &mut &contents[..]).unwrap();
    w.end_entry().unwrap();
    w.end_directory().unwrap();
    w.into_inner()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uploads `nar` as `/nix/store/{hash}-{name}` through `upload-path`; returns the status.
fn upload(client: &Client, server: &Server, token: &str, hash: &str, name: &str, nar: &[u8]) -> StatusCode {
    use sha2::Digest;
    let info = serde_json::json!({
        "cache": "ci", "store_path_hash": hash, "store_path": format!("/nix/store/{hash}-{name}"),
        "references": [], "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": format!("sha256:{}", hex(&sha2::Sha256::digest(nar))), "nar_size": nar.len(),
    });
    client
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(token)
        .header("X-Attic-Nar-Info", info.to_string())
        .body(nar.to_vec())
        .send()
        .unwrap()
        .status()
}

fn status_of(client: &Client, url: &str, token: &str) -> StatusCode {
    client.get(url).bearer_auth(token).send().unwrap().status()
}

#[test]
fn a_path_deeper_than_the_limit_is_refused() {
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let token = server.admin_token();
    let client = Client::new();
    let before: Vec<String> = server.storage_snapshot().into_keys().filter(|k| !k.starts_with("chunks/")).collect();
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let status = upload(&client, &server, &token, hash, "too-deep", &deep_nar(MAX_DEPTH + 1));
    assert!(status.is_client_error(), "{status}");
    assert_eq!(status_of(&client, &format!("{}/ci/{hash}.narinfo", server.url), &token), StatusCode::NOT_FOUND);
    let after: Vec<String> = server.storage_snapshot().into_keys().filter(|k| !k.starts_with("chunks/")).collect();
    assert_eq!(before, after, "a refused upload left a manifest or a path record");
    // Exactly at the limit is accepted and reads back.
    let status = upload(&client, &server, &token, hash, "deep-enough", &deep_nar(MAX_DEPTH));
    assert_eq!(status, StatusCode::OK);
    for url in [format!("{}/ci/{hash}.ls", server.url), format!("{}/_flywheel/v1/ci/manifest/{hash}", server.url)] {
        assert_eq!(status_of(&client, &url, &token), StatusCode::OK, "{url}");
    }
}

fn run(server: &Server, args: &[&str]) -> String {
    let out = Command::new(FLYWHEEL).args(args).arg("--config").arg(&server.config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "flywheel {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn chunk_keys(server: &Server) -> Vec<String> {
    server.storage_snapshot().into_keys().filter(|k| k.starts_with("chunks/")).collect()
}

#[test]
fn gc_and_fsck_carry_on_past_damaged_objects() {
    let server = Server::start_with(Backend::Local, "[gc]\ninterval = 0\ngrace-period = 0\n");
    server.create_cache("ci", false);
    let token = server.admin_token();
    let client = Client::new();
    let hashes = ["1111111111111111111111111111111a", "2222222222222222222222222222222b", "3333333333333333333333333333333c"];
    let nars: Vec<Vec<u8>> = ["bad-manifest", "bad-record", "healthy"].iter().map(|s| small_nar(s)).collect();
    for ((hash, nar), name) in hashes.iter().zip(&nars).zip(["bad-manifest", "bad-record", "healthy"]) {
        assert_eq!(upload(&client, &server, &token, hash, name, nar), StatusCode::OK);
    }
    let manifest_key = |nar: &[u8]| format!("manifests/{}.json", Sha256Hash::digest(nar).to_base32_bare());
    let bad_manifest = manifest_key(&nars[0]);
    std::fs::write(server.objects.join(&bad_manifest), b"{\"version\":2,\"chunks\":[").unwrap();
    let bad_record = format!("caches/ci/paths/{}.json", hashes[1]);
    std::fs::write(server.objects.join(&bad_record), b"not json").unwrap();
    // A chunk nothing references, which a collection would take.
    let orphan = small_nar("orphan");
    assert_eq!(upload(&client, &server, &token, "4444444444444444444444444444444d", "orphan", &orphan), StatusCode::OK);
    assert_eq!(client.delete(format!("{}/ci/4444444444444444444444444444444d.narinfo", server.url)).bearer_auth(&token).send().unwrap().status(), StatusCode::OK);
    let chunks_before = chunk_keys(&server);

    // GC completes, names both, and deletes no chunk: the unreadable manifest is in use, so
    // which chunks it needs is unknown.
    let out = run(&server, &["gc"]);
    assert!(out.contains(&bad_manifest), "{out}");
    assert!(out.contains(&bad_record.replace(".json", "")), "{out}");
    assert!(out.contains("kept every chunk") && out.contains("kept every manifest"), "{out}");
    assert_eq!(chunk_keys(&server), chunks_before);
    assert!(server.objects.join(&bad_manifest).exists() && server.objects.join(manifest_key(&nars[1])).exists());

    // fsck completes, names both, takes them out of service and leaves the healthy path.
    let out = run(&server, &["fsck"]);
    assert!(out.contains(&format!("unreadable manifest for ci: {}-bad-manifest", hashes[0])), "{out}");
    assert!(out.contains(&format!("unreadable path record in ci: {}", hashes[1])), "{out}");
    for hash in &hashes[..2] {
        assert_eq!(status_of(&client, &format!("{}/ci/{hash}.narinfo", server.url), &token), StatusCode::NOT_FOUND);
    }
    let healthy = format!("{}/ci/nar/{}.nar", server.url, hashes[2]);
    assert_eq!(client.get(&healthy).bearer_auth(&token).send().unwrap().bytes().unwrap()[..], nars[2][..]);

    // With the damage gone, a collection sweeps again, keeping what the healthy path needs.
    let out = run(&server, &["gc"]);
    assert!(!out.contains("problem"), "{out}");
    assert!(!server.objects.join(&bad_manifest).exists());
    assert!(chunk_keys(&server).len() < chunks_before.len());
    assert_eq!(client.get(&healthy).bearer_auth(&token).send().unwrap().bytes().unwrap()[..], nars[2][..]);
    // The damaged paths can be pushed again.
    for ((hash, nar), name) in hashes.iter().zip(&nars).zip(["bad-manifest", "bad-record"]) {
        assert_eq!(upload(&client, &server, &token, hash, name, nar), StatusCode::OK);
        let nar_url = format!("{}/ci/nar/{hash}.nar", server.url);
        assert_eq!(client.get(&nar_url).bearer_auth(&token).send().unwrap().bytes().unwrap()[..], nar[..]);
    }
}
