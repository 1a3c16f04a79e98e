//! `GET|PUT /_flywheel/v1/{cache}/trace/{key}`: access traces, which chunks a CI job read in
//! which order, so that the next job with the same key fetches them ahead of its reads. Wire
//! types and the merge are in `flywheel_core::api::v1::traces`.
//!
//! A trace is a hint: it is stored beside the cache's paths, never keeps a chunk or a path
//! alive (garbage collection ignores it when marking), and may name chunks the cache does not
//! have. A stored trace that no longer parses is treated as absent rather than as damage: the
//! worst it costs is one job without prefetching.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flywheel_core::api::v1::traces::{validate_trace_key, Trace, TraceSummary, MAX_TRACE_BODY};
use flywheel_core::Error;
use tracing::instrument;

use super::ApiPath;
use super::{Access, Pull, Push};
use crate::error::ApiError;
use crate::ingest::Compression;
use crate::state::AppState;
use crate::storage::CacheFile;

/// `GET trace/{key}`: the stored trace as JSON, or 404 when there is none (or only one that
/// no longer parses).
#[instrument(skip_all, fields(cache = %access.name, trace.key = %key))]
pub async fn get(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, key)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    validate_trace_key(&key)?;
    let (_, json) = load(&state, &access.name, &key)
        .await?
        .ok_or_else(|| Error::not_found(format!("no trace {key:?} in cache {:?}", access.name)))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// `PUT trace/{key}`: merges the trace of one run into the stored one and answers what is
/// stored now.
///
/// Two runners that PUT the same key at once each merge into the trace they read, and the
/// later write replaces the earlier: one run's reads are lost from the merge. That is
/// acceptable for a hint (the next run of either job puts them back), and object stores
/// offer no compare-and-swap that every backend here supports to do better.
#[instrument(skip_all, fields(cache = %access.name, trace.key = %key))]
pub async fn put(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<TraceSummary>, ApiError> {
    // `Access` has checked the token and the permission from the request head; the key and
    // the declared size are checked next, all before a body byte is read.
    validate_trace_key(&key)?;
    let encoding = headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes());
    if !matches!(encoding, None | Some(b"identity")) {
        return Err(Error::invalid("a trace is sent as plain JSON, without Content-Encoding").into());
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_TRACE_BODY as u64) {
        return Err(too_large().into());
    }
    // `Body` ignores the router's default limit, so the bound is applied here; it also holds
    // for a body sent without a length.
    let body = axum::body::to_bytes(body, MAX_TRACE_BODY).await.map_err(|e| {
        tracing::debug!(error = %e, "reading a trace body failed");
        too_large()
    })?;
    let run = Trace::parse(&body)?;

    let stored = load(&state, &access.name, &key).await?.map(|(trace, _)| trace).unwrap_or_default();
    let (merged, dropped) = stored.merge(&run);
    let summary = merged.summary(dropped);
    let json = serde_json::to_vec(&merged).map_err(|e| Error::internal(format!("serializing a trace: {e}")))?;
    // The merge keeps the bounds of a parsed trace, which fit in a body; checked so that a
    // change of those bounds cannot store a trace no client would read.
    if json.len() > MAX_TRACE_BODY {
        return Err(Error::internal(format!("a merged trace of {} bytes is larger than a trace body may be", json.len())).into());
    }
    let level = state.config.zstd_level;
    let compressed = tokio::task::spawn_blocking(move || zstd::bulk::compress(&json, level))
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(|e| Error::internal(format!("compressing a trace: {e}")))?;
    state.storage.put_cache_file(&access.name, CacheFile::Trace(&key), Bytes::from(compressed)).await?;
    tracing::debug!(paths = summary.paths, chunks = summary.chunks, dropped = summary.dropped, "trace stored");
    Ok(Json(summary))
}

/// The refusal of a body past [`MAX_TRACE_BODY`], or one that stopped before its end.
fn too_large() -> Error {
    Error::invalid(format!("a trace body is at most {MAX_TRACE_BODY} bytes, and must arrive whole"))
}

/// The trace stored under `key`, parsed and as JSON. One that does not decompress or parse
/// is logged and treated as absent: the next PUT replaces it.
async fn load(state: &AppState, cache: &str, key: &str) -> Result<Option<(Trace, Bytes)>, Error> {
    let Some(stored) = state.storage.get_cache_file(cache, CacheFile::Trace(key)).await? else { return Ok(None) };
    let decoded = tokio::task::spawn_blocking(move || {
        let json = Compression::Zstd.decode_all(stored, MAX_TRACE_BODY)?;
        let trace = Trace::parse(&json)?;
        Ok::<_, Error>((trace, Bytes::from(json)))
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))?;
    match decoded {
        Ok(found) => Ok(Some(found)),
        Err(err) => {
            tracing::warn!(cache, trace.key = key, error = %err, "the stored trace does not parse; treated as absent");
            Ok(None)
        }
    }
}
