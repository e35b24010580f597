//! Fixed-bucket histograms an engine or a relay fills as it works and a
//! scrape reads at any time, without a lock and without queuing work.
//!
//! Prometheus computes quantiles from cumulative bucket counts it can
//! aggregate across cells and processes; a p99 computed here could not be
//! aggregated. So the hot path only bumps two or three atomic counters, and
//! `/metrics` renders the buckets as a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds: from 0.1 ms (an engine
/// batch without fsync) to 10 s (a stalled disk), with the SLO thresholds
/// (50, 100, 200 ms) among them.
pub const LATENCY_BOUNDS_S: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

/// Upper bounds of the batch-size buckets, in commands (powers of two up to the batch limit).
pub const BATCH_SIZE_BOUNDS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// One histogram: a counter per bucket (not cumulative; the last one counts
/// what exceeds every bound) and the sum in millionths of the unit.
#[derive(Debug)]
pub struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

/// What a scrape reads: cumulative counts per bound (`le`), then `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketCounts {
    pub bounds: &'static [f64],
    /// `cumulative[i]` observations were ≤ `bounds[i]`; one more entry for `+Inf`.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Buckets {
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds rise strictly");
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    /// Latency buckets ([`LATENCY_BOUNDS_S`]).
    pub fn latency() -> Self {
        Self::new(LATENCY_BOUNDS_S)
    }

    /// Records one value, in the histogram's unit.
    pub fn observe(&self, value: f64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((value.max(0.0) * 1e6) as u64, Relaxed);
    }

    /// Records a duration, in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// The buckets as they are now, read without a lock. The count is the
    /// `+Inf` bucket, so the exposition is consistent even mid-observation.
    pub fn read(&self) -> BucketCounts {
        let mut running = 0;
        let cumulative: Vec<u64> = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Relaxed);
                running
            })
            .collect();
        let count = *cumulative.last().expect("one bucket more than bounds");
        BucketCounts { bounds: self.bounds, cumulative, count, sum: self.sum_micros.load(Relaxed) as f64 / 1e6 }
    }

    /// Starts over (a benchmark measuring one phase alone).
    pub fn reset(&self) {
        for c in self.counts.iter().chain([&self.sum_micros]) {
            c.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_a_bound_counts_in_that_bucket_and_counts_are_cumulative() {
        let b = Buckets::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.0, 1.5, 4.0, 9.0] {
            b.observe(v);
        }
        let r = b.read();
        assert_eq!(r.cumulative, vec![2, 3, 4, 5], "le=1 holds 0.5 and 1.0; +Inf holds all");
        assert_eq!(r.count, 5);
        assert!((r.sum - 16.0).abs() < 1e-9, "sum {}", r.sum);
        b.reset();
        assert_eq!(b.read().cumulative, vec![0, 0, 0, 0]);
    }

    #[test]
    fn durations_are_recorded_in_seconds() {
        let b = Buckets::latency();
        b.observe_duration(Duration::from_millis(30));
        let r = b.read();
        let le_50ms = LATENCY_BOUNDS_S.iter().position(|b| *b == 0.05).unwrap();
        assert_eq!((r.cumulative[le_50ms - 1], r.cumulative[le_50ms]), (0, 1));
    }
}
