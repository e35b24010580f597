//! The disk tier of a cell's idempotency records: where records go when they
//! leave memory, so a retry within the promised window (a day by default)
//! still finds its transfer.
//!
//! The writer never reads the disk:
//! - the **tier thread** owns the [`Tier`]: it writes the records the engine
//!   hands it as runs (one durable file each), expires runs past the window,
//!   enforces the disk bound and compacts; after each change it publishes a
//!   new [`TierView`] and the highest generation it holds durably;
//! - the **prefetch** runs on the thread that queues a work (the engine's
//!   `Prefetcher`): it looks every transfer's key (and every status read's)
//!   up in the generations the tier's view does not hold yet ([`SpillBuffer`])
//!   and in the view, and notes the newest generation it could see, under one
//!   lock together with the send into the queue, so the generations the works
//!   saw never go down along the queue;
//! - the **writer** (the engine) answers a key from memory first, then from
//!   what the prefetch found. Records leave its memory in two steps: copied
//!   out (they go to the tier once their batch is durable) and released only
//!   once the work just applied saw their generation, so every later work
//!   sees it too: no record is ever in neither place a lookup asks.
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

use cellpay_core::{
    idempotency_key, parse_idempotency_key, shard_key_range, AccountId, CopyMarks, OldRecord, OlderRecords, TierCursor,
    TierEntry, TierPage, TransferId,
};
use cellpay_tier::{Entry, ImportPage, Tier, TierError, TierOptions, TierView};

/// The most entries one page of a tier copy carries (I7; ~1.6 MB at ~100 B each).
pub const TIER_PAGE_ENTRIES_MAX: usize = 1 << 14;
/// The most tier snapshots a cell keeps open for copies in progress; a new
/// one past it ends the oldest copy (which starts again), I7.
pub const TIER_SNAPSHOTS_MAX: usize = 4;
/// The most bytes a shard's export may take encoded: it travels to the new
/// owner in one install (a cell process's request body is at most 16 MiB), I7.
pub const EXPORT_BYTES_MAX: usize = 15 << 20;
/// Exports of fewer items than this are far below [`EXPORT_BYTES_MAX`]
/// (an item encodes in well under 500 bytes): their size is not measured.
const EXPORT_ITEMS_UNMEASURED: usize = 20_000;
/// The most records of the disk tier a shard's export carries: the rest must
/// have been copied before the freeze (see `Query::ExportShard`), I7.
pub const EXPORT_OLDER_MAX: usize = 1 << 16;

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
    /// Runs, imported ones included.
    pub runs: u64,
    /// Runs imported from another cell's tier with a shard that moved here.
    pub imported_runs: u64,
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

/// A key as the writer and the prefetch hold it in memory: ledger, payer,
/// transfer id (cheap clones, no encoding); the tier thread encodes it.
pub(crate) type MemKey = (bool, AccountId, TransferId);

/// The records one batch moved out of memory: (shadow, record).
pub(crate) type Generation = Arc<Vec<(bool, OldRecord)>>;

/// Turns the records one batch moved out of memory into tier entries of generation `gen`.
pub(crate) fn entries<'a>(gen: u64, shards: u32, records: impl Iterator<Item = (bool, &'a OldRecord)>) -> Vec<Entry> {
    records
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

/// Whether a shard's export fits in one install ([`EXPORT_BYTES_MAX`]).
pub(crate) fn export_fits(export: &cellpay_core::ShardExport) -> Result<(), String> {
    let items = [&export.real, &export.shadow]
        .iter()
        .map(|l| l.accounts.len() + l.records.len() + l.history.len())
        .sum::<usize>();
    if items < EXPORT_ITEMS_UNMEASURED {
        return Ok(());
    }
    let mut w = cellpay_core::codec::Writer::with_capacity(items * 64);
    cellpay_core::moves::encode_export(&mut w, export);
    if w.buf.len() > EXPORT_BYTES_MAX {
        return Err(format!(
            "shard {}'s export is {} bytes, over the {EXPORT_BYTES_MAX} one install carries: \
             its records and history in memory are too large to move in one piece",
            export.shard,
            w.buf.len()
        ));
    }
    Ok(())
}

/// A random 32-bit start (the clock's nanoseconds, mixed).
fn rand_start() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (cellpay_core::stable_hash(&nanos.to_le_bytes()) >> 32) as u32
}

/// The last snapshot id given, and the snapshots held: (id, view), oldest first.
type Snapshots = (u64, std::collections::VecDeque<(u64, Arc<TierView>)>);

pub(crate) struct TierShared {
    published: Mutex<Published>,
    changed: Condvar,
    /// The way to the tier thread for imports and pruning (cleared as the thread stops).
    work: Mutex<Option<mpsc::Sender<TierWork>>>,
    /// Snapshots of copies in progress: (id, view), oldest first.
    snapshots: Mutex<Snapshots>,
    shards: u32,
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
            imported_runs: stats.imported_runs as u64,
            entries: stats.entries,
            bytes: stats.bytes,
            memory_bytes: stats.filter_bytes + stats.index_bytes,
            oldest_at_ms: stats.oldest_at_ms,
            bound_floor_at_ms,
            ..TierFigures::default()
        };
        self.changed.notify_all();
    }

    /// A page of `shard`'s records from a snapshot (see `Query::TierPage`).
    pub fn page(&self, shard: u32, snapshot: u64, seq_after: u64, cursor: TierCursor) -> Result<TierPage, String> {
        let (snapshot, view) = {
            let mut held = self.snapshots.lock().expect("snapshots lock");
            if snapshot == 0 {
                held.0 += 1;
                let id = held.0;
                let view = self.view();
                if held.1.len() == TIER_SNAPSHOTS_MAX {
                    held.1.pop_front();
                }
                held.1.push_back((id, view.clone()));
                (id, view)
            } else {
                let view = held.1.iter().find(|(id, _)| *id == snapshot).map(|(_, v)| v.clone());
                let view =
                    view.ok_or_else(|| format!("tier snapshot {snapshot} is no longer held: start the copy again"))?;
                (snapshot, view)
            }
        };
        let seq_filter = (seq_after > 0).then_some(seq_after);
        let sources = view.sources(seq_filter);
        let through_seq = (view.durable_through() << SEQ_INDEX_BITS) | ((1 << SEQ_INDEX_BITS) - 1);
        let parts = sources.len() as u32 * 2;
        let (mut part, after) = (cursor.part, cursor.after_key);
        while part < parts {
            let source = sources[part as usize / 2];
            let (from, to) = shard_key_range(part % 2 == 1, shard);
            let (mut entries, more) = view
                .scan(source, &from, &to, after.as_deref(), None, TIER_PAGE_ENTRIES_MAX)
                .map_err(|e| e.to_string())?
                .expect("a source of the view");
            if entries.is_empty() && !more && after.is_none() {
                part += 1;
                continue;
            }
            let next = match entries.last() {
                Some(last) if more => Some(TierCursor { part, after_key: Some(last.key.clone()) }),
                _ => (part + 1 < parts).then(|| TierCursor { part: part + 1, after_key: None }),
            };
            if let Some(s) = seq_filter {
                entries.retain(|e| e.seq > s);
            }
            let entries = entries
                .into_iter()
                .map(|e| TierEntry { key: e.key, seq: e.seq, at_ms: e.at_ms, value: e.value })
                .collect();
            let keys_max = view.estimate(source, &from, &to);
            if next.is_none() {
                self.snapshots.lock().expect("snapshots lock").1.retain(|(id, _)| *id != snapshot);
            }
            return Ok(TierPage { snapshot, through_seq, part, keys_max, entries, last: !more, next });
        }
        self.snapshots.lock().expect("snapshots lock").1.retain(|(id, _)| *id != snapshot);
        Ok(TierPage { snapshot, through_seq, part, keys_max: 0, entries: Vec::new(), last: true, next: None })
    }

    /// Every record of `shard` in the tier's current view with a `seq` above
    /// `seq_after` (0: all of them, imported ones too), decoded; refused past
    /// [`EXPORT_OLDER_MAX`].
    pub fn older_of(&self, shard: u32, seq_after: u64) -> Result<Vec<(bool, OldRecord)>, String> {
        let mut snapshot = 0;
        let older = self.older_from(shard, seq_after, &mut snapshot);
        self.snapshots.lock().expect("snapshots lock").1.retain(|(id, _)| *id != snapshot);
        older
    }

    fn older_from(&self, shard: u32, seq_after: u64, snapshot: &mut u64) -> Result<Vec<(bool, OldRecord)>, String> {
        let mut out = Vec::new();
        let mut cursor = Some(TierCursor::default());
        while let Some(at) = cursor.take() {
            let page = self.page(shard, *snapshot, seq_after, at)?;
            *snapshot = page.snapshot;
            if out.len() + page.entries.len() > EXPORT_OLDER_MAX {
                return Err(format!(
                    "shard {shard} has more than {EXPORT_OLDER_MAX} records in the disk tier after mark {seq_after}: \
                     copy them to the new owner before the freeze"
                ));
            }
            for e in page.entries {
                let (shadow, from, id) =
                    parse_idempotency_key(&e.key).ok_or("a tier key of the shard does not parse")?;
                let r = OldRecord::decode_value(&from, &id, &e.value).map_err(|e| e.to_string())?;
                out.push((shadow, r));
            }
            cursor = page.next;
        }
        Ok(out)
    }

    /// Writes a page of a copy into the tier (see `Query::TierImport`);
    /// answers the entries written.
    pub async fn import(
        &self,
        (shard, move_id, part): (u32, u64, u32),
        keys_max: u64,
        entries: Vec<TierEntry>,
        (first, last): (bool, bool),
    ) -> Result<u64, String> {
        if shard >= self.shards {
            return Err(format!("no shard {shard}: the cell has {}", self.shards));
        }
        // Every entry must be a record of the shard this cell can read back:
        // one that does not decode would stop the cell at its first lookup.
        for e in &entries {
            let bad = |why: &str| {
                Err(format!("an entry of {} key bytes is not a record of shard {shard}: {why}", e.key.len()))
            };
            let Some((shadow, from, id)) = parse_idempotency_key(&e.key) else { return bad("its key does not parse") };
            // The key rebuilt from its parts names the payer's own shard.
            if e.key[1..5] != shard.to_be_bytes() || idempotency_key(shadow, self.shards, &from, &id) != e.key {
                return bad("its payer is in another shard");
            }
            match OldRecord::decode_value(&from, &id, &e.value) {
                Ok(r) if r.at_ms == e.at_ms => {}
                Ok(_) => return bad("its time and its record's differ"),
                Err(err) => return bad(&err.to_string()),
            }
        }
        let n = entries.len() as u64;
        let entries =
            entries.into_iter().map(|e| Entry { key: e.key, seq: e.seq, at_ms: e.at_ms, value: e.value }).collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let work = TierWork::Import { part: (shard, move_id, part), keys_max, entries, first, last, reply };
        let sent = self.work.lock().expect("work lock").as_ref().is_some_and(|tx| tx.send(work).is_ok());
        if !sent {
            return Err("the tier thread is not running".into());
        }
        answer.await.map_err(|_| "the tier thread stopped".to_string())??;
        Ok(n)
    }

    /// Drops the imported records of shards this cell does not own at `epoch`
    /// from moves decided by it (done, undone, or lost to another).
    pub fn prune_imports(&self, epoch: u64, owned: Vec<bool>) {
        if let Some(tx) = self.work.lock().expect("work lock").as_ref() {
            let _ = tx.send(TierWork::PruneImports { epoch, owned });
        }
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
    Spill { gen: u64, records: Generation, clock_ms: u64 },
    /// Write what is gathered now: a checkpoint waits for it.
    Flush,
    /// A page of records copied from another cell's tier: (shard, move, part).
    Import {
        part: (u32, u64, u32),
        keys_max: u64,
        entries: Vec<Entry>,
        first: bool,
        last: bool,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Drop imports of shards not owned at `epoch` from moves up to it.
    PruneImports { epoch: u64, owned: Vec<bool> },
}

/// Records handed to the tier that some lookup may not see in the tier yet,
/// by generation, with an index by a hash of the key (cheap to compute and
/// compare); a record whose hash another key already holds goes to
/// `collisions`, so none is hidden. The writer keeps one for the generations
/// newer than what its works' prefetch saw; the prefetch thread keeps one for
/// the generations newer than what the tier's view holds.
#[derive(Default)]
pub(crate) struct SpillBuffer {
    gens: std::collections::VecDeque<(u64, Generation)>,
    index: HashMap<u64, (u64, u32), foldhash::fast::RandomState>,
    collisions: HashMap<MemKey, (u64, u32)>,
}

impl SpillBuffer {
    pub fn push(&mut self, gen: u64, records: Generation) {
        for (i, (shadow, r)) in records.iter().enumerate() {
            let at = (gen, i as u32);
            match self.index.entry(key_hash(*shadow, &r.from, &r.id)) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(at);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let (g, k) = *e.get();
                    let same = |(s, o): (bool, &OldRecord)| s == *shadow && o.from == r.from && o.id == r.id;
                    // The record at (g, k) is in `gens` already, or in `records` when g == gen.
                    let held = if g == gen {
                        records.get(k as usize).map(|(s, o)| (*s, o))
                    } else {
                        record_at(&self.gens, g, k)
                    };
                    if held.is_some_and(same) {
                        e.insert(at); // a newer version of the same key
                    } else {
                        self.collisions.insert((*shadow, r.from.clone(), r.id.clone()), at);
                    }
                }
            }
        }
        self.gens.push_back((gen, records));
    }

    /// The newest generation held, if any.
    pub fn last(&self) -> Option<u64> {
        self.gens.back().map(|(g, _)| *g)
    }

    /// Forgets the generations through `through`.
    pub fn prune(&mut self, through: u64) {
        if self.gens.back().is_some_and(|(g, _)| *g <= through) {
            // Everything goes: clearing keeps the tables' capacity and leaves no tombstones.
            self.gens.clear();
            self.index.clear();
            self.collisions.clear();
            return;
        }
        while self.gens.front().is_some_and(|(gen, _)| *gen <= through) {
            let (gen, records) = self.gens.pop_front().expect("checked");
            for (i, (shadow, r)) in records.iter().enumerate() {
                if let std::collections::hash_map::Entry::Occupied(e) =
                    self.index.entry(key_hash(*shadow, &r.from, &r.id))
                {
                    if *e.get() == (gen, i as u32) {
                        e.remove();
                    }
                }
            }
            if !self.collisions.is_empty() {
                self.collisions.retain(|_, (g, _)| *g > through);
            }
        }
    }

    /// The newest buffered version of a key.
    pub fn find(&self, shadow: bool, from: &AccountId, id: &TransferId) -> Option<&OldRecord> {
        if self.gens.is_empty() {
            return None;
        }
        if let Some(&(g, i)) = self.index.get(&key_hash(shadow, from, id)) {
            if let Some((s, r)) = record_at(&self.gens, g, i) {
                if s == shadow && r.from == *from && r.id == *id {
                    return Some(r);
                }
            }
        }
        if self.collisions.is_empty() {
            return None;
        }
        let &(g, i) = self.collisions.get(&(shadow, from.clone(), id.clone()))?;
        record_at(&self.gens, g, i).map(|(_, r)| r)
    }
}

fn record_at(gens: &std::collections::VecDeque<(u64, Generation)>, gen: u64, i: u32) -> Option<(bool, &OldRecord)> {
    let first = gens.front()?.0;
    let (_, records) = gens.get(usize::try_from(gen.checked_sub(first)?).ok()?)?;
    records.get(i as usize).map(|(s, r)| (*s, r))
}

/// The in-memory hash of a key (never stored).
fn key_hash(shadow: bool, from: &AccountId, id: &TransferId) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x5eed).hash_one((shadow, from.as_str(), id.as_str()))
}

/// The running tier thread and the way to it.
pub(crate) struct TierLink {
    pub shared: Arc<TierShared>,
    tx: Option<mpsc::Sender<TierWork>>,
    /// The same generations, to the prefetch thread.
    prefetch_tx: Option<mpsc::Sender<(u64, Generation)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The last generation handed to the tier.
    pub gen: u64,
    /// Per generation, the ledgers' copy marks (see `CellState::copy_out`),
    /// until the records before them may leave memory.
    marks: std::collections::VecDeque<(u64, CopyMarks)>,
    /// The generations handed to the tier that it may not hold durably yet:
    /// a shard's export carries its records from them (see [`TierLink::unsettled_of`]).
    unsettled: std::collections::VecDeque<(u64, Generation)>,
    shards: u32,
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
            work: Mutex::new(None),
            // Ids start at a random point, so an id from before a restart names nothing now.
            snapshots: Mutex::new((u64::from(rand_start()) << 20, Default::default())),
            shards,
        });
        shared.publish(&tier, None);
        let gen = tier.durable_through();
        let (tx, rx) = mpsc::channel();
        *shared.work.lock().expect("work lock") = Some(tx.clone());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new().name(name).spawn(move || run(tier, rx, shared, config, window_ms, shards))?
        };
        Ok(Self {
            shared,
            tx: Some(tx),
            prefetch_tx: None,
            thread: Some(thread),
            gen,
            marks: Default::default(),
            unsettled: Default::default(),
            shards,
        })
    }

    /// The channel on which the prefetch thread receives every generation.
    pub fn prefetch_channel(&mut self) -> mpsc::Receiver<(u64, Generation)> {
        let (tx, rx) = mpsc::channel();
        self.prefetch_tx = Some(tx);
        rx
    }

    /// Hands the records a durable batch moved out of memory to the tier.
    pub fn spill(&mut self, real: Vec<OldRecord>, shadow: Vec<OldRecord>, clock_ms: u64) {
        if real.is_empty() && shadow.is_empty() {
            return;
        }
        self.gen += 1;
        let mut records = Vec::with_capacity(real.len() + shadow.len());
        records.extend(real.into_iter().map(|r| (false, r)));
        records.extend(shadow.into_iter().map(|r| (true, r)));
        let records = Arc::new(records);
        let durable = self.shared.view().durable_through();
        while self.unsettled.front().is_some_and(|(g, _)| *g <= durable) {
            self.unsettled.pop_front();
        }
        self.unsettled.push_back((self.gen, records.clone()));
        if let Some(tx) = &self.prefetch_tx {
            // A prefetch thread that is gone has nothing left to look up.
            let _ = tx.send((self.gen, records.clone()));
        }
        let work = TierWork::Spill { gen: self.gen, records, clock_ms };
        if self.tx.as_ref().is_none_or(|tx| tx.send(work).is_err()) {
            self.shared.fail("the tier thread is gone".into());
        }
    }

    /// The records of `shard` in generations the tier may not hold durably
    /// yet (those it holds, a reader of its view finds).
    pub fn unsettled_of(&mut self, shard: u32) -> Vec<(bool, OldRecord)> {
        let durable = self.shared.view().durable_through();
        while self.unsettled.front().is_some_and(|(g, _)| *g <= durable) {
            self.unsettled.pop_front();
        }
        let shards = u64::from(self.shards.max(1));
        let in_shard =
            |r: &OldRecord| cellpay_core::stable_hash(r.from.as_str().as_bytes()) % shards == u64::from(shard);
        self.unsettled.iter().flat_map(|(_, g)| g.iter()).filter(|(_, r)| in_shard(r)).cloned().collect()
    }

    /// Notes the copy marks of the batch just spilled (generation `gen`).
    pub fn copied(&mut self, marks: CopyMarks) {
        match self.marks.back_mut() {
            Some((g, m)) if *g == self.gen => *m = marks,
            _ => self.marks.push_back((self.gen, marks)),
        }
    }

    /// The newest marks whose generation every later work's prefetch sees
    /// (the prefetch thread takes works in queue order and generations only
    /// grow): the records before them may leave memory.
    pub fn releasable(&mut self, through: u64) -> Option<CopyMarks> {
        let mut out = None;
        while self.marks.front().is_some_and(|(g, _)| *g <= through) {
            out = self.marks.pop_front().map(|(_, m)| m);
        }
        out
    }

    /// Waits, when called, until the tier holds every generation handed to it
    /// so far; called on another thread (a checkpoint written in the
    /// background waits for it, so the writer does not).
    pub fn flush_later(&self) -> Box<dyn FnOnce() -> Result<(), String> + Send> {
        let (gen, shared, tx) = (self.gen, self.shared.clone(), self.tx.clone());
        Box::new(move || {
            if gen == 0 || shared.view().durable_through() >= gen {
                return shared.failed().map_or(Ok(()), Err);
            }
            if let Some(tx) = tx {
                let _ = tx.send(TierWork::Flush);
            }
            shared.wait_durable(gen)
        })
    }

    /// The records a batch's transfers may need from outside memory: what the prefetch found.
    pub fn older<'a>(&'a self, found: &'a Found) -> Older<'a> {
        Older { found }
    }
}

impl Drop for TierLink {
    fn drop(&mut self) {
        // Closing the channel lets the thread write what it gathered and end.
        self.tx.take();
        self.shared.work.lock().expect("work lock").take();
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
    pub records: HashMap<MemKey, OldRecord>,
    /// A lookup failed: the work must not run as if nothing was found.
    pub error: Option<String>,
}

/// Looks up one key in a view, counting disk reads.
pub(crate) fn prefetch_key(
    shared: &TierShared,
    view: &TierView,
    shadow: bool,
    shards: u32,
    from: &AccountId,
    id: &TransferId,
    found: &mut Found,
) {
    let key = idempotency_key(shadow, shards, from, id);
    let before = view.read_stats().block_reads;
    let started = Instant::now();
    match view.get(&key) {
        Ok(Some(e)) => match OldRecord::decode_value(from, id, &e.value) {
            Ok(r) => {
                shared.disk_hits.fetch_add(1, Relaxed);
                found.records.insert((shadow, from.clone(), id.clone()), r);
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
    found: &'a Found,
}

impl OlderRecords for Older<'_> {
    fn find(&self, shadow: bool, from: &AccountId, id: &TransferId) -> Option<OldRecord> {
        if self.found.records.is_empty() {
            return None;
        }
        self.found.records.get(&(shadow, from.clone(), id.clone())).cloned()
    }
}

/// The tier thread: writes runs, expires, bounds and compacts.
fn run(
    mut tier: Tier,
    rx: mpsc::Receiver<TierWork>,
    shared: Arc<TierShared>,
    config: TierConfig,
    window_ms: u64,
    shards: u32,
) {
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
            Ok(TierWork::Spill { gen, records, clock_ms: at }) => {
                let mut entries = entries(gen, shards, records.iter().map(|(shadow, r)| (*shadow, r)));
                if gathered.is_empty() {
                    lo = gen;
                    first_at = Some(Instant::now());
                }
                hi = gen;
                clock_ms = clock_ms.max(at);
                gathered.append(&mut entries);
            }
            Ok(TierWork::Flush) => flush = true,
            Ok(TierWork::Import { part, keys_max, entries, first, last, reply }) => {
                let done = tier.import(part, ImportPage { keys_max, first, last, entries: &entries });
                if last && done.is_ok() {
                    shared.publish(&tier, bound_floor);
                }
                let _ = reply.send(done.map(|_| ()).map_err(|e| e.to_string()));
            }
            Ok(TierWork::PruneImports { epoch, owned }) => {
                let doomed =
                    |group: u32, tag: u64| tag <= epoch && !owned.get(group as usize).copied().unwrap_or(false);
                match tier.drop_imports(doomed) {
                    Ok(0) => {}
                    Ok(_) => shared.publish(&tier, bound_floor),
                    Err(e) => {
                        fail(e);
                        return;
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use cellpay_core::{Currency, TransferStatus};

    fn record(from: &str, id: &str, amount: i64) -> OldRecord {
        OldRecord {
            id: TransferId::new(id).unwrap(),
            from: AccountId::new(from).unwrap(),
            to: AccountId::new("shop").unwrap(),
            amount,
            currency: Currency::new("CNY").unwrap(),
            currency_given: None,
            memo_hash: 0,
            status: TransferStatus::Settled,
            at_ms: 1,
        }
    }

    fn find(buffer: &SpillBuffer, shadow: bool, from: &str, id: &str) -> Option<i64> {
        buffer.find(shadow, &AccountId::new(from).unwrap(), &TransferId::new(id).unwrap()).map(|r| r.amount)
    }

    fn generation(records: Vec<(bool, OldRecord)>) -> Generation {
        Arc::new(records)
    }

    #[test]
    fn a_spill_buffer_answers_the_newest_version_until_its_generation_is_pruned() {
        let mut buffer = SpillBuffer::default();
        buffer.push(
            1,
            generation(vec![
                (false, record("a", "t1", 1)),
                (false, record("b", "t1", 2)),
                (true, record("a", "t1", 3)),
            ]),
        );
        buffer.push(2, generation(vec![(false, record("a", "t2", 4)), (false, record("a", "t1", 5))]));
        assert_eq!(buffer.last(), Some(2));
        assert_eq!(find(&buffer, false, "a", "t1"), Some(5), "the newer generation's version");
        assert_eq!(find(&buffer, false, "b", "t1"), Some(2), "the payer is part of the key");
        assert_eq!(find(&buffer, true, "a", "t1"), Some(3), "so is the ledger");
        assert_eq!(find(&buffer, false, "c", "t1"), None);
        buffer.prune(1);
        assert_eq!(find(&buffer, false, "b", "t1"), None, "generation 1 is left to the tier");
        assert_eq!((find(&buffer, false, "a", "t1"), find(&buffer, false, "a", "t2")), (Some(5), Some(4)));
        buffer.prune(2);
        assert_eq!(buffer.last(), None);
        assert!(buffer.index.is_empty());
    }

    #[test]
    fn spilled_generations_become_durable_and_their_marks_releasable_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let tier = Tier::open(dir.path(), TierOptions::default()).unwrap();
        let config = TierConfig { enabled: true, run_interval: Duration::from_secs(3600), ..TierConfig::default() };
        let mut link = TierLink::start(tier, "test-tier".into(), config, 16, 86_400_000).unwrap();
        let spills = link.prefetch_channel();
        let marks = |round| CopyMarks { round, real: round * 10, shadow: 0 };
        link.spill(vec![record("a", "t1", 1), record("b", "t1", 2)], vec![record("a", "t1", 3)], 10);
        link.copied(marks(1));
        link.spill(vec![record("a", "t2", 4)], vec![], 20);
        link.copied(marks(2));
        link.copied(marks(3)); // a round that copied nothing rides on generation 2
        assert_eq!(link.gen, 2);
        assert_eq!(spills.try_iter().map(|(g, r)| (g, r.len())).collect::<Vec<_>>(), [(1, 3), (2, 1)]);
        assert_eq!(link.releasable(0), None);
        assert_eq!(link.releasable(1), Some(marks(1)));
        assert_eq!(link.releasable(5), Some(marks(3)));
        assert_eq!(link.releasable(5), None);
        // The tier holds both generations once flushed, and a view finds them.
        link.flush_later()().unwrap();
        let view = link.shared.view();
        assert_eq!(view.durable_through(), 2);
        let mut found = Found::default();
        let (b, t1) = (AccountId::new("b").unwrap(), TransferId::new("t1").unwrap());
        prefetch_key(&link.shared, &view, false, 16, &b, &t1, &mut found);
        assert_eq!(found.records.values().map(|r| r.amount).collect::<Vec<_>>(), [2]);
        let older = link.older(&found);
        assert_eq!(older.find(false, &b, &t1).map(|r| r.amount), Some(2));
        assert_eq!(older.find(true, &b, &t1), None);
    }
}
