//! cellpay-api: the HTTP v1 contract of DESIGN.md section 4.
//!
//! One axum router: `/v1/*` behind bearer-token auth, the operations
//! endpoints (`/metrics`, `/healthz`, `/readyz`, `/openapi.json`) without.
//! Every error is the contract's JSON error with its status; cell-served
//! answers carry `X-Cellpay-Cell` and `X-Cellpay-Epoch`.

pub mod auth;
pub mod body;
pub mod contract;
pub mod error;
pub mod exposition;
pub mod front;
pub mod gate;
pub mod guard;
pub mod headers;
pub mod intake;
pub mod listener;
pub mod metrics;
pub mod oplog;
pub mod request_id;
pub mod routes;
pub mod served;
pub mod views;

use std::sync::{Arc, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use cellpay_cell::{BoxFuture, CellSlot};
use cellpay_core::ErrorCode;
use cellpay_router::{Cluster, RelayHandle};
use metrics_exporter_prometheus::PrometheusHandle;

pub use auth::{Auth, Caller, Role, Token};
pub use error::ApiError;
pub use front::FrontLimits;

/// Scrapes of `/metrics` (and, apart, of `/dashboard/data`) answered per second (and at once), across all callers:
/// far above any Prometheus scrape interval, and a flood answers 429 cheaply.
pub const METRICS_SCRAPES_PER_S_MAX: u32 = 20;

fn ops_quota() -> governor::Quota {
    governor::Quota::per_second(std::num::NonZeroU32::new(METRICS_SCRAPES_PER_S_MAX).expect("a positive rate"))
}

/// The contract's limits on what one request may carry (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Request bodies beyond this answer 413 `payload_too_large`.
    pub body_bytes_max: usize,
    /// Transfers per batch request; beyond it, 413 `payload_too_large`.
    pub batch_items_max: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self { body_bytes_max: 4 << 20, batch_items_max: 8190 }
    }
}

pub struct Inner {
    pub auth: Auth,
    pub limits: ApiLimits,
    /// The front door's caps and timeouts (head sizes, body pace).
    pub front: FrontLimits,
    /// Bodies are read here, at their pace and within one budget, before the edge permit.
    pub intake: intake::Intake,
    /// Set once every cell has recovered; until then `/v1` answers 503.
    pub cluster: OnceLock<Arc<Cluster>>,
    pub local_cells: OnceLock<Vec<Arc<CellSlot>>>,
    /// Halting and restarting cells, for drills; unset: the drill endpoints answer 403.
    pub control: OnceLock<Arc<dyn CellControl>>,
    /// Moves shards between cells (the admin API's `shards/{id}/move`).
    pub mover: OnceLock<Arc<cellpay_router::Mover>>,
    /// Where an operator's switches and rules are kept for every router (the
    /// control plane); unset in `serve`, whose one router is the cluster.
    pub shared: OnceLock<Arc<dyn SharedSettings>>,
    /// Balances served while `balance_reads_stale` is on.
    pub stale: guard::StaleBalances,
    pub relays: OnceLock<Vec<RelayHandle>>,
    pub metrics: PrometheusHandle,
    /// `/metrics` answers at most [`METRICS_SCRAPES_PER_S_MAX`] a second (I7).
    pub metrics_limiter: governor::DefaultDirectRateLimiter,
    /// `/dashboard/data` too, with a budget of its own.
    pub dashboard_limiter: governor::DefaultDirectRateLimiter,
    /// Who did what to money and to the peak's settings; unset: nothing is recorded.
    pub oplog: OnceLock<Arc<oplog::OperatorLog>>,
    /// Requests answered, and those answered 503 (shed or unavailable), for the dashboard.
    pub answered: std::sync::atomic::AtomicU64,
    pub unavailable_answers: std::sync::atomic::AtomicU64,
    /// Answers and their latency per priority class, for the dashboard's charts.
    pub classes: metrics::ClassFigures,
    /// The front gate's prepared refusals.
    pub gate: gate::Gate,
}

/// Stops and starts a cell's engine in this process (the kill-cell drill).
pub trait CellControl: Send + Sync + 'static {
    /// Stops the cell's engine the way a crash would (no final checkpoint).
    fn halt(&self, cell: u32) -> BoxFuture<'_, Result<String, String>>;
    /// Recovers the cell from its store and starts its engine again.
    fn restart(&self, cell: u32) -> BoxFuture<'_, Result<String, String>>;
}

/// Keeps an operator's degrade switches and flow rules for every router.
pub trait SharedSettings: Send + Sync + 'static {
    fn set_switch<'a>(&'a self, name: &'a str, mode: cellpay_router::Mode) -> BoxFuture<'a, Result<(), String>>;
    fn set_rules<'a>(&'a self, rules: &'a cellpay_router::FlowRules) -> BoxFuture<'a, Result<(), String>>;
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(auth: Auth, limits: ApiLimits, front: FrontLimits) -> Self {
        Self(Arc::new(Inner {
            auth,
            limits,
            intake: intake::Intake::new(&front),
            front,
            cluster: OnceLock::new(),
            local_cells: OnceLock::new(),
            control: OnceLock::new(),
            mover: OnceLock::new(),
            shared: OnceLock::new(),
            stale: Default::default(),
            relays: OnceLock::new(),
            metrics: metrics::handle(),
            metrics_limiter: governor::RateLimiter::direct(ops_quota()),
            dashboard_limiter: governor::RateLimiter::direct(ops_quota()),
            oplog: OnceLock::new(),
            answered: Default::default(),
            unavailable_answers: Default::default(),
            classes: Default::default(),
            gate: Default::default(),
        }))
    }

    /// Appends an operator action to the operator log (when there is one). The
    /// action has taken effect already: a failed write is logged at ERROR.
    pub fn record(&self, action: oplog::Action<'_>) {
        let Some(log) = self.0.oplog.get() else { return };
        if let Err(e) = log.record(action) {
            tracing::error!("the operator log could not record an action that took effect: {e}");
        }
    }

    /// The cluster, or 503 while cells are still recovering.
    pub fn cluster(&self) -> Result<&Arc<Cluster>, ApiError> {
        self.0.cluster.get().ok_or_else(|| ApiError::new(ErrorCode::CellUnavailable, "the cluster is still recovering"))
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    use routes::{accounts, admin, dashboard, ops, transfers};
    let v1 = Router::new()
        .route("/v1/accounts", post(accounts::open))
        .route("/v1/accounts/{id}", get(accounts::get))
        .route("/v1/accounts/{id}/entries", get(accounts::entries))
        .route("/v1/transfers", post(transfers::create))
        .route("/v1/transfers/batch", post(transfers::batch))
        .route("/v1/transfers/{id}", get(transfers::status))
        .route("/v1/audit", get(ops::audit))
        .route("/v1/cluster", get(ops::cluster))
        .route("/v1/digests", get(ops::digests))
        .route("/v1/admin/degrade", get(admin::degrade).put(admin::replace_plan))
        .route("/v1/admin/degrade/{switch}", axum::routing::put(admin::set_switch))
        .route("/v1/admin/rules", get(admin::rules).put(admin::replace_rules))
        .route("/v1/admin/cells/{id}/halt", post(admin::halt))
        .route("/v1/admin/cells/{id}/restart", post(admin::restart))
        .route("/v1/admin/actions", get(admin::actions))
        .route("/v1/admin/shards/{id}/move", post(admin::move_shard))
        .route("/v1/admin/moves/resume", post(admin::resume_moves))
        .route("/v1/admin/moves", get(admin::moves))
        .route("/v1/admin/cells/{id}/drain", post(admin::drain_cell))
        .route("/v1/admin/rebalance", post(admin::rebalance))
        // Innermost: layer 0 of the protection stack. Its permit is taken only
        // once the body is in memory, so a slow client never holds one.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard::edge))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), intake::read_body))
        // Outermost: a request without a valid token costs a header check, not a body.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .merge(v1)
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(ops::openapi))
        .route("/dashboard", get(dashboard::page))
        // The dashboard's figures need a token; the page itself holds none.
        .merge(
            Router::new()
                .route("/dashboard/data", get(dashboard::data))
                .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token)),
        )
        .fallback(ops::no_route)
        // Bodies are read by the handlers within `ApiLimits`, answering our own 413.
        .layer(DefaultBodyLimit::disable())
        // Every answer in the contract's shape; head caps (414, 431) first.
        .layer(axum::middleware::from_fn_with_state(state.clone(), contract::shape))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        // Outermost: the request's id and span cover everything else, its log line too.
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}
