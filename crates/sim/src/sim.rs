//! The scheduler: one thread, one seeded generator, simulated time. Each tick
//! it does one thing at random (a client's payment or retry, one batch of one
//! engine, one relay round started, a fault or a repair), polls every call in
//! flight once, and checks the invariants on the cells' states in hand.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cellpay_cell::{
    BatchClock, BreakerRules, Cell, CellClient, EngineConfig, EngineError, Health, Relay, RelayConfig, RelayGate,
    RelayStats, RoundError, SteppedCell,
};
use cellpay_core::{
    audit_states, AccountId, Authority, CellId, CellState, Command, Currency, ErrorCode, Limits, Op, OpenAccount,
    Outcome, Query, QueryAnswer, ShardMap, TenantId, Transfer, TransferId, TransferStatus, TransferView,
};

use crate::disk::{Disk, SharedDisk, SimStore};
use crate::net::{Net, NetFaults, SharedNet, SimLink, Slot};
use crate::rng::Rng;

/// One simulated run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    /// Ticks of the random phase (the drain after it is extra).
    pub steps: u64,
    pub cells: u32,
    /// Payer and payee accounts, spread over the cells by the shard map.
    pub accounts: u32,
    /// Crashes, disk and network faults.
    pub faults: bool,
    /// A fault put in on purpose, that the run must catch (see [`Mutation`]).
    pub mutation: Option<Mutation>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self { seed: 1, steps: 2_000, cells: 3, accounts: 12, faults: true, mutation: None }
    }
}

/// A wrong way to move a shard, which the simulator's checks must catch:
/// each proves that a check can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The source serves the shard again before the new map is durable.
    LiftFreezeEarly,
    /// A relay sends a credit stuck for the old owner straight to the new
    /// one, under the old stream's sequence number.
    RerouteByOldSeq,
    /// The audit leaves the move records out.
    SkipMoveRecord,
}

/// What a run did, and the digest of where it ended (the same seed gives the same digest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub ticks: u64,
    pub simulated_ms: u64,
    pub payments_acked: u64,
    pub payments_refused: u64,
    pub retries: u64,
    pub relay_rounds: u64,
    pub crashes: u64,
    pub fsync_errors: u64,
    pub torn_tails: u64,
    pub damaged_checkpoints: u64,
    pub fall_backs: u64,
    pub damaged_records: u64,
    pub refused_starts: u64,
    pub partitions: u64,
    pub lost_requests: u64,
    pub lost_replies: u64,
    pub duplicates: u64,
    pub late_deliveries: u64,
    pub shadow_payments: u64,
    pub misrouted: u64,
    /// New shard maps the processes learned at different times.
    pub map_changes: u64,
    /// Relay calls the network delivered to another cell than they meant.
    pub misdelivered: u64,
    /// Calls refused because their cell was behind the sender's map.
    pub behind_refusals: u64,
    /// Payments refused because the outbox towards the payee's cell was full (I7).
    pub outbox_full: u64,
    /// Shard moves that went ahead, and those undone (their coordinator died, or a step failed).
    pub moves: u64,
    pub moves_undone: u64,
    /// Times the mutation was put in.
    pub mutations: u64,
    pub digest: u64,
}

/// A run that broke an invariant: the seed replays it exactly.
#[derive(Debug, Clone, thiserror::Error)]
#[error("seed {seed} failed at tick {tick}: {what}\n  replay: cellpay sim --seed {seed} --steps {steps} --cells {cells} --accounts {accounts}{faults}")]
pub struct SimFailure {
    pub seed: u64,
    pub tick: u64,
    pub steps: u64,
    pub cells: u32,
    pub accounts: u32,
    pub faults: &'static str,
    pub what: String,
}

/// The simulated clock starts here (Unix ms), so batch times look real.
const CLOCK_START_MS: u64 = 1_800_000_000_000;
/// Ticks a crashed cell stays down at most.
const DOWN_TICKS_MAX: u64 = 200;
/// Ticks the drain may take before pending money counts as stuck.
const DRAIN_TICKS_MAX: u64 = 20_000;
/// Undelivered credits a cell may hold per destination (small, so the bound bites during partitions).
const OUTBOX_MESSAGES_MAX: u64 = 12;
/// Credits a relay round carries (small, so rounds interleave with faults).
const ROUND_MESSAGES_MAX: usize = 16;

type CallFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Where a shard move stands (the coordinator's steps, one call at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoveStep {
    Freeze,
    Export,
    Install,
}

/// A shard move in flight: the simulated coordinator.
struct MoveRun {
    shard: u32,
    from: usize,
    to: usize,
    id: u64,
    step: MoveStep,
    call: Option<CallFuture<Result<MoveAnswer, EngineError>>>,
    export: Option<Box<cellpay_core::ShardExport>>,
}

enum MoveAnswer {
    Outcome(Outcome),
    Answer(QueryAnswer),
}

/// One cell of the simulated cluster.
struct SimCell {
    id: CellId,
    disk: SharedDisk,
    engine: Option<SteppedCell>,
    /// What the links reach: the running engine's handle, or nothing while down.
    slot: Slot,
    up_at: u64,
}

/// A payment's identity: ledger (shadow), payer, id.
type Key = (bool, AccountId, TransferId);

/// A client's payment in flight.
struct Payment {
    shadow: bool,
    /// Sent to a cell that does not own the payer.
    misrouted: bool,
    /// The cell it was sent to.
    target: usize,
    transfer: Transfer,
    call: CallFuture<Result<Vec<Outcome>, EngineError>>,
}

/// A relay and its round in flight.
struct RelayRun {
    relay: Arc<Relay>,
    round: Option<CallFuture<Result<usize, RoundError>>>,
}

/// A payment some client was told about: what, and the status it was told.
#[derive(Debug, Clone)]
struct Acked {
    view: TransferView,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    tick: u64,
    clock: Arc<AtomicU64>,
    map: ShardMap,
    net: SharedNet,
    cells: Vec<SimCell>,
    /// The router's links to each cell, for clients.
    links: Vec<Arc<SimLink>>,
    /// Each relay's link to its peer, by the relay's source cell.
    relay_links: Vec<(usize, Arc<SimLink>)>,
    /// When each cell learns the newest map (the control plane's follow), and
    /// when it was last asked to install it.
    learns_map_at: Vec<u64>,
    install_asked_at: Vec<Option<u64>>,
    /// When the router learns it.
    router_learns_map_at: Option<u64>,
    relays: Vec<RelayRun>,
    payments: Vec<Payment>,
    accounts: Vec<AccountId>,
    banks: Vec<AccountId>,
    /// Every payment ever sent (with its ledger), for retries.
    sent: Vec<(bool, Transfer)>,
    acked: BTreeMap<Key, Acked>,
    /// The payments an answer said were created (once each, or paid twice).
    created: BTreeSet<Key>,
    report: SimReport,
    next_id: u64,
    /// `SIM_TRACE` set: print each tick, answer and round to stderr.
    trace: bool,
    /// The shard move in flight, if any.
    moving: Option<MoveRun>,
    /// Moves decided by the map whose shard the rogue relay of
    /// [`Mutation::RerouteByOldSeq`] still watches: (shard, old owner, new owner).
    rerouting: Vec<(u32, usize, usize)>,
}

/// The engine as the simulation runs it; `steps` bounds the payments a run makes.
fn engine_config(steps: u64) -> EngineConfig {
    // Above what a run makes (one payment a tick at most), so every record a
    // check asks for is kept; no larger, since a cell allocates its rings up front.
    let retained = usize::try_from(steps).unwrap_or(usize::MAX).saturating_add(1).max(1 << 12);
    EngineConfig {
        batch_commands_max: 64,
        batch_linger: Duration::ZERO,
        queue_commands_max: 4096,
        // Checkpoints often, so crashes fall around them.
        checkpoint_log_bytes: 1 << 10,
        limits: Limits { transfers_retained_max: retained, history_entries_max: retained },
        // No shedding by queue delay and no stall: both read the wall clock.
        queue_delay_target: Duration::from_secs(3600),
        stall_after: Duration::from_secs(3600),
        outbox_messages_max: OUTBOX_MESSAGES_MAX,
        ..EngineConfig::default()
    }
}

fn cny() -> Currency {
    Currency::new("CNY").expect("a valid currency")
}

fn poll_once<T>(call: &mut CallFuture<T>) -> Option<T> {
    match call.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn rank(status: TransferStatus) -> u8 {
    match status {
        TransferStatus::Pending => 0,
        TransferStatus::Settled | TransferStatus::Reversed => 1,
    }
}

impl Sim {
    fn fail(&self, what: impl Into<String>) -> SimFailure {
        SimFailure {
            seed: self.config.seed,
            tick: self.tick,
            steps: self.config.steps,
            cells: self.config.cells,
            accounts: self.config.accounts,
            faults: if self.config.faults { "" } else { " --no-faults" },
            what: what.into(),
        }
    }

    fn new(config: SimConfig) -> Result<Sim, SimFailure> {
        let mut rng = Rng::new(config.seed);
        let net = Net::new(rng.fork());
        let map = ShardMap::round_robin(config.cells * 4, config.cells).expect("a valid shard map");
        let clock = Arc::new(AtomicU64::new(CLOCK_START_MS));
        let mut sim = Sim {
            config,
            rng,
            tick: 0,
            clock,
            map,
            net: net.clone(),
            cells: Vec::new(),
            links: Vec::new(),
            relay_links: Vec::new(),
            learns_map_at: vec![0; config.cells as usize],
            install_asked_at: vec![None; config.cells as usize],
            router_learns_map_at: None,
            relays: Vec::new(),
            payments: Vec::new(),
            accounts: (0..config.accounts).map(|i| AccountId::new(&format!("u{i}")).expect("valid")).collect(),
            banks: (0..config.cells.max(2)).map(|i| AccountId::new(&format!("bank{i}")).expect("valid")).collect(),
            sent: Vec::new(),
            acked: BTreeMap::new(),
            created: BTreeSet::new(),
            report: SimReport { seed: config.seed, ..SimReport::default() },
            next_id: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            moving: None,
            rerouting: Vec::new(),
        };
        for i in 0..config.cells {
            let id = CellId(i);
            let slot: Slot = Arc::new(Mutex::new(None));
            sim.links.push(Arc::new(SimLink::new(id, slot.clone(), net.clone())));
            net.lock().expect("one thread").slots.push(slot.clone());
            sim.cells.push(SimCell { id, disk: Disk::new(format!("cell-{i}")), engine: None, slot, up_at: 0 });
        }
        for link in &sim.links {
            link.set_sender_epoch(sim.map.epoch());
        }
        for i in 0..sim.cells.len() {
            sim.start(i)?;
        }
        let never_open = BreakerRules { min_calls: u32::MAX, ..BreakerRules::default() };
        for a in 0..config.cells as usize {
            for (b, shadow) in (0..config.cells as usize).filter(|b| *b != a).flat_map(|b| [(b, false), (b, true)]) {
                // As in a cell process: the source is the relay's own cell (no
                // epoch to show it), the peer a remote that carries the source's epoch.
                let (source_slot, dest_slot) = (sim.cells[a].slot.clone(), sim.cells[b].slot.clone());
                let dest = Arc::new(SimLink::misdeliverable(CellId(b as u32), dest_slot, net.clone()));
                sim.relay_links.push((a, dest.clone()));
                let relay = Relay {
                    source: Arc::new(SimLink::new(CellId(a as u32), source_slot, net.clone())),
                    dest,
                    shadow,
                    config: RelayConfig { messages_per_round_max: ROUND_MESSAGES_MAX, ..RelayConfig::default() },
                    stats: Arc::new(RelayStats::default()),
                    gate: Arc::new(RelayGate::new(never_open, Arc::new(AtomicBool::new(false)))),
                };
                sim.relays.push(RelayRun { relay: Arc::new(relay), round: None });
            }
        }
        sim.open_accounts()?;
        Ok(sim)
    }

    /// Opens every account at its cell, with no faults yet.
    fn open_accounts(&mut self) -> Result<(), SimFailure> {
        let opens: Vec<(AccountId, bool)> = self
            .banks
            .iter()
            .map(|b| (b.clone(), true))
            .chain(self.accounts.iter().map(|a| (a.clone(), false)))
            .collect();
        for (shadow, (id, overdraft)) in
            opens.iter().map(|o| (false, o.clone())).chain(opens.iter().map(|o| (true, o.clone())))
        {
            let owner = self.map.owner_of(id.as_str()).0 as usize;
            let handle = self.cells[owner].engine.as_ref().expect("started").handle();
            let op = Op::OpenAccount(OpenAccount {
                id: id.clone(),
                currency: cny(),
                overdraft,
                tenant: TenantId::default_tenant(),
            });
            let submission = handle.submit(vec![Command { shadow, op }]).map_err(|e| self.fail(e.to_string()))?;
            self.cells[owner].engine.as_mut().expect("started").step();
            let mut call: CallFuture<_> = Box::pin(submission.wait());
            match poll_once(&mut call) {
                Some(Ok(outcomes)) if matches!(outcomes[0], Outcome::AccountOpened { .. }) => {}
                other => return Err(self.fail(format!("opening {id} answered {other:?}"))),
            }
        }
        Ok(())
    }

    /// Starts (or restarts) cell `i` from its disk, through the real recovery.
    fn start(&mut self, i: usize) -> Result<(), SimFailure> {
        let clock = self.clock.clone();
        let batch_clock: BatchClock = Arc::new(move || clock.load(Relaxed));
        let id = self.cells[i].id;
        let damaged_before = self.cells[i].disk.lock().expect("one thread").has_damaged_record();
        let store = Box::new(SimStore::open(self.cells[i].disk.clone()));
        match Cell::stepped(store, id, &self.map, engine_config(self.config.steps), batch_clock) {
            Ok((engine, recovery)) => {
                if damaged_before {
                    let disk = self.cells[i].disk.lock().expect("one thread");
                    if disk.damaged_after(recovery.checkpoint_seq) {
                        return Err(self.fail(format!(
                            "cell {id} recovered past a damaged log record (from checkpoint {}): it was skipped",
                            recovery.checkpoint_seq
                        )));
                    }
                }
                self.report.torn_tails += u64::from(recovery.torn_tail.is_some());
                self.report.fall_backs += u64::from(!recovery.fell_back_from.is_empty());
                *self.cells[i].slot.lock().expect("one thread") = Some(engine.handle());
                self.cells[i].engine = Some(engine);
                self.check_durable(i)
            }
            Err(e) => {
                let reason = e.to_string();
                if damaged_before && reason.contains("fails its checksum") {
                    // The right refusal: a damaged, acknowledged record is never
                    // skipped. The operator restores the sector; the cell starts.
                    self.report.refused_starts += 1;
                    self.cells[i].disk.lock().expect("one thread").repair_records();
                    return self.start(i);
                }
                Err(self.fail(format!("cell {id} did not recover: {reason}")))
            }
        }
    }

    /// A crash of cell `i`: the engine is gone at once, whatever it was doing.
    fn crash(&mut self, i: usize) {
        let Some(engine) = self.cells[i].engine.take() else { return };
        drop(engine);
        *self.cells[i].slot.lock().expect("one thread") = None;
        let keep_checkpoint = self.rng.chance(500_000);
        let torn = self.rng.chance(300_000).then(|| vec![0xA5; 1 + self.rng.below(40) as usize]);
        self.cells[i].disk.lock().expect("one thread").crash(keep_checkpoint, torn);
        self.cells[i].up_at = self.tick + 1 + self.rng.below(DOWN_TICKS_MAX);
        self.report.crashes += 1;
    }

    /// Every payment a client was told about, whose payer lives in cell `i`,
    /// is there with the status it was told or a later one.
    fn check_durable(&self, i: usize) -> Result<(), SimFailure> {
        let Some(engine) = &self.cells[i].engine else { return Ok(()) };
        let state = engine.state();
        for ((shadow, from, id), acked) in &self.acked {
            // A shard that moved here is checked once the cell works at the map that says so.
            if self.map.owner_of(from.as_str()) != self.cells[i].id
                || state.shard_map().owner_of(from.as_str()) != self.cells[i].id
            {
                continue;
            }
            let q = Query::Transfer { shadow: *shadow, id: id.clone(), from: Some(from.clone()), by: Authority::Admin };
            let QueryAnswer::Transfers(found) = state.query(&q) else {
                return Err(self.fail("a transfer query answered something else"));
            };
            // I5: ids are unique across both ledgers here, so a payment is in its own ledger only.
            let other =
                Query::Transfer { shadow: !*shadow, id: id.clone(), from: Some(from.clone()), by: Authority::Admin };
            if matches!(state.query(&other), QueryAnswer::Transfers(v) if !v.is_empty()) {
                let ledger = if *shadow { "real" } else { "shadow" };
                return Err(self.fail(format!("payment {from}/{id} crossed into the {ledger} ledger")));
            }
            let Some(now) = found.first() else {
                return Err(
                    self.fail(format!("acknowledged payment {from}/{id} is gone from cell {}", self.cells[i].id))
                );
            };
            if now.amount != acked.view.amount || now.to != acked.view.to || rank(now.status) < rank(acked.view.status)
            {
                return Err(self
                    .fail(format!("acknowledged payment {from}/{id} changed: told {:?}, now {:?}", acked.view, now)));
            }
            if rank(acked.view.status) == 1 && now.status != acked.view.status {
                return Err(
                    self.fail(format!("payment {from}/{id} was told {:?}, now {:?}", acked.view.status, now.status))
                );
            }
        }
        Ok(())
    }

    /// The audit on the running cells' states in hand (exact between batches):
    /// each cell's walk against its kept figures, and every pair reconciled.
    fn check_audit(&self) -> Result<(), SimFailure> {
        let states: Vec<&CellState> = self.cells.iter().filter_map(|c| c.engine.as_ref().map(|e| e.state())).collect();
        for shadow in [false, true] {
            // I7: the outbox towards each cell stays within its limit, plus the
            // credits a shard move rerouted to it (each admitted within the
            // limit of the stream it left: at most one limit per other cell).
            let bound = OUTBOX_MESSAGES_MAX * self.cells.len() as u64;
            for s in &states {
                if let Some(o) = s.ledger(shadow).figures().outbox.iter().find(|o| o.open_messages() > bound) {
                    return Err(self.fail(format!(
                        "cell {}'s outbox to cell {} holds {} messages, above its limit",
                        s.cell(),
                        o.dest,
                        o.open_messages()
                    )));
                }
            }
            if let Some(f) = audit_states(&states, shadow).first() {
                let ledger = if shadow { "shadow" } else { "real" };
                return Err(self.fail(format!("the audit of the {ledger} ledger found: {f}")));
            }
            if self.config.mutation == Some(Mutation::SkipMoveRecord) {
                // An audit that leaves the move records out: each cell's own identity.
                for s in &states {
                    let mut f = s.figures(shadow);
                    f.moves.clear();
                    f.frozen.clear();
                    f.arrived.clear();
                    if let Some(found) = f.own_findings(s.cell()).first() {
                        return Err(self.fail(format!("the audit without move records found: {found}")));
                    }
                }
            }
        }
        Ok(())
    }

    fn new_payment(&mut self) {
        let retry = !self.sent.is_empty() && self.rng.chance(200_000);
        let (shadow, transfer) = if retry {
            self.report.retries += 1;
            let i = self.rng.below(self.sent.len() as u64) as usize;
            self.sent[i].clone()
        } else {
            let shadow = self.rng.chance(250_000);
            self.report.shadow_payments += u64::from(shadow);
            self.next_id += 1;
            let payer_is_bank = self.rng.chance(250_000);
            let from =
                if payer_is_bank { self.rng.pick(&self.banks).clone() } else { self.rng.pick(&self.accounts).clone() };
            let to = loop {
                let to = self.rng.pick(&self.accounts).clone();
                if to != from {
                    break to;
                }
            };
            let amount = 1 + self.rng.below(if payer_is_bank { 1000 } else { 200 }) as i64;
            let t = Transfer {
                id: TransferId::new(&format!("t{}", self.next_id)).expect("valid"),
                from,
                to,
                amount,
                currency: None,
                memo: None,
                by: Authority::Admin,
            };
            self.sent.push((shadow, t.clone()));
            (shadow, t)
        };
        // The router's routing: the payer's cell, by the shard map.
        let owner = self.map.owner_of(transfer.from.as_str()).0 as usize;
        // Now and then a stale router sends it to a cell that does not own the
        // payer: that cell must refuse it (`wrong_cell`) and change nothing (I6).
        let misrouted = self.cells.len() > 1 && self.rng.chance(30_000);
        let target = if misrouted {
            (owner + 1 + self.rng.below(self.cells.len() as u64 - 1) as usize) % self.cells.len()
        } else {
            owner
        };
        self.report.misrouted += u64::from(misrouted);
        let link = self.links[target].clone();
        let command = Command { shadow, op: Op::Transfer(transfer.clone()) };
        let call: CallFuture<_> = Box::pin(async move { link.submit(vec![command]).await });
        self.payments.push(Payment { shadow, transfer, call, misrouted, target });
    }

    /// What a client learns from an answer.
    fn answered(&mut self, shadow: bool, transfer: &Transfer, outcomes: Vec<Outcome>) -> Result<(), SimFailure> {
        if self.trace {
            eprintln!("answer {}/{}: {outcomes:?}", transfer.from, transfer.id);
        }
        let key = (shadow, transfer.from.clone(), transfer.id.clone());
        match outcomes.into_iter().next() {
            Some(Outcome::Transferred { transfer: view, created, .. }) => {
                // Answers of one batch may reach their clients in any order:
                // what counts is that only one of them ever says "created".
                if created && !self.created.insert(key.clone()) {
                    return Err(self.fail(format!("payment {}/{} was paid twice", key.1, key.2)));
                }
                if let Some(before) = self.acked.get(&key) {
                    if view.amount != before.view.amount || view.to != before.view.to {
                        return Err(self.fail(format!("a retry of {}/{} answered another payment", key.1, key.2)));
                    }
                }
                if view.amount != transfer.amount || view.to != transfer.to {
                    return Err(self.fail(format!("payment {}/{} answered {view:?} for {transfer:?}", key.1, key.2)));
                }
                let keep = self.acked.get(&key).is_none_or(|b| rank(view.status) >= rank(b.view.status));
                if keep {
                    self.acked.insert(key, Acked { view });
                }
                self.report.payments_acked += 1;
            }
            Some(Outcome::Rejected(r)) => {
                self.report.payments_refused += 1;
                self.report.outbox_full += u64::from(r.code == ErrorCode::OutboxFull);
            }
            other => return Err(self.fail(format!("a payment answered {other:?}"))),
        }
        Ok(())
    }

    /// Polls every call in flight once.
    fn poll_calls(&mut self) -> Result<(), SimFailure> {
        let orphans = std::mem::take(&mut self.net.lock().expect("one thread").orphans);
        let mut pending = Vec::new();
        for mut orphan in orphans {
            if orphan.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
                pending.push(orphan);
            }
        }
        self.net.lock().expect("one thread").orphans.extend(pending);
        let mut i = 0;
        while i < self.payments.len() {
            match poll_once(&mut self.payments[i].call) {
                None => i += 1,
                Some(answer) => {
                    let p = self.payments.swap_remove(i);
                    match answer {
                        // A misrouted payment whose payer's shard has moved to
                        // the cell it was sent to since is that cell's to serve.
                        Ok(outcomes)
                            if p.misrouted && self.map.owner_of(p.transfer.from.as_str()).0 as usize != p.target =>
                        {
                            // (A shard frozen for a move at its old owner is refused there too.)
                            let refused = matches!(outcomes.first(), Some(Outcome::Rejected(r)) if matches!(r.code, ErrorCode::WrongCell | ErrorCode::ShardFrozen));
                            if !refused {
                                return Err(self.fail(format!(
                                    "payment {}/{} sent to a cell that does not own its payer answered {outcomes:?}",
                                    p.transfer.from, p.transfer.id
                                )));
                            }
                        }
                        Ok(outcomes) => self.answered(p.shadow, &p.transfer, outcomes)?,
                        Err(_) => {}
                    }
                }
            }
        }
        let mut unexpected = None;
        for r in &mut self.relays {
            if let Some(round) = &mut r.round {
                if let Some(done) = poll_once(round) {
                    r.round = None;
                    let (s, d) = (r.relay.source.cell(), r.relay.dest.cell());
                    if self.trace {
                        eprintln!("round {s}→{d}: {done:?}");
                    }
                    if let Err(RoundError::Unexpected(why)) = done {
                        unexpected.get_or_insert(format!("relay {s}→{d}: {why}"));
                    }
                }
            }
        }
        unexpected.map_or(Ok(()), |what| Err(self.fail(what)))
    }

    fn start_round(&mut self, r: usize) {
        if self.relays[r].round.is_none() {
            let relay = self.relays[r].relay.clone();
            self.relays[r].round = Some(Box::pin(async move { relay.round().await }));
            self.report.relay_rounds += 1;
        }
    }

    /// One batch of cell `i`. An engine that ended on a store error (fail-stop)
    /// is a crash; one that panicked is a bug.
    fn step_cell(&mut self, i: usize) -> Result<(), SimFailure> {
        let Some(engine) = &mut self.cells[i].engine else { return Ok(()) };
        engine.step();
        if engine.ended().is_some() {
            if let Health::Failed { reason } = CellClient::status(&engine.handle()).health {
                if reason.contains("panicked") {
                    return Err(self.fail(format!("cell {}: {reason}", self.cells[i].id)));
                }
            }
            self.crash(i);
        }
        Ok(())
    }

    /// A new shard map (the same owners: moving a shard's data is not
    /// simulated yet) that each cell and the router learn at its own time,
    /// so callers run ahead of cells and cells ahead of callers.
    fn new_map(&mut self) {
        let next = ShardMap::new(self.map.epoch() + 1, self.map.owners().to_vec()).expect("a valid successor");
        self.publish(next);
    }

    /// The control plane takes `next`; each cell and the router learn it at its own time.
    fn publish(&mut self, next: ShardMap) {
        self.map = next;
        for at in &mut self.learns_map_at {
            *at = self.tick + self.rng.below(60);
        }
        self.router_learns_map_at = Some(self.tick + self.rng.below(60));
        self.report.map_changes += 1;
    }

    /// Starts moving a random shard to a random other cell (one move at a time).
    fn start_move(&mut self) {
        if self.moving.is_some() || self.cells.len() < 2 {
            return;
        }
        let shard = self.rng.below(u64::from(self.map.shards())) as u32;
        let from = self.map.owner(cellpay_core::ShardId(shard)).0 as usize;
        let to = (from + 1 + self.rng.below(self.cells.len() as u64 - 1) as usize) % self.cells.len();
        let id = self.map.epoch() + 1;
        self.moving = Some(MoveRun { shard, from, to, id, step: MoveStep::Freeze, call: None, export: None });
    }

    /// The coordinator's next call, or what the last one answered.
    fn step_move(&mut self) {
        let Some(m) = &mut self.moving else { return };
        // Another map took the move's epoch (the shard stays): the cells undo it as they learn the map.
        if self.map.epoch() >= m.id {
            self.moving = None;
            self.report.moves_undone += 1;
            return;
        }
        if self.config.faults && self.rng.chance(2_000) {
            // The coordinator dies; the next one decides the move from the map.
            self.resume_move();
            return;
        }
        let m = self.moving.as_mut().expect("checked above");
        if let Some(call) = &mut m.call {
            let Some(answer) = poll_once(call) else { return };
            m.call = None;
            match (m.step, answer) {
                (MoveStep::Freeze, Ok(MoveAnswer::Outcome(Outcome::MoveStep { .. }))) => m.step = MoveStep::Export,
                (MoveStep::Export, Ok(MoveAnswer::Answer(QueryAnswer::ShardExport(export)))) => {
                    m.export = Some(export);
                    m.step = MoveStep::Install;
                }
                (MoveStep::Install, Ok(MoveAnswer::Outcome(Outcome::MoveStep { .. }))) => return self.decide_move(),
                // Lost, unavailable, refused for now (a cell behind the map, a shard still draining): again.
                _ => {}
            }
            return;
        }
        let (shard, id, to) = (m.shard, m.id, CellId(m.to as u32));
        let call: CallFuture<Result<MoveAnswer, EngineError>> = match m.step {
            MoveStep::Freeze => {
                let link = self.links[m.from].clone();
                let op = Op::FreezeShard { shard, move_id: id, to };
                Box::pin(async move {
                    link.submit(vec![Command::real(op)]).await.map(|mut o| MoveAnswer::Outcome(o.remove(0)))
                })
            }
            MoveStep::Export => {
                let link = self.links[m.from].clone();
                Box::pin(async move {
                    link.query(Query::ExportShard { shard, older_after: 0 }).await.map(MoveAnswer::Answer)
                })
            }
            MoveStep::Install => {
                let link = self.links[m.to].clone();
                let op = Op::InstallShard(m.export.clone().expect("exported before the install"));
                Box::pin(async move {
                    link.submit(vec![Command::real(op)]).await.map(|mut o| MoveAnswer::Outcome(o.remove(0)))
                })
            }
        };
        m.call = Some(call);
    }

    /// The compare-and-set: the move's map takes its epoch.
    fn decide_move(&mut self) {
        let m = self.moving.take().expect("a move in flight");
        if self.config.mutation == Some(Mutation::LiftFreezeEarly) {
            if let Some(engine) = &mut self.cells[m.from].engine {
                let _ =
                    engine.handle().submit(vec![Command::real(Op::UnfreezeShard { shard: m.shard, move_id: m.id })]);
                engine.step();
                // It struck if the source serves the shard again (its batch may have failed).
                if engine.ended().is_none() && !engine.state().frozen_shards().contains_key(&m.shard) {
                    self.report.mutations += 1;
                }
            }
        }
        let mut owners = self.map.owners().to_vec();
        owners[m.shard as usize] = CellId(m.to as u32);
        self.publish(ShardMap::new(m.id, owners).expect("a valid successor"));
        self.report.moves += 1;
        if self.config.mutation == Some(Mutation::RerouteByOldSeq) {
            self.rerouting.push((m.shard, m.from, m.to));
        }
    }

    /// A coordinator that finds a move no map decided takes its epoch with the shard where it was.
    fn resume_move(&mut self) {
        let Some(m) = self.moving.take() else { return };
        if self.map.epoch() < m.id {
            self.new_map();
        }
        self.report.moves_undone += 1;
    }

    /// [`Mutation::RerouteByOldSeq`]: a relay that sends each credit still
    /// queued for a moved shard's old owner to its new one, under the old
    /// stream's number, and closes it at the payer's cell as delivered.
    fn reroute_by_old_seq(&mut self) {
        for (shard, old, new) in self.rerouting.clone() {
            for a in (0..self.cells.len()).filter(|a| *a != old) {
                let Some(source) = &self.cells[a].engine else { continue };
                let q = Query::Outbox { shadow: false, dest: CellId(old as u32), after_seq: 0, limit: 1 };
                let QueryAnswer::Outbox(msgs) = source.state().query(&q) else { continue };
                let Some(m) = msgs.first().filter(|m| self.map.shard_of(m.to.as_str()).0 == shard) else { continue };
                let settle = Command::real(Op::Settle { dest: CellId(old as u32), seq: m.seq });
                let credit = Command::real(Op::Credit(m.credit(CellId(a as u32))));
                if let Some(dest) = &self.cells[new].engine {
                    let _ = dest.handle().submit(vec![credit]);
                }
                let _ = source.handle().submit(vec![settle]);
                self.report.mutations += 1;
            }
        }
    }

    /// The control plane's follow: a cell due to learn the newest map installs
    /// it (a logged command; asked again if a crash lost it), the router takes
    /// it when due, and each relay's calls carry its cell's epoch.
    fn follow_map(&mut self) {
        let epoch = self.map.epoch();
        for i in 0..self.cells.len() {
            let Some(engine) = &self.cells[i].engine else { continue };
            let handle = engine.handle();
            let asked_lately = self.install_asked_at[i].is_some_and(|at| at + 20 > self.tick);
            if handle.epoch() < epoch && self.learns_map_at[i] <= self.tick && !asked_lately {
                // The answer is not awaited: the next batch applies it.
                let _ = handle.submit(vec![Command::real(Op::InstallShardMap(self.map.clone()))]);
                self.install_asked_at[i] = Some(self.tick);
            }
        }
        if self.router_learns_map_at.is_some_and(|at| at <= self.tick) {
            self.router_learns_map_at = None;
            for link in &self.links {
                link.set_sender_epoch(epoch);
            }
        }
        for (source, link) in &self.relay_links {
            if let Some(engine) = &self.cells[*source].engine {
                link.set_sender_epoch(engine.handle().epoch());
            }
        }
    }

    /// A call a cell acted on that it should have refused fails the run.
    fn check_violations(&self) -> Result<(), SimFailure> {
        let net = self.net.lock().expect("one thread");
        match net.violations.first() {
            Some(v) => Err(self.fail(v.clone())),
            None => Ok(()),
        }
    }

    fn fault(&mut self) {
        let i = self.rng.below(self.cells.len() as u64) as usize;
        match self.rng.below(9) {
            8 => self.new_map(),
            0 | 1 => self.crash(i),
            2 => {
                let mut disk = self.cells[i].disk.lock().expect("one thread");
                disk.fail_next_fsync = true;
                disk.failed_fsync_kept = self.rng.chance(500_000);
                self.report.fsync_errors += 1;
            }
            3 => {
                let mut disk = self.cells[i].disk.lock().expect("one thread");
                if disk.kept_checkpoints() >= 2 && disk.damage_newest_checkpoint().is_some() {
                    self.report.damaged_checkpoints += 1;
                }
            }
            4 => {
                let mut disk = self.cells[i].disk.lock().expect("one thread");
                if let Some((first, last)) = disk.log_range() {
                    if !disk.has_damaged_record() && disk.damage_record(first + self.rng.below(last - first + 1)) {
                        self.report.damaged_records += 1;
                    }
                }
            }
            5 => {
                let mut net = self.net.lock().expect("one thread");
                let cell = self.cells[i].id;
                if !net.cut.remove(&cell) {
                    net.cut.insert(cell);
                    self.report.partitions += 1;
                }
            }
            _ => {
                let on = self.rng.chance(500_000);
                let faults = if on {
                    NetFaults {
                        request_loss: 50_000,
                        reply_loss: 50_000,
                        duplicate: 50_000,
                        delay_ticks_max: 20,
                        late: 30_000,
                        late_ticks_max: 60,
                        misdeliver: 20_000,
                    }
                } else {
                    NetFaults::default()
                };
                self.net.lock().expect("one thread").faults = faults;
            }
        }
    }

    fn tick(&mut self) {
        if self.trace {
            eprintln!(
                "tick {} payments {} rounds {}",
                self.tick,
                self.payments.len(),
                self.relays.iter().filter(|r| r.round.is_some()).count()
            );
        }
        self.tick += 1;
        self.net.lock().expect("one thread").tick = self.tick;
        self.clock.fetch_add(self.rng.below(4), Relaxed);
    }

    fn restart_due(&mut self) -> Result<(), SimFailure> {
        for i in 0..self.cells.len() {
            if self.cells[i].engine.is_none() && self.cells[i].up_at <= self.tick {
                self.start(i)?;
            }
        }
        Ok(())
    }

    fn random_phase(&mut self) -> Result<(), SimFailure> {
        for _ in 0..self.config.steps {
            self.tick();
            if self.rng.chance(5_000) {
                self.start_move();
            }
            self.step_move();
            self.reroute_by_old_seq();
            match self.rng.below(100) {
                0..=34 => self.new_payment(),
                35..=74 => {
                    let i = self.rng.below(self.cells.len() as u64) as usize;
                    self.step_cell(i)?;
                }
                75..=94 => {
                    let r = self.rng.below(self.relays.len() as u64) as usize;
                    self.start_round(r);
                }
                _ if self.config.faults => self.fault(),
                _ => {}
            }
            self.restart_due()?;
            self.follow_map();
            self.poll_calls()?;
            self.check_violations()?;
            self.check_audit()?;
        }
        Ok(())
    }

    /// Heals every fault and runs until every payment in flight is answered
    /// and every credit delivered; then nothing may stay pending.
    fn drain(&mut self) -> Result<(), SimFailure> {
        {
            let mut net = self.net.lock().expect("one thread");
            net.faults = NetFaults::default();
            net.cut.clear();
        }
        for c in &self.cells {
            c.disk.lock().expect("one thread").fail_next_fsync = false;
        }
        // The last coordinator stops: a move it left is decided by the map.
        self.resume_move();
        for i in 0..self.cells.len() {
            if self.cells[i].engine.is_none() {
                self.cells[i].up_at = 0;
            }
            self.learns_map_at[i] = 0;
        }
        if self.router_learns_map_at.is_some() {
            self.router_learns_map_at = Some(0);
        }
        self.restart_due()?;
        for _ in 0..DRAIN_TICKS_MAX {
            self.tick();
            for i in 0..self.cells.len() {
                self.step_cell(i)?;
            }
            for r in 0..self.relays.len() {
                self.start_round(r);
            }
            self.follow_map();
            self.poll_calls()?;
            self.check_violations()?;
            let open: u64 = self
                .cells
                .iter()
                .filter_map(|c| c.engine.as_ref())
                .map(|e| {
                    e.state().ledger(false).figures().open_messages() + e.state().ledger(true).figures().open_messages()
                })
                .sum();
            let orphans = self.net.lock().expect("one thread").orphans.len();
            // Rounds still in flight then find nothing to carry.
            if open == 0 && self.payments.is_empty() && orphans == 0 {
                return Ok(());
            }
        }
        Err(self.fail(format!("money still in flight after {DRAIN_TICKS_MAX} ticks of drain with every fault healed")))
    }

    fn final_checks(&mut self) -> Result<(), SimFailure> {
        self.check_audit()?;
        let states: Vec<&CellState> = self.cells.iter().filter_map(|c| c.engine.as_ref().map(|e| e.state())).collect();
        for shadow in [false, true] {
            let total: i128 = states.iter().map(|s| s.ledger(shadow).figures().balance_sum).sum();
            if total != 0 {
                return Err(self.fail(format!(
                    "money is not conserved: balances sum to {total} with nothing in flight (shadow: {shadow})"
                )));
            }
        }
        for i in 0..self.cells.len() {
            self.check_durable(i)?;
        }
        for (shadow, from, id) in self.acked.keys() {
            let owner = self.map.owner_of(from.as_str()).0 as usize;
            let state = self.cells[owner].engine.as_ref().expect("running after the drain").state();
            let q = Query::Transfer { shadow: *shadow, id: id.clone(), from: Some(from.clone()), by: Authority::Admin };
            if let QueryAnswer::Transfers(found) = state.query(&q) {
                if found.first().is_some_and(|t| t.status == TransferStatus::Pending) {
                    return Err(self.fail(format!("payment {from}/{id} is still pending after the drain")));
                }
            }
        }
        // The digest of the end state: per-shard digests and the figures.
        let mut text = String::new();
        for s in &states {
            for shadow in [false, true] {
                if let QueryAnswer::Digests { digests, .. } = s.query(&Query::Digests { shadow }) {
                    text.push_str(&format!("{digests:?}"));
                }
                text.push_str(&format!("{:?}", s.ledger(shadow).figures()));
            }
        }
        self.report.digest = cellpay_core::stable_hash(text.as_bytes());
        Ok(())
    }
}

/// Runs one seed: the random phase with faults, the drain, the final checks.
pub fn run(config: SimConfig) -> Result<SimReport, SimFailure> {
    let mut sim = Sim::new(config)?;
    sim.random_phase()?;
    sim.drain()?;
    sim.final_checks()?;
    if config.mutation == Some(Mutation::SkipMoveRecord) {
        // It struck where a move carried money (a move of no money changes no sum).
        for c in sim.cells.iter().filter_map(|c| c.engine.as_ref()) {
            let moved = c.state().figures(false).moves.iter().any(|m| m.out_net != 0 || m.in_net != 0);
            sim.report.mutations += u64::from(moved);
        }
    }
    let net = sim.net.lock().expect("one thread");
    sim.report.lost_requests = net.lost_requests;
    sim.report.lost_replies = net.lost_replies;
    sim.report.duplicates = net.duplicates;
    sim.report.late_deliveries = net.late;
    sim.report.misdelivered = net.misdelivered;
    sim.report.behind_refusals = net.behind_refusals;
    drop(net);
    sim.report.ticks = sim.tick;
    sim.report.simulated_ms = sim.clock.load(Relaxed) - CLOCK_START_MS;
    Ok(sim.report.clone())
}
