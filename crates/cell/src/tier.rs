//! The disk tier of a cell's idempotency records: where records go when they
//! leave memory, so a retry within the promised window (a day by default)
//! still finds its transfer.
//!
//! Three threads share it, and the writer never reads the disk:
//! - the **tier thread** owns the [`Tier`]: it writes the records the engine
//!   hands it as runs (one durable file each), expires runs past the window,
//!   enforces the disk bound and compacts; after each change it publishes a
//!   new [`TierView`] and the highest generation it holds durably;
//! - the **prefetch thread** sits between the cell's queue and its writer: for
//!   every transfer (and status read) it looks the key up in the newest view
//!   before the work reaches the writer, and notes that view's generation;
//! - the **writer** (the engine) answers a key from memory first, then from
//!   the records it handed to the tier and the tier may not hold yet (its
//!   spill buffer), then from what the prefetch found. It drops a generation
//!   from its buffer only once the work after it was looked up in a view
//!   that holds it: the prefetch thread is one thread reading a queue in
//!   order, and generations only grow, so every later work's view holds it.
//!
//! The log stays the source of truth. Records reach the tier only after the
//! batch that made them leave memory is durable; before a checkpoint (whose
//! snapshot no longer holds them) the writer waits until the tier holds every
//! generation handed to it; recovery writes the records its replay moved out
//! of memory to the tier before the engine starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cellpay_core::{idempotency_key, AccountId, OldRecord, OlderRecords, TransferId};
use cellpay_tier::{Entry, Tier, TierError, TierOptions, TierView};

/// Whether a cell keeps a disk tier, and its tuning (I7: `options.bytes_max` bounds its disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierConfig {
    pub enabled: bool,
    pub options: TierOptions,
    /// Records gathered before a run is written (fewer, larger runs; less to merge).
    pub run_entries_min: usize,
    /// The longest records wait in memory before they are written anyway.
    pub run_interval: Duration,
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            options: TierOptions::default(),
            run_entries_min: 1 << 16,
            run_interval: Duration::from_secs(1),
        }
    }
}

/// The tier's figures, for metrics and the window held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierFigures {
    pub runs: u64,
    pub entries: u64,
    pub bytes: u64,
    /// Memory the filters and indexes take.
    pub memory_bytes: u64,
    pub oldest_at_ms: Option<u64>,
    /// Set once the disk bound dropped records still inside the window: the
    /// time of the oldest record still held then. The window held is shorter
    /// than the promise from then on (until those records would have expired).
    pub bound_floor_at_ms: Option<u64>,
    /// Lookups that went past a filter to the disk, and how many found a record.
    pub disk_reads: u64,
    pub disk_hits: u64,
    /// Time spent in lookups that read the disk.
    pub disk_read_ns: u64,
}

/// The versions of one key within a generation: the later wins.
const SEQ_INDEX_BITS: u32 = 24;

/// Turns the records one batch moved out of memory into tier entries of generation `gen`.
pub(crate) fn entries(gen: u64, shards: u32, real: &[OldRecord], shadow: &[OldRecord]) -> Vec<Entry> {
    let tagged = real.iter().map(|r| (false, r)).chain(shadow.iter().map(|r| (true, r)));
    tagged
        .enumerate()
        .map(|(i, (shadow, r))| Entry {
            key: r.key(shadow, shards),
            seq: gen << SEQ_INDEX_BITS | (i as u64 & ((1 << SEQ_INDEX_BITS) - 1)),
            at_ms: r.at_ms,
            value: r.encode_value(),
        })
        .collect()
}

/// What the tier thread publishes.
pub(crate) struct Published {
    pub view: Arc<TierView>,
    /// Why the tier stopped, if it did: the cell must not go on without it.
    pub failed: Option<String>,
    pub figures: TierFigures,
}

pub(crate) struct TierShared {
    published: Mutex<Published>,
    changed: Condvar,
    pub disk_reads: AtomicU64,
    pub disk_hits: AtomicU64,
    pub disk_read_ns: AtomicU64,
}

impl TierShared {
    pub fn view(&self) -> Arc<TierView> {
        self.published.lock().expect("tier lock").view.clone()
    }

    pub fn failed(&self) -> Option<String> {
        self.published.lock().expect("tier lock").failed.clone()
    }

    pub fn figures(&self) -> TierFigures {
        let mut f = self.published.lock().expect("tier lock").figures;
        f.disk_reads = self.disk_reads.load(Relaxed);
        f.disk_hits = self.disk_hits.load(Relaxed);
        f.disk_read_ns = self.disk_read_ns.load(Relaxed);
        f
    }

    /// Blocks until the tier holds generation `gen` durably, or fails.
    pub fn wait_durable(&self, gen: u64) -> Result<(), String> {
        let mut p = self.published.lock().expect("tier lock");
        loop {
            if let Some(reason) = &p.failed {
                return Err(reason.clone());
            }
            if p.view.durable_through() >= gen {
                return Ok(());
            }
            p = self.changed.wait(p).expect("tier lock");
        }
    }

    fn publish(&self, tier: &Tier, bound_floor_at_ms: Option<u64>) {
        let stats = tier.stats();
        let mut p = self.published.lock().expect("tier lock");
        p.view = tier.view();
        p.figures = TierFigures {
            runs: stats.runs as u64,
            entries: stats.entries,
            bytes: stats.bytes,
            memory_bytes: stats.filter_bytes + stats.index_bytes,
            oldest_at_ms: stats.oldest_at_ms,
            bound_floor_at_ms,
            ..TierFigures::default()
        };
        self.changed.notify_all();
    }

    fn fail(&self, reason: String) {
        tracing::error!("the idempotency tier failed: {reason}");
        let mut p = self.published.lock().expect("tier lock");
        p.failed.get_or_insert(reason);
        self.changed.notify_all();
    }
}

pub(crate) enum TierWork {
    /// Records of generation `gen` (after the batch that moved them is durable).
    Spill { gen: u64, entries: Vec<Entry>, clock_ms: u64 },
    /// Write what is gathered now: a checkpoint waits for it.
    Flush,
}

/// The running tier thread and the way to it.
pub(crate) struct TierLink {
    pub shared: Arc<TierShared>,
    tx: Option<mpsc::Sender<TierWork>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The last generation handed to the tier.
    pub gen: u64,
    pub shards: u32,
    /// Records handed to the tier that a prefetch may not have seen yet: key → (generation, record).
    buffer: HashMap<Vec<u8>, (u64, OldRecord)>,
}

impl TierLink {
    /// Starts the tier thread on an opened tier.
    pub fn start(tier: Tier, name: String, config: TierConfig, shards: u32, window_ms: u64) -> std::io::Result<Self> {
        let shared = Arc::new(TierShared {
            published: Mutex::new(Published { view: tier.view(), failed: None, figures: TierFigures::default() }),
            changed: Condvar::new(),
            disk_reads: AtomicU64::new(0),
            disk_hits: AtomicU64::new(0),
            disk_read_ns: AtomicU64::new(0),
        });
        shared.publish(&tier, None);
        let gen = tier.durable_through();
        let (tx, rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new().name(name).spawn(move || run(tier, rx, shared, config, window_ms))?
        };
        Ok(Self { shared, tx: Some(tx), thread: Some(thread), gen, shards, buffer: HashMap::new() })
    }

    /// Hands the records a durable batch moved out of memory to the tier.
    pub fn spill(&mut self, real: Vec<OldRecord>, shadow: Vec<OldRecord>, clock_ms: u64) {
        if real.is_empty() && shadow.is_empty() {
            return;
        }
        self.gen += 1;
        let entries = entries(self.gen, self.shards, &real, &shadow);
        let tagged = real.into_iter().map(|r| (false, r)).chain(shadow.into_iter().map(|r| (true, r)));
        for (shadow, r) in tagged {
            self.buffer.insert(r.key(shadow, self.shards), (self.gen, r));
        }
        let work = TierWork::Spill { gen: self.gen, entries, clock_ms };
        if self.tx.as_ref().is_none_or(|tx| tx.send(work).is_err()) {
            self.shared.fail("the tier thread is gone".into());
        }
    }

    /// Forgets buffered records of generations a prefetch view has seen.
    pub fn seen(&mut self, through: u64) {
        if self.buffer.is_empty() {
            return;
        }
        self.buffer.retain(|_, (gen, _)| *gen > through);
    }

    /// Waits until the tier holds every generation handed to it.
    pub fn flush(&self) -> Result<(), String> {
        if self.gen == 0 || self.shared.view().durable_through() >= self.gen {
            return self.shared.failed().map_or(Ok(()), Err);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(TierWork::Flush);
        }
        self.shared.wait_durable(self.gen)
    }

    /// The records a batch's transfers may need: the buffer, then what the prefetch found.
    pub fn older<'a>(&'a self, found: &'a Found) -> Older<'a> {
        Older { link: self, found }
    }
}

impl Drop for TierLink {
    fn drop(&mut self) {
        // Closing the channel lets the thread write what it gathered and end.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Records the prefetch found in the tier for one work, by key, and the
/// generation of the view it looked in.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub through: u64,
    pub records: HashMap<Vec<u8>, OldRecord>,
    /// A lookup failed: the work must not run as if nothing was found.
    pub error: Option<String>,
}

/// Looks up one key in a view, counting disk reads.
pub(crate) fn prefetch_key(
    shared: &TierShared,
    view: &TierView,
    key: Vec<u8>,
    from: &AccountId,
    id: &TransferId,
    found: &mut Found,
) {
    let before = view.read_stats().block_reads;
    let started = Instant::now();
    match view.get(&key) {
        Ok(Some(e)) => match OldRecord::decode_value(from, id, &e.value) {
            Ok(r) => {
                shared.disk_hits.fetch_add(1, Relaxed);
                found.records.insert(key, r);
            }
            Err(err) => found.error = Some(format!("a tier record does not decode: {err}")),
        },
        Ok(None) => {}
        Err(err) => found.error = Some(err.to_string()),
    }
    let reads = view.read_stats().block_reads.saturating_sub(before);
    if reads > 0 {
        shared.disk_reads.fetch_add(reads, Relaxed);
        shared.disk_read_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
    }
}

/// [`OlderRecords`] for one work of a batch.
pub(crate) struct Older<'a> {
    link: &'a TierLink,
    found: &'a Found,
}

impl OlderRecords for Older<'_> {
    fn find(&self, shadow: bool, from: &AccountId, id: &TransferId) -> Option<OldRecord> {
        let key = idempotency_key(shadow, self.link.shards, from, id);
        if let Some((_, r)) = self.link.buffer.get(&key) {
            return Some(r.clone());
        }
        self.found.records.get(&key).cloned()
    }
}

/// The tier thread: writes runs, expires, bounds and compacts.
fn run(mut tier: Tier, rx: mpsc::Receiver<TierWork>, shared: Arc<TierShared>, config: TierConfig, window_ms: u64) {
    let mut gathered: Vec<Entry> = Vec::new();
    let mut lo = 0u64;
    let mut hi = 0u64;
    let mut clock_ms = 0u64;
    let mut first_at: Option<Instant> = None;
    let mut bound_floor: Option<u64> = None;
    let mut open = true;
    let fail = |e: TierError| shared.fail(e.to_string());
    while open || !gathered.is_empty() {
        let wait = first_at.map_or(config.run_interval, |t| config.run_interval.saturating_sub(t.elapsed()));
        let mut flush = false;
        match rx.recv_timeout(wait) {
            Ok(TierWork::Spill { gen, mut entries, clock_ms: at }) => {
                if gathered.is_empty() {
                    lo = gen;
                    first_at = Some(Instant::now());
                }
                hi = gen;
                clock_ms = clock_ms.max(at);
                gathered.append(&mut entries);
            }
            Ok(TierWork::Flush) => flush = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                open = false;
                flush = true;
            }
        }
        let due = first_at.is_some_and(|t| t.elapsed() >= config.run_interval);
        if gathered.is_empty() || !(flush || due || gathered.len() >= config.run_entries_min) {
            if !open {
                break;
            }
            continue;
        }
        if let Err(e) = tier.write_run(lo, hi, std::mem::take(&mut gathered)) {
            fail(e);
            return;
        }
        first_at = None;
        shared.publish(&tier, bound_floor);
        // Maintenance after each run: expire what left the window, keep the
        // disk bound (loudly), merge a little.
        if let Err(e) = tier.expire(clock_ms.saturating_sub(window_ms)) {
            fail(e);
            return;
        }
        match tier.enforce_bytes_max() {
            Ok(Some(oldest)) => {
                if oldest > clock_ms.saturating_sub(window_ms) {
                    let held_s = clock_ms.saturating_sub(oldest) / 1000;
                    tracing::warn!(
                        held_s,
                        promised_s = window_ms / 1000,
                        bytes_max = config.options.bytes_max,
                        "the idempotency tier reached its disk bound and dropped records inside the window: \
                         the window held is shorter than promised"
                    );
                    bound_floor = Some(bound_floor.map_or(oldest, |f: u64| f.max(oldest)));
                }
            }
            Ok(None) => {}
            Err(e) => {
                fail(e);
                return;
            }
        }
        if let Err(e) = tier.compact() {
            fail(e);
            return;
        }
        shared.publish(&tier, bound_floor);
    }
}
