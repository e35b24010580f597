//! Counters and latency histograms an engine keeps about itself.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::buckets::{Buckets, BATCH_SIZE_BOUNDS};

/// Live counters of one engine, shared with its handles.
pub struct EngineStats {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    pub commands_logged: AtomicU64,
    pub queries: AtomicU64,
    pub log_bytes: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Log bytes written since the last checkpoint: what a restart would replay.
    pub log_bytes_since_checkpoint: AtomicU64,
    pub fsyncs: AtomicU64,
    /// CPU time the engine thread used, in nanoseconds.
    pub cpu_ns: AtomicU64,
    /// Requests refused `overloaded` by this cell (its class's queue share
    /// full, or shed by queue delay), per priority class, highest first.
    pub shed: [AtomicU64; 4],
    /// Whole batch cycle (take, apply, append + fsync, answer), in microseconds.
    batch_us: Mutex<Histogram<u64>>,
    /// Append + fsync alone, in microseconds.
    append_us: Mutex<Histogram<u64>>,
    /// Checkpoint pauses of the engine (encoding the snapshot), in microseconds.
    checkpoint_us: Mutex<Histogram<u64>>,
    /// Commands per batch.
    batch_size: Mutex<Histogram<u64>>,
    /// The batch cycle again, in seconds, as buckets a scrape renders for Prometheus.
    pub commit_seconds: Buckets,
    /// Commands and queries per batch, as buckets.
    pub batch_size_commands: Buckets,
    /// How long each request waited in the queue before its batch, in seconds.
    pub queue_wait_seconds: Buckets,
}

/// A histogram of µs (or sizes) with 3 significant digits that grows with the
/// largest value recorded, so an engine start does not zero a full-range table
/// (four of them, ~1.5 MB) it may never fill; capped at an hour.
fn histogram() -> Mutex<Histogram<u64>> {
    let mut h = Histogram::new(3).expect("valid histogram precision");
    h.auto(true);
    Mutex::new(h)
}

/// The largest value a histogram records (larger ones count as this).
const HISTOGRAM_VALUE_MAX: u64 = 3_600_000_000;

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            batches: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            commands_logged: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            checkpoint_bytes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            log_bytes_since_checkpoint: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            shed: Default::default(),
            batch_us: histogram(),
            append_us: histogram(),
            checkpoint_us: histogram(),
            batch_size: histogram(),
            commit_seconds: Buckets::latency(),
            batch_size_commands: Buckets::new(BATCH_SIZE_BOUNDS),
            queue_wait_seconds: Buckets::latency(),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, v: u64) {
    let mut h = h.lock().expect("stats lock is never held across a panic");
    // `record`, not `saturating_record`: only `record` grows an
    // auto-resizing histogram; the saturating one clamps every value to the
    // histogram's current top (2 for a new one) and never grows it.
    h.record(v.clamp(1, HISTOGRAM_VALUE_MAX)).expect("an auto-resizing histogram records any value up to the cap");
}

/// Percentiles of one histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

fn percentiles(h: &Mutex<Histogram<u64>>) -> Percentiles {
    let h = h.lock().expect("stats lock is never held across a panic");
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
        mean: h.mean(),
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    pub batches: u64,
    pub commands: u64,
    pub commands_logged: u64,
    pub queries: u64,
    pub log_bytes: u64,
    pub checkpoint_bytes: u64,
    pub checkpoints: u64,
    pub fsyncs: u64,
    pub cpu_ns: u64,
    pub batch_us: Percentiles,
    pub append_us: Percentiles,
    pub checkpoint_us: Percentiles,
    pub batch_size: Percentiles,
}

impl EngineStats {
    pub(crate) fn record_batch(&self, batch_us: u64, append_us: Option<u64>, size: u64) {
        record(&self.batch_us, batch_us);
        record(&self.batch_size, size);
        self.commit_seconds.observe(batch_us as f64 / 1e6);
        self.batch_size_commands.observe(size as f64);
        if let Some(us) = append_us {
            record(&self.append_us, us);
        }
    }

    pub(crate) fn record_checkpoint(&self, us: u64) {
        record(&self.checkpoint_us, us);
        self.checkpoints.fetch_add(1, Relaxed);
    }

    /// Records how long one request waited in the queue before the engine took it.
    pub fn record_queue_wait(&self, waited: std::time::Duration) {
        self.queue_wait_seconds.observe_duration(waited);
    }

    /// Clears the histograms, so a benchmark can measure one phase alone.
    pub fn reset_histograms(&self) {
        for h in [&self.batch_us, &self.append_us, &self.checkpoint_us, &self.batch_size] {
            h.lock().expect("stats lock is never held across a panic").reset();
        }
        for b in [&self.commit_seconds, &self.batch_size_commands, &self.queue_wait_seconds] {
            b.reset();
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            batches: self.batches.load(Relaxed),
            commands: self.commands.load(Relaxed),
            commands_logged: self.commands_logged.load(Relaxed),
            queries: self.queries.load(Relaxed),
            log_bytes: self.log_bytes.load(Relaxed),
            checkpoint_bytes: self.checkpoint_bytes.load(Relaxed),
            checkpoints: self.checkpoints.load(Relaxed),
            fsyncs: self.fsyncs.load(Relaxed),
            cpu_ns: self.cpu_ns.load(Relaxed),
            batch_us: percentiles(&self.batch_us),
            append_us: percentiles(&self.append_us),
            checkpoint_us: percentiles(&self.checkpoint_us),
            batch_size: percentiles(&self.batch_size),
        }
    }
}

/// CPU time of the calling thread, in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is valid on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of 8,190 commands that took 10 ms, 3 ms of it the append, is
    /// what the snapshot says (once every value above 2 read as 2).
    #[test]
    fn histograms_keep_values_far_above_their_first_size() {
        let stats = EngineStats::default();
        stats.record_batch(10_000, Some(3_000), 8_190);
        stats.record_batch(20, Some(15), 3);
        let s = stats.snapshot();
        let near = |got: u64, want: u64| got.abs_diff(want) * 100 <= want;
        assert!(near(s.batch_us.max, 10_000), "{:?}", s.batch_us);
        assert!(near(s.append_us.max, 3_000), "{:?}", s.append_us);
        assert!(near(s.batch_size.max, 8_190), "{:?}", s.batch_size);
        assert_eq!(s.batch_size.count, 2);
        assert!((s.batch_size.mean - 4_096.5).abs() < 50.0, "{:?}", s.batch_size);
        stats.record_batch(u64::MAX, None, 1);
        assert!(near(stats.snapshot().batch_us.max, HISTOGRAM_VALUE_MAX), "capped at an hour");
    }
}
