//! `POST /_api/v1/get-missing-paths`.

use axum::extract::State;
use axum::Json;
use flywheel_core::api::v1::get_missing_paths::{GetMissingPathsRequest, GetMissingPathsResponse};
use flywheel_core::nix::store_path::parse_hash_part;
use flywheel_core::Error;

use super::{authorize, Anywhere, ApiJson, Push};
use crate::error::ApiError;
use crate::state::AppState;

/// Most hashes one request may ask about.
const MAX_HASHES: usize = 100_000;

/// Answers which of the given paths the cache lacks.
pub async fn handle(
    State(state): State<AppState>,
    Anywhere(caller, _): Anywhere<Push>,
    ApiJson(request): ApiJson<GetMissingPathsRequest>,
) -> Result<Json<GetMissingPathsResponse>, ApiError> {
    authorize(&state, &caller, &request.cache, "push", |p| p.push).await?;
    if request.store_path_hashes.len() > MAX_HASHES {
        return Err(Error::invalid(format!("ask about at most {MAX_HASHES} paths per request")).into());
    }
    for hash in &request.store_path_hashes {
        parse_hash_part(hash)?;
    }
    let present = state
        .storage
        .paths_present(&request.cache, request.store_path_hashes.clone(), state.config.chunk_parallelism)
        .await?;
    let missing_paths = request
        .store_path_hashes
        .iter()
        .zip(present)
        .filter(|(_, present)| !present)
        .map(|(hash, _)| hash.clone())
        .collect();
    Ok(Json(GetMissingPathsResponse { missing_paths }))
}
