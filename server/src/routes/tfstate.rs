//! OpenTofu's and Terraform's `http` state backend, under `/_state/v1/{project}/{stack}`.
//!
//! - the state address: `GET` (200 with the state, 404 without), `POST` or `PUT` (write, with
//!   `?ID=` while a lock is held, `Content-MD5` checked when sent), `DELETE`, and `LOCK` and
//!   `UNLOCK` for clients that keep the default lock address;
//! - `{address}/lock`: `LOCK`, `POST` or `PUT` take the lock; `UNLOCK` or `DELETE` release it;
//!   `GET` shows who holds it. This is the address for clients whose `lock_method` and
//!   `unlock_method` are overridden (`POST` and `DELETE`, as GitLab's backend expects);
//! - `{address}/versions`, `{address}/versions/{version}` and `POST
//!   {address}/rollback/{version}`: the history that every write keeps.
//!
//! A lock already held answers 423 with the holder's LockInfo JSON, which both clients show.
//! An UNLOCK with an empty body is a forced unlock (`force-unlock` sends no lock description).
//!
//! Every route needs a token whose state claim grants the permission on `project/stack`; the
//! token and permission are checked before any body byte is read. No state or lock content is
//! ever logged: states hold secrets.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use flywheel_core::{Error, ErrorKind};
use futures::StreamExt;
use md5::Digest;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use tracing::instrument;

use super::{ApiPath, ApiQuery, Caller};
use crate::auth::StatePermissions;
use crate::error::ApiError;
use crate::state::AppState;
use crate::tfstate::{lock_id_of, LockOutcome, StackId, UnlockOutcome, WriteOutcome, MAX_LOCK_INFO};

/// The lock a write names (`?ID=`), as both clients send it.
#[derive(Debug, Default, Deserialize)]
pub struct LockQuery {
    #[serde(rename = "ID")]
    id: Option<String>,
}

/// What a request needs on its stack.
#[derive(Debug, Clone, Copy)]
enum Need {
    Read,
    Write,
    Lock,
}

impl Need {
    fn granted(self, perms: &StatePermissions) -> bool {
        match self {
            Need::Read => perms.read,
            Need::Write => perms.write,
            Need::Lock => perms.lock,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Need::Read => "reading",
            Need::Write => "writing",
            Need::Lock => "locking",
        }
    }
}

/// Checks the stack's names and the caller's permission on it. Without a token: 401; with one
/// that lacks the permission: 403, whether the stack exists or not.
fn authorize(caller: &Caller, project: &str, stack: &str, need: Need) -> Result<StackId, ApiError> {
    let id = StackId::new(project, stack)?;
    let Some(claims) = &caller.0 else {
        return Err(Error::new(ErrorKind::Unauthorized, format!("{} the state of {id} needs a token", need.what())).into());
    };
    if !need.granted(&claims.state_permissions_for(&id.to_string())) {
        return Err(Error::new(ErrorKind::Forbidden, format!("the token does not allow {} the state of {id}", need.what())).into());
    }
    Ok(id)
}

/// Reads a body of at most `limit` bytes: 413 past it (from the declared length, before any
/// byte is read, or from the count), 400 for a body that stops before its end.
async fn read_body(headers: &HeaderMap, body: Body, limit: u64, what: &str) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::rejected(StatusCode::PAYLOAD_TOO_LARGE, format!("{what} is larger than {limit} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| Error::invalid(format!("{what} stopped before its end: {e}")))?;
        if (bytes.len() + piece.len()) as u64 > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&piece);
    }
    Ok(Bytes::from(bytes))
}

/// Base64 of the MD5 of `bytes`, as `Content-MD5` carries it.
fn content_md5(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(bytes))
}

/// The holder's lock description, with the status both clients read as "locked".
fn locked(info: Bytes) -> Response {
    (StatusCode::LOCKED, [(header::CONTENT_TYPE, "application/json")], info).into_response()
}

fn method_not_allowed(allowed: &'static str) -> Response {
    let mut response = ApiError::rejected(StatusCode::METHOD_NOT_ALLOWED, format!("use one of {allowed}")).into_response();
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// The state address: every method of the protocol.
#[instrument(skip_all, fields(stack = %format!("{project}/{stack}"), http.method = %method))]
pub async fn stack(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((project, stack)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<LockQuery>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    match method.as_str() {
        "GET" | "HEAD" => read(&state, authorize(&caller, &project, &stack, Need::Read)?).await,
        "POST" | "PUT" => {
            let id = authorize(&caller, &project, &stack, Need::Write)?;
            write(&state, id, query.id, &headers, body).await
        }
        "DELETE" => {
            let id = authorize(&caller, &project, &stack, Need::Write)?;
            let outcome = timed(&state, state.tfstates.delete(&id, query.id.as_deref())).await?;
            Ok(change_answer(&state, outcome))
        }
        "LOCK" => lock(&state, authorize(&caller, &project, &stack, Need::Lock)?, &headers, body).await,
        "UNLOCK" => unlock(&state, authorize(&caller, &project, &stack, Need::Lock)?, &headers, body).await,
        _ => Ok(method_not_allowed("GET, HEAD, POST, PUT, DELETE, LOCK, UNLOCK")),
    }
}

/// The lock address: taking, releasing and showing the lock, whatever methods the client is
/// configured to use for them.
#[instrument(skip_all, fields(stack = %format!("{project}/{stack}"), http.method = %method))]
pub async fn lock_address(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((project, stack)): ApiPath<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    match method.as_str() {
        "LOCK" | "POST" | "PUT" => lock(&state, authorize(&caller, &project, &stack, Need::Lock)?, &headers, body).await,
        "UNLOCK" | "DELETE" => unlock(&state, authorize(&caller, &project, &stack, Need::Lock)?, &headers, body).await,
        "GET" | "HEAD" => {
            let id = authorize(&caller, &project, &stack, Need::Read)?;
            match timed(&state, state.tfstates.lock_info(&id)).await? {
                Some(info) => Ok(([(header::CONTENT_TYPE, "application/json")], info).into_response()),
                None => Err(Error::not_found(format!("{id} is not locked")).into()),
            }
        }
        _ => Ok(method_not_allowed("GET, HEAD, LOCK, UNLOCK, POST, PUT, DELETE")),
    }
}

/// Runs one storage operation of a state request, timed for `/metrics`.
async fn timed<T>(state: &AppState, operation: impl std::future::Future<Output = flywheel_core::Result<T>>) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = operation.await;
    state.metrics.tfstate_seconds.observe(started.elapsed());
    Ok(result?)
}

async fn read(state: &AppState, id: StackId) -> Result<Response, ApiError> {
    match timed(state, state.tfstates.get(&id)).await? {
        // Terraform compares a Content-MD5 it is sent with the body it reads.
        Some(bytes) => Ok((
            [(header::CONTENT_TYPE, "application/json".to_string()), (header::HeaderName::from_static("content-md5"), content_md5(&bytes))],
            bytes,
        )
            .into_response()),
        None => Err(Error::not_found(format!("{id} has no state")).into()),
    }
}

async fn write(state: &AppState, id: StackId, lock_id: Option<String>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(headers, body, state.config.tfstate.max_size, "a state").await?;
    if let Some(sent) = headers.get("content-md5") {
        let sent = sent.to_str().map_err(|_| Error::invalid("Content-MD5 is not text"))?;
        if sent.trim() != content_md5(&bytes) {
            return Err(Error::invalid("the state does not match its Content-MD5: it was damaged on the way").into());
        }
    }
    // Both clients write JSON (an encrypted OpenTofu state too); anything else is a mistake
    // that would only surface at the next read.
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| Error::invalid(format!("the state is not JSON: {e}")))?;
    let size = bytes.len() as u64;
    let outcome = timed(state, state.tfstates.write(&id, lock_id.as_deref(), bytes)).await?;
    if matches!(outcome, WriteOutcome::Done(_)) {
        state.metrics.tfstate_writes.fetch_add(1, Ordering::Relaxed);
        state.metrics.tfstate_bytes_written.fetch_add(size, Ordering::Relaxed);
        tracing::info!(size, "state written");
    }
    Ok(change_answer(state, outcome))
}

/// The answer to a write, delete or rollback.
fn change_answer(state: &AppState, outcome: WriteOutcome) -> Response {
    match outcome {
        WriteOutcome::Done(Some(version)) => Json(serde_json::json!({ "version": version })).into_response(),
        WriteOutcome::Done(None) => StatusCode::OK.into_response(),
        WriteOutcome::Locked(info) => {
            state.metrics.tfstate_lock_conflicts.fetch_add(1, Ordering::Relaxed);
            locked(info)
        }
        WriteOutcome::LockNotHeld => ApiError::rejected(
            StatusCode::CONFLICT,
            "the request names a lock that is not held (broken by a forced unlock?): lock the stack again".into(),
        )
        .into_response(),
    }
}

async fn lock(state: &AppState, id: StackId, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let info = read_body(headers, body, MAX_LOCK_INFO as u64, "a lock description").await?;
    match timed(state, state.tfstates.lock(&id, info)).await? {
        LockOutcome::Acquired => {
            state.metrics.tfstate_locks.fetch_add(1, Ordering::Relaxed);
            tracing::info!("locked");
            Ok(StatusCode::OK.into_response())
        }
        LockOutcome::Held(holder) => {
            state.metrics.tfstate_lock_conflicts.fetch_add(1, Ordering::Relaxed);
            Ok(locked(holder))
        }
    }
}

async fn unlock(state: &AppState, id: StackId, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let info = read_body(headers, body, MAX_LOCK_INFO as u64, "a lock description").await?;
    // `force-unlock` runs in a process that never took the lock, so it has no description to
    // send: an empty body breaks whatever lock is held.
    let lock_id = if info.iter().all(u8::is_ascii_whitespace) { None } else { Some(lock_id_of(&info)?) };
    match timed(state, state.tfstates.unlock(&id, lock_id.as_deref())).await? {
        UnlockOutcome::Released => {
            if lock_id.is_none() {
                state.metrics.tfstate_locks_broken.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("lock broken by a forced unlock");
            }
            Ok(StatusCode::OK.into_response())
        }
        // Releasing a lock that is gone is what a retried unlock looks like: done.
        UnlockOutcome::NotLocked => Ok(StatusCode::OK.into_response()),
        UnlockOutcome::HeldByOther(holder) => {
            state.metrics.tfstate_lock_conflicts.fetch_add(1, Ordering::Relaxed);
            Ok(locked(holder))
        }
    }
}

/// `GET {address}/versions`: the stored versions, oldest first.
#[instrument(skip_all, fields(stack = %format!("{project}/{stack}")))]
pub async fn versions(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((project, stack)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let id = authorize(&caller, &project, &stack, Need::Read)?;
    let versions = timed(&state, state.tfstates.versions(&id)).await?;
    Ok(Json(serde_json::json!({ "versions": versions })).into_response())
}

/// `GET {address}/versions/{version}`: one stored version.
#[instrument(skip_all, fields(stack = %format!("{project}/{stack}")))]
pub async fn version(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((project, stack, version)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let id = authorize(&caller, &project, &stack, Need::Read)?;
    match timed(&state, state.tfstates.version(&id, &version)).await? {
        Some(bytes) => Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response()),
        None => Err(Error::not_found(format!("{id} has no version {version}")).into()),
    }
}

/// `POST {address}/rollback/{version}[?ID=]`: makes a stored version current again (as a new
/// version), under the same lock rules as a write.
#[instrument(skip_all, fields(stack = %format!("{project}/{stack}")))]
pub async fn rollback(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((project, stack, version)): ApiPath<(String, String, String)>,
    ApiQuery(query): ApiQuery<LockQuery>,
) -> Result<Response, ApiError> {
    let id = authorize(&caller, &project, &stack, Need::Write)?;
    match timed(&state, state.tfstates.rollback(&id, &version, query.id.as_deref())).await? {
        Some(outcome) => {
            if matches!(outcome, WriteOutcome::Done(_)) {
                state.metrics.tfstate_writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(version, "state rolled back");
            }
            Ok(change_answer(&state, outcome))
        }
        None => Err(Error::not_found(format!("{id} has no version {version}")).into()),
    }
}
