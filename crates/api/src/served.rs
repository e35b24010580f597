//! The answer of the cell a request was routed to, and how it becomes a
//! response: the body with the cell's `X-Cellpay-Cell` / `X-Cellpay-Epoch`,
//! or an error marked with the same cell.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cellpay_core::{CellId, Rejection};
use cellpay_router::Routed;
use serde_json::Value;

use crate::error::ApiError;
use crate::headers::cell_headers;

pub struct Served<T> {
    pub answer: T,
    cell: CellId,
    epoch: u64,
}

impl<T> Served<T> {
    /// The cell's answer, or its engine error (overloaded, unavailable) marked with the cell.
    pub fn from(routed: Routed<T>) -> Result<Self, ApiError> {
        let (cell, epoch) = (routed.cell, routed.epoch);
        match routed.result {
            Ok(answer) => Ok(Self { answer, cell, epoch }),
            Err(e) => Err(ApiError::from(e).at(cell, epoch)),
        }
    }

    pub fn cell(&self) -> CellId {
        self.cell
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A rejection by the ledger, as this cell's error answer.
    pub fn reject(&self, r: &Rejection) -> ApiError {
        ApiError::from(r.clone()).at(self.cell, self.epoch)
    }

    pub fn respond(&self, status: StatusCode, body: Value) -> Response {
        let mut response = (status, Json(body)).into_response();
        cell_headers(response.headers_mut(), self.cell, self.epoch);
        response
    }
}
