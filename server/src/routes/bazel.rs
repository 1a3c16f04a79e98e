//! Bazel's HTTP cache protocol on the main listener: `GET`, `HEAD` and `PUT` of
//! `/{cache}/ac/{sha256}` (action results, as serialized protos) and `/{cache}/cas/{sha256}`
//! (blobs), for `bazel --remote_cache=http://HOST:PORT/{cache}`. The cache's name is the URL's
//! prefix. Storage and checks are the gRPC frontend's (see [`crate::bazel`]).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flywheel_core::Error;
use futures::TryStreamExt;

use super::{Access, ApiBytes, ApiPath, Pull, Push};
use crate::bazel::{parse_sha256, ActionLookup, BlobDigest, Counter, Protocol};
use crate::error::ApiError;
use crate::ingest::Compression;
use crate::state::AppState;

/// Largest action result body read (the configured limit, at most 7 MiB, is checked after).
pub const MAX_AC_BODY: usize = 7 << 20;

fn count(state: &AppState, counter: Counter, n: u64) {
    state.bazel.metrics.add(Protocol::Http, counter, n);
}

/// `GET /{cache}/ac/{sha256}`: the action result, or 404 when there is none or an output it
/// names is missing.
#[tracing::instrument(skip_all, fields(cache = %access.name))]
pub async fn get_ac(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let action = parse_sha256(&hash)?;
    match state.bazel.action_result(&access.name, &action, state.bazel.refresh_after(&access.record)).await? {
        (ActionLookup::Hit(_), Some(bytes)) => {
            count(&state, Counter::AcHit, 1);
            count(&state, Counter::BytesOut, bytes.len() as u64);
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        _ => {
            count(&state, Counter::AcMiss, 1);
            Err(Error::not_found(format!("no complete action result for {hash}")).into())
        }
    }
}

/// `PUT /{cache}/ac/{sha256}`: stores an action result.
#[tracing::instrument(skip_all, fields(cache = %access.name))]
pub async fn put_ac(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    let action = parse_sha256(&hash)?;
    count(&state, Counter::BytesIn, body.len() as u64);
    if body.len() as u64 > state.bazel.config.max_action_result_size {
        return Err(ApiError::rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the action result is over bazel.max-action-result-size ({} bytes)", state.bazel.config.max_action_result_size),
        ));
    }
    state.bazel.put_action_result(&access.name, &action, body).await?;
    Ok(StatusCode::OK)
}

/// `GET /{cache}/cas/{sha256}`: the blob, every byte verified; a missing or damaged chunk is a
/// 5xx before the first byte.
#[tracing::instrument(skip_all, fields(cache = %access.name))]
pub async fn get_cas(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let sha256 = parse_sha256(&hash)?;
    let Some((digest, stream)) = state.bazel.read_blob_by_hash(&access.name, &sha256).await? else {
        count(&state, Counter::CasMiss, 1);
        return Err(Error::not_found(format!("blob {hash} is not in the cache")).into());
    };
    count(&state, Counter::CasHit, 1);
    count(&state, Counter::BytesOut, digest.size);
    let body = Body::from_stream(stream.map_err(std::io::Error::from));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream"), (header::CONTENT_LENGTH, &digest.size.to_string())], body)
        .into_response())
}

/// `HEAD /{cache}/cas/{sha256}`: whether the cache holds the blob, and its length.
pub async fn head_cas(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let sha256 = parse_sha256(&hash)?;
    match state.bazel.digest_of(&access.name, &sha256).await? {
        Some(digest) => {
            count(&state, Counter::CasHit, 1);
            Ok(([(header::CONTENT_LENGTH, digest.size.to_string())]).into_response())
        }
        None => {
            count(&state, Counter::CasMiss, 1);
            Ok(StatusCode::NOT_FOUND.into_response())
        }
    }
}

/// `PUT /{cache}/cas/{sha256}`: stores a blob, which must hash to its name. The length comes
/// from `Content-Length` (Bazel sends it), and a blob over `bazel.max-blob-size` is refused
/// before its body is read.
#[tracing::instrument(skip_all, fields(cache = %access.name))]
pub async fn put_cas(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
    headers: HeaderMap,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let sha256 = parse_sha256(&hash)?;
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ApiError::rejected(StatusCode::LENGTH_REQUIRED, "a blob upload needs a Content-Length".into()))?;
    if size > state.bazel.config.max_blob_size {
        return Err(ApiError::rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the blob has {size} bytes, over bazel.max-blob-size ({} bytes)", state.bazel.config.max_blob_size),
        ));
    }
    let compression = match headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes()) {
        None | Some(b"identity") => Compression::None,
        Some(_) => return Err(Error::invalid("blob uploads are taken uncompressed").into()),
    };
    count(&state, Counter::BytesIn, size);
    let body = request.into_body().into_data_stream().map_err(std::io::Error::other);
    state.bazel.put_blob(&access.name, BlobDigest { sha256, size }, body, compression).await?;
    Ok(StatusCode::OK)
}
