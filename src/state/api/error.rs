//! The management API's error answers: `{"error": …, "message": …}` with the contract's statuses.

use axum::Json;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::state::store::StoreError;

/// One error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// `invalid`, `not_found`, `conflict`, `defined_in_catalog`, `too_large` or `unavailable`.
    pub error: &'static str,
    /// What to fix; names the field for `invalid`, never echoes a secret.
    pub message: String,
}

impl ApiError {
    /// 400 `invalid`: `field` is named first in the message.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "invalid",
            message: format!("{field}: {message}"),
        }
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "not_found",
            message: message.into(),
        }
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            error: "conflict",
            message: message.into(),
        }
    }

    /// 409 `defined_in_catalog`: the entity is the catalog file's, read-only here.
    pub fn in_catalog(what: &str) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            error: "defined_in_catalog",
            message: format!("{what} is defined in the catalog file: change it there"),
        }
    }

    /// 503 `unavailable`.
    pub fn unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "unavailable",
            message: "the state store is unavailable; retry later".to_owned(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.error, "message": self.message})
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(message) => ApiError::not_found(message),
            StoreError::Conflict(message) => ApiError::conflict(message),
            other => {
                // The detail may name the database host: it goes to the log, not to the caller.
                tracing::warn!(error = %other, "management API: state store call failed");
                ApiError::unavailable()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Longest extractor rejection text carried into a JSON error.
const MAX_REJECTION_BYTES: usize = 1024;

/// Turns axum's plain-text rejections (a path parameter that is not UTF-8, a method the route does not
/// take) into the API's JSON errors, so every answer of the management API has one shape.
pub async fn json_rejections(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), MAX_REJECTION_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let error = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        _ => "invalid",
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_owned()
    } else {
        text
    };
    ApiError {
        status,
        error,
        message,
    }
    .into_response()
}
