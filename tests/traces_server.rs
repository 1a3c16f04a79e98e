//! Access traces on the server (`GET|PUT /_flywheel/v1/{cache}/trace/{key}`): a PUT merges the
//! run into the stored trace, permissions are those of pulls and pushes and are checked before
//! the body, bad keys and bodies are refused with nothing stored, and garbage collection
//! expires traces without ever keeping a chunk alive for one. On local storage and on S3.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use common::{Backend, Server};
use flywheel_core::api::v1::traces::{Trace, MAX_TRACE_AGE, MAX_TRACE_BODY};
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

const NUMPY: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-numpy-1.26";
const PYTHON: &str = "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-python3-3.11";

/// A chunk no cache stores: traces are hints and may name such chunks.
fn chunk(n: u8) -> ChunkRef {
    ChunkRef { hash: ChunkHash::of(&[n; 3]), size: 3 }
}

fn trace_url(server: &Server, cache: &str, key: &str) -> String {
    format!("{}/_flywheel/v1/{cache}/trace/{key}", server.url)
}

fn put_trace(client: &Client, server: &Server, cache: &str, key: &str, token: Option<&str>, body: Vec<u8>) -> Response {
    let request = client.put(trace_url(server, cache, key)).header("Content-Type", "application/json").body(body);
    match token {
        Some(token) => request.bearer_auth(token).send().unwrap(),
        None => request.send().unwrap(),
    }
}

fn get_trace(client: &Client, server: &Server, cache: &str, key: &str, token: Option<&str>) -> Response {
    let request = client.get(trace_url(server, cache, key));
    match token {
        Some(token) => request.bearer_auth(token).send().unwrap(),
        None => request.send().unwrap(),
    }
}

/// The status and JSON body of an answer, failing on a body that is not JSON.
fn answer(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: the body is not JSON ({e}): {text:?}"));
    (status, body)
}

/// An error answer: its status, checked against the JSON error body's `code`.
fn refusal(resp: Response) -> (StatusCode, String) {
    let (status, body) = answer(resp);
    assert_eq!(body["code"].as_u64(), Some(u64::from(status.as_u16())), "{body}");
    (status, body["error"].as_str().unwrap_or_default().to_string())
}

/// `(path, chunk hash, size, age)` of each entry of a trace's JSON, in order.
fn entries(trace: &Value) -> Vec<(String, String, u64, u64)> {
    let paths = trace["paths"].as_array().expect("a trace lists paths");
    trace["chunks"]
        .as_array()
        .expect("a trace lists chunks")
        .iter()
        .map(|e| {
            let path = paths[e[0].as_u64().unwrap() as usize].as_str().unwrap().to_string();
            (path, e[1].as_str().unwrap().to_string(), e[2].as_u64().unwrap(), e[3].as_u64().unwrap())
        })
        .collect()
}

fn entry(path: &str, chunk: ChunkRef, age: u64) -> (String, String, u64, u64) {
    (path.to_string(), chunk.hash.to_string(), u64::from(chunk.size), age)
}

/// The stored trace objects of a cache, by key, with their sizes and digests.
fn stored_traces(server: &Server, cache: &str) -> BTreeMap<String, (u64, [u8; 32])> {
    let prefix = format!("caches/{cache}/traces/");
    server.storage_snapshot().into_iter().filter(|(key, _)| key.starts_with(&prefix)).collect()
}

/// Sends `len` bytes of body in chunked transfer encoding (no length announced), all of them,
/// then returns the first bytes of the answer.
fn raw_chunked_request(server: &Server, path: &str, token: &str, len: usize) -> String {
    let addr = server.url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let head = format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let piece = vec![b' '; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(piece.len());
        // The server may answer and close once it has read past its limit.
        if stream.write_all(format!("{n:x}\r\n").as_bytes()).and_then(|_| stream.write_all(&piece[..n])).and_then(|_| stream.write_all(b"\r\n")).is_err() {
            break;
        }
        left -= n;
    }
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).unwrap_or(0);
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// A PUT stores the run; a second run is merged in front of it, the first run's other
/// entries one run older; entries unread for more than `MAX_TRACE_AGE` runs are dropped.
/// Chunks nobody stores are accepted: a trace is a hint.
fn put_get_and_merge(backend: Backend) {
    let server = Server::start(backend);
    server.create_cache("ci", false);
    let admin = server.admin_token();
    let client = Client::new();

    assert_eq!(refusal(get_trace(&client, &server, "ci", "job", Some(&admin))), (StatusCode::NOT_FOUND, "NotFound".into()));

    let first = Trace::from_reads([(NUMPY, chunk(1)), (NUMPY, chunk(2)), (PYTHON, chunk(3)), (NUMPY, chunk(1))]);
    let (status, summary) = answer(put_trace(&client, &server, "ci", "job", Some(&admin), serde_json::to_vec(&first).unwrap()));
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary, json!({"paths": 2, "chunks": 3, "dropped": 0}));
    let (status, stored) = answer(get_trace(&client, &server, "ci", "job", Some(&admin)));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["version"], 1);
    assert_eq!(entries(&stored), vec![entry(NUMPY, chunk(1), 0), entry(NUMPY, chunk(2), 0), entry(PYTHON, chunk(3), 0)]);
    assert_eq!(serde_json::from_value::<Trace>(stored).unwrap(), first);

    // The next run reads a new chunk first, then one of the first run's.
    let second = Trace::from_reads([(PYTHON, chunk(4)), (NUMPY, chunk(2))]);
    let (status, summary) = answer(put_trace(&client, &server, "ci", "job", Some(&admin), serde_json::to_vec(&second).unwrap()));
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary, json!({"paths": 2, "chunks": 4, "dropped": 0}));
    let (_, stored) = answer(get_trace(&client, &server, "ci", "job", Some(&admin)));
    assert_eq!(
        entries(&stored),
        vec![entry(PYTHON, chunk(4), 0), entry(NUMPY, chunk(2), 0), entry(NUMPY, chunk(1), 1), entry(PYTHON, chunk(3), 1)],
        "the newest run first, then the older entries one run older: {stored}"
    );

    // Chunks 1 and 3 stay unread: they age until they pass MAX_TRACE_AGE, then go.
    let mut last = Value::Null;
    for _ in 0..MAX_TRACE_AGE {
        let (status, summary) = answer(put_trace(&client, &server, "ci", "job", Some(&admin), serde_json::to_vec(&second).unwrap()));
        assert_eq!(status, StatusCode::OK, "{summary}");
        last = summary;
    }
    assert_eq!(last, json!({"paths": 2, "chunks": 2, "dropped": 2}));
    let (_, stored) = answer(get_trace(&client, &server, "ci", "job", Some(&admin)));
    assert_eq!(entries(&stored), vec![entry(PYTHON, chunk(4), 0), entry(NUMPY, chunk(2), 0)]);

    // Keys are separate, and the trace is the only thing stored: no chunk, no path.
    assert_eq!(refusal(get_trace(&client, &server, "ci", "other-job", Some(&admin))).0, StatusCode::NOT_FOUND);
    assert_eq!(stored_traces(&server, "ci").keys().collect::<Vec<_>>(), vec!["caches/ci/traces/job"]);
    assert!(server.object_sizes("chunks").is_empty(), "{:?}", server.object_sizes("chunks"));
    assert!(server.object_sizes("caches/ci/paths").is_empty());
}

/// GET needs pull and PUT needs push on the cache the URL names, checked before the body; a
/// token of another cache gets the same answer as on a cache that does not exist.
fn permissions(backend: Backend) {
    let server = Server::start(backend);
    for (cache, public) in [("a", false), ("b", false), ("open", true)] {
        server.create_cache(cache, public);
    }
    let admin = server.admin_token();
    let client = Client::new();
    let run = |n: u8| serde_json::to_vec(&Trace::from_reads([(NUMPY, chunk(n))])).unwrap();
    for cache in ["a", "b", "open"] {
        assert_eq!(put_trace(&client, &server, cache, "job", Some(&admin), run(1)).status(), StatusCode::OK);
    }

    // Without a token: 401 on a private cache, both ways.
    assert_eq!(refusal(get_trace(&client, &server, "a", "job", None)).0, StatusCode::UNAUTHORIZED);
    assert_eq!(refusal(put_trace(&client, &server, "a", "job", None, run(2))).0, StatusCode::UNAUTHORIZED);
    // A public cache's traces are read by anyone, and written by pushers only.
    assert_eq!(get_trace(&client, &server, "open", "job", None).status(), StatusCode::OK);
    assert_eq!(refusal(put_trace(&client, &server, "open", "job", None, run(2))).0, StatusCode::UNAUTHORIZED);

    // Pull reads, and may not write.
    let pull_a = server.mint(&["--pull", "a"]);
    assert_eq!(get_trace(&client, &server, "a", "job", Some(&pull_a)).status(), StatusCode::OK);
    assert_eq!(refusal(put_trace(&client, &server, "a", "job", Some(&pull_a), run(2))), (StatusCode::FORBIDDEN, "AccessError".into()));
    // Push writes, and may not read.
    let push_a = server.mint(&["--push", "a"]);
    let (status, summary) = answer(put_trace(&client, &server, "a", "job", Some(&push_a), run(2)));
    assert_eq!((status, summary), (StatusCode::OK, json!({"paths": 1, "chunks": 2, "dropped": 0})));
    assert_eq!(refusal(get_trace(&client, &server, "a", "job", Some(&push_a))).0, StatusCode::FORBIDDEN);

    // A token of a learns and changes nothing of b: the answer is the one for a cache that
    // does not exist.
    let both_a = server.mint(&["--pull", "a", "--push", "a"]);
    let b_before = stored_traces(&server, "b");
    for cache in ["b", "nowhere"] {
        let got = refusal(get_trace(&client, &server, cache, "job", Some(&both_a)));
        assert_eq!(got, (StatusCode::UNAUTHORIZED, "Unauthorized".into()), "GET on {cache}");
        let got = refusal(put_trace(&client, &server, cache, "job", Some(&both_a), run(3)));
        assert_eq!(got, (StatusCode::UNAUTHORIZED, "Unauthorized".into()), "PUT on {cache}");
    }
    assert_eq!(stored_traces(&server, "b"), b_before);
    let (_, b_trace) = answer(get_trace(&client, &server, "b", "job", Some(&admin)));
    assert_eq!(entries(&b_trace), vec![entry(NUMPY, chunk(1), 0)]);

    // The token is checked before the body: 1 MiB announced, 1 KiB sent, and the refusal
    // comes anyway (a server reading the body first would wait for the rest).
    let path = "/_flywheel/v1/a/trace/job";
    let anonymous = server.raw_request("PUT", path, &[], 1 << 20, &[b'{'; 1024], false);
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous:?}");
    let pull = server.raw_request("PUT", path, &[("Authorization", format!("Bearer {pull_a}"))], 1 << 20, &[b'{'; 1024], false);
    assert!(pull.starts_with("HTTP/1.1 403"), "{pull:?}");
}

/// Bad keys and bad bodies are refused with a 400 and leave the stored trace as it was.
fn bad_input_is_refused(backend: Backend) {
    let server = Server::start(backend);
    server.create_cache("ci", false);
    let admin = server.admin_token();
    let client = Client::new();
    let good = Trace::from_reads([(NUMPY, chunk(1)), (PYTHON, chunk(2))]);
    let good_body = serde_json::to_vec(&good).unwrap();
    assert_eq!(put_trace(&client, &server, "ci", "job", Some(&admin), good_body.clone()).status(), StatusCode::OK);
    let before = stored_traces(&server, "ci");
    assert_eq!(before.len(), 1);
    let unchanged = |label: &str| {
        assert_eq!(stored_traces(&server, "ci"), before, "{label}: something was stored");
        let (status, stored) = answer(get_trace(&client, &server, "ci", "job", Some(&admin)));
        assert_eq!(status, StatusCode::OK, "{label}");
        assert_eq!(serde_json::from_value::<Trace>(stored).unwrap(), good, "{label}");
    };

    // Keys that are not keys, on PUT and GET.
    for key in ["a%2Fb", ".hidden", "-x", &"k".repeat(200), "a%20b"] {
        let got = refusal(put_trace(&client, &server, "ci", key, Some(&admin), good_body.clone()));
        assert_eq!(got.0, StatusCode::BAD_REQUEST, "PUT {key}");
        assert_eq!(refusal(get_trace(&client, &server, "ci", key, Some(&admin))).0, StatusCode::BAD_REQUEST, "GET {key}");
        unchanged(key);
    }
    // `..` as a segment, which HTTP clients resolve away before sending.
    let auth = [("Authorization", format!("Bearer {admin}")), ("Content-Type", "application/json".to_string())];
    let dots = server.raw_request("PUT", "/_flywheel/v1/ci/trace/..", &auth, good_body.len(), &good_body, false);
    assert!(dots.starts_with("HTTP/1.1 400"), "{dots:?}");
    unchanged("..");

    // Bodies that are not traces.
    let value = serde_json::to_value(&good).unwrap();
    let edited = |edit: &dyn Fn(&mut Value)| {
        let mut v = value.clone();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{\"version\": 1, \"paths\": [".to_vec()),
        ("empty", Vec::new()),
        ("wrong version", edited(&|v| v["version"] = 2.into())),
        ("path index out of range", edited(&|v| v["chunks"][1][0] = 2.into())),
        ("not a store path", edited(&|v| v["paths"][0] = "../../etc/passwd".into())),
        ("age past the limit", edited(&|v| v["chunks"][0][3] = (MAX_TRACE_AGE + 1).into())),
        ("impossible chunk size", edited(&|v| v["chunks"][0][2] = u32::MAX.into())),
        ("unknown field", edited(&|v| v["extra"] = true.into())),
    ];
    for (label, body) in cases {
        let got = refusal(put_trace(&client, &server, "ci", "job", Some(&admin), body));
        assert_eq!(got, (StatusCode::BAD_REQUEST, "RequestError".into()), "{label}");
        unchanged(label);
    }
    let resp = client
        .put(trace_url(&server, "ci", "job"))
        .bearer_auth(&admin)
        .header("Content-Encoding", "zstd")
        .body(zstd::bulk::compress(&good_body, 3).unwrap())
        .send()
        .unwrap();
    assert_eq!(refusal(resp).0, StatusCode::BAD_REQUEST, "zstd body");
    unchanged("zstd body");

    // Past MAX_TRACE_BODY: announced, refused before the body is read; or sent without a
    // length, refused once the server has read past the bound.
    let over = server.raw_request("PUT", "/_flywheel/v1/ci/trace/job", &auth, MAX_TRACE_BODY + 1, &[b' '; 1024], false);
    assert!(over.starts_with("HTTP/1.1 400"), "{over:?}");
    unchanged("announced over the limit");
    let over = raw_chunked_request(&server, "/_flywheel/v1/ci/trace/job", &admin, MAX_TRACE_BODY + 1);
    assert!(over.starts_with("HTTP/1.1 400"), "{over:?}");
    unchanged("sent over the limit");
    // A body at the bound is read (and this one, JSON padded with spaces, accepted).
    let mut padded = good_body.clone();
    padded.resize(MAX_TRACE_BODY, b' ');
    assert_eq!(put_trace(&client, &server, "ci", "job", Some(&admin), padded).status(), StatusCode::OK);
}

/// A stored trace that no longer decompresses or parses is a hint lost, not damage: GET
/// answers 404, a PUT stores the run as if nothing was there, and the server says so in its
/// log. (Local storage only: the test writes the object's file behind the server's back.)
#[test]
fn corrupt_stored_trace_is_treated_as_absent() {
    let server = Server::start(Backend::Local);
    server.create_cache("ci", false);
    let admin = server.admin_token();
    let client = Client::new();
    let first = Trace::from_reads([(NUMPY, chunk(1))]);
    assert_eq!(put_trace(&client, &server, "ci", "job", Some(&admin), serde_json::to_vec(&first).unwrap()).status(), StatusCode::OK);
    let object = server.objects.join("caches/ci/traces/job");
    assert!(object.is_file(), "{}", object.display());
    let json = serde_json::to_vec(&first).unwrap();
    for (label, garbage) in [
        ("not zstd", b"not a zstd frame".to_vec()),
        ("zstd of no trace", zstd::bulk::compress(b"{\"version\": 1}", 3).unwrap()),
        ("cut short", zstd::bulk::compress(&json, 3).unwrap()[..8].to_vec()),
    ] {
        std::fs::write(&object, garbage).unwrap();
        assert_eq!(refusal(get_trace(&client, &server, "ci", "job", Some(&admin))), (StatusCode::NOT_FOUND, "NotFound".into()), "{label}");
        let run = Trace::from_reads([(PYTHON, chunk(2))]);
        let (status, summary) = answer(put_trace(&client, &server, "ci", "job", Some(&admin), serde_json::to_vec(&run).unwrap()));
        assert_eq!((status, summary), (StatusCode::OK, json!({"paths": 1, "chunks": 1, "dropped": 0})), "{label}");
        let (_, stored) = answer(get_trace(&client, &server, "ci", "job", Some(&admin)));
        assert_eq!(serde_json::from_value::<Trace>(stored).unwrap(), run, "{label}");
    }
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(log.contains("the stored trace does not parse"), "no warning in the server log");
}


/// The number of access traces a `flywheel gc` report freed (or would).
fn traces_in(report: &str) -> usize {
    report
        .lines()
        .flat_map(|l| l.split(", "))
        .find_map(|part| part.strip_suffix(" access traces"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of access traces in the gc report:\n{report}"))
}

/// Traces expire with their cache's retention period, counted from their last PUT; a trace
/// in a cache with a long period stays. A trace never keeps a chunk alive: a chunk only a
/// trace names goes like any unreferenced chunk.
fn traces_expire_with_retention(backend: Backend) {
    // No collection inside the server, and no grace period: only the runs below delete, and
    // an unreferenced chunk goes at the first.
    let server = Server::start_with(backend, "[gc]\ninterval = 0\ngrace-period = 0\n");
    let admin = server.admin_token();
    let client = Client::new();
    for (cache, seconds) in [("short", 1), ("long", 86_400)] {
        server.create_cache(cache, false);
        let resp = client
            .patch(format!("{}/_api/v1/cache-config/{cache}", server.url))
            .bearer_auth(&admin)
            .json(&json!({"retention_period": {"Period": seconds}}))
            .send()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    }
    // A chunk uploaded to the long cache, which no path uses, and that its trace names.
    let data = b"a chunk only a trace names".to_vec();
    let stored_chunk = ChunkRef { hash: ChunkHash::of(&data), size: data.len() as u32 };
    let resp = client
        .put(format!("{}/_flywheel/v1/long/chunk/{}", server.url, stored_chunk.hash))
        .bearer_auth(&admin)
        .body(zstd::bulk::compress(&data, 3).unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().unwrap());
    assert_eq!(server.object_sizes("chunks").len(), 1);

    let trace = Trace::from_reads([(NUMPY, stored_chunk), (PYTHON, chunk(2))]);
    for cache in ["short", "long"] {
        let resp = put_trace(&client, &server, cache, "job", Some(&admin), serde_json::to_vec(&trace).unwrap());
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let short = stored_traces(&server, "short");
    let long = stored_traces(&server, "long");
    assert_eq!((short.len(), long.len()), (1, 1));

    // Wait until the short cache's trace is past its 1 s period, as the collection sees it
    // (by modification time, on its own clock): dry runs change nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let report = server.gc(&["--dry-run"]);
        let due = traces_in(&report);
        assert!(due <= 1, "a dry run would delete the long cache's trace too:\n{report}");
        if due == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the short cache's trace never came due:\n{report}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(stored_traces(&server, "short"), short, "a dry run deleted");
    assert_eq!(server.object_sizes("chunks").len(), 1, "a dry run deleted");

    let report = server.gc(&[]);
    assert_eq!(traces_in(&report), 1, "{report}");
    assert!(stored_traces(&server, "short").is_empty());
    assert_eq!(refusal(get_trace(&client, &server, "short", "job", Some(&admin))).0, StatusCode::NOT_FOUND);
    assert_eq!(stored_traces(&server, "long"), long, "the long cache's trace changed");
    let (status, kept) = answer(get_trace(&client, &server, "long", "job", Some(&admin)));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_value::<Trace>(kept).unwrap(), trace);
    // The chunk the kept trace names was not kept for it.
    assert!(server.object_sizes("chunks").is_empty(), "a trace kept a chunk alive: {report}");
}

backend_matrix! {
    put_get_and_merge => put_get_and_merge_local, put_get_and_merge_s3;
    permissions => permissions_local, permissions_s3;
    bad_input_is_refused => bad_input_is_refused_local, bad_input_is_refused_s3;
    traces_expire_with_retention => traces_expire_with_retention_local, traces_expire_with_retention_s3;
}
