//! `POST /_api/v1/get-missing-paths`: which of these store paths does the cache lack?

use serde::{Deserialize, Serialize};

/// The request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetMissingPathsRequest {
    /// The cache to ask.
    pub cache: String,
    /// Hash parts (32 nixbase32 characters) of the store paths.
    pub store_path_hashes: Vec<String>,
}

/// The response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetMissingPathsResponse {
    /// The hash parts the cache lacks, in request order.
    pub missing_paths: Vec<String>,
}
