//! The front gate: the first check a request meets once hyper has parsed its
//! head, before the axum router, auth, the body and every middleware.
//!
//! At three times capacity two requests in three must be refused, and a
//! refusal that costs a third of a served payment eats the machine (the
//! overload drill in BENCHMARKS). The gate refuses what the head alone
//! decides, from prepared bytes, with no auth, no body read, no routing, no
//! JSON and no span:
//! - a class whose share of the edge concurrency limit (layer 0) is full;
//! - shadow traffic while `shadow_off` is on, history while `history_off` is on (layer 1).
//!
//! A refused request's body is not read: hyper drains a small one already in
//! its buffer (the connection stays open for the next request) and closes the
//! connection otherwise, so a refused upload costs nothing more. What passes
//! meets the whole stack as before; layer 0 still takes its permit only once
//! the body is in memory (a slow client never holds one), so the gate only
//! peeks at the limit, and a request it lets through may be refused by the
//! permit a moment later.
//!
//! Each refusal is counted as the stack counts it (`cellpay_shed_total` by
//! layer and class) and as every answer is (route, code, class, duration),
//! with the tenant `(unknown)`: the gate answers before auth. Its answers are
//! the contract's JSON error with the id the request came with, or a new one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use cellpay_core::{ErrorCode, Priority};
use cellpay_router::protect::GateRefusal;
use cellpay_router::{Action, Route};

use crate::error::ApiError;
use crate::metrics::AnswerSeries;
use crate::request_id::{self, X_REQUEST_ID};
use crate::AppState;

/// When hyper handed the request to us: the front's own clock for it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// The ledger routes by method and path; the path may be a request's own or
/// a matched template (`/v1/accounts/{id}`): both have the same segments. An
/// account named `entries` is a balance read (`/v1/accounts/entries`), a
/// transfer named `batch` a status read. `None` for every other route
/// (operator routes are never shed).
pub fn classify_path(method: &Method, path: &str) -> Option<(Route, &'static str)> {
    let mut segments = path.strip_prefix("/v1/")?.split('/');
    let first = segments.next()?;
    let (second, third, rest) = (segments.next(), segments.next(), segments.next());
    if rest.is_some() || second == Some("") || third == Some("") {
        return None;
    }
    Some(match (method, first, second, third) {
        (&Method::POST, "transfers", None, None) => (Route::Payments, "/v1/transfers"),
        (&Method::POST, "transfers", Some("batch"), None) => (Route::Payments, "/v1/transfers/batch"),
        (&Method::POST, "accounts", None, None) => (Route::Payments, "/v1/accounts"),
        (&Method::GET, "transfers", Some(_), None) => (Route::Status, "/v1/transfers/{id}"),
        (&Method::GET, "accounts", Some(_), Some("entries")) => (Route::History, "/v1/accounts/{id}/entries"),
        (&Method::GET, "accounts", Some(_), None) => (Route::Balance, "/v1/accounts/{id}"),
        _ => return None,
    })
}

/// The templates [`classify_path`] answers, in the order [`Gate`] keeps their handles.
const TEMPLATES: [&str; 6] = [
    "/v1/transfers",
    "/v1/transfers/batch",
    "/v1/accounts",
    "/v1/transfers/{id}",
    "/v1/accounts/{id}/entries",
    "/v1/accounts/{id}",
];

/// Prepared answers and resolved metric handles of the front gate.
pub struct Gate {
    /// `overloaded` per class (rank).
    overloaded: [Bytes; 4],
    shadow_off: Bytes,
    history_off: Bytes,
    handles: [[OnceLock<AnswerSeries>; 4]; TEMPLATES.len()],
    /// Requests past the gate and not yet answered (`cellpay_front_in_flight`).
    in_flight: AtomicU64,
}

/// A request past the gate, until its answer (or its client's going away).
pub struct Passed<'a>(&'a AtomicU64);

impl Drop for Passed<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Default for Gate {
    fn default() -> Self {
        let body = |code: ErrorCode, message: String| {
            Bytes::from(serde_json::json!({"error": ApiError::new(code, message).body()}).to_string())
        };
        let degraded =
            |action: Action| body(ErrorCode::Degraded, format!("degraded: switch {} is on", action.as_str()));
        Self {
            overloaded: Priority::ALL.map(|class| {
                body(
                    ErrorCode::Overloaded,
                    format!("the router is at its concurrency limit for {} requests; retry later", class.as_str()),
                )
            }),
            shadow_off: degraded(Action::ShadowOff),
            history_off: degraded(Action::HistoryOff),
            handles: Default::default(),
            in_flight: AtomicU64::new(0),
        }
    }
}

impl Gate {
    /// Marks a request that passed the gate, until the guard drops.
    pub fn pass(&self) -> Passed<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        Passed(&self.in_flight)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    fn body(&self, refusal: GateRefusal, class: Priority) -> Bytes {
        match refusal {
            GateRefusal::Overloaded => self.overloaded[class.rank()].clone(),
            GateRefusal::Degraded(Action::HistoryOff) => self.history_off.clone(),
            GateRefusal::Degraded(_) => self.shadow_off.clone(),
        }
    }

    fn handles(&self, template: &'static str, class: Priority) -> &AnswerSeries {
        let t = TEMPLATES.iter().position(|t| *t == template).expect("classify_path answers only TEMPLATES");
        self.handles[t][class.rank()]
            .get_or_init(|| AnswerSeries::new(template, Some(StatusCode::SERVICE_UNAVAILABLE), Some(class), None))
    }
}

/// The gate for one request head: `Some` answer when it is refused here.
pub fn check<B>(state: &AppState, request: &Request<B>, arrived: Instant) -> Option<Response<Body>> {
    let cluster = state.cluster.get()?;
    let (route, template) = classify_path(request.method(), request.uri().path())?;
    // A bad shadow header is the router's 400 to give, not a refusal.
    let shadow = crate::headers::shadow(request.headers()).ok()?;
    let class = Priority::of(shadow, route.priority());
    let protection = cluster.protection();
    let refusal = protection.gate(&protection.layers(), route, class)?;
    let id = match request.headers().get(&X_REQUEST_ID) {
        Some(v) if request_id::sane(v) => v.clone(),
        _ => request_id::generate(),
    };
    record(state, template, class, arrived);
    if let Some(suppressed) = request_id::warn_line_allowed() {
        tracing::warn!(id = %id.to_str().unwrap_or_default(), method = %request.method(), route = template, status = 503, suppressed, layer = refusal.layer().as_str(), "request refused at the front gate");
    }
    let mut response = Response::new(Body::from(state.gate.body(refusal, class)));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(crate::error::RETRY_AFTER_S));
    headers.insert(X_REQUEST_ID.clone(), id);
    Some(response)
}

/// What `metrics::track` records for every answer, for one refused here.
fn record(state: &AppState, template: &'static str, class: Priority, arrived: Instant) {
    let seconds = arrived.elapsed().as_secs_f64();
    state.gate.handles(template, class).record(seconds);
    crate::metrics::answered(state, Some(class), Some(StatusCode::SERVICE_UNAVAILABLE), seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_paths_and_templates_classify_alike() {
        let get = &Method::GET;
        let post = &Method::POST;
        assert_eq!(classify_path(post, "/v1/transfers"), Some((Route::Payments, "/v1/transfers")));
        assert_eq!(classify_path(post, "/v1/transfers/batch"), Some((Route::Payments, "/v1/transfers/batch")));
        assert_eq!(classify_path(post, "/v1/accounts"), Some((Route::Payments, "/v1/accounts")));
        assert_eq!(classify_path(get, "/v1/transfers/t-1"), Some((Route::Status, "/v1/transfers/{id}")));
        assert_eq!(classify_path(get, "/v1/transfers/{id}"), Some((Route::Status, "/v1/transfers/{id}")));
        assert_eq!(classify_path(get, "/v1/accounts/a1/entries").map(|r| r.0), Some(Route::History));
        assert_eq!(classify_path(get, "/v1/accounts/{id}/entries").map(|r| r.0), Some(Route::History));
        assert_eq!(classify_path(get, "/v1/accounts/entries").map(|r| r.0), Some(Route::Balance));
        assert_eq!(classify_path(get, "/v1/transfers/batch").map(|r| r.0), Some(Route::Status));
        for (m, p) in [
            (get, "/v1/admin/rules"),
            (post, "/v1/transfers/t-1"),
            (get, "/v1/transfers"),
            (get, "/v1/accounts/a1/entries/x"),
            (get, "/v1/accounts/"),
            (get, "/v1/accounts//entries"),
            (get, "/metrics"),
            (post, "/v2/transfers"),
        ] {
            assert_eq!(classify_path(m, p), None, "{m} {p}");
        }
        for t in TEMPLATES {
            let method = if t.ends_with("{id}") || t.ends_with("entries") { get } else { post };
            assert_eq!(classify_path(method, t).map(|r| r.1), Some(t));
        }
    }
}
