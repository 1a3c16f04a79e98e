//! The mount's control socket, through which a CI job asks a running mount to prefetch what an
//! earlier job with the same trace key read (`flywheel prefetch KEY`), and to save what this
//! job read under that key (`flywheel save-trace`).
//!
//! One request per connection: a JSON [`ControlRequest`] on one line, answered by a JSON
//! [`ControlResponse`] on one line. The socket is made with mode 0600, so only the mount's
//! user (root on runners) may use it: a prefetch costs bandwidth, and a saved trace steers
//! every later job of its key.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flywheel_core::api::v1::traces::validate_trace_key;
use flywheel_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{info, warn, Instrument};

use crate::fs::Inner;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client asks of the mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Starts a new recording under `key`, and fetches in the background the chunks the
    /// trace stored under `key` names. With `wait`, answers once they are all fetched.
    Prefetch {
        /// The trace key.
        key: String,
        /// Answer only when the prefetch is done.
        #[serde(default)]
        wait: bool,
    },
    /// Sends the current recording to the server under `key` (or the recording's own key),
    /// and starts a new recording.
    SaveTrace {
        /// The trace key; the one of the last `Prefetch` when absent.
        #[serde(default)]
        key: Option<String>,
    },
}

/// The mount's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlResponse {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What happened, for people.
    pub message: String,
    /// Chunks queued for prefetch, or saved in the trace.
    #[serde(default)]
    pub chunks: usize,
    /// Store paths the trace names.
    #[serde(default)]
    pub paths: usize,
}

impl ControlResponse {
    fn failed(err: &Error) -> Self {
        ControlResponse { ok: false, message: err.to_string(), chunks: 0, paths: 0 }
    }
}

/// Serves the control socket at `path` on the runtime, replacing a stale socket file.
pub(crate) fn serve(inner: Arc<Inner>, path: &Path, runtime: &tokio::runtime::Handle) -> Result<()> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::invalid(format!("{} is in use by another mount", path.display())));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = {
        let _guard = runtime.enter();
        // Created under a umask of 077, so no moment exists where others could connect.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o077) };
        let bound = tokio::net::UnixListener::bind(path);
        unsafe { libc::umask(old) };
        bound.map_err(|e| Error::internal(format!("binding the control socket {}: {e}", path.display())))?
    };
    info!(socket = %path.display(), "control socket ready");
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let inner = inner.clone();
            tokio::spawn(async move { answer(inner, stream).await }.instrument(tracing::info_span!("control")));
        }
    });
    Ok(())
}

async fn answer(inner: Arc<Inner>, stream: tokio::net::UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(line.trim()) {
            Ok(request) => handle(&inner, request).await.unwrap_or_else(|e| ControlResponse::failed(&e)),
            Err(err) => ControlResponse::failed(&Error::invalid(format!("bad control request: {err}"))),
        },
        Ok(Err(err)) => ControlResponse::failed(&Error::invalid(format!("reading the control request: {err}"))),
        Err(_) => ControlResponse::failed(&Error::invalid("the control request did not arrive in time")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

async fn handle(inner: &Arc<Inner>, request: ControlRequest) -> Result<ControlResponse> {
    match request {
        ControlRequest::Prefetch { key, wait } => prefetch(inner, &key, wait).await,
        ControlRequest::SaveTrace { key } => save(inner, key).await,
    }
}

/// Starts recording under `key` and queues what its stored trace names.
pub(crate) async fn prefetch(inner: &Arc<Inner>, key: &str, wait: bool) -> Result<ControlResponse> {
    validate_trace_key(key)?;
    inner.recorder.restart(Some(key.to_string()));
    let fetched = tokio::time::timeout(inner.config.offline_timeout, inner.store.source().trace(key))
        .await
        .map_err(|_| Error::unavailable("the server did not answer within the offline timeout"))?;
    let trace = match fetched {
        Ok(Some(trace)) => trace,
        Ok(None) => {
            return Ok(ControlResponse {
                ok: true,
                message: format!("no trace under {key:?} yet; recording this job's reads"),
                chunks: 0,
                paths: 0,
            })
        }
        // A trace that cannot be had is no reason to fail the job: it runs on demand.
        Err(err) => {
            warn!(key, "the trace could not be fetched: {err}");
            return Ok(ControlResponse { ok: true, message: format!("trace {key:?} unavailable ({err}); recording anyway"), chunks: 0, paths: 0 });
        }
    };
    let (paths, chunks, skipped) = inner.prefetch_trace(&trace).await;
    if wait {
        inner.background.trace_drained().await;
    }
    let state = if wait { "fetched" } else { "queued" };
    info!(key, paths, chunks, skipped, "prefetch {state}");
    Ok(ControlResponse {
        ok: true,
        message: format!("{chunks} chunks of {paths} paths {state} from trace {key:?} ({skipped} paths no longer in the cache)"),
        chunks,
        paths,
    })
}

/// Sends the current recording under `key` (or its own) and starts a new one.
pub(crate) async fn save(inner: &Arc<Inner>, key: Option<String>) -> Result<ControlResponse> {
    let key = key.or_else(|| inner.recorder.key()).ok_or_else(|| {
        Error::invalid("no trace key: name one, or start the job with `flywheel prefetch KEY`")
    })?;
    validate_trace_key(&key)?;
    let trace = inner.recorder.trace();
    let summary = tokio::time::timeout(inner.config.offline_timeout, inner.store.source().put_trace(&key, &trace))
        .await
        .map_err(|_| Error::unavailable("the server did not answer within the offline timeout"))??;
    inner.recorder.restart(Some(key.clone()));
    info!(key, chunks = trace.chunks.len(), stored = summary.chunks, "trace saved");
    Ok(ControlResponse {
        ok: true,
        message: format!(
            "saved {} chunks read by this job under {key:?}; the trace now names {} chunks of {} paths",
            trace.chunks.len(),
            summary.chunks,
            summary.paths
        ),
        chunks: trace.chunks.len(),
        paths: trace.paths.len(),
    })
}

/// Sends `request` to the mount whose control socket is `path` and returns its answer; an
/// answer with `ok: false` becomes an error.
pub fn request(path: &Path, request: &ControlRequest) -> Result<ControlResponse> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| Error::unavailable(format!("no mount answers on {}: {e}", path.display())))?;
    let mut line = serde_json::to_vec(request).map_err(|e| Error::internal(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| Error::unavailable(format!("sending to the mount: {e}")))?;
    let mut answer = String::new();
    std::io::BufReader::new(std::io::Read::take(stream, 1 << 20))
        .read_line(&mut answer)
        .map_err(|e| Error::unavailable(format!("reading the mount's answer: {e}")))?;
    let response: ControlResponse =
        serde_json::from_str(answer.trim()).map_err(|e| Error::corrupt(format!("the mount's answer does not parse: {e}")))?;
    if response.ok {
        Ok(response)
    } else {
        Err(Error::invalid(response.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            ControlRequest::Prefetch { key: "job-1".into(), wait: true },
            ControlRequest::SaveTrace { key: None },
            ControlRequest::SaveTrace { key: Some("k".into()) },
        ] {
            let json = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<ControlRequest>(&json).unwrap(), request, "{json}");
        }
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"op":"prefetch","key":"k"}"#).unwrap(),
            ControlRequest::Prefetch { key: "k".into(), wait: false }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"format-disk"}"#).is_err());
    }
}
