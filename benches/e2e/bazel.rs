//! The Bazel remote cache: a large blob up and down over gRPC (ByteStream) and HTTP beside the
//! server's own NAR figures and nginx on the same bytes, small action-cache and CAS requests
//! under 64 clients beside nginx serving small files, and Bazel's wall time for a cached
//! rebuild against an uncached build.

use std::time::Duration;

use flywheel_reapi::bytestream::byte_stream_client::ByteStreamClient;
use flywheel_reapi::bytestream::{ReadRequest, WriteRequest};
use flywheel_reapi::execution::action_cache_client::ActionCacheClient;
use flywheel_reapi::execution::content_addressable_storage_client::ContentAddressableStorageClient;
use flywheel_reapi::execution::{
    batch_update_blobs_request, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use prost::Message;
use sha2::Digest as _;
use tonic::transport::Channel;

use super::*;

/// Clients of the small-request load.
const CLIENTS: usize = 64;
/// Seconds of each small-request load.
const LOAD_SECS: u64 = 10;

fn digest_of(data: &[u8]) -> Digest {
    Digest { hash: hex::encode(sha2::Sha256::digest(data)), size_bytes: data.len() as i64 }
}

fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap()
}

fn start_server(backend: Backend, port: u16) -> Server {
    let server = Server::start_with(backend, &format!("[bazel]\ngrpc-listen = \"127.0.0.1:{port}\"\nmax-blob-size = 4294967296\n"));
    server.create_cache("bench", false);
    server
}

/// A ByteStream write of the file at `path`, in 1 MiB messages read as they go; seconds.
async fn grpc_upload(port: u16, token: &str, path: &Path, digest: &Digest) -> f64 {
    let resource = format!("bench/uploads/bench/blobs/{}/{}", digest.hash, digest.size_bytes);
    let size = digest.size_bytes as usize;
    let file = std::fs::File::open(path).unwrap();
    let messages = futures::stream::unfold((file, 0usize), move |(mut file, offset)| {
        let resource = resource.clone();
        async move {
            use std::io::Read;
            if offset >= size {
                return None;
            }
            let mut buf = vec![0u8; (1 << 20).min(size - offset)];
            file.read_exact(&mut buf).unwrap();
            let next = offset + buf.len();
            let message = WriteRequest {
                resource_name: if offset == 0 { resource } else { String::new() },
                write_offset: offset as i64,
                finish_write: next == size,
                data: buf.into(),
            };
            Some((message, (file, next)))
        }
    });
    let started = Instant::now();
    let mut client = ByteStreamClient::new(channel(port).await).max_decoding_message_size(16 << 20);
    let written = client.write(authorized(messages, token)).await.unwrap().into_inner();
    assert_eq!(written.committed_size, digest.size_bytes);
    started.elapsed().as_secs_f64()
}

/// A ByteStream read of a whole blob; seconds, checked to be all its bytes.
async fn grpc_download(port: u16, token: &str, digest: &Digest) -> f64 {
    let started = Instant::now();
    let mut client = ByteStreamClient::new(channel(port).await).max_decoding_message_size(16 << 20);
    let resource = format!("bench/blobs/{}/{}", digest.hash, digest.size_bytes);
    let mut stream = client.read(authorized(ReadRequest { resource_name: resource, read_offset: 0, read_limit: 0 }, token)).await.unwrap().into_inner();
    let mut got = 0u64;
    while let Some(piece) = stream.message().await.unwrap() {
        got += piece.data.len() as u64;
    }
    assert_eq!(got, digest.size_bytes as u64);
    started.elapsed().as_secs_f64()
}

/// Latencies of each kind of small request, and the errors.
#[derive(Default)]
struct Latencies {
    by_kind: Vec<(String, Vec<Duration>)>,
    errors: usize,
}

impl Latencies {
    fn add(&mut self, kind: &str, latency: Duration) {
        match self.by_kind.iter_mut().find(|(k, _)| k == kind) {
            Some((_, v)) => v.push(latency),
            None => self.by_kind.push((kind.to_string(), vec![latency])),
        }
    }

    fn merge(&mut self, other: Latencies) {
        for (kind, values) in other.by_kind {
            for v in values {
                self.add(&kind, v);
            }
        }
        self.errors += other.errors;
    }

    fn get(&self, kind: &str) -> &[Duration] {
        self.by_kind.iter().find(|(k, _)| k == kind).map(|(_, v)| &v[..]).unwrap_or(&[])
    }
}

/// `CLIENTS` gRPC clients, each on its own connection, cycling GetActionResult (a hit),
/// FindMissingBlobs (10 digests) and BatchReadBlobs (one 2 KB blob) for `LOAD_SECS`.
async fn grpc_load(port: u16, token: &str, action: &Digest, small: &Digest, probes: &[Digest]) -> Latencies {
    let deadline = Instant::now() + Duration::from_secs(LOAD_SECS);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (token, action, small, probes) = (token.to_string(), action.clone(), small.clone(), probes.to_vec());
        tasks.push(tokio::spawn(async move {
            let channel = channel(port).await;
            let mut ac = ActionCacheClient::new(channel.clone());
            let mut cas = ContentAddressableStorageClient::new(channel);
            let mut out = Latencies::default();
            while Instant::now() < deadline {
                let started = Instant::now();
                let request = GetActionResultRequest { instance_name: "bench".into(), action_digest: Some(action.clone()), ..Default::default() };
                match ac.get_action_result(authorized(request, &token)).await {
                    Ok(_) => out.add("GetActionResult (hit)", started.elapsed()),
                    Err(_) => out.errors += 1,
                }
                let started = Instant::now();
                let request = FindMissingBlobsRequest { instance_name: "bench".into(), blob_digests: probes.clone(), ..Default::default() };
                match cas.find_missing_blobs(authorized(request, &token)).await {
                    Ok(_) => out.add("FindMissingBlobs (10 digests)", started.elapsed()),
                    Err(_) => out.errors += 1,
                }
                let started = Instant::now();
                let request = BatchReadBlobsRequest { instance_name: "bench".into(), digests: vec![small.clone()], ..Default::default() };
                match cas.batch_read_blobs(authorized(request, &token)).await {
                    Ok(r) if r.get_ref().responses.first().and_then(|r| r.status.as_ref()).is_some_and(|s| s.code == 0) => {
                        out.add("BatchReadBlobs (2 KB)", started.elapsed())
                    }
                    _ => out.errors += 1,
                }
            }
            out
        }));
    }
    let mut all = Latencies::default();
    for task in tasks {
        all.merge(task.await.unwrap());
    }
    all
}

/// `CLIENTS` HTTP clients, each on one keep-alive connection, cycling GETs of `urls`.
fn http_load(urls: &[(&str, String)], token: Option<&str>) -> Latencies {
    let deadline = Instant::now() + Duration::from_secs(LOAD_SECS);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let urls: Vec<(String, String)> = urls.iter().map(|(k, u)| (k.to_string(), u.clone())).collect();
            let token = token.map(str::to_string);
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut out = Latencies::default();
                while Instant::now() < deadline {
                    for (kind, url) in &urls {
                        let started = Instant::now();
                        let mut request = client.get(url);
                        if let Some(token) = &token {
                            request = request.bearer_auth(token);
                        }
                        let ok = request.send().is_ok_and(|resp| resp.status().is_success() && resp.bytes().is_ok());
                        if ok {
                            out.add(kind, started.elapsed());
                        } else {
                            out.errors += 1;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Latencies::default();
    for thread in threads {
        all.merge(thread.join().unwrap());
    }
    all
}

fn pct(latencies: &[Duration], p: f64) -> f64 {
    common::load::LoadResult::percentile_ms(latencies, p)
}

/// One `bazel build //:all` of the test workspace; wall seconds and Bazel's summary.
fn bazel_build(root: &Path, base: &str, flags: &[String]) -> (f64, String) {
    let run = common::bazel::build(Path::new("bazel"), root, base, flags);
    (run.took.as_secs_f64(), run.summary)
}

pub(crate) fn bazel_section(report: &mut Report, work: &Path) {
    let blob_path = nar_of_sysroot_lib(work);
    let bytes = std::fs::read(&blob_path).unwrap();
    let digest = digest_of(&bytes);
    drop(bytes);
    let size_mb = digest.size_bytes as f64 / MB;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    // The large blob: each upload into fresh storage, each protocol on a server of its own;
    // the same bytes as a NAR through upload-path for the server's own figure.
    let (mut grpc_up, mut http_up, mut nar_up) = (Vec::new(), Vec::new(), Vec::new());
    let mut servers = Vec::new();
    for _ in 0..RUNS {
        let port = common::free_port();
        let server = start_server(Backend::Local, port);
        let token = server.admin_token();
        let _ = Command::new("sync").status();
        grpc_up.push(runtime.block_on(grpc_upload(port, &token, &blob_path, &digest)));
        servers.push((server, token, port));

        let server = start_server(Backend::Local, common::free_port());
        let token = server.admin_token();
        let _ = Command::new("sync").status();
        http_up.push(time_cmd(
            Command::new("curl")
                .args(["-sf", "-X", "PUT", "-H", &format!("Authorization: Bearer {token}"), "-T"])
                .arg(&blob_path)
                .arg(format!("{}/bench/cas/{}", server.url, digest.hash)),
        ));

        let server = start_server(Backend::Local, common::free_port());
        let token = server.admin_token();
        let _ = Command::new("sync").status();
        nar_up.push(upload_path(&server, &token, &blob_path, &digest.hash, digest.size_bytes as u64));
    }
    let (server, token, port) = servers.pop().unwrap();
    drop(servers);
    let grpc_down: Vec<f64> = (0..2 * RUNS).map(|_| runtime.block_on(grpc_download(port, &token, &digest))).collect();
    let http_down: Vec<f64> =
        (0..2 * RUNS).map(|_| curl_get(&format!("{}/bench/cas/{}", server.url, digest.hash), Some(&token)).0).collect();
    let nginx_root = work.join("bazel-static");
    std::fs::create_dir_all(&nginx_root).unwrap();
    let _ = std::fs::remove_file(nginx_root.join("blob"));
    std::fs::hard_link(&blob_path, nginx_root.join("blob")).unwrap_or_else(|_| {
        std::fs::copy(&blob_path, nginx_root.join("blob")).unwrap();
    });
    let nginx = Nginx::start(&nginx_root, work);
    let nginx_down: Vec<f64> = (0..2 * RUNS).map(|_| curl_get(&format!("http://127.0.0.1:{}/blob", nginx.port), None).0).collect();
    drop(server);

    // Small requests under load, on S3 (the production layout).
    let port = common::free_port();
    let server = start_server(Backend::S3, port);
    let token = server.admin_token();
    let small = blob_bytes(2000, 1);
    let small_d = digest_of(&small);
    let action = digest_of(b"bench action");
    let probes: Vec<Digest> = (0..10).map(|i| digest_of(&blob_bytes(3000, 10 + i))).collect();
    runtime.block_on(async {
        let channel = channel(port).await;
        let mut cas = ContentAddressableStorageClient::new(channel.clone());
        let requests =
            vec![batch_update_blobs_request::Request { digest: Some(small_d.clone()), data: small.clone().into(), compressor: 0 }];
        cas.batch_update_blobs(authorized(BatchUpdateBlobsRequest { instance_name: "bench".into(), requests, ..Default::default() }, &token))
            .await
            .unwrap();
        let result = ActionResult {
            output_files: vec![OutputFile { path: "out".into(), digest: Some(small_d.clone()), ..Default::default() }],
            ..Default::default()
        };
        ActionCacheClient::new(channel)
            .update_action_result(authorized(
                UpdateActionResultRequest {
                    instance_name: "bench".into(),
                    action_digest: Some(action.clone()),
                    action_result: Some(result),
                    ..Default::default()
                },
                &token,
            ))
            .await
            .unwrap();
    });
    let grpc_small = runtime.block_on(grpc_load(port, &token, &action, &small_d, &probes));
    let http_small = http_load(
        &[
            ("GET /ac (hit)", format!("{}/bench/ac/{}", server.url, action.hash)),
            ("GET /cas (2 KB)", format!("{}/bench/cas/{}", server.url, small_d.hash)),
        ],
        Some(&token),
    );
    drop(server);
    let ac_bytes = ActionResult {
        output_files: vec![OutputFile { path: "out".into(), digest: Some(small_d.clone()), ..Default::default() }],
        ..Default::default()
    }
    .encode_to_vec();
    std::fs::write(nginx_root.join("ac"), &ac_bytes).unwrap();
    std::fs::write(nginx_root.join("cas"), &small).unwrap();
    let base = format!("http://127.0.0.1:{}", nginx.port);
    let nginx_small = http_load(&[("GET /ac (hit)", format!("{base}/ac")), ("GET /cas (2 KB)", format!("{base}/cas"))], None);
    drop(nginx);

    // Bazel itself: an uncached build (filling a fresh cache), then cached rebuilds from fresh
    // output bases, over gRPC on local storage; and the build with no remote cache.
    let bazel_root = work.join("bazel-builds");
    let _ = std::fs::remove_dir_all(&bazel_root);
    let (mut uncached, mut cached, mut no_cache) = (Vec::new(), Vec::new(), Vec::new());
    let mut summaries = (String::new(), String::new());
    let port = common::free_port();
    let server = start_server(Backend::Local, port);
    let token = server.admin_token();
    for run in 0..RUNS {
        let cache = format!("bazel-{run}");
        server.create_cache(&cache, false);
        let flags = vec![
            format!("--remote_cache=grpc://127.0.0.1:{port}"),
            format!("--remote_instance_name={cache}"),
            format!("--remote_header=authorization=Bearer {token}"),
        ];
        let (t, s) = bazel_build(&bazel_root, &format!("cold-{run}"), &flags);
        uncached.push(t);
        summaries.0 = s;
        let (t, s) = bazel_build(&bazel_root, &format!("warm-{run}"), &flags);
        cached.push(t);
        summaries.1 = s;
        no_cache.push(bazel_build(&bazel_root, &format!("none-{run}"), &[]).0);
    }
    drop(server);

    report.section(
        "Bazel remote cache",
        &format!(
            "A {size_mb:.0} MB blob (the NAR of the toolchain's `lib`, as in the server section) stored into fresh local storage over \
             gRPC (ByteStream, 1 MiB messages) and over HTTP (`curl -T` to `/cas/`), and the same bytes through upload-path as a NAR; \
             then read back over each protocol, beside nginx sending the same file. Medians of {RUNS} uploads and {} downloads. \
             Small requests: {CLIENTS} clients for {LOAD_SECS} s each, on S3 (s3s-fs), one connection per client; gRPC cycles \
             GetActionResult (a hit, its output checked present), FindMissingBlobs of 10 digests and BatchReadBlobs of a 2 KB blob; \
             HTTP cycles GET /ac and GET /cas; nginx serves the same two bodies as files. Errors: gRPC {}, HTTP {}, nginx {}. \
             Bazel 4.2.3 (`--batch`, so each build pays about 2.5 s of JVM start) builds the 6 genrules of `tests/bazel/workspace` \
             with a fresh gRPC cache (uncached: `{}`), then from a fresh output base (cached: `{}`), and with no remote cache; \
             medians of {RUNS}.",
            2 * RUNS,
            grpc_small.errors,
            http_small.errors,
            nginx_small.errors,
            summaries.0,
            summaries.1
        ),
    );
    let rate = |secs: f64| digest.size_bytes as f64 / MB / secs;
    let (nar_rate, nginx_rate) = (rate(median(nar_up)), rate(median(nginx_down)));
    let uploads_against = format!("NAR upload-path, same bytes: {nar_rate:.0} MB/s");
    let downloads_against = format!("nginx, same file: {nginx_rate:.0} MB/s");
    for (figure, secs, reference, reference_rate) in [
        ("CAS upload, gRPC ByteStream", median(grpc_up), &uploads_against, nar_rate),
        ("CAS upload, HTTP PUT", median(http_up), &uploads_against, nar_rate),
        ("CAS download, gRPC ByteStream", median(grpc_down), &downloads_against, nginx_rate),
        ("CAS download, HTTP GET", median(http_down), &downloads_against, nginx_rate),
    ] {
        report.row(figure, format!("{:.0} MB/s", rate(secs)), reference.clone(), ratio(rate(secs) / reference_rate), "");
    }
    // Each gRPC call beside the HTTP GET that does its work, each HTTP GET beside its own.
    for (protocol, load, kind, reference) in [
        ("gRPC", &grpc_small, "GetActionResult (hit)", "GET /ac (hit)"),
        ("gRPC", &grpc_small, "FindMissingBlobs (10 digests)", "GET /ac (hit)"),
        ("gRPC", &grpc_small, "BatchReadBlobs (2 KB)", "GET /cas (2 KB)"),
        ("HTTP", &http_small, "GET /ac (hit)", "GET /ac (hit)"),
        ("HTTP", &http_small, "GET /cas (2 KB)", "GET /cas (2 KB)"),
    ] {
        let ours = load.get(kind);
        let theirs = nginx_small.get(reference);
        let nginx = if kind == reference { "nginx".to_string() } else { format!("nginx {reference}") };
        report.row(
            &format!("{protocol} {kind}, p50 / p99"),
            format!("{:.2} / {:.2} ms ({:.0} /s)", pct(ours, 50.0), pct(ours, 99.0), ours.len() as f64 / LOAD_SECS as f64),
            format!("{nginx}: {:.2} / {:.2} ms", pct(theirs, 50.0), pct(theirs, 99.0)),
            format!("{} p50", ratio(pct(ours, 50.0) / pct(theirs, 50.0))),
            "zero errors",
        );
    }
    let (uncached, cached, no_cache) = (median(uncached), median(cached), median(no_cache));
    report.row(
        "Bazel build, cached rebuild from a fresh output base",
        format!("{cached:.2} s"),
        format!("uncached, filling the cache: {uncached:.2} s; no remote cache: {no_cache:.2} s"),
        format!("{} uncached", ratio(cached / uncached)),
        "",
    );
}

/// Deterministic bytes for the small blobs.
fn blob_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}
