//! What every request handler shares.

use std::sync::Arc;

use crate::auth::TokenAuthority;
use crate::config::ServerConfig;
use crate::ingest::Ingester;
use crate::metrics::Metrics;
use crate::preflight::VerifiedChunks;
use crate::storage::Storage;

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<ServerConfig>,
    /// The object store.
    pub storage: Storage,
    /// Token verification.
    pub tokens: TokenAuthority,
    /// NAR ingestion.
    pub ingester: Ingester,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Chunk versions checked lately, for the check before a NAR is sent.
    pub verified: Arc<VerifiedChunks>,
}

impl AppState {
    /// Opens storage and sets everything up from a config.
    pub fn new(config: ServerConfig) -> anyhow::Result<Self> {
        config.check()?;
        let storage = Storage::new(config.open_store()?);
        let tokens = TokenAuthority::from_base64(&config.token_hs256_secret_base64)?;
        let metrics = Arc::new(Metrics::default());
        let ingester = Ingester::new(
            storage.clone(),
            config.chunking,
            config.zstd_level,
            config.chunk_parallelism,
            metrics.clone(),
        );
        Ok(AppState { config: Arc::new(config), storage, tokens, ingester, metrics, verified: Arc::default() })
    }
}
