//! The coordinator of a shard move (the steps are in `cellpay_core::moves`).
//!
//! 1. Freeze the shard at its owner B (a command in B's log), wait for its
//!    payers' messages in flight to close (bounded; else the move is undone).
//! 2. Export it from B and install it at C (a command in C's log).
//! 3. Win the epoch the move installs at the map authority by compare-and-set.
//!    Two moves cannot both win it; a move that loses is undone.
//! 4. Install the new map at C (it serves the shard from here on: the write
//!    pause ends) and at B, which drops the shard as it installs the map.
//!
//! The map is the one decision. Each cell settles its part of a move from
//! the map alone (see `CellState::settle_moves`): a coordinator killed at any
//! step leaves a shard frozen at B and perhaps installed at C, and
//! [`resume_moves`] finishes the move the way the map says, or, when no map
//! has decided it, wins the move's epoch with a map that leaves the shard
//! where it was. There is always exactly one owner: the map's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cell::BoxFuture;
use cellpay_cell::CellClient;
use cellpay_core::{
    CellId, Command, ErrorCode, MoveRecord, Op, Outcome, Query, QueryAnswer, ShardId, ShardMap, TierCursor,
};

/// Why the authority did not take a map.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SwapError {
    /// Another map holds the epoch (or the authority moved past it).
    #[error("the map authority holds another map: {0}")]
    Lost(String),
    /// The authority could not be reached: the map may or may not have been taken.
    #[error("the map authority is unavailable: {0}")]
    Unavailable(String),
}

/// Where the cluster's shard map is decided: the control plane, or
/// `cluster.toml` for a single process.
pub trait MapAuthority: Send + Sync {
    fn current(&self) -> BoxFuture<'_, Result<ShardMap, SwapError>>;
    /// Takes `next` if the authority's map is still the one of epoch
    /// `next.epoch() - 1` (compare-and-set).
    fn swap(&self, next: ShardMap) -> BoxFuture<'_, Result<(), SwapError>>;
}

/// Limits of one move (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveLimits {
    /// How long the frozen shard waits for its payers' messages in flight to
    /// close before the move is undone (the write pause is at least this bound).
    pub drain_max: Duration,
    /// How long the coordinator keeps asking an unavailable authority while
    /// the shard stays frozen; past it, `resume_moves` finishes the move later.
    pub authority_wait_max: Duration,
}

impl Default for MoveLimits {
    fn default() -> Self {
        Self { drain_max: Duration::from_millis(500), authority_wait_max: Duration::from_secs(30) }
    }
}

/// A test seam: `CELLPAY_TEST_CRASH_MOVE_AT=<step>` aborts the process at
/// that step of a move (`copied`, `frozen`, `installed`, `swapped`, `served`), as a
/// `kill -9` of the coordinator would; the tests then check that the move
/// resumes or rolls back.
fn crash_point(step: &str) {
    if std::env::var("CELLPAY_TEST_CRASH_MOVE_AT").is_ok_and(|at| at == step) {
        eprintln!("cellpay: aborting at move step {step} (CELLPAY_TEST_CRASH_MOVE_AT)");
        std::process::abort();
    }
}

/// How long to wait between two looks at a draining shard or an unavailable authority.
const POLL: Duration = Duration::from_millis(1);
const AUTHORITY_BACKOFF: Duration = Duration::from_millis(100);

/// What a move did and how long payments of the shard waited.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MoveReport {
    pub shard: u32,
    pub from: u32,
    pub to: u32,
    /// The epoch the move installed.
    pub epoch: u64,
    pub accounts: u64,
    /// Transfer records (idempotency) carried, both ledgers.
    pub records: u64,
    /// Records of the source's disk tier copied before the freeze (the
    /// export carries those that spilled after the copy, in `records`).
    pub tier_records: u64,
    /// How long that copy took, µs (before the freeze: no write pause).
    pub tier_copy_us: u64,
    pub history_entries: u64,
    /// Σ balances of the real ledger's accounts moved.
    pub net: String,
    /// Messages of the shard's payers in flight when it froze (closed before it left).
    pub drained_messages: u64,
    /// From the freeze being durable to the new owner serving: the write pause.
    pub pause_us: u64,
    /// From the start to the old owner dropping the shard.
    pub total_us: u64,
    /// Where the move's time went, µs: the freeze's batch at the source
    /// (before the pause), then the pause's steps: the wait for messages in
    /// flight, the export, the install's batch at the destination, the
    /// compare-and-set, the new map's batch at the destination.
    pub steps_us: MoveSteps,
}

/// The steps of a move's write pause, µs each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MoveSteps {
    pub freeze: u64,
    pub drain: u64,
    pub export: u64,
    pub install: u64,
    pub swap: u64,
    pub serve: u64,
}

/// Why a move did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Invalid(String),
    #[error("cell {cell} answered {answer}")]
    Cell { cell: u32, answer: String },
    #[error("the shard's payers still had {0} messages in flight at the bound; the move was undone (try again)")]
    Drain(u64),
    #[error("another shard map won epoch {0}; the move was undone (try again)")]
    Lost(u64),
    #[error(
        "the map authority stayed unavailable; shard {shard} stays frozen at cell {from} until `resume` decides its move"
    )]
    Undecided { shard: u32, from: u32 },
    /// The move's task ended before the move did (its runtime stopped).
    #[error("the move stopped before it finished ({0}); `resume` decides it")]
    Interrupted(String),
}

fn cell_error(cell: CellId, answer: impl std::fmt::Debug) -> MoveError {
    MoveError::Cell { cell: cell.0, answer: format!("{answer:?}") }
}

async fn submit_one(cell: &Arc<dyn CellClient>, op: Op) -> Result<Outcome, MoveError> {
    let mut out = cell.submit(vec![Command::real(op)]).await.map_err(|e| cell_error(cell.cell(), e))?;
    Ok(out.pop().expect("one outcome per command"))
}

/// µs since `mark`, which moves to now.
fn lap(mark: &mut Instant) -> u64 {
    let us = mark.elapsed().as_micros() as u64;
    *mark = Instant::now();
    us
}

/// The map with `shard` given to `to`, at `epoch`.
fn moved(map: &ShardMap, shard: u32, to: CellId, epoch: u64) -> ShardMap {
    let mut owners = map.owners().to_vec();
    owners[shard as usize] = to;
    ShardMap::new(epoch, owners).expect("the same shard count")
}

/// How long the coordinator keeps offering a map to a cell that is
/// catching up with it (a cell process also follows the control plane).
const INSTALL_MAP_WAIT_MAX: Duration = Duration::from_secs(5);

/// Installs `map` at `cell` (a map it has already, or a newer one, is fine).
/// A cell in another process refuses calls from a sender at a newer map
/// while it catches up (`wrong_cell`): offered again until it has it.
async fn install_map(cell: &Arc<dyn CellClient>, map: &ShardMap) -> Result<(), MoveError> {
    let deadline = Instant::now() + INSTALL_MAP_WAIT_MAX;
    loop {
        let answer = match submit_one(cell, Op::InstallShardMap(map.clone())).await {
            Ok(Outcome::ShardMapInstalled { .. }) => return Ok(()),
            Ok(Outcome::Rejected(r)) if r.message.contains("higher epoch") => return Ok(()),
            Ok(other) => cell_error(cell.cell(), other),
            Err(e) => e,
        };
        if cell.status().epoch >= map.epoch() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(answer);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The most rounds of copying a shard's disk-tier records before the freeze:
/// each copies what spilled during the one before.
const TIER_COPY_ROUNDS_MAX: u32 = 4;
/// A round that copied fewer records than this ends the copy: the export
/// carries the rest during the freeze.
const TIER_COPY_SETTLED: u64 = 4096;

/// Copies the records of `shard` in `b`'s disk tier to `c`'s before the
/// freeze, as part of move `epoch`: everything, then what spilled meanwhile.
/// Answers the mark the export carries records above, and how many it copied.
async fn copy_tier(
    b: &Arc<dyn CellClient>,
    c: &Arc<dyn CellClient>,
    shard: u32,
    epoch: u64,
) -> Result<(u64, u64), MoveError> {
    let (mut seq_after, mut total) = (0u64, 0u64);
    for round in 0..TIER_COPY_ROUNDS_MAX {
        let (mut snapshot, mut cursor, mut copied) = (0, Some(TierCursor::default()), 0u64);
        let mut through = seq_after;
        let mut started = std::collections::HashSet::new();
        while let Some(at) = cursor.take() {
            let page = match b.query(Query::TierPage { shard, snapshot, seq_after, cursor: at }).await {
                Ok(QueryAnswer::TierPage(page)) => page,
                Ok(other) => return Err(cell_error(b.cell(), other)),
                Err(e) => return Err(cell_error(b.cell(), e)),
            };
            (snapshot, through, cursor) = (page.snapshot, page.through_seq, page.next.clone());
            let part = (round << 20) | page.part;
            if page.entries.is_empty() && !(page.last && started.contains(&part)) {
                continue;
            }
            let first = started.insert(part);
            copied += page.entries.len() as u64;
            let import = Query::TierImport {
                shard,
                move_id: epoch,
                part,
                keys_max: page.keys_max,
                entries: page.entries,
                first,
                last: page.last,
            };
            match c.query(import).await {
                Ok(QueryAnswer::TierImported { .. }) => {}
                Ok(other) => return Err(cell_error(c.cell(), other)),
                Err(e) => return Err(cell_error(c.cell(), e)),
            }
        }
        total += copied;
        seq_after = through;
        if copied < TIER_COPY_SETTLED {
            break;
        }
    }
    Ok((seq_after, total))
}

/// Moves `shard` to cell `to` while payments flow. `cells` are every cell of
/// the cluster, in id order.
pub async fn move_shard(
    cells: &[Arc<dyn CellClient>],
    authority: &dyn MapAuthority,
    shard: u32,
    to: CellId,
    limits: MoveLimits,
) -> Result<MoveReport, MoveError> {
    let start = Instant::now();
    let map = authority.current().await.map_err(|e| MoveError::Invalid(e.to_string()))?;
    if shard >= map.shards() {
        return Err(MoveError::Invalid(format!("no shard {shard}: the cluster has {}", map.shards())));
    }
    if to.0 as usize >= cells.len() {
        return Err(MoveError::Invalid(format!("no cell {to}: the cluster has {}", cells.len())));
    }
    let from = map.owner(ShardId(shard));
    if from == to {
        return Err(MoveError::Invalid(format!("shard {shard} is at cell {to} already")));
    }
    let (b, c) = (&cells[from.0 as usize], &cells[to.0 as usize]);
    let epoch = map.epoch() + 1;
    // The source must work at the authority's map before it freezes for the next epoch.
    install_map(b, &map).await?;
    install_map(c, &map).await?;
    // The records that left B's memory go first, while the shard serves.
    let copy_started = Instant::now();
    let (older_after, tier_records) = copy_tier(b, c, shard, epoch).await?;
    let tier_copy_us = copy_started.elapsed().as_micros() as u64;
    crash_point("copied");
    let freeze = Op::FreezeShard { shard, move_id: epoch, to };
    let mut steps = MoveSteps::default();
    let mut mark = Instant::now();
    // The export goes with the freeze. In the cell's control lane it comes
    // right after it, usually in the same batch: when none of the shard's
    // payers has a message in flight, the export is ready once the freeze is
    // durable, a batch sooner. From another process it may come first: the
    // cell holds it until it is ready, for a bound; past that (messages
    // still in flight) the loop below asks again.
    // The pause starts when the freeze is durable, whenever the export comes.
    let freezing = async { (submit_one(b, freeze.clone()).await, Instant::now()) };
    let exporting = async { (b.query(Query::ExportShard { shard, older_after }).await, Instant::now()) };
    let ((frozen, frozen_at), (early, early_at)) = tokio::join!(freezing, exporting);
    let drained_messages = match frozen? {
        Outcome::MoveStep { open_messages, .. } => open_messages,
        other => return Err(cell_error(from, other)),
    };
    let mut early = match early {
        Ok(QueryAnswer::ShardExport(export)) if export.move_id == epoch && export.to == to => Some(export),
        _ => None,
    };
    steps.freeze = frozen_at.duration_since(mark).as_micros() as u64;
    crash_point("frozen");
    let undo = |why: MoveError| async move {
        let _ = submit_one(c, Op::DiscardShard { shard, move_id: epoch }).await;
        let _ = submit_one(b, Op::UnfreezeShard { shard, move_id: epoch }).await;
        why
    };
    // Wait for the payers' messages in flight to close, then export.
    // (The export, when it was asked for the last time, when it came.)
    let (export, export_at, exported_at) = loop {
        if let Some(export) = early.take() {
            // Held at the cell until it was ready: with credits in flight at
            // the freeze, that wait was the drain.
            let ready_at = early_at.max(frozen_at);
            break (export, if drained_messages > 0 { ready_at } else { frozen_at }, ready_at);
        }
        let export_at = Instant::now();
        let answer = match b.query(Query::ExportShard { shard, older_after }).await {
            Ok(answer) => answer,
            Err(e) => return Err(undo(cell_error(from, e)).await),
        };
        match answer {
            QueryAnswer::ShardExport(export) => break (export, export_at, Instant::now()),
            QueryAnswer::Rejected(r) if r.code == ErrorCode::ShardFrozen => {
                if frozen_at.elapsed() >= limits.drain_max {
                    let open = match submit_one(b, freeze.clone()).await {
                        Ok(Outcome::MoveStep { open_messages, .. }) => open_messages,
                        _ => 0,
                    };
                    return Err(undo(MoveError::Drain(open)).await);
                }
                tokio::time::sleep(POLL).await;
            }
            other => return Err(undo(cell_error(from, other)).await),
        }
    };
    steps.drain = export_at.duration_since(frozen_at).as_micros() as u64;
    steps.export = exported_at.duration_since(export_at).as_micros() as u64;
    mark = exported_at;
    let counts = (
        export.real.accounts.len() as u64,
        (export.real.records.len() + export.shadow.records.len()) as u64,
        (export.real.history.len() + export.shadow.history.len()) as u64,
        export.real.net(),
    );
    // An install whose answer was lost may have happened: the shard stays
    // frozen at B (no undo, which could leave C holding a copy B then
    // outgrows) until `resume_moves` or the next map decides the move.
    match submit_one(c, Op::InstallShard(export)).await? {
        Outcome::MoveStep { .. } => {}
        other => return Err(undo(cell_error(to, other)).await),
    }
    steps.install = lap(&mut mark);
    crash_point("installed");
    let next = moved(&map, shard, to, epoch);
    match decide(authority, &next, shard, limits).await {
        Decided::Forward => {}
        Decided::Back => return Err(undo(MoveError::Lost(epoch)).await),
        Decided::Unknown => return Err(MoveError::Undecided { shard, from: from.0 }),
    }
    steps.swap = lap(&mut mark);
    crash_point("swapped");
    // The map decided: the move is done whatever happens next (each cell
    // settles its part when it gets the map; a cell process also follows
    // the control plane).
    if let Err(e) = install_map(c, &next).await {
        tracing::warn!(shard, cell = %to, "the new owner has not taken the map yet: {e}");
    }
    let pause = frozen_at.elapsed();
    steps.serve = lap(&mut mark);
    crash_point("served");
    if let Err(e) = install_map(b, &next).await {
        tracing::warn!(shard, cell = %from, "the old owner has not taken the map yet: {e}");
    }
    for other in cells.iter().filter(|x| x.cell() != from && x.cell() != to) {
        // Best effort: the payers' cells reroute credits once they know the map.
        let _ = install_map(other, &next).await;
    }
    Ok(MoveReport {
        shard,
        from: from.0,
        to: to.0,
        epoch,
        accounts: counts.0,
        records: counts.1,
        tier_records,
        tier_copy_us,
        history_entries: counts.2,
        net: counts.3.to_string(),
        drained_messages,
        pause_us: pause.as_micros() as u64,
        total_us: start.elapsed().as_micros() as u64,
        steps_us: steps,
    })
}

enum Decided {
    Forward,
    Back,
    Unknown,
}

/// Offers `next` for its epoch until the authority answers which map holds
/// it: ours (forward), another (back), or nobody could tell in time.
async fn decide(authority: &dyn MapAuthority, next: &ShardMap, shard: u32, limits: MoveLimits) -> Decided {
    let deadline = Instant::now() + limits.authority_wait_max;
    loop {
        match authority.swap(next.clone()).await {
            Ok(()) => return Decided::Forward,
            Err(SwapError::Lost(_)) => {
                // Ours may have been taken by an earlier try whose answer was lost.
                if let Ok(now) = authority.current().await {
                    let ours = now.epoch() >= next.epoch() && now.owner(ShardId(shard)) == next.owner(ShardId(shard));
                    return if ours { Decided::Forward } else { Decided::Back };
                }
            }
            Err(SwapError::Unavailable(why)) => {
                tracing::warn!(
                    shard,
                    epoch = next.epoch(),
                    "the map authority is unavailable, the shard stays frozen: {why}"
                );
            }
        }
        if Instant::now() >= deadline {
            return Decided::Unknown;
        }
        tokio::time::sleep(AUTHORITY_BACKOFF).await;
    }
}

/// What [`resume_moves`] did with one frozen shard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resumed {
    pub shard: u32,
    pub from: u32,
    pub to: u32,
    pub epoch: u64,
    /// True when the move went ahead, false when it was undone.
    pub moved: bool,
}

/// Finishes every move a coordinator left half done: each shard frozen at
/// some cell goes the way the authority's map says; one no map has decided
/// yet stays where it was, by winning its epoch with a map that keeps it
/// there (so a late answer to the dead coordinator's offer cannot win it).
pub async fn resume_moves(
    cells: &[Arc<dyn CellClient>],
    authority: &dyn MapAuthority,
) -> Result<Vec<Resumed>, MoveError> {
    let mut frozen: Vec<MoveRecord> = Vec::new();
    for cell in cells {
        match cell.query(Query::Figures { shadow: false }).await.map_err(|e| cell_error(cell.cell(), e))? {
            QueryAnswer::Figures(f) => frozen.extend(f.frozen),
            other => return Err(cell_error(cell.cell(), other)),
        }
    }
    let mut done = Vec::new();
    for m in frozen {
        let map = loop {
            let map = authority.current().await.map_err(|e| MoveError::Invalid(e.to_string()))?;
            if map.epoch() >= m.id {
                break map;
            }
            // Nobody decided: take the epoch with the shard where it is.
            let stay = ShardMap::new(m.id, map.owners().to_vec()).expect("the same shards");
            match authority.swap(stay).await {
                Ok(()) | Err(SwapError::Lost(_)) => {}
                Err(e) => return Err(MoveError::Invalid(e.to_string())),
            }
        };
        let moved = map.owner(ShardId(m.shard)) != m.from;
        // Each cell settles its part as it installs the map.
        install_map(&cells[m.to.0 as usize], &map).await?;
        install_map(&cells[m.from.0 as usize], &map).await?;
        done.push(Resumed { shard: m.shard, from: m.from.0, to: m.to.0, epoch: m.id, moved });
    }
    Ok(done)
}

/// Moves shards one at a time for a cluster (the admin API, `cluster
/// move-shard`, `add-cell`, `drain-cell`), and keeps their figures for
/// `/metrics`, the dashboard and the readiness report.
pub struct Mover {
    cells: Vec<Arc<dyn CellClient>>,
    authority: Arc<dyn MapAuthority>,
    limits: MoveLimits,
    /// One move at a time: each wins the next epoch.
    one: Arc<tokio::sync::Mutex<()>>,
    figures: Arc<std::sync::Mutex<MoverFigures>>,
    /// Cells drained by this process: a rebalance over every cell leaves them out.
    drained: std::sync::Mutex<std::collections::BTreeSet<u32>>,
    /// Where the moves run, if not on the caller's runtime: see [`Mover::on_lane`].
    lane: Option<tokio::runtime::Handle>,
}

/// The moves this process ran, for metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MoverFigures {
    pub moved: u64,
    pub undone: u64,
    pub failed: u64,
    /// The write pause of each move, µs, newest last (at most [`PAUSES_KEPT`]).
    pub pauses_us: std::collections::VecDeque<u64>,
    /// Where each of those pauses went, in the same order.
    pub steps_us: std::collections::VecDeque<MoveSteps>,
    pub last: Option<MoveReport>,
    /// A move under way: (shard, from, to).
    pub moving: Option<(u32, u32, u32)>,
    /// The plan of moves being carried out (or the last one).
    pub plan: Option<PlanProgress>,
}

/// A plan of moves (a drain, a rebalance) and how far it got.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PlanProgress {
    /// `drain` or `rebalance`.
    pub kind: String,
    /// The moves planned: (shard, from, to).
    pub moves: Vec<(u32, u32, u32)>,
    pub done: u64,
    pub failed: u64,
    pub running: bool,
    pub last_error: Option<String>,
}

/// How long a plan measures the shards' load over (see [`Mover::shard_weights`]).
pub const LOAD_SAMPLE: Duration = Duration::from_millis(500);

/// How many moves one plan may hold (I7): a rebalance moves a share of the
/// shards, a few at a time, never the whole map in one go.
pub const PLAN_MOVES_MAX: usize = 4096;

/// The write pauses a mover kept, µs, at a few quantiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PauseQuantiles {
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
    pub count: usize,
}

impl PauseQuantiles {
    /// p50, p99 and max of `values` (nearest rank); none of them when empty.
    fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        let at = |q: f64| values.get(((values.len().max(1) - 1) as f64 * q).round() as usize).copied();
        Self { p50: at(0.5), p99: at(0.99), max: values.last().copied(), count: values.len() }
    }
}

/// Each step of the kept pauses at a few quantiles: which step a long pause spent its time in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepQuantiles {
    pub freeze: PauseQuantiles,
    pub drain: PauseQuantiles,
    pub export: PauseQuantiles,
    pub install: PauseQuantiles,
    pub swap: PauseQuantiles,
    pub serve: PauseQuantiles,
}

impl MoverFigures {
    /// Counts a move that ended.
    fn count(&mut self, result: &Result<MoveReport, MoveError>) {
        self.moving = None;
        match result {
            Ok(report) => {
                self.moved += 1;
                if self.pauses_us.len() == PAUSES_KEPT {
                    self.pauses_us.pop_front();
                    self.steps_us.pop_front();
                }
                self.pauses_us.push_back(report.pause_us);
                self.steps_us.push_back(report.steps_us);
                self.last = Some(report.clone());
            }
            Err(MoveError::Drain(_) | MoveError::Lost(_)) => self.undone += 1,
            Err(_) => self.failed += 1,
        }
    }

    /// The kept pauses at p50, p99 and max (nearest rank); none while no move ran.
    pub fn pause_quantiles(&self) -> PauseQuantiles {
        PauseQuantiles::of(self.pauses_us.iter().copied().collect())
    }

    /// The kept pauses' steps, each at p50, p99 and max.
    pub fn step_quantiles(&self) -> StepQuantiles {
        let of = |step: fn(&MoveSteps) -> u64| PauseQuantiles::of(self.steps_us.iter().map(step).collect());
        StepQuantiles {
            freeze: of(|s| s.freeze),
            drain: of(|s| s.drain),
            export: of(|s| s.export),
            install: of(|s| s.install),
            swap: of(|s| s.swap),
            serve: of(|s| s.serve),
        }
    }
}

/// Starts a lane for [`Mover::on_lane`]: a runtime of one thread, driven
/// until the process ends.
pub fn start_lane() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("cellpay-mover".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// How many move pauses a mover keeps for its figures (I7).
pub const PAUSES_KEPT: usize = 4096;

impl Mover {
    pub fn new(cells: Vec<Arc<dyn CellClient>>, authority: Arc<dyn MapAuthority>, limits: MoveLimits) -> Self {
        Self {
            cells,
            authority,
            limits,
            one: Default::default(),
            figures: Default::default(),
            drained: Default::default(),
            lane: None,
        }
    }

    /// Runs each move on `lane`, a runtime of its own (a thread the router's
    /// payments do not keep busy), whose tasks drive `cells`' connections:
    /// a move's steps, on its write pause, then never wait in the run queue
    /// behind thousands of payments' tasks.
    pub fn on_lane(mut self, lane: tokio::runtime::Handle) -> Self {
        self.lane = Some(lane);
        self
    }

    pub fn cells(&self) -> &[Arc<dyn CellClient>] {
        &self.cells
    }

    pub fn authority(&self) -> &Arc<dyn MapAuthority> {
        &self.authority
    }

    pub fn figures(&self) -> MoverFigures {
        self.figures.lock().expect("mover figures lock").clone()
    }

    /// Moves `shard` to `to` (waiting for a move under way to finish first).
    /// On a lane, a move whose caller goes away still runs to its end (and
    /// the next move waits for it).
    pub async fn move_shard(&self, shard: u32, to: CellId) -> Result<MoveReport, MoveError> {
        let one = self.one.clone().lock_owned().await;
        let from = self.authority.current().await.ok().map(|m| m.owner(ShardId(shard.min(m.shards() - 1))).0);
        self.figures.lock().expect("mover figures lock").moving = from.map(|f| (shard, f, to.0));
        let (cells, authority, limits, figures) =
            (self.cells.clone(), self.authority.clone(), self.limits, self.figures.clone());
        let work = async move {
            let result = move_shard(&cells, authority.as_ref(), shard, to, limits).await;
            figures.lock().expect("mover figures lock").count(&result);
            drop(one);
            result
        };
        match &self.lane {
            None => work.await,
            Some(lane) => lane.spawn(work).await.unwrap_or_else(|e| {
                // The task ended before it counted the move.
                let lost = Err(MoveError::Interrupted(e.to_string()));
                self.figures.lock().expect("mover figures lock").count(&lost);
                lost
            }),
        }
    }

    /// The measured load of each shard: the commands that changed it during
    /// [`LOAD_SAMPLE`] (two samples of every owner's counts, so that what a
    /// shard did long ago, its seeding say, weighs nothing), plus one per
    /// shard so that an idle shard still weighs something. On a cluster idle
    /// over the sample, the counts since each owner started.
    pub async fn shard_weights(&self, map: &ShardMap) -> Result<Vec<u64>, MoveError> {
        let first = self.shard_loads(map).await?;
        tokio::time::sleep(LOAD_SAMPLE).await;
        let second = self.shard_loads(map).await?;
        let recent: Vec<u64> = second.iter().zip(&first).map(|(b, a)| b.saturating_sub(*a)).collect();
        let loads = if recent.iter().any(|n| *n > 0) { recent } else { second };
        Ok(loads.into_iter().map(|n| 1 + n).collect())
    }

    /// Each shard's count of commands that changed it, from its owner under `map`.
    async fn shard_loads(&self, map: &ShardMap) -> Result<Vec<u64>, MoveError> {
        let mut per_cell = Vec::with_capacity(self.cells.len());
        for cell in &self.cells {
            match cell.query(Query::ShardLoad).await.map_err(|e| cell_error(cell.cell(), e))? {
                QueryAnswer::ShardLoad(load) => per_cell.push(load),
                other => return Err(cell_error(cell.cell(), other)),
            }
        }
        Ok(map
            .owners()
            .iter()
            .enumerate()
            .map(|(s, owner)| per_cell[owner.0 as usize].get(s).copied().unwrap_or(0))
            .collect())
    }

    /// Marks `cell` drained once its drain plan started: later drains send it
    /// nothing, and a rebalance over every cell leaves it out.
    pub fn mark_drained(&self, cell: CellId) {
        self.drained.lock().expect("drained lock").insert(cell.0);
    }

    /// Every shard of `cell` to the other cells, each to the one with the
    /// least measured load at that point of the plan.
    pub async fn plan_drain(&self, cell: CellId) -> Result<Vec<(u32, u32, u32)>, MoveError> {
        if cell.0 as usize >= self.cells.len() || self.cells.len() < 2 {
            return Err(MoveError::Invalid(format!("cannot drain cell {cell} of a cluster of {}", self.cells.len())));
        }
        let map = self.authority.current().await.map_err(|e| MoveError::Invalid(e.to_string()))?;
        let weights = self.shard_weights(&map).await?;
        let mut totals = vec![0u64; self.cells.len()];
        for (s, owner) in map.owners().iter().enumerate() {
            totals[owner.0 as usize] += weights[s];
        }
        // Shards go to the cells still in service: not to one drained before.
        let targets: Vec<usize> = {
            let drained = self.drained.lock().expect("drained lock");
            (0..self.cells.len()).filter(|c| *c != cell.0 as usize && !drained.contains(&(*c as u32))).collect()
        };
        if targets.is_empty() {
            return Err(MoveError::Invalid(format!("cannot drain cell {cell}: every other cell is drained")));
        }
        let mut plan = Vec::new();
        let mut mine: Vec<usize> = (0..map.shards() as usize).filter(|s| map.owners()[*s] == cell).collect();
        // Heaviest first, so the last moves even out what is left.
        mine.sort_by_key(|s| std::cmp::Reverse(weights[*s]));
        for s in mine {
            let to = *targets.iter().min_by_key(|c| totals[**c]).expect("one target at least");
            totals[to] += weights[s];
            plan.push((s as u32, cell.0, to as u32));
        }
        Ok(plan)
    }

    /// Moves that even out the measured load over `cells` (every cell when
    /// empty): from the busiest cell, the shard that best closes its gap with
    /// the idlest, while one does; at most `moves_max`.
    pub async fn plan_rebalance(&self, cells: &[CellId], moves_max: usize) -> Result<Vec<(u32, u32, u32)>, MoveError> {
        let map = self.authority.current().await.map_err(|e| MoveError::Invalid(e.to_string()))?;
        let among: Vec<usize> = if cells.is_empty() {
            let drained = self.drained.lock().expect("drained lock").clone();
            (0..self.cells.len()).filter(|c| !drained.contains(&(*c as u32))).collect()
        } else {
            let mut drained = self.drained.lock().expect("drained lock");
            cells.iter().for_each(|c| {
                drained.remove(&c.0);
            });
            cells.iter().map(|c| c.0 as usize).filter(|c| *c < self.cells.len()).collect()
        };
        if among.len() < 2 {
            return Err(MoveError::Invalid("a rebalance needs two cells or more".into()));
        }
        let weights = self.shard_weights(&map).await?;
        let mut owners: Vec<usize> = map.owners().iter().map(|c| c.0 as usize).collect();
        let mut totals = vec![0u64; self.cells.len()];
        for (s, owner) in owners.iter().enumerate() {
            totals[*owner] += weights[s];
        }
        let mut plan = Vec::new();
        while plan.len() < moves_max.min(PLAN_MOVES_MAX) {
            let busiest = *among.iter().max_by_key(|c| totals[**c]).expect("two cells");
            let idlest = *among.iter().min_by_key(|c| totals[**c]).expect("two cells");
            let gap = totals[busiest] - totals[idlest];
            // A shard of weight w narrows the gap to |gap - 2w|: worth it while w < gap.
            let best = (0..owners.len())
                .filter(|s| owners[*s] == busiest && weights[*s] < gap)
                .min_by_key(|s| (gap as i128 - 2 * weights[*s] as i128).unsigned_abs());
            let Some(s) = best else { break };
            owners[s] = idlest;
            totals[busiest] -= weights[s];
            totals[idlest] += weights[s];
            plan.push((s as u32, busiest as u32, idlest as u32));
        }
        Ok(plan)
    }

    /// Carries out `plan` in the background, one move at a time with `pace`
    /// between moves (so payments keep their latency), and answers at once.
    /// A move that fails is tried once more after `pace`, then counted failed.
    pub fn start_plan(
        self: &Arc<Self>,
        kind: &str,
        plan: Vec<(u32, u32, u32)>,
        pace: Duration,
    ) -> Result<PlanProgress, MoveError> {
        let progress =
            PlanProgress { kind: kind.into(), moves: plan.clone(), running: true, ..PlanProgress::default() };
        {
            let mut f = self.figures.lock().expect("mover figures lock");
            if f.plan.as_ref().is_some_and(|p| p.running) {
                return Err(MoveError::Invalid("a plan of moves is running already".into()));
            }
            f.plan = Some(progress.clone());
        }
        let mover = self.clone();
        tokio::spawn(async move {
            for (shard, _, to) in plan {
                let mut result = mover.move_shard(shard, CellId(to)).await;
                if result.is_err() {
                    tokio::time::sleep(pace).await;
                    result = mover.move_shard(shard, CellId(to)).await;
                }
                {
                    let mut f = mover.figures.lock().expect("mover figures lock");
                    let p = f.plan.as_mut().expect("set above");
                    match result {
                        Ok(_) => p.done += 1,
                        Err(e) => {
                            p.failed += 1;
                            p.last_error = Some(e.to_string());
                        }
                    }
                }
                tokio::time::sleep(pace).await;
            }
            let mut f = mover.figures.lock().expect("mover figures lock");
            f.plan.as_mut().expect("set above").running = false;
        });
        Ok(progress)
    }

    /// Finishes the moves a stop left half done.
    pub async fn resume(&self) -> Result<Vec<Resumed>, MoveError> {
        let _one = self.one.lock().await;
        resume_moves(&self.cells, self.authority.as_ref()).await
    }
}
