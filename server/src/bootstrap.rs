//! The zero-configuration first start: a config with a fresh token secret, local storage under
//! the data directory, a cache named `main`, and an admin token printed once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flywheel_core::nix::SigningKey;

use crate::auth::{AtticClaim, Claims, Permissions, StateClaim, TokenAuthority};
use crate::config::{ServerConfig, StorageConfig};
use crate::storage::{now, CacheRecord, Storage};

/// Name of the cache created on first start.
pub const DEFAULT_CACHE: &str = "main";

/// File name of the generated config inside the data directory.
pub const CONFIG_FILE: &str = "server.toml";

/// What a first start produced.
pub struct FirstStart {
    /// Where the config was written.
    pub config_path: PathBuf,
    /// A token with every permission on every cache, valid for ten years.
    pub admin_token: String,
    /// The public key of the `main` cache.
    pub public_key: String,
}

/// Loads `data_dir/server.toml`, writing it first if it does not exist. Returns the config and,
/// on first start, what was created.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<(ServerConfig, Option<PathBuf>)> {
    let config_path = data_dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Ok((ServerConfig::load(&config_path)?, None));
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize().with_context(|| format!("resolving {}", data_dir.display()))?;
    let config = ServerConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
        token_hs256_secret_base64: TokenAuthority::generate_secret(),
        token_hs256_secret_base64_file: None,
        storage: StorageConfig::Local { path: data_dir.join("storage") },
        chunking: Default::default(),
        zstd_level: flywheel_core::chunk::DEFAULT_ZSTD_LEVEL,
        api_endpoint: None,
        chunk_parallelism: crate::config::DEFAULT_CHUNK_PARALLELISM,
        hot_chunk_bytes: crate::config::DEFAULT_HOT_CHUNK_BYTES,
        gc: Default::default(),
        compaction: Default::default(),
        limits: Default::default(),
        tfstate: Default::default(),
        bazel: Default::default(),
        caches: Default::default(),
    };
    let text = format!(
        "# Written by `flywheel serve` on first start. The token secret signs every token: keep it private.\n{}",
        toml::to_string_pretty(&config).context("rendering the config")?
    );
    write_private(&config_path, text.as_bytes())?;
    Ok((config, Some(config_path)))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Creates the `main` cache if it does not exist and mints an admin token.
pub async fn create_default_cache(config: &ServerConfig, config_path: PathBuf) -> anyhow::Result<FirstStart> {
    let storage = Storage::new(config.open_store()?);
    let key = match storage.get_cache(DEFAULT_CACHE).await? {
        Some(existing) => SigningKey::parse(&existing.signing_key)?,
        None => {
            let key = SigningKey::generate(&format!("{DEFAULT_CACHE}-1"))?;
            storage
                .put_cache(&CacheRecord {
                    name: DEFAULT_CACHE.into(),
                    signing_key: key.to_nix_string(),
                    is_public: false,
                    store_dir: flywheel_core::nix::DEFAULT_STORE_DIR.into(),
                    priority: 41,
                    upstream_cache_key_names: vec!["cache.nixos.org-1".into()],
                    retention_period: None,
                    trusted_uploader_keys: Vec::new(),
                    require_uploader_signature: false,
                })
                .await?;
            key
        }
    };
    let mut everything = AtticClaim::default();
    everything.grant("*", |p| *p = Permissions::all())?;
    let mut every_stack = StateClaim::default();
    every_stack.grant("*", |p| {
        p.read = true;
        p.write = true;
        p.lock = true;
    })?;
    let admin_token = mint(config, "admin", 10 * 365 * 24 * 3600, everything, every_stack)?;
    Ok(FirstStart { config_path, admin_token, public_key: key.verifying_key().to_nix_string() })
}

/// Creates the caches the config declares, and brings existing ones in line with it (key,
/// visibility, priority, retention, upstream keys, trusted uploader keys); the store dir of an
/// existing cache is kept.
/// Every replica does this on start; the writes are idempotent.
pub async fn apply_declared_caches(config: &ServerConfig, storage: &Storage) -> anyhow::Result<()> {
    for (name, declared) in &config.caches {
        let existing = storage.get_cache(name).await.with_context(|| format!("reading cache {name}"))?;
        let wanted = CacheRecord {
            name: name.clone(),
            signing_key: declared.signing_key.clone(),
            is_public: declared.public,
            store_dir: existing
                .as_ref()
                .map(|c| c.store_dir.clone())
                .unwrap_or_else(|| flywheel_core::nix::DEFAULT_STORE_DIR.into()),
            priority: declared.priority,
            upstream_cache_key_names: declared.upstream_cache_key_names.clone(),
            retention_period: declared.retention_period,
            // Checked with the config; stored in canonical form so that a restart with the same
            // config finds nothing to change.
            trusted_uploader_keys: CacheRecord::check_uploader_settings(
                &declared.trusted_uploader_keys,
                declared.require_uploader_signature,
            )?,
            require_uploader_signature: declared.require_uploader_signature,
        };
        if existing.as_ref() == Some(&wanted) {
            continue;
        }
        storage.put_cache(&wanted).await.with_context(|| format!("writing cache {name}"))?;
        let public_key = SigningKey::parse(&wanted.signing_key)?.verifying_key().to_nix_string();
        let action = if existing.is_some() { "updated from the config" } else { "created" };
        tracing::info!(
            cache = %name,
            %public_key,
            trusted_uploader_keys = wanted.trusted_uploader_keys.len(),
            require_uploader_signature = wanted.require_uploader_signature,
            "cache {action}"
        );
    }
    Ok(())
}

/// Mints a token for `sub`, valid `validity_secs` from now, with the given pattern permissions
/// on caches and on OpenTofu/Terraform stacks.
pub fn mint(
    config: &ServerConfig,
    sub: &str,
    validity_secs: u64,
    caches: AtticClaim,
    tfstate: StateClaim,
) -> anyhow::Result<String> {
    let authority = TokenAuthority::from_base64(&config.token_hs256_secret_base64)?;
    let claims = Claims {
        sub: sub.to_string(),
        exp: now() + validity_secs,
        nbf: None,
        attic: caches,
        tfstate,
    };
    Ok(authority.mint(&claims)?)
}
