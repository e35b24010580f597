//! Edge rate limits: per route (across all tokens) and per token, as GCRA
//! token buckets from `governor`. Lock-free; a batch costs one unit per item.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::rules::{FlowRules, Rate, Route};

fn limiter(r: &Rate) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(r.rate_per_s).expect("checked rules have rates >= 1");
    let burst = NonZeroU32::new(r.burst).expect("checked rules have bursts >= 1");
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
}

/// Why a request was over a limit, for the 429's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverLimit(pub String);

fn take(l: &DefaultDirectRateLimiter, cost: u32, what: impl FnOnce() -> String) -> Result<(), OverLimit> {
    let n = NonZeroU32::new(cost.max(1)).expect("max(1) is nonzero");
    match l.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(OverLimit(format!("{} is over its rate limit; retry later", what()))),
        Err(_) => Err(OverLimit(format!("{} allows at most a burst smaller than {cost} at once", what()))),
    }
}

pub struct EdgeLimits {
    routes: Vec<(Route, DefaultDirectRateLimiter)>,
    /// Indexed by token number; `None` where the token's role has no limit.
    tokens: Vec<Option<DefaultDirectRateLimiter>>,
}

impl EdgeLimits {
    /// `token_roles[i]` is the role of token `i` as the API numbers them.
    pub fn new(rules: &FlowRules, token_roles: &[&str]) -> Self {
        Self {
            routes: rules.routes.iter().map(|(route, r)| (*route, limiter(r))).collect(),
            tokens: token_roles.iter().map(|role| rules.tokens.get(*role).map(limiter)).collect(),
        }
    }

    /// Takes `cost` units from the route's bucket and the token's, or answers which is over.
    pub fn admit(&self, route: Route, token: Option<usize>, cost: u32) -> Result<(), OverLimit> {
        if let Some((_, l)) = self.routes.iter().find(|(r, _)| *r == route) {
            take(l, cost, || format!("route {}", route.as_str()))?;
        }
        if let Some(Some(l)) = token.and_then(|t| self.tokens.get(t)) {
            take(l, cost, || "this token".to_string())?;
        }
        Ok(())
    }
}
