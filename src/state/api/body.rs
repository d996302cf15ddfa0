//! Request bodies and answers: JSON read with errors that name the field, answers kept as plain values so
//! an idempotent replay is byte for byte the first answer.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::state::api::error::ApiError;

/// A handler's answer: a status and a JSON body, or an error.
pub type Answer = Result<(StatusCode, serde_json::Value), ApiError>;

/// The body of a request, or the error it earns: 413 beyond the limit, 400 when unreadable.
pub fn bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                error: "too_large",
                message: format!(
                    "request body is larger than {} bytes",
                    super::MAX_BODY_BYTES
                ),
            }
        } else {
            ApiError::invalid("body", "the request body could not be read")
        }
    })
}

/// Parses a JSON body (an empty body reads as `{}`); the error names the field serde stopped at.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        // serde names the field in its message ("missing field `developer`", "unknown field `x`"); a
        // syntax error names its position.
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .unwrap_or("body")
            .to_owned();
        ApiError::invalid(&field, message)
    })
}

/// Turns an answer into a response.
pub fn respond(answer: Answer) -> Response {
    match answer {
        Ok((status, body)) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}
