//! Request bodies: read within the size limit, parsed strictly (unknown
//! fields are refused), and turned into validated commands before any cell
//! sees them.

use axum::body::Body;
use axum::http::HeaderMap;
use cellpay_core::{
    AccountId, Authority, Command, Currency, ErrorCode, Ledger, Op, OpenAccount, Outcome, TenantId, Transfer,
    TransferId,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ApiError;

/// A body over the limit is still read and dropped, up to this many bytes, before
/// the 413 goes out: closing a socket with unread bytes resets it, and the client
/// would see a broken connection instead of the answer (I7: the drain is bounded).
pub const DRAIN_BYTES_MAX: u64 = 16 << 20;

/// Reads a body of at most `max` bytes: beyond it, 413 `payload_too_large`.
pub async fn read(headers: &HeaderMap, body: Body, max: usize) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || ApiError::new(ErrorCode::PayloadTooLarge, format!("request body exceeds {max} bytes"));
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_BYTES_MAX) {
        return Err(too_large());
    }
    let mut body = body;
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n.min(max as u64) as usize));
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len() as u64;
        if seen > max as u64 {
            if seen > DRAIN_BYTES_MAX {
                return Err(too_large());
            }
            continue; // over the limit: keep reading (and dropping) to answer cleanly
        }
        buf.extend_from_slice(&data);
    }
    if seen > max as u64 {
        return Err(too_large());
    }
    Ok(buf.into())
}

/// Parses a whole JSON body; any error is 400 `invalid_request` naming what was wrong.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountBody {
    pub id: String,
    pub currency: String,
    #[serde(default)]
    pub overdraft: bool,
    /// The tenant the account belongs to: a client token's own (the default
    /// for it), any for admin (default `default`).
    pub tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    pub id: String,
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub currency: Option<String>,
    pub memo: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<'a> {
    #[serde(borrow)]
    pub transfers: Vec<&'a serde_json::value::RawValue>,
}

pub fn account_id(field: &str, s: &str) -> Result<AccountId, ApiError> {
    AccountId::new(s).map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

pub fn transfer_id(s: &str) -> Result<TransferId, ApiError> {
    TransferId::new(s).map_err(|e| ApiError::invalid(format!("id: {e}")))
}

fn currency(s: &str) -> Result<Currency, ApiError> {
    Currency::new(s).map_err(|e| ApiError::invalid(format!("currency: {e}")))
}

pub fn open_account(b: OpenAccountBody, shadow: bool, by: &Authority) -> Result<Command, ApiError> {
    let named =
        b.tenant.as_deref().map(TenantId::new).transpose().map_err(|e| ApiError::invalid(format!("tenant: {e}")))?;
    let tenant = match (by, named) {
        (Authority::Admin, named) => named.unwrap_or_else(TenantId::default_tenant),
        (Authority::Tenant(own), Some(named)) if named != *own => {
            return Err(ApiError::new(ErrorCode::Forbidden, "a client token opens accounts for its own tenant only"));
        }
        (Authority::Tenant(own), _) => own.clone(),
    };
    let op =
        OpenAccount { id: account_id("id", &b.id)?, currency: currency(&b.currency)?, overdraft: b.overdraft, tenant };
    Ok(Command { shadow, op: Op::OpenAccount(op) })
}

/// A transfer command, or the error the ledger would give, without asking it.
pub fn transfer(b: TransferBody, shadow: bool, by: &Authority) -> Result<Command, ApiError> {
    let t = Transfer {
        id: transfer_id(&b.id)?,
        from: account_id("from", &b.from)?,
        to: account_id("to", &b.to)?,
        amount: b.amount,
        currency: b.currency.as_deref().map(currency).transpose()?,
        memo: b.memo.map(String::into_boxed_str),
        by: by.clone(),
    };
    if let Err(Outcome::Rejected(r)) = Ledger::validate_transfer(&t) {
        return Err(r.into());
    }
    Ok(Command { shadow, op: Op::Transfer(t) })
}
