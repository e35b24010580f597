//! Protection of the critical path (DESIGN.md section 6), as one stack.
//!
//! A request meets these layers in this order; each refuses cheaply, before
//! the next costs anything:
//!
//! | # | layer | per | refuses with |
//! |---|-------|-----|--------------|
//! | 0 | adaptive concurrency of the HTTP front, class shares ([`Protection::enter`]) | router | 503 `overloaded` |
//! | 1 | degrade switches ([`crate::degrade`]) | request | 503 `degraded` |
//! | 2 | rate limits per route and per token ([`rate`]) | request | 429 `rate_limited` |
//! | 3 | hot-key limits per payer / payee ([`hotkey`]) | account | 429 `rate_limited` |
//! | 4 | retry with a budget ([`retry`]) | call to a cell | (retries `cell_unavailable`) |
//! | 5 | circuit breaker ([`cellpay_cell::Breaker`]) | cell | 503 `cell_unavailable` |
//! | 6 | adaptive concurrency limit, class shares ([`concurrency`]) | cell | 503 `overloaded` |
//! | 7 | the cell's queue: class shares, then queue-delay shedding (CoDel) | cell | 503 `overloaded` |
//!
//! The front gate (`cellpay_api::gate`, [`Protection::gate`]) refuses from
//! the request head what layers 0 and 1 would refuse, before anything else is
//! spent on it. Layer 0's permit is taken once a request's body has been read
//! (its client's pace must never teach the limit); layers 1–3 once per HTTP request ([`Protection::admit`],
//! [`Protection::admit_account`]); 4–6 wrap every call the router makes to a
//! cell ([`Protection::call`]); 7 lives in the cell engine. Every refusal is
//! counted by layer and priority class. The flow rules behind 2–6 can be
//! replaced live; a replacement starts the limiters, breakers and budget afresh.

pub mod concurrency;
pub mod hotkey;
pub mod rate;
pub mod retry;
pub mod rules;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cellpay_cell::{Breaker, CellClient, EngineError};
use cellpay_core::{AccountId, CellId, Priority};
use hdrhistogram::Histogram;

use crate::degrade::{Action, Degrade, Plan, Signals};
use concurrency::AdaptiveLimit;
use hotkey::{HotKeys, Side};
use rate::EdgeLimits;
use retry::RetryBudget;
use rules::{FlowRules, Route};

/// Where a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Edge,
    Degrade,
    RateLimit,
    HotKey,
    Breaker,
    Concurrency,
}

impl Layer {
    pub const ALL: [Layer; 6] =
        [Layer::Edge, Layer::Degrade, Layer::RateLimit, Layer::HotKey, Layer::Breaker, Layer::Concurrency];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Edge => "edge",
            Layer::Degrade => "degrade",
            Layer::RateLimit => "rate_limit",
            Layer::HotKey => "hot_key",
            Layer::Breaker => "breaker",
            Layer::Concurrency => "concurrency",
        }
    }
}

/// Why the router did not (or could not) serve a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Degraded(String),
    #[error("cell {cell} is unavailable: {reason}")]
    Unavailable { cell: CellId, reason: String },
    /// The cell does not own the shard at its epoch (a shard moved), or works
    /// at an older map than the router's: retried, and never counted against
    /// the cell's breaker.
    #[error("cell {cell} refused the call as wrong_cell: {reason}")]
    WrongCell { cell: CellId, reason: String },
}

impl RouteError {
    /// Whether a retry may help: the cell could not serve it at all.
    fn retryable(&self) -> bool {
        matches!(
            self,
            RouteError::Engine(EngineError::Unavailable { .. })
                | RouteError::Unavailable { .. }
                | RouteError::WrongCell { .. }
        )
    }

    /// Whether the cell said it has too much to do.
    fn congested(&self) -> bool {
        matches!(self, RouteError::Engine(EngineError::Overloaded { .. } | EngineError::Shed { .. }))
    }
}

/// The breaker and concurrency limit of one cell.
pub struct CellGuard {
    pub breaker: Breaker,
    pub limit: AdaptiveLimit,
}

/// The layers built from one set of flow rules, at this router's share.
pub struct Layers {
    /// The cluster-wide rules (what an operator set).
    pub rules: FlowRules,
    /// The routers that share the rate limits (this one among them).
    pub routers: u32,
    rates: EdgeLimits,
    pub hot_keys: HotKeys,
    pub edge: AdaptiveLimit,
    pub cells: Vec<CellGuard>,
    retry: RetryBudget,
}

impl Layers {
    fn new(rules: FlowRules, token_roles: &[String], cells: usize, routers: u32) -> Self {
        let roles: Vec<&str> = token_roles.iter().map(String::as_str).collect();
        let share = rules.shared(routers);
        Self {
            rates: EdgeLimits::new(&share, &roles),
            hot_keys: HotKeys::new(share.hot_keys),
            routers,
            edge: AdaptiveLimit::new(rules.edge_concurrency),
            cells: (0..cells)
                .map(|_| CellGuard {
                    breaker: Breaker::new(rules.breaker),
                    limit: AdaptiveLimit::new(rules.concurrency),
                })
                .collect(),
            retry: RetryBudget::new(rules.retry),
            rules,
        }
    }
}

/// Counters that outlive a change of rules.
#[derive(Default)]
pub struct Counters {
    /// Refusals by layer (index of [`Layer::ALL`]) and class (rank).
    pub refused: [[AtomicU64; 4]; 6],
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Retries wanted that the budget refused.
    pub retries_refused: AtomicU64,
    pub rules_changes: AtomicU64,
    /// Critical requests that reached the front gate, and those the front
    /// refused (the edge limit, at the gate or at its permit).
    pub front_critical: AtomicU64,
    pub front_critical_refused: AtomicU64,
}

impl Counters {
    fn refuse(&self, layer: Layer, class: Priority) {
        let l = Layer::ALL.iter().position(|x| *x == layer).expect("every layer is listed");
        self.refused[l][class.rank()].fetch_add(1, Relaxed);
        if layer == Layer::Edge && class == Priority::Critical {
            self.front_critical_refused.fetch_add(1, Relaxed);
        }
    }

    pub fn refused(&self, layer: Layer, class: Priority) -> u64 {
        let l = Layer::ALL.iter().position(|x| *x == layer).expect("every layer is listed");
        self.refused[l][class.rank()].load(Relaxed)
    }
}

/// Requests and calls measured since the signals were last read.
struct Window {
    /// Critical requests at the HTTP front, from arrival to answer.
    critical_us: Histogram<u64>,
    /// The shortest wait from arrival to admission of any request (CoDel's
    /// standing queue: one slow client cannot raise it, a queue raises them all).
    front_wait_min_us: u64,
    calls: u64,
    failed: u64,
    /// The front's critical counters when the window opened.
    front_critical_at_open: (u64, u64),
}

impl Window {
    fn new() -> Self {
        Self {
            critical_us: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
            front_wait_min_us: u64::MAX,
            calls: 0,
            failed: 0,
            front_critical_at_open: (0, 0),
        }
    }
}

pub struct Protection {
    layers: RwLock<Arc<Layers>>,
    token_roles: Vec<String>,
    cells: usize,
    pub degrade: Degrade,
    pub counters: Counters,
    window: Mutex<Window>,
}

/// Why the front gate refused a request from its head alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// Its class's share of the edge concurrency limit is full (layer 0).
    Overloaded,
    /// A degrade switch refuses its route or class (layer 1).
    Degraded(Action),
}

impl GateRefusal {
    pub fn layer(self) -> Layer {
        match self {
            GateRefusal::Overloaded => Layer::Edge,
            GateRefusal::Degraded(_) => Layer::Degrade,
        }
    }
}

/// What the edge knows of a request before any cell is asked.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub route: Route,
    /// The number of the token that sent it, as the API numbers them.
    pub token: Option<usize>,
    pub shadow: bool,
    /// Units it takes from the rate limits (items of a batch).
    pub cost: u32,
}

impl Admission {
    /// The request's priority class: its route's, or shadow.
    pub fn class(&self) -> Priority {
        Priority::of(self.shadow, self.route.priority())
    }
}

impl Protection {
    /// `token_roles[i]` is the role of token `i`.
    pub fn new(rules: FlowRules, plan: Plan, token_roles: Vec<String>, cells: usize) -> Self {
        Self {
            layers: RwLock::new(Arc::new(Layers::new(rules, &token_roles, cells, 1))),
            token_roles,
            cells,
            degrade: Degrade::new(plan),
            counters: Counters::default(),
            window: Mutex::new(Window::new()),
        }
    }

    pub fn layers(&self) -> Arc<Layers> {
        self.layers.read().expect("rules lock is never held across a panic").clone()
    }

    pub fn rules(&self) -> FlowRules {
        self.layers().rules.clone()
    }

    /// Installs checked rules; the caller checked them (`FlowRules::check`).
    pub fn replace_rules(&self, rules: FlowRules) {
        let routers = self.layers().routers;
        let layers = Arc::new(Layers::new(rules, &self.token_roles, self.cells, routers));
        *self.layers.write().expect("rules lock is never held across a panic") = layers;
        self.counters.rules_changes.fetch_add(1, Relaxed);
        metrics::counter!("cellpay_rules_changes_total").increment(1);
        tracing::warn!("flow rules replaced");
    }

    /// Sets how many routers share the cluster-wide rate limits (from the
    /// control plane's live router count). Buckets start full again, as on
    /// any change of rules.
    pub fn set_routers(&self, routers: u32) {
        let routers = routers.max(1);
        let current = self.layers();
        if current.routers == routers {
            return;
        }
        let layers = Arc::new(Layers::new(current.rules.clone(), &self.token_roles, self.cells, routers));
        *self.layers.write().expect("rules lock is never held across a panic") = layers;
        tracing::info!(routers, "rate limits shared among {routers} routers");
    }

    /// Layer 0: a request of `class` enters the HTTP front, or is refused at
    /// once. Hold the permit until the response is ready, then report it.
    pub fn enter<'a>(&self, layers: &'a Layers, class: Priority) -> Result<concurrency::Permit<'a>, RouteError> {
        layers.edge.try_acquire(class).ok_or_else(|| {
            self.counters.refuse(Layer::Edge, class);
            RouteError::Overloaded(format!(
                "the router is at its concurrency limit for {} requests ({} in flight)",
                class.as_str(),
                layers.edge.in_flight()
            ))
        })
    }

    /// The front gate: layers 0 and 1 as far as a request's head tells them
    /// (its route and class), taking nothing. `Some` names the layer that
    /// refuses it, counted here; the caller answers at once. A request that
    /// passes still meets both layers for real afterwards.
    pub fn gate(&self, layers: &Layers, route: Route, class: Priority) -> Option<GateRefusal> {
        if class == Priority::Critical {
            self.counters.front_critical.fetch_add(1, Relaxed);
        }
        let refusal = match self.switched_off(route, class) {
            Some(action) => GateRefusal::Degraded(action),
            None if !layers.edge.has_room(class) => GateRefusal::Overloaded,
            None => return None,
        };
        self.counters.requests.fetch_add(1, Relaxed);
        self.counters.refuse(refusal.layer(), class);
        Some(refusal)
    }

    /// The degrade switch that refuses requests of `route` and `class`, if one is on.
    fn switched_off(&self, route: Route, class: Priority) -> Option<Action> {
        match (class, route) {
            (Priority::Shadow, _) if self.degrade.is_on(Action::ShadowOff) => Some(Action::ShadowOff),
            (_, Route::History) if self.degrade.is_on(Action::HistoryOff) => Some(Action::HistoryOff),
            _ => None,
        }
    }

    /// Layers 1 and 2: degrade switches, then rate limits per route and token.
    pub fn admit(&self, a: &Admission) -> Result<(), RouteError> {
        self.counters.requests.fetch_add(1, Relaxed);
        let class = a.class();
        if let Some(action) = self.switched_off(a.route, class) {
            self.counters.refuse(Layer::Degrade, class);
            return Err(RouteError::Degraded(format!("degraded: switch {} is on", action.as_str())));
        }
        self.layers().rates.admit(a.route, a.token, a.cost).map_err(|e| {
            self.counters.refuse(Layer::RateLimit, class);
            RouteError::RateLimited(e.0)
        })
    }

    /// Layer 3: the hot-key limit of one account a request touches.
    pub fn admit_account(
        &self,
        class: Priority,
        shadow: bool,
        account: &AccountId,
        side: Side,
    ) -> Result<(), RouteError> {
        self.layers().hot_keys.admit(shadow, account, side).map_err(|rate| {
            self.counters.refuse(Layer::HotKey, class);
            RouteError::RateLimited(format!(
                "account {account} is over its hot-key limit of {} per second (burst {})",
                rate.rate_per_s, rate.burst
            ))
        })
    }

    /// Layers 4–6 around one call to `cell`: `attempt` makes the call afresh
    /// each time (a retry repeats it, so it must be idempotent). Only
    /// `cell_unavailable` and `wrong_cell` are retried.
    pub async fn call<T, F, Fut>(&self, cell: &dyn CellClient, class: Priority, attempt: F) -> Result<T, RouteError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, RouteError>>,
    {
        let layers = self.layers();
        layers.retry.request();
        let mut tries = 1;
        loop {
            let result = self.once(&layers, cell, class, &attempt).await;
            match &result {
                Err(e) if e.retryable() && tries < layers.retry.attempts_max() => match layers.retry.retry(tries) {
                    Some(wait) => {
                        self.counters.retries.fetch_add(1, Relaxed);
                        tokio::time::sleep(wait).await;
                        tries += 1;
                    }
                    None => {
                        self.counters.retries_refused.fetch_add(1, Relaxed);
                        return result;
                    }
                },
                _ => return result,
            }
        }
    }

    async fn once<T, F, Fut>(
        &self,
        layers: &Layers,
        cell: &dyn CellClient,
        class: Priority,
        attempt: &F,
    ) -> Result<T, RouteError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, RouteError>>,
    {
        let id = cell.cell();
        let guard = &layers.cells[id.0 as usize];
        let Some(permit) = guard.limit.try_acquire(class) else {
            self.counters.refuse(Layer::Concurrency, class);
            return Err(RouteError::Overloaded(format!(
                "cell {id} is at its concurrency limit for {} requests ({} in flight)",
                class.as_str(),
                guard.limit.in_flight()
            )));
        };
        let serving = || cell.status().health.is_serving();
        let mut passed = guard.breaker.try_pass();
        if passed.is_err() {
            if !serving() {
                guard.breaker.cell_seen_down();
            } else if guard.breaker.cell_seen_serving() {
                // The cell was down and serves again (restarted): probe it now.
                passed = guard.breaker.try_pass();
            }
        }
        let pass = match passed {
            Ok(pass) => pass,
            Err(open) => {
                drop(permit);
                self.counters.refuse(Layer::Breaker, class);
                let reason = format!("its circuit breaker is open; retry in {} ms", open.retry_after.as_millis());
                return Err(RouteError::Unavailable { cell: id, reason });
            }
        };
        let result = attempt().await;
        let failed = matches!(result, Err(RouteError::Engine(EngineError::Unavailable { .. })));
        let congested = result.as_ref().err().is_some_and(RouteError::congested);
        permit.done(congested);
        guard.breaker.record(pass, failed);
        if failed && !serving() {
            guard.breaker.cell_seen_down();
        }
        let mut w = self.window.lock().expect("window lock is never held across a panic");
        w.calls += 1;
        w.failed += u64::from(failed || congested);
        result
    }

    /// The front's signal for one admitted HTTP request: `waited` from its
    /// arrival to its admission (its client's time sending the body left
    /// out), `answered_after` from its arrival to its answer (the same left out).
    pub fn observe_front(&self, class: Priority, waited: Duration, answered_after: Duration) {
        let mut w = self.window.lock().expect("window lock is never held across a panic");
        w.front_wait_min_us = w.front_wait_min_us.min(waited.as_micros() as u64);
        if class == Priority::Critical {
            w.critical_us.saturating_record(answered_after.as_micros().max(1) as u64);
        }
    }

    /// The signals over the calls since the last read, and the cells' queue delay.
    pub fn signals(&self, cells: &[Arc<dyn CellClient>]) -> Signals {
        let front_critical =
            (self.counters.front_critical.load(Relaxed), self.counters.front_critical_refused.load(Relaxed));
        let mut next = Window::new();
        next.front_critical_at_open = front_critical;
        let w = std::mem::replace(&mut *self.window.lock().expect("window lock"), next);
        let (seen, refused) = (
            front_critical.0.saturating_sub(w.front_critical_at_open.0),
            front_critical.1.saturating_sub(w.front_critical_at_open.1),
        );
        let queue_delay_us = cells.iter().map(|c| c.status().queue_delay_us).max().unwrap_or(0);
        let front_wait_us = if w.front_wait_min_us == u64::MAX { 0 } else { w.front_wait_min_us };
        Signals {
            critical_p99_ms: w.critical_us.value_at_quantile(0.99) as f64 / 1e3,
            front_delay_ms: front_wait_us as f64 / 1e3,
            critical_shed_ratio: if seen == 0 { 0.0 } else { (refused as f64 / seen as f64).min(1.0) },
            queue_delay_ms: queue_delay_us as f64 / 1e3,
            error_ratio: if w.calls == 0 { 0.0 } else { w.failed as f64 / w.calls as f64 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::degrade::{Mode, PLAN_BUNDLED};

    fn protection(edge_initial: u32) -> Protection {
        let mut rules = FlowRules::default();
        rules.edge_concurrency.initial = edge_initial;
        rules.edge_concurrency.min = 1;
        Protection::new(rules, Plan::from_toml(PLAN_BUNDLED).unwrap(), vec!["client".into()], 2)
    }

    /// The gate refuses what the head decides (a full share of the edge
    /// limit, a degrade switch), counts it where the stack counts refusals,
    /// and takes nothing from the limit.
    #[test]
    fn the_gate_refuses_a_full_class_share_and_switched_off_routes_and_takes_nothing() {
        let p = protection(8);
        let layers = p.layers();
        assert_eq!(p.gate(&layers, Route::Payments, Priority::Shadow), None);
        // Shadow may fill 2 of 8; critical traffic takes them.
        let held: Vec<_> = (0..2).map(|_| layers.edge.try_acquire(Priority::Critical).unwrap()).collect();
        assert_eq!(p.gate(&layers, Route::Payments, Priority::Shadow), Some(GateRefusal::Overloaded));
        assert_eq!(p.gate(&layers, Route::History, Priority::History), None, "history may fill 4");
        assert_eq!(p.gate(&layers, Route::Payments, Priority::Critical), None);
        assert_eq!(layers.edge.in_flight(), 2, "the gate only peeks");
        assert_eq!(p.counters.refused(Layer::Edge, Priority::Shadow), 1);
        drop(held);
        p.degrade.set("history_off", Mode::On).unwrap();
        assert_eq!(p.gate(&layers, Route::History, Priority::History), Some(GateRefusal::Degraded(Action::HistoryOff)));
        assert_eq!(p.gate(&layers, Route::Balance, Priority::Reads), None);
        p.degrade.set("shadow_off", Mode::On).unwrap();
        assert_eq!(p.gate(&layers, Route::Balance, Priority::Shadow), Some(GateRefusal::Degraded(Action::ShadowOff)));
        assert_eq!(p.counters.refused(Layer::Degrade, Priority::History), 1);
        assert_eq!(p.counters.refused(Layer::Degrade, Priority::Shadow), 1);
        assert_eq!(p.counters.requests.load(Relaxed), 3, "each refusal is a request the stack saw");
    }

    /// The share of critical requests the front refuses is a signal of its
    /// own, window by window: the front saturating is what turns shadow off.
    #[test]
    fn the_critical_shed_ratio_counts_front_refusals_of_critical_requests_per_window() {
        let p = protection(4);
        let layers = p.layers();
        assert_eq!(p.signals(&[]).critical_shed_ratio, 0.0, "nothing seen, nothing shed");
        let held: Vec<_> = (0..4).map(|_| layers.edge.try_acquire(Priority::Critical).unwrap()).collect();
        for _ in 0..3 {
            assert_eq!(p.gate(&layers, Route::Payments, Priority::Critical), Some(GateRefusal::Overloaded));
        }
        assert!(p.enter(&layers, Priority::Critical).is_err(), "refused at the permit too");
        drop(held);
        assert_eq!(p.gate(&layers, Route::Payments, Priority::Critical), None);
        // Four critical requests reached the gate; three were refused there and one at its permit.
        assert_eq!(p.signals(&[]).critical_shed_ratio, 1.0);
        assert_eq!(p.gate(&layers, Route::Status, Priority::Critical), None);
        assert_eq!(p.signals(&[]).critical_shed_ratio, 0.0, "a new window starts afresh");
    }
}
