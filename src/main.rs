//! `flywheel`: one binary, a subcommand per role. It parses arguments and wires the libraries
//! together; the work lives in the crates.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flywheel_server::auth::{AtticClaim, Permissions, StateClaim, StatePermissions};
use flywheel_server::{bootstrap, ServerConfig};
use runner::{FlushArgs, HookArgs, PushArgs, PushDaemonArgs, StatusArgs, SubstituteArgs};

mod ops;
mod runner;

#[derive(Parser)]
#[command(name = "flywheel", version, about = "Nix store accelerator for CI runners")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cache server.
    Serve(ServeArgs),
    /// Manage tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mount a cache as a lazy, read-only store directory (FUSE).
    Mount(MountArgs),
    /// Print the registration of a closure for `nix-store --load-db`.
    DumpDb(DumpDbArgs),
    /// Make closures valid in the local Nix database at once, for a lazy mount to serve.
    Lazy(LazyArgs),
    /// Ask a running mount to prefetch what the last jobs with this trace key read, and to
    /// record this job's reads under the key.
    Prefetch(PrefetchArgs),
    /// Ask a running mount to save what this job read under its trace key.
    SaveTrace(SaveTraceArgs),
    /// Run the local substituter: a binary cache for nix-daemon backed by the chunk cache.
    Substitute(SubstituteArgs),
    /// Push store paths (and their closure), uploading only the chunks the server lacks.
    Push(PushArgs),
    /// Run the push daemon that `flywheel hook` hands built paths to.
    PushDaemon(PushDaemonArgs),
    /// Post-build hook: hand the built paths to the push daemon and exit 0 at once.
    Hook(HookArgs),
    /// Wait until the push daemon has pushed everything queued.
    Flush(FlushArgs),
    /// Show the runner's state: chunk cache size and hit rate, mount, substituter, push daemon.
    Status(StatusArgs),
    /// Check every stored chunk; take paths with missing or corrupt chunks out of service.
    Fsck(ops::FsckArgs),
    /// Expire paths past their retention and delete unreferenced manifests, chunks and packs.
    Gc(ops::GcArgs),
    /// Pack the chunks of paths nobody has read for a while, compressed together.
    Compact(ops::CompactArgs),
    /// Inspect OpenTofu/Terraform states, roll one back, or break a stale lock.
    #[command(subcommand)]
    State(ops::StateCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Config file. Without one, the config in --data-dir is used, and written on first start.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Where the zero-configuration server keeps its config and data.
    #[arg(long, default_value = "./flywheel-data")]
    data_dir: PathBuf,
    /// Address to listen on, overriding the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Check the config and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token, like `atticadm make-token`.
    Mint(MintArgs),
}

#[derive(Args)]
struct MintArgs {
    /// The server's config file (its token secret signs the token).
    #[arg(long, short)]
    config: PathBuf,
    /// Who the token is for.
    #[arg(long)]
    sub: String,
    /// How long it is valid, e.g. `30d`, `12h`, `1y`.
    #[arg(long)]
    validity: humantime::Duration,
    /// Cache patterns (`*` matches any run of characters) the holder may pull from.
    #[arg(long, value_name = "PATTERN")]
    pull: Vec<String>,
    /// Cache patterns the holder may push to.
    #[arg(long, value_name = "PATTERN")]
    push: Vec<String>,
    /// Cache patterns the holder may delete paths from.
    #[arg(long, value_name = "PATTERN")]
    delete: Vec<String>,
    /// Cache patterns the holder may create.
    #[arg(long, value_name = "PATTERN")]
    create_cache: Vec<String>,
    /// Cache patterns the holder may configure.
    #[arg(long, value_name = "PATTERN")]
    configure_cache: Vec<String>,
    /// Cache patterns whose retention the holder may change.
    #[arg(long, value_name = "PATTERN")]
    configure_cache_retention: Vec<String>,
    /// Cache patterns the holder may destroy.
    #[arg(long, value_name = "PATTERN")]
    destroy_cache: Vec<String>,
    /// Stack patterns (`project/stack`, `*` matches any run of characters) whose
    /// OpenTofu/Terraform state the holder may read.
    #[arg(long, value_name = "PATTERN")]
    state_read: Vec<String>,
    /// Stack patterns whose state the holder may write, delete and roll back.
    #[arg(long, value_name = "PATTERN")]
    state_write: Vec<String>,
    /// Stack patterns whose state the holder may lock and unlock (force-unlock included).
    #[arg(long, value_name = "PATTERN")]
    state_lock: Vec<String>,
    /// Stack patterns the holder may read, write and lock: what `tofu apply` needs.
    #[arg(long, value_name = "PATTERN")]
    state: Vec<String>,
}

/// Has glibc's malloc map every allocation of 1 MiB or more on its own and give it back when
/// freed. Left to itself, glibc raises that threshold to the size of each large block freed,
/// after which pack frames, compression tables and buffers of a few MiB come from per-thread
/// heaps that keep their pages: a compaction's peak RSS was 72 MiB at zstd level 3 and 95 MiB
/// at level 19 that way, against 32 and 57 MiB with the threshold fixed (measured with
/// `MALLOC_MMAP_THRESHOLD_`). Chunks (at most 256 KiB) stay below it. An operator's own
/// `MALLOC_MMAP_THRESHOLD_` is left to rule.
fn bound_heap_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; no other thread runs yet (it is
        // called before any runtime starts).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The cache host's commands, where it was measured; the runner's keep glibc's defaults.
    if matches!(cli.command, Command::Serve(_) | Command::Fsck(_) | Command::Gc(_) | Command::Compact(_)) {
        bound_heap_growth();
    }
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(TokenCommand::Mint(args)) => mint(args),
        Command::Mount(args) => mount(args),
        Command::DumpDb(args) => dump_db(args),
        Command::Lazy(args) => lazy(args),
        Command::Prefetch(args) => prefetch(args),
        Command::SaveTrace(args) => save_trace(args),
        Command::Substitute(args) => runner::substitute(args),
        Command::Push(args) => runner::push(args),
        Command::PushDaemon(args) => runner::push_daemon(args),
        Command::Hook(args) => runner::hook(args),
        Command::Flush(args) => runner::flush(args),
        Command::Status(args) => runner::status(args),
        Command::Fsck(args) => ops::fsck(args),
        Command::Gc(args) => ops::gc(args),
        Command::Compact(args) => ops::compact(args),
        Command::State(command) => ops::state(command),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (mut config, first_start) = match &args.config {
        Some(path) => (ServerConfig::load(path)?, None),
        None => bootstrap::load_or_create(&args.data_dir)?,
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.check_config {
        config.open_store().context("opening storage")?;
        println!("config is valid");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        if let Some(config_path) = first_start {
            let created = bootstrap::create_default_cache(&config, config_path).await?;
            println!("First start: wrote {}", created.config_path.display());
            println!("Created cache '{}' with public key {}", bootstrap::DEFAULT_CACHE, created.public_key);
            println!("Admin token (shown once, keep it safe):\n{}", created.admin_token);
        }
        let storage = flywheel_server::storage::Storage::new(config.open_store().context("opening storage")?);
        bootstrap::apply_declared_caches(&config, &storage).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        tracing::info!(listen = %config.listen, "serving");
        println!("Listening on http://{}", listener.local_addr()?);
        flywheel_server::serve(config, listener, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn mint(args: MintArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(&args.config)?;
    let mut caches = AtticClaim::default();
    type Grant<'a> = (&'a Vec<String>, fn(&mut Permissions));
    let grants: [Grant; 7] = [
        (&args.pull, |p| p.pull = true),
        (&args.push, |p| p.push = true),
        (&args.delete, |p| p.delete = true),
        (&args.create_cache, |p| p.create_cache = true),
        (&args.configure_cache, |p| p.configure_cache = true),
        (&args.configure_cache_retention, |p| p.configure_cache_retention = true),
        (&args.destroy_cache, |p| p.destroy_cache = true),
    ];
    for (patterns, grant) in grants {
        for pattern in patterns {
            caches.grant(pattern, grant)?;
        }
    }
    let mut stacks = StateClaim::default();
    type StateGrant<'a> = (&'a Vec<String>, fn(&mut StatePermissions));
    let state_grants: [StateGrant; 4] = [
        (&args.state_read, |p| p.read = true),
        (&args.state_write, |p| p.write = true),
        (&args.state_lock, |p| p.lock = true),
        (&args.state, |p| *p = StatePermissions { read: true, write: true, lock: true }),
    ];
    for (patterns, grant) in state_grants {
        for pattern in patterns {
            stacks.grant(pattern, grant)?;
        }
    }
    if caches.caches.is_empty() && stacks.is_empty() {
        anyhow::bail!("grant at least one permission (--pull, --push, ..., --state, ...)");
    }
    let validity = args.validity.as_secs();
    let token = bootstrap::mint(&config, &args.sub, validity, caches, stacks)?;
    println!("{token}");
    Ok(())
}

/// Where a runner-side command finds the server.
#[derive(Args)]
struct ServerArgs {
    /// Base URL of the server, e.g. `http://cache:8080`.
    #[arg(long)]
    server: String,
    /// Cache name.
    #[arg(long)]
    cache: String,
    /// File holding a token (JWT) that may pull from the cache.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl ServerArgs {
    /// Checks what can be checked without the network: the URL's form, the cache name, and
    /// that the token file reads.
    fn check(&self) -> anyhow::Result<()> {
        let scheme_ok = ["http://", "https://"].iter().any(|s| self.server.starts_with(s) && self.server.len() > s.len());
        if !scheme_ok {
            anyhow::bail!("--server {:?} is not an http:// or https:// URL", self.server);
        }
        flywheel_core::api::v1::validate_cache_name(&self.cache)?;
        if self.token_file.is_some() && self.token()?.is_none_or(|t| t.is_empty()) {
            anyhow::bail!("the token file is empty");
        }
        Ok(())
    }

    /// A client of the cache that waits `timeout_secs` (at least 1) per request.
    fn client(&self, timeout_secs: u64) -> anyhow::Result<flywheel_client::ApiClient> {
        Ok(flywheel_client::ApiClient::new(flywheel_client::ClientConfig {
            server: self.server.clone(),
            cache: self.cache.clone(),
            token: self.token()?,
            timeout: std::time::Duration::from_secs(timeout_secs.max(1)),
        })?)
    }

    fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(token.trim().to_string()))
    }
}

#[derive(Args)]
struct MountArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Directory of the local chunk cache (pack files of chunk frames and their sled index); shared with other processes
    /// opening it (the first owns it, the others go through its socket).
    #[arg(long, default_value = "/var/cache/flywheel")]
    cache_dir: PathBuf,
    /// Byte quota of the local chunk cache.
    #[arg(long, default_value_t = 10 << 30)]
    cache_size: u64,
    /// Seconds to wait for the server before a read fails with EIO.
    #[arg(long, default_value_t = 10)]
    offline_timeout: u64,
    /// Byte budget for whole files kept decompressed under `<cache-dir>/files`, which later
    /// opens read through FUSE passthrough at the disk's own speed; 0 turns this off.
    #[arg(long, default_value_t = 2 << 30)]
    files_size: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9101.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Store paths up to this NAR size are fetched whole in the background once a job reads
    /// from them (unless a trace covers them); 0 turns that off.
    #[arg(long, default_value_t = flywheel_fuse::DEFAULT_FILL_MAX_NAR_SIZE)]
    fill_max_nar_size: u64,
    /// In which order the fill fetches a path: `nar` (the NAR's order) or `small-files-first`.
    #[arg(long, default_value = "nar", value_parser = ["nar", "small-files-first"])]
    fill_order: String,
    /// Background requests allowed in flight while the job's reads wait for the server (0: the
    /// fill pauses while any read waits).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=4))]
    fill_alongside_reads: u16,
    /// The control socket for `flywheel prefetch` and `save-trace`; default
    /// `<cache-dir>/control.sock`.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Prefetch what the access trace stored under this key names, record this mount's reads
    /// under it, and save them there at unmount.
    #[arg(long, value_name = "KEY")]
    prefetch: Option<String>,
    /// Where to mount.
    mountpoint: PathBuf,
    /// Check the arguments (and read the token file), then exit without mounting.
    #[arg(long)]
    check_config: bool,
}

fn mount(args: MountArgs) -> anyhow::Result<()> {
    if let Some(key) = &args.prefetch {
        flywheel_core::api::v1::traces::validate_trace_key(key)?;
    }
    if args.check_config {
        args.server.check()?;
        if !args.mountpoint.is_absolute() || !args.cache_dir.is_absolute() {
            anyhow::bail!("the mount point and --cache-dir must be absolute paths");
        }
        if args.cache_size == 0 {
            anyhow::bail!("--cache-size must be more than 0");
        }
        println!("config is valid");
        return Ok(());
    }
    let mut config = flywheel_fuse::MountConfig::new(args.server.server.clone(), args.server.cache.clone(), args.mountpoint);
    config.token = args.server.token()?;
    config.cache_dir = args.cache_dir;
    config.cache_size = args.cache_size;
    config.offline_timeout = std::time::Duration::from_secs(args.offline_timeout.max(1));
    config.metrics_listen = args.metrics_listen;
    config.files_size = args.files_size;
    config.fill_max_nar_size = args.fill_max_nar_size;
    config.fill_order = if args.fill_order == "small-files-first" { flywheel_fuse::FillOrder::SmallFilesFirst } else { flywheel_fuse::FillOrder::Nar };
    config.fill_alongside_reads = usize::from(args.fill_alongside_reads);
    config.control_socket = args.control_socket;
    config.prefetch = args.prefetch;
    flywheel_fuse::mount(config)?;
    Ok(())
}

/// Where a running mount listens for control requests.
#[derive(Args)]
struct ControlArgs {
    /// The mount's control socket; default `<cache-dir>/control.sock`.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// The mount's cache dir, to find its control socket in.
    #[arg(long, default_value = "/var/cache/flywheel")]
    cache_dir: PathBuf,
}

impl ControlArgs {
    fn socket(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| self.cache_dir.join(flywheel_fuse::CONTROL_SOCKET))
    }

    /// Sends `request` to the mount and prints its answer.
    fn ask(&self, request: flywheel_fuse::control::ControlRequest) -> anyhow::Result<()> {
        let answer = flywheel_fuse::control::request(&self.socket(), &request)?;
        println!("{}", answer.message);
        Ok(())
    }
}

#[derive(Args)]
struct PrefetchArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Answer only once everything the trace names is fetched.
    #[arg(long)]
    wait: bool,
    /// The trace key, such as the job's name.
    key: String,
}

fn prefetch(args: PrefetchArgs) -> anyhow::Result<()> {
    flywheel_core::api::v1::traces::validate_trace_key(&args.key)?;
    args.control.ask(flywheel_fuse::control::ControlRequest::Prefetch { key: args.key, wait: args.wait })
}

#[derive(Args)]
struct SaveTraceArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The trace key; by default the one `flywheel prefetch` (or `mount --prefetch`) named.
    key: Option<String>,
}

fn save_trace(args: SaveTraceArgs) -> anyhow::Result<()> {
    if let Some(key) = &args.key {
        flywheel_core::api::v1::traces::validate_trace_key(key)?;
    }
    args.control.ask(flywheel_fuse::control::ControlRequest::SaveTrace { key: args.key })
}

#[derive(Args)]
struct LazyArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Seconds to wait for the server per request.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The Nix store to register in (`nix-store --store`), when not the machine's own.
    #[arg(long)]
    store: Option<String>,
    /// The `nix-store` to run.
    #[arg(long, default_value = "nix-store")]
    nix_store: PathBuf,
    /// A public key (`name:base64`) whose signature makes a narinfo trusted; by default the
    /// `trusted-public-keys` of nix.conf.
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// Register without checking signatures.
    #[arg(long)]
    no_check_sigs: bool,
    /// Then ask the mount to prefetch what this trace key names (see `flywheel prefetch`).
    #[arg(long, value_name = "KEY")]
    prefetch: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// Store paths (full paths or base names) whose closures to register.
    #[arg(required = true)]
    paths: Vec<String>,
}

fn lazy(args: LazyArgs) -> anyhow::Result<()> {
    use flywheel_substituter::lazy;
    if let Some(key) = &args.prefetch {
        flywheel_core::api::v1::traces::validate_trace_key(key)?;
    }
    let trusted_keys = if args.no_check_sigs { Vec::new() } else { lazy::trusted_keys(&args.trusted_keys)? };
    let api = args.server.client(args.timeout)?;
    let config = lazy::LazyConfig { nix_store: args.nix_store, store: args.store, trusted_keys, check_sigs: !args.no_check_sigs };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(lazy::register(&api, &args.paths, &config))?;
    println!(
        "registered {} paths; {} of the closure's {} were valid already",
        report.registered, report.already_valid, report.closure
    );
    if let Some(key) = args.prefetch {
        args.control.ask(flywheel_fuse::control::ControlRequest::Prefetch { key, wait: false }).context("asking the mount to prefetch")?;
    }
    Ok(())
}

#[derive(Args)]
struct DumpDbArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Seconds to wait for the server per request.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Store paths (full paths or base names) whose closure to register.
    #[arg(required = true)]
    paths: Vec<String>,
}

fn dump_db(args: DumpDbArgs) -> anyhow::Result<()> {
    use flywheel_client::dump_db;
    let api = args.server.client(args.timeout)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let text = runtime.block_on(dump_db::dump(&api, &args.paths))?;
    use std::io::Write;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}
