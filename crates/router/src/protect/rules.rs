//! Flow rules: the numbers every protection layer works with, read from TOML
//! at start and changeable live (`PUT /v1/admin/rules`). A rule set is checked
//! as a whole before it replaces the old one, so a bad change leaves the old
//! rules in force.

use std::collections::BTreeMap;

pub use cellpay_cell::BreakerRules;
use serde::{Deserialize, Serialize};

/// The largest rate any rule may name, per second (I7).
pub const RATE_PER_S_MAX: u32 = 10_000_000;
/// The largest number of hot keys a router may track (I7).
pub const KEYS_TRACKED_MAX: usize = 4 << 20;
/// Retries may never exceed this share of requests (DESIGN.md section 6).
pub const RETRY_PERCENT_MAX: f32 = 10.0;

/// A token bucket: `rate_per_s` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate_per_s: u32,
    pub burst: u32,
}

/// The routes the edge limits, each its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// `POST /v1/transfers`, each item of `POST /v1/transfers/batch`, `POST /v1/accounts`.
    Payments,
    /// `GET /v1/transfers/{id}`.
    Status,
    /// `GET /v1/accounts/{id}`.
    Balance,
    /// `GET /v1/accounts/{id}/entries`.
    History,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Payments, Route::Status, Route::Balance, Route::History];

    /// The priority class of the route's real (not shadow) requests.
    pub fn priority(self) -> cellpay_core::Priority {
        use cellpay_core::Priority;
        match self {
            Route::Payments | Route::Status => Priority::Critical,
            Route::Balance => Priority::Reads,
            Route::History => Priority::History,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Payments => "payments",
            Route::Status => "status",
            Route::Balance => "balance",
            Route::History => "history",
        }
    }
}

/// Per-account limits: hot merchants (payees) and hot payers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotKeyRules {
    /// Every payee (and account read) at most this; none: unlimited.
    #[serde(default)]
    pub payee: Option<Rate>,
    /// Every payer at most this; none: unlimited (a bank funding accounts is a hot payer by design).
    #[serde(default)]
    pub payer: Option<Rate>,
    /// Named accounts with their own limit, payer or payee (a known hot merchant).
    #[serde(default)]
    pub accounts: BTreeMap<String, Rate>,
    /// Keys remembered at most; a full table forgets keys whose bucket is full again.
    pub keys_tracked_max: usize,
}

/// The adaptive concurrency limit per cell (AIMD on measured latency).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyRules {
    pub initial: u32,
    pub min: u32,
    pub max: u32,
    /// A call slower than this (or shed by the cell) shrinks the limit.
    pub latency_target_ms: u32,
}

/// The router's retries: only idempotent requests, only on `cell_unavailable`
/// or `wrong_cell`, within a budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryRules {
    /// Retries as a share of requests, over the last 10 seconds (at most 10).
    pub budget_percent: f32,
    /// Attempts per request, the first included.
    pub attempts_max: u32,
    pub backoff_base_ms: u32,
    pub backoff_max_ms: u32,
}

/// The largest outbox limit a rule may set, per destination cell (I7).
pub const OUTBOX_MESSAGES_MAX_LIMIT: u64 = 1 << 24;

fn outbox_messages_max_default() -> u64 {
    cellpay_cell::OUTBOX_MESSAGES_MAX_DEFAULT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRules {
    /// Undelivered cross-cell credits a cell may hold per destination cell
    /// (and ledger); past it, cross-cell payments to that cell answer 503
    /// `outbox_full` with Retry-After until the relay drains them.
    #[serde(default = "outbox_messages_max_default")]
    pub outbox_messages_max: u64,
    /// Per route, across all tokens; a route not named is not limited.
    #[serde(default)]
    pub routes: BTreeMap<Route, Rate>,
    /// Per token of the role named (each token its own bucket); a role not named is not limited.
    #[serde(default)]
    pub tokens: BTreeMap<String, Rate>,
    pub hot_keys: HotKeyRules,
    /// Requests in flight in this router's HTTP front, all cells together:
    /// beyond it a request is refused (once its body has been read).
    pub edge_concurrency: ConcurrencyRules,
    /// Calls in flight to each cell.
    pub concurrency: ConcurrencyRules,
    pub breaker: BreakerRules,
    pub retry: RetryRules,
}

impl Default for FlowRules {
    fn default() -> Self {
        Self {
            outbox_messages_max: outbox_messages_max_default(),
            routes: BTreeMap::new(),
            tokens: BTreeMap::new(),
            hot_keys: HotKeyRules {
                payee: Some(Rate { rate_per_s: 20_000, burst: 5_000 }),
                payer: None,
                accounts: BTreeMap::new(),
                keys_tracked_max: 65_536,
            },
            edge_concurrency: ConcurrencyRules { initial: 512, min: 32, max: 8192, latency_target_ms: 50 },
            concurrency: ConcurrencyRules { initial: 256, min: 8, max: 4096, latency_target_ms: 50 },
            breaker: BreakerRules::default(),
            retry: RetryRules { budget_percent: 10.0, attempts_max: 3, backoff_base_ms: 10, backoff_max_ms: 200 },
        }
    }
}

impl Rate {
    /// This rate's share for one of `routers` routers that each enforce it
    /// apart: rate and burst divided, rounded up, never below 1.
    pub fn share(self, routers: u32) -> Rate {
        let n = routers.max(1);
        Rate { rate_per_s: self.rate_per_s.div_ceil(n).max(1), burst: self.burst.div_ceil(n).max(1) }
    }
}

impl FlowRules {
    /// The limits one of `routers` routers enforces so that together they
    /// keep the cluster-wide promise: every rate (per route, per token, per
    /// hot key) divided among them. Concurrency limits and breakers guard
    /// this router's own resources and are not divided.
    pub fn shared(&self, routers: u32) -> FlowRules {
        let mut out = self.clone();
        out.routes.values_mut().for_each(|r| *r = r.share(routers));
        out.tokens.values_mut().for_each(|r| *r = r.share(routers));
        let h = &mut out.hot_keys;
        h.payee = h.payee.map(|r| r.share(routers));
        h.payer = h.payer.map(|r| r.share(routers));
        h.accounts.values_mut().for_each(|r| *r = r.share(routers));
        out
    }
}

/// Why a rule set (or a degrade plan) was refused; the old one stays in force.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A value out of its range; the message names the field and the range.
    #[error("{0}")]
    OutOfRange(String),
}

impl From<String> for RulesError {
    fn from(message: String) -> Self {
        RulesError::OutOfRange(message)
    }
}

fn check_rate(what: &str, r: &Rate) -> Result<(), RulesError> {
    if !(1..=RATE_PER_S_MAX).contains(&r.rate_per_s) || !(1..=RATE_PER_S_MAX).contains(&r.burst) {
        return Err(format!("{what}: rate_per_s and burst must be between 1 and {RATE_PER_S_MAX}").into());
    }
    Ok(())
}

impl FlowRules {
    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let rules: Self = toml::from_str(text)?;
        rules.check()?;
        Ok(rules)
    }

    pub fn from_json(text: &[u8]) -> Result<Self, RulesError> {
        let rules: Self = serde_json::from_slice(text)?;
        rules.check()?;
        Ok(rules)
    }

    /// Every number in range; the message names the first that is not.
    pub fn check(&self) -> Result<(), RulesError> {
        if !(1..=OUTBOX_MESSAGES_MAX_LIMIT).contains(&self.outbox_messages_max) {
            return Err(format!("outbox_messages_max must be between 1 and {OUTBOX_MESSAGES_MAX_LIMIT}").into());
        }
        for (route, r) in &self.routes {
            check_rate(&format!("routes.{}", route.as_str()), r)?;
        }
        for (role, r) in &self.tokens {
            if role != "client" && role != "admin" {
                return Err(format!("tokens.{role}: a token role is client or admin").into());
            }
            check_rate(&format!("tokens.{role}"), r)?;
        }
        let h = &self.hot_keys;
        for (what, r) in [("hot_keys.payee", &h.payee), ("hot_keys.payer", &h.payer)] {
            r.as_ref().map_or(Ok(()), |r| check_rate(what, r))?;
        }
        for (account, r) in &h.accounts {
            check_rate(&format!("hot_keys.accounts.{account}"), r)?;
        }
        if !(1..=KEYS_TRACKED_MAX).contains(&h.keys_tracked_max) || h.accounts.len() > h.keys_tracked_max {
            return Err(format!(
                "hot_keys.keys_tracked_max must be between 1 and {KEYS_TRACKED_MAX} and hold every named account"
            )
            .into());
        }
        for (what, c) in [("edge_concurrency", &self.edge_concurrency), ("concurrency", &self.concurrency)] {
            if !(1 <= c.min && c.min <= c.initial && c.initial <= c.max && c.max <= 1 << 20) || c.latency_target_ms == 0
            {
                return Err(
                    format!("{what}: need 1 <= min <= initial <= max <= 1048576 and latency_target_ms > 0").into()
                );
            }
        }
        let b = &self.breaker;
        let ratio = |x: f64| x > 0.0 && x <= 1.0;
        let breaker_ok = 1 <= b.min_calls
            && b.min_calls <= b.window_calls
            && b.window_calls <= 10_000
            && ratio(b.error_ratio)
            && ratio(b.slow_call_ratio)
            && b.slow_call_ms > 0
            && (1..=600_000).contains(&b.open_ms)
            && (1..=1000).contains(&b.half_open_probes);
        if !breaker_ok {
            return Err(RulesError::OutOfRange(
                "breaker: need 1 <= min_calls <= window_calls <= 10000, ratios in (0, 1], \
                 slow_call_ms > 0, open_ms 1..=600000, half_open_probes 1..=1000"
                    .into(),
            ));
        }
        let r = &self.retry;
        let retry_ok = r.budget_percent.is_finite()
            && (0.0..=RETRY_PERCENT_MAX).contains(&r.budget_percent)
            && (1..=10).contains(&r.attempts_max)
            && 0 < r.backoff_base_ms
            && r.backoff_base_ms <= r.backoff_max_ms
            && r.backoff_max_ms <= 10_000;
        if !retry_ok {
            return Err(format!(
                "retry: need budget_percent 0..={RETRY_PERCENT_MAX}, attempts_max 1..=10, \
                 0 < backoff_base_ms <= backoff_max_ms <= 10000"
            )
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml_and_json() {
        let rules = FlowRules::default();
        rules.check().unwrap();
        assert_eq!(FlowRules::from_toml(&toml::to_string(&rules).unwrap()).unwrap(), rules);
        assert_eq!(FlowRules::from_json(serde_json::to_string(&rules).unwrap().as_bytes()).unwrap(), rules);
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        let example = FlowRules::from_toml(include_str!("../../rules.example.toml")).unwrap();
        assert_eq!(example, FlowRules::default());
    }

    #[test]
    fn a_retry_budget_above_ten_percent_is_refused_with_its_name() {
        let mut rules = FlowRules::default();
        rules.retry.budget_percent = 25.0;
        assert!(rules.check().unwrap_err().to_string().starts_with("retry:"));
        let mut rules = FlowRules::default();
        rules.routes.insert(Route::Payments, Rate { rate_per_s: 0, burst: 1 });
        assert!(rules.check().unwrap_err().to_string().contains("routes.payments"));
    }

    #[test]
    fn n_routers_each_enforce_a_share_that_keeps_the_cluster_wide_promise() {
        let mut rules = FlowRules::default();
        rules.routes.insert(Route::Payments, Rate { rate_per_s: 1_000, burst: 100 });
        rules.tokens.insert("client".into(), Rate { rate_per_s: 7, burst: 1 });
        rules.hot_keys.accounts.insert("merchant".into(), Rate { rate_per_s: 300, burst: 30 });
        let one = rules.shared(1);
        assert_eq!(one, rules, "one router enforces the whole promise");
        let three = rules.shared(3);
        assert_eq!(three.routes[&Route::Payments], Rate { rate_per_s: 334, burst: 34 });
        assert_eq!(three.tokens["client"], Rate { rate_per_s: 3, burst: 1 }, "rounded up, never 0");
        assert_eq!(three.hot_keys.accounts["merchant"], Rate { rate_per_s: 100, burst: 10 });
        assert_eq!(three.hot_keys.payee, Some(Rate { rate_per_s: 6_667, burst: 1_667 }));
        assert_eq!(three.edge_concurrency, rules.edge_concurrency, "a router's own resources are not divided");
        assert!(three.check().is_ok());
    }
}
