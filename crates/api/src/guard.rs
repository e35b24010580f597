//! The edge of the protection stack as handlers use it: classify a request,
//! pass it through the degrade switches, the rate limits and the hot-key
//! limits (layers 1–3 of `cellpay_router::protect`), and the stale-balance
//! cache of the `balance_reads_stale` switch.
//!
//! Layers 1 and 2 are not called by hand: a ledger handler takes an
//! [`Admitted`] argument, an extractor that classifies the request in
//! [`classify`] (the same table layer 0 uses) and admits it before the
//! handler runs, so a handler cannot forget it. The one handler whose cost is
//! known only from its body (a batch costs a unit per transfer) takes a
//! [`Classified`] instead, and gets its class only by admitting it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use cellpay_core::{AccountId, CellId, Priority};
use cellpay_router::protect::hotkey::Side;
use cellpay_router::{Admission, Route};
use serde_json::Value;

use crate::error::ApiError;
use crate::{AppState, Caller};

/// The most balances the stale cache holds; a full cache starts over (I7).
pub const STALE_BALANCES_MAX: usize = 65_536;

/// A ledger request that passed layers 1 and 2 at a cost of one unit.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    /// Whether it acts on the shadow ledger (`X-Cellpay-Shadow: 1`).
    pub shadow: bool,
    /// Its priority class, from its route and `shadow`.
    pub class: Priority,
}

/// A ledger request classified but not yet admitted: for a handler whose
/// cost is known only once its body is parsed. Its class comes only from
/// [`Classified::admit`].
#[derive(Debug, Clone, Copy)]
pub struct Classified {
    pub shadow: bool,
    route: Route,
    caller: Caller,
}

impl Classified {
    /// Layers 1 and 2 for this request, costing `cost` units.
    pub fn admit(self, state: &AppState, cost: u32) -> Result<Admitted, ApiError> {
        let admission = Admission { route: self.route, token: Some(self.caller.token), shadow: self.shadow, cost };
        state.cluster()?.protection().admit(&admission)?;
        Ok(Admitted { shadow: self.shadow, class: admission.class() })
    }
}

impl FromRequestParts<AppState> for Classified {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, ApiError> {
        let shadow = crate::headers::shadow(&parts.headers)?;
        let route = classify(&parts.method, matched(&parts.extensions))
            .expect("a handler that takes Classified or Admitted serves a ledger route, which classify names");
        let caller = *parts
            .extensions
            .get::<Caller>()
            .expect("a ledger route sits behind auth::require_token, which sets the Caller");
        Ok(Self { shadow, route, caller })
    }
}

impl FromRequestParts<AppState> for Admitted {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Classified::from_request_parts(parts, state).await?.admit(state, 1)
    }
}

/// The route of a request from its method and matched route (the path
/// template, e.g. `/v1/accounts/{id}`) alone, before its body is read: the one
/// table layer 0 and [`Classified`] share. `None` for operator routes, which
/// are never shed.
pub fn classify(method: &axum::http::Method, matched: &str) -> Option<Route> {
    crate::gate::classify_path(method, matched).map(|(route, _)| route)
}

/// The matched route of a request behind the router (see [`classify`]).
fn matched(extensions: &axum::http::Extensions) -> &str {
    extensions.get::<axum::extract::MatchedPath>().map_or("", |m| m.as_str())
}

/// Middleware, layer 0: the HTTP front's adaptive concurrency limit. It runs
/// after [`crate::intake`] has read the body, so the permit covers only our
/// own work: a request over its class's share is answered 503 `overloaded`;
/// an admitted one teaches the limit its latency from its arrival at the
/// front (so a queue in front of the permit counts), never including the
/// time its client took to send its body. The same figures feed the
/// degrade triggers ([`cellpay_router::Protection::observe_front`]).
pub async fn edge(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let shadow = crate::headers::shadow(request.headers()).unwrap_or(false);
    let (Ok(cluster), Some(route)) = (state.cluster(), classify(request.method(), matched(request.extensions())))
    else {
        return next.run(request).await;
    };
    let class = Priority::of(shadow, route.priority());
    let protection = cluster.protection().clone();
    let layers = protection.layers();
    let permit = match protection.enter(&layers, class) {
        Ok(permit) => permit,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let admitted = std::time::Instant::now();
    let sending = request.extensions().get::<crate::intake::BodyRead>().map_or(Duration::ZERO, |b| b.0);
    let waited = request
        .extensions()
        .get::<crate::gate::Arrival>()
        .map_or(Duration::ZERO, |a| admitted.saturating_duration_since(a.0).saturating_sub(sending));
    let response = next.run(request).await;
    let answered_after = waited + admitted.elapsed();
    permit.done_after(answered_after, response.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE);
    protection.observe_front(class, waited, answered_after);
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    /// Classified by the matched route, not the raw path: an account named
    /// `entries` is a balance read, as its handler is.
    #[test]
    fn a_request_is_classified_by_its_matched_route() {
        assert_eq!(classify(&Method::GET, "/v1/accounts/{id}"), Some(Route::Balance));
        assert_eq!(classify(&Method::GET, "/v1/accounts/{id}/entries"), Some(Route::History));
        assert_eq!(classify(&Method::POST, "/v1/transfers/batch"), Some(Route::Payments));
        assert_eq!(classify(&Method::GET, "/v1/transfers/{id}"), Some(Route::Status));
        assert_eq!(classify(&Method::GET, "/v1/admin/rules"), None, "operator routes are never shed");
    }
}
