//! The contract's own headers.

use axum::http::{HeaderMap, HeaderValue};
use cellpay_core::CellId;

use crate::error::ApiError;

pub const CELL: &str = "x-cellpay-cell";
pub const EPOCH: &str = "x-cellpay-epoch";
pub const SHADOW: &str = "x-cellpay-shadow";

/// Marks a response as served by `cell` at shard map `epoch`.
pub fn cell_headers(headers: &mut HeaderMap, cell: CellId, epoch: u64) {
    headers.insert(CELL, HeaderValue::from(cell.0));
    headers.insert(EPOCH, HeaderValue::from(epoch));
}

/// `X-Cellpay-Shadow: 1` selects the shadow ledger; `0` or no header the real one.
pub fn shadow(headers: &HeaderMap) -> Result<bool, ApiError> {
    match headers.get(SHADOW).map(|v| v.as_bytes()) {
        None | Some(b"0") => Ok(false),
        Some(b"1") => Ok(true),
        Some(_) => Err(ApiError::invalid("X-Cellpay-Shadow must be 1 or 0")),
    }
}
