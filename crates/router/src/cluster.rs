//! The cluster as the router sees it: the shard map and a client per cell.

use std::sync::Arc;

use cellpay_cell::{CellClient, EngineError, Relay, RelayConfig, RelayGate, RelayStats};
use cellpay_core::{
    priority_of, AccountId, Authority, CellId, Command, ErrorCode, Op, Outcome, Query, QueryAnswer, ShardMap,
    TransferId,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::degrade::Action;
use crate::protect::{Protection, RouteError};

/// An answer and the cell (at its epoch) that gave it: the API puts both in
/// `X-Cellpay-Cell` and `X-Cellpay-Epoch`.
#[derive(Debug)]
pub struct Routed<T> {
    pub cell: CellId,
    pub epoch: u64,
    pub result: Result<T, RouteError>,
}

/// A running relay and its counters.
pub struct RelayHandle {
    pub source: CellId,
    pub dest: CellId,
    pub shadow: bool,
    pub stats: Arc<RelayStats>,
    pub gate: Arc<RelayGate>,
}

pub struct Cluster {
    /// Replaced by a newer map from the control plane, or from a cell that
    /// refused a command `wrong_cell` while working at a newer one.
    map: std::sync::RwLock<Arc<ShardMap>>,
    cells: Vec<Arc<dyn CellClient>>,
    protection: Arc<Protection>,
    signals: std::sync::Mutex<crate::Signals>,
}

impl Cluster {
    /// `cells[i]` must be the client of cell `i`, and every cell the map names must be there.
    pub fn new(map: ShardMap, cells: Vec<Arc<dyn CellClient>>, protection: Arc<Protection>) -> Self {
        for (i, c) in cells.iter().enumerate() {
            assert_eq!(c.cell(), CellId(i as u32), "cells are listed in id order");
        }
        assert!(map.owners().iter().all(|o| (o.0 as usize) < cells.len()), "the map names only known cells");
        let outbox_max = protection.rules().outbox_messages_max;
        cells.iter().for_each(|c| c.set_outbox_messages_max(outbox_max));
        cells.iter().for_each(|c| c.set_sender_epoch(map.epoch()));
        Self { map: std::sync::RwLock::new(Arc::new(map)), cells, protection, signals: Default::default() }
    }

    /// Installs `next` when it succeeds the current map (a higher epoch, the
    /// same shards) and names only known cells; answers whether it did.
    pub fn set_map(&self, next: ShardMap) -> bool {
        if let Some(unknown) = next.owners().iter().find(|o| (o.0 as usize) >= self.cells.len()) {
            tracing::warn!(epoch = next.epoch(), "a shard map naming unknown cell {unknown} is ignored");
            return false;
        }
        let epoch = next.epoch();
        {
            let mut map = self.map.write().expect("map lock");
            if map.check_successor(&next).is_err() {
                return false;
            }
            *map = Arc::new(next);
        }
        self.cells.iter().for_each(|c| c.set_sender_epoch(epoch));
        tracing::info!(epoch, "the router works at a new shard map");
        true
    }

    /// After `cell` refused a command `wrong_cell`: learns the map it works
    /// at, if newer than the router's; answers whether the map changed.
    async fn refresh_from(&self, cell: &Arc<dyn CellClient>) -> bool {
        match cell.shard_map().await {
            Some(map) if map.epoch() > self.map().epoch() => self.set_map(map),
            _ => false,
        }
    }

    /// Whether `routed`, refused `wrong_cell` by `first`, should go again:
    /// under the router's map, newer now (learned from `first`, or by another
    /// call meanwhile), `account` lives elsewhere.
    async fn moved<T>(&self, routed: &Routed<T>, first: &Arc<dyn CellClient>, account: &AccountId) -> bool {
        if !matches!(routed.result, Err(RouteError::WrongCell { .. })) {
            return false;
        }
        self.refresh_from(first).await;
        self.owner(account).cell() != first.cell()
    }

    /// Whether `routed` was refused `wrong_cell` by the cell the router's map
    /// names as `account`'s owner: that cell has not installed the map yet (a
    /// cell process follows the control plane; it catches up in
    /// milliseconds), so the call waits for it as for a frozen shard.
    fn behind<T>(&self, routed: &Routed<T>, account: &AccountId) -> bool {
        matches!(routed.result, Err(RouteError::WrongCell { .. }))
            && self.owner(account).cell() == routed.cell
            && routed.epoch < self.map().epoch()
    }

    /// Waits, without calling it, until `cell` reports the router's epoch, for
    /// at most [`BEHIND_POLL_MAX`] and never past `deadline`.
    async fn wait_caught_up(&self, cell: CellId, deadline: tokio::time::Instant) {
        let target = self.map().epoch();
        let until = (tokio::time::Instant::now() + BEHIND_POLL_MAX).min(deadline);
        let client = &self.cells[cell.0 as usize];
        while client.status().epoch < target && tokio::time::Instant::now() < until {
            tokio::time::sleep(SHARD_FREEZE_POLL).await;
        }
    }

    /// Installs checked flow rules: the router's layers, and each cell's outbox limit.
    pub fn replace_rules(&self, rules: crate::FlowRules) {
        let outbox_max = rules.outbox_messages_max;
        self.protection.replace_rules(rules);
        self.cells.iter().for_each(|c| c.set_outbox_messages_max(outbox_max));
    }

    /// The protection layers every call goes through.
    pub fn protection(&self) -> &Arc<Protection> {
        &self.protection
    }

    /// The shard map the router works at.
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.read().expect("map lock").clone()
    }

    pub fn cells(&self) -> &[Arc<dyn CellClient>] {
        &self.cells
    }

    /// The client of the cell that owns `account`.
    pub fn owner(&self, account: &AccountId) -> &Arc<dyn CellClient> {
        let owner = self.map.read().expect("map lock").owner_of(account.as_str());
        &self.cells[owner.0 as usize]
    }

    /// Commands to one cell, through the per-call layers (retry budget,
    /// breaker, concurrency limit). Client commands are idempotent by their
    /// ids, so a retry answers what the first attempt would have. A single
    /// command the cell refuses as `wrong_cell` is retried like an unavailable
    /// cell (a batch keeps its per-item answers).
    async fn on(protection: &Protection, cell: &Arc<dyn CellClient>, commands: &[Command]) -> Routed<Vec<Outcome>> {
        let class = priority_of(commands);
        let single = commands.len() == 1;
        let attempt = || async {
            let outcomes = cell.submit(commands.to_vec()).await?;
            match outcomes.first() {
                Some(Outcome::Rejected(r)) if single && r.code == ErrorCode::WrongCell => {
                    Err(RouteError::WrongCell { cell: cell.cell(), reason: r.message.clone() })
                }
                _ => Ok(outcomes),
            }
        };
        let result = protection.call(cell.as_ref(), class, attempt).await;
        Routed { cell: cell.cell(), epoch: cell.status().epoch, result }
    }

    /// A read at one cell, through the same layers (reads are always safe to retry).
    async fn ask(protection: &Protection, cell: &Arc<dyn CellClient>, query: Query) -> Routed<QueryAnswer> {
        let class = query.priority();
        let attempt = || async {
            match cell.query(query.clone()).await? {
                QueryAnswer::Rejected(r) if r.code == ErrorCode::WrongCell => {
                    Err(RouteError::WrongCell { cell: cell.cell(), reason: r.message })
                }
                answer => Ok(answer),
            }
        };
        let result = protection.call(cell.as_ref(), class, attempt).await;
        Routed { cell: cell.cell(), epoch: cell.status().epoch, result }
    }

    /// One command, routed by the account it acts on (the payer for a
    /// transfer). Refused `wrong_cell` by a cell at a newer map, it goes once
    /// more, to the owner under that map.
    ///
    /// A shard frozen for a move answers `shard_frozen` for the few
    /// milliseconds of its cutover: the command waits and goes again (to the
    /// new owner once the move is done), for at most [`SHARD_FREEZE_WAIT_MAX`].
    pub async fn submit_one(&self, command: Command) -> Routed<Outcome> {
        let commands = [command];
        let account = match &commands[0].op {
            Op::OpenAccount(o) => &o.id,
            Op::Transfer(t) => &t.from,
            other => panic!("the router only routes client commands, not {other:?}"),
        };
        let deadline = tokio::time::Instant::now() + SHARD_FREEZE_WAIT_MAX;
        let routed = loop {
            let first = self.owner(account);
            let mut routed = Self::on(&self.protection, first, &commands).await;
            if self.moved(&routed, first, account).await {
                routed = Self::on(&self.protection, self.owner(account), &commands).await;
            }
            let frozen = matches!(&routed.result, Ok(v) if matches!(v.first(), Some(Outcome::Rejected(r)) if r.code == ErrorCode::ShardFrozen));
            let behind = self.behind(&routed, account);
            if !(frozen || behind) || tokio::time::Instant::now() >= deadline {
                break routed;
            }
            if behind {
                self.wait_caught_up(routed.cell, deadline).await;
            } else {
                tokio::time::sleep(SHARD_FREEZE_POLL).await;
            }
        };

        Routed {
            cell: routed.cell,
            epoch: routed.epoch,
            result: routed.result.map(|mut v| v.pop().expect("one answer per command")),
        }
    }

    /// Transfers of a batch, each routed by its payer; answers in the input order.
    pub async fn submit_transfers(&self, commands: Vec<Command>) -> Vec<Routed<Outcome>> {
        let n = commands.len();
        let mut per_cell: Vec<(Vec<usize>, Vec<Command>)> = vec![(Vec::new(), Vec::new()); self.cells.len()];
        let map = self.map();
        for (i, cmd) in commands.into_iter().enumerate() {
            let Op::Transfer(t) = &cmd.op else { panic!("a batch holds transfers only") };
            let cell = map.owner_of(t.from.as_str()).0 as usize;
            per_cell[cell].0.push(i);
            per_cell[cell].1.push(cmd);
        }
        let mut tasks = JoinSet::new();
        for (cell, (positions, cmds)) in per_cell.into_iter().enumerate() {
            if cmds.is_empty() {
                continue;
            }
            let (client, protection) = (self.cells[cell].clone(), self.protection.clone());
            tasks.spawn(async move {
                let routed = Self::on(&protection, &client, &cmds).await;
                (positions, cmds, routed)
            });
        }
        let mut out: Vec<Option<Routed<Outcome>>> = (0..n).map(|_| None).collect();
        // Items a cell refused `wrong_cell`: each goes again alone, through the map the cell knows.
        let mut misrouted = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (positions, cmds, routed) = joined.expect("routing tasks do not panic");
            match routed.result {
                Ok(outcomes) => {
                    for ((i, outcome), cmd) in positions.into_iter().zip(outcomes).zip(cmds) {
                        if matches!(&outcome, Outcome::Rejected(r) if matches!(r.code, ErrorCode::WrongCell | ErrorCode::ShardFrozen))
                        {
                            misrouted.push((i, cmd));
                        }
                        out[i] = Some(Routed { cell: routed.cell, epoch: routed.epoch, result: Ok(outcome) });
                    }
                }
                Err(e) => {
                    // A batch of one is refused `wrong_cell` as a single command is.
                    let wrong = matches!(e, RouteError::WrongCell { .. });
                    for (i, cmd) in positions.into_iter().zip(cmds) {
                        if wrong {
                            misrouted.push((i, cmd));
                        }
                        out[i] = Some(Routed { cell: routed.cell, epoch: routed.epoch, result: Err(e.clone()) });
                    }
                }
            }
        }
        if let Some((i, _)) = misrouted.first() {
            let refused_by = out[*i].as_ref().expect("routed").cell;
            self.refresh_from(&self.cells[refused_by.0 as usize]).await;
            // The items go again one by one, within one bound for the whole
            // batch: past it, the rest keep the refusal they had.
            let deadline = tokio::time::Instant::now() + SHARD_FREEZE_WAIT_MAX;
            for (i, cmd) in misrouted {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let Op::Transfer(t) = &cmd.op else { unreachable!("a batch holds transfers only") };
                // Only where the map now names another owner (the same cell would
                // refuse again), where the shard was frozen (it waits for the
                // move), or where the cell is behind the router's map (it waits
                // for the cell).
                let before = out[i].as_ref().expect("routed");
                let frozen = matches!(&before.result, Ok(Outcome::Rejected(r)) if r.code == ErrorCode::ShardFrozen);
                let owner = self.owner(&t.from).cell();
                let behind = owner == before.cell && before.epoch < self.map().epoch();
                if frozen || behind || owner != before.cell {
                    out[i] = Some(self.submit_one(cmd).await);
                }
            }
        }
        out.into_iter().map(|r| r.expect("every item was routed")).collect()
    }

    /// A read about one account, at the cell that owns it (once more at the
    /// owner under a newer map, as for a command; waiting, as a command does,
    /// for an owner that has not installed the router's map yet).
    pub async fn query_account(&self, account: &AccountId, query: Query) -> Routed<QueryAnswer> {
        let deadline = tokio::time::Instant::now() + SHARD_FREEZE_WAIT_MAX;
        loop {
            let first = self.owner(account);
            let mut routed = Self::ask(&self.protection, first, query.clone()).await;
            if self.moved(&routed, first, account).await {
                routed = Self::ask(&self.protection, self.owner(account), query.clone()).await;
            }
            if !self.behind(&routed, account) || tokio::time::Instant::now() >= deadline {
                return routed;
            }
            self.wait_caught_up(routed.cell, deadline).await;
        }
    }

    /// The transfers with id `id`. A transfer id is unique per payer, so with
    /// the payer named this asks one cell, the payer's. Without it, every cell
    /// is asked and the answer is deterministic: every match from every cell
    /// (the caller answers 404, the one, or 409 for several), or the error of
    /// a cell that could not answer, since the transfer may be there.
    pub async fn transfer_status(
        &self,
        shadow: bool,
        id: &TransferId,
        from: Option<&AccountId>,
        by: &Authority,
    ) -> Routed<QueryAnswer> {
        if let Some(from) = from {
            let query = Query::Transfer { shadow, id: id.clone(), from: Some(from.clone()), by: by.clone() };
            return self.query_account(from, query).await;
        }
        // A shard that moved while the cells were asked could be answered by
        // neither or by both: each cell answers for what it owns at its own
        // epoch, so ask again until every cell was at one epoch from before
        // it was asked until after it answered.
        let mut answers = self.ask_every_cell(shadow, id, by).await;
        for attempt in 1..STATUS_ATTEMPTS_MAX {
            // An error is answered as it is (the transfer may be at that cell).
            if answers.1 || answers.0.iter().any(|r| r.result.is_err()) {
                break;
            }
            tokio::time::sleep(STATUS_RETRY_BACKOFF * attempt as u32).await;
            answers = self.ask_every_cell(shadow, id, by).await;
        }
        let mut answers = answers.0;
        if let Some(i) = answers.iter().position(|r| r.result.is_err()) {
            return answers.swap_remove(i);
        }
        let mut found = Vec::new();
        let mut cell = (answers[0].cell, answers[0].epoch);
        for routed in answers {
            match routed.result {
                Ok(QueryAnswer::Transfers(t)) if !t.is_empty() => {
                    cell = (routed.cell, routed.epoch);
                    found.extend(t);
                }
                Ok(QueryAnswer::Transfers(_)) => {}
                Ok(other) => return Routed { result: Ok(other), ..routed },
                Err(_) => unreachable!("errors are answered above"),
            }
        }
        Routed { cell: cell.0, epoch: cell.1, result: Ok(QueryAnswer::Transfers(found)) }
    }

    /// Asks every cell for the transfers with `id` at once; answers them
    /// sorted by cell, and whether every cell stayed at one epoch, the same
    /// for all, from before it was asked until after it answered.
    async fn ask_every_cell(&self, shadow: bool, id: &TransferId, by: &Authority) -> (Vec<Routed<QueryAnswer>>, bool) {
        let before: Vec<u64> = self.cells.iter().map(|c| c.status().epoch).collect();
        let mut tasks = JoinSet::new();
        for cell in &self.cells {
            let (cell, id, protection, by) = (cell.clone(), id.clone(), self.protection.clone(), by.clone());
            tasks.spawn(
                async move { Self::ask(&protection, &cell, Query::Transfer { shadow, id, from: None, by }).await },
            );
        }
        let mut answers = Vec::with_capacity(self.cells.len());
        while let Some(joined) = tasks.join_next().await {
            answers.push(joined.expect("status tasks do not panic"));
        }
        answers.sort_by_key(|r| r.cell);
        let one_epoch = answers.iter().zip(&before).all(|(r, b)| r.epoch == *b && r.epoch == before[0]);
        (answers, one_epoch)
    }

    /// Starts a relay for every ordered pair of cells and both ledgers. They
    /// stop when `stop` turns true.
    pub fn spawn_relays(&self, config: RelayConfig, stop: &watch::Receiver<bool>) -> Vec<RelayHandle> {
        let mut handles = Vec::new();
        for source in &self.cells {
            for dest in &self.cells {
                if source.cell() == dest.cell() {
                    continue;
                }
                for shadow in [false, true] {
                    let stats = Arc::new(RelayStats::default());
                    let deferred = self.protection.degrade.flag(Action::CrossCellDefer);
                    let gate = Arc::new(RelayGate::new(self.protection.rules().breaker, deferred));
                    let relay = Relay {
                        source: source.clone(),
                        dest: dest.clone(),
                        shadow,
                        config,
                        stats: stats.clone(),
                        gate: gate.clone(),
                    };
                    tokio::spawn(relay.run(stop.clone()));
                    handles.push(RelayHandle { source: source.cell(), dest: dest.cell(), shadow, stats, gate });
                }
            }
        }
        handles
    }
}

impl Cluster {
    /// Per-shard digests of one ledger, each read from the cell that owns the shard.
    pub async fn digests(&self, shadow: bool) -> Result<(u64, Vec<u64>), (CellId, EngineError)> {
        let mut per_cell = Vec::with_capacity(self.cells.len());
        for cell in &self.cells {
            match cell.query(Query::Digests { shadow }).await {
                Ok(QueryAnswer::Digests { digests, .. }) => per_cell.push(digests),
                Ok(other) => {
                    let reason = format!("digests answered {other:?}");
                    return Err((cell.cell(), EngineError::Unavailable { cell: cell.cell(), reason }));
                }
                Err(e) => return Err((cell.cell(), e)),
            }
        }
        let map = self.map();
        let digests = map.owners().iter().enumerate().map(|(shard, owner)| per_cell[owner.0 as usize][shard]).collect();
        Ok((map.epoch(), digests))
    }
}

/// How many times a status asked of every cell is asked while a shard move
/// changes an epoch under it (see [`Cluster::transfer_status`]).
const STATUS_ATTEMPTS_MAX: usize = 5;
/// The wait before the status's k-th attempt is k times this (a map install
/// at a cell takes a batch: milliseconds).
const STATUS_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(2);

/// The longest a command waits for a shard frozen for a move (I7); a move's
/// cutover takes milliseconds, and one that does not finish in time is undone.
pub const SHARD_FREEZE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a command waiting for a frozen shard tries again.
const SHARD_FREEZE_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// The longest a call waits for a cell behind the router's map before it
/// tries that cell again (a cell process's status, which names its epoch,
/// is polled every 100 ms; a try costs a call).
const BEHIND_POLL_MAX: std::time::Duration = std::time::Duration::from_millis(20);

/// How often the router reads its signals and feeds the degrade triggers.
pub const SIGNALS_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

impl Cluster {
    /// Reads the signals every [`SIGNALS_PERIOD`], feeds the degrade plan's
    /// triggers, and publishes the protection gauges, until `stop` turns true.
    pub fn spawn_signals(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let cluster = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SIGNALS_PERIOD) => {}
                    _ = stop.changed() => return,
                }
                let p = &cluster.protection;
                let signals = p.signals(&cluster.cells);
                p.degrade.evaluate(&signals, std::time::Instant::now());
                metrics::gauge!("cellpay_signal_critical_p99_seconds").set(signals.critical_p99_ms / 1e3);
                metrics::gauge!("cellpay_signal_front_delay_seconds").set(signals.front_delay_ms / 1e3);
                metrics::gauge!("cellpay_signal_critical_shed_ratio").set(signals.critical_shed_ratio);
                metrics::gauge!("cellpay_signal_queue_delay_seconds").set(signals.queue_delay_ms / 1e3);
                metrics::gauge!("cellpay_signal_error_ratio").set(signals.error_ratio);
                let layers = p.layers();
                for (i, guard) in layers.cells.iter().enumerate() {
                    let cell = i.to_string();
                    metrics::gauge!("cellpay_breaker_state", "cell" => cell.clone())
                        .set(f64::from(guard.breaker.state().level()));
                    metrics::gauge!("cellpay_concurrency_limit", "cell" => cell).set(f64::from(guard.limit.limit()));
                }
                metrics::gauge!("cellpay_hot_keys_tracked").set(layers.hot_keys.tracked() as f64);
                *cluster.signals.lock().expect("signals lock") = signals;
            }
        })
    }

    /// The signals as last read.
    pub fn last_signals(&self) -> crate::Signals {
        *self.signals.lock().expect("signals lock")
    }
}
