//! The Bazel remote cache at the protocol level, over gRPC (REAPI v2 and ByteStream) and over
//! Bazel's HTTP cache protocol, on local storage and on S3 (`s3s-fs`): digests checked on
//! upload, resumed ByteStream writes, zstd blobs, action results with missing outputs answered
//! as misses, permissions and cache scoping, the size limit, and 64 clients at once.

#[macro_use]
mod common;

use base64::Engine;
use common::{Backend, Server};
use flywheel_reapi::bytestream::byte_stream_client::ByteStreamClient;
use flywheel_reapi::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use flywheel_reapi::execution::action_cache_client::ActionCacheClient;
use flywheel_reapi::execution::capabilities_client::CapabilitiesClient;
use flywheel_reapi::execution::content_addressable_storage_client::ContentAddressableStorageClient;
use flywheel_reapi::execution::{
    batch_update_blobs_request, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest,
    Directory, FileNode, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest, OutputDirectory,
    OutputFile, Tree, UpdateActionResultRequest,
};
use prost::Message;
use reqwest::StatusCode;
use sha2::Digest as _;
use tonic::transport::Channel;
use tonic::Code;

/// `bazel.max-blob-size` of the test servers.
const LIMIT: usize = 3 << 20;

fn digest(data: &[u8]) -> Digest {
    Digest { hash: hex::encode(sha2::Sha256::digest(data)), size_bytes: data.len() as i64 }
}

/// Data that compresses somewhat, different for each seed.
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if i % 3 == 0 { b'a' + (i % 7) as u8 } else { state as u8 }
        })
        .collect()
}

/// A gRPC request carrying `token` the way `--remote_header=Authorization=Bearer ...` does.
fn req<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if !token.is_empty() {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

struct Grpc {
    channel: Channel,
}

impl Grpc {
    async fn connect(port: u16) -> Grpc {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap();
        Grpc { channel }
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
    }

    fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }

    async fn batch_upload(&self, instance: &str, token: &str, blobs: &[(Digest, Vec<u8>)]) -> Result<Vec<i32>, tonic::Status> {
        let requests = blobs
            .iter()
            .map(|(d, data)| batch_update_blobs_request::Request { digest: Some(d.clone()), data: data.clone().into(), compressor: 0 })
            .collect();
        let response = self
            .cas()
            .batch_update_blobs(req(BatchUpdateBlobsRequest { instance_name: instance.into(), requests, ..Default::default() }, token))
            .await?;
        Ok(response.into_inner().responses.iter().map(|r| r.status.as_ref().map_or(-1, |s| s.code)).collect())
    }

    async fn missing(&self, instance: &str, token: &str, digests: &[Digest]) -> Result<Vec<Digest>, tonic::Status> {
        let response = self
            .cas()
            .find_missing_blobs(req(
                FindMissingBlobsRequest { instance_name: instance.into(), blob_digests: digests.to_vec(), ..Default::default() },
                token,
            ))
            .await?;
        Ok(response.into_inner().missing_blob_digests)
    }

    async fn batch_read(&self, instance: &str, token: &str, digests: &[Digest]) -> Result<Vec<(i32, Vec<u8>)>, tonic::Status> {
        let response = self
            .cas()
            .batch_read_blobs(req(BatchReadBlobsRequest { instance_name: instance.into(), digests: digests.to_vec(), ..Default::default() }, token))
            .await?;
        Ok(response.into_inner().responses.into_iter().map(|r| (r.status.map_or(-1, |s| s.code), r.data.to_vec())).collect())
    }

    /// A ByteStream write of `data` from `offset`, in pieces of 256 KiB, finished or not.
    async fn write(&self, token: &str, resource: &str, data: &[u8], offset: usize, finish: bool) -> Result<i64, tonic::Status> {
        let mut messages = Vec::new();
        let pieces: Vec<&[u8]> = data.chunks(256 << 10).collect();
        let mut at = offset;
        for (i, piece) in pieces.iter().enumerate() {
            messages.push(WriteRequest {
                resource_name: if i == 0 { resource.to_string() } else { String::new() },
                write_offset: at as i64,
                finish_write: finish && i + 1 == pieces.len(),
                data: piece.to_vec().into(),
            });
            at += piece.len();
        }
        let response = self.bytestream().write(req(futures::stream::iter(messages), token)).await?;
        Ok(response.into_inner().committed_size)
    }

    /// What the server says of an upload: its committed size, and whether it is complete.
    async fn write_status(&self, token: &str, resource: &str) -> (i64, bool) {
        let status = self
            .bytestream()
            .query_write_status(req(QueryWriteStatusRequest { resource_name: resource.into() }, token))
            .await
            .unwrap()
            .into_inner();
        (status.committed_size, status.complete)
    }

    async fn read(&self, token: &str, resource: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .bytestream()
            .read(req(ReadRequest { resource_name: resource.into(), read_offset: offset, read_limit: limit }, token))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(piece) = stream.message().await? {
            out.extend_from_slice(&piece.data);
        }
        Ok(out)
    }

    async fn update_ac(&self, instance: &str, token: &str, action: &Digest, result: &ActionResult) -> Result<(), tonic::Status> {
        self.ac()
            .update_action_result(req(
                UpdateActionResultRequest {
                    instance_name: instance.into(),
                    action_digest: Some(action.clone()),
                    action_result: Some(result.clone()),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|_| ())
    }

    async fn get_ac(&self, instance: &str, token: &str, action: &Digest) -> Result<ActionResult, tonic::Status> {
        self.ac()
            .get_action_result(req(
                GetActionResultRequest { instance_name: instance.into(), action_digest: Some(action.clone()), ..Default::default() },
                token,
            ))
            .await
            .map(|r| r.into_inner())
    }
}

fn start(backend: Backend) -> (Server, u16) {
    start_with(backend, &format!("max-blob-size = {LIMIT}\n"), "")
}

/// A server with a gRPC listener, `bazel` added to its `[bazel]` table and `top` before it,
/// and the caches `bzl` and `other`.
fn start_with(backend: Backend, bazel: &str, top: &str) -> (Server, u16) {
    let port = common::free_port();
    let server = Server::start_with(backend, &format!("{top}[bazel]\ngrpc-listen = \"127.0.0.1:{port}\"\n{bazel}"));
    server.create_cache("bzl", false);
    server.create_cache("other", false);
    (server, port)
}

fn grpc_protocol(backend: Backend) {
    let (server, port) = start(backend);
    let rw = server.mint(&["--pull", "bzl", "--push", "bzl"]);
    let ro = server.mint(&["--pull", "bzl"]);
    let other = server.mint(&["--pull", "other", "--push", "other"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;

        // Capabilities: SHA-256, zstd, the batch limit.
        let caps = CapabilitiesClient::new(grpc.channel.clone())
            .get_capabilities(req(GetCapabilitiesRequest { instance_name: "bzl".into() }, &rw))
            .await
            .unwrap()
            .into_inner();
        let cache_caps = caps.cache_capabilities.unwrap();
        assert_eq!(cache_caps.digest_functions, vec![1]);
        assert!(cache_caps.supported_compressors.contains(&1));
        assert!(cache_caps.action_cache_update_capabilities.unwrap().update_enabled);
        let read_only_caps = CapabilitiesClient::new(grpc.channel.clone())
            .get_capabilities(req(GetCapabilitiesRequest { instance_name: "bzl".into() }, &ro))
            .await
            .unwrap()
            .into_inner();
        assert!(!read_only_caps.cache_capabilities.unwrap().action_cache_update_capabilities.unwrap().update_enabled);

        // Who may do what.
        let small = blob(1, 1000);
        let small_d = digest(&small);
        assert_eq!(grpc.batch_upload("bzl", "", &[(small_d.clone(), small.clone())]).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(grpc.batch_upload("bzl", &ro, &[(small_d.clone(), small.clone())]).await.unwrap_err().code(), Code::PermissionDenied);
        // A bad token is refused from the headers, before the message is read.
        assert_eq!(grpc.batch_upload("bzl", "not.a.token", &[(small_d.clone(), small.clone())]).await.unwrap_err().code(), Code::Unauthenticated);
        let refused = grpc.write("not.a.token", &format!("bzl/uploads/x/blobs/{}/{}", small_d.hash, small_d.size_bytes), &small, 0, true).await;
        assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
        let other_err = grpc.batch_upload("bzl", &other, &[(small_d.clone(), small.clone())]).await.unwrap_err().code();
        assert!(matches!(other_err, Code::PermissionDenied | Code::Unauthenticated), "{other_err:?}");
        assert_eq!(grpc.missing("", &rw, std::slice::from_ref(&small_d)).await.unwrap_err().code(), Code::InvalidArgument);

        // A good blob is stored; one whose content does not match its digest is refused.
        let wrong = blob(2, 1000);
        let codes = grpc.batch_upload("bzl", &rw, &[(small_d.clone(), small.clone()), (small_d.clone(), wrong.clone())]).await.unwrap();
        assert_eq!(codes, vec![0, Code::InvalidArgument as i32]);
        let claimed = digest(&blob(3, 1000));
        let codes = grpc.batch_upload("bzl", &rw, &[(claimed.clone(), wrong.clone())]).await.unwrap();
        assert_eq!(codes, vec![Code::InvalidArgument as i32]);
        assert_eq!(grpc.missing("bzl", &ro, &[small_d.clone(), claimed.clone()]).await.unwrap(), vec![claimed.clone()]);
        let read = grpc.batch_read("bzl", &ro, &[small_d.clone(), claimed.clone()]).await.unwrap();
        assert_eq!(read[0], (0, small.clone()));
        assert_eq!(read[1].0, Code::NotFound as i32);

        // Another cache sees none of it, even with a token that may read it there.
        assert_eq!(grpc.missing("other", &other, std::slice::from_ref(&small_d)).await.unwrap(), vec![small_d.clone()]);
        assert_eq!(grpc.batch_read("other", &other, std::slice::from_ref(&small_d)).await.unwrap()[0].0, Code::NotFound as i32);
        assert!(grpc.batch_read("bzl", &other, std::slice::from_ref(&small_d)).await.is_err());

        // A large blob written in two ByteStream calls: the first breaks off, the second
        // resumes where QueryWriteStatus says.
        let big = blob(4, 2_500_000);
        let big_d = digest(&big);
        let resource = format!("bzl/uploads/1b4e28ba-2fa1-11d2-883f-0016d3cca427/blobs/{}/{}", big_d.hash, big_d.size_bytes);
        let half = 1 << 20;
        assert!(grpc.write(&rw, &resource, &big[..half], 0, false).await.is_err());
        assert_eq!(grpc.write_status(&rw, &resource).await, (half as i64, false));
        assert_eq!(grpc.missing("bzl", &rw, std::slice::from_ref(&big_d)).await.unwrap().len(), 1);
        // A write that skips ahead of what is committed is refused.
        assert_eq!(grpc.write(&rw, &resource, &big[half + 10..], half + 10, true).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(grpc.write(&rw, &resource, &big[half..], half, true).await.unwrap(), big.len() as i64);
        let read_name = format!("bzl/blobs/{}/{}", big_d.hash, big_d.size_bytes);
        assert_eq!(grpc.read(&ro, &read_name, 0, 0).await.unwrap(), big);
        assert_eq!(grpc.read(&ro, &read_name, 1_000_000, 300_000).await.unwrap(), &big[1_000_000..1_300_000]);
        assert!(grpc.write_status(&rw, &resource).await.1);

        // zstd both ways.
        let z = blob(5, 700_000);
        let z_d = digest(&z);
        let compressed = zstd::encode_all(&z[..], 3).unwrap();
        let zname = format!("bzl/uploads/u2/compressed-blobs/zstd/{}/{}", z_d.hash, z_d.size_bytes);
        grpc.write(&rw, &zname, &compressed, 0, true).await.unwrap();
        assert_eq!(grpc.read(&ro, &format!("bzl/blobs/{}/{}", z_d.hash, z_d.size_bytes), 0, 0).await.unwrap(), z);
        let zread = format!("bzl/compressed-blobs/zstd/{}/{}", z_d.hash, z_d.size_bytes);
        let sent = grpc.read(&ro, &zread, 0, 0).await.unwrap();
        assert_eq!(zstd::decode_all(&sent[..]).unwrap(), z);
        // A resumed compressed read: the offset counts uncompressed bytes; a limit is refused.
        let rest = grpc.read(&ro, &zread, 100_000, 0).await.unwrap();
        assert_eq!(zstd::decode_all(&rest[..]).unwrap(), &z[100_000..]);
        assert_eq!(grpc.read(&ro, &zread, 0, 10).await.unwrap_err().code(), Code::InvalidArgument);
        // A small blob compressed, and a compressed blob that is not what it claims.
        let s2 = blob(6, 3000);
        let s2_d = digest(&s2);
        let s2_name = format!("bzl/uploads/u3/compressed-blobs/zstd/{}/{}", s2_d.hash, s2_d.size_bytes);
        grpc.write(&rw, &s2_name, &zstd::encode_all(&s2[..], 3).unwrap(), 0, true).await.unwrap();
        assert_eq!(grpc.batch_read("bzl", &ro, std::slice::from_ref(&s2_d)).await.unwrap()[0], (0, s2.clone()));
        let liar = format!("bzl/uploads/u4/compressed-blobs/zstd/{}/{}", claimed.hash, claimed.size_bytes);
        assert_eq!(grpc.write(&rw, &liar, &zstd::encode_all(&wrong[..], 3).unwrap(), 0, true).await.unwrap_err().code(), Code::InvalidArgument);

        // Mismatched large write, and the size limit (exactly the limit is taken).
        let fake = digest(&blob(7, 2_000_000));
        let fake_name = format!("bzl/uploads/u5/blobs/{}/{}", fake.hash, fake.size_bytes);
        assert_eq!(grpc.write(&rw, &fake_name, &blob(8, 2_000_000), 0, true).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(grpc.missing("bzl", &rw, std::slice::from_ref(&fake)).await.unwrap(), vec![fake.clone()]);
        let at_limit = blob(9, LIMIT);
        let at_d = digest(&at_limit);
        grpc.write(&rw, &format!("bzl/uploads/u6/blobs/{}/{}", at_d.hash, at_d.size_bytes), &at_limit, 0, true).await.unwrap();
        let over = blob(10, LIMIT + 1);
        let over_d = digest(&over);
        let refused = grpc.write(&rw, &format!("bzl/uploads/u7/blobs/{}/{}", over_d.hash, over_d.size_bytes), &over, 0, true).await;
        assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
        let codes = grpc.batch_upload("bzl", &rw, &[(over_d.clone(), over.clone())]).await.unwrap();
        assert_eq!(codes, vec![Code::InvalidArgument as i32], "a batch upload over the limit");
        assert_eq!(grpc.missing("bzl", &rw, std::slice::from_ref(&over_d)).await.unwrap(), vec![over_d.clone()]);
        // Pull-only tokens cannot write through ByteStream either.
        let ro_name = format!("bzl/uploads/u8/blobs/{}/{}", small_d.hash, small_d.size_bytes);
        assert_eq!(grpc.write(&ro, &ro_name, &small, 0, true).await.unwrap_err().code(), Code::PermissionDenied);

        // Action results: a hit only while every output is in the cache.
        let action = digest(b"action 1");
        let stdout = blob(11, 500);
        let stdout_d = digest(&stdout);
        let result = ActionResult {
            output_files: vec![OutputFile { path: "out/big".into(), digest: Some(big_d.clone()), ..Default::default() }],
            stdout_digest: Some(stdout_d.clone()),
            exit_code: 0,
            ..Default::default()
        };
        assert_eq!(grpc.update_ac("bzl", &ro, &action, &result).await.unwrap_err().code(), Code::PermissionDenied);
        grpc.update_ac("bzl", &rw, &action, &result).await.unwrap();
        assert_eq!(grpc.get_ac("bzl", &ro, &action).await.unwrap_err().code(), Code::NotFound, "stdout is missing");
        grpc.batch_upload("bzl", &rw, &[(stdout_d.clone(), stdout.clone())]).await.unwrap();
        assert_eq!(grpc.get_ac("bzl", &ro, &action).await.unwrap(), result);
        assert_eq!(grpc.get_ac("other", &other, &action).await.unwrap_err().code(), Code::NotFound);

        // An output directory: its tree, and the files the tree lists, must all be there.
        let inner = blob(12, 800);
        let inner_d = digest(&inner);
        let tree = Tree {
            root: Some(Directory {
                files: vec![FileNode { name: "f".into(), digest: Some(inner_d.clone()), ..Default::default() }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree_bytes = tree.encode_to_vec();
        let tree_d = digest(&tree_bytes);
        grpc.batch_upload("bzl", &rw, &[(tree_d.clone(), tree_bytes.clone())]).await.unwrap();
        let dir_action = digest(b"action 2");
        let dir_result = ActionResult {
            output_directories: vec![OutputDirectory { path: "out/dir".into(), tree_digest: Some(tree_d.clone()), ..Default::default() }],
            ..Default::default()
        };
        grpc.update_ac("bzl", &rw, &dir_action, &dir_result).await.unwrap();
        assert_eq!(grpc.get_ac("bzl", &ro, &dir_action).await.unwrap_err().code(), Code::NotFound, "a file of the tree is missing");
        grpc.batch_upload("bzl", &rw, &[(inner_d.clone(), inner.clone())]).await.unwrap();
        assert_eq!(grpc.get_ac("bzl", &ro, &dir_action).await.unwrap(), dir_result);

        // Bad input: a digest that is not hex, a resource name that names no blob.
        let bad = Digest { hash: "xyz".into(), size_bytes: 3 };
        assert_eq!(grpc.missing("bzl", &rw, &[bad]).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(grpc.read(&ro, "bzl/blobs/nothing", 0, 0).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(grpc.read(&ro, &format!("bzl/blobs/{}/{}", claimed.hash, claimed.size_bytes), 0, 0).await.unwrap_err().code(), Code::NotFound);
    });

    // The chunks of a blob are deduplicated with everything else, and the metrics count hits.
    let metrics = common::fetch_metrics(&format!("{}/metrics", server.url));
    assert!(common::metric_value(&metrics, "flywheel_bazel_ac_requests_total{protocol=\"grpc\",result=\"hit\"}") >= 2.0);
    assert!(common::metric_value(&metrics, "flywheel_bazel_ac_requests_total{protocol=\"grpc\",result=\"miss\"}") >= 3.0);
    assert!(common::metric_value(&metrics, "flywheel_bazel_bytes_total{protocol=\"grpc\",direction=\"in\"}") > 2_500_000.0);
}

/// Basic credentials as Bazel sends them for `http://user:token@host/...`: base64 of
/// `user:token`, in the URL-safe alphabet.
fn basic_url_safe(token: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::URL_SAFE.encode(format!("bazel~?>:{token}")))
}

fn http_protocol(backend: Backend) {
    let (server, _) = start(backend);
    let rw = server.mint(&["--pull", "bzl", "--push", "bzl"]);
    let ro = server.mint(&["--pull", "bzl"]);
    let other = server.mint(&["--pull", "other", "--push", "other"]);
    // A connection per request: an upload refused before its body is read (the token is
    // checked first) leaves its connection unusable for the next request.
    let client = reqwest::blocking::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let url = |cache: &str, kind: &str, hash: &str| format!("{}/{cache}/{kind}/{hash}", server.url);

    let data = blob(20, 1_500_000);
    let d = digest(&data);
    // Bazel's basic auth (URL-safe base64) and a Bearer token both work.
    let put = client.put(url("bzl", "cas", &d.hash)).header("authorization", basic_url_safe(&rw)).body(data.clone()).send().unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let got = client.get(url("bzl", "cas", &d.hash)).bearer_auth(&ro).send().unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().unwrap().as_ref(), &data[..]);
    let head = client.head(url("bzl", "cas", &d.hash)).bearer_auth(&ro).send().unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], data.len().to_string().as_str());

    // Refusals: no token, pull-only writes, other caches, content that is not its name.
    assert_eq!(client.get(url("bzl", "cas", &d.hash)).send().unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(client.put(url("bzl", "cas", &d.hash)).bearer_auth(&ro).body(data.clone()).send().unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(client.get(url("other", "cas", &d.hash)).bearer_auth(&other).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert!(client.get(url("bzl", "cas", &d.hash)).bearer_auth(&other).send().unwrap().status().is_client_error());
    let lie = digest(&blob(21, 5000));
    let put = client.put(url("bzl", "cas", &lie.hash)).bearer_auth(&rw).body(blob(22, 5000)).send().unwrap();
    assert_eq!(put.status(), StatusCode::BAD_REQUEST);
    assert_eq!(client.get(url("bzl", "cas", &lie.hash)).bearer_auth(&rw).send().unwrap().status(), StatusCode::NOT_FOUND);
    let big_lie = digest(&blob(23, 1_000_000));
    let put = client.put(url("bzl", "cas", &big_lie.hash)).bearer_auth(&rw).body(blob(24, 1_000_000)).send().unwrap();
    assert_eq!(put.status(), StatusCode::BAD_REQUEST);
    assert_eq!(client.head(url("bzl", "cas", &big_lie.hash)).bearer_auth(&rw).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(client.get(url("bzl", "cas", "not-a-hash")).bearer_auth(&rw).send().unwrap().status(), StatusCode::BAD_REQUEST);

    // The size limit.
    let at_limit = blob(25, LIMIT);
    let put = client.put(url("bzl", "cas", &digest(&at_limit).hash)).bearer_auth(&rw).body(at_limit).send().unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let over = blob(26, LIMIT + 1);
    let put = client.put(url("bzl", "cas", &digest(&over).hash)).bearer_auth(&rw).body(over).send().unwrap();
    assert_eq!(put.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Action results: a miss while an output is missing, a hit once it is there.
    let out = blob(27, 2000);
    let out_d = digest(&out);
    let result = ActionResult {
        output_files: vec![
            OutputFile { path: "a".into(), digest: Some(d.clone()), ..Default::default() },
            OutputFile { path: "b".into(), digest: Some(out_d.clone()), ..Default::default() },
        ],
        ..Default::default()
    };
    let action = digest(b"http action").hash;
    let put = client.put(url("bzl", "ac", &action)).bearer_auth(&rw).body(result.encode_to_vec()).send().unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(client.get(url("bzl", "ac", &action)).bearer_auth(&ro).send().unwrap().status(), StatusCode::NOT_FOUND);
    client.put(url("bzl", "cas", &out_d.hash)).bearer_auth(&rw).body(out).send().unwrap().error_for_status().unwrap();
    let got = client.get(url("bzl", "ac", &action)).bearer_auth(&ro).send().unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(ActionResult::decode(got.bytes().unwrap()).unwrap(), result);
    assert_eq!(client.put(url("bzl", "ac", &action)).bearer_auth(&ro).body(vec![1]).send().unwrap().status(), StatusCode::FORBIDDEN);
    let garbage = client.put(url("bzl", "ac", &action)).bearer_auth(&rw).body(vec![0xff, 0xff, 0xff]).send().unwrap();
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    assert_eq!(client.get(url("bzl", "ac", &action)).bearer_auth(&ro).send().unwrap().status(), StatusCode::OK, "a refused write changes nothing");
}

fn many_clients(backend: Backend) {
    let (server, port) = start(backend);
    let rw = server.mint(&["--pull", "bzl", "--push", "bzl"]);
    let shared = blob(30, 300_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let errors: usize = runtime.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let rw = rw.clone();
            let shared = shared.clone();
            let url = server.url.clone();
            tasks.push(tokio::spawn(async move {
                let grpc = Grpc::connect(port).await;
                let own = blob(100 + i, 20_000 + i as usize * 1000);
                let own_d = digest(&own);
                let shared_d = digest(&shared);
                let mut failures = 0;
                let codes = grpc.batch_upload("bzl", &rw, &[(own_d.clone(), own.clone())]).await;
                failures += usize::from(codes.map_or(true, |c| c != vec![0]));
                let name = format!("bzl/uploads/c{i}/blobs/{}/{}", shared_d.hash, shared_d.size_bytes);
                failures += usize::from(grpc.write(&rw, &name, &shared, 0, true).await.is_err());
                let read = grpc.read(&rw, &format!("bzl/blobs/{}/{}", own_d.hash, own_d.size_bytes), 0, 0).await;
                failures += usize::from(read.map_or(true, |r| r != own));
                // The same over HTTP.
                let client = reqwest::Client::new();
                let got = client.get(format!("{url}/bzl/cas/{}", shared_d.hash)).bearer_auth(&rw).send().await;
                match got {
                    Ok(resp) if resp.status() == 200 => failures += usize::from(resp.bytes().await.map_or(true, |b| b != shared)),
                    _ => failures += 1,
                }
                failures
            }));
        }
        let mut failures = 0;
        for task in tasks {
            failures += task.await.unwrap();
        }
        failures
    });
    assert_eq!(errors, 0, "requests failed with 64 clients at once");
}

/// Garbage collection keeps the chunks of Bazel blobs (with no grace period, so only the
/// blob records keep them), and expires a cache's records once they are older than its
/// retention period (aged here by their objects' modification times) unless a use refreshed
/// them.
fn gc_keeps_blobs_and_expires_them(backend: Backend) {
    let server = Server::start_with(backend, "[gc]\ninterval = 0\ngrace-period = 0\n");
    let admin = server.admin_token();
    let client = reqwest::blocking::Client::new();
    for (cache, seconds) in [("keep", 86_400), ("short", 3600)] {
        server.create_cache(cache, false);
        server.set_retention(cache, seconds);
    }
    let big = blob(40, 2_000_000);
    let small = blob(41, 900);
    let result = ActionResult {
        output_files: vec![OutputFile { path: "o".into(), digest: Some(digest(&small)), ..Default::default() }],
        ..Default::default()
    };
    let action = digest(b"gc action").hash;
    for cache in ["keep", "short"] {
        for data in [&big, &small] {
            let url = format!("{}/{cache}/cas/{}", server.url, digest(data).hash);
            client.put(url).bearer_auth(&admin).body(data.clone()).send().unwrap().error_for_status().unwrap();
        }
        let url = format!("{}/{cache}/ac/{action}", server.url);
        client.put(url).bearer_auth(&admin).body(result.encode_to_vec()).send().unwrap().error_for_status().unwrap();
    }
    // Age the short-lived cache's records by two hours.
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    let records = server.objects.join("caches/short/bazel");
    for dir in ["cas", "ac"] {
        for entry in std::fs::read_dir(records.join(dir)).unwrap() {
            let file = std::fs::File::options().write(true).open(entry.unwrap().path()).unwrap();
            file.set_modified(two_hours_ago).unwrap();
        }
    }
    let get = |cache: &str, kind: &str, hash: &str| client.get(format!("{}/{cache}/{kind}/{hash}", server.url)).bearer_auth(&admin).send().unwrap();
    // A hit of the action refreshes it and the output it names, past half the retention
    // period; the big blob, which nothing used, is left to expire.
    assert_eq!(get("short", "ac", &action).status(), StatusCode::OK);
    let report = server.gc(&[]);
    assert!(report.contains(" 1 Bazel records"), "{report}");
    assert_eq!(get("keep", "cas", &digest(&big).hash).bytes().unwrap().as_ref(), &big[..]);
    assert_eq!(get("keep", "cas", &digest(&small).hash).bytes().unwrap().as_ref(), &small[..]);
    assert_eq!(get("keep", "ac", &action).status(), StatusCode::OK);
    assert_eq!(get("short", "cas", &digest(&big).hash).status(), StatusCode::NOT_FOUND);
    assert_eq!(get("short", "cas", &digest(&small).hash).bytes().unwrap().as_ref(), &small[..]);
    assert_eq!(get("short", "ac", &action).status(), StatusCode::OK);
    // Aged again and unused, everything goes.
    for dir in ["cas", "ac"] {
        for entry in std::fs::read_dir(records.join(dir)).unwrap() {
            let file = std::fs::File::options().write(true).open(entry.unwrap().path()).unwrap();
            file.set_modified(two_hours_ago).unwrap();
        }
    }
    let report = server.gc(&[]);
    assert!(report.contains(" 2 Bazel records"), "{report}");
    for (kind, hash) in [("cas", digest(&small).hash), ("ac", action.clone())] {
        assert_eq!(get("short", kind, &hash).status(), StatusCode::NOT_FOUND, "{kind} {hash}");
    }
}

/// A blob whose chunk is gone from storage: fsck names it and takes it out; a read of it is a
/// miss (not an error Bazel would stop on) that takes it out too, an action result naming it
/// is a miss, and a new upload repairs it.
fn damaged_blobs_heal(backend: Backend) {
    let (server, port) = start(backend);
    let rw = server.mint(&["--pull", "bzl", "--push", "bzl"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let big = blob(50, 1_200_000);
    let big_d = digest(&big);
    let action = digest(b"damaged action");
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        grpc.write(&rw, &format!("bzl/uploads/d1/blobs/{}/{}", big_d.hash, big_d.size_bytes), &big, 0, true).await.unwrap();
        let result = ActionResult {
            output_files: vec![OutputFile { path: "o".into(), digest: Some(big_d.clone()), ..Default::default() }],
            ..Default::default()
        };
        grpc.update_ac("bzl", &rw, &action, &result).await.unwrap();
        assert!(grpc.get_ac("bzl", &rw, &action).await.is_ok());
    });
    // Take one of its chunks out of storage (the record lists them after a 17-byte head).
    let record = std::fs::read(server.objects.join(format!("caches/bzl/bazel/cas/{}", big_d.hash))).unwrap();
    let chunk = hex::encode(&record[17 + 36..17 + 36 + 32]);
    std::fs::remove_file(server.objects.join(format!("chunks/{}/{chunk}", &chunk[..2]))).unwrap();
    // fsck names it and, not in a dry run, takes it out of the cache.
    let fsck = |extra: &[&str]| {
        let out = std::process::Command::new(common::FLYWHEEL).args(["fsck", "--config"]).arg(&server.config).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let report = fsck(&["--dry-run"]);
    assert!(report.contains(&format!("bzl Bazel blob {}", big_d.hash)), "{report}");
    assert!(report.contains(&format!("missing chunk {chunk}")), "{report}");
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        assert!(grpc.missing("bzl", &rw, std::slice::from_ref(&big_d)).await.unwrap().is_empty(), "a dry run changes nothing");
    });
    assert!(fsck(&[]).contains(&format!("bzl Bazel blob {}", big_d.hash)));
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        assert_eq!(grpc.missing("bzl", &rw, std::slice::from_ref(&big_d)).await.unwrap(), vec![big_d.clone()]);
    });
    // Put back as it was, the damage is found by a read instead.
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        grpc.write(&rw, &format!("bzl/uploads/d0/blobs/{}/{}", big_d.hash, big_d.size_bytes), &big, 0, true).await.unwrap();
    });
    std::fs::remove_file(server.objects.join(format!("chunks/{}/{chunk}", &chunk[..2]))).unwrap();
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        let name = format!("bzl/blobs/{}/{}", big_d.hash, big_d.size_bytes);
        assert_eq!(grpc.read(&rw, &name, 0, 0).await.unwrap_err().code(), Code::NotFound);
        assert_eq!(grpc.missing("bzl", &rw, std::slice::from_ref(&big_d)).await.unwrap(), vec![big_d.clone()]);
        assert_eq!(grpc.get_ac("bzl", &rw, &action).await.unwrap_err().code(), Code::NotFound);
        // Bazel uploads it again: whole again, and the action hits again.
        grpc.write(&rw, &format!("bzl/uploads/d2/blobs/{}/{}", big_d.hash, big_d.size_bytes), &big, 0, true).await.unwrap();
        assert_eq!(grpc.read(&rw, &name, 0, 0).await.unwrap(), big);
        assert!(grpc.get_ac("bzl", &rw, &action).await.is_ok());
    });
}

/// ByteStream writes held in temporary files are bounded by `bazel.spool-max-bytes`: a write
/// past it is refused as exhausted until the held ones finish.
#[test]
fn spooled_writes_are_bounded() {
    let (server, port) = start_with(Backend::Local, "spool-max-bytes = 1048576\n", "");
    let rw = server.mint(&["--pull", "bzl", "--push", "bzl"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        let (a, b) = (blob(60, 1_000_000), blob(61, 600_000));
        let (a_d, b_d) = (digest(&a), digest(&b));
        let a_name = format!("bzl/uploads/s1/blobs/{}/{}", a_d.hash, a_d.size_bytes);
        let b_name = format!("bzl/uploads/s2/blobs/{}/{}", b_d.hash, b_d.size_bytes);
        // 900 KiB of the first held, unfinished; not even the second's first message fits.
        assert!(grpc.write(&rw, &a_name, &a[..900 << 10], 0, false).await.is_err());
        assert_eq!(grpc.write(&rw, &b_name, &b, 0, true).await.unwrap_err().code(), Code::ResourceExhausted);
        // The first finishes, which frees its bytes; then the second goes through.
        grpc.write(&rw, &a_name, &a[900 << 10..], 900 << 10, true).await.unwrap();
        grpc.write(&rw, &b_name, &b, 0, true).await.unwrap();
        assert!(grpc.missing("bzl", &rw, &[a_d, b_d]).await.unwrap().is_empty());
    });
}

backend_matrix! {
    damaged_blobs_heal => damaged_blobs_heal_local, damaged_blobs_heal_s3;
    gc_keeps_blobs_and_expires_them => gc_keeps_blobs_and_expires_them_local, gc_keeps_blobs_and_expires_them_s3;
}

/// Silent sockets on the gRPC listener: one past `bazel.max-connections` is closed at once,
/// the others once `limits.header-read-timeout` passes without the HTTP/2 preface (one byte
/// is not enough); then clients are served.
#[test]
fn silent_grpc_connections_are_dropped() {
    use std::io::{Read, Write};
    let (server, port) = start_with(Backend::Local, "max-connections = 4\n", "[limits]\nheader-read-timeout = 10\n");
    let token = server.mint(&["--pull", "bzl"]);
    let silent: Vec<std::net::TcpStream> = (0..4).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // The listen backlog is first in, first out: the server accepts the four before the fifth.
    let mut fifth = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    fifth.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    assert_eq!(fifth.read(&mut [0u8; 16]).map_err(|e| e.kind()), Ok(0), "the fifth connection is closed");
    // Closed by the limit, not the silence: the four are still open then.
    for socket in &silent {
        socket.set_nonblocking(true).unwrap();
        // The server may have sent its HTTP/2 settings already; open means no end of stream.
        let mut buf = [0u8; 256];
        let open = loop {
            match (&*socket).read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
            }
        };
        assert!(open, "a silent connection was closed before the fifth");
        socket.set_nonblocking(false).unwrap();
    }
    // One byte is not the HTTP/2 preface: such a connection goes too once the deadline passes.
    (&silent[0]).write_all(b"P").unwrap();
    for mut socket in silent {
        socket.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match socket.read(&mut buf) {
                // hyper may answer an idle connection with a GOAWAY before closing it.
                Ok(n) if n > 0 => continue,
                Ok(_) => break,
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(err) => panic!("a silent connection stayed open: {err}"),
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let grpc = Grpc::connect(port).await;
        let caps = CapabilitiesClient::new(grpc.channel.clone())
            .get_capabilities(req(GetCapabilitiesRequest { instance_name: "bzl".into() }, &token))
            .await;
        assert!(caps.is_ok(), "{caps:?}");
    });
}

backend_matrix! {
    grpc_protocol => grpc_protocol_local, grpc_protocol_s3;
    http_protocol => http_protocol_local, http_protocol_s3;
    many_clients => many_clients_local, many_clients_s3;
}
