//! The HTTP frontends: the Nix binary cache, Attic's API, the chunk API, the
//! OpenTofu/Terraform state backend and Bazel's HTTP cache.

mod bazel;
mod binary_cache;
mod cache_config;
mod chunks;
mod get_missing_paths;
mod debuginfo;
mod logs;
mod publish;
mod realisations;
mod tfstate;
mod traces;
mod upload_path;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{any, get, post, put};
use axum::Router;
use flywheel_core::api::v1::validate_cache_name;
use flywheel_core::{Error, ErrorKind};

use crate::auth::{Claims, Permissions};
use crate::error::ApiError;
use crate::state::AppState;
use crate::storage::CacheRecord;

/// Largest JSON or narinfo body accepted.
pub const MAX_METADATA_BODY: usize = 16 * 1024 * 1024;

/// All routes of the server.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { "flywheel cache server\n" }))
        .route("/metrics", get(metrics))
        .route("/_api/v1/get-missing-paths", post(get_missing_paths::handle))
        .route("/_api/v1/upload-path", put(upload_path::handle))
        .route(
            "/_api/v1/cache-config/{cache}",
            get(cache_config::read).post(cache_config::create).patch(cache_config::update).delete(cache_config::destroy),
        )
        .route("/_flywheel/v1/{cache}/manifest/{hash}", get(chunks::manifest))
        .route("/_flywheel/v1/{cache}/chunk/{hash}", get(chunks::get_one).put(chunks::put_one))
        .route("/_flywheel/v1/{cache}/chunks", post(chunks::get_many))
        .route("/_flywheel/v1/{cache}/missing-chunks", post(chunks::missing))
        .route("/_flywheel/v1/{cache}/upload-chunks", post(chunks::upload_many))
        .route("/_flywheel/v1/{cache}/commit", post(chunks::commit))
        .route("/_flywheel/v1/{cache}/base/{name}", get(chunks::base))
        .route("/_flywheel/v1/{cache}/trace/{key}", get(traces::get).put(traces::put))
        .route("/_state/v1/{project}/{stack}", any(tfstate::stack))
        .route("/_state/v1/{project}/{stack}/lock", any(tfstate::lock_address))
        .route("/_state/v1/{project}/{stack}/versions", get(tfstate::versions))
        .route("/_state/v1/{project}/{stack}/versions/{version}", get(tfstate::version))
        .route("/_state/v1/{project}/{stack}/rollback/{version}", post(tfstate::rollback))
        .route(
            "/{cache}/ac/{hash}",
            get(bazel::get_ac).put(bazel::put_ac).layer(DefaultBodyLimit::max(bazel::MAX_AC_BODY)),
        )
        // Blob uploads are bounded by their Content-Length, checked against bazel.max-blob-size.
        .route(
            "/{cache}/cas/{hash}",
            get(bazel::get_cas).head(bazel::head_cas).put(bazel::put_cas).layer(DefaultBodyLimit::disable()),
        )
        .route("/{cache}/nix-cache-info", get(binary_cache::cache_info).put(binary_cache::put_cache_info))
        .route("/{cache}/nar/{file}", get(binary_cache::get_nar).put(binary_cache::put_nar))
        .route(
            "/{cache}/debuginfo/{file}",
            get(debuginfo::get).put(debuginfo::put).layer(DefaultBodyLimit::max(debuginfo::MAX_DEBUGINFO_SIZE)),
        )
        .route(
            "/{cache}/realisations/{file}",
            get(realisations::get_realisation)
                .put(realisations::put_realisation)
                .layer(DefaultBodyLimit::max(realisations::MAX_REALISATION_SIZE)),
        )
        .route(
            "/{cache}/build-trace-v2/{drv}/{file}",
            get(realisations::get_build_trace)
                .put(realisations::put_build_trace)
                .layer(DefaultBodyLimit::max(realisations::MAX_REALISATION_SIZE)),
        )
        .route(
            "/{cache}/log/{file}",
            get(logs::get).put(logs::put).layer(DefaultBodyLimit::max(logs::MAX_LOG_SIZE)),
        )
        .route(
            "/{cache}/{file}",
            get(binary_cache::get_file).put(binary_cache::put_file).delete(binary_cache::delete_file),
        )
        .layer(DefaultBodyLimit::max(MAX_METADATA_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                tracing::info_span!("request", http.method = %req.method(), http.path = %req.uri().path())
            }),
        )
        .with_state(state)
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> impl axum::response::IntoResponse {
    use flywheel_core::metrics::Collect;
    let mut out = flywheel_core::metrics::Exposition::default();
    state.metrics.collect(&mut out);
    state.bazel.metrics.collect(&mut out);
    ([(axum::http::header::CONTENT_TYPE, flywheel_core::metrics::CONTENT_TYPE)], out.finish())
}

/// Counts every request by its route template (never the raw path, which would make a series
/// per store path), method and status.
async fn count_requests(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let response = next.run(request).await;
    state.metrics.count_request(&route, &method, response.status().as_u16());
    response
}

/// A JSON body whose rejections come back as Attic-style 400s with the reason.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let encoding = req.headers().get(axum::http::header::CONTENT_ENCODING).cloned();
        let ApiBytes(bytes) = ApiBytes::from_request(req, state).await?;
        let bytes = match encoding.as_ref().map(|v| v.as_bytes()) {
            None | Some(b"identity") => bytes,
            // Chunk lists are long runs of hex: compressed, a push's metadata stays small.
            Some(b"zstd") => {
                use std::io::Read;
                let mut decoded = Vec::new();
                zstd::stream::read::Decoder::new(&bytes[..])
                    .and_then(|d| d.take(MAX_METADATA_BODY as u64 + 1).read_to_end(&mut decoded))
                    .map_err(|e| Error::invalid(format!("the zstd body does not decompress: {e}")))?;
                if decoded.len() > MAX_METADATA_BODY {
                    return Err(Error::invalid(format!("the body decompresses to more than {MAX_METADATA_BODY} bytes")).into());
                }
                axum::body::Bytes::from(decoded)
            }
            Some(other) => {
                return Err(Error::invalid(format!(
                    "unsupported Content-Encoding {:?}: use zstd or none",
                    String::from_utf8_lossy(other)
                ))
                .into())
            }
        };
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| Error::invalid(format!("the body is not the expected JSON: {e}")).into())
    }
}

/// A refusal of one of axum's extractors, answered with Attic's error body.
fn rejected(rejection: impl axum::response::IntoResponse + std::fmt::Display) -> ApiError {
    let message = rejection.to_string();
    ApiError::rejected(rejection.into_response().status(), message)
}

/// axum's `Path`, refused with Attic's error body.
pub struct ApiPath<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await.map_err(rejected)?;
        Ok(ApiPath(value))
    }
}

/// axum's `Query`, refused with Attic's error body.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await.map_err(rejected)?;
        Ok(ApiQuery(value))
    }
}

/// A whole request body (within the route's limit), refused with Attic's error body.
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(req, state).await.map(ApiBytes).map_err(rejected)
    }
}

/// Who is calling: the verified claims of their token, if they sent one.
pub struct Caller(pub Option<Claims>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
        Ok(Caller(state.tokens.authenticate(header)?))
    }
}

impl Caller {
    fn permissions_for(&self, cache: &str) -> Permissions {
        self.0.as_ref().map(|c| c.permissions_for(cache)).unwrap_or_default()
    }

    /// Refuses a caller whose token grants `need` on no cache at all, for the routes that
    /// learn the cache from the body: they read no body for such a caller.
    fn require_anywhere(&self, what: &str, need: fn(&Permissions) -> bool) -> Result<(), ApiError> {
        match &self.0 {
            None => Err(Error::new(ErrorKind::Unauthorized, format!("{what} needs a token")).into()),
            Some(claims) if claims.attic.caches.values().any(need) => Ok(()),
            Some(_) => Err(Error::new(ErrorKind::Forbidden, format!("the token does not allow {what} on any cache")).into()),
        }
    }
}

/// A permission a route needs on the cache its URL names.
pub trait Need: Send + Sync + 'static {
    /// What the permission is called in refusals.
    const WHAT: &'static str;
    /// Whether `permissions` grant it.
    fn granted(permissions: &Permissions) -> bool;
}

macro_rules! need {
    ($(#[$doc:meta] $name:ident, $what:literal, |$p:ident| $granted:expr;)*) => {$(
        #[$doc]
        pub struct $name;
        impl Need for $name {
            const WHAT: &'static str = $what;
            fn granted($p: &Permissions) -> bool {
                $granted
            }
        }
    )*};
}

need! {
    /// Reading paths and chunks.
    Pull, "pull", |p| p.pull;
    /// Uploading.
    Push, "push", |p| p.push;
    /// Taking paths out.
    Delete, "delete", |p| p.delete;
    /// Changing the cache's settings.
    Configure, "configure", |p| p.configure_cache;
    /// Destroying the cache.
    Destroy, "destroy", |p| p.destroy_cache;
    /// Creating the cache.
    CreateCache, "create-cache", |p| p.create_cache;
}

/// A caller whose token grants `N` on some cache, for the routes that name their cache in the
/// body: anyone else is refused before the body is read.
pub struct Anywhere<N: Need>(pub Caller, std::marker::PhantomData<N>);

impl<N: Need> FromRequestParts<AppState> for Anywhere<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require_anywhere(N::WHAT, N::granted)?;
        Ok(Anywhere(caller, std::marker::PhantomData))
    }
}

/// The cache named by the route's `{cache}` segment, with the caller checked for `N` on it.
///
/// An extractor of the request head: axum runs it before any extractor that reads the body,
/// so a caller without the permission is refused before a body byte is read or decoded.
pub struct Access<N: Need> {
    /// The cache's name.
    pub name: String,
    /// Its settings.
    pub record: CacheRecord,
    /// Who is calling.
    pub caller: Caller,
    need: std::marker::PhantomData<N>,
}

impl<N: Need> FromRequestParts<AppState> for Access<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| Error::invalid(format!("the URL's path: {}", e.body_text())))?;
        let name = params
            .iter()
            .find(|(key, _)| *key == "cache")
            .map(|(_, value)| value.to_string())
            .ok_or_else(|| Error::internal("route without a {cache} segment uses Access"))?;
        let record = authorize(state, &caller, &name, N::WHAT, N::granted).await?;
        Ok(Access { name, record, caller, need: std::marker::PhantomData })
    }
}

/// Loads a cache and checks that the caller holds the permission `need` picks. Callers that
/// may not even know of the cache get 401 whether it exists or not.
pub async fn authorize(
    state: &AppState,
    caller: &Caller,
    cache: &str,
    what: &str,
    need: fn(&Permissions) -> bool,
) -> Result<CacheRecord, ApiError> {
    validate_cache_name(cache)?;
    let mut perms = caller.permissions_for(cache);
    let record = state.cache_record(cache).await?;
    if let Some(record) = &record {
        if record.is_public {
            perms.pull = true;
        }
    }
    let denied = |perms: &Permissions| -> ApiError {
        if caller.0.is_none() {
            Error::new(ErrorKind::Unauthorized, format!("{what} on cache {cache:?} needs a token")).into()
        } else if perms.can_discover() {
            Error::new(ErrorKind::Forbidden, format!("the token does not allow {what} on cache {cache:?}")).into()
        } else {
            Error::new(ErrorKind::Unauthorized, format!("the token grants nothing on cache {cache:?}")).into()
        }
    };
    match record {
        None if perms.can_discover() => {
            Err(ApiError::named(Error::not_found(format!("cache {cache:?} does not exist")), "NoSuchCache"))
        }
        None => Err(denied(&perms)),
        Some(record) if need(&perms) => Ok(record),
        Some(_) => Err(denied(&perms)),
    }
}
