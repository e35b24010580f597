//! The edge of the protection stack as handlers use it: classify a request,
//! pass it through the degrade switches, the rate limits and the hot-key
//! limits (layers 1–3 of `cellpay_router::protect`), and the stale-balance
//! cache of the `balance_reads_stale` switch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellpay_core::{AccountId, CellId, Priority};
use cellpay_router::protect::hotkey::Side;
use cellpay_router::{Admission, Route};
use serde_json::Value;

use crate::error::ApiError;
use crate::{AppState, Caller};

/// The most balances the stale cache holds; a full cache starts over (I7).
pub const STALE_BALANCES_MAX: usize = 65_536;

/// Layers 1 and 2 for one request of `route`, costing `cost` units; answers
/// the request's priority class.
pub fn admit(state: &AppState, caller: Caller, route: Route, shadow: bool, cost: u32) -> Result<Priority, ApiError> {
    let cluster = state.cluster()?;
    let admission = Admission { route, token: Some(caller.token), shadow, cost };
    cluster.protection().admit(&admission)?;
    Ok(admission.class())
}

/// The route of a request from its method and path alone (before its body
/// is read); `None` for operator routes, which are never shed.
pub fn classify(method: &axum::http::Method, path: &str) -> Option<Route> {
    use axum::http::Method;
    Some(match (method, path) {
        (&Method::POST, "/v1/transfers" | "/v1/transfers/batch" | "/v1/accounts") => Route::Payments,
        (&Method::GET, p) if p.starts_with("/v1/transfers/") => Route::Status,
        (&Method::GET, p) if p.starts_with("/v1/accounts/") && p.ends_with("/entries") => Route::History,
        (&Method::GET, p) if p.starts_with("/v1/accounts/") => Route::Balance,
        _ => return None,
    })
}

/// Middleware, layer 0: the HTTP front's adaptive concurrency limit. It runs
/// after [`crate::intake`] has read the body, so the permit covers only our
/// own work: a request over its class's share is answered 503 `overloaded`;
/// an admitted one teaches the limit its latency, which never includes the
/// time its client took to send it.
pub async fn edge(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let shadow = crate::headers::shadow(request.headers()).unwrap_or(false);
    let (Ok(cluster), Some(route)) = (state.cluster(), classify(request.method(), request.uri().path())) else {
        return next.run(request).await;
    };
    let class = Priority::of(shadow, route.priority());
    let protection = cluster.protection().clone();
    let layers = protection.layers();
    let permit = match protection.enter(&layers, class) {
        Ok(permit) => permit,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let response = next.run(request).await;
    permit.done(response.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE);
    response
}

/// Layer 3 for a payment: its payer's and its payee's hot-key limits.
pub fn admit_payment(
    state: &AppState,
    class: Priority,
    shadow: bool,
    from: &AccountId,
    to: &AccountId,
) -> Result<(), ApiError> {
    let protection = state.cluster()?.protection();
    protection.admit_account(class, shadow, from, Side::Payer)?;
    protection.admit_account(class, shadow, to, Side::Payee)?;
    Ok(())
}

/// A balance as served: its body, the cell and epoch that served it, and when.
type Cached = (Value, CellId, u64, Instant);

/// Balances last read from the cells, by ledger and account.
#[derive(Default)]
pub struct StaleBalances {
    entries: Mutex<HashMap<(bool, AccountId), Cached>>,
}

impl StaleBalances {
    /// A cached balance no older than `max_age`, with its age.
    pub fn get(&self, shadow: bool, id: &AccountId, max_age: Duration) -> Option<(Value, CellId, u64, Duration)> {
        let entries = self.entries.lock().expect("stale cache lock");
        let (v, cell, epoch, at) = entries.get(&(shadow, id.clone()))?;
        let age = at.elapsed();
        (age <= max_age).then(|| (v.clone(), *cell, *epoch, age))
    }

    pub fn put(&self, shadow: bool, id: AccountId, view: Value, cell: CellId, epoch: u64) {
        let mut entries = self.entries.lock().expect("stale cache lock");
        if entries.len() >= STALE_BALANCES_MAX {
            entries.clear();
        }
        entries.insert((shadow, id), (view, cell, epoch, Instant::now()));
    }

    pub fn clear(&self) {
        self.entries.lock().expect("stale cache lock").clear();
    }
}
