//! HTTP client of the chunk API (`/_flywheel/v1/{cache}/...`) and of the narinfo files the
//! dump of a closure needs. Wire types come from `flywheel_core::api::v1`.

use std::sync::Arc;
use std::time::Duration;

use flywheel_core::api::v1::cache_config::CacheConfig;
use flywheel_core::api::v1::chunks::{
    decompress_manifest, BaseChunks, ChunkBatch, ChunkList, CommitRequest, PathManifest, MANIFEST_ENCODING, MAX_CHUNKS_PER_REQUEST,
};
use flywheel_core::api::v1::get_missing_paths::{GetMissingPathsRequest, GetMissingPathsResponse};
use flywheel_core::api::v1::traces::{validate_trace_key, Trace, TraceSummary, MAX_TRACE_BODY};
use flywheel_core::chunk::ChunkHash;
use flywheel_core::api::v1::ErrorBody;
use flywheel_core::api::v1::chunk_bodies::{encode_upload_records, split_framed_chunks, FRAME_PREFIX_LEN};
use flywheel_core::chunk::{decompress_verified, max_frame_len};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::nix::{cache_info, NarInfo, NixCacheInfo};
use flywheel_core::{Error, ErrorKind, Result};
use reqwest::StatusCode;
use tracing::instrument;

/// Where the server is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of the server, such as `http://cache.example:8080`.
    pub server: String,
    /// The cache name.
    pub cache: String,
    /// A bearer token (JWT), if the cache needs one.
    pub token: Option<String>,
    /// Longest time one request may take, connecting included. A request that takes longer
    /// fails with [`ErrorKind::Unavailable`], so readers see an error instead of a hang.
    pub timeout: Duration,
}

/// A chunk as fetched: the stored zstd frame, and its verified contents.
#[derive(Debug, Clone)]
pub struct FetchedChunk {
    /// The zstd frame, as the cache keeps it.
    pub frame: Vec<u8>,
    /// The uncompressed bytes, verified against the chunk's name and size.
    pub data: Arc<[u8]>,
}

/// A client of one cache on one server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    cache: String,
    token: Option<String>,
}

impl ApiClient {
    /// Builds a client; no request is sent yet.
    pub fn new(config: ClientConfig) -> Result<Self> {
        flywheel_core::api::v1::validate_cache_name(&config.cache)?;
        let base = config.server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::invalid(format!("server URL {base:?} must start with http:// or https://")));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .timeout(config.timeout)
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| Error::internal(format!("building the HTTP client: {e}")))?;
        Ok(ApiClient { http, base, cache: config.cache, token: config.token })
    }

    /// The cache this client reads.
    pub fn cache(&self) -> &str {
        &self.cache
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, url);
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    fn api_url(&self, rest: &str) -> String {
        format!("{}/_flywheel/v1/{}/{rest}", self.base, self.cache)
    }

    /// Fetches the manifest of the path whose hash part is `hash_part`.
    #[instrument(skip_all, err, fields(store_path.hash = %hash_part))]
    pub async fn manifest(&self, hash_part: &str) -> Result<PathManifest> {
        flywheel_core::nix::store_path::parse_hash_part(hash_part)?;
        let request = self
            .request(reqwest::Method::GET, self.api_url(&format!("manifest/{hash_part}")))
            .header(reqwest::header::ACCEPT_ENCODING, MANIFEST_ENCODING);
        let response = send(request).await?;
        // Checked before the body is read: a body nobody can decode is not worth downloading.
        let compressed = match response.headers().get(reqwest::header::CONTENT_ENCODING) {
            None => false,
            Some(encoding) if encoding.as_bytes().eq_ignore_ascii_case(MANIFEST_ENCODING.as_bytes()) => true,
            Some(other) => return Err(Error::corrupt(format!("the server's manifest came in an encoding not asked for: {other:?}"))),
        };
        let mut bytes = read_capped(response, MAX_MANIFEST_BODY, "manifest").await?;
        if compressed {
            bytes = tokio::task::spawn_blocking(move || decompress_manifest(&bytes, MAX_MANIFEST_BODY))
                .await
                .map_err(|e| Error::internal(format!("decompressing a manifest: {e}")))??;
        }
        let manifest: PathManifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("manifest of {hash_part} from the server does not parse: {e}")))?;
        manifest.manifest.validate().map_err(|e| Error::corrupt(e.message().to_string()))?;
        Ok(manifest)
    }

    /// Fetches one chunk of the path whose hash part is `path` with `GET chunk/{hash}` and
    /// verifies it.
    #[instrument(skip_all, err, fields(chunk = %chunk.hash))]
    pub async fn chunk(&self, path: &str, chunk: ChunkRef) -> Result<FetchedChunk> {
        flywheel_core::nix::store_path::parse_hash_part(path)?;
        let url = self.api_url(&format!("chunk/{}?path={path}", chunk.hash));
        let response = send(self.request(reqwest::Method::GET, url))
            .await
            .map_err(lost_chunk)?;
        let frame = read_capped(response, max_frame_len(u64::from(chunk.size)) as usize, "chunk").await?;
        if frame.len() as u64 > max_frame_len(u64::from(chunk.size)) {
            return Err(Error::corrupt(format!("chunk {} arrived as an oversized frame", chunk.hash)));
        }
        verify(chunk, frame)
    }

    /// Fetches many chunks of the path whose hash part is `path` with one `POST chunks` and
    /// verifies each; the result is in request order.
    #[instrument(skip_all, err, fields(chunks = chunks.len()))]
    pub async fn chunks(&self, path: &str, chunks: &[ChunkRef]) -> Result<Vec<FetchedChunk>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let body = ChunkBatch { path: path.to_string(), chunks: chunks.to_vec() };
        let response =
            send(self.request(reqwest::Method::POST, self.api_url("chunks")).json(&body)).await.map_err(lost_chunk)?;
        // No answer is longer than the longest frames of these chunks with their prefixes.
        let longest: u64 = chunks.iter().map(|c| FRAME_PREFIX_LEN as u64 + max_frame_len(u64::from(c.size))).sum();
        let body = read_capped(response, usize::try_from(longest).unwrap_or(usize::MAX), "chunk stream").await?;
        split_framed_chunks(&body, chunks)?
            .into_iter()
            .zip(chunks)
            .map(|(frame, chunk)| verify(*chunk, frame.to_vec()))
            .collect()
    }

    /// The access trace stored under `key` (`GET trace/{key}`), or `None` when there is none.
    #[instrument(skip_all, err, fields(key = %key))]
    pub async fn trace(&self, key: &str) -> Result<Option<Trace>> {
        validate_trace_key(key)?;
        let response = match send(self.request(reqwest::Method::GET, self.api_url(&format!("trace/{key}")))).await {
            Ok(response) => response,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let bytes = read_capped(response, MAX_TRACE_BODY, "trace").await?;
        Trace::parse(&bytes).map(Some).map_err(|e| Error::corrupt(format!("trace {key} from the server: {}", e.message())))
    }

    /// Sends the trace of one run under `key` (`PUT trace/{key}`); the server merges it into
    /// what it holds and says what it holds now.
    #[instrument(skip_all, err, fields(key = %key, chunks = trace.chunks.len()))]
    pub async fn put_trace(&self, key: &str, trace: &Trace) -> Result<TraceSummary> {
        validate_trace_key(key)?;
        let response = send(self.request(reqwest::Method::PUT, self.api_url(&format!("trace/{key}"))).json(trace)).await?;
        let bytes = read_capped(response, MAX_SMALL_ANSWER, "trace answer").await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(format!("trace answer from the server does not parse: {e}")))
    }

    /// Which of these store paths (hash parts) the cache lacks, with Attic's
    /// `get-missing-paths`.
    #[instrument(skip_all, err, fields(paths = hash_parts.len()))]
    pub async fn missing_paths(&self, hash_parts: &[String]) -> Result<Vec<String>> {
        let body = GetMissingPathsRequest { cache: self.cache.clone(), store_path_hashes: hash_parts.to_vec() };
        let url = format!("{}/_api/v1/get-missing-paths", self.base);
        let response = send(self.request(reqwest::Method::POST, url).json(&body)).await?;
        let bytes = read_capped(response, MAX_LIST_ANSWER, "get-missing-paths answer").await?;
        let parsed: GetMissingPathsResponse = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("get-missing-paths answer from the server does not parse: {e}")))?;
        Ok(parsed.missing_paths)
    }

    /// Which of these chunks the server does not store (`POST missing-chunks`), and the name
    /// under which the server remembers the list asked about, for a commit that follows (only
    /// when the list went in one request).
    #[instrument(skip_all, err, fields(chunks = chunks.len()))]
    pub async fn missing_chunks(&self, chunks: &[ChunkHash]) -> Result<(Vec<ChunkHash>, Option<String>)> {
        let mut missing = Vec::new();
        let mut query = None;
        let batches = chunks.len().div_ceil(MAX_CHUNKS_PER_REQUEST);
        for batch in chunks.chunks(MAX_CHUNKS_PER_REQUEST) {
            let body = ChunkList { chunks: batch.to_vec(), query: None };
            let request = zstd_json(self.request(reqwest::Method::POST, self.api_url("missing-chunks")), &body)?;
            let response = send(request).await?;
            let bytes = read_capped(response, MAX_LIST_ANSWER, "missing-chunks answer").await?;
            let parsed: ChunkList = serde_json::from_slice(&bytes)
                .map_err(|e| Error::corrupt(format!("missing-chunks answer from the server does not parse: {e}")))?;
            let asked: std::collections::HashSet<&ChunkHash> = batch.iter().collect();
            if let Some(odd) = parsed.chunks.iter().find(|h| !asked.contains(h)) {
                return Err(Error::corrupt(format!("the server reports chunk {odd} missing, which was not asked about")));
            }
            missing.extend(parsed.chunks);
            if batches == 1 {
                query = parsed.query.filter(|q| !q.is_empty() && q.len() <= 128);
            }
        }
        Ok((missing, query))
    }

    /// Uploads one chunk as its zstd frame (`PUT chunk/{hash}`); the server verifies it.
    #[instrument(skip_all, err, fields(chunk = %hash))]
    pub async fn put_chunk(&self, hash: &ChunkHash, frame: Vec<u8>) -> Result<()> {
        let url = self.api_url(&format!("chunk/{hash}"));
        send(self.request(reqwest::Method::PUT, url).header(reqwest::header::CONTENT_TYPE, "application/zstd").body(frame))
            .await?;
        Ok(())
    }

    /// Uploads several chunks as zstd frames in one request (`POST upload-chunks`); the server
    /// verifies each.
    #[instrument(skip_all, err, fields(chunks = chunks.len()))]
    pub async fn put_chunks(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<()> {
        let body = encode_upload_records(chunks);
        let url = self.api_url("upload-chunks");
        send(self.request(reqwest::Method::POST, url).header(reqwest::header::CONTENT_TYPE, "application/octet-stream").body(body))
            .await?;
        Ok(())
    }

    /// The chunk list of the path last published under the same unversioned name as the store
    /// path name `name` (`GET base/{name}`): what a push of a new version is told as changes
    /// to. `NotFound` when there is none.
    #[instrument(skip_all, err, fields(name = %name))]
    pub async fn base(&self, name: &str) -> Result<BaseChunks> {
        flywheel_core::nix::StorePath::new([0; 20], name)?;
        let response = send(self.request(reqwest::Method::GET, self.api_url(&format!("base/{name}")))).await?;
        let bytes = read_capped(response, MAX_LIST_ANSWER, "base answer").await?;
        let base: BaseChunks = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("base answer from the server does not parse: {e}")))?;
        if base.chunks.len() > MAX_CHUNKS_PER_REQUEST {
            return Err(Error::corrupt(format!("the server's base lists {} chunks, more than a NAR may have", base.chunks.len())));
        }
        Ok(base)
    }

    /// Publishes a path whose chunks are all stored (`POST commit`).
    #[instrument(skip_all, err, fields(store_path = %request.store_path))]
    pub async fn commit(&self, request: &CommitRequest) -> Result<()> {
        send(zstd_json(self.request(reqwest::Method::POST, self.api_url("commit")), request)?).await?;
        Ok(())
    }

    /// The cache's settings (`GET /_api/v1/cache-config/{cache}`, which needs pull): among
    /// them its rule on uploader signatures. Not logged as an error when refused: a push-only
    /// token may not read it, and callers go on without it.
    #[instrument(skip_all)]
    pub async fn cache_config(&self) -> Result<CacheConfig> {
        let url = format!("{}/_api/v1/cache-config/{}", self.base, self.cache);
        let bytes = read_capped(send(self.request(reqwest::Method::GET, url)).await?, MAX_SMALL_ANSWER, "cache-config answer").await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(format!("cache-config answer from the server does not parse: {e}")))
    }

    /// The store directory the cache serves, from its `nix-cache-info`.
    pub async fn store_dir(&self) -> Result<String> {
        let url = format!("{}/{}/nix-cache-info", self.base, self.cache);
        Ok(read_cache_info(self.request(reqwest::Method::GET, url)).await?.store_dir)
    }

    /// Fetches and parses the narinfo of the path whose hash part is `hash_part`.
    #[instrument(skip_all, err, fields(store_path.hash = %hash_part))]
    pub async fn narinfo(&self, hash_part: &str, store_dir: &str) -> Result<NarInfo> {
        flywheel_core::nix::store_path::parse_hash_part(hash_part)?;
        let url = format!("{}/{}/{hash_part}.narinfo", self.base, self.cache);
        let bytes = read_capped(send(self.request(reqwest::Method::GET, url)).await?, MAX_NARINFO_BODY, "narinfo").await?;
        let text = std::str::from_utf8(&bytes).map_err(|_| Error::corrupt(format!("narinfo of {hash_part} is not UTF-8")))?;
        NarInfo::parse(text, store_dir).map_err(|e| e.context(format!("narinfo of {hash_part}")))
    }
}

/// Reads the `nix-cache-info` of the binary cache at `base_url` (such as a local
/// substituter's `http://127.0.0.1:37515`), waiting at most `timeout`: whether it is up, and
/// what it announces.
pub async fn probe_binary_cache(base_url: &str, timeout: Duration) -> Result<NixCacheInfo> {
    let base = reqwest::Url::parse(base_url)
        .ok()
        .filter(|url| url.scheme() == "http" || url.scheme() == "https")
        .ok_or_else(|| Error::invalid(format!("{base_url}: expected http://HOST:PORT")))?;
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| Error::internal(format!("building the HTTP client: {e}")))?;
    let url = format!("{}/nix-cache-info", base.as_str().trim_end_matches('/'));
    read_cache_info(http.get(url)).await.map_err(|e| e.context(base_url))
}

/// Sends a request for a `nix-cache-info` and parses the answer, read up to its size bound.
async fn read_cache_info(request: reqwest::RequestBuilder) -> Result<NixCacheInfo> {
    let body = read_capped(send(request).await?, cache_info::MAX_LEN, "nix-cache-info").await?;
    let text = std::str::from_utf8(&body).map_err(|_| Error::corrupt("nix-cache-info is not UTF-8"))?;
    NixCacheInfo::parse(text).map_err(|e| Error::corrupt(e.message().to_string()))
}

/// Longest manifest read from the server: the JSON of a NAR of many GB with a million files.
const MAX_MANIFEST_BODY: usize = 256 << 20;
/// Longest narinfo read: ten thousand references, with room to spare.
const MAX_NARINFO_BODY: usize = 4 << 20;
/// Longest chunk or path list read: [`MAX_CHUNKS_PER_REQUEST`] entries, with room to spare.
const MAX_LIST_ANSWER: usize = 32 << 20;
/// Longest answer of the routes that answer with a few fields.
const MAX_SMALL_ANSWER: usize = 1 << 20;

/// Reads a whole answer of the server, refusing one longer than `max` bytes as it arrives (a
/// broken or hostile server must not make a runner allocate without bound).
async fn read_capped(mut response: reqwest::Response, max: usize, what: &str) -> Result<Vec<u8>> {
    if response.content_length().is_some_and(|len| len > max as u64) {
        return Err(Error::corrupt(format!("the server's {what} is longer than {max} bytes")));
    }
    let mut body = Vec::new();
    while let Some(piece) = response.chunk().await.map_err(transport)? {
        if body.len() + piece.len() > max {
            return Err(Error::corrupt(format!("the server's {what} is longer than {max} bytes")));
        }
        body.extend_from_slice(&piece);
    }
    Ok(body)
}

fn verify(chunk: ChunkRef, frame: Vec<u8>) -> Result<FetchedChunk> {
    let data = decompress_verified(&frame, &chunk.hash, chunk.size as usize)?;
    Ok(FetchedChunk { frame, data: data.into() })
}

/// A chunk named by a manifest that the server cannot find is damage on the server, not a
/// missing file: readers must see an I/O error.
fn lost_chunk(err: Error) -> Error {
    if err.kind() == ErrorKind::NotFound {
        Error::corrupt(format!("the server lost a chunk: {}", err.message()))
    } else {
        err
    }
}

fn transport(err: reqwest::Error) -> Error {
    let what = if err.is_timeout() { "timed out" } else { "failed" };
    Error::unavailable(format!("request to the server {what}: {err}")).with_source(err)
}

/// Sends a request and turns every non-success answer into an error of the matching kind.
async fn send(builder: reqwest::RequestBuilder) -> Result<reqwest::Response> {
    let response = builder.send().await.map_err(transport)?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let kind = match status {
        StatusCode::NOT_FOUND => ErrorKind::NotFound,
        StatusCode::UNAUTHORIZED => ErrorKind::Unauthorized,
        StatusCode::FORBIDDEN => ErrorKind::Forbidden,
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => ErrorKind::InvalidInput,
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    let body = read_capped(response, MAX_SMALL_ANSWER, "error answer").await.unwrap_or_default();
    let message = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(body) => body.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    };
    Err(Error::new(kind, format!("server answered {status}: {message}")))
}

/// A JSON body compressed with zstd: the chunk lists of a push are mostly hex, which halves,
/// and they would otherwise be a sizeable share of what a small change sends.
fn zstd_json(request: reqwest::RequestBuilder, body: &impl serde::Serialize) -> Result<reqwest::RequestBuilder> {
    let json = serde_json::to_vec(body).map_err(|e| Error::internal(format!("serializing a request: {e}")))?;
    let compressed = flywheel_core::chunk::compress(&json, 19)?;
    Ok(request
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::CONTENT_ENCODING, "zstd")
        .body(compressed))
}

#[cfg(test)]
mod tests {
    //! Answers of a hostile server: every read is bounded, whatever it announces or streams.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with `head`, then streams zeros until the client
    /// hangs up.
    async fn endless_server(head: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let piece = format!("{:x}\r\n{}\r\n", 64 << 10, "0".repeat(64 << 10));
                    while stream.write_all(piece.as_bytes()).await.is_ok() {}
                });
            }
        });
        format!("http://{addr}")
    }

    fn client(server: String) -> ApiClient {
        ApiClient::new(ClientConfig { server, cache: "main".into(), token: None, timeout: Duration::from_secs(30) }).unwrap()
    }

    #[tokio::test]
    async fn endless_answers_are_cut_at_their_bound() {
        let api = client(endless_server("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await);
        let hash = "0c0ckjhibxyvhrxdb55dp3iwzal15ppw";
        let err = api.narinfo(hash, "/nix/store").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.message().contains("longer than"), "{err}");
        let chunk = ChunkRef { hash: ChunkHash([1; 32]), size: 100 };
        assert!(api.chunk(hash, chunk).await.unwrap_err().message().contains("longer than"));
        assert!(api.chunks(hash, &[chunk, chunk]).await.unwrap_err().message().contains("longer than"));
        assert!(api.trace("job").await.unwrap_err().message().contains("longer than"));
        assert!(api.store_dir().await.unwrap_err().message().contains("longer than"));
    }

    #[tokio::test]
    async fn manifests_in_an_encoding_not_asked_for_are_refused() {
        let head = "HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nTransfer-Encoding: chunked\r\n\r\n";
        let err = client(endless_server(head).await).manifest("0c0ckjhibxyvhrxdb55dp3iwzal15ppw").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.message().contains("encoding not asked for"), "{err}");
        // Zeros are no zstd frame: refused as such, not parsed as JSON.
        let head = "HTTP/1.1 200 OK\r\nContent-Encoding: zstd\r\nContent-Length: 65536\r\n\r\n";
        let err = client(endless_server(head).await).manifest("0c0ckjhibxyvhrxdb55dp3iwzal15ppw").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(!err.message().contains("does not parse"), "{err}");
    }

    #[tokio::test]
    async fn announced_lengths_over_the_bound_are_refused_before_reading() {
        let api = client(endless_server("HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n").await);
        let err = api.manifest("0c0ckjhibxyvhrxdb55dp3iwzal15ppw").await.unwrap_err();
        assert!(err.message().contains("longer than"), "{err}");
    }
}
