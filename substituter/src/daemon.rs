//! The post-build hook mode: a push daemon, the hook that hands it paths, and `flush`.
//!
//! Nix runs the post-build hook after every build and waits for it, and a failing hook fails
//! the build. So the hook only writes the built paths to the daemon's unix socket, waits for
//! the one-line acknowledgement (the paths are queued), and exits 0 whatever happened. The
//! daemon batches what arrives, drops what it pushed already, and pushes in the background
//! (closures, only missing chunks; see [`crate::push`]). `flush` waits until the queue is empty
//! and nothing is in flight, for the end of a CI job.
//!
//! Nix 2.8 gives the hook an empty `OUT_PATHS`, so the hook also sends `DRV_PATH` and the
//! daemon asks the local store for that derivation's outputs.
//!
//! The protocol is one line per request:
//! - `QUEUE <item>...` with items `drv:<path>` or `<path>`; answer `OK <queued>`.
//! - `FLUSH`; answered once idle: `DONE pushed=<n> failed=<n>` and, if paths failed since the
//!   last flush, ` error=<first error>`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_core::metrics::{Collect, Exposition, Registry};
use flywheel_core::{Error, Result};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::push::Pusher;
use crate::retry::RetryPolicy;

/// Default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/flywheel/push.sock";

/// How the daemon batches and retries.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The unix socket to listen on.
    pub socket: PathBuf,
    /// How long to wait for more paths before pushing a batch.
    pub batch_delay: Duration,
    /// Attempts per batch before its paths count as failed.
    pub attempts: u32,
    /// Where to serve Prometheus `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            batch_delay: Duration::from_millis(200),
            attempts: 3,
            metrics_listen: None,
        }
    }
}

#[derive(Default)]
struct State {
    queue: Vec<Item>,
    busy: bool,
    /// Paths pushed by this daemon (roots; their closures went along).
    pushed: HashSet<String>,
    pushed_since_flush: u64,
    failures: Vec<String>,
    totals: Totals,
}

/// Counters since the daemon started, for `/metrics`.
#[derive(Default)]
struct Totals {
    paths_pushed: u64,
    batches_failed: u64,
    nar_bytes: u64,
    chunks_uploaded: u64,
    uploaded_frame_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Item {
    Drv(String),
    Path(String),
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the worker when paths arrive.
    work: tokio::sync::Notify,
    /// Bumped when the daemon becomes idle.
    idle: tokio::sync::watch::Sender<u64>,
}

/// Runs the push daemon until `shutdown` completes; then it finishes the queue and exits.
pub async fn run(pusher: Pusher, config: DaemonConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
    }
    if tokio::net::UnixStream::connect(&config.socket).await.is_ok() {
        return Err(Error::new(
            flywheel_core::ErrorKind::AlreadyExists,
            format!("a push daemon already listens on {}", config.socket.display()),
        ));
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener = tokio::net::UnixListener::bind(&config.socket)
        .map_err(|e| Error::internal(format!("listening on {}: {e}", config.socket.display())))?;
    tracing::info!(socket = %config.socket.display(), "push daemon listening");
    let shared = Arc::new(Shared { state: Mutex::default(), work: tokio::sync::Notify::new(), idle: tokio::sync::watch::channel(0).0 });
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::internal(format!("listening for metrics on {addr}: {e}")))?;
            let shared = shared.clone();
            tracing::info!(%addr, "serving metrics");
            Some(tokio::spawn(flywheel_client::metrics::serve(listener, Registry::with([shared as Arc<dyn Collect>]))))
        }
        None => None,
    };
    let worker = tokio::spawn(worker(pusher, config.clone(), shared.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, shared.clone()));
                }
                Err(err) => tracing::warn!("accepting a connection failed: {err}"),
            },
        }
    }
    tracing::info!("push daemon stopping after the queue is done");
    let _ = std::fs::remove_file(&config.socket);
    wait_idle(&shared).await;
    worker.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    Ok(())
}

impl Collect for Shared {
    fn collect(&self, out: &mut Exposition) {
        let state = self.state.lock();
        let t = &state.totals;
        out.counter("flywheel_push_paths_pushed_total", "Store paths pushed and committed.", t.paths_pushed);
        out.counter("flywheel_push_batches_failed_total", "Batches that failed after every attempt.", t.batches_failed);
        out.counter("flywheel_push_nar_bytes_total", "NAR bytes of the pushed paths.", t.nar_bytes);
        out.counter("flywheel_push_chunks_uploaded_total", "Chunks uploaded (the others were on the server).", t.chunks_uploaded);
        out.counter("flywheel_push_uploaded_bytes_total", "Compressed chunk bytes uploaded.", t.uploaded_frame_bytes);
        out.gauge("flywheel_push_queue_length", "Items waiting to be pushed.", state.queue.len() as f64);
        out.gauge("flywheel_push_busy", "1 while a batch is being pushed.", if state.busy { 1.0 } else { 0.0 });
    }
}

async fn connection(stream: tokio::net::UnixStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = if let Some(rest) = line.strip_prefix("QUEUE") {
            let items: Vec<Item> = rest
                .split_whitespace()
                .map(|w| match w.strip_prefix("drv:") {
                    Some(drv) => Item::Drv(drv.to_string()),
                    None => Item::Path(w.to_string()),
                })
                .collect();
            let n = items.len();
            if n > 0 {
                shared.state.lock().queue.extend(items);
                shared.work.notify_one();
            }
            format!("OK {n}\n")
        } else if line.trim() == "FLUSH" {
            wait_idle(&shared).await;
            let mut state = shared.state.lock();
            let failures = std::mem::take(&mut state.failures);
            let pushed = std::mem::take(&mut state.pushed_since_flush);
            let mut reply = format!("DONE pushed={pushed} failed={}", failures.len());
            if let Some(first) = failures.first() {
                reply.push_str(&format!(" error={}", first.replace('\n', " ")));
            }
            reply.push('\n');
            reply
        } else {
            "ERR unknown request\n".to_string()
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn wait_idle(shared: &Shared) {
    let mut idle = shared.idle.subscribe();
    loop {
        {
            let state = shared.state.lock();
            if state.queue.is_empty() && !state.busy {
                return;
            }
        }
        if idle.changed().await.is_err() {
            return;
        }
    }
}

async fn worker(pusher: Pusher, config: DaemonConfig, shared: Arc<Shared>) {
    loop {
        let notified = shared.work.notified();
        let has_work = {
            let mut state = shared.state.lock();
            let has = !state.queue.is_empty();
            state.busy = has;
            has
        };
        if !has_work {
            shared.idle.send_modify(|n| *n += 1);
            notified.await;
            continue;
        }
        // Let a burst of builds arrive, then take the whole queue.
        tokio::time::sleep(config.batch_delay).await;
        let items: Vec<Item> = {
            let mut state = shared.state.lock();
            let mut seen = HashSet::new();
            state.queue.drain(..).filter(|i| seen.insert(i.clone())).collect()
        };
        let mut paths: Vec<String> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        for item in items {
            match item {
                Item::Path(p) => paths.push(p),
                Item::Drv(drv) => match pusher.store().outputs_of(&drv).await {
                    Ok(outputs) => paths.extend(outputs),
                    Err(err) => failures.push(format!("outputs of {drv}: {err}")),
                },
            }
        }
        {
            let state = shared.state.lock();
            paths.retain(|p| !state.pushed.contains(p));
        }
        paths.sort();
        paths.dedup();
        if !paths.is_empty() {
            let started = Instant::now();
            match RetryPolicy::batch(config.attempts).run("pushing a batch", || pusher.push(&paths)).await {
                Ok(report) => {
                    tracing::info!(
                        paths = paths.len(),
                        pushed = report.pushed.len(),
                        uploaded = report.uploaded_frame_bytes,
                        elapsed = ?started.elapsed(),
                        "batch pushed"
                    );
                    let mut state = shared.state.lock();
                    state.pushed_since_flush += report.pushed.len() as u64;
                    state.totals.paths_pushed += report.pushed.len() as u64;
                    state.totals.nar_bytes += report.nar_bytes;
                    state.totals.chunks_uploaded += report.chunks_uploaded;
                    state.totals.uploaded_frame_bytes += report.uploaded_frame_bytes;
                    state.pushed.extend(paths.iter().cloned());
                }
                Err(err) => {
                    tracing::warn!("pushing a batch failed for good: {err}");
                    shared.state.lock().totals.batches_failed += 1;
                    failures.push(err.to_string());
                }
            }
        }
        shared.state.lock().failures.extend(failures);
    }
}

/// Whether a push daemon answers on `socket`.
pub fn is_running(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// What `flywheel hook` did; it never fails the build, so this is for its log line only.
#[derive(Debug)]
pub enum HookOutcome {
    /// The daemon queued this many items.
    Queued(usize),
    /// Nothing to hand over.
    Nothing,
    /// The daemon could not be reached or did not answer; the paths are not queued.
    Failed(String),
}

/// The post-build hook: hands `DRV_PATH` and `OUT_PATHS` to the daemon at `socket`. It
/// waits at most `timeout` for the daemon and never fails.
pub fn hook(socket: &Path, drv_path: Option<&str>, out_paths: &str, timeout: Duration) -> HookOutcome {
    let mut items: Vec<String> = out_paths.split_whitespace().map(str::to_string).collect();
    if let Some(drv) = drv_path.filter(|d| !d.trim().is_empty()) {
        items.push(format!("drv:{}", drv.trim()));
    }
    if items.is_empty() {
        return HookOutcome::Nothing;
    }
    let result = (|| -> std::io::Result<usize> {
        let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(format!("QUEUE {}\n", items.join(" ")).as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        reply
            .strip_prefix("OK ")
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected answer {reply:?}")))
    })();
    match result {
        Ok(n) => HookOutcome::Queued(n),
        Err(err) => HookOutcome::Failed(format!("push daemon at {}: {err}", socket.display())),
    }
}

/// What `flush` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Paths pushed since the last flush.
    pub pushed: u64,
    /// Batches or derivations that failed since the last flush.
    pub failed: u64,
    /// The first failure's message.
    pub error: Option<String>,
}

/// Waits until the daemon at `socket` has pushed everything queued (at most `timeout`).
pub fn flush(socket: &Path, timeout: Duration) -> Result<FlushReport> {
    let io = |e: std::io::Error| Error::unavailable(format!("push daemon at {}: {e}", socket.display()));
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(b"FLUSH\n").map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(|e| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            Error::unavailable(format!("the push daemon did not finish within {timeout:?}"))
        } else {
            io(e)
        }
    })?;
    let rest = reply
        .trim_end()
        .strip_prefix("DONE ")
        .ok_or_else(|| Error::corrupt(format!("unexpected answer from the push daemon: {reply:?}")))?;
    let (counts, error) = match rest.split_once(" error=") {
        Some((counts, error)) => (counts, Some(error.to_string())),
        None => (rest, None),
    };
    let field = |name: &str| {
        counts
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(FlushReport { pushed: field("pushed"), failed: field("failed"), error })
}
