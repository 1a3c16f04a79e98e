//! `GET|POST|PATCH|DELETE /_api/v1/cache-config/{cache}`.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use flywheel_core::api::v1::cache_config::{CacheConfig, CreateCacheRequest, KeypairConfig, RetentionPeriodConfig};
use flywheel_core::api::v1::validate_cache_name;
use flywheel_core::nix::SigningKey;
use flywheel_core::{Error, ErrorKind};


use super::ApiPath;
use super::{authorize, Access, ApiJson, Caller, Configure, CreateCache, Need};
use crate::error::ApiError;
use crate::state::AppState;
use crate::storage::CacheRecord;

fn signing_key(keypair: &KeypairConfig, cache: &str) -> Result<String, Error> {
    Ok(match keypair {
        KeypairConfig::Generate => SigningKey::generate(cache)?.to_nix_string(),
        KeypairConfig::Keypair(secret) => SigningKey::parse(secret)?.to_nix_string(),
    })
}

fn check_store_dir(store_dir: &str) -> Result<(), Error> {
    let ok = store_dir.starts_with('/') && !store_dir.ends_with('/') && !store_dir.contains(['\n', ' ']);
    if ok { Ok(()) } else { Err(Error::invalid(format!("invalid store_dir {store_dir:?}"))) }
}

/// `GET`: the cache's public settings.
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<CacheConfig>, ApiError> {
    let record = authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    // Without a configured endpoint, the Host header is the best guess; it is taken only when
    // it is a plain host and port, so a client cannot make the answer name a path or a scheme.
    let api_endpoint = state.config.api_endpoint.clone().unwrap_or_else(|| {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
            .filter(|a| !a.as_str().contains('@'))
            .map(|a| a.to_string())
            .unwrap_or_else(|| state.config.listen.to_string());
        format!("http://{host}/")
    });
    let public_key = SigningKey::parse(&record.signing_key)
        .map_err(|e| Error::internal(format!("cache signing key: {e}")))?
        .verifying_key()
        .to_nix_string();
    Ok(Json(CacheConfig {
        keypair: None,
        substituter_endpoint: Some(format!("{api_endpoint}{cache}")),
        api_endpoint: Some(api_endpoint),
        public_key: Some(public_key),
        is_public: Some(record.is_public),
        store_dir: Some(record.store_dir),
        priority: Some(record.priority),
        upstream_cache_key_names: Some(record.upstream_cache_key_names),
        retention_period: Some(match record.retention_period {
            None => RetentionPeriodConfig::Global,
            Some(seconds) => RetentionPeriodConfig::Period(seconds),
        }),
        // Public keys and a flag: a puller may know them (a runner's `flywheel push` checks
        // its paths against them before uploading anything).
        trusted_uploader_keys: Some(record.trusted_uploader_keys),
        require_uploader_signature: Some(record.require_uploader_signature),
    }))
}

/// `POST`: creates a cache.
pub async fn create(
    State(state): State<AppState>,
    MayCreate(cache): MayCreate,
    ApiJson(request): ApiJson<CreateCacheRequest>,
) -> Result<StatusCode, ApiError> {
    if state.storage.get_cache(&cache).await?.is_some() {
        return Err(ApiError::named(
            Error::new(ErrorKind::AlreadyExists, format!("cache {cache:?} exists already")),
            "CacheAlreadyExists",
        ));
    }
    check_store_dir(&request.store_dir)?;
    let trusted_uploader_keys =
        CacheRecord::check_uploader_settings(&request.trusted_uploader_keys, request.require_uploader_signature)?;
    let record = CacheRecord {
        name: cache.clone(),
        signing_key: signing_key(&request.keypair, &cache)?,
        is_public: request.is_public,
        store_dir: request.store_dir,
        priority: request.priority,
        upstream_cache_key_names: request.upstream_cache_key_names,
        retention_period: None,
        trusted_uploader_keys,
        require_uploader_signature: request.require_uploader_signature,
    };
    state.storage.put_cache(&record).await?;
    state.forget_cache_record(&cache);
    tracing::info!(cache = %cache, "cache created");
    Ok(StatusCode::OK)
}

/// The cache name of a `POST`, with the caller checked for create-cache on it before the body
/// is read (the cache need not exist, so [`super::Access`] does not fit).
pub struct MayCreate(String);

impl axum::extract::FromRequestParts<AppState> for MayCreate {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let ApiPath(cache) = ApiPath::<String>::from_request_parts(parts, state).await?;
        validate_cache_name(&cache)?;
        if !CreateCache::granted(&caller.permissions_for(&cache)) {
            let kind = if caller.0.is_some() { ErrorKind::Forbidden } else { ErrorKind::Unauthorized };
            return Err(Error::new(kind, format!("creating cache {cache:?} needs the create-cache permission")).into());
        }
        Ok(MayCreate(cache))
    }
}

/// `PATCH`: changes the fields that are set.
pub async fn update(
    State(state): State<AppState>,
    access: Access<Configure>,
    ApiJson(patch): ApiJson<CacheConfig>,
) -> Result<StatusCode, ApiError> {
    let (cache, caller, mut record) = (access.name, access.caller, access.record);
    if patch.retention_period.is_some() && !caller.permissions_for(&cache).configure_cache_retention {
        return Err(Error::new(ErrorKind::Forbidden, "changing retention needs the configure-cache-retention permission").into());
    }
    /// Sets `slot` when the patch carries a value, and tells whether it did.
    fn set<T>(slot: &mut T, value: Option<T>) -> bool {
        value.map(|value| *slot = value).is_some()
    }
    let mut changed = false;
    if let Some(keypair) = &patch.keypair {
        record.signing_key = signing_key(keypair, &cache)?;
        changed = true;
    }
    if let Some(store_dir) = &patch.store_dir {
        check_store_dir(store_dir)?;
    }
    let retention_period = patch.retention_period.map(|retention| match retention {
        RetentionPeriodConfig::Global => None,
        RetentionPeriodConfig::Period(seconds) => Some(seconds),
    });
    changed |= set(&mut record.is_public, patch.is_public);
    changed |= set(&mut record.store_dir, patch.store_dir);
    changed |= set(&mut record.priority, patch.priority);
    changed |= set(&mut record.upstream_cache_key_names, patch.upstream_cache_key_names);
    changed |= set(&mut record.retention_period, retention_period);
    changed |= set(&mut record.trusted_uploader_keys, patch.trusted_uploader_keys);
    changed |= set(&mut record.require_uploader_signature, patch.require_uploader_signature);
    if !changed {
        return Err(Error::invalid("no modifiable fields were set").into());
    }
    // Checked as a whole, so that one PATCH may set both, and none may leave a cache that
    // requires signatures with no key to check them by.
    record.trusted_uploader_keys =
        CacheRecord::check_uploader_settings(&record.trusted_uploader_keys, record.require_uploader_signature)?;
    state.storage.put_cache(&record).await?;
    state.forget_cache_record(&cache);
    tracing::info!(
        cache = %cache,
        trusted_uploader_keys = record.trusted_uploader_keys.len(),
        require_uploader_signature = record.require_uploader_signature,
        "cache settings changed"
    );
    Ok(StatusCode::OK)
}

/// `DELETE`: destroys the cache and its paths (chunks go with the next GC).
pub async fn destroy(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&state, &caller, &cache, "destroy", |p| p.destroy_cache).await?;
    state.storage.delete_cache(&cache).await?;
    state.forget_cache_record(&cache);
    tracing::info!(cache = %cache, "cache destroyed");
    Ok(StatusCode::OK)
}
