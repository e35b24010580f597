//! A circuit breaker: stop calling what keeps failing, probe, and resume.
//!
//! Closed: calls pass, and the outcome of the latest `window_calls` is
//! remembered. Once the window holds `min_calls`, a failure share at or above
//! `error_ratio` or a slow-call share at or above `slow_call_ratio` opens it.
//! Open: calls are refused at once for `open_ms`. Half-open: up to
//! `half_open_probes` calls pass; if all succeed it closes (with a clean
//! window), and any failure opens it again. The router keeps one per cell,
//! and each relay pair keeps one, so a cell that is down costs its callers a
//! refusal, not a timeout each.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The rules of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerRules {
    /// Calls remembered (a sliding window of the latest calls).
    pub window_calls: u32,
    /// Calls in the window before the ratios count.
    pub min_calls: u32,
    /// Opens when failures reach this share of the window.
    pub error_ratio: f64,
    /// A call slower than this is slow.
    pub slow_call_ms: u32,
    /// Opens when slow calls reach this share of the window.
    pub slow_call_ratio: f64,
    /// How long it stays open before half-open probes.
    pub open_ms: u32,
    /// Probes let through half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerRules {
    fn default() -> Self {
        Self {
            window_calls: 50,
            min_calls: 20,
            error_ratio: 0.5,
            slow_call_ms: 2_000,
            slow_call_ratio: 0.8,
            open_ms: 1_000,
            half_open_probes: 3,
        }
    }
}

/// The state a breaker is in, as metrics and the dashboard show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: a gauge value.
    pub fn level(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

struct Inner {
    phase: Phase,
    /// (failed, slow) of the latest calls, oldest first.
    window: VecDeque<(bool, bool)>,
    opened: u64,
    /// Set while open when the cell itself was seen down (not serving): once
    /// it is seen serving again (a restarted process), probing need not wait
    /// for `open_ms`.
    opened_on_down_cell: bool,
}

pub struct Breaker {
    rules: BreakerRules,
    inner: Mutex<Inner>,
}

/// A call the breaker let through; report it with [`Breaker::record`]. A
/// probe dropped unreported (its caller gave up) frees its probe slot.
#[must_use = "a call let through must report how it went"]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    started: Instant,
    probe: bool,
    recorded: bool,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            if let Phase::HalfOpen { admitted, .. } = &mut self.breaker.lock().phase {
                *admitted = admitted.saturating_sub(1);
            }
        }
    }
}

/// Refused: the breaker is open; retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub retry_after: Duration,
}

impl Breaker {
    pub fn new(rules: BreakerRules) -> Self {
        let inner = Inner { phase: Phase::Closed, window: VecDeque::new(), opened: 0, opened_on_down_cell: false };
        Self { rules, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("breaker lock is never held across a panic")
    }

    pub fn state(&self) -> BreakerState {
        match self.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if Instant::now() < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How many times it has opened.
    pub fn opened(&self) -> u64 {
        self.lock().opened
    }

    pub fn try_pass(&self) -> Result<Pass<'_>, Open> {
        let mut inner = self.lock();
        let now = Instant::now();
        match &mut inner.phase {
            Phase::Closed => Ok(Pass { breaker: self, started: now, probe: false, recorded: false }),
            Phase::Open { until } if now < *until => Err(Open { retry_after: *until - now }),
            Phase::Open { .. } => {
                inner.phase = Phase::HalfOpen { admitted: 1, succeeded: 0 };
                Ok(Pass { breaker: self, started: now, probe: true, recorded: false })
            }
            Phase::HalfOpen { admitted, .. } if *admitted < self.rules.half_open_probes => {
                *admitted += 1;
                Ok(Pass { breaker: self, started: now, probe: true, recorded: false })
            }
            Phase::HalfOpen { .. } => Err(Open { retry_after: Duration::from_millis(u64::from(self.rules.open_ms)) }),
        }
    }

    /// Reports a call let through: `failed` when the callee could not serve it.
    pub fn record(&self, mut pass: Pass<'_>, failed: bool) {
        pass.recorded = true;
        let slow = pass.started.elapsed() > Duration::from_millis(u64::from(self.rules.slow_call_ms));
        let mut inner = self.lock();
        let r = self.rules;
        match &mut inner.phase {
            Phase::HalfOpen { succeeded, .. } if pass.probe => {
                if failed || slow {
                    self.open(&mut inner);
                } else {
                    *succeeded += 1;
                    if *succeeded >= r.half_open_probes {
                        inner.phase = Phase::Closed;
                        inner.window.clear();
                    }
                }
            }
            Phase::Closed => {
                inner.window.push_back((failed, slow));
                if inner.window.len() > r.window_calls as usize {
                    inner.window.pop_front();
                }
                let n = inner.window.len();
                if n >= r.min_calls as usize {
                    let failures = inner.window.iter().filter(|(f, _)| *f).count() as f64;
                    let slows = inner.window.iter().filter(|(_, s)| *s).count() as f64;
                    if failures / n as f64 >= r.error_ratio || slows / n as f64 >= r.slow_call_ratio {
                        self.open(&mut inner);
                    }
                }
            }
            // A call that started before the breaker opened tells nothing new.
            _ => {}
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.phase = Phase::Open { until: Instant::now() + Duration::from_millis(u64::from(self.rules.open_ms)) };
        inner.window.clear();
        inner.opened += 1;
        inner.opened_on_down_cell = false;
    }

    /// The cell was seen down (its status: not serving) while the breaker is open.
    pub fn cell_seen_down(&self) {
        let mut inner = self.lock();
        if matches!(inner.phase, Phase::Open { .. }) {
            inner.opened_on_down_cell = true;
        }
    }

    /// The cell is seen serving again: if the breaker opened while the cell
    /// was down, it goes half-open now rather than after `open_ms`, so a
    /// restarted cell is probed at once. Answers whether it did.
    pub fn cell_seen_serving(&self) -> bool {
        let mut inner = self.lock();
        if matches!(inner.phase, Phase::Open { .. }) && inner.opened_on_down_cell {
            inner.phase = Phase::Open { until: Instant::now() };
            inner.opened_on_down_cell = false;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> BreakerRules {
        BreakerRules { window_calls: 10, min_calls: 4, open_ms: 30, half_open_probes: 2, ..BreakerRules::default() }
    }

    #[test]
    fn opens_on_failures_half_opens_after_the_pause_and_closes_on_good_probes() {
        let b = Breaker::new(rules());
        for failed in [false, true, true] {
            b.record(b.try_pass().unwrap(), failed);
        }
        assert_eq!(b.state(), BreakerState::Closed, "below min_calls nothing opens");
        b.record(b.try_pass().unwrap(), true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_pass().is_err());
        std::thread::sleep(Duration::from_millis(35));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let (p1, p2) = (b.try_pass().unwrap(), b.try_pass().unwrap());
        assert!(b.try_pass().is_err(), "only the probes pass half-open");
        b.record(p1, false);
        b.record(p2, false);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.opened(), 1);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = Breaker::new(rules());
        for _ in 0..4 {
            b.record(b.try_pass().unwrap(), true);
        }
        std::thread::sleep(Duration::from_millis(35));
        b.record(b.try_pass().unwrap(), true);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.opened(), 2);
    }

    #[test]
    fn an_open_breaker_probes_at_once_when_its_down_cell_serves_again_and_only_then() {
        let b = Breaker::new(BreakerRules { open_ms: 60_000, ..rules() });
        for _ in 0..4 {
            let pass = b.try_pass().unwrap();
            b.record(pass, true);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.cell_seen_serving(), "a cell never seen down does not shorten the open time");
        assert!(b.try_pass().is_err());
        b.cell_seen_down();
        assert!(b.cell_seen_serving());
        let probe = b.try_pass().expect("probed at once");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(probe, true);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe opens it again, for open_ms");
        assert!(!b.cell_seen_serving(), "the new opening needs the cell seen down again");
    }
}
