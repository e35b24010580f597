//! Request bodies: read within the size limit and at a minimum pace,
//! parsed strictly (unknown fields are refused), and turned into validated
//! commands before any cell sees them.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use cellpay_core::{
    AccountId, Authority, Command, Currency, ErrorCode, Ledger, Op, OpenAccount, Outcome, TenantId, Transfer,
    TransferId,
};
use cellpay_router::Mode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// A body over the limit is still read and dropped, up to this many bytes, before
/// the 413 goes out: closing a socket with unread bytes resets it, and the client
/// would see a broken connection instead of the answer (I7: the drain is bounded).
pub const DRAIN_BYTES_MAX: u64 = 16 << 20;

/// Reads a body of at most `max` bytes: beyond it, 413 `payload_too_large`.
/// Handlers call this on bodies [`crate::intake`] has already read (so it
/// returns at once); the pace and the budget are enforced there.
pub async fn read(headers: &HeaderMap, body: Body, max: usize) -> Result<axum::body::Bytes, ApiError> {
    read_paced(headers, body, max, &Pace::UNBOUNDED, |_| Ok(())).await
}

/// How fast a body must arrive (see `FrontLimits` for the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The whole body, whatever its pace.
    pub read_timeout: Duration,
    /// After this, the average pace since the request arrived must be at
    /// least `rate_bytes_per_s_min` (or the body complete).
    pub rate_grace: Duration,
    pub rate_bytes_per_s_min: u64,
}

impl Pace {
    /// No clock: for bodies already in memory.
    pub const UNBOUNDED: Pace =
        Pace { read_timeout: Duration::MAX, rate_grace: Duration::MAX, rate_bytes_per_s_min: 1 };

    /// The latest instant by which more than `seen` bytes must have arrived.
    fn deadline(&self, started: Instant, seen: u64) -> Option<Instant> {
        let at_rate = Duration::from_secs_f64((seen + 1) as f64 / self.rate_bytes_per_s_min as f64);
        let allowed = self.read_timeout.min(self.rate_grace.saturating_add(at_rate));
        started.checked_add(allowed)
    }
}

/// Reads a body of at most `max` bytes at `pace`; `admit(n)` is asked before
/// the first `n` bytes of the body are kept (the global body budget). Too
/// slow: 408 `invalid_request`, and the connection is closed.
pub async fn read_paced(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    pace: &Pace,
    mut admit: impl FnMut(u64) -> Result<(), ApiError>,
) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || ApiError::new(ErrorCode::PayloadTooLarge, format!("request body exceeds {max} bytes"));
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_BYTES_MAX) {
        return Err(too_large());
    }
    let started = Instant::now();
    let mut body = body;
    let kept_first = declared.map_or(0, |n| n.min(max as u64));
    admit(kept_first)?;
    let mut buf = Vec::with_capacity(kept_first as usize);
    let mut seen = 0u64;
    loop {
        let frame = match pace.deadline(started, seen) {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), body.frame()).await {
                Ok(frame) => frame,
                Err(_) => return Err(too_slow(pace, seen, declared, started)),
            },
            None => body.frame().await,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len() as u64;
        if seen > max as u64 {
            if seen > DRAIN_BYTES_MAX {
                return Err(too_large());
            }
            continue; // over the limit: keep reading (and dropping) to answer cleanly
        }
        admit(seen)?;
        buf.extend_from_slice(&data);
    }
    if seen > max as u64 {
        return Err(too_large());
    }
    Ok(buf.into())
}

fn too_slow(pace: &Pace, seen: u64, declared: Option<u64>, started: Instant) -> ApiError {
    let of = declared.map_or(String::new(), |n| format!(" of {n}"));
    let mut e = ApiError::refused(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body arrived too slowly: {seen}{of} bytes in {} ms (a body must arrive within {} ms, \
             at {} bytes/s or more after the first {} ms)",
            started.elapsed().as_millis(),
            pace.read_timeout.as_millis(),
            pace.rate_bytes_per_s_min,
            pace.rate_grace.as_millis()
        ),
    );
    e.close = true;
    e
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
    pub transfers: Vec<&'a RawValue>,
}

/// `PUT /v1/admin/degrade/{switch}`: `{"mode": "on" | "off" | "auto"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    pub mode: Mode,
}

/// Parses a batch body; its items stay raw JSON, each parsed on its own by
/// [`batch_item`], so one bad item is answered alone.
pub fn parse_batch(bytes: &[u8]) -> Result<BatchBody<'_>, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

/// One batch item: the id the client gave and its transfer command, or the
/// error that item is answered with.
pub fn batch_item(raw: &RawValue, shadow: bool, by: &Authority) -> Result<(String, Command), ApiError> {
    let b = serde_json::from_str::<TransferBody>(raw.get())
        .map_err(|e| ApiError::invalid(format!("malformed transfer: {e}")))?;
    let id = b.id.clone();
    transfer(b, shadow, by).map(|cmd| (id, cmd))
}

/// The id of a batch item, if its JSON has a string `id`, for its answer.
pub fn batch_item_id(raw: &RawValue) -> serde_json::Value {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a str>,
    }
    serde_json::from_str::<IdOnly<'_>>(raw.get()).ok().and_then(|i| i.id).map_or(serde_json::Value::Null, Into::into)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_must_keep_its_pace_after_the_grace_and_finish_in_time() {
        let pace = Pace {
            read_timeout: Duration::from_secs(30),
            rate_grace: Duration::from_secs(2),
            rate_bytes_per_s_min: 1000,
        };
        let t0 = Instant::now();
        // The first byte is due by the end of the grace (and a millisecond).
        assert_eq!(pace.deadline(t0, 0), Some(t0 + Duration::from_millis(2001)));
        // 5,000 bytes in: the next is due 5.001 s after the grace.
        assert_eq!(pace.deadline(t0, 5000), Some(t0 + Duration::from_millis(7001)));
        // However fast, never past the read timeout.
        assert_eq!(pace.deadline(t0, 1 << 30), Some(t0 + Duration::from_secs(30)));
        assert_eq!(Pace::UNBOUNDED.deadline(t0, 0), None, "bodies in memory have no clock");
    }
}
