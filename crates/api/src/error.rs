//! Every error a client can cause, as the contract writes it:
//! `{"error": {"code": "...", "message": "..."}}` with the code's status, and
//! `Retry-After` on every 503. Nothing a client sends becomes a 500.

use axum::http::header::CONNECTION;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cellpay_cell::EngineError;
use cellpay_core::{CellId, ErrorCode, Rejection};
use serde_json::json;

use crate::headers::cell_headers;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_S: u32 = 1;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The cell (and its epoch) that answered, when one did.
    pub served_by: Option<(CellId, u64)>,
    /// An HTTP status other than the code's own: a request the front door
    /// could not take (405, 408, 414, 431) still answers a contract code.
    pub status: Option<StatusCode>,
    /// Close the connection after this answer (a body left half-read).
    pub close: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), served_by: None, status: None, close: false }
    }

    /// A request refused before any handler saw it, with the HTTP status
    /// that says why (405, 408, 414, 431, ...) and the code `invalid_request`
    /// (`unauthorized`, `forbidden`, `payload_too_large` for 401, 403, 413).
    pub fn refused(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
            StatusCode::FORBIDDEN => ErrorCode::Forbidden,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::InvalidRequest,
        };
        let mut e = Self::new(code, message);
        e.status = Some(status);
        e
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn at(mut self, cell: CellId, epoch: u64) -> Self {
        self.served_by = Some((cell, epoch));
        self
    }

    /// The code a client sees: internal routing codes become `cell_unavailable`.
    pub fn public_code(&self) -> ErrorCode {
        match self.code {
            ErrorCode::WrongCell
            | ErrorCode::OutOfOrder
            | ErrorCode::SequenceReused
            | ErrorCode::ShardFrozen
            | ErrorCode::ShardMoved => ErrorCode::CellUnavailable,
            other => other,
        }
    }

    /// The JSON body, also used for one item of a batch.
    pub fn body(&self) -> serde_json::Value {
        json!({"code": self.public_code().as_str(), "message": self.message})
    }

    /// The same body, typed: serialised straight to bytes, with no `Value` tree
    /// (a batch answers thousands of them).
    pub fn typed_body(&self) -> ErrorBody<'_> {
        ErrorBody { code: self.public_code().as_str(), message: &self.message }
    }
}

/// An error's body: `{"code": …, "message": …}`, as [`ApiError::body`].
#[derive(Debug, serde::Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'static str,
    pub message: &'a str,
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        Self::new(r.code, r.message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::Overloaded { .. } | EngineError::Shed { .. } => ErrorCode::Overloaded,
            EngineError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            EngineError::Unavailable { .. } => ErrorCode::CellUnavailable,
        };
        Self::new(code, e.to_string())
    }
}

impl From<cellpay_router::RouteError> for ApiError {
    fn from(e: cellpay_router::RouteError) -> Self {
        use cellpay_router::RouteError as R;
        match e {
            R::Engine(e) => Self::from(e),
            R::RateLimited(m) => Self::new(ErrorCode::RateLimited, m),
            R::Overloaded(m) => Self::new(ErrorCode::Overloaded, m),
            R::Degraded(m) => Self::new(ErrorCode::Degraded, m),
            e @ (R::Unavailable { .. } | R::WrongCell { .. }) => Self::new(ErrorCode::CellUnavailable, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.public_code();
        let status = self
            .status
            .unwrap_or_else(|| StatusCode::from_u16(code.http_status()).expect("contract statuses are valid"));
        let mut response = (status, axum::Json(json!({"error": self.body()}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert("retry-after", HeaderValue::from(RETRY_AFTER_S));
        }
        if self.close {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some((cell, epoch)) = self.served_by {
            cell_headers(response.headers_mut(), cell, epoch);
        }
        response
    }
}
