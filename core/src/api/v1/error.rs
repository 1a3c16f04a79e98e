//! The JSON body of every API error, as Attic writes it: `{"code", "error", "message"}`.

use serde::{Deserialize, Serialize};

/// An error response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The HTTP status code.
    pub code: u16,
    /// A stable error name (Attic's, where Attic has one: `NoSuchCache`, `AccessError`, ...).
    pub error: String,
    /// A message for the person who made the request.
    pub message: String,
}
