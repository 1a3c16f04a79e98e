//! Accepting and serving connections with bounds on what a client may hold: a connection
//! limit, and timeouts on progress (headers, idle keep-alive, request bodies, responses the
//! client does not take, bodyless requests). None bounds the length of a transfer: a NAR
//! of any size streams as long as its bytes move.
//!
//! Each connection has a watchdog that knows, from the bytes moving through its socket and the
//! requests in flight on it, which deadline applies, and drops the connection when it passes.
//! Request bodies carry their own progress check, so that a stalled upload fails as a request
//! (and frees what it holds) even while the connection itself stays open.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use flywheel_core::Error;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::config::LimitsConfig;
use crate::error::ApiError;

/// The limits as durations, for the connection tasks.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_read: Duration,
    idle: Duration,
    body_idle: Duration,
    body_min_rate: u64,
    request: Duration,
}

impl From<&LimitsConfig> for Limits {
    fn from(config: &LimitsConfig) -> Self {
        Limits {
            header_read: Duration::from_secs(config.header_read_timeout),
            idle: Duration::from_secs(config.idle_timeout),
            body_idle: Duration::from_secs(config.body_idle_timeout),
            body_min_rate: config.body_min_rate,
            request: Duration::from_secs(config.request_timeout),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// the connections to finish their requests (idle ones close at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &LimitsConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = Limits::from(config);
    let max_connections = fit_to_open_file_limit(config.max_connections);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    // HTTP/1.1 only, as Nix and the runners speak it. The watchdog below owns the header
    // deadline; hyper's own would also cut idle keep-alive connections at the header timeout.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let builder = Arc::new(builder);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A slot is taken before accepting: past the limit, new connections wait in the
        // kernel's backlog instead of costing a descriptor each.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.map_err(|_| io::Error::other("connection slots closed"))?,
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
        };
        // Answers are written in pieces (headers, then body frames); with Nagle's algorithm a
        // small piece waits for the client's delayed ACK of the last, up to 40 ms a request.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "setting TCP_NODELAY failed");
        }
        let (router, builder, stop) = (router.clone(), builder.clone(), stop_rx.clone());
        tokio::spawn(serve_connection(stream, peer, router, builder, limits, slot, stop));
    }
    drop(listener);
    stop_tx.send_replace(true);
    // Every connection gives its slot back when it ends.
    let _all = slots.acquire_many(max_connections as u32).await;
    Ok(())
}

/// Lets the accept loop go on after a failed accept. A connection that died in the backlog
/// is nothing; running out of descriptors or memory passes, so the loop waits a moment
/// rather than spinning on the same error.
async fn accept_failed(err: io::Error) {
    if matches!(err.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused) {
        return;
    }
    tracing::error!(error = %err, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Descriptors kept for everything but client connections (storage files, S3 sockets, the
/// listener): a quarter of the limit, and at least 256.
fn reserved_descriptors(limit: u64) -> u64 {
    (limit / 4).max(256)
}

/// Lowers `wanted` connections to what the open file limit allows, since a connection past
/// it would fail the storage reads of every other one. The limit is read, never raised: the
/// service manager sets it (the NixOS module's LimitNOFILE), and its seccomp filter forbids
/// setrlimit.
fn fit_to_open_file_limit(wanted: usize) -> usize {
    let Some(limit) = open_file_limit() else {
        return wanted;
    };
    let allowed = limit.saturating_sub(reserved_descriptors(limit)).max(1);
    if wanted as u64 > allowed {
        tracing::warn!(
            max_connections = wanted,
            open_file_limit = limit,
            allowed,
            "limits.max-connections does not fit the open file limit; raise LimitNOFILE (ulimit -n)"
        );
        return allowed as usize;
    }
    wanted
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// Serves one connection until it ends, its watchdog fires, or shutdown has let its requests
/// finish.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    builder: Arc<hyper::server::conn::http1::Builder>,
    limits: Limits,
    _slot: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = InFlight::enter(service_activity.clone());
        handle(router.clone(), request, limits, in_flight)
    });
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                break;
            }
            reason = activity.expired(limits) => {
                tracing::debug!(%peer, reason, "closing connection");
                break;
            }
            changed = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// One request: its body gets a progress check, a bodyless one a deadline for its answer,
/// and the answer's body keeps the request counted as in flight until it is sent.
async fn handle(
    mut router: Router,
    request: hyper::Request<Incoming>,
    limits: Limits,
    in_flight: InFlight,
) -> Result<Response<GuardedBody>, Infallible> {
    let bounded = request.body().is_end_stream() && !is_nar_download(request.uri().path());
    let request = request.map(|body| Body::new(ProgressBody::new(body, limits)));
    // The router is always ready; asking keeps to the Service contract.
    if let Err(never) =
        std::future::poll_fn(|cx| <Router as Service<axum::extract::Request>>::poll_ready(&mut router, cx)).await
    {
        match never {}
    }
    let answer = router.call(request);
    let response = if bounded {
        match tokio::time::timeout(limits.request, answer).await {
            Ok(response) => response,
            Err(_) => Ok(ApiError::from(Error::unavailable(format!(
                "the request was not answered within limits.request-timeout ({} s)",
                limits.request.as_secs()
            )))
            .into_response()),
        }
    } else {
        answer.await
    };
    // The router's error type is Infallible.
    let response = match response {
        Ok(response) => response,
        Err(never) => match never {},
    };
    Ok(response.map(|body| GuardedBody { inner: body, _in_flight: in_flight }))
}

/// Whether `path` is a NAR or Bazel blob download (`/{cache}/nar/{file}`,
/// `/{cache}/cas/{sha256}`), whose answer starts only once all of its chunks are checked, which
/// takes as long as the NAR or blob is big.
fn is_nar_download(path: &str) -> bool {
    matches!(path.trim_start_matches('/').split('/').nth(1), Some("nar" | "cas"))
}

/// What the watchdog of a connection knows about it.
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the watchdog when a deadline moves earlier.
    changed: Notify,
}

struct ActivityState {
    /// Requests being answered (one at a time in HTTP/1.1).
    in_flight: usize,
    /// Whether the connection has served a request, which makes a pause before the next one
    /// an idle keep-alive rather than a client that never speaks.
    served: bool,
    /// When the last request ended, or the connection opened.
    idle_since: Instant,
    /// When the first byte after `idle_since` arrived: a request's headers have begun.
    head_started: Option<Instant>,
    /// Since when the server has bytes to send that the client does not take.
    write_blocked_since: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                served: false,
                idle_since: Instant::now(),
                head_started: None,
                write_blocked_since: None,
            }),
            changed: Notify::new(),
        }
    }

    /// The earliest deadline that applies now, and what passing it means.
    fn deadline(&self, limits: Limits) -> Option<(Instant, &'static str)> {
        let state = self.state.lock();
        let mut deadline = None;
        if state.in_flight == 0 {
            deadline = Some(match state.head_started {
                Some(at) => (at + limits.header_read, "request headers took too long"),
                None if state.served => (state.idle_since + limits.idle, "idle keep-alive connection"),
                None => (state.idle_since + limits.header_read, "no request on a new connection"),
            });
        }
        if let Some(at) = state.write_blocked_since {
            let blocked = (at + limits.body_idle, "the client stopped reading the response");
            deadline = Some(match deadline {
                Some(other) if other.0 <= blocked.0 => other,
                _ => blocked,
            });
        }
        deadline
    }

    /// Resolves once a deadline has passed, with the reason.
    async fn expired(&self, limits: Limits) -> &'static str {
        loop {
            // Armed before the deadline is read, so that no change between the two is missed.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                Some((at, reason)) if at <= Instant::now() => return reason,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    fn on_read(&self) {
        let mut state = self.state.lock();
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn on_write(&self, blocked: bool) {
        let mut state = self.state.lock();
        match (blocked, state.write_blocked_since.is_some()) {
            (true, false) => {
                state.write_blocked_since = Some(Instant::now());
                drop(state);
                self.changed.notify_one();
            }
            (false, true) => state.write_blocked_since = None,
            _ => {}
        }
    }
}

/// Counts a request as in flight from its headers to the end of its answer's body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: Arc<Activity>) -> Self {
        {
            let mut state = activity.state.lock();
            state.in_flight += 1;
            state.served = true;
            state.head_started = None;
        }
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            state.head_started = None;
        }
        drop(state);
        self.0.changed.notify_one();
    }
}

/// A socket that reports the bytes moving through it to its connection's watchdog.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.on_write(result.is_pending());
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.on_write(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A request body that fails when its client stops sending: no bytes for `body-idle-timeout`
/// while the server waits, or fewer than `body-min-rate` bytes per second over a window of
/// that much waiting. Only time spent waiting counts, so a server slow to consume (storage
/// under load) never blames the client.
struct ProgressBody {
    inner: Incoming,
    limits: Limits,
    /// Fires `body_idle` after the current wait began; armed while a wait is on.
    timer: Pin<Box<Sleep>>,
    waiting_since: Option<Instant>,
    window_waited: Duration,
    window_bytes: u64,
}

impl ProgressBody {
    fn new(inner: Incoming, limits: Limits) -> Self {
        ProgressBody {
            inner,
            limits,
            timer: Box::pin(tokio::time::sleep(limits.body_idle)),
            waiting_since: None,
            window_waited: Duration::ZERO,
            window_bytes: 0,
        }
    }

    /// Accounts for a frame that ended a wait begun at `since`; an error when the window's
    /// rate is too low.
    fn arrived(&mut self, since: Instant, bytes: u64) -> Result<(), BodyStalled> {
        self.window_waited += since.elapsed();
        self.window_bytes += bytes;
        if self.window_waited >= self.limits.body_idle {
            let needed = self.limits.body_min_rate.saturating_mul(self.window_waited.as_secs());
            if self.window_bytes < needed {
                return Err(BodyStalled(format!(
                    "the request body came at {} bytes in {} s of waiting, below limits.body-min-rate ({} bytes/s)",
                    self.window_bytes,
                    self.window_waited.as_secs(),
                    self.limits.body_min_rate
                )));
            }
            self.window_waited = Duration::ZERO;
            self.window_bytes = 0;
        }
        Ok(())
    }
}

impl HttpBody for ProgressBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let since = match this.waiting_since {
            Some(since) => since,
            None => {
                let now = Instant::now();
                this.waiting_since = Some(now);
                this.timer.as_mut().reset(now + this.limits.body_idle);
                now
            }
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting_since = None;
                let bytes = match &frame {
                    Some(Ok(frame)) => frame.data_ref().map_or(0, |data| data.len() as u64),
                    _ => 0,
                };
                if let Err(stalled) = this.arrived(since, bytes) {
                    return Poll::Ready(Some(Err(stalled.into())));
                }
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => {
                if std::future::Future::poll(this.timer.as_mut(), cx).is_ready() {
                    return Poll::Ready(Some(Err(BodyStalled(format!(
                        "no bytes of the request body for limits.body-idle-timeout ({} s)",
                        this.limits.body_idle.as_secs()
                    ))
                    .into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body whose client stopped sending.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyStalled(String);

/// An answer's body that keeps its request counted as in flight until it is dropped.
struct GuardedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_downloads_are_told_apart() {
        assert!(is_nar_download("/main/nar/abc.nar.zst"));
        assert!(!is_nar_download("/main/abc.narinfo"));
        assert!(!is_nar_download("/_flywheel/v1/main/chunks"));
        assert!(!is_nar_download("/nar"));
    }

    #[test]
    fn descriptors_are_kept_for_storage() {
        assert_eq!(reserved_descriptors(1024), 256);
        assert_eq!(reserved_descriptors(65536), 16384);
        assert!(open_file_limit().is_some_and(|limit| limit > 0));
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_deadlines_follow_the_connection() {
        let limits = Limits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            body_idle: Duration::from_secs(30),
            body_min_rate: 1024,
            request: Duration::from_secs(60),
        };
        let activity = Arc::new(Activity::new());
        let opened = Instant::now();
        // A new connection must send its headers within the header timeout.
        assert_eq!(activity.deadline(limits).map(|d| d.0), Some(opened + limits.header_read));
        // During a request nothing applies but a blocked write.
        let request = InFlight::enter(activity.clone());
        assert_eq!(activity.deadline(limits), None);
        activity.on_write(true);
        assert_eq!(activity.deadline(limits).map(|d| d.0), Some(opened + limits.body_idle));
        activity.on_write(false);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(request);
        // Kept alive between requests: the idle timeout, until the next request's first byte.
        let idle_since = Instant::now();
        assert_eq!(activity.deadline(limits).map(|d| d.0), Some(idle_since + limits.idle));
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.on_read();
        assert_eq!(activity.deadline(limits).map(|d| d.0), Some(Instant::now() + limits.header_read));
        assert_eq!(activity.expired(limits).await, "request headers took too long");
    }
}
