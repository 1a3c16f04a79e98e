//! The server's TOML configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Garbage collection and retention.
    #[serde(default)]
    pub gc: GcConfig,
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

fn default_gc_interval() -> u64 {
    12 * 3600
}
fn default_grace() -> u64 {
    6 * 3600
}
fn default_access_interval() -> u64 {
    3600
}

/// The object store behind the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", rename_all_fields = "kebab-case", deny_unknown_fields)]
pub enum StorageConfig {
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
    },
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

fn default_parallelism() -> usize {
    DEFAULT_CHUNK_PARALLELISM
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
        if !(1..=19).contains(&self.zstd_level) {
            anyhow::bail!("zstd-level must be between 1 and 19, not {}", self.zstd_level);
        }
        if self.chunk_parallelism == 0 || self.chunk_parallelism > 1024 {
            anyhow::bail!("chunk-parallelism must be between 1 and 1024");
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
        }
        if let StorageConfig::S3 { secret_access_key: Some(_), secret_access_key_file: Some(_), .. } = &self.storage {
            anyhow::bail!("give the S3 secret key either inline or as a file, not both");
        }
        Ok(())
    }

    /// Opens the configured object store.
    pub fn open_store(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        use anyhow::Context;
        match &self.storage {
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
            } => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_virtual_hosted_style_request(!path_style)
                    .with_allow_http(*allow_http);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
