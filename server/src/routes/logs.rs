//! `PUT|GET /{cache}/log/{drv}`: build logs, as `nix store copy-log --to` uploads them and
//! `nix log --store` and `nix-store -l` read them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flywheel_core::nix::StorePath;
use flywheel_core::Error;
use tracing::instrument;

use super::{ApiBytes, ApiPath};
use super::{Access, Pull, Push};
use crate::error::ApiError;
use crate::ingest::Compression;
use crate::state::AppState;
use crate::storage::CacheFile;

/// Largest log kept, uncompressed. Longer logs are refused rather than cut: a cut log would
/// look whole.
pub const MAX_LOG_SIZE: usize = 64 * 1024 * 1024;

/// The derivation a log is named after: a store path base name ending in `.drv`.
fn log_name(name: &str) -> Result<String, Error> {
    let path = StorePath::from_base_name(name)?;
    if !path.base_name().ends_with(".drv") {
        return Err(Error::invalid(format!("log/{name}: logs are named after a derivation (.drv)")));
    }
    Ok(path.base_name())
}

/// `PUT log/{drv}`: stores the log, decoded from its `Content-Encoding`, zstd-compressed.
#[instrument(skip_all, fields(cache = %access.name, drv = %name))]
pub async fn put(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    let name = log_name(&name)?;
    let encoding = headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?"));
    let compression = Compression::from_content_encoding(encoding)?;
    let level = state.config.zstd_level;
    let stored = tokio::task::spawn_blocking(move || {
        let log = compression.decode_all(body, MAX_LOG_SIZE)?;
        zstd::bulk::compress(&log, level).map_err(|e| Error::internal(format!("compressing a log: {e}")))
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))??;
    state.storage.put_cache_file(&access.name, CacheFile::Log(&name), Bytes::from(stored)).await?;
    Ok(StatusCode::OK)
}

/// `GET log/{drv}`: the log as plain text.
#[instrument(skip_all, fields(cache = %access.name, drv = %name))]
pub async fn get(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, name)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let name = log_name(&name)?;
    let stored = state
        .storage
        .get_cache_file(&access.name, CacheFile::Log(&name))
        .await?
        .ok_or_else(|| Error::not_found(format!("no log of {name} in cache {:?}", access.name)))?;
    let log = tokio::task::spawn_blocking(move || Compression::Zstd.decode_all(stored, MAX_LOG_SIZE))
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(|e| Error::corrupt(format!("stored log of {name}: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], log).into_response())
}
