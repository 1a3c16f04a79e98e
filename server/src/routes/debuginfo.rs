//! `PUT|GET /{cache}/debuginfo/{build-id}`: what Nix uploads with `index-debug-info=true`, for
//! debuginfod-style tools to find a debug file by its ELF build ID: a small JSON object naming
//! the NAR (`archive`, relative to `debuginfo/`) and the file in it (`member`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use flywheel_core::Error;
use tracing::instrument;

use super::{ApiBytes, ApiPath};
use super::{Access, Pull, Push};
use crate::error::ApiError;
use crate::state::AppState;
use crate::storage::CacheFile;

/// Largest debuginfo record: Nix writes two short strings.
pub const MAX_DEBUGINFO_SIZE: usize = 16 * 1024;

/// What Nix writes for one build ID.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct DebugInfo {
    archive: String,
    member: String,
}

/// A build ID: an even number of lowercase hex digits (ELF build IDs are 8 to 64 bytes), and
/// `.debug` after it as Nix 2.8 to 2.30 name the file (later versions leave it off).
fn build_id(name: &str) -> Result<&str, Error> {
    let hex = name.strip_suffix(".debug").unwrap_or(name);
    let ok = (2..=128).contains(&hex.len()) && hex.len().is_multiple_of(2) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok { Ok(name) } else { Err(Error::invalid(format!("debuginfo/{name}: not a build ID in lowercase hex"))) }
}

/// `PUT debuginfo/{build-id}`: checks the JSON and stores it as it was checked.
#[instrument(skip_all, fields(cache = %access.name, build_id = %name))]
pub async fn put(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, name)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    let id = build_id(&name)?;
    let info: DebugInfo = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("debuginfo/{id} is not {{\"archive\", \"member\"}} JSON: {e}")))?;
    let relative = |s: &str| !s.is_empty() && s.len() <= 4096 && !s.starts_with('/') && !s.contains(['\0', '\n', '\\']);
    if !relative(&info.archive) || !relative(&info.member) || info.member.split('/').any(|c| c == "..") {
        return Err(Error::invalid(format!("debuginfo/{id}: archive and member must be relative paths")).into());
    }
    let json = serde_json::to_vec(&info).map_err(|e| Error::internal(e.to_string()))?;
    state.storage.put_cache_file(&access.name, CacheFile::DebugInfo(id), Bytes::from(json)).await?;
    Ok(StatusCode::OK)
}

/// `GET debuginfo/{build-id}`.
#[instrument(skip_all, fields(cache = %access.name, build_id = %name))]
pub async fn get(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, name)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    // Nix looks before it uploads: a name that cannot be a build ID is simply not there.
    let id = build_id(&name).map_err(|_| Error::not_found(format!("no debug info named {name:?}")))?;
    let json = state
        .storage
        .get_cache_file(&access.name, CacheFile::DebugInfo(id))
        .await?
        .ok_or_else(|| Error::not_found(format!("no debug info for build ID {id} in cache {:?}", access.name)))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}
