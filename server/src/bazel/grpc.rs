//! REAPI v2's cache services and ByteStream over gRPC (`tonic`), on a listener of their own
//! (`[bazel] grpc-listen`): what `bazel --remote_cache=grpc://HOST:PORT` uses.
//!
//! The instance name (`--remote_instance_name`) names the cache; an empty one means
//! `[bazel] default-instance`. Tokens come in the `authorization` metadata, as Bearer (the
//! `--remote_header=Authorization=Bearer ...` form) or Basic with the token as the password;
//! reads need pull on the cache, writes push.
//!
//! ByteStream writes are resumable: what a broken write sent is kept, for this replica, in an
//! unlinked temporary file for [`PARTIAL_WRITE_TTL`], and `QueryWriteStatus` tells how much
//! of it there is. A write whose whole blob comes in its first message goes straight to
//! storage. `compressed-blobs/zstd` is accepted for reads and writes; a chunked blob is read
//! as its stored zstd frames, not recompressed.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flywheel_core::{Error, ErrorKind};
use flywheel_reapi::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use flywheel_reapi::bytestream::{QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use flywheel_reapi::execution::action_cache_server::{ActionCache, ActionCacheServer};
use flywheel_reapi::execution::capabilities_server::{Capabilities, CapabilitiesServer};
use flywheel_reapi::execution::content_addressable_storage_server::{ContentAddressableStorage, ContentAddressableStorageServer};
use flywheel_reapi::execution::{
    batch_read_blobs_response, batch_update_blobs_response, compressor, digest_function, symlink_absolute_path_strategy,
    ActionCacheUpdateCapabilities, ActionResult, BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, CacheCapabilities, FindMissingBlobsRequest, FindMissingBlobsResponse, GetActionResultRequest,
    GetCapabilitiesRequest, GetTreeRequest, GetTreeResponse, ServerCapabilities, SpliceBlobRequest, SpliceBlobResponse,
    SplitBlobRequest, SplitBlobResponse, UpdateActionResultRequest,
};
use flywheel_reapi::rpc;
use flywheel_reapi::semver::SemVer;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use super::{ActionLookup, BlobDigest, Counter, Protocol};
use crate::ingest::Compression;
use crate::routes::{authorize, Caller};
use crate::state::AppState;

/// Largest gRPC message, either way: a batch of [`MAX_BATCH_BYTES`] plus its framing, or the
/// largest action result (`bazel.max-action-result-size` is bounded below it).
pub const MAX_MESSAGE: usize = 8 << 20;

/// Bytes of blobs one batch request may carry or ask for (announced in the capabilities).
pub const MAX_BATCH_BYTES: u64 = 4 << 20;

/// Digests one request may name.
const MAX_DIGESTS: usize = 100_000;

/// Blobs one batch may carry or ask for: each is a storage request, done one after another.
const MAX_BATCH_BLOBS: usize = 4096;

/// How long the part of a broken ByteStream write is kept for its resumption.
pub const PARTIAL_WRITE_TTL: Duration = Duration::from_secs(600);

/// Broken writes kept at once; the oldest goes first.
const MAX_PARTIAL_WRITES: usize = 256;

/// Largest piece of a blob in one ByteStream read answer.
const READ_PIECE: usize = 1 << 20;

/// The gRPC services, over the server's state.
#[derive(Clone)]
pub struct BazelGrpc {
    state: AppState,
    partial: Arc<Mutex<HashMap<String, PartialEntry>>>,
}

/// What a broken write sent so far.
struct PartialWrite {
    file: Option<tokio::fs::File>,
    /// Bytes in `file` that count; shared with the table, so that QueryWriteStatus answers
    /// without waiting for a write in progress.
    committed: Arc<std::sync::atomic::AtomicU64>,
    touched: Instant,
}

impl PartialWrite {
    fn committed(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_committed(&self, value: u64) {
        self.committed.store(value, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A partial write in the table: the write itself, and its committed length.
type PartialEntry = (Arc<tokio::sync::Mutex<PartialWrite>>, Arc<std::sync::atomic::AtomicU64>);

/// A gRPC status for an error; internal details stay in the log.
pub fn status(err: Error) -> Status {
    let message = err.to_string();
    match err.kind() {
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::AlreadyExists => Status::already_exists(message),
        ErrorKind::InvalidInput => Status::invalid_argument(message),
        ErrorKind::Unauthorized => Status::unauthenticated(message),
        ErrorKind::Forbidden => Status::permission_denied(message),
        ErrorKind::Unavailable => {
            tracing::error!(error = %message, "storage unavailable");
            Status::unavailable("the storage backend is unavailable; try again later")
        }
        _ => {
            tracing::error!(error = %message, "request failed");
            Status::internal("the server encountered an internal error")
        }
    }
}

fn rpc_status(err: Option<Error>) -> rpc::Status {
    match err {
        None => rpc::Status { code: tonic::Code::Ok as i32, message: String::new(), details: vec![] },
        Some(err) => {
            let status = status(err);
            rpc::Status { code: status.code() as i32, message: status.message().to_string(), details: vec![] }
        }
    }
}

/// The verified claims of a call's token (none without one), put in its extensions by
/// [`Authenticate`] before the message is read.
#[derive(Clone)]
struct Authenticated(Option<crate::auth::Claims>);

/// Checks a call's token from its headers: a bad one is refused before any message of the
/// call is read or decoded, so that only callers with a valid token (or none, for public
/// caches) make the server take in up to a message's size.
#[derive(Clone)]
struct Authenticate(crate::auth::TokenAuthority);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").map(|v| v.as_bytes());
        let claims = self.0.authenticate(header).map_err(status)?;
        request.extensions_mut().insert(Authenticated(claims));
        Ok(request)
    }
}

/// What a call needs on its cache.
#[derive(Clone, Copy)]
enum Need {
    Pull,
    Push,
}

impl BazelGrpc {
    /// The services over `state`.
    pub fn new(state: AppState) -> Self {
        BazelGrpc { state, partial: Arc::default() }
    }

    /// The cache an instance name stands for, once the caller may `need` on it.
    async fn cache<T>(&self, request: &Request<T>, instance: &str, need: Need) -> Result<(String, Option<Duration>), Status> {
        let cache = if instance.is_empty() {
            self.state.bazel.config.default_instance.clone().ok_or_else(|| {
                Status::invalid_argument("no instance name: set --remote_instance_name to the cache's name (no bazel.default-instance is configured)")
            })?
        } else {
            instance.to_string()
        };
        let caller = match request.extensions().get::<Authenticated>() {
            Some(Authenticated(claims)) => Caller(claims.clone()),
            None => {
                let header = request.metadata().get("authorization").map(|v| v.as_bytes());
                Caller(self.state.tokens.authenticate(header).map_err(status)?)
            }
        };
        let (what, granted): (&str, fn(&crate::auth::Permissions) -> bool) = match need {
            Need::Pull => ("pull", |p| p.pull),
            Need::Push => ("push", |p| p.push),
        };
        let record = authorize(&self.state, &caller, &cache, what, granted).await.map_err(|e| status(e.into_error()))?;
        let refresh_after = self.state.bazel.refresh_after(&record);
        Ok((cache, refresh_after))
    }

    fn count(&self, counter: Counter, n: u64) {
        self.state.bazel.metrics.add(Protocol::Grpc, counter, n);
    }

    /// The services, each bounding its messages to 8 MiB either way, behind a check of the
    /// token that runs on the request's headers, before any message is read.
    pub fn router(self) -> tonic::service::Routes {
        let check = Authenticate(self.state.tokens.clone());
        tonic::service::Routes::default()
            .add_service(InterceptedService::new(
                CapabilitiesServer::new(self.clone()).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                ActionCacheServer::new(self.clone()).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                ContentAddressableStorageServer::new(self.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                ByteStreamServer::new(self).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE),
                check,
            ))
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.state.config.limits.request_timeout)
    }

    fn body_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.state.config.limits.body_idle_timeout)
    }

    /// Runs a unary call within the request timeout.
    async fn bounded<T>(&self, call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
        tokio::time::timeout(self.request_timeout(), call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("the request took longer than limits.request-timeout")))
    }
}

fn check_digest_function(value: i32) -> Result<(), Status> {
    if value == digest_function::Value::Unknown as i32 || value == digest_function::Value::Sha256 as i32 {
        Ok(())
    } else {
        Err(Status::invalid_argument("only the SHA-256 digest function is supported"))
    }
}

#[tonic::async_trait]
impl Capabilities for BazelGrpc {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn get_capabilities(&self, request: Request<GetCapabilitiesRequest>) -> Result<Response<ServerCapabilities>, Status> {
        self.cache(&request, &request.get_ref().instance_name, Need::Pull).await?;
        // Updates are announced only to callers who may push: Bazel then tells a pull-only
        // user to pass --noremote_upload_local_results instead of failing each upload.
        let may_push = self.cache(&request, &request.get_ref().instance_name, Need::Push).await.is_ok();
        let version = |minor| Some(SemVer { major: 2, minor, patch: 0, prerelease: String::new() });
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: vec![digest_function::Value::Sha256 as i32],
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities { update_enabled: may_push }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: MAX_BATCH_BYTES as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![],
                max_cas_blob_size_bytes: self.state.bazel.config.max_blob_size as i64,
                split_blob_support: false,
                splice_blob_support: false,
                fast_cdc_2020_params: None,
                rep_max_cdc_params: None,
            }),
            execution_capabilities: None,
            deprecated_api_version: None,
            low_api_version: version(0),
            high_api_version: version(0),
        }))
    }
}

#[tonic::async_trait]
impl ActionCache for BazelGrpc {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn get_action_result(&self, request: Request<GetActionResultRequest>) -> Result<Response<ActionResult>, Status> {
        self.bounded(async {
            let (cache, refresh) = self.cache(&request, &request.get_ref().instance_name, Need::Pull).await?;
            let request = request.get_ref();
            check_digest_function(request.digest_function)?;
            let action = BlobDigest::from_proto(request.action_digest.as_ref()).map_err(status)?;
            let (lookup, bytes) = self.state.bazel.action_result(&cache, &action.sha256, refresh).await.map_err(status)?;
            match lookup {
                ActionLookup::Hit(result) => {
                    self.count(Counter::AcHit, 1);
                    self.count(Counter::BytesOut, bytes.map_or(0, |b| b.len() as u64));
                    Ok(Response::new(*result))
                }
                ActionLookup::Missing | ActionLookup::Incomplete => {
                    self.count(Counter::AcMiss, 1);
                    Err(Status::not_found(format!("no complete action result for {action}")))
                }
            }
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn update_action_result(&self, request: Request<UpdateActionResultRequest>) -> Result<Response<ActionResult>, Status> {
        self.bounded(async {
            let (cache, _) = self.cache(&request, &request.get_ref().instance_name, Need::Push).await?;
            let request = request.into_inner();
            check_digest_function(request.digest_function)?;
            let action = BlobDigest::from_proto(request.action_digest.as_ref()).map_err(status)?;
            let result = request.action_result.ok_or_else(|| Status::invalid_argument("no action result"))?;
            let bytes = Bytes::from(result.encode_to_vec());
            self.count(Counter::BytesIn, bytes.len() as u64);
            self.state.bazel.put_action_result(&cache, &action.sha256, bytes).await.map_err(status)?;
            Ok(Response::new(result))
        })
        .await
    }
}

type GetTreeStream = std::pin::Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for BazelGrpc {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn find_missing_blobs(&self, request: Request<FindMissingBlobsRequest>) -> Result<Response<FindMissingBlobsResponse>, Status> {
        self.bounded(async {
            let (cache, refresh) = self.cache(&request, &request.get_ref().instance_name, Need::Pull).await?;
            let request = request.get_ref();
            check_digest_function(request.digest_function)?;
            if request.blob_digests.len() > MAX_DIGESTS {
                return Err(Status::invalid_argument(format!("more than {MAX_DIGESTS} digests in one request")));
            }
            let digests = request
                .blob_digests
                .iter()
                .map(|d| BlobDigest::from_proto(Some(d)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(status)?;
            let present = self.state.bazel.has_blobs(&cache, &digests, refresh).await.map_err(status)?;
            let missing: Vec<_> = digests.iter().zip(&present).filter(|(_, p)| !**p).map(|(d, _)| d.to_proto()).collect();
            self.count(Counter::CasHit, (digests.len() - missing.len()) as u64);
            self.count(Counter::CasMiss, missing.len() as u64);
            Ok(Response::new(FindMissingBlobsResponse { missing_blob_digests: missing }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn batch_update_blobs(&self, request: Request<BatchUpdateBlobsRequest>) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.bounded(async {
            let (cache, _) = self.cache(&request, &request.get_ref().instance_name, Need::Push).await?;
            let request = request.into_inner();
            check_digest_function(request.digest_function)?;
            if request.requests.len() > MAX_BATCH_BLOBS {
                return Err(Status::invalid_argument(format!("more than {MAX_BATCH_BLOBS} blobs in one batch")));
            }
            let mut responses = Vec::with_capacity(request.requests.len());
            for blob in request.requests {
                let outcome = async {
                    let digest = BlobDigest::from_proto(blob.digest.as_ref())?;
                    if blob.compressor != compressor::Value::Identity as i32 {
                        return Err(Error::invalid("batch uploads take uncompressed blobs only"));
                    }
                    self.count(Counter::BytesIn, blob.data.len() as u64);
                    let body = futures::stream::once(async move { Ok::<_, io::Error>(blob.data) });
                    self.state.bazel.put_blob(&cache, digest, body, Compression::None).await
                }
                .await;
                responses.push(batch_update_blobs_response::Response { digest: blob.digest, status: Some(rpc_status(outcome.err())) });
            }
            Ok(Response::new(BatchUpdateBlobsResponse { responses }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn batch_read_blobs(&self, request: Request<BatchReadBlobsRequest>) -> Result<Response<BatchReadBlobsResponse>, Status> {
        self.bounded(async {
            let (cache, _) = self.cache(&request, &request.get_ref().instance_name, Need::Pull).await?;
            let request = request.into_inner();
            check_digest_function(request.digest_function)?;
            if request.digests.len() > MAX_BATCH_BLOBS {
                return Err(Status::invalid_argument(format!("more than {MAX_BATCH_BLOBS} blobs in one batch")));
            }
            let digests = request
                .digests
                .iter()
                .map(|d| BlobDigest::from_proto(Some(d)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(status)?;
            let total: u64 = digests.iter().map(|d| d.size).fold(0, u64::saturating_add);
            if total > MAX_BATCH_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the batch asks for {total} bytes, over max_batch_total_size_bytes ({MAX_BATCH_BYTES}); read large blobs with ByteStream"
                )));
            }
            let mut responses = Vec::with_capacity(digests.len());
            for digest in digests {
                let read = self.state.bazel.read_blob_bytes(&cache, digest).await;
                let (data, status) = match read {
                    Ok(Some(data)) => {
                        self.count(Counter::CasHit, 1);
                        self.count(Counter::BytesOut, data.len() as u64);
                        (data, rpc_status(None))
                    }
                    Ok(None) => {
                        self.count(Counter::CasMiss, 1);
                        (Bytes::new(), rpc_status(Some(Error::not_found(format!("blob {digest} is not in the cache")))))
                    }
                    Err(err) => (Bytes::new(), rpc_status(Some(err))),
                };
                responses.push(batch_read_blobs_response::Response {
                    digest: Some(digest.to_proto()),
                    data,
                    compressor: compressor::Value::Identity as i32,
                    status: Some(status),
                });
            }
            Ok(Response::new(BatchReadBlobsResponse { responses }))
        })
        .await
    }

    type GetTreeStream = GetTreeStream;

    async fn get_tree(&self, _request: Request<GetTreeRequest>) -> Result<Response<GetTreeStream>, Status> {
        Err(Status::unimplemented("GetTree is not offered: this is a cache, not a remote executor"))
    }

    async fn split_blob(&self, _request: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob is not offered"))
    }

    async fn splice_blob(&self, _request: Request<SpliceBlobRequest>) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob is not offered"))
    }
}

/// A ByteStream resource name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The instance name: everything before `uploads/` or `blobs/`.
    pub instance: String,
    /// The blob.
    pub digest: BlobDigest,
    /// Whether the bytes are zstd (`compressed-blobs/zstd/`).
    pub compressed: bool,
}

impl Resource {
    /// Parses `{instance}/blobs/{hash}/{size}` or `{instance}/compressed-blobs/zstd/{hash}/{size}`
    /// (reads), or the same after `{instance}/uploads/{uuid}/` and with any trailing metadata
    /// (writes). The instance is a cache's name, one segment or none; a cache may be named like
    /// a keyword (`blobs`), so the name with an instance is tried first, then without.
    pub fn parse(name: &str, write: bool) -> Result<Self, Error> {
        let parts: Vec<&str> = name.split('/').collect();
        let with_instance = parts.split_first().and_then(|(instance, rest)| Self::parse_after(instance, rest, write));
        with_instance
            .or_else(|| Self::parse_after("", &parts, write))
            .ok_or_else(|| Error::invalid(format!("{:?} is not a ByteStream resource name of a blob", super::truncate(name))))?
    }

    fn parse_after(instance: &str, parts: &[&str], write: bool) -> Option<Result<Self, Error>> {
        let rest = if write {
            match parts {
                ["uploads", _uuid, rest @ ..] => rest,
                _ => return None,
            }
        } else {
            parts
        };
        let (compressed, rest) = match rest {
            ["blobs", rest @ ..] => (false, rest),
            ["compressed-blobs", "zstd", rest @ ..] => (true, rest),
            ["compressed-blobs", other, _, _, ..] => {
                return Some(Err(Error::invalid(format!("compressor {other:?} is not supported; use zstd"))));
            }
            _ => return None,
        };
        let (hash, size) = match rest {
            [hash, size] => (hash, size),
            [hash, size, ..] if write => (hash, size),
            _ => return None,
        };
        let size: i64 = size.parse().ok()?;
        let digest = BlobDigest::parse(hash, size).ok()?;
        Some(Ok(Resource { instance: instance.to_string(), digest, compressed }))
    }
}

type ReadStream = std::pin::Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for BazelGrpc {
    type ReadStream = ReadStream;

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let resource = Resource::parse(&request.get_ref().resource_name, false).map_err(status)?;
        let (cache, _) = self.cache(&request, &resource.instance, Need::Pull).await?;
        let ReadRequest { read_offset, read_limit, .. } = request.into_inner();
        let (offset, limit) = match (u64::try_from(read_offset), u64::try_from(read_limit)) {
            (Ok(offset), Ok(limit)) => (offset, if limit == 0 { u64::MAX } else { limit }),
            _ => return Err(Status::invalid_argument("negative read_offset or read_limit")),
        };
        // For compressed reads REAPI counts read_offset in uncompressed bytes and forbids a
        // read_limit (the compressed length is unknown to the client).
        if resource.compressed && read_limit != 0 {
            return Err(Status::invalid_argument("a read_limit is not allowed on compressed-blobs reads"));
        }
        if offset > resource.digest.size {
            return Err(Status::out_of_range(format!("read_offset {offset} is past the blob's {} bytes", resource.digest.size)));
        }
        let bazel = &self.state.bazel;
        let stream = if resource.compressed && offset == 0 {
            bazel.read_blob_zstd(&cache, resource.digest).await
        } else {
            bazel.read_blob(&cache, resource.digest).await
        };
        let Some(stream) = stream.map_err(status)? else {
            self.count(Counter::CasMiss, 1);
            return Err(Status::not_found(format!("blob {} is not in the cache", resource.digest)));
        };
        self.count(Counter::CasHit, 1);
        let metrics = self.state.bazel.metrics.clone();
        let stream: super::BlobStream = if resource.compressed && offset > 0 {
            // A resumed compressed read: the rest of the blob, each piece its own zstd frame
            // (frames one after another are one valid zstd stream).
            Box::pin(window(stream, offset, u64::MAX).map(|piece| {
                let piece = piece?;
                zstd::bulk::compress(&piece, 1).map(Bytes::from).map_err(|e| Error::internal(format!("zstd: {e}")))
            }))
        } else {
            Box::pin(window(stream, offset, limit))
        };
        let pieces = stream.flat_map(|item| {
            let pieces: Vec<Result<ReadResponse, Status>> = match item {
                Ok(bytes) => {
                    let mut out = Vec::new();
                    let mut at = 0;
                    while at < bytes.len() {
                        let end = (at + READ_PIECE).min(bytes.len());
                        out.push(Ok(ReadResponse { data: bytes.slice(at..end) }));
                        at = end;
                    }
                    out
                }
                Err(err) => vec![Err(status(err))],
            };
            futures::stream::iter(pieces)
        });
        let counted = pieces.inspect(move |item| {
            if let Ok(piece) = item {
                metrics.add(Protocol::Grpc, Counter::BytesOut, piece.data.len() as u64);
            }
        });
        // A reader that stops reading does not hold the stream forever: it gets the request
        // timeout plus the time the blob takes at limits.body-min-rate.
        let limits = &self.state.config.limits;
        let transfer = Duration::from_secs(resource.digest.size / limits.body_min_rate.max(1));
        let deadline = tokio::time::Instant::now() + self.request_timeout() + transfer;
        let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let timer = {
            let expired = expired.clone();
            async move {
                tokio::time::sleep_until(deadline).await;
                expired.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        // Only a read the timer cut short ends in the error; one that finished first ends cleanly.
        let bounded = counted.take_until(timer).chain(
            futures::stream::once(async move {
                expired
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .then(|| Err(Status::deadline_exceeded("the read took longer than its deadline")))
            })
            .filter_map(futures::future::ready),
        );
        Ok(Response::new(Box::pin(bounded)))
    }

    #[tracing::instrument(skip_all, fields(resource = tracing::field::Empty))]
    async fn write(&self, request: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let idle = self.body_idle_timeout();
        let mut auth_request = Request::new(());
        *auth_request.metadata_mut() = request.metadata().clone();
        if let Some(authenticated) = request.extensions().get::<Authenticated>() {
            auth_request.extensions_mut().insert(authenticated.clone());
        }
        let mut messages = request.into_inner();
        let first = next_message(&mut messages, idle).await?.ok_or_else(|| Status::invalid_argument("a write without a message"))?;
        let resource = Resource::parse(&first.resource_name, true).map_err(status)?;
        tracing::Span::current().record("resource", first.resource_name.as_str());
        let (cache, _) = self.cache(&auth_request, &resource.instance, Need::Push).await?;
        let digest = resource.digest;
        self.state.bazel.check_blob_size(digest.size).map_err(status)?;
        let compression = if resource.compressed { Compression::Zstd } else { Compression::None };
        // The most a client may send: the blob, or its zstd form (which for incompressible
        // data is a little longer).
        let limit = if resource.compressed { digest.size + digest.size / 64 + (1 << 16) } else { digest.size };

        // The whole blob in one message: no file on the way.
        if first.write_offset == 0 && first.finish_write {
            let len = first.data.len() as u64;
            if len > limit {
                return Err(Status::invalid_argument(format!("{len} bytes sent for a blob of {} bytes", digest.size)));
            }
            self.count(Counter::BytesIn, len);
            let data = first.data;
            let body = futures::stream::once(async move { Ok::<_, io::Error>(data) });
            self.state.bazel.put_blob(&cache, digest, body, compression).await.map_err(status)?;
            return Ok(Response::new(WriteResponse { committed_size: len as i64 }));
        }

        let name = first.resource_name.clone();
        let partial = self.partial_write(&name, first.write_offset)?;
        let mut partial = match tokio::time::timeout(self.body_idle_timeout(), partial.lock_owned()).await {
            Ok(partial) => partial,
            Err(_) => return Err(Status::aborted("another write of this resource is in progress")),
        };
        if first.write_offset == 0 {
            partial.file = None;
            partial.set_committed(0);
        } else if u64::try_from(first.write_offset) != Ok(partial.committed()) {
            return Err(Status::invalid_argument(format!(
                "write_offset {} but {} bytes are committed (QueryWriteStatus tells)",
                first.write_offset,
                partial.committed()
            )));
        } else if let Some(file) = partial.file.as_mut() {
            // A message cut off mid-write may have left bytes past what was committed.
            let committed = u64::try_from(first.write_offset).unwrap_or(0);
            let truncated = async {
                file.set_len(committed).await?;
                file.seek(io::SeekFrom::Start(committed)).await
            };
            if let Err(err) = truncated.await {
                drop(partial);
                self.partial.lock().remove(&name);
                return Err(status(Error::internal(format!("resuming a partial write: {err}"))));
            }
        }
        let mut message = Some(first);
        let mut finished = false;
        let started = Instant::now();
        let mut received = 0u64;
        let min_rate = self.state.config.limits.body_min_rate;
        while let Some(write) = message.take() {
            if u64::try_from(write.write_offset) != Ok(partial.committed()) {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} but {} bytes are committed",
                    write.write_offset,
                    partial.committed()
                )));
            }
            let len = write.data.len() as u64;
            if partial.committed() + len > limit {
                return Err(Status::invalid_argument(format!("more bytes sent than a blob of {} bytes takes", digest.size)));
            }
            if self.spooled() + len > self.state.bazel.config.spool_max_bytes {
                return Err(Status::resource_exhausted(
                    "ByteStream writes in progress hold bazel.spool-max-bytes already; try again later",
                ));
            }
            if partial.file.is_none() {
                let file = tempfile::tempfile().map_err(|e| status(Error::internal(format!("a file for a partial write: {e}"))))?;
                partial.file = Some(tokio::fs::File::from_std(file));
            }
            if let Some(file) = partial.file.as_mut() {
                if let Err(err) = file.write_all(&write.data).await {
                    // What the file holds is no longer known: the write starts over.
                    drop(partial);
                    self.partial.lock().remove(&name);
                    return Err(status(Error::internal(format!("keeping a partial write: {err}"))));
                }
            }
            partial.set_committed(partial.committed() + len);
            partial.touched = Instant::now();
            received += len;
            self.count(Counter::BytesIn, len);
            if write.finish_write {
                finished = true;
                break;
            }
            // A trickle cannot hold a write open forever: past the first idle period, it must
            // keep up limits.body-min-rate on average.
            let elapsed = started.elapsed();
            if elapsed > idle && received < min_rate.saturating_mul(elapsed.as_secs()) {
                return Err(Status::deadline_exceeded("the write is slower than limits.body-min-rate"));
            }
            // A broken stream leaves what came so far for a resumption.
            message = next_message(&mut messages, idle).await?;
        }
        if !finished {
            return Err(Status::invalid_argument("the write ended without finish_write"));
        }
        let committed = partial.committed();
        let mut file = partial.file.take().ok_or_else(|| Status::internal("a partial write lost its file"))?;
        drop(partial);
        self.partial.lock().remove(&name);
        file.flush().await.map_err(|e| status(Error::internal(format!("{e}"))))?;
        file.seek(io::SeekFrom::Start(0)).await.map_err(|e| status(Error::internal(format!("{e}"))))?;
        self.state.bazel.put_blob(&cache, digest, file_stream(file), compression).await.map_err(status)?;
        Ok(Response::new(WriteResponse { committed_size: committed as i64 }))
    }

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn query_write_status(&self, request: Request<QueryWriteStatusRequest>) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let resource = Resource::parse(&request.get_ref().resource_name, true).map_err(status)?;
        let (cache, _) = self.cache(&request, &resource.instance, Need::Push).await?;
        let partial = self.partial.lock().get(&request.get_ref().resource_name).cloned();
        if let Some((_, committed)) = partial {
            let committed = committed.load(std::sync::atomic::Ordering::Relaxed);
            return Ok(Response::new(QueryWriteStatusResponse { committed_size: committed as i64, complete: false }));
        }
        let present = self.state.bazel.has_blobs(&cache, &[resource.digest], None).await.map_err(status)?;
        let complete = present.first().copied().unwrap_or(false);
        let committed = if complete { resource.digest.size as i64 } else { 0 };
        Ok(Response::new(QueryWriteStatusResponse { committed_size: committed, complete }))
    }
}

impl BazelGrpc {
    /// Bytes all partial writes hold in their files.
    fn spooled(&self) -> u64 {
        self.partial.lock().values().map(|(_, committed)| committed.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// The partial write of `name`, made if there is none and `offset` is 0. Expired ones go
    /// first, then the oldest if the table is full.
    fn partial_write(&self, name: &str, offset: i64) -> Result<Arc<tokio::sync::Mutex<PartialWrite>>, Status> {
        let mut table = self.partial.lock();
        table.retain(|_, (p, _)| p.try_lock().map_or(true, |p| p.touched.elapsed() < PARTIAL_WRITE_TTL));
        if let Some((existing, _)) = table.get(name) {
            return Ok(existing.clone());
        }
        if offset != 0 {
            return Err(Status::invalid_argument(format!(
                "write_offset {offset} for a write this server has no part of (QueryWriteStatus tells 0)"
            )));
        }
        if table.len() >= MAX_PARTIAL_WRITES {
            let oldest = table
                .iter()
                .filter_map(|(k, (p, _))| p.try_lock().ok().map(|p| (k.clone(), p.touched)))
                .min_by_key(|(_, touched)| *touched)
                .map(|(k, _)| k);
            match oldest {
                Some(key) => {
                    table.remove(&key);
                }
                None => return Err(Status::resource_exhausted("too many ByteStream writes at once; try again")),
            }
        }
        let committed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let entry = Arc::new(tokio::sync::Mutex::new(PartialWrite { file: None, committed: committed.clone(), touched: Instant::now() }));
        table.insert(name.to_string(), (entry.clone(), committed));
        Ok(entry)
    }
}

/// The next message of a write, waiting at most `idle` for it.
async fn next_message(messages: &mut Streaming<WriteRequest>, idle: Duration) -> Result<Option<WriteRequest>, Status> {
    match tokio::time::timeout(idle, messages.message()).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded("no write message within limits.body-idle-timeout")),
    }
}

/// A file's bytes as a stream of pieces.
fn file_stream(file: tokio::fs::File) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(err) => Some((Err(err), None)),
        }
    })
}

/// The part of `stream` from `offset`, at most `limit` bytes.
fn window(
    stream: super::BlobStream,
    offset: u64,
    limit: u64,
) -> impl Stream<Item = flywheel_core::Result<Bytes>> + Send {
    futures::stream::unfold((stream, offset, limit), |(mut stream, mut skip, mut left)| async move {
        loop {
            if left == 0 {
                return None;
            }
            match stream.next().await? {
                Err(err) => return Some((Err(err), (stream, 0, 0))),
                Ok(mut piece) => {
                    if skip >= piece.len() as u64 {
                        skip -= piece.len() as u64;
                        continue;
                    }
                    piece = piece.slice(skip as usize..);
                    if piece.len() as u64 > left {
                        piece.truncate(left as usize);
                    }
                    left -= piece.len() as u64;
                    return Some((Ok(piece), (stream, 0, left)));
                }
            }
        }
    })
}

/// Serves the gRPC services on `listener` until `shutdown`, at most `bazel.max-connections`
/// connections at once (one more is closed as soon as it is accepted), with HTTP/2 keepalives
/// so that a vanished peer's connection is dropped.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.bazel.max_connections));
    let preface_timeout = Duration::from_secs(state.config.limits.header_read_timeout);
    let incoming = futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        loop {
            let accepted = listener.accept().await;
            match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let _ = stream.set_nodelay(true);
                        let preface = Some(Box::pin(tokio::time::sleep(preface_timeout)));
                        return Some((Ok::<_, io::Error>(Connection { stream, preface, received: 0, _slot: slot }), (listener, slots)));
                    }
                    Err(_) => {
                        tracing::warn!("bazel.max-connections reached: a gRPC connection is closed");
                        drop(stream);
                    }
                },
                // Out of descriptors and the like: wait a moment rather than spin.
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(256)
        .add_routes(BazelGrpc::new(state).router())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const HTTP2_PREFACE_LEN: usize = 24;

/// An accepted connection, holding its slot of `bazel.max-connections` until it closes. A
/// client that has not sent the HTTP/2 preface within `limits.header-read-timeout` of
/// connecting is dropped, so that silent sockets cannot take every slot.
struct Connection {
    stream: tokio::net::TcpStream,
    /// Until the HTTP/2 client preface has arrived: when the connection is given up.
    preface: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Bytes received so far, counted up to the preface's length.
    received: usize,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.received = this.received.saturating_add(buf.filled().len() - before);
                if this.received >= HTTP2_PREFACE_LEN {
                    this.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                let expired = this.preface.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "nothing sent within limits.header-read-timeout of connecting")))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn resource_names_parse() {
        let read = Resource::parse(&format!("main/blobs/{HASH}/0"), false).unwrap();
        assert_eq!((read.instance.as_str(), read.digest.size, read.compressed), ("main", 0, false));
        let bare = Resource::parse(&format!("blobs/{HASH}/7"), false).unwrap();
        assert_eq!((bare.instance.as_str(), bare.digest.size), ("", 7));
        let named_like_a_keyword = Resource::parse(&format!("blobs/blobs/{HASH}/7"), false).unwrap();
        assert_eq!(named_like_a_keyword.instance, "blobs");
        let zstd = Resource::parse(&format!("main/compressed-blobs/zstd/{HASH}/9"), false).unwrap();
        assert!(zstd.compressed);
        let write = Resource::parse(&format!("main/uploads/u-1/blobs/{HASH}/5/some/metadata"), true).unwrap();
        assert_eq!((write.instance.as_str(), write.digest.size), ("main", 5));
        let bare_write = Resource::parse(&format!("uploads/u-1/compressed-blobs/zstd/{HASH}/5"), true).unwrap();
        assert_eq!((bare_write.instance.as_str(), bare_write.compressed), ("", true));
    }

    #[test]
    fn bad_resource_names_are_refused() {
        for (name, write) in [
            (format!("main/blobs/{HASH}"), false),
            (format!("main/blobs/{HASH}/-1"), false),
            (format!("main/blobs/{HASH}/5/extra"), false),
            ("main/blobs/XYZ/5".to_string(), false),
            (format!("main/uploads/blobs/{HASH}/5"), true),
            (format!("main/blobs/{HASH}/5"), true),
            (format!("main/compressed-blobs/gzip/{HASH}/5"), false),
            (String::new(), false),
            ("/".repeat(10), true),
        ] {
            let err = Resource::parse(&name, write).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name}");
        }
    }
}
