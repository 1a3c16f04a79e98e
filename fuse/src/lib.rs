//! The lazy FUSE store of the runner.
//!
//! [`mount`] serves a read-only Nix store directory. Any `<hash>-<name>` of the cache can be
//! looked up at once (its manifest comes from the local cache or the server); listing the
//! directory shows the paths known locally. Inside a path, the tree is exactly the NAR's.
//! File contents are fetched on first read, only the chunks covering the read, verified, kept
//! in the sled chunk cache of `flywheel-client` and in an in-memory LRU of hot chunks.
//!
//! Combined with a kernel overlayfs (the mount as lower layer) and `flywheel dump-db`, it makes
//! a Nix store whose paths are valid at once and whose bytes arrive on demand.
#![warn(missing_docs)]

mod background;
pub mod control;
mod errno;
mod files;
mod fs;
mod trace;
mod tree;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flywheel_core::metrics::{Collect, Registry};
use flywheel_client::{ChunkStore, ClientConfig, LocalCacheConfig};
use flywheel_core::{Error, Result};

pub use fs::{FillOrder, FlywheelFs, FsConfig};

/// Everything `flywheel mount` needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Base URL of the server.
    pub server: String,
    /// Cache name.
    pub cache: String,
    /// Bearer token, if the cache needs one.
    pub token: Option<String>,
    /// Directory of the sled chunk cache.
    pub cache_dir: PathBuf,
    /// Byte quota of the chunk cache.
    pub cache_size: u64,
    /// Longest wait for the server; past it, reads fail with EIO.
    pub offline_timeout: Duration,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// FUSE worker threads.
    pub threads: usize,
    /// Bytes of decompressed chunks kept in memory.
    pub hot_bytes: usize,
    /// Where to serve Prometheus `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Byte budget of whole files kept decompressed under `cache_dir/files` for FUSE
    /// passthrough; 0 turns passthrough off.
    pub files_size: u64,
    /// Store paths up to this NAR size are fetched whole in the background once a job reads
    /// them; 0 turns that off.
    pub fill_max_nar_size: u64,
    /// In which order the fill fetches a path.
    pub fill_order: FillOrder,
    /// Background requests allowed in flight while reads wait for the server.
    pub fill_alongside_reads: usize,
    /// The control socket (`flywheel prefetch`, `flywheel save-trace`); `<cache_dir>/control.sock`
    /// when unset.
    pub control_socket: Option<PathBuf>,
    /// A trace key: prefetch what it names at once, record under it, and save the recording
    /// there at unmount.
    pub prefetch: Option<String>,
}

impl MountConfig {
    /// Where the control socket is.
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| self.cache_dir.join(CONTROL_SOCKET))
    }
}

/// File name of the control socket in the cache dir.
pub const CONTROL_SOCKET: &str = "control.sock";

impl MountConfig {
    /// Defaults for everything but the server, cache and mountpoint.
    pub fn new(server: String, cache: String, mountpoint: PathBuf) -> Self {
        MountConfig {
            server,
            cache,
            token: None,
            cache_dir: PathBuf::from("/var/cache/flywheel"),
            cache_size: 10 << 30,
            offline_timeout: Duration::from_secs(10),
            mountpoint,
            threads: 4,
            hot_bytes: 32 << 20,
            metrics_listen: None,
            files_size: 2 << 30,
            fill_max_nar_size: DEFAULT_FILL_MAX_NAR_SIZE,
            fill_order: FillOrder::Nar,
            fill_alongside_reads: 0,
            control_socket: None,
            prefetch: None,
        }
    }
}

/// Default of [`MountConfig::fill_max_nar_size`]: off. Measured in the benchmark's `job`
/// section, the fill never made a job faster by more than noise, and it made a job that opens
/// scattered files one by one slower than substituting first (its requests share the link with
/// the job's reads); traces do the prefetching instead. `--fill-max-nar-size` turns it on.
pub const DEFAULT_FILL_MAX_NAR_SIZE: u64 = 0;

/// Mounts and serves until the filesystem is unmounted or the process gets SIGTERM or SIGINT,
/// which unmount it (lazily if it is busy, so open files keep being answered). A copy of the
/// mount in another mount namespace does not keep it serving more than 2 s after that.
pub fn mount(config: MountConfig) -> Result<()> {
    limit_malloc_arenas();
    let server = ClientConfig {
        server: config.server.clone(),
        cache: config.cache.clone(),
        token: config.token.clone(),
        timeout: config.offline_timeout,
    };
    let store = ChunkStore::open(server, &LocalCacheConfig::new(&config.cache_dir, config.cache_size))?;
    let cache = store.cache().clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(2))
        // Local cache reads run on the blocking pool; a few threads keep the cores busy, and
        // every extra thread costs memory (its stack and allocator arena).
        .max_blocking_threads(8)
        .thread_name("flywheel-fetch")
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("starting the runtime: {e}")))?;
    let fs = FlywheelFs::new(
        store.clone(),
        runtime.handle().clone(),
        FsConfig {
            offline_timeout: config.offline_timeout,
            hot_bytes: config.hot_bytes,
            materialized: (config.files_size > 0).then(|| (config.cache_dir.join("files"), config.files_size)),
            fill_max_nar_size: config.fill_max_nar_size,
            fill_order: config.fill_order,
            fill_alongside_reads: config.fill_alongside_reads,
        },
    );
    let control_path = config.control_socket_path();
    if let Err(err) = control::serve(fs.inner().clone(), &control_path, runtime.handle()) {
        // The mount works without it; only `flywheel prefetch` and `save-trace` do not.
        tracing::warn!("no control socket: {err}");
    }
    if let Some(key) = &config.prefetch {
        let (inner, key) = (fs.inner().clone(), key.clone());
        runtime.spawn(async move {
            if let Err(err) = control::prefetch(&inner, &key, false).await {
                tracing::warn!(key, "prefetch failed: {err}");
            }
        });
    }
    let saver = config.prefetch.is_some().then(|| fs.inner().clone());
    if let Some(addr) = config.metrics_listen {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| Error::internal(format!("listening for metrics on {addr}: {e}")))?;
        let registry = Registry::with([fs.metrics(), Arc::new(store.clone()) as Arc<dyn Collect>]);
        runtime.spawn(flywheel_client::metrics::serve(listener, registry));
        tracing::info!(%addr, "serving metrics");
    }
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName(format!("flywheel:{}", config.cache)),
        fuser::MountOption::Subtype("flywheel".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::Exec,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
    ];
    // Builders and nix-daemon run as other users than the mount.
    options.acl = fuser::SessionACL::All;
    options.n_threads = Some(config.threads.max(1));
    options.clone_fd = true;
    let fs_handle = fs.clone();
    let mut session = fuser::Session::new(fs, &config.mountpoint, &options)
        .map_err(|e| Error::internal(format!("mounting on {}: {e}", config.mountpoint.display())))?;
    fs_handle.start_notifications(session.notifier());
    let mut unmounter = session.unmount_callable();
    let mountpoint = config.mountpoint.clone();
    let (ended, ending) = std::sync::mpsc::channel::<Ending>();
    let unmounted = ended.clone();
    runtime.spawn(async move {
        wait_for_signal().await;
        tracing::info!(mountpoint = %mountpoint.display(), "signal received, unmounting");
        match unmounter.unmount() {
            Ok(()) => {
                // The session ends when the kernel drops the filesystem, at once unless a copy
                // of the mount lives on in another mount namespace: a process that unshared
                // its mounts while this one was mounted (Nix does, for a store under another
                // root or a read-only /nix/store) keeps it until that process exits, which may
                // be never. Asked to stop, the mount stops; the copy then answers ENOTCONN.
                tokio::time::sleep(UNMOUNTED_GRACE).await;
                tracing::warn!(
                    "unmounted here, but another mount namespace still holds the filesystem; exiting anyway, which cuts it off there"
                );
                let _ = unmounted.send(Ending::Unmounted);
            }
            Err(err) => {
                tracing::warn!("unmount failed ({err}); detaching lazily");
                lazy_unmount(&mountpoint);
            }
        }
    });
    tracing::info!(mountpoint = %config.mountpoint.display(), "mounted");
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let result = session.run().map_err(|e| Error::internal(format!("FUSE session failed: {e}")));
            let _ = ended.send(Ending::Session(result));
        })
        .map_err(|e| Error::internal(format!("starting the FUSE session: {e}")))?;
    let result = match ending.recv() {
        Ok(Ending::Session(result)) => result,
        Ok(Ending::Unmounted) => Ok(()),
        Err(_) => Err(Error::internal("the FUSE session thread ended without a word")),
    };
    if let Some(inner) = saver {
        match runtime.block_on(control::save(&inner, None)) {
            Ok(saved) => tracing::info!("{}", saved.message),
            Err(err) => tracing::warn!("saving the access trace failed: {err}"),
        }
    }
    let _ = std::fs::remove_file(&control_path);
    if let Err(err) = cache.flush() {
        tracing::warn!("flushing the chunk cache failed: {err}");
    }
    drop(runtime);
    result
}

/// glibc gives each thread that allocates an arena of its own and keeps what is freed there.
/// Chunk buffers (16 to 256 KiB) are allocated on one thread and freed on another, so with a
/// dozen threads freed memory piles up per arena as resident memory. Two arenas keep the
/// daemon's RSS close to what it holds live, and a fixed mmap threshold keeps read replies and
/// materialization windows (up to megabytes) out of the arenas: glibc otherwise raises the
/// threshold after the first such buffer is freed, and later ones stay resident.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the mount starts threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
    }
}

/// How long the FUSE session may outlive a successful unmount before the mount exits anyway.
const UNMOUNTED_GRACE: Duration = Duration::from_secs(2);

/// Why [`mount`] stops serving.
enum Ending {
    /// The kernel dropped the filesystem and the FUSE session returned.
    Session(Result<()>),
    /// The mount point was unmounted, and the session outlived [`UNMOUNTED_GRACE`].
    Unmounted,
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn lazy_unmount(mountpoint: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else { return };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        tracing::warn!("lazy unmount failed: {}", std::io::Error::last_os_error());
    }
}

/// What `flywheel status` reports about a mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    /// A flywheel FUSE filesystem is mounted there and answers.
    Mounted,
    /// Nothing flywheel is mounted there.
    NotMounted,
    /// Mounted, but it does not answer (its process died: `umount -l` it).
    Broken(String),
}

/// Looks `mountpoint` up in this process's mount table and checks that it answers.
pub fn mount_state(mountpoint: &std::path::Path) -> MountState {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return MountState::NotMounted };
    // Fields: id parent major:minor root mount-point options... - fstype source options;
    // octal escapes (\040 for a space) in paths.
    let wanted = mountpoint.to_string_lossy().replace(' ', "\\040");
    let mounted = table.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else { return false };
        let mut fields = right.split(' ');
        let (fstype, source) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
        // The type is `fuse.flywheel` or plain `fuse`, depending on how it was mounted; the
        // source is always the FSName, `flywheel:<cache>`.
        left.split(' ').nth(4) == Some(wanted.as_str()) && fstype.starts_with("fuse") && source.starts_with("flywheel:")
    });
    if !mounted {
        return MountState::NotMounted;
    }
    match std::fs::read_dir(mountpoint) {
        Ok(_) => MountState::Mounted,
        Err(err) => MountState::Broken(err.to_string()),
    }
}
