//! `flywheel status`: the runner's state in one report, as text for people and JSON for
//! scripts (the JSON's shape is an interface; add fields, do not rename them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flywheel_client::{ChunkCache, LocalCacheConfig};
use flywheel_core::Result;
use serde::Serialize;

use crate::daemon;

/// The runner's state: the chunk cache, the mount, the substituter and the push daemon.
#[derive(Debug, Serialize)]
pub struct RunnerStatus {
    /// Directory of the chunk cache (in the JSON as `cache.dir`, when it exists).
    #[serde(skip)]
    pub cache_dir: PathBuf,
    /// The chunk cache, or `None` when its directory does not exist.
    pub cache: Option<CacheStatus>,
    /// The lazy mount.
    pub mount: MountStatus,
    /// The local substituter.
    pub substituter: SubstituterStatus,
    /// The push daemon.
    pub push_daemon: PushDaemonStatus,
}

/// The chunk cache's size and hit rate, over every process sharing it.
#[derive(Debug, Serialize)]
pub struct CacheStatus {
    /// Its directory.
    pub dir: PathBuf,
    /// Whether a running daemon owns it (then the figures are that daemon's).
    pub owned_by_a_daemon: bool,
    /// Bytes stored.
    pub used_bytes: u64,
    /// The owner's byte quota; unknown when no daemon has it open.
    pub quota_bytes: Option<u64>,
    /// Lookups answered from the cache since the owner opened it.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// `hits / (hits + misses)`, or `None` before the first lookup.
    pub hit_ratio: Option<f64>,
    /// Entries dropped because they failed verification.
    pub corrupt: u64,
    /// Entries evicted to stay under the quota.
    pub evictions: u64,
}

/// The lazy mount's state, as the caller found it (the FUSE crate knows how to look).
#[derive(Debug, Serialize)]
pub struct MountStatus {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// "mounted", "not mounted", or what is wrong.
    pub state: String,
}

/// The local substituter's state.
#[derive(Debug, Serialize)]
pub struct SubstituterStatus {
    /// Its URL.
    pub url: String,
    /// "up (...)" with what it announces, or "down: why".
    pub state: String,
}

/// The push daemon's state.
#[derive(Debug, Serialize)]
pub struct PushDaemonStatus {
    /// Its socket.
    pub socket: PathBuf,
    /// "running" or "not running".
    pub state: String,
}

/// Where to look for each part of the runner.
#[derive(Debug, Clone)]
pub struct StatusQuery {
    /// Directory of the chunk cache.
    pub cache_dir: PathBuf,
    /// The mount, with its state as the FUSE crate found it.
    pub mount: (PathBuf, String),
    /// URL of the local substituter.
    pub substituter: String,
    /// Socket of the push daemon.
    pub push_socket: PathBuf,
}

impl RunnerStatus {
    /// Looks at each part; only a cache dir that exists but cannot be opened is an error.
    pub async fn gather(query: StatusQuery) -> Result<Self> {
        let cache = if query.cache_dir.is_dir() { Some(cache_status(&query.cache_dir)?) } else { None };
        let substituter = match flywheel_client::api::probe_binary_cache(&query.substituter, Duration::from_secs(2)).await {
            Ok(info) => format!("up (StoreDir: {}, Priority: {})", info.store_dir, info.priority),
            Err(err) => format!("down: {err}"),
        };
        let push = if daemon::is_running(&query.push_socket) { "running" } else { "not running" };
        Ok(RunnerStatus {
            cache_dir: query.cache_dir,
            cache,
            mount: MountStatus { mountpoint: query.mount.0, state: query.mount.1 },
            substituter: SubstituterStatus { url: query.substituter, state: substituter },
            push_daemon: PushDaemonStatus { socket: query.push_socket, state: push.to_string() },
        })
    }

    /// The report for people, one line per part.
    pub fn to_text(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        let mut lines = Vec::new();
        match &self.cache {
            Some(c) => {
                let quota = c.quota_bytes.map(|q| format!(" of {:.2} GB", gb(q))).unwrap_or_default();
                let owner = if c.owned_by_a_daemon { "shared with the running daemons" } else { "no daemon has it open" };
                lines.push(format!("chunk cache  {}: {:.2} GB{quota} ({owner})", c.dir.display(), gb(c.used_bytes)));
                lines.push(match c.hit_ratio {
                    Some(ratio) => format!(
                        "hit rate     {:.1}% ({} hits, {} misses since the owner opened it; {} corrupt entries dropped, {} evictions)",
                        ratio * 100.0,
                        c.hits,
                        c.misses,
                        c.corrupt,
                        c.evictions
                    ),
                    None => "hit rate     no lookups since the owner opened it".to_string(),
                });
            }
            None => lines.push(format!("chunk cache  {}: does not exist", self.cache_dir.display())),
        }
        lines.push(format!("mount        {}: {}", self.mount.mountpoint.display(), self.mount.state));
        lines.push(format!("substituter  {}: {}", self.substituter.url, self.substituter.state));
        lines.push(format!("push daemon  {}: {}", self.push_daemon.socket.display(), self.push_daemon.state));
        lines.join("\n") + "\n"
    }
}

fn cache_status(dir: &Path) -> Result<CacheStatus> {
    // Joins the owner's cache through its socket; with no owner running, this process owns it
    // for a moment (and the quota shown is the database's size only).
    let cache = ChunkCache::open(&LocalCacheConfig::new(dir, u64::MAX))
        .map_err(|e| e.context(format!("opening the chunk cache in {}", dir.display())))?;
    let stats = cache.shared_stats();
    let lookups = stats.hits + stats.misses;
    Ok(CacheStatus {
        dir: dir.to_path_buf(),
        owned_by_a_daemon: !cache.is_owner(),
        used_bytes: cache.used_bytes(),
        quota_bytes: if cache.is_owner() { None } else { Some(cache.quota()) },
        hits: stats.hits,
        misses: stats.misses,
        hit_ratio: if lookups == 0 { None } else { Some(stats.hits as f64 / lookups as f64) },
        corrupt: stats.corrupt,
        evictions: stats.evictions,
    })
}
