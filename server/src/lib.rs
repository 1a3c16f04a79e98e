//! The flywheel cache server: an Attic-compatible Nix binary cache that stores NARs as
//! deduplicated, zstd-compressed FastCDC chunks in an object store.
//!
//! - [`config`]: the TOML configuration.
//! - [`clock`]: where storage and garbage collection read the time.
//! - [`connections`]: accepting connections, with their limit and timeouts.
//! - [`storage`]: chunks, manifests, path records and cache configs over `object_store`.
//! - [`ingest`]: a NAR stream in, chunks and a manifest out.
//! - [`auth`]: Attic-compatible JWT tokens.
//! - [`routes`]: the HTTP frontends (Nix binary cache, Attic API, chunk API).
//! - [`metrics`]: Prometheus counters at `/metrics`.
//! - [`narinfo_cache`]: narinfos and 404s answered lately, kept in memory for a bounded time.
//! - [`gc`]: retention and garbage collection.
//! - [`tfstate`]: OpenTofu/Terraform states, their versions and locks.
//! - [`bazel`]: the Bazel remote cache (REAPI over gRPC, and Bazel's HTTP cache) on the chunks.
//! - [`fsck`]: finding missing or corrupt chunks and taking damaged paths out of service.
//! - [`bootstrap`]: the zero-configuration first start.
#![warn(missing_docs)]

pub mod auth;
pub mod bazel;
pub mod bootstrap;
pub mod chunk_reader;
pub mod clock;
pub mod compact;
pub mod config;
pub mod connections;
pub mod error;
pub mod fsck;
pub mod gc;
pub mod hot_chunks;
pub mod ingest;
pub mod inline_io;
pub mod metrics;
pub mod narinfo_cache;
pub mod preflight;
pub mod routes;
pub mod s3_client;
pub mod state;
pub mod storage;
pub mod tfstate;

/// The configuration of the unit tests' property tests (fuzzing stand-ins): `cases` cases from
/// a fixed seed, so that a failure in CI replays here, and no files written.
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    Config { cases, rng_seed: RngSeed::Fixed(0x666c_7977_6865_656c), failure_persistence: None, ..Config::default() }
}

pub use config::ServerConfig;
pub use state::AppState;

/// Serves the API on `listener` until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(config)?;
    let local_root = match &state.config.storage {
        config::StorageConfig::Local { path } => Some(path.clone()),
        config::StorageConfig::Memory {} | config::StorageConfig::S3 { .. } => None,
    };
    tokio::spawn(gc::periodic(state.storage.clone(), state.config.gc.clone(), local_root));
    tokio::spawn(compact::periodic(state.storage.clone(), state.config.compaction.clone()));
    let limits = state.config.limits.clone();
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let grpc = match state.config.bazel.grpc_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("binding the Bazel gRPC listener (bazel.grpc-listen) to {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "Bazel remote cache (gRPC) listening");
            Some(tokio::spawn(bazel::grpc::serve(state.clone(), listener, shutdown.clone())))
        }
        None => None,
    };
    let app = routes::router(state);
    connections::serve(listener, app, &limits, shutdown).await?;
    if let Some(grpc) = grpc {
        grpc.await.map_err(|e| anyhow::anyhow!("the Bazel gRPC listener failed: {e}"))??;
    }
    Ok(())
}
