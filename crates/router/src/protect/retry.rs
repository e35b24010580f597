//! The router's retry budget and backoff.
//!
//! A retry is made only for an idempotent request that failed with
//! `cell_unavailable` or `wrong_cell`, and only while the budget allows:
//! tower's `TpsBudget` lets retries reach `budget_percent` of the requests of
//! the last 10 seconds and no more, so a cell that fails every request sees
//! at most 10 % extra load, never a storm. Backoff is exponential with full
//! jitter, capped at `backoff_max_ms`.

use std::time::Duration;

use rand::Rng;
use tower::retry::budget::{Budget, TpsBudget};

use super::rules::RetryRules;

/// The window the budget counts requests over.
pub const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// The budget itself; `Protection::counters` counts the retries made and refused.
pub struct RetryBudget {
    rules: RetryRules,
    budget: TpsBudget,
}

impl RetryBudget {
    pub fn new(rules: RetryRules) -> Self {
        // No reserve beyond the percentage: "at most 10 % of requests" holds from the first request.
        let budget = TpsBudget::new(RETRY_BUDGET_WINDOW, 0, rules.budget_percent / 100.0);
        Self { rules, budget }
    }

    pub fn attempts_max(&self) -> u32 {
        self.rules.attempts_max
    }

    /// A new request (not a retry) earns the budget its share.
    pub fn request(&self) {
        self.budget.deposit();
    }

    /// Asks for one retry; on yes, answers how long to wait before it.
    pub fn retry(&self, attempt: u32) -> Option<Duration> {
        if !self.budget.withdraw() {
            return None;
        }
        let ceiling = u64::from(self.rules.backoff_base_ms)
            .saturating_mul(1 << attempt.min(16))
            .min(u64::from(self.rules.backoff_max_ms));
        Some(Duration::from_millis(rand::rng().random_range(0..=ceiling)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_ten_percent_of_requests() {
        let b = RetryBudget::new(RetryRules {
            budget_percent: 10.0,
            attempts_max: 3,
            backoff_base_ms: 1,
            backoff_max_ms: 8,
        });
        let (mut granted, mut refused) = (0, 0);
        for _ in 0..1000 {
            b.request();
            for attempt in 1..3 {
                match b.retry(attempt) {
                    Some(wait) => {
                        assert!(wait <= Duration::from_millis(8));
                        granted += 1;
                    }
                    None => refused += 1,
                }
            }
        }
        assert!((90..=100).contains(&granted), "{granted} retries for 1000 requests");
        assert!(refused >= 1900);
    }
}
