//! The one place where errors become HTTP responses: a status from the [`ErrorKind`], Attic's
//! `{code, error, message}` body, and internal details kept out of it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flywheel_core::api::v1::ErrorBody;
use flywheel_core::{Error, ErrorKind};

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    error: Error,
    /// Attic's name for errors that have a more specific one than the kind.
    name: Option<&'static str>,
    /// A status other than the kind's (an extractor's refusal, such as 413 for a body over
    /// the limit).
    status: Option<StatusCode>,
}

impl ApiError {
    /// An error with Attic's specific name (`NoSuchCache`, `CacheAlreadyExists`, ...).
    pub fn named(error: Error, name: &'static str) -> Self {
        ApiError { error, name: Some(name), status: None }
    }

    /// An axum extractor's refusal of a request: its status, with Attic's body.
    pub fn rejected(status: StatusCode, message: String) -> Self {
        let kind = if status.is_server_error() { ErrorKind::Internal } else { ErrorKind::InvalidInput };
        ApiError { error: Error::new(kind, message), name: None, status: Some(status) }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.error.kind()
    }

    /// The error, for a frontend other than HTTP (gRPC).
    pub fn into_error(self) -> Error {
        self.error
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError { error, name: None, status: None }
    }
}

/// The status of each kind.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists => StatusCode::BAD_REQUEST,
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Corrupt | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.error.kind();
        let status = self.status.unwrap_or_else(|| status_of(kind));
        let (name, message) = match kind {
            ErrorKind::Corrupt | ErrorKind::Internal => {
                tracing::error!(error = %self.error, kind = %kind, "request failed");
                ("InternalServerError", "The server encountered an internal error or misconfiguration.".to_string())
            }
            ErrorKind::Unavailable => {
                tracing::error!(error = %self.error, "storage unavailable");
                ("StorageError", "The storage backend is unavailable; try again later.".to_string())
            }
            _ => {
                let name = self.name.unwrap_or(match kind {
                    ErrorKind::NotFound => "NotFound",
                    ErrorKind::Unauthorized => "Unauthorized",
                    ErrorKind::Forbidden => "AccessError",
                    _ => "RequestError",
                });
                (name, self.error.to_string())
            }
        };
        let body = ErrorBody { code: status.as_u16(), error: name.to_string(), message };
        (status, axum::Json(body)).into_response()
    }
}
