//! Harness of the substituter and push tests: a real server, `flywheel substitute` and
//! `flywheel push` processes, a counting TCP proxy, a plain `file://` binary cache, and small
//! fake HTTP servers that answer garbage or wrong chunks. Missing prerequisites fail.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
#[macro_use]
pub mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

// Not every harness uses every helper it re-exports.
#[allow(unused_imports)]
pub use common::{hash_part, Backend, CountingProxy, KillOnDrop, Nix, NixVersion, Server, FLYWHEEL};
use flywheel_core::chunk::{ChunkHash, ChunkParams, Chunker};

/// A server with one private cache and a pull+push token, and a Nix with a build store.
pub struct Setup {
    pub nix: Nix,
    pub server: Server,
    pub cache: String,
    pub key: String,
    pub token: String,
    pub token_file: PathBuf,
    pub src: String,
}

impl Setup {
    /// A setup whose Nix is Debian's 2.8.
    pub fn new(cache: &str) -> Setup {
        Setup::of(cache, NixVersion::V2_8)
    }

    /// A setup whose Nix is `version`.
    pub fn of(cache: &str, version: NixVersion) -> Setup {
        let nix = Nix::of(version);
        let server = Server::start(Backend::Local);
        let key = server.create_cache(cache, false);
        let token = server.mint(&["--pull", cache, "--push", cache]);
        let token_file = server.dir.path().join("token");
        std::fs::write(&token_file, &token).unwrap();
        let src = nix.store("src");
        Setup { nix, server, cache: cache.to_string(), key, token, token_file, src }
    }

    /// Builds attributes of tests/corpus.nix in the source store.
    pub fn build(&self, tag: &str, attrs: &[&str]) -> Vec<String> {
        self.nix.build(&self.src, &common::unique_seed(tag), attrs)
    }

    /// Uploads paths (with closure) with `nix copy`, the reference client.
    pub fn nix_copy_to_server(&self, paths: &[String]) {
        let netrc = self.server.netrc(&self.token);
        let out = self.nix.copy_to(&self.src, &format!("{}/{}", self.server.url, self.cache), &netrc, paths);
        assert!(out.status.success(), "nix copy failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `flywheel push` of `paths` from the source store to `url` (the server or a proxy).
    pub fn push(&self, url: &str, paths: &[String], extra: &[&str]) -> std::process::Output {
        let mut cmd = self.nix.cmd(FLYWHEEL);
        cmd.args(["push", "--server", url, "--cache", &self.cache, "--token-file"])
            .arg(&self.token_file)
            .args(["--store", &format!("local?root={}", self.src)])
            .args(extra)
            .args(paths)
            .env("RUST_LOG", "info");
        cmd.output().unwrap()
    }

    /// Starts `flywheel substitute` against `url`.
    pub fn substitute(&self, url: &str, cache_dir: &Path) -> Substitute {
        Substitute::start(url, &self.cache, &self.token_file, cache_dir)
    }

    /// Whether the server holds `path` (its narinfo answers 200).
    pub fn server_has(&self, path: &str) -> bool {
        reqwest::blocking::Client::new()
            .get(format!("{}/{}/{}.narinfo", self.server.url, self.cache, hash_part(path)))
            .bearer_auth(&self.token)
            .send()
            .unwrap()
            .status()
            .is_success()
    }

    /// Realises `paths` into a fresh store `dst` by substitution only, with `substituters`
    /// in this order and signatures required.
    pub fn realise(&self, dst: &str, substituters: &[&str], keys: &[&str], paths: &[String]) -> std::process::Output {
        self.nix
            .cmd("nix-store")
            .args(["--store", dst, "--realise"])
            .args(paths)
            .args(["--option", "substituters", &substituters.join(" ")])
            .args(["--option", "trusted-public-keys", &keys.join(" ")])
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "connect-timeout", "5"])
            .output()
            .unwrap()
    }
}

/// A plain static binary cache (`file://`), signed with its own key.
pub struct StaticCache {
    pub url: String,
    pub public_key: String,
    _dir: tempfile::TempDir,
}

impl StaticCache {
    pub fn new(nix: &Nix, src: &str, paths: &[String]) -> StaticCache {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
        nix.run(nix.cmd("nix-store").arg("--generate-binary-cache-key").arg("second-cache-1").arg(&sk).arg(&pk));
        let cache = dir.path().join("cache");
        let url = format!("file://{}", cache.display());
        // A file:// cache without a Priority line counts as priority 0 in Nix 2.8, ahead of
        // everything; give it the priority of an ordinary second cache.
        let listed = format!("{url}?priority=50");
        nix.run(nix.cmd("nix").args(["copy", "--store", src, "--to"]).arg(format!("{url}?compression=zstd&secret-key={}", sk.display())).args(paths));
        StaticCache { url: listed, public_key: std::fs::read_to_string(&pk).unwrap().trim().to_string(), _dir: dir }
    }
}

/// A running `flywheel substitute`.
pub struct Substitute {
    child: Option<KillOnDrop>,
    pub url: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Substitute {
    pub fn start(server: &str, cache: &str, token_file: &Path, cache_dir: &Path) -> Substitute {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("substitute.log");
        let (child, url) = KillOnDrop::spawn_listening(
            Command::new(FLYWHEEL)
                .args(["substitute", "--server", server, "--cache", cache, "--token-file"])
                .arg(token_file)
                .arg("--cache-dir")
                .arg(cache_dir)
                .args(["--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap()),
            &log,
        );
        Substitute { child: Some(child), url, log, _dir: dir }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, rest: &str) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new().get(format!("{}/{rest}", self.url)).send().unwrap()
    }
}

/// A minimal HTTP/1.1 server: every request is read whole and answered by `handler`
/// (method, path, headers, body) -> (status, body), then the connection closes.
pub fn fake_http<F>(handler: F) -> String
where
    F: Fn(&str, &str, &[(String, String)], &[u8]) -> (u16, Vec<u8>) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let handler = handler.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut headers = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.trim().split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        headers.push((k.trim().to_string(), v.trim().to_string()));
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let (status, reply) = handler(&method, &path, &headers, &body);
                let mut stream = stream;
                let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", reply.len());
                let _ = stream.write_all(&reply);
            });
        }
    });
    url
}

/// Forwards a request to `target` (used by fake servers that tamper with some answers).
pub fn forward(target: &str, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> (u16, Vec<u8>) {
    let client = reqwest::blocking::Client::new();
    let mut request = client.request(method.parse().unwrap(), format!("{target}{path}"));
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("content-type") {
            request = request.header(k, v);
        }
    }
    match request.body(body.to_vec()).send() {
        Ok(response) => (response.status().as_u16(), response.bytes().map(|b| b.to_vec()).unwrap_or_default()),
        Err(err) => (502, err.to_string().into_bytes()),
    }
}

/// The chunks of a NAR, with the default parameters.
pub fn chunks_of(nar: &[u8]) -> Vec<(ChunkHash, usize)> {
    Chunker::chunk_all(ChunkParams::default(), nar).iter().map(|c| (ChunkHash::of(c), c.len())).collect()
}

/// Chunks of `new` that are not chunks of `old`: count and bytes.
pub fn new_chunks(old: &[u8], new: &[u8]) -> (u64, u64) {
    let old: HashSet<ChunkHash> = chunks_of(old).into_iter().map(|(h, _)| h).collect();
    let mut seen = HashSet::new();
    chunks_of(new)
        .into_iter()
        .filter(|(h, _)| !old.contains(h) && seen.insert(*h))
        .fold((0, 0), |(n, b), (_, len)| (n + 1, b + len as u64))
}
