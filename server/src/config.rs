//! The server's TOML configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flywheel_core::chunk::{ChunkParams, DEFAULT_ZSTD_LEVEL};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

/// Everything `flywheel serve` reads from its config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Base64 of the HS256 secret that signs tokens (as Attic's `token-hs256-secret-base64`).
    /// Give either this or `token-hs256-secret-base64-file`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_hs256_secret_base64: String,
    /// A file holding the base64 secret, so that the config itself holds no secret (and can
    /// live in the Nix store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hs256_secret_base64_file: Option<PathBuf>,
    /// Where chunks, manifests and path records live.
    pub storage: StorageConfig,
    /// FastCDC chunk sizes.
    #[serde(default)]
    pub chunking: ChunkParams,
    /// zstd level of stored chunks.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// The URL clients use to reach this server, for `cache-config` answers. Defaults to the
    /// request's `Host`.
    #[serde(default)]
    pub api_endpoint: Option<String>,
    /// Chunks written or fetched in parallel per request.
    #[serde(default = "default_parallelism")]
    pub chunk_parallelism: usize,
    /// Bytes of chunk frames that the chunk API sent lately, kept in memory for the next
    /// runner that misses them (see [`crate::hot_chunks`]); 0 keeps none.
    #[serde(default = "default_hot_chunk_bytes")]
    pub hot_chunk_bytes: u64,
    /// Garbage collection and retention.
    #[serde(default)]
    pub gc: GcConfig,
    /// Packing cold chunks (see [`crate::compact`]).
    #[serde(default)]
    pub compaction: CompactionConfig,
    /// Timeouts and limits that keep slow or silent clients from holding the server.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The OpenTofu/Terraform state backend.
    #[serde(default)]
    pub tfstate: TfStateConfig,
    /// The Bazel remote cache (gRPC and HTTP).
    #[serde(default)]
    pub bazel: BazelConfig,
    /// Caches declared here, by name: created on start, and brought in line with this config
    /// when they exist (caches made through the API are left alone).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub caches: BTreeMap<String, DeclaredCache>,
}

/// A cache the config declares, so that its signing key comes from a file that only the server
/// reads (a systemd credential) rather than being generated or sent through the API. The server
/// writes it into the cache's record in storage on start, as for every cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeclaredCache {
    /// A file holding the secret signing key in Nix's format (`nix key generate-secret`).
    pub signing_key_file: PathBuf,
    /// Whether anyone may pull without a token.
    #[serde(default)]
    pub public: bool,
    /// Priority announced in `nix-cache-info` (lower is preferred).
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Seconds a path is kept after its last access; the global default when absent.
    #[serde(default)]
    pub retention_period: Option<u32>,
    /// Key names of upstream caches, whose paths clients need not push.
    #[serde(default = "default_upstream_keys")]
    pub upstream_cache_key_names: Vec<String>,
    /// Public keys (`name:base64`) of trusted uploaders, such as a key per CI runner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_uploader_keys: Vec<String>,
    /// Refuse (403) an upload whose path carries no valid signature by one of
    /// `trusted-uploader-keys`.
    #[serde(default)]
    pub require_uploader_signature: bool,
    /// The key read from `signing_key_file`.
    #[serde(skip)]
    pub signing_key: String,
}

/// When paths expire and unused data is swept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GcConfig {
    /// Seconds a path is kept after its last access, for caches without their own retention
    /// period; 0 keeps paths forever (Attic's meaning).
    #[serde(default)]
    pub default_retention_period: u64,
    /// Seconds between garbage collections in the server; 0 runs none (use `flywheel gc`).
    #[serde(default = "default_gc_interval")]
    pub interval: u64,
    /// Unreferenced chunks and manifests younger than this many seconds are kept, so that an
    /// upload still in flight never loses what it stored.
    #[serde(default = "default_grace")]
    pub grace_period: u64,
    /// Seconds between two access records of one path (each is a small write).
    #[serde(default = "default_access_interval")]
    pub access_record_interval: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            default_retention_period: 0,
            interval: default_gc_interval(),
            grace_period: default_grace(),
            access_record_interval: default_access_interval(),
        }
    }
}

/// `[compaction]`: when and how cold chunks are packed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CompactionConfig {
    /// Seconds between compactions in the server; 0 runs none (use `flywheel compact`).
    #[serde(default = "default_compaction_interval")]
    pub interval: u64,
    /// A path is cold once neither read nor published for this many seconds; a chunk object
    /// written within it is left loose too (a new upload counts on it).
    #[serde(default = "default_cold_after")]
    pub cold_after: u64,
    /// Uncompressed bytes of chunks per pack (at most 64 MiB: a pack is made in memory).
    #[serde(default = "default_pack_size")]
    pub pack_size: u64,
    /// Uncompressed bytes per zstd frame in a pack: reading one chunk decompresses its whole
    /// frame; the smaller, the worse the compression (see the README's decision).
    #[serde(default = "default_pack_size")]
    pub frame_size: u64,
    /// The zstd level of packs (1 to 22).
    #[serde(default = "default_pack_zstd_level")]
    pub zstd_level: i32,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            interval: default_compaction_interval(),
            cold_after: default_cold_after(),
            pack_size: default_pack_size(),
            frame_size: default_pack_size(),
            zstd_level: default_pack_zstd_level(),
        }
    }
}

impl CompactionConfig {
    fn check(&self) -> anyhow::Result<()> {
        if !(1..=22).contains(&self.zstd_level) {
            anyhow::bail!("compaction.zstd-level must be between 1 and 22, not {}", self.zstd_level);
        }
        let most = flywheel_core::chunk::pack::MAX_PACK_FRAME_LEN as u64;
        if self.frame_size == 0 || self.frame_size > most {
            anyhow::bail!("compaction.frame-size must be between 1 and {most} bytes");
        }
        // A pack is made in memory.
        if self.pack_size == 0 || self.pack_size > 64 << 20 {
            anyhow::bail!("compaction.pack-size must be between 1 byte and 64 MiB");
        }
        Ok(())
    }
}

fn default_compaction_interval() -> u64 {
    24 * 3600
}
fn default_cold_after() -> u64 {
    3 * 24 * 3600
}
fn default_pack_size() -> u64 {
    4 << 20
}
fn default_pack_zstd_level() -> i32 {
    19
}

fn default_gc_interval() -> u64 {
    12 * 3600
}
fn default_grace() -> u64 {
    6 * 3600
}
fn default_access_interval() -> u64 {
    3600
}

/// Timeouts and limits on connections and requests. Every timeout is in seconds and bounds
/// progress, never the length of a transfer: a NAR of any size streams as long as bytes move.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    /// Seconds from a new connection, or from the first byte of a request on a kept-alive one,
    /// to the end of the request's headers.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: u64,
    /// Seconds a kept-alive connection may wait for its next request.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    /// Seconds the server may wait for the next bytes of a request body, or for the client to
    /// take the next bytes of a response, before it gives up on the request.
    #[serde(default = "default_body_idle_timeout")]
    pub body_idle_timeout: u64,
    /// Bytes per second a request body must average over each `body-idle-timeout` of waiting
    /// for it, so that a trickle cannot hold an upload open forever.
    #[serde(default = "default_body_min_rate")]
    pub body_min_rate: u64,
    /// Seconds a request without a body (narinfo, listings, cache info, ...) may take to be
    /// answered; NAR downloads are left out, since their answer starts only after their
    /// chunks are checked.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: u64,
    /// Connections served at once; further ones wait in the listen backlog. Lowered at start
    /// to fit the process's open file limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// NAR uploads decoded at once (each holds a thread of the blocking pool while it lasts).
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    /// Seconds an upload waits for one of `max-uploads` before it is refused with 503.
    #[serde(default = "default_upload_queue_timeout")]
    pub upload_queue_timeout: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            body_idle_timeout: default_body_idle_timeout(),
            body_min_rate: default_body_min_rate(),
            request_timeout: default_request_timeout(),
            max_connections: default_max_connections(),
            max_uploads: default_max_uploads(),
            upload_queue_timeout: default_upload_queue_timeout(),
        }
    }
}

impl LimitsConfig {
    fn check(&self) -> anyhow::Result<()> {
        let timeouts = [
            ("header-read-timeout", self.header_read_timeout),
            ("idle-timeout", self.idle_timeout),
            ("body-idle-timeout", self.body_idle_timeout),
            ("request-timeout", self.request_timeout),
            ("upload-queue-timeout", self.upload_queue_timeout),
        ];
        for (name, value) in timeouts {
            // Zero would close every connection at once; a day is past any useful bound.
            if !(1..=86_400).contains(&value) {
                anyhow::bail!("limits.{name} must be between 1 and 86400 seconds, not {value}");
            }
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            anyhow::bail!("limits.max-connections must be between 1 and 1000000");
        }
        // The blocking pool has 512 threads; local storage needs some of them for every read.
        if self.max_uploads == 0 || self.max_uploads > 256 {
            anyhow::bail!("limits.max-uploads must be between 1 and 256");
        }
        Ok(())
    }
}

/// The OpenTofu/Terraform state backend (`/_state/v1/{project}/{stack}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TfStateConfig {
    /// Largest state accepted, in bytes; a larger one is refused with 413.
    #[serde(default = "default_tfstate_max_size")]
    pub max_size: u64,
    /// Versions kept per stack, the current one included; older ones are deleted by a later
    /// write (every `keep-versions / 4`-th write of a stack prunes, so up to a quarter more
    /// may be there between two prunes).
    #[serde(default = "default_tfstate_keep_versions")]
    pub keep_versions: usize,
    /// How locks are made exclusive across replicas.
    #[serde(default)]
    pub locking: StateLocking,
}

/// How state locks are made exclusive (see [`crate::tfstate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateLocking {
    /// Conditional creates, unless a probe finds that the store ignores them; then claims.
    #[default]
    Auto,
    /// Conditional creates (`If-None-Match: *`): for stores that check and write atomically,
    /// as AWS S3 and local directories do.
    Conditional,
    /// Claim objects and a listing: for S3 servers that accept `If-None-Match: *` but check it
    /// apart from the write (`s3s-fs`), so that two creates at once can both succeed.
    Claims,
}

impl Default for TfStateConfig {
    fn default() -> Self {
        TfStateConfig {
            max_size: default_tfstate_max_size(),
            keep_versions: default_tfstate_keep_versions(),
            locking: StateLocking::default(),
        }
    }
}

impl TfStateConfig {
    fn check(&self) -> anyhow::Result<()> {
        // A state is read whole into memory for its checksum, so it is bounded by memory.
        if self.max_size == 0 || self.max_size > 1 << 30 {
            anyhow::bail!("tfstate.max-size must be between 1 byte and 1 GiB, not {}", self.max_size);
        }
        if !(1..=10_000).contains(&self.keep_versions) {
            anyhow::bail!("tfstate.keep-versions must be between 1 and 10000, not {}", self.keep_versions);
        }
        Ok(())
    }
}

/// The Bazel remote cache: REAPI over gRPC on a listener of its own, and Bazel's HTTP cache
/// protocol (`/{cache}/ac/{sha256}`, `/{cache}/cas/{sha256}`) on the main one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BazelConfig {
    /// Where the gRPC listener binds (`--remote_cache=grpc://HOST:PORT`); none when unset.
    #[serde(default)]
    pub grpc_listen: Option<std::net::SocketAddr>,
    /// The cache that gRPC requests with an empty `instance_name` go to (Bazel sends the
    /// value of `--remote_instance_name`, empty by default); such requests are refused when
    /// unset.
    #[serde(default)]
    pub default_instance: Option<String>,
    /// Largest CAS blob accepted, in bytes; a larger upload is refused before it is read.
    #[serde(default = "default_bazel_max_blob_size")]
    pub max_blob_size: u64,
    /// Largest action result accepted, in bytes.
    #[serde(default = "default_bazel_max_action_result_size")]
    pub max_action_result_size: u64,
    /// gRPC connections served at once; further ones are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Bytes of ByteStream writes kept in temporary files (`$TMPDIR`) at once, while they
    /// arrive or wait to be resumed; a write that would pass it is refused as exhausted.
    #[serde(default = "default_bazel_spool_max_bytes")]
    pub spool_max_bytes: u64,
}

impl Default for BazelConfig {
    fn default() -> Self {
        BazelConfig {
            grpc_listen: None,
            default_instance: None,
            max_blob_size: default_bazel_max_blob_size(),
            max_action_result_size: default_bazel_max_action_result_size(),
            max_connections: default_max_connections(),
            spool_max_bytes: default_bazel_spool_max_bytes(),
        }
    }
}

impl BazelConfig {
    fn check(&self) -> anyhow::Result<()> {
        if self.max_blob_size == 0 || self.max_blob_size > 1 << 40 {
            anyhow::bail!("bazel.max-blob-size must be between 1 byte and 1 TiB, not {}", self.max_blob_size);
        }
        // Action results are read whole, and go out in one gRPC message.
        if self.max_action_result_size == 0 || self.max_action_result_size > 7 << 20 {
            anyhow::bail!(
                "bazel.max-action-result-size must be between 1 byte and 7 MiB (one gRPC message), not {}",
                self.max_action_result_size
            );
        }
        if self.max_connections == 0 {
            anyhow::bail!("bazel.max-connections must be at least 1");
        }
        if let Some(name) = &self.default_instance {
            flywheel_core::api::v1::validate_cache_name(name)
                .map_err(|e| anyhow::anyhow!("bazel.default-instance: {e}"))?;
        }
        Ok(())
    }
}

/// Four of the largest blobs at once.
fn default_bazel_spool_max_bytes() -> u64 {
    16 << 30
}
/// Toolchain archives and container layers reach a few GiB.
fn default_bazel_max_blob_size() -> u64 {
    4 << 30
}
/// Action results list outputs by digest; stdout and stderr inline are the big part.
fn default_bazel_max_action_result_size() -> u64 {
    4 << 20
}

/// States of large estates run to a few MiB; 32 MiB leaves room and still bounds memory.
fn default_tfstate_max_size() -> u64 {
    32 << 20
}
/// A month of daily applies.
fn default_tfstate_keep_versions() -> usize {
    30
}

/// Slow clients get 10 s for their headers, ten times what a loaded link needs for a few
/// hundred bytes.
fn default_header_read_timeout() -> u64 {
    10
}
/// Nix and reqwest reuse a connection within seconds; a minute keeps it through a pause
/// between two substitutions.
fn default_idle_timeout() -> u64 {
    60
}
/// Long enough for an S3 hiccup on the client's side of a push, short enough that a stalled
/// client frees its upload slot soon.
fn default_body_idle_timeout() -> u64 {
    30
}
/// 1 KiB/s: far below any working link, far above a trickle.
fn default_body_min_rate() -> u64 {
    1024
}
fn default_request_timeout() -> u64 {
    60
}
/// 4096 connections use 4096 descriptors; the NixOS module sets LimitNOFILE=65536, which
/// leaves the rest for storage files and S3 sockets.
fn default_max_connections() -> usize {
    4096
}
/// 64 uploads at full speed already saturate two cores; the rest of the blocking pool stays
/// free for storage reads.
fn default_max_uploads() -> usize {
    64
}
fn default_upload_queue_timeout() -> u64 {
    30
}

/// The object store behind the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", rename_all_fields = "kebab-case", deny_unknown_fields)]
pub enum StorageConfig {
    /// In memory, gone when the process ends: for tests and trying the server out. Every open
    /// within one process shares the same objects; other processes (`flywheel gc`, replicas)
    /// cannot see them.
    Memory {},
    /// A local directory.
    Local {
        /// The directory; created if missing.
        path: PathBuf,
    },
    /// An S3-compatible bucket (AWS, RustFS, MinIO, s3s-fs).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Region; S3-compatible servers usually accept anything.
        #[serde(default = "default_region")]
        region: String,
        /// Endpoint URL, e.g. `http://127.0.0.1:9000`; AWS when absent.
        #[serde(default)]
        endpoint: Option<String>,
        /// Access key id; taken from `AWS_ACCESS_KEY_ID` when absent.
        #[serde(default)]
        access_key_id: Option<String>,
        /// Secret key; taken from `secret-access-key-file` or `AWS_SECRET_ACCESS_KEY` when absent.
        #[serde(default)]
        secret_access_key: Option<String>,
        /// A file holding the secret key, so that it never sits in the config.
        #[serde(default)]
        secret_access_key_file: Option<PathBuf>,
        /// Path-style addressing (`endpoint/bucket/key`), which RustFS and s3s-fs need.
        #[serde(default = "default_true")]
        path_style: bool,
        /// Allow plain `http://` endpoints.
        #[serde(default)]
        allow_http: bool,
        /// Seconds to establish a connection to S3.
        #[serde(default = "default_s3_connect_timeout")]
        connect_timeout: u64,
        /// Seconds one S3 request attempt may take, from connecting to the end of its body.
        #[serde(default = "default_s3_request_timeout")]
        request_timeout: u64,
        /// Retries of one S3 request after its first attempt; 0 disables retries.
        #[serde(default = "default_s3_max_retries")]
        max_retries: usize,
        /// Seconds from a request's first attempt after which no retry starts.
        #[serde(default = "default_s3_retry_timeout")]
        retry_timeout: u64,
        /// First backoff between attempts, in milliseconds; it doubles (with jitter) per retry.
        #[serde(default = "default_s3_backoff_initial_ms")]
        retry_backoff_initial_ms: u64,
        /// Longest backoff between attempts, in milliseconds.
        #[serde(default = "default_s3_backoff_max_ms")]
        retry_backoff_max_ms: u64,
    },
}

/// Timeouts and retries of S3 requests, from the keys of the `[storage]` table for S3.
///
/// object_store retries 5xx answers, 429, 408, refused and dropped connections (and timeouts of
/// idempotent requests, which all of ours are: content-addressed chunks, whole-object JSON
/// writes), and resumes a GET whose body breaks off with a range request for the rest. The bounds
/// here keep that from turning an S3 outage into a hang: a request gives up after
/// `retry-timeout` (plus at most one attempt and one backoff), and the caller answers 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Retry {
    /// Seconds to establish a connection.
    pub connect_timeout: u64,
    /// Seconds one attempt may take, from connecting to the end of the response body.
    pub request_timeout: u64,
    /// Retries of one request after its first attempt.
    pub max_retries: usize,
    /// Seconds from a request's first attempt after which no retry starts.
    pub retry_timeout: u64,
    /// First backoff between attempts, in milliseconds.
    pub retry_backoff_initial_ms: u64,
    /// Longest backoff between attempts, in milliseconds.
    pub retry_backoff_max_ms: u64,
}

impl Default for S3Retry {
    fn default() -> Self {
        S3Retry {
            connect_timeout: default_s3_connect_timeout(),
            request_timeout: default_s3_request_timeout(),
            max_retries: default_s3_max_retries(),
            retry_timeout: default_s3_retry_timeout(),
            retry_backoff_initial_ms: default_s3_backoff_initial_ms(),
            retry_backoff_max_ms: default_s3_backoff_max_ms(),
        }
    }
}

impl S3Retry {
    fn check(&self) -> anyhow::Result<()> {
        if self.connect_timeout == 0 || self.request_timeout == 0 {
            anyhow::bail!("storage connect-timeout and request-timeout must be at least 1 second");
        }
        if self.retry_backoff_initial_ms == 0 || self.retry_backoff_initial_ms > self.retry_backoff_max_ms {
            anyhow::bail!("storage retry-backoff-initial-ms must be at least 1 and at most retry-backoff-max-ms");
        }
        Ok(())
    }

    /// object_store's retry policy for these settings.
    pub fn retry_config(&self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(self.retry_backoff_initial_ms),
                max_backoff: Duration::from_millis(self.retry_backoff_max_ms),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs(self.retry_timeout),
        }
    }

    /// object_store's HTTP client options for these settings.
    pub fn client_options(&self, allow_http: bool) -> object_store::ClientOptions {
        object_store::ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(self.connect_timeout))
            .with_timeout(Duration::from_secs(self.request_timeout))
    }
}

/// A LAN or loopback S3 connects in milliseconds; 5 s rides out a lost SYN (resent after 1 s)
/// and still tells a dead host quickly.
fn default_s3_connect_timeout() -> u64 {
    5
}
/// One attempt moves at most one chunk (256 KiB by default, 16 MiB at most) or one small JSON
/// object, so 30 s means S3 has stalled, not that the object is big.
fn default_s3_request_timeout() -> u64 {
    30
}
/// With one request in five throttled, ten retries leave a chance of about 2e-8 that a request
/// fails; a NAR needs hundreds of them.
fn default_s3_max_retries() -> usize {
    10
}
/// S3 down must be answered with a 503 well before a client, or the server's own
/// `request-timeout` (60 s), gives up. Refused connections use up the retries within seconds;
/// an S3 that takes no connections fails a call after 15 s plus one `connect-timeout`.
fn default_s3_retry_timeout() -> u64 {
    15
}
fn default_s3_backoff_initial_ms() -> u64 {
    100
}
/// object_store's default of 15 s would spend the whole `retry-timeout` in one sleep; 2 s keeps
/// several attempts within it while easing off a throttling S3.
fn default_s3_backoff_max_ms() -> u64 {
    2000
}

impl StorageConfig {
    /// Whether the store does its work in the calling thread when no async runtime is entered
    /// there (local files, memory), so that batches of its calls are best run on threads of
    /// their own (see [`crate::inline_io`]).
    pub fn works_in_calling_thread(&self) -> bool {
        matches!(self, StorageConfig::Local { .. } | StorageConfig::Memory {})
    }

    /// The S3 timeouts and retries, or `None` for local storage.
    pub fn s3_retry(&self) -> Option<S3Retry> {
        match self {
            StorageConfig::Memory {} | StorageConfig::Local { .. } => None,
            StorageConfig::S3 {
                connect_timeout,
                request_timeout,
                max_retries,
                retry_timeout,
                retry_backoff_initial_ms,
                retry_backoff_max_ms,
                ..
            } => Some(S3Retry {
                connect_timeout: *connect_timeout,
                request_timeout: *request_timeout,
                max_retries: *max_retries,
                retry_timeout: *retry_timeout,
                retry_backoff_initial_ms: *retry_backoff_initial_ms,
                retry_backoff_max_ms: *retry_backoff_max_ms,
            }),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_zstd_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}
/// S3 answers a GET in 10-50 ms, so a NAR streams only as fast as the chunks in flight allow:
/// measured against s3s-fs, a 546 MB NAR took 17 s with 16 in flight, 4.6 s with 64 and 2.5 s
/// with 128. 64 keeps one stream's buffers near 6 MB.
pub const DEFAULT_CHUNK_PARALLELISM: usize = 64;
/// The default of `hot-chunk-bytes`: the chunks a fleet's jobs read lately, not whole closures.
pub const DEFAULT_HOT_CHUNK_BYTES: u64 = 64 << 20;

fn default_parallelism() -> usize {
    DEFAULT_CHUNK_PARALLELISM
}
fn default_hot_chunk_bytes() -> u64 {
    DEFAULT_HOT_CHUNK_BYTES
}
fn default_priority() -> i32 {
    41
}
fn default_upstream_keys() -> Vec<String> {
    vec!["cache.nixos.org-1".into()]
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}

impl ServerConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut config: ServerConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        config.read_secret_files().with_context(|| format!("reading the secrets of config {}", path.display()))?;
        config.check().with_context(|| format!("checking config {}", path.display()))?;
        Ok(config)
    }

    /// Reads `token-hs256-secret-base64-file` into the inline secret, and the signing keys of
    /// declared caches.
    pub fn read_secret_files(&mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        match (&self.token_hs256_secret_base64_file, self.token_hs256_secret_base64.is_empty()) {
            (Some(_), false) => {
                anyhow::bail!("give token-hs256-secret-base64 or token-hs256-secret-base64-file, not both")
            }
            (Some(file), true) => {
                let secret = std::fs::read_to_string(file)
                    .with_context(|| format!("reading the token secret from {}", file.display()))?;
                self.token_hs256_secret_base64 = secret.trim().to_string();
            }
            (None, _) => {}
        }
        for (name, cache) in &mut self.caches {
            let key = std::fs::read_to_string(&cache.signing_key_file).with_context(|| {
                format!("reading the signing key of cache {name} from {}", cache.signing_key_file.display())
            })?;
            cache.signing_key = key.trim().to_string();
        }
        Ok(())
    }

    /// Checks values that parse but cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        self.chunking.validate()?;
        self.limits.check()?;
        self.tfstate.check()?;
        self.bazel.check()?;
        self.compaction.check()?;
        if !(1..=19).contains(&self.zstd_level) {
            anyhow::bail!("zstd-level must be between 1 and 19, not {}", self.zstd_level);
        }
        if self.chunk_parallelism == 0 || self.chunk_parallelism > 1024 {
            anyhow::bail!("chunk-parallelism must be between 1 and 1024");
        }
        if self.hot_chunk_bytes > 1 << 40 {
            anyhow::bail!("hot-chunk-bytes must be at most 1 TiB, not {}", self.hot_chunk_bytes);
        }
        if self.token_hs256_secret_base64.is_empty() {
            anyhow::bail!("set token-hs256-secret-base64 or token-hs256-secret-base64-file");
        }
        crate::auth::TokenAuthority::from_base64(&self.token_hs256_secret_base64)?;
        for (name, cache) in &self.caches {
            flywheel_core::api::v1::validate_cache_name(name).with_context(|| format!("caches.{name}"))?;
            flywheel_core::nix::SigningKey::parse(&cache.signing_key).with_context(|| {
                format!("the signing key of cache {name} in {} is not a Nix secret key", cache.signing_key_file.display())
            })?;
            crate::storage::CacheRecord::check_uploader_settings(&cache.trusted_uploader_keys, cache.require_uploader_signature)
                .with_context(|| format!("caches.{name}"))?;
        }
        if let StorageConfig::S3 { secret_access_key: Some(_), secret_access_key_file: Some(_), .. } = &self.storage {
            anyhow::bail!("give the S3 secret key either inline or as a file, not both");
        }
        if let Some(retry) = self.storage.s3_retry() {
            retry.check()?;
        }
        Ok(())
    }

    /// Opens the configured object store.
    pub fn open_store(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        use anyhow::Context;
        match &self.storage {
            StorageConfig::Memory {} => Ok(memory_store()),
            StorageConfig::Local { path } => {
                std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .with_context(|| format!("opening local storage at {}", path.display()))?;
                Ok(Arc::new(store))
            }
            StorageConfig::S3 {
                bucket,
                region,
                endpoint,
                access_key_id,
                secret_access_key,
                secret_access_key_file,
                path_style,
                allow_http,
                ..
            } => {
                let retry = self.storage.s3_retry().unwrap_or_default();
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_virtual_hosted_style_request(!path_style)
                    .with_allow_http(*allow_http)
                    .with_client_options(retry.client_options(*allow_http))
                    .with_retry(retry.retry_config());
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                    if endpoint.starts_with("http://") {
                        builder = builder.with_http_connector(crate::s3_client::QuickAckConnector::new(
                            Duration::from_secs(retry.connect_timeout),
                            Duration::from_secs(retry.request_timeout),
                        ));
                    }
                }
                if let Some(id) = access_key_id {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(secret) = secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                if let Some(file) = secret_access_key_file {
                    let secret = std::fs::read_to_string(file)
                        .with_context(|| format!("reading S3 secret key from {}", file.display()))?;
                    builder = builder.with_secret_access_key(secret.trim());
                }
                Ok(Arc::new(builder.build().context("configuring S3 storage")?))
            }
        }
    }
}

/// The process's in-memory store: one, so that the config's every open (the first start's,
/// the server's) sees the same objects.
fn memory_store() -> Arc<dyn ObjectStore> {
    static STORE: std::sync::OnceLock<Arc<object_store::memory::InMemory>> = std::sync::OnceLock::new();
    STORE.get_or_init(|| Arc::new(object_store::memory::InMemory::new())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_defaults_and_are_checked() {
        let base = "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\n";
        let storage = "[storage]\ntype = 'local'\npath = '/tmp/x'\n";
        let default: ServerConfig = toml::from_str(&format!("{base}{storage}")).unwrap();
        assert_eq!(default.limits.header_read_timeout, 10);
        assert_eq!(default.limits.max_connections, 4096);
        let set: ServerConfig =
            toml::from_str(&format!("{base}[limits]\nidle-timeout = 5\nmax-uploads = 2\n{storage}")).unwrap();
        assert_eq!((set.limits.idle_timeout, set.limits.max_uploads, set.limits.body_idle_timeout), (5, 2, 30));
        set.check().unwrap();
        assert!(toml::from_str::<ServerConfig>(&format!("{base}[limits]\nread-timeout = 5\n{storage}")).is_err());
        let mut bad = set.clone();
        bad.limits.header_read_timeout = 0;
        assert!(bad.check().is_err());
        let mut bad = set.clone();
        bad.limits.max_uploads = 1000;
        assert!(bad.check().is_err());
    }

    #[test]
    fn parses_local_and_s3_and_refuses_unknown_fields() {
        let local: ServerConfig = toml::from_str(
            "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\n[storage]\ntype = 'local'\npath = '/tmp/x'\n",
        )
        .unwrap();
        assert!(matches!(local.storage, StorageConfig::Local { .. }));
        assert_eq!(local.listen, default_listen());
        local.check().unwrap();
        let s3: ServerConfig = toml::from_str(
            "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\n[storage]\ntype = 's3'\nbucket = 'b'\nendpoint = 'http://127.0.0.1:9000'\nallow-http = true\n",
        )
        .unwrap();
        assert!(matches!(s3.storage, StorageConfig::S3 { path_style: true, .. }));
        let memory: ServerConfig = toml::from_str(
            "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\n[storage]\ntype = 'memory'\n",
        )
        .unwrap();
        assert!(matches!(memory.storage, StorageConfig::Memory {}));
        memory.check().unwrap();
        // One store per process: what one open wrote, the next open reads.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            use object_store::ObjectStoreExt;
            let key = object_store::path::Path::from("probe");
            memory.open_store().unwrap().put(&key, bytes::Bytes::from_static(b"x").into()).await.unwrap();
            assert_eq!(memory.open_store().unwrap().get(&key).await.unwrap().bytes().await.unwrap(), bytes::Bytes::from_static(b"x"));
        });
        assert!(toml::from_str::<ServerConfig>(
            "token-hs256-secret-base64 = 'x'\n[storage]\ntype = 'memory'\npath = '/tmp/x'\n"
        )
        .is_err());
        assert!(toml::from_str::<ServerConfig>(
            "token-hs256-secret-base64 = 'x'\nbogus = 1\n[storage]\ntype = 'local'\npath = '/tmp/x'\n"
        )
        .is_err());
        assert!(toml::from_str::<ServerConfig>(
            "token-hs256-secret-base64 = 'x'\n[storage]\ntype = 'ftp'\npath = '/tmp/x'\n"
        )
        .is_err());
        let mut bad = local.clone();
        bad.zstd_level = 40;
        assert!(bad.check().is_err());
        let mut bad = local.clone();
        bad.token_hs256_secret_base64 = "not base64!".into();
        assert!(bad.check().is_err());
        let mut missing = local.clone();
        missing.token_hs256_secret_base64.clear();
        assert!(missing.check().is_err());

        // The secret may come from a file instead.
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{}\n", local.token_hs256_secret_base64)).unwrap();
        let config_file = dir.path().join("server.toml");
        std::fs::write(
            &config_file,
            format!("token-hs256-secret-base64-file = {:?}\n[storage]\ntype = 'local'\npath = '/tmp/x'\n", secret_file),
        )
        .unwrap();
        assert_eq!(ServerConfig::load(&config_file).unwrap().token_hs256_secret_base64, local.token_hs256_secret_base64);
        std::fs::write(
            &config_file,
            format!(
                "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\ntoken-hs256-secret-base64-file = {:?}\n[storage]\ntype = 'local'\npath = '/tmp/x'\n",
                secret_file
            ),
        )
        .unwrap();
        assert!(ServerConfig::load(&config_file).is_err());
    }

    #[test]
    fn declared_caches_check_their_uploader_keys() {
        let base = "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\n[storage]\ntype = 'local'\npath = '/tmp/x'\n";
        let runner = flywheel_core::nix::SigningKey::generate("runner-1").unwrap().verifying_key().to_nix_string();
        let with = |table: &str| {
            let mut config: ServerConfig = toml::from_str(&format!("{base}[caches.ci]\nsigning-key-file = '/k'\n{table}")).unwrap();
            if let Some(cache) = config.caches.get_mut("ci") {
                cache.signing_key = flywheel_core::nix::SigningKey::generate("ci-1").unwrap().to_nix_string();
            }
            config
        };
        let plain = with("");
        assert!(plain.caches["ci"].trusted_uploader_keys.is_empty() && !plain.caches["ci"].require_uploader_signature);
        plain.check().unwrap();
        let set = with(&format!("trusted-uploader-keys = ['{runner}']\nrequire-uploader-signature = true\n"));
        assert_eq!(set.caches["ci"].trusted_uploader_keys, std::slice::from_ref(&runner));
        set.check().unwrap();
        // Listed keys without the requirement are allowed (the first step of turning it on).
        with(&format!("trusted-uploader-keys = ['{runner}']\n")).check().unwrap();
        let err = format!("{:#}", with("require-uploader-signature = true\n").check().unwrap_err());
        assert!(err.contains("caches.ci") && err.contains("needs at least one trusted uploader key"), "{err}");
        let err = format!("{:#}", with("trusted-uploader-keys = ['runner-1:AAAA']\n").check().unwrap_err());
        assert!(err.contains("trusted uploader keys") && err.contains("runner-1"), "{err}");
        assert!(toml::from_str::<ServerConfig>(&format!("{base}[caches.ci]\nsigning-key-file = '/k'\nrequire-uploader-signatures = true\n")).is_err());
    }

    #[test]
    fn s3_retries_have_defaults_and_are_checked() {
        let base = "token-hs256-secret-base64 = 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0'\n";
        let s3 = "[storage]\ntype = 's3'\nbucket = 'b'\nendpoint = 'http://127.0.0.1:9'\nallow-http = true\n";
        let default: ServerConfig = toml::from_str(&format!("{base}{s3}")).unwrap();
        assert_eq!(default.storage.s3_retry(), Some(S3Retry::default()));
        default.check().unwrap();
        let set: ServerConfig =
            toml::from_str(&format!("{base}{s3}retry-timeout = 3\nmax-retries = 2\nretry-backoff-max-ms = 500\n")).unwrap();
        let retry = set.storage.s3_retry().unwrap();
        assert_eq!((retry.retry_timeout, retry.max_retries, retry.retry_backoff_max_ms, retry.connect_timeout), (3, 2, 500, 5));
        set.check().unwrap();
        set.open_store().unwrap();
        let bad: ServerConfig = toml::from_str(&format!("{base}{s3}retry-backoff-initial-ms = 5000\n")).unwrap();
        assert!(bad.check().is_err());
        assert!(toml::from_str::<ServerConfig>(&format!("{base}{s3}retries = 3\n")).is_err());
        let local: ServerConfig = toml::from_str(&format!("{base}[storage]\ntype = 'local'\npath = '/tmp/x'\n")).unwrap();
        assert_eq!(local.storage.s3_retry(), None);
        assert!(toml::from_str::<ServerConfig>(&format!("{base}[storage]\ntype = 'local'\npath = '/x'\nmax-retries = 1\n")).is_err());
    }
}
