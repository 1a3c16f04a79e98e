//! Issue 17, hardening: a client that is silent, slow or stalled cannot hold the server. Idle
//! and half-sent connections are closed, trickling uploads are cut, reads go on while a
//! thousand uploads stall, idlers past the connection limit lock nobody out, and a chunk size
//! no chunk can have is refused before it sizes a buffer.
//!
//! Servers here run with timeouts of a second or two so that the tests are quick; every wait
//! is on a condition (a closed socket, an answer), bounded by a generous client timeout.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{hash_part, Backend, Server};
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// How long a test waits for the server to do what a one- or two-second timeout makes it do.
const GENEROUS: Duration = Duration::from_secs(30);

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(GENEROUS)).unwrap();
    stream
}

/// Reads until the server closes the connection; what it sent before. Fails when the server
/// keeps it open past [`GENEROUS`].
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return seen,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept the connection open for {GENEROUS:?}; it sent {:?}", String::from_utf8_lossy(&seen))
            }
            Err(err) => panic!("reading: {err}"),
        }
    }
}

/// The status of the first response in `bytes`.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

/// A published store path and its NAR.
struct Published {
    path: String,
    nar: Vec<u8>,
}

/// Publishes a small path through `upload-path`, without Nix: the NAR of a directory made here.
fn publish(server: &Server, cache: &str, token: &str) -> Published {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("data"), common::unique_seed("hardening").repeat(5000)).unwrap();
    let mut nar = Vec::new();
    flywheel_core::nar::dump_path(&root, &mut nar).unwrap();
    let hash = flywheel_core::nix::base32::encode(&rand::random::<[u8; 20]>());
    let path = format!("/nix/store/{hash}-hardening");
    let info = serde_json::json!({
        "cache": cache, "store_path_hash": hash, "store_path": path, "references": [],
        "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": flywheel_core::nix::Sha256Hash::digest(&nar).to_nix_base32(), "nar_size": nar.len(),
    });
    let resp = client()
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(token)
        .header("X-Attic-Nar-Info", info.to_string())
        .body(nar.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    Published { path, nar }
}

fn client() -> Client {
    Client::builder().timeout(GENEROUS).build().unwrap()
}

/// The narinfo and the NAR of `published` come back whole.
fn assert_served(server: &Server, cache: &str, token: &str, published: &Published) {
    let client = client();
    let narinfo = client
        .get(format!("{}/{cache}/{}.narinfo", server.url, hash_part(&published.path)))
        .bearer_auth(token)
        .send()
        .expect("narinfo");
    assert_eq!(narinfo.status(), StatusCode::OK);
    assert!(narinfo.text().unwrap().contains(&published.path));
    let nar = client
        .get(format!("{}/{cache}/nar/{}.nar", server.url, hash_part(&published.path)))
        .bearer_auth(token)
        .send()
        .expect("NAR");
    assert_eq!(nar.status(), StatusCode::OK);
    assert!(nar.bytes().unwrap() == published.nar, "the NAR came back different");
}

/// The headers of a NAR upload that announces `len` body bytes.
fn upload_head(cache: &str, token: &str, len: usize) -> String {
    format!(
        "PUT /{cache}/nar/{}.nar HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\n\r\n",
        rand::random::<u64>()
    )
}

/// Lets this process hold a few thousand sockets (the server, its child, inherits the limit).
fn raise_open_file_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            assert!(limit.rlim_max >= wanted, "the hard open file limit {} is under {wanted}", limit.rlim_max);
            limit.rlim_cur = wanted;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

/// A connection that sends nothing, and one whose headers stop halfway, are closed at the
/// header timeout (the idle timeout is far longer, so it is not what closes them).
#[test]
fn silent_and_half_sent_connections_are_closed() {
    let server = Server::start_with(Backend::Local, "[limits]\nheader-read-timeout = 1\nidle-timeout = 3600\n");
    let mut silent = connect(&server);
    let mut half = connect(&server);
    half.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").unwrap();
    assert_eq!(read_until_closed(&mut silent), b"");
    assert_eq!(status_of(&read_until_closed(&mut half)), None, "half-sent headers were answered");
    // A client that sends its request at once is served.
    let mut prompt = connect(&server);
    prompt.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(status_of(&read_until_closed(&mut prompt)), Some(200));
}

/// A kept-alive connection is closed once it idles past the idle timeout (the header timeout
/// is far longer, so it is not what closes it).
#[test]
fn idle_keep_alive_connections_are_closed() {
    let server = Server::start_with(Backend::Local, "[limits]\nheader-read-timeout = 3600\nidle-timeout = 1\n");
    let mut stream = connect(&server);
    stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let seen = read_until_closed(&mut stream);
    assert_eq!(status_of(&seen), Some(200));
    assert!(String::from_utf8_lossy(&seen).ends_with("flywheel cache server\n"), "{}", String::from_utf8_lossy(&seen));
}

/// An upload that trickles at about a byte a second is cut at the minimum body rate, and one
/// that stops sending at the body timeout; both get an answer and lose their connection, and
/// the server serves on.
#[test]
fn slow_and_stalled_uploads_are_cut() {
    let server = Server::start_with(Backend::Local, "[limits]\nbody-idle-timeout = 2\nbody-min-rate = 1024\n");
    server.create_cache("ci", false);
    let token = server.admin_token();
    let published = publish(&server, "ci", &token);

    // One byte, then a wait of up to a second for an answer, a hundred times over: an upload
    // the server never cut would take a hundred seconds.
    let mut trickle = connect(&server);
    trickle.write_all(upload_head("ci", &token, published.nar.len()).as_bytes()).unwrap();
    trickle.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut answer = Vec::new();
    let mut sent = 0;
    let mut buf = [0u8; 4096];
    while sent < 100 {
        match trickle.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if trickle.write_all(&published.nar[sent..sent + 1]).is_err() {
                    break;
                }
                sent += 1;
            }
            Err(err) if err.kind() == ErrorKind::ConnectionReset => break,
            Err(err) => panic!("reading: {err}"),
        }
        if !answer.is_empty() {
            trickle.set_read_timeout(Some(GENEROUS)).unwrap();
            answer.extend(read_until_closed(&mut trickle));
            break;
        }
    }
    assert!(sent < 100, "a 1 byte/s upload ran for {sent} bytes without being cut");
    assert_eq!(status_of(&answer), Some(400), "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("body-min-rate"), "{}", String::from_utf8_lossy(&answer));

    // Headers and a first piece, then nothing.
    let mut stalled = connect(&server);
    stalled.write_all(upload_head("ci", &token, published.nar.len()).as_bytes()).unwrap();
    stalled.write_all(&published.nar[..64]).unwrap();
    let answer = read_until_closed(&mut stalled);
    assert_eq!(status_of(&answer), Some(400), "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("body-idle-timeout"), "{}", String::from_utf8_lossy(&answer));

    assert_served(&server, "ci", &token, &published);
}

/// Open descriptors of a process.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A thousand uploads that send their headers and a first piece and then stall hold neither
/// the server's threads nor its reads: narinfo and NAR are served while they stall, and the
/// uploads past `max-uploads` are refused with 503 once they waited `upload-queue-timeout`.
/// (Before, each stalled upload held a thread of the blocking pool, and once the pool was
/// taken every local storage read hung.)
#[test]
fn reads_go_on_while_a_thousand_uploads_stall() {
    const STALLED: usize = 1000;
    raise_open_file_limit(4096);
    let server = Server::start_with(
        Backend::Local,
        "[limits]\nmax-connections = 2000\nmax-uploads = 16\nupload-queue-timeout = 10\nbody-idle-timeout = 600\n",
    );
    server.create_cache("ci", false);
    let token = server.admin_token();
    let published = publish(&server, "ci", &token);
    let before = open_files(server.pid());

    let mut uploads = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut stream = connect(&server);
        stream.write_all(upload_head("ci", &token, published.nar.len()).as_bytes()).unwrap();
        stream.write_all(&published.nar[..64]).unwrap();
        uploads.push(stream);
    }
    // Wait until the server holds them all.
    let deadline = Instant::now() + GENEROUS;
    while open_files(server.pid()) < before + STALLED {
        assert!(Instant::now() < deadline, "the server accepted {} of {STALLED} uploads", open_files(server.pid()) - before);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_served(&server, "ci", &token, &published);

    // The last upload waited behind the first ones: refused, cleanly.
    let mut last = uploads.pop().unwrap();
    let answer = read_until_closed(&mut last);
    assert_eq!(status_of(&answer), Some(503), "{}", String::from_utf8_lossy(&answer));
    assert_served(&server, "ci", &token, &published);
}

/// More idle sockets than the connection limit: they wait in the backlog and are closed at the
/// header timeout in turn, and a well-behaved client behind them is served.
#[test]
fn idlers_past_the_connection_limit_lock_nobody_out() {
    let server = Server::start_with(Backend::Local, "[limits]\nmax-connections = 16\nheader-read-timeout = 1\n");
    let idlers: Vec<TcpStream> = (0..48).map(|_| connect(&server)).collect();
    let resp = client().get(format!("{}/", server.url)).send().expect("a client behind the idlers was not served");
    assert_eq!(resp.status(), StatusCode::OK);
    for mut idler in idlers {
        assert_eq!(read_until_closed(&mut idler), b"");
    }
}

/// `POST chunks` with sizes no chunk can have (4 GiB - 1, the most a u32 holds) is refused as a
/// bad request, anonymously on a public cache, before anything is allocated; the server
/// stays up and answers proper requests.
#[test]
fn impossible_chunk_sizes_are_refused() {
    let server = Server::start(Backend::Local);
    server.create_cache("pub", true);
    let token = server.admin_token();
    let published = publish(&server, "pub", &token);
    let client = client();
    let manifest: serde_json::Value = client
        .get(format!("{}/_flywheel/v1/pub/manifest/{}", server.url, hash_part(&published.path)))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let chunks = manifest["manifest"]["chunks"].as_array().unwrap().clone();
    let real_hash = chunks[0]["hash"].as_str().unwrap().to_string();
    let huge: Vec<serde_json::Value> =
        (0..64).map(|_| serde_json::json!({"hash": real_hash, "size": u32::MAX})).collect();
    let chunks_url = format!("{}/_flywheel/v1/pub/chunks", server.url);
    let resp = client.post(&chunks_url).json(&serde_json::json!({ "path": hash_part(&published.path), "chunks": huge })).send().unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().unwrap().contains("over the limit"));
    let resp = client.post(&chunks_url).json(&serde_json::json!({ "path": hash_part(&published.path), "chunks": chunks })).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.bytes().unwrap().is_empty());
    assert_served(&server, "pub", &token, &published);
}

/// Sends a request head and `body_len` zero bytes of body (from another thread, which stops
/// when the server stops reading), and reads the answer: its status and its body (by its
/// `Content-Length`).
fn raw_exchange(server: &Server, head: &str, body_len: usize) -> (u16, Vec<u8>) {
    let mut stream = connect(server);
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let piece = [0u8; 64 << 10];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(piece.len());
            if writer.write_all(&piece[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let body_start = loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed before answering: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    };
    let head_text = String::from_utf8_lossy(&seen[..body_start]).to_ascii_lowercase();
    let len: usize = head_text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("the answer has a Content-Length");
    while seen.len() < body_start + len {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the answer was cut short");
        seen.extend_from_slice(&buf[..n]);
    }
    (status_of(&seen).expect("an HTTP/1.1 status line"), seen[body_start..body_start + len].to_vec())
}

/// Refusals by the request parsers themselves (a path segment that is not UTF-8, a query that
/// does not parse, a body over the limit) answer with Attic's error body and their own status,
/// like every other refusal.
#[test]
fn parser_refusals_answer_with_attics_error_body() {
    let server = Server::start(Backend::Local);
    server.create_cache("pub", true);
    let token = server.admin_token();
    let zeros = "0".repeat(64);
    let too_big = 17 << 20;
    let cases = [
        ("GET /_flywheel/v1/pub/chunk/%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), 0, 400),
        (format!("GET /_flywheel/v1/pub/chunk/{zeros}?path=a&path=b HTTP/1.1\r\nHost: x\r\n\r\n"), 0, 400),
        (
            format!("POST /_flywheel/v1/pub/upload-chunks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {too_big}\r\n\r\n"),
            too_big,
            413,
        ),
        (
            format!("PUT /_flywheel/v1/pub/chunk/{zeros} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {too_big}\r\n\r\n"),
            too_big,
            413,
        ),
    ];
    for (head, body_len, status) in cases {
        let what = head.lines().next().unwrap_or_default().to_string();
        let (got, body) = raw_exchange(&server, &head, body_len);
        assert_eq!(got, status, "{what}");
        let body: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{what}: the refusal is not JSON ({e}): {:?}", String::from_utf8_lossy(&body)));
        assert_eq!(body["code"], status, "{what}: {body}");
        assert_eq!(body["error"], "RequestError", "{what}: {body}");
        assert!(!body["message"].as_str().unwrap_or_default().is_empty(), "{what}: {body}");
    }
}
