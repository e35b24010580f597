//! The engine: one writer thread per cell, a bounded queue, smart batching,
//! one durable append per batch, answers only after the append.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cellpay_core::codec::BatchEncoder;
use cellpay_core::{
    priority_of, snapshot, AccountId, Admission, CellId, CellState, Command, ErrorCode, IdempotencyReach,
    LedgerFigures, Limits, NoOlder, OlderRecords, Op, Outcome, Priority, Query, QueryAnswer, Rejection, ShardMap,
    TransferId, IDEMPOTENCY_WINDOW_MS_DEFAULT,
};
use cellpay_store::{EmbeddedStore, Store, StoreError, StoreOptions};
use cellpay_tier::Tier;
use tokio::sync::{mpsc, oneshot, watch};

use crate::codel::QueueDelay;
use crate::health::{Health, Watchdog};
use crate::recovery::{recover_with_tier, RecoveryError, RecoveryReport};
use crate::stats::{thread_cpu_ns, EngineStats};
use crate::tier::{prefetch_key, Found, Generation, SpillBuffer, TierConfig, TierFigures, TierLink, TierShared};

/// Limits and tuning of one engine (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// The most commands one batch (one durable append) may hold.
    pub batch_commands_max: usize,
    /// Group commit: under concurrent load, how long the engine waits for
    /// more commands before a batch's durable append, so that one fsync
    /// serves more payments (zero: never). See [`BATCH_LINGER_DEFAULT`].
    pub batch_linger: Duration,
    /// The most commands (and queries) waiting in the queue; beyond it, `overloaded`.
    pub queue_commands_max: usize,
    /// A checkpoint is written once this many log bytes follow the last one.
    pub checkpoint_log_bytes: u64,
    /// Retention limits, used when the cell is created (a checkpoint keeps them).
    pub limits: Limits,
    pub store: StoreOptions,
    /// Queue-delay shedding (CoDel-like): the time a request may wait in the
    /// queue before the cell starts shedding the lowest class still served.
    pub queue_delay_target: Duration,
    /// How long the queue delay must stay above (or below) the target before
    /// one more class is shed (or one is served again).
    pub queue_delay_interval: Duration,
    /// The watchdog's limit: once the engine has been inside one batch for
    /// longer than this (a hung disk), the cell shows as stalled and refuses
    /// new work until the batch finishes (see [`Health`]).
    pub stall_after: Duration,
    /// Undelivered cross-cell credits per destination cell (and ledger) before
    /// cross-cell transfers to it are refused with `outbox_full` (I7). The
    /// router's flow rules set it live ([`CellHandle::set_outbox_messages_max`]).
    pub outbox_messages_max: u64,
    /// The idempotency window promised to clients: a retry finds its
    /// transfer's record while the record is younger than this and still held.
    pub idempotency_window: Duration,
    /// The disk tier that keeps records once they leave memory (off: they are gone).
    pub tier: TierConfig,
    /// The most commands and reads the engine applies a second (0: no
    /// limit): past it the writer sleeps between batches. It sizes a cell as
    /// if it had a machine of its own, so that on one host a cell's capacity
    /// is its own and adding cells adds capacity (the scale-out drill). A
    /// move's steps count one each. See [`PACE_WINDOW`].
    pub commands_per_s_max: u32,
}

/// The window over which [`EngineConfig::commands_per_s_max`] is held:
/// within it the writer may run ahead by one batch, never further.
pub const PACE_WINDOW: Duration = Duration::from_millis(100);

/// The most works waiting in a cell's control lane (I7). The mover runs one
/// move at a time, a step at a time; the rest are map installs, one at most
/// from each relay that saw a shard move. Beyond it, `overloaded`.
pub const CONTROL_LANE_MAX: usize = 4096;

/// How long a cell holds a shard's export that is not ready yet (the
/// shard's freeze not applied, or its payers' messages in flight) before it
/// answers why (I7); see `CellHandle::export_when_ready`.
pub const EXPORT_WAIT_MAX: Duration = Duration::from_millis(100);
/// How often a held export is asked for again.
const EXPORT_WAIT_POLL: Duration = Duration::from_millis(1);

/// How often a pacing engine looks at its control lane while it sleeps.
const PACE_SLICE: Duration = Duration::from_millis(1);

/// The default of [`EngineConfig::outbox_messages_max`]: about 8 MiB of
/// waiting credits per destination, a minute of a busy pair's traffic.
pub const OUTBOX_MESSAGES_MAX_DEFAULT: u64 = 65_536;

/// Both ledgers' audit figures as of the latest durable batch, published by
/// the engine so that metrics and dashboards read them without queueing work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellFigures {
    pub real: LedgerFigures,
    pub shadow: LedgerFigures,
    /// The cell's clock (Unix milliseconds) as of the same batch.
    pub clock_ms: u64,
    /// How far back each ledger's idempotency records reach.
    pub reach_real: IdempotencyReach,
    pub reach_shadow: IdempotencyReach,
    /// The idempotency window the cell promises (its configuration), in milliseconds.
    pub window_promised_ms: u64,
    /// The disk tier, when the cell keeps one.
    pub tier: Option<TierFigures>,
}

impl CellFigures {
    fn of(state: &CellState, config: &EngineConfig) -> Self {
        Self {
            window_promised_ms: config.idempotency_window.as_millis() as u64,
            tier: None,
            real: state.ledger(false).figures(),
            shadow: state.ledger(true).figures(),
            clock_ms: state.clock_ms(),
            reach_real: state.ledger(false).idempotency_reach(),
            reach_shadow: state.ledger(true).idempotency_reach(),
        }
    }

    /// The idempotency window one ledger holds against the promise, in
    /// milliseconds: with a disk tier, the whole promise unless its disk bound
    /// dropped records still inside it; without one, how far memory reaches.
    pub fn window_held_ms(&self, shadow: bool) -> u64 {
        let promised = self.window_promised_ms;
        match &self.tier {
            Some(t) => t.bound_floor_at_ms.map_or(promised, |floor| promised.min(self.clock_ms.saturating_sub(floor))),
            None => {
                let reach = if shadow { &self.reach_shadow } else { &self.reach_real };
                reach.window_held_ms(self.clock_ms, promised)
            }
        }
    }

    pub fn ledger(&self, shadow: bool) -> &LedgerFigures {
        if shadow {
            &self.shadow
        } else {
            &self.real
        }
    }
}

/// The share of the queue each class may fill, in percent, highest class
/// first: the top of the queue is kept for payments, so a flood of shadow or
/// read traffic can never fill it (I7).
pub const QUEUE_SHARE_PERCENT: [usize; 4] = [100, 90, 75, 50];

/// The default group-commit linger. On this project's machines an fsync
/// costs about 150 µs of CPU (a virtio flush), a quarter of a payment's
/// server CPU without it; 2 ms of linger cut fsyncs 4.6x and served 1.6x the
/// payments on one core (docs/BENCHMARKS.md), within a 100 ms p99 SLO.
pub const BATCH_LINGER_DEFAULT: Duration = Duration::from_millis(2);

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_commands_max: 8190,
            batch_linger: BATCH_LINGER_DEFAULT,
            queue_commands_max: 65_536,
            checkpoint_log_bytes: 32 << 20,
            limits: Limits::default(),
            store: StoreOptions::default(),
            queue_delay_target: Duration::from_millis(5),
            queue_delay_interval: Duration::from_millis(100),
            outbox_messages_max: OUTBOX_MESSAGES_MAX_DEFAULT,
            stall_after: Duration::from_secs(5),
            idempotency_window: Duration::from_millis(IDEMPOTENCY_WINDOW_MS_DEFAULT),
            tier: TierConfig::default(),
            commands_per_s_max: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("cell {cell} is overloaded: {queued} commands queued, limit {max}")]
    Overloaded { cell: CellId, queued: usize, max: usize },
    #[error("a request of {commands} commands exceeds the batch limit of {max}")]
    TooLarge { commands: usize, max: usize },
    #[error(
        "cell {cell} shed this {class} request after it waited {waited_ms} ms (queue delay target {target_ms} ms)"
    )]
    Shed { cell: CellId, class: &'static str, waited_ms: u64, target_ms: u64 },
    #[error("cell {cell} is unavailable: {reason}")]
    Unavailable { cell: CellId, reason: String },
}

type CommandsReply = oneshot::Sender<Result<Vec<Outcome>, EngineError>>;
type QueryReply = oneshot::Sender<Result<QueryAnswer, EngineError>>;

enum Work {
    /// `class` is the submission's priority class, computed once when it is queued.
    Commands {
        commands: Vec<Command>,
        reply: CommandsReply,
        queued_at: Instant,
        class: Priority,
        /// Idempotency records the prefetch found in the disk tier.
        found: Found,
    },
    Query {
        query: Query,
        reply: QueryReply,
        queued_at: Instant,
        class: Priority,
        found: Found,
    },
    Stop {
        checkpoint: bool,
    },
    /// Wakes an idle engine to take what waits in the control lane.
    Wake,
}

impl Work {
    fn priority(&self) -> Priority {
        match self {
            Work::Commands { class, .. } | Work::Query { class, .. } => *class,
            Work::Stop { .. } | Work::Wake => Priority::Critical,
        }
    }

    fn queued_at(&self) -> Option<Instant> {
        match self {
            Work::Commands { queued_at, .. } | Work::Query { queued_at, .. } => Some(*queued_at),
            Work::Stop { .. } | Work::Wake => None,
        }
    }

    /// Answers the work with `err` instead of serving it.
    fn refuse(self, err: EngineError) {
        match self {
            Work::Commands { reply, .. } => drop(reply.send(Err(err))),
            Work::Query { reply, .. } => drop(reply.send(Err(err))),
            Work::Stop { .. } | Work::Wake => {}
        }
    }

    /// Sends the answer computed for this work, once its batch is durable.
    fn answer(self, answer: Answer) {
        match (self, answer) {
            (Work::Commands { reply, .. }, Answer::Commands(outcomes)) => drop(reply.send(Ok(outcomes))),
            (Work::Query { reply, .. }, Answer::Query(a)) => drop(reply.send(Ok(a))),
            (Work::Stop { .. } | Work::Wake, Answer::Nothing) => {}
            _ => unreachable!("each answer is computed from the work at its position in the batch"),
        }
    }

    /// What the work counts for against the queue and batch limits.
    fn cost(&self) -> usize {
        match self {
            Work::Commands { commands, .. } => commands.len().max(1),
            Work::Query { .. } => 1,
            // Stop and Wake are never admitted against the queue limit, so they cost nothing.
            Work::Stop { .. } | Work::Wake => 0,
        }
    }

    /// A shard move's step or a map install: it goes in the control lane,
    /// ahead of the payments queued, so that a move's write pause does not
    /// wait behind a busy cell's queue once per step.
    fn is_control(&self) -> bool {
        match self {
            Work::Commands { commands, .. } => cellpay_core::is_control(commands),
            Work::Query { query, .. } => matches!(query, Query::ExportShard { .. }),
            Work::Stop { .. } | Work::Wake => false,
        }
    }
}

struct Shared {
    cell: CellId,
    /// Bumped after each batch that added outbox messages; relays watch it.
    outbox: watch::Sender<u64>,
    config: EngineConfig,
    queued: AtomicUsize,
    epoch: AtomicU64,
    /// The shard map the cell works at, replaced when a batch installs a newer one.
    map: std::sync::Mutex<Arc<ShardMap>>,
    watchdog: Watchdog,
    /// Set by the engine's queue-delay controller, read by handles.
    shed_level: AtomicUsize,
    /// The longest queue wait in the latest batch, in microseconds.
    queue_delay_us: AtomicU64,
    stats: EngineStats,
    /// The admission limit of cross-cell credits per destination, set live.
    outbox_messages_max: AtomicU64,
    /// Published after each batch that changed state.
    figures: std::sync::Mutex<Arc<CellFigures>>,
    /// The disk tier's shared side, when the cell keeps one.
    tier: Option<Arc<TierShared>>,
    /// Looks a work's keys up in the tier as it is queued (see [`Prefetcher`]).
    prefetcher: Option<std::sync::Mutex<Prefetcher>>,
    /// The control lane: move steps and map installs, taken at the start of
    /// every batch before the queue (see [`Work::is_control`]).
    control: std::sync::Mutex<std::collections::VecDeque<Work>>,
    /// A `Work::Wake` is in the queue (there is at most one).
    wake_queued: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Refuses what waits in the control lane: the engine will not take it.
    fn refuse_control(&self, reason: &str) {
        let lane: Vec<Work> = self.control.lock().expect("control lane lock").drain(..).collect();
        for work in lane {
            self.queued.fetch_sub(work.cost(), Relaxed);
            work.refuse(EngineError::Unavailable { cell: self.cell, reason: reason.to_string() });
        }
    }
}

/// A cheap, cloneable way to send work to a cell.
#[derive(Clone)]
pub struct CellHandle {
    tx: mpsc::Sender<Work>,
    shared: Arc<Shared>,
}

/// The answer to a submission, to await or block on.
pub struct Submission<T>(oneshot::Receiver<Result<T, EngineError>>, CellId);

impl<T> Submission<T> {
    fn lost(cell: CellId) -> EngineError {
        EngineError::Unavailable { cell, reason: "the engine stopped before answering".into() }
    }

    pub async fn wait(self) -> Result<T, EngineError> {
        let cell = self.1;
        self.0.await.unwrap_or_else(|_| Err(Self::lost(cell)))
    }

    /// Blocks the calling thread; never call it from an async task.
    pub fn wait_blocking(self) -> Result<T, EngineError> {
        let cell = self.1;
        self.0.blocking_recv().unwrap_or_else(|_| Err(Self::lost(cell)))
    }
}

impl CellHandle {
    pub fn cell(&self) -> CellId {
        self.shared.cell
    }

    /// The shard map epoch the cell works at.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Relaxed)
    }

    /// The shard map the cell works at.
    pub fn shard_map(&self) -> Arc<ShardMap> {
        self.shared.map.lock().expect("map lock").clone()
    }

    /// Commands and queries waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued.load(Relaxed)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Both ledgers' audit figures as of the latest durable batch: O(cells), no queueing.
    pub fn figures(&self) -> Arc<CellFigures> {
        let figures = self.shared.figures.lock().expect("figures lock").clone();
        match &self.shared.tier {
            None => figures,
            Some(tier) => Arc::new(CellFigures { tier: Some(tier.figures()), ..(*figures).clone() }),
        }
    }

    /// Asks the writer for a shard's export until it is ready or
    /// [`EXPORT_WAIT_MAX`] has passed: the coordinator sends the export with
    /// the freeze, and from another process the export may arrive first.
    async fn export_when_ready(&self, query: Query) -> Result<QueryAnswer, EngineError> {
        let deadline = Instant::now() + EXPORT_WAIT_MAX;
        loop {
            let answer = CellHandle::query(self, query.clone())?.wait().await;
            match &answer {
                Ok(QueryAnswer::Rejected(r)) if cellpay_core::export_not_ready(r) && Instant::now() < deadline => {
                    tokio::time::sleep(EXPORT_WAIT_POLL).await;
                }
                _ => return answer,
            }
        }
    }

    /// Answers a query about the disk tier (a copy of a moving shard's
    /// records) off the writer, or completes a shard's export with the
    /// records its tier holds; any other query goes to the writer as it is.
    pub(crate) async fn tier_query(&self, query: Query) -> Result<QueryAnswer, EngineError> {
        let refused = |why: String| Ok(QueryAnswer::Rejected(Rejection::new(ErrorCode::InvalidRequest, why)));
        let lost = || EngineError::Unavailable { cell: self.cell(), reason: "a tier task was lost".into() };
        match query {
            Query::TierPage { shard, snapshot, seq_after, cursor } => {
                let Some(tier) = self.shared.tier.clone() else {
                    // Nothing left this cell's memory to copy.
                    return Ok(QueryAnswer::TierPage(Box::default()));
                };
                let page = tokio::task::spawn_blocking(move || tier.page(shard, snapshot, seq_after, cursor))
                    .await
                    .map_err(|_| lost())?;
                match page {
                    Ok(page) => Ok(QueryAnswer::TierPage(Box::new(page))),
                    Err(why) => refused(why),
                }
            }
            Query::TierImport { shard, move_id, part, keys_max, entries, first, last } => {
                let Some(tier) = self.shared.tier.clone() else {
                    return refused("this cell keeps no disk tier of idempotency records".into());
                };
                match tier.import((shard, move_id, part), keys_max, entries, (first, last)).await {
                    Ok(entries) => Ok(QueryAnswer::TierImported { entries }),
                    Err(why) => refused(why),
                }
            }
            Query::ExportShard { shard, older_after } => {
                let answer = self.export_when_ready(query).await;
                let Some(tier) = self.shared.tier.clone() else { return answer };
                let mut export = match answer {
                    Ok(QueryAnswer::ShardExport(export)) => export,
                    other => return other,
                };
                let older =
                    tokio::task::spawn_blocking(move || tier.older_of(shard, older_after)).await.map_err(|_| lost())?;
                match older.and_then(|older| export.add_older(older)).and_then(|_| crate::tier::export_fits(&export)) {
                    Ok(()) => Ok(QueryAnswer::ShardExport(export)),
                    Err(why) => refused(why),
                }
            }
            other => CellHandle::query(self, other)?.wait().await,
        }
    }

    /// Sets the limit of undelivered cross-cell credits per destination;
    /// it applies from the next batch on.
    pub fn set_outbox_messages_max(&self, max: u64) {
        self.shared.outbox_messages_max.store(max, Relaxed);
    }

    /// True once the cell has failed for good (a store error, an engine
    /// panic, or its engine stopped); a stall is not a failure.
    pub fn is_failed(&self) -> bool {
        self.shared.watchdog.is_failed()
    }

    /// Whether the cell serves, and if not, why: failed or stalled.
    pub fn health(&self) -> Health {
        self.shared.watchdog.health()
    }

    /// A receiver that sees a change whenever the outbox may have grown.
    pub fn outbox_watch(&self) -> watch::Receiver<u64> {
        self.shared.outbox.subscribe()
    }

    /// The shedding level of the queue-delay controller: how many of the
    /// lowest classes are shed when they wait too long (0 = none, 3 = all but payments).
    pub fn shed_level(&self) -> usize {
        self.shared.shed_level.load(Relaxed)
    }

    /// The longest queue wait of the latest batch, in microseconds; 0 once the queue is empty.
    pub fn queue_delay_us(&self) -> u64 {
        if self.queue_depth() == 0 {
            return 0;
        }
        self.shared.queue_delay_us.load(Relaxed)
    }

    /// Reserves room in the queue or answers `overloaded` at once (never
    /// blocks). A class may fill only its share of the queue. A cell that
    /// has failed or stalled answers `unavailable` at once.
    fn admit(&self, cost: usize, class: Priority) -> Result<(), EngineError> {
        let s = &self.shared;
        let health = s.watchdog.health();
        if !health.is_serving() {
            return Err(EngineError::Unavailable { cell: s.cell, reason: health.to_string() });
        }
        let max = s.config.queue_commands_max * QUEUE_SHARE_PERCENT[class.rank()] / 100;
        let before = s.queued.fetch_add(cost, Relaxed);
        if before + cost > max {
            s.queued.fetch_sub(cost, Relaxed);
            s.stats.shed[class.rank()].fetch_add(1, Relaxed);
            return Err(EngineError::Overloaded { cell: s.cell, queued: before, max });
        }
        Ok(())
    }

    fn send(&self, mut work: Work) -> Result<(), EngineError> {
        let cost = work.cost();
        if work.is_control() {
            return self.send_control(work, cost);
        }
        self.admit(cost, work.priority())?;
        // The channel's capacity equals the queue limit, so with the queue
        // admitted this only fails when the engine is gone.
        let sent = match &self.shared.prefetcher {
            None => self.tx.try_send(work),
            Some(prefetcher) => {
                let mut prefetcher = prefetcher.lock().expect("prefetch lock");
                prefetcher.prefetch(&mut work);
                self.tx.try_send(work)
            }
        };
        sent.map_err(|_| {
            self.shared.queued.fetch_sub(cost, Relaxed);
            EngineError::Unavailable { cell: self.shared.cell, reason: "the engine is not running".into() }
        })
    }

    /// Control work goes in the control lane, past the queue limit: a few
    /// move steps at a time (the mover runs one move at a time), and a move
    /// refused `overloaded` at a busy cell would hold its shard frozen longer.
    fn send_control(&self, work: Work, cost: usize) -> Result<(), EngineError> {
        let s = &self.shared;
        let health = s.watchdog.health();
        if !health.is_serving() {
            return Err(EngineError::Unavailable { cell: s.cell, reason: health.to_string() });
        }
        {
            let mut lane = s.control.lock().expect("control lane lock");
            if lane.len() >= CONTROL_LANE_MAX {
                return Err(EngineError::Overloaded { cell: s.cell, queued: lane.len(), max: CONTROL_LANE_MAX });
            }
            s.queued.fetch_add(cost, Relaxed);
            // Control work needs no prefetch (it reads no idempotency record).
            lane.push_back(work);
        }
        // One wake in the queue at a time (its slot is one more than the
        // queue limit): a busy engine takes the lane at its next batch anyway.
        if !s.wake_queued.swap(true, Relaxed) {
            if let Err(e) = self.tx.try_send(Work::Wake) {
                s.wake_queued.store(false, Relaxed);
                if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                    // The engine has ended: it will not take the lane.
                    s.refuse_control("the engine is not running");
                }
            }
        }
        Ok(())
    }

    /// Queues commands; the answer comes once their batch is durable.
    pub fn submit(&self, commands: Vec<Command>) -> Result<Submission<Vec<Outcome>>, EngineError> {
        let max = self.shared.config.batch_commands_max;
        if commands.len() > max {
            return Err(EngineError::TooLarge { commands: commands.len(), max });
        }
        let (reply, rx) = oneshot::channel();
        let class = priority_of(&commands);
        self.send(Work::Commands { commands, reply, queued_at: Instant::now(), class, found: Found::default() })?;
        Ok(Submission(rx, self.shared.cell))
    }

    /// Queues a read; it is answered with its batch, after that batch is durable.
    pub fn query(&self, query: Query) -> Result<Submission<QueryAnswer>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let class = query.priority();
        self.send(Work::Query { query, reply, queued_at: Instant::now(), class, found: Found::default() })?;
        Ok(Submission(rx, self.shared.cell))
    }
}

/// A running cell: its engine thread and a handle to it.
pub struct Cell {
    handle: CellHandle,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
    recovery: RecoveryReport,
}

impl Cell {
    /// Opens the embedded store in `dir`, recovers, and starts the engine;
    /// with the tier on, its records live in `dir/idempotency`.
    pub fn open_embedded(
        dir: &Path,
        cell: CellId,
        map: &ShardMap,
        config: EngineConfig,
    ) -> Result<Self, RecoveryError> {
        let store = EmbeddedStore::open(dir, config.store)?;
        let tier_dir = config.tier.enabled.then(|| dir.join("idempotency"));
        Self::start_with_tier(Box::new(store), tier_dir.as_deref(), cell, map, config)
    }

    /// Recovers `cell` from `store` and starts its engine thread. `map` is used
    /// only when the store is new; otherwise the stored shard map wins.
    pub fn start(
        store: Box<dyn Store>,
        cell: CellId,
        map: &ShardMap,
        config: EngineConfig,
    ) -> Result<Self, RecoveryError> {
        Self::start_with_tier(store, None, cell, map, config)
    }

    /// As [`Cell::start`], with the disk tier of idempotency records in
    /// `tier_dir` (none: records that leave memory are gone).
    pub fn start_with_tier(
        store: Box<dyn Store>,
        tier_dir: Option<&Path>,
        cell: CellId,
        map: &ShardMap,
        config: EngineConfig,
    ) -> Result<Self, RecoveryError> {
        let (engine, handle, recovery) = Engine::build(store, tier_dir, cell, map, config, Arc::new(wall_clock_ms))?;
        let thread = std::thread::Builder::new()
            .name(format!("cell-{cell}"))
            .spawn(move || engine.run())
            .map_err(|source| RecoveryError::Store(StoreError::Io { path: "engine thread".into(), source }))?;
        Ok(Self { handle, thread: Some(thread), recovery })
    }

    /// A cell whose engine runs one batch per [`SteppedCell::step`] on the
    /// caller's thread, with the batch clock from `clock`: the same engine
    /// (recovery, batching, the state machine, the store, the answers), driven
    /// by a deterministic simulation instead of a thread. No disk tier.
    pub fn stepped(
        store: Box<dyn Store>,
        cell: CellId,
        map: &ShardMap,
        config: EngineConfig,
        clock: BatchClock,
    ) -> Result<(SteppedCell, RecoveryReport), RecoveryError> {
        let (engine, handle, recovery) = Engine::build(store, None, cell, map, config, clock)?;
        Ok((SteppedCell { engine, handle, cycle: Cycle::default(), ended: None }, recovery))
    }

    pub fn handle(&self) -> CellHandle {
        self.handle.clone()
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Answers everything queued before the stop, writes a final checkpoint
    /// and joins the engine thread.
    pub fn stop(mut self) -> Result<(), StoreError> {
        self.stop_inner()
    }

    /// Answers everything queued before the halt and joins the engine thread,
    /// without the final checkpoint: the store is left as a crash would leave
    /// it after the last acknowledged batch, so the next start replays the log.
    pub fn halt(mut self) -> Result<(), StoreError> {
        self.stop_with(false)
    }

    fn stop_inner(&mut self) -> Result<(), StoreError> {
        self.stop_with(true)
    }

    fn stop_with(&mut self, checkpoint: bool) -> Result<(), StoreError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Stop bypasses the queue limit; the spare channel slot is kept for it,
        // so this never blocks (and is safe inside an async runtime).
        let _ = self.handle.tx.try_send(Work::Stop { checkpoint });
        thread.join().unwrap_or(Err(StoreError::Poisoned))
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

struct Engine {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Work>,
    /// The disk tier of idempotency records, when the cell keeps one.
    tier: Option<TierLink>,
    state: CellState,
    store: Box<dyn Store>,
    /// The last batch appended.
    seq: u64,
    encoder: BatchEncoder,
    log_bytes_since_checkpoint: u64,
    snapshot_bytes_last: usize,
    queue_delay: QueueDelay,
    /// The batch clock (Unix ms; the state never lets it go back).
    clock: BatchClock,
}

/// Holds an engine to its commands a second ([`EngineConfig::commands_per_s_max`]).
struct Pace {
    per_s: u64,
    since: Instant,
    done: u64,
}

impl Pace {
    fn new(per_s: u64) -> Self {
        Self { per_s, since: Instant::now(), done: 0 }
    }

    /// After a batch of `size` commands and reads: sleeps until what the
    /// window did is within the pace, then starts a new window once this one
    /// is [`PACE_WINDOW`] old. Work in the control lane ends the sleep: the
    /// pace sizes the cell's payments, and a move's steps (which a cell of
    /// that size would serve at once) never wait for it.
    fn hold(&mut self, size: usize, shared: &Shared) {
        if self.per_s == 0 {
            return;
        }
        self.done += size as u64;
        let earned = Duration::from_nanos(self.done.saturating_mul(1_000_000_000) / self.per_s);
        while self.since.elapsed() < earned && shared.control.lock().expect("control lane lock").is_empty() {
            std::thread::sleep((earned - self.since.elapsed().min(earned)).min(PACE_SLICE));
        }
        if self.since.elapsed() >= PACE_WINDOW {
            *self = Self::new(self.per_s);
        }
    }
}

/// Where a batch's time comes from: the wall clock in production, the
/// simulated clock in a simulation. Unix milliseconds.
pub type BatchClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What one engine cycle hands the next: the work that did not fit the last
/// batch, the batch's buffer, and the size of the last batch (for the linger).
#[derive(Default)]
struct Cycle {
    carry: Option<Work>,
    batch: Vec<Work>,
    previous: usize,
}

/// A cell's engine driven one batch at a time by the caller (see [`Cell::stepped`]).
/// Dropping it is a crash: nothing queued is answered, no final checkpoint.
pub struct SteppedCell {
    engine: Engine,
    handle: CellHandle,
    cycle: Cycle,
    /// How the engine ended, once it did.
    ended: Option<Result<(), StoreError>>,
}

impl SteppedCell {
    pub fn handle(&self) -> CellHandle {
        self.handle.clone()
    }

    /// Runs one batch of what is queued; answers false when nothing was
    /// queued or the engine has ended.
    pub fn step(&mut self) -> bool {
        if self.ended.is_some() {
            return false;
        }
        let Some(first) = (self.cycle.carry.take())
            .or_else(|| self.engine.next_control())
            .or_else(|| self.engine.rx.try_recv().ok().inspect(|w| self.engine.took(w)))
        else {
            return false;
        };
        if let Some(end) = self.engine.cycle(first, &mut self.cycle) {
            self.engine.shared.watchdog.engine_ended();
            self.ended = Some(end);
        }
        true
    }

    /// How the engine ended (a store failure, a panic), once it did.
    pub fn ended(&self) -> Option<&Result<(), StoreError>> {
        self.ended.as_ref()
    }

    /// The cell's state between batches.
    pub fn state(&self) -> &CellState {
        &self.engine.state
    }
}

impl Drop for SteppedCell {
    fn drop(&mut self) {
        // Like an engine thread's end: the cell stops serving at once.
        self.engine.shared.watchdog.engine_ended();
        self.engine.rx.close();
        self.engine.shared.refuse_control("the engine has ended");
    }
}

/// What the engine owes one request of a batch: computed before the append,
/// sent only once the batch is durable.
enum Answer {
    Commands(Vec<Outcome>),
    Query(QueryAnswer),
    /// A stop is owed no answer.
    Nothing,
}

/// Marks the cell as not serving when the engine thread ends, however it
/// ends: a stop, a store error, or a panic outside a batch.
struct EngineExit(Arc<Shared>);

impl Drop for EngineExit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.watchdog.fail("the engine thread panicked");
        }
        self.0.watchdog.engine_ended();
        self.0.refuse_control("the engine has ended");
    }
}

/// Why the engine stops serving.
#[derive(Debug, thiserror::Error)]
enum Halt {
    #[error("store failed: {0}")]
    Store(#[from] StoreError),
    #[error("the idempotency tier failed: {0}")]
    Tier(String),
}

impl Halt {
    fn into_store(self) -> StoreError {
        match self {
            Halt::Store(e) => e,
            Halt::Tier(_) => StoreError::Poisoned,
        }
    }
}

/// Looks up in the disk tier the idempotency key of every transfer (and
/// status read) of a work as it is queued, so the writer never reads the
/// disk, and notes the newest generation of spilled records the lookup could
/// see. It runs on the submitting thread under one lock together with the
/// send into the queue, so works enter the queue in the order they were
/// looked up in, and the generations they saw never go down along the queue.
struct Prefetcher {
    /// The records the writer spilled that the tier's view may not hold yet.
    mem: SpillBuffer,
    spills: std::sync::mpsc::Receiver<(u64, Generation)>,
    tier: Arc<TierShared>,
    shards: u32,
}

impl Prefetcher {
    fn prefetch(&mut self, work: &mut Work) {
        if matches!(work, Work::Stop { .. }) {
            return;
        }
        while let Ok((gen, records)) = self.spills.try_recv() {
            self.mem.push(gen, records);
        }
        let view = self.tier.view();
        self.mem.prune(view.durable_through());
        // Every generation through this one is in `mem` or in the view.
        let through = self.mem.last().unwrap_or(0).max(view.durable_through());
        let (mem, tier, shards) = (&self.mem, &self.tier, self.shards);
        let look = |shadow: bool, from: &AccountId, id: &TransferId, found: &mut Found| match mem.find(shadow, from, id)
        {
            Some(r) => {
                found.records.insert((shadow, from.clone(), id.clone()), r.clone());
            }
            None => prefetch_key(tier, &view, shadow, shards, from, id, found),
        };
        match work {
            Work::Commands { commands, found, .. } => {
                found.through = through;
                for cmd in commands.iter() {
                    if let Op::Transfer(t) = &cmd.op {
                        look(cmd.shadow, &t.from, &t.id, found);
                    }
                }
            }
            Work::Query { query, found, .. } => {
                found.through = through;
                if let Query::Transfer { shadow, id, from: Some(from), .. } = query {
                    look(*shadow, from, id, found);
                }
            }
            Work::Stop { .. } | Work::Wake => {}
        }
    }
}

/// The wall clock in Unix milliseconds (0 before 1970: the cell's clock then stays where it was).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The message a panic was raised with, when it has one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// Which shards `cell` owns in `map`, by shard.
fn owned_shards(map: &ShardMap, cell: CellId) -> Vec<bool> {
    map.owners().iter().map(|&c| c == cell).collect()
}

impl Engine {
    /// Drops imported tier records of shards this cell no longer owns.
    fn prune_imports(&self) {
        if let Some(tier) = &self.tier {
            let map = self.state.shard_map();
            tier.shared.prune_imports(map.epoch(), owned_shards(map, self.shared.cell));
        }
    }

    /// Recovers the cell from `store` (and its tier) and builds its engine,
    /// not yet running.
    fn build(
        mut store: Box<dyn Store>,
        tier_dir: Option<&Path>,
        cell: CellId,
        map: &ShardMap,
        config: EngineConfig,
        clock: BatchClock,
    ) -> Result<(Engine, CellHandle, RecoveryReport), RecoveryError> {
        assert!(config.batch_commands_max > 0 && config.queue_commands_max >= config.batch_commands_max);
        assert!(!config.stall_after.is_zero(), "a stall limit of zero would refuse every batch");
        let window_ms = config.idempotency_window.as_millis() as u64;
        let mut tier = match tier_dir {
            Some(dir) => Some(Tier::open(dir, config.tier.options).map_err(RecoveryError::Tier)?),
            None => None,
        };
        let (mut state, recovery) = recover_with_tier(store.as_mut(), cell, map, config.limits, tier.as_mut())?;
        state.set_spill(tier.is_some());
        let shards = state.shard_map().shards();
        let mut tier = match tier {
            Some(tier) => Some(
                TierLink::start(tier, format!("cell-{cell}-tier"), config.tier, shards, window_ms)
                    .map_err(|source| RecoveryError::Store(StoreError::Io { path: "tier thread".into(), source }))?,
            ),
            None => None,
        };
        // One slot more than the queue limit, kept for the single Stop.
        // The queue limit, plus a slot for Stop and one for a Wake.
        let (tx, rx) = mpsc::channel(config.queue_commands_max + 2);
        let shared = Arc::new(Shared {
            cell,
            outbox: watch::Sender::new(0),
            config,
            queued: AtomicUsize::new(0),
            epoch: AtomicU64::new(state.shard_map().epoch()),
            map: std::sync::Mutex::new(Arc::new(state.shard_map().clone())),
            watchdog: Watchdog::new(cell, config.stall_after),
            shed_level: AtomicUsize::new(0),
            queue_delay_us: AtomicU64::new(0),
            stats: EngineStats::default(),
            outbox_messages_max: AtomicU64::new(config.outbox_messages_max),
            figures: std::sync::Mutex::new(Arc::new(CellFigures::of(&state, &config))),
            tier: tier.as_ref().map(|t| t.shared.clone()),
            control: Default::default(),
            wake_queued: Default::default(),
            prefetcher: tier.as_mut().map(|link| {
                std::sync::Mutex::new(Prefetcher {
                    mem: SpillBuffer::default(),
                    spills: link.prefetch_channel(),
                    tier: link.shared.clone(),
                    shards,
                })
            }),
        });
        // What the replay moved out of memory is the tier's first generation
        // (the prefetch sees it at once; the first checkpoint waits for it).
        if let Some(link) = &mut tier {
            let (real, shadow) = state.take_spilled();
            link.spill(real, shadow, state.clock_ms());
        }
        if let Some(link) = &tier {
            link.shared.prune_imports(state.shard_map().epoch(), owned_shards(state.shard_map(), cell));
        }
        let engine = Engine {
            shared: shared.clone(),
            rx,
            tier,
            state,
            store,
            seq: recovery.last_seq,
            encoder: BatchEncoder::default(),
            log_bytes_since_checkpoint: 0,
            snapshot_bytes_last: 0,
            queue_delay: QueueDelay::new(config.queue_delay_target, config.queue_delay_interval),
            clock,
        };
        Ok((engine, CellHandle { tx, shared }, recovery))
    }

    fn run(mut self) -> Result<(), StoreError> {
        let _exit = EngineExit(self.shared.clone());
        let mut cycle = Cycle::default();
        let mut pace = Pace::new(u64::from(self.shared.config.commands_per_s_max));
        loop {
            let Some(first) = (cycle.carry.take())
                .or_else(|| self.next_control())
                .or_else(|| self.rx.blocking_recv().inspect(|w| self.took(w)))
            else {
                let end = self.final_checkpoint().map_err(Halt::into_store);
                return self.end(end);
            };
            if let Some(end) = self.cycle(first, &mut cycle) {
                return self.end(end);
            }
            pace.hold(cycle.previous, &self.shared);
        }
    }

    /// The engine's end: the queue closes first, so that control work sent
    /// from now on finds it closed and is refused by its sender, then what
    /// waits in the lane is refused here.
    fn end(&mut self, end: Result<(), StoreError>) -> Result<(), StoreError> {
        self.rx.close();
        self.shared.refuse_control("the engine has ended");
        end
    }

    /// One batch: takes `first` and what else is queued (up to the batch
    /// limit), applies it, appends it durably and answers it. Answers how the
    /// engine ends, if this batch ends it (a stop, a failure).
    fn cycle(&mut self, first: Work, cycle: &mut Cycle) -> Option<Result<(), StoreError>> {
        let Cycle { carry, batch, previous } = cycle;
        self.shared.watchdog.cycle_started();
        let mut size = first.cost();
        let stop = matches!(first, Work::Stop { .. });
        batch.push(first);
        // The control lane goes first: what waits there joins this batch.
        while let Some(control) = self.next_control() {
            size += control.cost();
            batch.push(control);
        }
        // Smart batching: take what is already queued, up to the batch
        // limit; under concurrent load, linger once for more (group commit).
        let mut lingered = false;
        loop {
            while !stop && carry.is_none() && size < self.batch_max() {
                let Ok(next) = self.rx.try_recv() else { break };
                self.took(&next);
                if size + next.cost() > self.batch_max() {
                    *carry = Some(next);
                    break;
                }
                size += next.cost();
                batch.push(next);
            }
            if lingered || !self.lingers(batch, size, *previous, stop || carry.is_some()) {
                break;
            }
            lingered = true;
            std::thread::sleep(self.shared.config.batch_linger);
        }
        *previous = size;
        let stopping = batch.iter().find_map(|w| match w {
            Work::Stop { checkpoint } => Some(*checkpoint),
            _ => None,
        });
        self.shared.queued.fetch_sub(size, Relaxed);
        // A panic is caught here with the batch still owed its answers, so
        // they are answered with the reason. The state it leaves is never
        // used again: the engine fails and serves nothing more.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            self.shed_late(batch);
            self.process(batch)
        }));
        match outcome {
            Ok(Ok(())) => self.shared.watchdog.cycle_finished(),
            Ok(Err(halt)) => {
                self.fail(&halt.to_string(), batch, carry.take());
                return Some(Err(match halt {
                    Halt::Store(e) => e,
                    Halt::Tier(_) => StoreError::Poisoned,
                }));
            }
            Err(payload) => {
                let reason = format!("the engine panicked: {}", panic_message(payload.as_ref()));
                self.fail(&reason, batch, carry.take());
                return Some(Err(StoreError::Poisoned));
            }
        }
        match stopping {
            Some(true) => Some(self.final_checkpoint().map_err(Halt::into_store)),
            Some(false) => Some(Ok(())),
            None => None,
        }
    }

    /// The most commands a batch takes from the queue: the batch limit, and
    /// for a paced engine what the pace allows in one [`PACE_WINDOW`], so that
    /// the sleep after a batch stays within the window.
    fn batch_max(&self) -> usize {
        let config = &self.shared.config;
        match u64::from(config.commands_per_s_max) {
            0 => config.batch_commands_max,
            per_s => {
                let per_window = (per_s * PACE_WINDOW.as_millis() as u64 / 1000).max(1);
                config.batch_commands_max.min(usize::try_from(per_window).unwrap_or(usize::MAX))
            }
        }
    }

    /// Work just taken from the queue: a wake taken lets the next control
    /// work send another (see `CellHandle::send_control`).
    fn took(&self, work: &Work) {
        if matches!(work, Work::Wake) {
            self.shared.wake_queued.store(false, Relaxed);
        }
    }

    /// The next work waiting in the control lane.
    fn next_control(&self) -> Option<Work> {
        self.shared.control.lock().expect("control lane lock").pop_front()
    }

    /// Whether to wait [`EngineConfig::batch_linger`] for more work before
    /// this batch's durable append: only under concurrent load (the previous
    /// batch held more than one command, so a lone client never waits), only
    /// for a batch with commands to log (reads append nothing), and only
    /// while the batch is open (`closed`: a stop is in it, or the next work
    /// did not fit).
    fn lingers(&self, batch: &[Work], size: usize, previous: usize, closed: bool) -> bool {
        !closed
            && previous > 1
            && !self.shared.config.batch_linger.is_zero()
            && size < self.batch_max()
            && batch.iter().any(|w| matches!(w, Work::Commands { .. }))
    }

    /// Queue-delay shedding: measures how long each request waited, lets the
    /// controller move the shedding level, and answers `overloaded` to the
    /// requests of a shed class that waited longer than the target. Payments
    /// are never shed here.
    fn shed_late(&mut self, batch: &mut Vec<Work>) {
        let now = Instant::now();
        let mut longest = Duration::ZERO;
        // Control work waits for no queue (the control lane): counting its
        // waits would tell the controller the queue drained when it did not.
        for work in batch.iter().filter(|w| !w.is_control()) {
            if let Some(at) = work.queued_at() {
                let waited = now.saturating_duration_since(at);
                longest = longest.max(waited);
                self.queue_delay.observe(waited);
                self.shared.stats.record_queue_wait(waited);
            }
        }
        self.shared.queue_delay_us.store(longest.as_micros() as u64, Relaxed);
        let level = self.queue_delay.tick(now);
        self.shared.shed_level.store(level, Relaxed);
        if level == 0 {
            return;
        }
        let target = self.queue_delay.target();
        let (cell, stats) = (self.shared.cell, &self.shared.stats);
        let mut kept = Vec::with_capacity(batch.len());
        for work in batch.drain(..) {
            let class = work.priority();
            let waited = work.queued_at().map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
            if !work.is_control() && QueueDelay::sheds(level, class) && waited > target {
                stats.shed[class.rank()].fetch_add(1, Relaxed);
                work.refuse(EngineError::Shed {
                    cell,
                    class: class.as_str(),
                    waited_ms: waited.as_millis() as u64,
                    target_ms: target.as_millis() as u64,
                });
            } else {
                kept.push(work);
            }
        }
        *batch = kept;
    }

    fn process(&mut self, batch: &mut Vec<Work>) -> Result<(), Halt> {
        if let Some(reason) = self.tier.as_ref().and_then(|t| t.shared.failed()) {
            return Err(Halt::Tier(reason));
        }
        let started = Instant::now();
        let cpu_started = thread_cpu_ns();
        self.encoder.clear();
        // The batch's clock: the wall clock, never backwards; logged with the batch.
        let clock_ms = self.state.advance_clock((self.clock)());
        self.encoder.set_clock(clock_ms);
        // One answer per work, in order; the batch keeps its replies until
        // they are sent, so a failure before that can still answer them.
        let mut answers = Vec::with_capacity(batch.len());
        let mut commands = 0u64;
        let mut queries = 0u64;
        let mut outbox_grew = false;
        let admission = Admission {
            outbox_messages_max: self.shared.outbox_messages_max.load(Relaxed),
            idempotency_window_ms: self.shared.config.idempotency_window.as_millis() as u64,
            lookup: true,
        };
        let mut seen_through = None;
        for work in batch.iter() {
            match work {
                Work::Commands { commands: cmds, found, .. } => {
                    if let Some(reason) = &found.error {
                        return Err(Halt::Tier(format!("a lookup failed: {reason}")));
                    }
                    seen_through = Some(found.through);
                    let older = self.tier.as_ref().map(|t| t.older(found));
                    let older: &dyn OlderRecords = match &older {
                        Some(o) => o,
                        None => &NoOlder,
                    };
                    let mut outcomes = Vec::with_capacity(cmds.len());
                    for cmd in cmds {
                        let outcome = self.state.admit_with(cmd, &admission, older);
                        if outcome.changed_state() {
                            self.encoder.push(cmd);
                        }
                        outbox_grew |= matches!(outcome, Outcome::Transferred { outbox: Some(_), created: true, .. });
                        outcomes.push(outcome);
                    }
                    commands += cmds.len() as u64;
                    answers.push(Answer::Commands(outcomes));
                }
                Work::Query { query, found, .. } => {
                    queries += 1;
                    seen_through = Some(found.through);
                    let mut answer = self.state.query(query);
                    // A shard's export carries its records the tier may not
                    // hold durably yet; the handle adds those it holds.
                    if let (Some(tier), Query::ExportShard { shard, .. }, QueryAnswer::ShardExport(export)) =
                        (&mut self.tier, query, &mut answer)
                    {
                        if let Err(why) = export.add_older(tier.unsettled_of(*shard)) {
                            answer = QueryAnswer::Rejected(Rejection::new(ErrorCode::InvalidRequest, why));
                        }
                    }
                    // A status read the payer's records in memory cannot answer: the tier may.
                    if let (
                        Some(tier),
                        Query::Transfer { shadow, id, from: Some(from), .. },
                        QueryAnswer::Transfers(v),
                    ) = (&self.tier, query, &mut answer)
                    {
                        let oldest_held = clock_ms.saturating_sub(admission.idempotency_window_ms);
                        let old = tier.older(found).find(*shadow, from, id).filter(|r| r.at_ms >= oldest_held);
                        if let (true, Some(old)) = (v.is_empty(), old) {
                            v.push(old.view());
                        }
                    }
                    answers.push(Answer::Query(answer));
                }
                Work::Stop { .. } | Work::Wake => answers.push(Answer::Nothing),
            }
        }
        // Records beyond the memory limit leave memory between batches, never
        // inside one; with a tier, in two steps: copied out now, dropped once
        // every later work's prefetch can see them in the tier.
        let marks = match self.tier {
            Some(_) => Some(self.state.copy_out()),
            None => {
                self.state.end_batch();
                None
            }
        };
        let logged = u64::from(self.encoder.len());
        let mut append_us = None;
        if logged > 0 {
            let append_started = Instant::now();
            let bytes = self.encoder.bytes();
            let len = bytes.len() as u64;
            // On an error the batch, still unanswered, is refused by the caller.
            self.store.append(self.seq + 1, bytes)?;
            self.seq += 1;
            self.log_bytes_since_checkpoint += len;
            append_us = Some(append_started.elapsed().as_micros() as u64);
            // The records this batch moved out of memory go to the tier once it is durable.
            // Published before the answers: whatever a relay or client learns
            // from them, the figures already count (the audit reads rely on it).
            *self.shared.figures.lock().expect("figures lock") =
                Arc::new(CellFigures::of(&self.state, &self.shared.config));
        }
        let epoch = self.state.shard_map().epoch();
        if self.shared.epoch.load(Relaxed) != epoch {
            *self.shared.map.lock().expect("map lock") = Arc::new(self.state.shard_map().clone());
            self.shared.epoch.store(epoch, Relaxed);
            self.prune_imports();
        }
        let shared = self.shared.clone();
        let s = &shared.stats;
        s.batches.fetch_add(1, Relaxed);
        s.commands.fetch_add(commands, Relaxed);
        s.commands_logged.fetch_add(logged, Relaxed);
        s.queries.fetch_add(queries, Relaxed);
        let store_stats = self.store.stats();
        s.log_bytes.store(store_stats.log_bytes_written, Relaxed);
        s.fsyncs.store(store_stats.fsyncs, Relaxed);
        s.checkpoint_bytes.store(store_stats.checkpoint_bytes_written, Relaxed);
        s.record_batch(started.elapsed().as_micros() as u64, append_us, commands + queries);
        // Durable: now, and only now, answer (after the counters, so that a
        // client that has its answer also sees its batch counted).
        for (work, answer) in batch.drain(..).zip(answers) {
            work.answer(answer);
        }
        if outbox_grew {
            self.shared.outbox.send_modify(|generation| *generation += 1);
        }
        // What this batch copied out goes to the tier once the batch is durable
        // (and a batch that logged nothing changed nothing it could wait for).
        // Every later work was looked up where generations through `through`
        // show, so the records of those generations may leave memory.
        if let (Some(tier), Some(marks)) = (&mut self.tier, marks) {
            let (real, shadow) = self.state.take_spilled();
            tier.spill(real, shadow, clock_ms);
            tier.copied(marks);
            if let Some(marks) = seen_through.and_then(|through| tier.releasable(through)) {
                self.state.release(marks);
            }
        }
        if self.log_bytes_since_checkpoint >= self.shared.config.checkpoint_log_bytes {
            self.checkpoint()?;
        }
        s.log_bytes_since_checkpoint.store(self.log_bytes_since_checkpoint, Relaxed);
        s.cpu_ns.fetch_add(thread_cpu_ns().saturating_sub(cpu_started), Relaxed);
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), Halt> {
        let started = Instant::now();
        // Size the buffer from the last snapshot: no regrowing, fewer page faults.
        let capacity = self.snapshot_bytes_last + self.snapshot_bytes_last / 8;
        let bytes = snapshot::encode_with_capacity(&self.state, capacity);
        self.snapshot_bytes_last = bytes.len();
        match &self.tier {
            // The snapshot no longer holds the records that left memory: the
            // checkpoint counts (and the log before it goes) only once the tier
            // holds them durably. The store waits for that in the background.
            Some(tier) => self.store.checkpoint_when(self.seq, bytes, tier.flush_later())?,
            None => self.store.checkpoint(self.seq, bytes)?,
        }
        self.log_bytes_since_checkpoint = 0;
        // The pause the engine took; the file is written in the background.
        self.shared.stats.record_checkpoint(started.elapsed().as_micros() as u64);
        Ok(())
    }

    fn final_checkpoint(&mut self) -> Result<(), Halt> {
        if self.log_bytes_since_checkpoint > 0 {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Fail-stop: the in-memory state may be ahead of the store (or torn by a
    /// panic), so the engine serves nothing more; a restart recovers from what
    /// is durable. The failure is recorded before anyone is answered, then the
    /// batch taken, the work carried to the next batch and everything queued
    /// are refused with its reason.
    fn fail(&mut self, reason: &str, taken: &mut Vec<Work>, carry: Option<Work>) {
        let shared = &self.shared;
        shared.watchdog.fail(reason);
        self.rx.close();
        shared.refuse_control(&format!("failed: {reason}"));
        let refusal = || EngineError::Unavailable { cell: shared.cell, reason: format!("failed: {reason}") };
        for work in taken.drain(..) {
            work.refuse(refusal());
        }
        for work in carry.into_iter().chain(std::iter::from_fn(|| self.rx.try_recv().ok())) {
            shared.queued.fetch_sub(work.cost(), Relaxed);
            work.refuse(refusal());
        }
    }
}
