//! `flywheel substitute`: a local HTTP binary cache for nix-daemon.
//!
//! - `GET /nix-cache-info`.
//! - `GET|HEAD /{hash}.narinfo`: the path's narinfo, made from the server's manifest (whose
//!   signatures are those of the server's narinfo, so `require-sigs` holds), pointing at an
//!   uncompressed NAR served here. Signatures sign the fingerprint (path, NAR hash and size,
//!   references), not the URL or compression, so rewriting those keeps them valid.
//! - `GET /nar/{hash}.nar`: the NAR, rebuilt from the local chunk cache plus the missing chunks
//!   only, fetched in parallel and verified, streamed window by window in bounded memory.
//!
//! Every failure is answered with a fast 404, so Nix moves on to its next substituter: Nix 2.8
//! treats a 5xx or a hang on a narinfo as fatal. While the server is unreachable, narinfo
//! requests do not wait for it: paths whose manifest and chunks are all cached are still
//! served, the others are 404 at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use flywheel_client::{ChunkStore, ClientConfig, LocalCacheConfig};
use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::nix::{cache_info, NarInfo, NixCacheInfo, StorePath};
use flywheel_core::metrics::{Collect, Exposition, Kind, Labels, Registry};
use flywheel_core::{Error, ErrorKind, Result};
use futures::StreamExt;
use parking_lot::Mutex;

/// Chunks per window of a streamed NAR: about 2 MiB at the average chunk size.
const WINDOW: usize = 32;

/// Windows fetched ahead of the one being sent: a cold NAR is fetched this far ahead of Nix
/// (measured on the bench corpus: 3 windows ahead took 5.8 s, 8 took 4.5 s, 16 took 3.9 s).
const WINDOWS_AHEAD: usize = 16;

/// Windows held at once by all NAR streams together (about 2 MiB each), so that Nix fetching
/// many paths at once does not multiply the memory of the lookahead.
const WINDOWS_IN_FLIGHT: usize = 48;

/// Everything `flywheel substitute` needs.
#[derive(Debug, Clone)]
pub struct SubstituteConfig {
    /// Base URL of the server.
    pub server: String,
    /// Cache name.
    pub cache: String,
    /// Bearer token, if the cache needs one.
    pub token: Option<String>,
    /// Directory of the chunk cache (may be shared with a running `flywheel mount`).
    pub cache_dir: PathBuf,
    /// Byte quota of the chunk cache, when this process owns it.
    pub cache_size: u64,
    /// The store directory announced in `nix-cache-info`.
    pub store_dir: String,
    /// The priority announced in `nix-cache-info` (lower is preferred).
    pub priority: u32,
    /// Longest wait for the server while answering a narinfo request.
    pub narinfo_timeout: Duration,
    /// Longest wait for one window of chunks while streaming a NAR.
    pub chunk_timeout: Duration,
    /// After the server failed to answer, how long narinfo requests skip it.
    pub retry_after: Duration,
}

impl SubstituteConfig {
    /// Defaults for everything but the server and cache.
    pub fn new(server: String, cache: String) -> Self {
        SubstituteConfig {
            server,
            cache,
            token: None,
            cache_dir: PathBuf::from("/var/cache/flywheel"),
            cache_size: 10 << 30,
            store_dir: flywheel_core::nix::DEFAULT_STORE_DIR.to_string(),
            priority: 10,
            narinfo_timeout: Duration::from_secs(3),
            chunk_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(10),
        }
    }
}

/// The state of the running substituter. Cheap to clone.
#[derive(Clone)]
pub struct Substituter {
    inner: Arc<Inner>,
}

struct Inner {
    store: ChunkStore,
    config: SubstituteConfig,
    /// Requests by route template and status, for `/metrics`.
    requests: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    /// NAR bytes sent to Nix.
    nar_bytes_sent: std::sync::atomic::AtomicU64,
    /// Until when the server counts as down.
    down_until: Mutex<Option<Instant>>,
    /// Bounds the windows held by all NAR streams (see [`WINDOWS_IN_FLIGHT`]).
    windows_in_flight: Arc<tokio::sync::Semaphore>,
}

impl Substituter {
    /// Opens the chunk cache (or joins the process owning it) and builds the client.
    pub fn open(config: SubstituteConfig) -> Result<Self> {
        let server = ClientConfig {
            server: config.server.clone(),
            cache: config.cache.clone(),
            token: config.token.clone(),
            timeout: config.chunk_timeout,
        };
        let store = ChunkStore::open(server, &LocalCacheConfig::new(&config.cache_dir, config.cache_size))?;
        Ok(Substituter::with_store(config, store))
    }

    /// A substituter over `store` (whose source need not be a server: in-process tests give
    /// it memory); `config`'s server and cache settings are not used.
    pub fn with_store(config: SubstituteConfig, store: ChunkStore) -> Self {
        Substituter {
            inner: Arc::new(Inner {
                store,
                config,
                requests: Mutex::default(),
                nar_bytes_sent: Default::default(),
                down_until: Mutex::new(None),
                windows_in_flight: Arc::new(tokio::sync::Semaphore::new(WINDOWS_IN_FLIGHT)),
            }),
        }
    }

    /// The chunk store (for statistics).
    pub fn store(&self) -> &ChunkStore {
        &self.inner.store
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/nix-cache-info", get(cache_info))
            .route("/metrics", get(metrics))
            .route("/nar/{file}", get(nar))
            .route("/{file}", get(file))
            .layer(axum::middleware::from_fn_with_state(self.clone(), count_requests))
            .with_state(self.clone())
    }

    /// The substituter's metrics in Prometheus text format: requests by route and status, NAR
    /// bytes sent, and its chunk store's fetches and cache.
    pub fn render_metrics(&self) -> String {
        Registry::with([Arc::new(self.clone()) as Arc<dyn Collect>]).render()
    }

    fn server_down(&self) -> bool {
        self.inner.down_until.lock().is_some_and(|until| Instant::now() < until)
    }

    fn mark_down(&self, err: &Error) {
        tracing::warn!("the server is unreachable, answering from the local cache for {:?}: {err}", self.inner.config.retry_after);
        *self.inner.down_until.lock() = Some(Instant::now() + self.inner.config.retry_after);
    }

    /// The manifest of a path: from the server when it answers, else from the local cache.
    /// `need_all_chunks` (for narinfo) refuses a cached manifest whose chunks are not all
    /// cached while the server is down, since its NAR could not be served.
    async fn manifest(&self, hash: &str, prefer_cached: bool, need_all_chunks: bool) -> Result<PathManifest> {
        flywheel_core::nix::store_path::parse_hash_part(hash)?;
        let cache = self.inner.store.cache().clone();
        let cached = {
            let (cache, hash) = (cache.clone(), hash.to_string());
            tokio::task::spawn_blocking(move || cache.get_manifest(&hash)).await.ok().flatten()
        };
        if prefer_cached {
            if let Some(m) = &cached {
                return Ok(m.clone());
            }
        }
        if !self.server_down() {
            let fetched = tokio::time::timeout(self.inner.config.narinfo_timeout, self.inner.store.source().manifest(hash))
                .await
                .unwrap_or_else(|_| Err(Error::unavailable("the server did not answer in time")));
            match fetched {
                Ok(manifest) => {
                    let (cache, hash, m) = (cache.clone(), hash.to_string(), manifest.clone());
                    let _ = tokio::task::spawn_blocking(move || cache.put_manifest(&hash, &m)).await;
                    return Ok(manifest);
                }
                // The server says the path is not there: it is not.
                Err(err) if err.kind() == ErrorKind::NotFound => return Err(err),
                Err(err) if matches!(err.kind(), ErrorKind::Unavailable) => self.mark_down(&err),
                Err(err) => tracing::warn!(store_path.hash = hash, "manifest from the server: {err}"),
            }
        }
        let manifest = cached.ok_or_else(|| Error::unavailable(format!("{hash}: the server is unavailable and the path is not cached")))?;
        if need_all_chunks {
            let chunks = manifest.manifest.chunks.clone();
            let all = tokio::task::spawn_blocking(move || chunks.iter().all(|c| cache.contains(&c.hash))).await.unwrap_or(false);
            if !all {
                return Err(Error::unavailable(format!("{hash}: the server is unavailable and not every chunk is cached")));
            }
        }
        Ok(manifest)
    }
}

/// Runs the substituter on `listener` until `shutdown` completes.
pub async fn run(
    substituter: Substituter,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use axum::serve::ListenerExt;
    let app = substituter.router();
    // Nix asks for narinfo after narinfo on one connection: without TCP_NODELAY an answer
    // written in two pieces waits for Nix's delayed ACK.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::internal(format!("serving: {e}")))?;
    if let Err(err) = substituter.store().cache().flush() {
        tracing::warn!("flushing the chunk cache failed: {err}");
    }
    Ok(())
}

/// An error as the substituter answers it: always 404, the one answer that makes Nix move on
/// to its next substituter at once. The reason goes to the log and the body.
struct Miss(Error);

impl From<Error> for Miss {
    fn from(err: Error) -> Self {
        Miss(err)
    }
}

impl IntoResponse for Miss {
    fn into_response(self) -> Response {
        match self.0.kind() {
            ErrorKind::NotFound | ErrorKind::InvalidInput => tracing::debug!("miss: {}", self.0),
            _ => tracing::warn!("answering 404: {}", self.0),
        }
        (StatusCode::NOT_FOUND, format!("{}\n", self.0)).into_response()
    }
}

async fn cache_info(State(sub): State<Substituter>) -> Response {
    let c = &sub.inner.config;
    let info = NixCacheInfo { store_dir: c.store_dir.clone(), want_mass_query: true, priority: i32::try_from(c.priority).unwrap_or(i32::MAX) };
    ([(header::CONTENT_TYPE, cache_info::CONTENT_TYPE)], info.render()).into_response()
}

impl Collect for Substituter {
    fn collect(&self, out: &mut Exposition) {
        let requests = self.inner.requests.lock();
        out.family(
            "flywheel_substituter_requests_total",
            Kind::Counter,
            "Requests from Nix by route and status.",
            requests.iter().map(|((route, status), n)| (Labels::of(&[("route", route), ("status", &status.to_string())]), *n as f64)),
        );
        drop(requests);
        out.counter(
            "flywheel_substituter_nar_bytes_sent_total",
            "NAR bytes sent to Nix.",
            self.inner.nar_bytes_sent.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.inner.store.collect(out);
    }
}

async fn file(State(sub): State<Substituter>, Path(file): Path<String>) -> Result<Response, Miss> {
    let Some(hash) = file.strip_suffix(".narinfo") else {
        return Err(Error::not_found(format!("{file}: not served here")).into());
    };
    let manifest = sub.manifest(hash, false, true).await?;
    let text = render_narinfo(&manifest, hash, &sub.inner.config.store_dir)?;
    Ok(([(header::CONTENT_TYPE, "text/x-nix-narinfo")], text).into_response())
}

/// The narinfo of a path served here: the server's fields and signatures, with the URL and
/// compression of the uncompressed NAR this substituter serves.
pub fn render_narinfo(manifest: &PathManifest, hash: &str, store_dir: &str) -> Result<String> {
    let store_path = StorePath::from_absolute(&manifest.store_path, store_dir)?;
    if store_path.hash_part() != hash {
        return Err(Error::corrupt(format!("the manifest for {hash} describes {}", manifest.store_path)));
    }
    let info = NarInfo {
        url: format!("nar/{hash}.nar"),
        store_path,
        compression: Some("none".into()),
        file_hash: Some(manifest.manifest.nar_hash),
        file_size: Some(manifest.manifest.nar_size),
        nar_hash: manifest.manifest.nar_hash,
        nar_size: manifest.manifest.nar_size,
        references: manifest.references.iter().map(|r| StorePath::from_absolute(r, store_dir)).collect::<Result<_>>()?,
        deriver: manifest.deriver.as_deref().map(|d| StorePath::from_absolute(d, store_dir)).transpose()?,
        system: None,
        sigs: manifest.sigs.clone(),
        ca: manifest.ca.clone(),
    };
    Ok(info.render(store_dir))
}

/// Counts every request by its route template (never the raw path: one series per store path
/// would grow without bound) and status.
async fn count_requests(State(sub): State<Substituter>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    *sub.inner.requests.lock().entry((route, response.status().as_u16())).or_default() += 1;
    response
}

async fn metrics(State(sub): State<Substituter>) -> Response {
    // Rendering may ask the cache's owner over its socket: not on a runtime worker.
    let body = tokio::task::spawn_blocking(move || sub.render_metrics()).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, flywheel_core::metrics::CONTENT_TYPE)], body).into_response()
}

/// One window of a NAR stream: its chunks, and the permit that counts it against
/// [`WINDOWS_IN_FLIGHT`] until it is handed to the response body.
type Window = (Vec<Arc<[u8]>>, Option<tokio::sync::OwnedSemaphorePermit>);

async fn nar(State(sub): State<Substituter>, Path(file): Path<String>) -> Result<Response, Miss> {
    let Some(hash) = file.strip_suffix(".nar") else {
        return Err(Error::not_found(format!("nar/{file}: not served here")).into());
    };
    let manifest = sub.manifest(hash, true, false).await?;
    let nar_size = manifest.manifest.nar_size;
    let store = sub.inner.store.clone();
    let timeout = sub.inner.config.chunk_timeout;
    let windows: Vec<Vec<flywheel_core::manifest::ChunkRef>> =
        manifest.manifest.chunks.chunks(WINDOW).map(|w| w.to_vec()).collect();
    let permits = sub.inner.windows_in_flight.clone();
    let path: Arc<str> = Arc::from(hash);
    let mut windows = futures::stream::iter(windows)
        .map(move |window| {
            let (store, permits, hash) = (store.clone(), permits.clone(), path.clone());
            async move {
                // Held until the window's bytes are handed to the response body.
                let permit = permits.acquire_owned().await.ok();
                let chunks = tokio::time::timeout(timeout, store.get_many(&hash, &window))
                    .await
                    .unwrap_or_else(|_| Err(Error::unavailable("chunks did not arrive in time")))?;
                Ok::<_, Error>((chunks, permit))
            }
        })
        .buffered(WINDOWS_AHEAD);
    // The first window decides the status: a failure here is still a clean 404.
    let first = match windows.next().await {
        Some(result) => result?,
        None => (Vec::new(), None),
    };
    let hash_owned = hash.to_string();
    let rest = windows.map(move |result| {
        result.map_err(|err| {
            tracing::warn!(store_path.hash = %hash_owned, "aborting a NAR stream: {err}");
            std::io::Error::other(err.to_string())
        })
    });
    let sent = sub.clone();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
        .chain(rest)
        .flat_map(move |window: std::io::Result<Window>| {
            let items: Vec<std::io::Result<Bytes>> = match window {
                Ok((chunks, _permit)) => {
                    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
                    sent.inner.nar_bytes_sent.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
                    chunks.into_iter().map(|c| Ok(Bytes::from_owner(c))).collect()
                }
                Err(err) => vec![Err(err)],
            };
            futures::stream::iter(items)
        });
    Ok((
        [(header::CONTENT_TYPE, "application/x-nix-nar".to_string()), (header::CONTENT_LENGTH, nar_size.to_string())],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    //! The substituter's routes in-process over an in-memory source: no server, no Nix.

    use super::*;
    use flywheel_client::{ChunkCache, ChunkSource, MemorySource};
    use flywheel_core::chunk::ChunkParams;
    use tower::ServiceExt;

    const PATH: &str = "/nix/store/0c0ckjhibxyvhrxdb55dp3iwzal15ppw-tree";
    const HASH: &str = "0c0ckjhibxyvhrxdb55dp3iwzal15ppw";

    fn nar() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(dir.path().join("data"), data).unwrap();
        std::fs::write(dir.path().join("small"), b"hello").unwrap();
        let mut nar = Vec::new();
        flywheel_core::nar::dump_path(dir.path(), &mut nar).unwrap();
        nar
    }

    async fn get(router: &Router, uri: &str) -> (StatusCode, Vec<u8>) {
        let request = axum::http::Request::get(uri).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 << 20).await.map(|b| b.to_vec()).unwrap_or_default();
        (status, body)
    }

    fn substituter(source: Arc<MemorySource>, cache_dir: &std::path::Path) -> Substituter {
        let cache = Arc::new(ChunkCache::open(&LocalCacheConfig::new(cache_dir, 64 << 20)).unwrap());
        let config = SubstituteConfig::new("http://unused".into(), "main".into());
        Substituter::with_store(config, ChunkStore::new(source, cache))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn narinfo_and_nar_are_served_from_chunks() {
        let nar = nar();
        let source = Arc::new(MemorySource::default());
        let params = ChunkParams { min_size: 4096, avg_size: 8192, max_size: 16384 };
        source.add_path(PATH, &nar, vec![PATH.to_string()], params).unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let sub = substituter(source.clone(), cache_dir.path());
        let router = sub.router();
        let (status, info) = get(&router, "/nix-cache-info").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(NixCacheInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap().priority, 10);
        let (status, narinfo) = get(&router, &format!("/{HASH}.narinfo")).await;
        assert_eq!(status, StatusCode::OK);
        let narinfo = NarInfo::parse(std::str::from_utf8(&narinfo).unwrap(), "/nix/store").unwrap();
        assert_eq!(narinfo.nar_size, nar.len() as u64);
        assert_eq!(narinfo.references.len(), 1, "a self-reference is kept");
        let (status, served) = get(&router, &format!("/{}", narinfo.url)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(served == nar, "the NAR comes back byte for byte");
        // A second substitution takes every chunk from the local cache (once the background
        // writes of the first have landed).
        let cache = sub.store().cache().clone();
        let chunks = source.manifest(HASH).await.unwrap().manifest.chunks.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !chunks.iter().all(|c| cache.contains(&c.hash)) {
            assert!(Instant::now() < deadline, "fetched chunks never reached the local cache");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fetched = source.chunks_served();
        assert!(get(&router, &format!("/{}", narinfo.url)).await.1 == nar);
        assert_eq!(source.chunks_served(), fetched);
        // What the source lacks is a 404, the answer that makes Nix move on.
        let (status, _) = get(&router, "/1c0ckjhibxyvhrxdb55dp3iwzal15ppw.narinfo").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = get(&router, "/nar/not-a-hash.nar").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_chunk_is_never_served() {
        let nar = nar();
        let source = Arc::new(MemorySource::default());
        let params = ChunkParams { min_size: 4096, avg_size: 8192, max_size: 16384 };
        let manifest = source.add_path(PATH, &nar, Vec::new(), params).unwrap();
        let last = *manifest.manifest.chunks.last().unwrap();
        source.damage(&last.hash, flywheel_core::chunk::compress(&vec![1u8; last.size as usize], 1).unwrap());
        let cache_dir = tempfile::tempdir().unwrap();
        let router = substituter(source, cache_dir.path()).router();
        let request = axum::http::Request::get(format!("/nar/{HASH}.nar")).body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        // Nix checks the NAR hash, but no byte that failed verification may reach it: the
        // answer is a miss, or a body that breaks off before the damaged chunk.
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 << 20).await;
        if status == StatusCode::OK {
            if let Ok(body) = body {
                assert!(body.len() < nar.len() && nar.starts_with(&body), "served {} of {} bytes", body.len(), nar.len());
            }
        } else {
            assert_eq!(status, StatusCode::NOT_FOUND);
        }
    }
}
