//! Realisations of content-addressed derivations (`ca-derivations`): which store path a
//! derivation's output was built into, so that Nix can substitute the output by its derivation.
//!
//! - `PUT|GET /{cache}/realisations/sha256:<hash>!<output>.doi`, as Nix up to 2.34 uploads and
//!   reads them ([`Realisation`]);
//! - `PUT|GET /{cache}/build-trace-v2/<drv>/<output>.doi`, as Nix 2.35 and later do
//!   ([`BuildTraceValue`], keyed by the URL).
//!
//! Uploads are checked and stored as checked, with their signatures as sent. Answers carry the
//! cache's signature as well, made when served (like narinfo), and only while the output path
//! is published in the cache: a realisation whose path is gone would send Nix after a path it
//! cannot get.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flywheel_core::nix::{BuildTraceKey, BuildTraceValue, DrvOutputId, Realisation, SigningKey, StorePath};
use flywheel_core::Error;
use tracing::instrument;

use super::{ApiBytes, ApiPath};
use super::{Access, Pull, Push};
use crate::error::ApiError;
use crate::ingest::Compression;
use crate::state::AppState;
use crate::storage::{CacheFile, CacheRecord};

/// Largest realisation accepted, decoded. Nix writes a few hundred bytes: a store path, an id
/// and a signature or two.
pub const MAX_REALISATION_SIZE: usize = 64 * 1024;

/// The id a `realisations/` file name holds: `sha256:<hash>!<output>.doi`.
fn realisation_id(file: &str) -> Result<DrvOutputId, Error> {
    let id = file
        .strip_suffix(".doi")
        .ok_or_else(|| Error::invalid(format!("realisations/{file}: realisations are named sha256:<hash>!<output>.doi")))?;
    DrvOutputId::parse(id).map_err(|e| e.context(format!("realisations/{file}")))
}

/// The key a `build-trace-v2/<drv>/<output>.doi` URL names.
fn build_trace_key(drv: &str, file: &str) -> Result<BuildTraceKey, Error> {
    let output = file.strip_suffix(".doi").ok_or_else(|| {
        Error::invalid(format!("build-trace-v2/{drv}/{file}: entries are named <drv>/<output>.doi"))
    })?;
    BuildTraceKey::new(drv, output).map_err(|e| e.context(format!("build-trace-v2/{drv}/{file}")))
}

/// The body, decoded from its `Content-Encoding` (Nix sends none, but a proxy may add one).
/// At most [`MAX_REALISATION_SIZE`] bytes come out, so decoding costs little and runs inline.
fn decoded_body(headers: &HeaderMap, body: Bytes) -> Result<Vec<u8>, Error> {
    let encoding = headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?"));
    Compression::from_content_encoding(encoding)?.decode_all(body, MAX_REALISATION_SIZE)
}

/// The cache's signing key.
fn cache_key(record: &CacheRecord) -> Result<SigningKey, Error> {
    SigningKey::parse(&record.signing_key).map_err(|e| Error::internal(format!("cache signing key: {e}")))
}

/// Refuses to serve an entry whose output path the cache no longer holds.
async fn require_output(state: &AppState, cache: &str, out_path: &StorePath, what: &str) -> Result<(), Error> {
    if state.storage.has_path(cache, &out_path.hash_part()).await? {
        Ok(())
    } else {
        Err(Error::not_found(format!("{what}: its output {out_path} is not in cache {cache:?}")))
    }
}

fn json_response(json: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// `PUT realisations/{id}.doi`: checks the realisation (its id must be the URL's) and stores it.
#[instrument(skip_all, fields(cache = %access.name, file = %file))]
pub async fn put_realisation(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, file)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    let id = realisation_id(&file)?;
    let realisation = Realisation::parse_json(&decoded_body(&headers, body)?).map_err(|e| e.context(format!("realisations/{file}")))?;
    if realisation.id != id {
        return Err(Error::invalid(format!("realisations/{file} holds the realisation of {}, not of {id}", realisation.id)).into());
    }
    let name = format!("{}/{}", id.drv_hash.to_hex(), id.output);
    state.storage.put_cache_file(&access.name, CacheFile::Realisation(&name), Bytes::from(realisation.to_json())).await?;
    tracing::info!(out_path = %realisation.out_path, "realisation stored");
    Ok(StatusCode::OK)
}

/// `GET|HEAD realisations/{id}.doi`: the realisation, with the cache's signature added.
#[instrument(skip_all, fields(cache = %access.name, file = %file))]
pub async fn get_realisation(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let id = realisation_id(&file)?;
    let name = format!("{}/{}", id.drv_hash.to_hex(), id.output);
    let stored = state
        .storage
        .get_cache_file(&access.name, CacheFile::Realisation(&name))
        .await?
        .ok_or_else(|| Error::not_found(format!("no realisation of {id} in cache {:?}", access.name)))?;
    let mut realisation = Realisation::parse_json(&stored).map_err(|e| Error::corrupt(format!("stored realisation of {id}: {e}")))?;
    require_output(&state, &access.name, &realisation.out_path, &format!("realisation of {id}")).await?;
    realisation.sign(&cache_key(&access.record)?);
    Ok(json_response(realisation.to_json()))
}

/// `PUT build-trace-v2/{drv}/{output}.doi`: checks the entry's value and stores it.
#[instrument(skip_all, fields(cache = %access.name, drv = %drv, file = %file))]
pub async fn put_build_trace(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, drv, file)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    let key = build_trace_key(&drv, &file)?;
    let value = BuildTraceValue::parse_json(&decoded_body(&headers, body)?)
        .map_err(|e| e.context(format!("build-trace-v2/{drv}/{file}")))?;
    let name = format!("{}/{}", key.drv_path, key.output);
    state.storage.put_cache_file(&access.name, CacheFile::BuildTrace(&name), Bytes::from(value.to_json()?)).await?;
    tracing::info!(out_path = %value.out_path, "build trace entry stored");
    Ok(StatusCode::OK)
}

/// `GET|HEAD build-trace-v2/{drv}/{output}.doi`: the entry's value, with the cache's signature
/// added.
#[instrument(skip_all, fields(cache = %access.name, drv = %drv, file = %file))]
pub async fn get_build_trace(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, drv, file)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = build_trace_key(&drv, &file)?;
    let name = format!("{}/{}", key.drv_path, key.output);
    let what = format!("build trace entry of {}^{}", key.drv_path, key.output);
    let stored = state
        .storage
        .get_cache_file(&access.name, CacheFile::BuildTrace(&name))
        .await?
        .ok_or_else(|| Error::not_found(format!("no {what} in cache {:?}", access.name)))?;
    let mut value = BuildTraceValue::parse_json(&stored).map_err(|e| Error::corrupt(format!("stored {what}: {e}")))?;
    require_output(&state, &access.name, &value.out_path, &what).await?;
    value.sign(&key, &cache_key(&access.record)?);
    Ok(json_response(value.to_json()?))
}
