//! The runner-side subcommands of `nix-daemon`'s companions: `substitute`, `push`,
//! `push-daemon`, `hook` and `flush`. Argument parsing only; the work is in
//! `flywheel-substituter`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flywheel_substituter::status::{RunnerStatus, StatusQuery};
use flywheel_substituter::{daemon, LocalStore, PushConfig, Pusher, SubstituteConfig, Substituter};

use super::ServerArgs;

#[derive(Args)]
pub struct SubstituteArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Address to listen on; list `http://ADDRESS` first in nix-daemon's `substituters`.
    #[arg(long, default_value = "127.0.0.1:37515")]
    listen: std::net::SocketAddr,
    /// Directory of the local chunk cache; may be the one a running `flywheel mount` uses.
    #[arg(long, default_value = "/var/cache/flywheel")]
    cache_dir: PathBuf,
    /// Byte quota of the local chunk cache (when this process is the first to open it).
    #[arg(long, default_value_t = 10 << 30)]
    cache_size: u64,
    /// Priority announced to Nix (lower is tried first; cache.nixos.org has 40).
    #[arg(long, default_value_t = 10)]
    priority: u32,
    /// Seconds a narinfo request may wait for the server before answering 404.
    #[arg(long, default_value_t = 3)]
    narinfo_timeout: u64,
    /// Check the arguments (and read the token file), then exit.
    #[arg(long)]
    check_config: bool,
}

pub fn substitute(args: SubstituteArgs) -> anyhow::Result<()> {
    if args.check_config {
        args.server.check()?;
        if args.cache_size == 0 || !args.cache_dir.is_absolute() {
            anyhow::bail!("--cache-dir must be absolute and --cache-size more than 0");
        }
        println!("config is valid");
        return Ok(());
    }
    let mut config = SubstituteConfig::new(args.server.server.clone(), args.server.cache.clone());
    config.token = args.server.token()?;
    config.cache_dir = args.cache_dir;
    config.cache_size = args.cache_size;
    config.priority = args.priority;
    config.narinfo_timeout = Duration::from_secs(args.narinfo_timeout.max(1));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let substituter = Substituter::open(config)?;
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
        println!("Listening on http://{}", listener.local_addr()?);
        flywheel_substituter::serve::run(substituter, listener, super::shutdown_signal()).await?;
        Ok(())
    })
}

/// How to reach the local store and push to the server.
#[derive(Args)]
pub struct PushTarget {
    #[command(flatten)]
    server: ServerArgs,
    /// The local store to push from, such as `local?root=/tmp/chroot` (default: Nix's own).
    #[arg(long)]
    store: Option<String>,
    /// Names of upstream keys whose paths are not pushed (they can be fetched from upstream).
    #[arg(long = "ignore-upstream-key", value_name = "KEY_NAME", default_value = "cache.nixos.org-1")]
    upstream_keys: Vec<String>,
    /// Chunk uploads in flight at once.
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

impl PushTarget {
    fn pusher(&self, closure: bool) -> anyhow::Result<Pusher> {
        let api = self.server.client(self.timeout)?;
        let config = PushConfig { closure, upstream_keys: self.upstream_keys.clone(), jobs: self.jobs.max(1), ..PushConfig::default() };
        Ok(Pusher::new(api, LocalStore::new(self.store.clone())?, config))
    }
}

#[derive(Args)]
pub struct PushArgs {
    #[command(flatten)]
    target: PushTarget,
    /// Push only the paths given, not their closure.
    #[arg(long)]
    no_closure: bool,
    /// Store paths, or symlinks to them (such as `./result`).
    #[arg(required = true)]
    paths: Vec<String>,
}

pub fn push(args: PushArgs) -> anyhow::Result<()> {
    let pusher = args.target.pusher(!args.no_closure)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(pusher.push(&args.paths))?;
    eprintln!(
        "pushed {} of {} paths ({} already cached, {} from upstream, {} as changes to an earlier version); {} NAR bytes, {} of {} chunks uploaded ({} bytes sent)",
        report.pushed.len(),
        report.considered,
        report.already_cached,
        report.skipped_upstream,
        report.pushed_as_changes,
        report.nar_bytes,
        report.chunks_uploaded,
        report.chunks,
        report.uploaded_frame_bytes,
    );
    Ok(())
}

#[derive(Args)]
pub struct PushDaemonArgs {
    #[command(flatten)]
    target: PushTarget,
    /// The unix socket `flywheel hook` and `flywheel flush` talk to.
    #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Milliseconds to wait for more built paths before pushing a batch.
    #[arg(long, default_value_t = 200)]
    batch_delay_ms: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9102.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Check the arguments (and read the token file), then exit.
    #[arg(long)]
    check_config: bool,
}

pub fn push_daemon(args: PushDaemonArgs) -> anyhow::Result<()> {
    if args.check_config {
        args.target.server.check()?;
        if !args.socket.is_absolute() {
            anyhow::bail!("--socket must be an absolute path");
        }
        println!("config is valid");
        return Ok(());
    }
    let pusher = args.target.pusher(true)?;
    let config = daemon::DaemonConfig {
        socket: args.socket,
        batch_delay: Duration::from_millis(args.batch_delay_ms),
        metrics_listen: args.metrics_listen,
        ..daemon::DaemonConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(daemon::run(pusher, config, super::shutdown_signal()))?;
    Ok(())
}

#[derive(Args)]
pub struct HookArgs {
    /// The push daemon's socket.
    #[arg(long, env = "FLYWHEEL_PUSH_SOCKET", default_value = daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
}

/// Never fails: a failing post-build hook would fail the build.
pub fn hook(args: HookArgs) -> anyhow::Result<()> {
    let drv = std::env::var("DRV_PATH").ok();
    let outs = std::env::var("OUT_PATHS").unwrap_or_default();
    match daemon::hook(&args.socket, drv.as_deref(), &outs, Duration::from_secs(2)) {
        daemon::HookOutcome::Failed(err) => eprintln!("flywheel hook: not queued: {err}"),
        daemon::HookOutcome::Queued(_) | daemon::HookOutcome::Nothing => {}
    }
    Ok(())
}

#[derive(Args)]
pub struct FlushArgs {
    /// The push daemon's socket.
    #[arg(long, env = "FLYWHEEL_PUSH_SOCKET", default_value = daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
}

/// Exits non-zero when paths failed to push since the last flush.
pub fn flush(args: FlushArgs) -> anyhow::Result<()> {
    let report = daemon::flush(&args.socket, Duration::from_secs(args.timeout.max(1)))?;
    eprintln!("flushed: {} paths pushed, {} failures", report.pushed, report.failed);
    if let Some(error) = report.error {
        anyhow::bail!("{} pushes failed since the last flush; the first: {error}", report.failed);
    }
    Ok(())
}

#[derive(Args)]
pub struct StatusArgs {
    /// Directory of the local chunk cache.
    #[arg(long, default_value = "/var/cache/flywheel")]
    cache_dir: PathBuf,
    /// Mount point of `flywheel mount`.
    #[arg(long, default_value = "/run/flywheel/store")]
    mountpoint: PathBuf,
    /// URL of the local substituter.
    #[arg(long, default_value = "http://127.0.0.1:37515")]
    substituter: String,
    /// Socket of the push daemon.
    #[arg(long, env = "FLYWHEEL_PUSH_SOCKET", default_value = daemon::DEFAULT_SOCKET)]
    push_socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The runner's state: the chunk cache (size, hit rate of every process sharing it), the mount,
/// the substituter and the push daemon. Exits non-zero when the cache dir cannot be read.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mount = match flywheel_fuse::mount_state(&args.mountpoint) {
        flywheel_fuse::MountState::Mounted => "mounted".to_string(),
        flywheel_fuse::MountState::NotMounted => "not mounted".to_string(),
        flywheel_fuse::MountState::Broken(err) => format!("mounted but not answering ({err}); unmount it with umount -l"),
    };
    let query = StatusQuery {
        cache_dir: args.cache_dir,
        mount: (args.mountpoint, mount),
        substituter: args.substituter,
        push_socket: args.push_socket,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let status = runtime.block_on(RunnerStatus::gather(query))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}
