//! The adaptive concurrency limit of one cell (AIMD on measured latency).
//!
//! Calls in flight to the cell are capped by a limit that learns: each call
//! that comes back within the latency target while the limit was in use adds
//! `1/limit` (about +1 per round trip), or 1 while the limit is below its
//! initial value (a slow start, so a cut heals fast); a call slower than the target, or shed
//! by the cell, cuts the limit by 10 %, at most once per `latency_target`
//! (one cut per congestion signal, not one per call in flight). Lower classes
//! may use only a share of the limit, so under pressure they are refused
//! first and payments keep the head room.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellpay_core::Priority;

use super::rules::ConcurrencyRules;

/// The share of the limit each class may fill, in percent, highest class first.
pub const LIMIT_SHARE_PERCENT: [u32; 4] = [100, 75, 50, 25];

struct Learned {
    limit: f64,
    last_cut: Instant,
}

pub struct AdaptiveLimit {
    rules: ConcurrencyRules,
    in_flight: AtomicU32,
    /// The limit as a whole number, for admission without the lock.
    limit: AtomicU32,
    learned: Mutex<Learned>,
}

/// A call admitted under the limit; report it with [`Permit::done`]. A
/// permit dropped unreported (its caller gave up) gives its slot back and
/// teaches the limit nothing.
#[must_use = "an admitted call must report how it went"]
pub struct Permit<'a> {
    limit: &'a AdaptiveLimit,
    started: Instant,
}

impl Permit<'_> {
    /// Reports the call: `congested` when the cell shed it or said it is overloaded.
    pub fn done(self, congested: bool) {
        let latency = self.started.elapsed();
        self.done_after(latency, congested);
    }

    /// Reports the call with its latency as the caller measured it (the HTTP
    /// front adds the wait before admission to the time after it).
    pub fn done_after(self, latency: Duration, congested: bool) {
        let limit = self.limit;
        // Drop gives the slot back; learn from what the call saw.
        drop(self);
        limit.learn(latency, congested);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Relaxed);
    }
}

impl AdaptiveLimit {
    pub fn new(rules: ConcurrencyRules) -> Self {
        Self {
            rules,
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(rules.initial),
            learned: Mutex::new(Learned { limit: f64::from(rules.initial), last_cut: Instant::now() }),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Whether a call of `class` would be admitted now: a peek that takes
    /// nothing, for refusing from the request head alone (the front gate).
    pub fn has_room(&self, class: Priority) -> bool {
        self.in_flight() < self.cap(class)
    }

    fn cap(&self, class: Priority) -> u32 {
        (self.limit() * LIMIT_SHARE_PERCENT[class.rank()] / 100).max(1)
    }

    /// Admits a call of `class` if the class's share of the limit has room.
    pub fn try_acquire(&self, class: Priority) -> Option<Permit<'_>> {
        let cap = self.cap(class);
        let before = self.in_flight.fetch_add(1, Relaxed);
        if before >= cap {
            self.in_flight.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Permit { limit: self, started: Instant::now() })
    }

    fn learn(&self, latency: Duration, congested: bool) {
        let in_flight = self.in_flight.load(Relaxed) + 1;
        let target = Duration::from_millis(u64::from(self.rules.latency_target_ms));
        // Only a limit in use learns: a slow call far below the limit (a
        // checkpoint pause at low load) says nothing about concurrency. The
        // common case at low load takes no lock.
        let in_use = in_flight.saturating_mul(2) >= self.limit.load(Relaxed);
        if !congested && !in_use {
            return;
        }
        let mut l = self.learned.lock().expect("limit lock is never held across a panic");
        let in_use = f64::from(in_flight) * 2.0 >= l.limit;
        if congested || (latency > target && in_use) {
            if l.last_cut.elapsed() >= target {
                l.limit = (l.limit * 0.9).max(f64::from(self.rules.min));
                l.last_cut = Instant::now();
            }
        } else if in_use && latency <= target {
            // Grow only when the limit was really in use. Below the initial
            // limit, by one per fast call (a slow start, as TCP's after a
            // loss): a cut that outlived its cause is undone within a few
            // round trips, not after tens of thousands of calls. Above it,
            // by 1/limit: about one per round trip.
            let step = if l.limit < f64::from(self.rules.initial) { 1.0 } else { 1.0 / l.limit };
            l.limit = (l.limit + step).min(f64::from(self.rules.max));
        }
        self.limit.store(l.limit as u32, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ConcurrencyRules {
        ConcurrencyRules { initial: 20, min: 2, max: 100, latency_target_ms: 1 }
    }

    #[test]
    fn lower_classes_get_a_smaller_share_of_the_limit() {
        let l = AdaptiveLimit::new(rules());
        let shadow: Vec<_> = std::iter::from_fn(|| l.try_acquire(Priority::Shadow)).take(100).collect();
        assert_eq!(shadow.len(), 5, "shadow may fill a quarter of 20");
        assert!(l.try_acquire(Priority::History).is_some(), "history may fill half (its permit is dropped at once)");
        let critical: Vec<_> = std::iter::from_fn(|| l.try_acquire(Priority::Critical)).take(100).collect();
        assert_eq!(critical.len(), 15, "payments get the rest");
        assert!(l.try_acquire(Priority::Critical).is_none());
        for p in shadow.into_iter().chain(critical) {
            p.done(false);
        }
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn congestion_cuts_the_limit_and_fast_full_calls_grow_it() {
        let l = AdaptiveLimit::new(rules());
        std::thread::sleep(Duration::from_millis(2));
        l.try_acquire(Priority::Critical).unwrap().done(true);
        assert_eq!(l.limit(), 18);
        // Fast calls at full use grow it back by about one per limit's worth of calls.
        for _ in 0..200 {
            let permits: Vec<_> = (0..18).filter_map(|_| l.try_acquire(Priority::Critical)).collect();
            for p in permits {
                p.done(false);
            }
        }
        assert!(l.limit() > 18, "limit {}", l.limit());
    }

    #[test]
    fn a_limit_cut_to_its_floor_grows_back_once_calls_are_fast_again() {
        let l = AdaptiveLimit::new(ConcurrencyRules { initial: 512, min: 32, max: 8192, latency_target_ms: 5 });
        // Slow calls at full use (slow clients used to look like this) cut it to the floor.
        for _ in 0..100 {
            let permits: Vec<_> = (0..l.limit()).filter_map(|_| l.try_acquire(Priority::Critical)).collect();
            std::thread::sleep(Duration::from_millis(6));
            permits.into_iter().for_each(|p| p.done(false));
        }
        assert_eq!(l.limit(), 32);
        // Fast calls at full use: back to the initial limit within a few rounds.
        let mut rounds = 0;
        while l.limit() < 512 {
            let permits: Vec<_> = (0..l.limit()).filter_map(|_| l.try_acquire(Priority::Critical)).collect();
            permits.into_iter().for_each(|p| p.done(false));
            rounds += 1;
            assert!(rounds <= 30, "limit {} after {rounds} rounds of fast calls", l.limit());
        }
        // Above the initial limit it grows by at most about one per round.
        for _ in 0..20 {
            let permits: Vec<_> = (0..l.limit()).filter_map(|_| l.try_acquire(Priority::Critical)).collect();
            permits.into_iter().for_each(|p| p.done(false));
        }
        assert!(l.limit() <= 560, "limit {}", l.limit());
    }

    #[test]
    fn a_permit_dropped_unreported_gives_its_slot_back() {
        let l = AdaptiveLimit::new(rules());
        let p = l.try_acquire(Priority::Critical).unwrap();
        assert_eq!(l.in_flight(), 1);
        drop(p);
        assert_eq!((l.in_flight(), l.limit()), (0, 20));
    }
}
