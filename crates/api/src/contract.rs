//! Every answer in the contract's shape: `{"error":{"code","message"}}`.
//!
//! Handlers answer with [`ApiError`], but some answers are made elsewhere:
//! axum's own (405 with no body, a path or query it cannot decode answered
//! in plain text) and the caps on a request's head. This middleware, the
//! outermost of the router, refuses a request target over `uri_bytes_max`
//! (414) and a head over `header_bytes_max` (431) itself, and turns any
//! error answer that is not JSON into the contract's error with the same
//! status (keeping `Allow` on a 405).
//!
//! What cannot be mapped, because hyper answers before a request exists and
//! offers no hook: a request line or header hyper cannot parse (a bare 400),
//! a head beyond hyper's own buffer cap (twice `header_bytes_max`, a bare
//! 431) or more than [`crate::front::HEADERS_HARD_MAX`] headers, and a head
//! not finished within `header_read_timeout_ms` (the connection is closed
//! without an answer). Each closes the connection.

use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// The most of a non-JSON error body kept as the contract error's message.
pub const MESSAGE_BYTES_MAX: usize = 512;

/// Middleware: head caps first, then the shape of every error answer.
pub async fn shape(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(refusal) = head_refusal(&state, &request) {
        return refusal.into_response();
    }
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MESSAGE_BYTES_MAX * 4).await.unwrap_or_default();
    let mut message: String = String::from_utf8_lossy(&text).trim().chars().take(MESSAGE_BYTES_MAX).collect();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("refused").to_lowercase();
    }
    // axum answers 422 for a body or query it could not deserialize: in the
    // contract that is a bad request, and 422 is kept for the ledger's refusals.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { status };
    let mut mapped = ApiError::refused(status, message).into_response();
    for name in [axum::http::header::ALLOW, axum::http::header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            mapped.headers_mut().insert(name, v.clone());
        }
    }
    mapped
}

/// 414 or 431 for a head over our caps (hyper's own caps are higher).
fn head_refusal(state: &AppState, request: &Request) -> Option<ApiError> {
    let limits = &state.front;
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > limits.uri_bytes_max {
        return Some(ApiError::refused(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes; at most {} (uri_bytes_max)", limits.uri_bytes_max),
        ));
    }
    // The head as sent: the request line and each `name: value\r\n`.
    let head = target
        + request.method().as_str().len()
        + request.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>();
    if head > limits.header_bytes_max {
        let mut e = ApiError::refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request head is {head} bytes; at most {} (header_bytes_max)", limits.header_bytes_max),
        );
        e.close = true;
        return Some(e);
    }
    None
}
