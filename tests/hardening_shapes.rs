//! Adversarial NAR shapes: memory must follow what the server holds, not the shape of the
//! input. A deep tree of long names (where joining every entry's full path costs the depth
//! times the name length per entry) and a path of 100,000 files (whose manifest is tens of MB)
//! are uploaded, then read by 32 concurrent `.ls`, NAR and manifest requests, and the server's
//! peak RSS stays under 200 MiB throughout.

#[macro_use]
mod common;

use std::io::Read;

use common::{Backend, Server};
use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::nar::{NarWriter, Node};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use sha2::Digest;

/// Peak RSS the server may reach over the whole test.
const RSS_LIMIT: u64 = 200 << 20;

const NIXBASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// A store path hash part of 32 nixbase32 characters, distinct per `n`.
fn hash_part(n: u64) -> String {
    let mut seed = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
    (0..32)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            NIXBASE32[(seed >> 59) as usize] as char
        })
        .collect()
}

/// A name of exactly `len` bytes starting with `prefix`.
fn long_name(prefix: &str, len: usize) -> Vec<u8> {
    let mut name = prefix.as_bytes().to_vec();
    name.resize(len, b'x');
    name
}

/// `levels` nested directories with 255-byte names, each also holding `files_per_level`
/// small files with 255-byte names: about 8.7 MB for 250 levels of 80 files.
fn deep_long_names_nar(levels: usize, files_per_level: usize) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    let files = |w: &mut NarWriter<Vec<u8>>| {
        for i in 0..files_per_level {
            w.entry(&long_name(&format!("f{i:05}"), 255)).unwrap();
            w.regular(false, 8, &mut &b"contents"[..]).unwrap();
            w.end_entry().unwrap();
        }
    };
    // "d..." sorts before "f...": each directory's subdirectory comes first, its files after.
    for _ in 0..levels {
        w.start_directory().unwrap();
        w.entry(&long_name("d", 255)).unwrap();
    }
    w.start_directory().unwrap();
    files(&mut w);
    w.end_directory().unwrap();
    for _ in 0..levels {
        w.end_entry().unwrap();
        files(&mut w);
        w.end_directory().unwrap();
    }
    w.into_inner()
}

/// One directory of `count` small files with names of `name_len` bytes.
fn many_files_nar(count: usize, name_len: usize) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.start_directory().unwrap();
    for i in 0..count {
        w.entry(&long_name(&format!("file-{i:07}-"), name_len)).unwrap();
        let contents = format!("{i}\n");
        w.regular(i % 7 == 0, contents.len() as u64, &mut contents.as_bytes()).unwrap();
        w.end_entry().unwrap();
    }
    w.end_directory().unwrap();
    w.into_inner()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uploads `nar` through `PUT /_api/v1/upload-path`; returns the store path's hash part.
fn upload(client: &Client, server: &Server, token: &str, n: u64, name: &str, nar: &[u8]) -> String {
    let hash = hash_part(n);
    let info = serde_json::json!({
        "cache": "shapes", "store_path_hash": hash, "store_path": format!("/nix/store/{hash}-{name}"),
        "references": [], "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": format!("sha256:{}", hex(&sha2::Sha256::digest(nar))), "nar_size": nar.len(),
    });
    let resp = client
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(token)
        .header("X-Attic-Nar-Info", info.to_string())
        .body(nar.to_vec())
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "uploading {name}: {}", resp.text().unwrap());
    hash
}

/// Reads a response to its end without keeping it: its length and SHA-256.
fn drain(mut resp: reqwest::blocking::Response) -> (u64, [u8; 32]) {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = resp.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    (len, hasher.finalize().into())
}

fn get(client: &Client, url: &str, token: &str) -> reqwest::blocking::Response {
    let resp = client.get(url).bearer_auth(token).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    resp
}

/// The three reads of a path: its `.ls`, its NAR, its manifest from the chunk API.
fn urls(server: &Server, hash: &str) -> [String; 3] {
    [
        format!("{}/shapes/{hash}.ls", server.url),
        format!("{}/shapes/nar/{hash}.nar", server.url),
        format!("{}/_flywheel/v1/shapes/manifest/{hash}", server.url),
    ]
}

/// Checks each read of a path once, in full, and returns the length and hash of each.
fn check_reads(client: &Client, server: &Server, token: &str, hash: &str, nar: &[u8], files: usize, depth: usize) -> Vec<(u64, [u8; 32])> {
    let [ls, nar_url, manifest] = urls(server, hash);
    let listing = get(client, &ls, token).bytes().unwrap();
    assert!(listing.starts_with(br#"{"version":1,"root":{"type":"directory","entries":{"#));
    let regulars = listing.windows(17).filter(|w| w == br#"{"type":"regular""#).count();
    assert_eq!(regulars, files);
    let served = get(client, &nar_url, token).bytes().unwrap();
    assert!(served[..] == nar[..], "the NAR served differs from the one uploaded");
    let body = get(client, &manifest, token).bytes().unwrap();
    let parsed: PathManifest = serde_json::from_slice(&body).unwrap();
    parsed.manifest.validate().unwrap();
    assert_eq!(parsed.manifest.nar_size, nar.len() as u64);
    assert_eq!(parsed.manifest.root.file_count(), files);
    assert_eq!(parsed.manifest.root.depth(), depth);
    assert!(matches!(parsed.manifest.root, Node::Directory { .. }));
    [&listing[..], &served[..], &body[..]].iter().map(|b| (b.len() as u64, sha2::Sha256::digest(b).into())).collect()
}

/// `count` concurrent requests, the three kinds of read in turn; every answer complete and
/// equal to the one read alone.
fn burst(server: &Server, token: &str, hash: &str, expected: &[(u64, [u8; 32])], count: usize) {
    let urls = urls(server, hash);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..count)
            .map(|i| {
                let url = urls[i % 3].clone();
                scope.spawn(move || {
                    let client = Client::builder().timeout(std::time::Duration::from_secs(600)).build().unwrap();
                    (i % 3, drain(get(&client, &url, token)))
                })
            })
            .collect();
        for worker in workers {
            let (kind, got) = worker.join().unwrap();
            assert_eq!(got, expected[kind], "{}", urls[kind]);
        }
    });
}

#[test]
fn adversarial_shapes_keep_the_server_small() {
    // Each NAR stream holds up to `chunk-parallelism` verified chunks ahead of the client (64
    // by default: about 5 MB a stream), which is the chunk pipeline's cost per concurrent
    // download, the same for every shape. 16 keeps that share small, so the figure measures
    // what the shapes cost.
    let server = Server::start_with(Backend::Local, "chunk-parallelism = 16");
    server.create_cache("shapes", false);
    let token = server.admin_token();
    let client = Client::builder().timeout(std::time::Duration::from_secs(600)).build().unwrap();

    let deep = deep_long_names_nar(250, 80);
    assert!(deep.len() > 8_500_000, "{}", deep.len());
    eprintln!("peak RSS at start: {} MiB", server.peak_rss() >> 20);
    let deep_hash = upload(&client, &server, &token, 1, "deep-long-names", &deep);
    eprintln!("peak RSS after uploading the deep NAR: {} MiB", server.peak_rss() >> 20);
    let expected = check_reads(&client, &server, &token, &deep_hash, &deep, 251 * 80, 251);
    drop(deep);
    burst(&server, &token, &deep_hash, &expected, 32);
    let after_deep = server.peak_rss();
    eprintln!("peak RSS after the deep NAR: {} MiB", after_deep >> 20);

    let many = many_files_nar(100_000, 120);
    let many_hash = upload(&client, &server, &token, 2, "many-files", &many);
    eprintln!("peak RSS after uploading 100,000 files: {} MiB", server.peak_rss() >> 20);
    let expected = check_reads(&client, &server, &token, &many_hash, &many, 100_000, 1);
    eprintln!(
        "100,000 files: NAR {} MB, manifest {} MB, listing {} MB",
        expected[1].0 >> 20,
        expected[2].0 >> 20,
        expected[0].0 >> 20
    );
    eprintln!("peak RSS after reading them once: {} MiB", server.peak_rss() >> 20);
    drop(many);
    burst(&server, &token, &many_hash, &expected, 32);
    eprintln!("peak RSS after 32 concurrent reads: {} MiB", server.peak_rss() >> 20);
    let peak = server.peak_rss();
    eprintln!("peak RSS of the server: {} MiB", peak >> 20);
    assert!(peak < RSS_LIMIT, "server peak RSS {} MiB, over {} MiB", peak >> 20, RSS_LIMIT >> 20);
}
