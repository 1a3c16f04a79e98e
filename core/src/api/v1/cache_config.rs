//! `GET|POST|PATCH|DELETE /_api/v1/cache-config/{cache}`: read, create, change, destroy a cache.

use serde::{Deserialize, Serialize};

/// The signing key of a new cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum KeypairConfig {
    /// Generate a fresh key named after the cache.
    Generate,
    /// Use this secret key (`name:base64`).
    Keypair(String),
}

/// How long unaccessed paths are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionPeriodConfig {
    /// The server's default.
    Global,
    /// This many seconds; 0 keeps paths forever.
    Period(u32),
}

/// `POST`: create a cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCacheRequest {
    /// The signing key.
    pub keypair: KeypairConfig,
    /// Whether anyone may pull without a token.
    pub is_public: bool,
    /// The store directory of the paths.
    pub store_dir: String,
    /// Substituter priority announced in `nix-cache-info` (lower is preferred).
    pub priority: i32,
    /// Key names of upstream caches whose paths clients need not push.
    pub upstream_cache_key_names: Vec<String>,
    /// flywheel's extension: public keys (`name:base64`) of trusted uploaders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_uploader_keys: Vec<String>,
    /// flywheel's extension: refuse uploads without a valid signature by one of
    /// `trusted_uploader_keys`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_uploader_signature: bool,
}

/// `GET` answer and `PATCH` body: every field optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// New signing key (PATCH only; never returned).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub keypair: Option<KeypairConfig>,
    /// Where Nix substitutes from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub substituter_endpoint: Option<String>,
    /// Where the API lives.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub api_endpoint: Option<String>,
    /// The public key (`name:base64`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub public_key: Option<String>,
    /// Whether anyone may pull without a token.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub is_public: Option<bool>,
    /// The store directory.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub store_dir: Option<String>,
    /// Substituter priority.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub priority: Option<i32>,
    /// Upstream key names.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub upstream_cache_key_names: Option<Vec<String>>,
    /// Retention.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retention_period: Option<RetentionPeriodConfig>,
    /// flywheel's extension: public keys (`name:base64`) of trusted uploaders, such as a key
    /// per CI runner. A `PATCH` replaces the whole list.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trusted_uploader_keys: Option<Vec<String>>,
    /// flywheel's extension: whether every upload must carry a valid signature by one of
    /// `trusted_uploader_keys` (refused with 403 otherwise).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub require_uploader_signature: Option<bool>,
}
