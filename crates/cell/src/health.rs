//! Whether a cell serves, and if not, why.
//!
//! A cell stops serving in two ways, and both must show (on `/readyz`, the
//! dashboard and `/metrics`) and be answered `cell_unavailable` at once rather
//! than after a client's timeout:
//!
//! - It **fails** (fail-stop) on a store error or an engine panic. Its state in
//!   memory may be ahead of what is durable, or torn halfway through a batch,
//!   so it serves nothing more; a restart recovers from the store. A failure
//!   never clears, and its first reason is the one kept.
//! - It **stalls** when the engine has been inside one batch cycle for longer
//!   than [`EngineConfig::stall_after`](crate::EngineConfig::stall_after),
//!   typically a disk whose fsync does not return. Work waits on the engine
//!   whenever it is inside a cycle: the batch's own requests and everything
//!   queued behind it. New work is refused while the stall lasts. A stall
//!   clears by itself when the cycle finishes (a disk that recovers): the
//!   batch was then appended, so nothing is unsound, and the queued work is
//!   served.
//!
//! No thread watches for a stall. Whoever asks (admission, a status read, a
//! scrape) compares the start of the running cycle with the clock, so an idle
//! engine can never look stalled, and asking costs one atomic load while the
//! engine is idle.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cellpay_core::CellId;

/// A cell's health, with the reason when it does not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The engine admits and serves work.
    Serving,
    /// The engine has been inside one batch cycle for `busy_ms`, longer than
    /// `stall_after_ms`; new work is refused until the cycle finishes.
    Stalled { busy_ms: u64, stall_after_ms: u64 },
    /// Fail-stop until a restart.
    Failed { reason: Arc<str> },
}

impl Health {
    pub fn is_serving(&self) -> bool {
        matches!(self, Health::Serving)
    }

    /// `ready`, `stalled` or `failed`: the status the HTTP views show.
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Serving => "ready",
            Health::Stalled { .. } => "stalled",
            Health::Failed { .. } => "failed",
        }
    }

    /// Why the cell does not serve; `None` while it serves.
    pub fn reason(&self) -> Option<String> {
        match self {
            Health::Serving => None,
            Health::Stalled { busy_ms, stall_after_ms } => Some(format!(
                "one batch has run for {busy_ms} ms, longer than the stall limit of {stall_after_ms} ms \
                 (a hung disk?); new work is refused until it finishes"
            )),
            Health::Failed { reason } => Some(reason.to_string()),
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason() {
            None => f.write_str(self.as_str()),
            Some(reason) => write!(f, "{}: {reason}", self.as_str()),
        }
    }
}

/// The engine's side of [`Health`]: it marks the start and end of each batch
/// cycle and records a failure; handles read the result.
pub(crate) struct Watchdog {
    cell: CellId,
    stall_after: Duration,
    /// The clock the cycle start is measured on.
    born: Instant,
    /// Microseconds from `born` to the start of the running cycle, plus one;
    /// 0 while the engine is between cycles.
    cycle_started_us: AtomicU64,
    /// Set once a stall has been logged, so it is logged once, with its end.
    stall_logged: AtomicBool,
    failure: OnceLock<Arc<str>>,
}

impl Watchdog {
    pub(crate) fn new(cell: CellId, stall_after: Duration) -> Self {
        Self {
            cell,
            stall_after,
            born: Instant::now(),
            cycle_started_us: AtomicU64::new(0),
            stall_logged: AtomicBool::new(false),
            failure: OnceLock::new(),
        }
    }

    pub(crate) fn cycle_started(&self) {
        let us = self.born.elapsed().as_micros() as u64;
        self.cycle_started_us.store(us + 1, Relaxed);
    }

    pub(crate) fn cycle_finished(&self) {
        self.cycle_started_us.store(0, Relaxed);
        if self.stall_logged.swap(false, Relaxed) {
            tracing::warn!(cell = %self.cell, "the engine finished its stalled batch and serves again");
        }
    }

    /// Records why the cell stopped serving, for good. The first reason wins.
    pub(crate) fn fail(&self, reason: &str) {
        if self.failure.set(reason.into()).is_ok() {
            tracing::error!(cell = %self.cell, "cell failed and serves nothing more until a restart: {reason}");
        }
    }

    /// Records that the engine thread has ended, unless a failure is already recorded.
    pub(crate) fn engine_ended(&self) {
        let _ = self.failure.set("the engine has stopped".into());
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failure.get().is_some()
    }

    pub(crate) fn health(&self) -> Health {
        if let Some(reason) = self.failure.get() {
            return Health::Failed { reason: reason.clone() };
        }
        let started_us = self.cycle_started_us.load(Relaxed);
        if started_us == 0 {
            return Health::Serving;
        }
        let busy = self.born.elapsed().saturating_sub(Duration::from_micros(started_us - 1));
        if busy <= self.stall_after {
            return Health::Serving;
        }
        let (busy_ms, stall_after_ms) = (busy.as_millis() as u64, self.stall_after.as_millis() as u64);
        if !self.stall_logged.swap(true, Relaxed) {
            tracing::warn!(cell = %self.cell, busy_ms, stall_after_ms, "the engine is stalled in one batch; refusing new work");
        }
        Health::Stalled { busy_ms, stall_after_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_engine_never_stalls_and_a_busy_one_stalls_only_after_the_limit() {
        let w = Watchdog::new(CellId(0), Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(w.health(), Health::Serving, "idle for longer than the limit is not a stall");
        let started = Instant::now();
        w.cycle_started();
        while w.health().is_serving() {
            assert!(started.elapsed() < Duration::from_secs(30), "a stall is reported");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The cycle start is kept in whole microseconds, hence the margin.
        assert!(started.elapsed() >= Duration::from_millis(29), "never before the limit");
        assert!(matches!(w.health(), Health::Stalled { stall_after_ms: 30, .. }));
        w.cycle_finished();
        assert_eq!(w.health(), Health::Serving, "a stall clears when its cycle finishes");
    }

    #[test]
    fn a_failure_is_permanent_and_keeps_its_first_reason() {
        let w = Watchdog::new(CellId(0), Duration::from_secs(5));
        w.fail("store failed: disk full");
        w.fail("the engine panicked: later");
        w.engine_ended();
        w.cycle_finished();
        assert_eq!(w.health(), Health::Failed { reason: "store failed: disk full".into() });
        assert_eq!(w.health().to_string(), "failed: store failed: disk full");
        assert!(w.is_failed());
    }
}
