//! The state machine of one cell: the real ledger, the shadow ledger and the
//! shard map, driven by a batch of commands in order, deterministically.
//!
//! Same start state + same commands = same end state and same answers, which
//! is what lets the store log commands and recovery replay them.

use std::collections::BTreeMap;

use crate::audit::LedgerFigures;
use crate::command::{Command, Op, Outcome, Query, QueryAnswer};
use crate::error::{ErrorCode, Rejection};
use crate::ids::CellId;
use crate::ledger::{Admission, Ledger, Limits, Place};
use crate::moves::{MoveRecord, ShardExport, FROZEN_SHARDS_MAX};
use crate::older::{NoOlder, OldRecord, OlderRecords};
use crate::shard::ShardMap;

/// The most entries one history page may return (I7).
pub const ENTRIES_PAGE_MAX: usize = 1000;

/// Where [`CellState::copy_out`] left each ledger: its round, and the
/// sequence number through which each ledger's records are copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyMarks {
    pub round: u64,
    pub real: u64,
    pub shadow: u64,
}

/// Everything one cell knows.
#[derive(Debug, Clone, PartialEq)]
pub struct CellState {
    pub(crate) cell: CellId,
    pub(crate) map: ShardMap,
    pub(crate) real: Ledger,
    pub(crate) shadow: Ledger,
    /// Commands applied since the cell was created (rejections excluded).
    pub(crate) applied: u64,
    /// The cell's clock, Unix milliseconds: the newest logged batch's clock
    /// (never the wall clock read here), so replay gives records the same times.
    pub(crate) clock_ms: u64,
    /// Shards frozen here for a move: shard → (move id, destination).
    pub(crate) frozen: BTreeMap<u32, (u64, CellId)>,
    /// Shards that moved away from here: shard → (destination, move id).
    /// A credit still on its way for one is refused `shard_moved`.
    pub(crate) moved_away: BTreeMap<u32, (CellId, u64)>,
    /// Shards installed here for a move that no map has decided yet: shard → move id.
    pub(crate) arrived: BTreeMap<u32, u64>,
    /// Commands that changed each shard since the cell started (both
    /// ledgers): the measured load a rebalance weighs shards by.
    pub(crate) load: ShardLoad,
}

/// Commands per shard since the cell started: a measure, not state (not in
/// a snapshot, not compared).
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardLoad(pub Vec<u64>);

impl PartialEq for ShardLoad {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl CellState {
    pub fn new(cell: CellId, map: ShardMap, limits: Limits) -> Self {
        let shards = map.shards();
        Self {
            cell,
            map,
            real: Ledger::new(limits, shards),
            shadow: Ledger::new(limits, shards),
            applied: 0,
            clock_ms: 0,
            frozen: BTreeMap::new(),
            moved_away: BTreeMap::new(),
            arrived: BTreeMap::new(),
            load: ShardLoad(vec![0; shards as usize]),
        }
    }

    /// A ledger's audit figures as kept, with the records of the shards
    /// frozen here for a move as they stand (O(accounts) only during a move).
    pub fn figures(&self, shadow: bool) -> LedgerFigures {
        let ledger = self.ledger(shadow);
        let mut figures = ledger.figures();
        figures.frozen = self
            .frozen
            .iter()
            .map(|(&shard, &(id, to))| {
                let (accounts, net) = ledger.shard_net(shard);
                MoveRecord { id, shard, from: self.cell, to, accounts, net, digest: ledger.shard_digest(shard) }
            })
            .collect();
        figures.arrived =
            self.arrived.iter().filter_map(|(&shard, &id)| ledger.moves.find(id, shard)).copied().collect();
        figures
    }

    /// The shards frozen here for a move: shard → (move id, destination).
    pub fn frozen_shards(&self) -> &BTreeMap<u32, (u64, CellId)> {
        &self.frozen
    }

    /// Shards that moved away: shard → (destination, move id).
    pub fn moved_away(&self) -> &BTreeMap<u32, (CellId, u64)> {
        &self.moved_away
    }

    pub fn cell(&self) -> CellId {
        self.cell
    }

    pub fn shard_map(&self) -> &ShardMap {
        &self.map
    }

    pub fn ledger(&self, shadow: bool) -> &Ledger {
        if shadow {
            &self.shadow
        } else {
            &self.real
        }
    }

    /// Commands that changed state since the cell was created.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Ends a batch: the oldest transfer records beyond the memory limit
    /// leave memory (to `take_spilled` when spilling). The engine calls it
    /// after each batch and replay after each logged batch, so both move the
    /// same records at the same points.
    pub fn end_batch(&mut self) {
        self.real.trim_records();
        self.shadow.trim_records();
    }

    /// Ends a batch in a cell with a disk tier, in two steps: this copies the
    /// records beyond the memory limit out (`take_spilled`) and leaves them in
    /// memory; it answers the marks to pass to [`CellState::release`] once
    /// the tier's readers can see what it copied.
    pub fn copy_out(&mut self) -> CopyMarks {
        let real = self.real.copy_out();
        let shadow = self.shadow.copy_out();
        debug_assert_eq!(self.real.copy_round, self.shadow.copy_round);
        CopyMarks { round: self.real.copy_round, real, shadow }
    }

    /// Drops from memory the records copied out up to `marks`.
    pub fn release(&mut self, marks: CopyMarks) {
        self.real.release_records(marks.real, marks.round);
        self.shadow.release_records(marks.shadow, marks.round);
    }

    /// Records what the real ledger's batches change, for a projection (see
    /// `Ledger::take_touched`); shadow traffic is not projected.
    pub fn set_touched(&mut self, on: bool) {
        self.real.set_touched(on);
    }

    /// What the real ledger changed since the last call; before `end_batch`.
    pub fn take_touched(&mut self) -> crate::ledger::Touched {
        self.real.take_touched()
    }

    /// The real ledger's accounts and in-memory transfers, for a projection's resync.
    pub fn everything(&self) -> crate::ledger::Touched {
        self.real.everything()
    }

    /// Hands records that leave memory to a disk tier (both ledgers): see `take_spilled`.
    pub fn set_spill(&mut self, spill: bool) {
        self.real.set_spill(spill);
        self.shadow.set_spill(spill);
    }

    /// Records that left memory since the last call: (shadow, record), oldest first per ledger.
    pub fn take_spilled(&mut self) -> (Vec<OldRecord>, Vec<OldRecord>) {
        (self.real.take_spilled(), self.shadow.take_spilled())
    }

    /// The cell's clock (Unix milliseconds), as of its newest batch.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Moves the clock to `now_ms` for the next batch, never backwards (a
    /// wall clock that steps back leaves it where it was), and answers the
    /// clock the batch runs at: the engine logs that value with the batch,
    /// and replay passes it back here.
    pub fn advance_clock(&mut self, now_ms: u64) -> u64 {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.clock_ms
    }

    /// Applies one command with no admission limits (tests). A rejected
    /// command leaves the state exactly as it was.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        self.admit(cmd, &Admission::UNLIMITED)
    }

    /// Applies one logged command again (recovery). It was admitted once, so
    /// it applies without admission limits and without the idempotency
    /// lookup: a logged transfer was new when it was logged, whatever part of
    /// the records (memory or disk) a lookup could reach now.
    pub fn replay(&mut self, cmd: &Command) -> Outcome {
        self.admit(cmd, &Admission::REPLAY)
    }

    /// Applies one new command under the admission limits in force.
    pub fn admit(&mut self, cmd: &Command, admission: &Admission) -> Outcome {
        self.admit_with(cmd, admission, &NoOlder)
    }

    /// Applies one new command under the admission limits in force; a
    /// transfer whose key is not in memory asks `older`, the records outside
    /// memory looked up for this batch before it ran.
    pub fn admit_with(&mut self, cmd: &Command, admission: &Admission, older: &dyn OlderRecords) -> Outcome {
        let outcome = match &cmd.op {
            Op::InstallShardMap(next) => self.install_shard_map(next),
            Op::FreezeShard { shard, move_id, to } => self.freeze_shard(*shard, *move_id, *to),
            Op::UnfreezeShard { shard, move_id } => self.unfreeze_shard(*shard, *move_id),
            Op::InstallShard(export) => self.install_shard(export),
            Op::DiscardShard { shard, move_id } => self.discard_shard(*shard, *move_id),
            Op::DropShard { shard, move_id } => self.drop_shard(*shard, *move_id),
            op => self.apply_to_ledger(cmd.shadow, op, admission, older),
        };
        if outcome.changed_state() {
            self.applied += 1;
            let account = match &cmd.op {
                Op::Transfer(t) => Some(&t.from),
                Op::Credit(c) => Some(&c.to),
                Op::OpenAccount(o) => Some(&o.id),
                _ => None,
            };
            if let Some(id) = account {
                let shard = self.map.shard_of(id.as_str()).0 as usize;
                if let Some(n) = self.load.0.get_mut(shard) {
                    *n += 1;
                }
            }
        }
        outcome
    }

    fn install_shard_map(&mut self, next: &ShardMap) -> Outcome {
        match self.map.check_successor(next) {
            Ok(()) => {
                self.map = next.clone();
                self.settle_moves();
                Outcome::ShardMapInstalled { epoch: next.epoch() }
            }
            Err(e) => Outcome::rejected(ErrorCode::InvalidRequest, e.to_string()),
        }
    }

    /// The map decides every move numbered up to its epoch: the epoch a
    /// move installs is won by compare-and-set, by the move's map (the shard
    /// goes) or by another (it stays). A shard frozen here for a move can
    /// leave this cell by that move only (another move would have to freeze
    /// it here first), so a map at or past the move's epoch that names
    /// another owner says the move won, even when this cell missed the
    /// move's own map: the shard leaves (its messages in flight were closed
    /// before the export the destination installed). One the map leaves
    /// here serves again. A shard installed here that the map does not give to this
    /// cell is undone. So a cell that recovers, or that no coordinator told,
    /// finishes its part of a move from the map alone.
    fn settle_moves(&mut self) {
        let decided: Vec<(u32, u64, CellId)> = self
            .frozen
            .iter()
            .filter(|(_, &(id, _))| id <= self.map.epoch())
            .map(|(&shard, &(id, to))| (shard, id, to))
            .collect();
        for (shard, id, to) in decided {
            let owner = self.map.owner(crate::shard::ShardId(shard));
            if owner != self.cell && self.open_messages_of(shard) == 0 {
                let record = MoveRecord { id, shard, from: self.cell, to, accounts: 0, net: 0, digest: 0 };
                self.real.drop_shard(record);
                self.shadow.drop_shard(record);
                self.moved_away.insert(shard, (to, id));
            }
            // Still here: the move lost its epoch, the shard serves again.
            self.frozen.remove(&shard);
        }
        let arrived: Vec<(u32, u64)> =
            self.arrived.iter().filter(|(_, &id)| id <= self.map.epoch()).map(|(&s, &id)| (s, id)).collect();
        for (shard, id) in arrived {
            if self.map.owner(crate::shard::ShardId(shard)) == self.cell {
                self.moved_away.remove(&shard);
            } else {
                self.real.discard_shard(id, shard);
                self.shadow.discard_shard(id, shard);
            }
            self.arrived.remove(&shard);
        }
    }

    fn check_shard(&self, shard: u32) -> Result<(), Outcome> {
        if shard >= self.map.shards() {
            let msg = format!("shard {shard} does not exist (the cluster has {} shards)", self.map.shards());
            return Err(Outcome::rejected(ErrorCode::InvalidRequest, msg));
        }
        Ok(())
    }

    /// Messages of the shard's payers still in flight, both ledgers.
    fn open_messages_of(&self, shard: u32) -> u64 {
        let shards = self.map.shards();
        self.real.open_messages_of(shard, shards) + self.shadow.open_messages_of(shard, shards)
    }

    fn freeze_shard(&mut self, shard: u32, move_id: u64, to: CellId) -> Outcome {
        if let Err(refusal) = self.check_shard(shard) {
            return refusal;
        }
        if let Some(&(id, dest)) = self.frozen.get(&shard) {
            if (id, dest) == (move_id, to) {
                return Outcome::MoveStep { open_messages: self.open_messages_of(shard), duplicate: true };
            }
            let msg = format!("shard {shard} is frozen for move {id} to cell {dest}");
            return Outcome::rejected(ErrorCode::Conflict, msg);
        }
        let owner = self.map.owner(crate::shard::ShardId(shard));
        if owner != self.cell {
            let msg = format!("shard {shard} is owned by cell {owner} at epoch {}", self.map.epoch());
            return Outcome::rejected(ErrorCode::WrongCell, msg);
        }
        if to == self.cell || move_id <= self.map.epoch() {
            let msg = format!(
                "a move of shard {shard} goes to another cell and installs an epoch above {} (got cell {to}, epoch {move_id})",
                self.map.epoch()
            );
            return Outcome::rejected(ErrorCode::InvalidRequest, msg);
        }
        if self.frozen.len() >= FROZEN_SHARDS_MAX {
            let msg = format!("{FROZEN_SHARDS_MAX} shards are frozen here already: moves go a few at a time");
            return Outcome::rejected(ErrorCode::Overloaded, msg);
        }
        // Commit point.
        self.frozen.insert(shard, (move_id, to));
        Outcome::MoveStep { open_messages: self.open_messages_of(shard), duplicate: false }
    }

    fn unfreeze_shard(&mut self, shard: u32, move_id: u64) -> Outcome {
        match self.frozen.get(&shard) {
            Some(&(id, _)) if id == move_id => {
                self.frozen.remove(&shard);
                Outcome::MoveStep { open_messages: 0, duplicate: false }
            }
            _ => Outcome::MoveStep { open_messages: 0, duplicate: true },
        }
    }

    fn install_shard(&mut self, export: &ShardExport) -> Outcome {
        if let Err(refusal) = self.check_shard(export.shard) {
            return refusal;
        }
        if self.real.moves.find(export.move_id, export.shard).is_some() {
            return Outcome::MoveStep { open_messages: 0, duplicate: true };
        }
        if export.move_id <= self.map.epoch() {
            // A late delivery: a map has decided the move's epoch already (without it).
            let msg = format!(
                "move {} of shard {} is decided by the map at epoch {}",
                export.move_id,
                export.shard,
                self.map.epoch()
            );
            return Outcome::rejected(ErrorCode::InvalidRequest, msg);
        }
        let owner = self.map.owner(crate::shard::ShardId(export.shard));
        if export.to != self.cell || owner == self.cell || export.from == self.cell {
            let msg = format!(
                "shard {} moving from cell {} to cell {} cannot be installed at cell {} (its map names cell {owner})",
                export.shard, export.from, export.to, self.cell
            );
            return Outcome::rejected(ErrorCode::InvalidRequest, msg);
        }
        let shards = self.map.shards();
        // Both ledgers are checked before either changes (a rejection changes nothing).
        for shadow in [false, true] {
            if let Err(why) = self.ledger(shadow).check_install(export.ledger(shadow), export.shard, shards) {
                return Outcome::rejected(ErrorCode::InvalidRequest, why);
            }
        }
        // Commit point.
        for shadow in [false, true] {
            let record = export.record(shadow);
            let ledger = if shadow { &mut self.shadow } else { &mut self.real };
            ledger.install_shard(export.ledger(shadow), record, shards);
        }
        // `moved_away` stays until a map gives this cell the shard: undecided,
        // a credit still on its way here for it is refused and goes on.
        self.arrived.insert(export.shard, export.move_id);
        Outcome::MoveStep { open_messages: 0, duplicate: false }
    }

    fn discard_shard(&mut self, shard: u32, move_id: u64) -> Outcome {
        if self.map.owner(crate::shard::ShardId(shard.min(self.map.shards() - 1))) == self.cell {
            let msg = format!("shard {shard} is served here at epoch {}: its move happened", self.map.epoch());
            return Outcome::rejected(ErrorCode::Conflict, msg);
        }
        if self.real.moves.find(move_id, shard).is_none_or(|r| r.to != self.cell) {
            return Outcome::MoveStep { open_messages: 0, duplicate: true };
        }
        // Commit point.
        self.real.discard_shard(move_id, shard);
        self.shadow.discard_shard(move_id, shard);
        self.arrived.remove(&shard);
        Outcome::MoveStep { open_messages: 0, duplicate: false }
    }

    fn drop_shard(&mut self, shard: u32, move_id: u64) -> Outcome {
        if let Err(refusal) = self.check_shard(shard) {
            return refusal;
        }
        let Some(&(id, to)) = self.frozen.get(&shard) else {
            if self.real.moves.find(move_id, shard).is_some_and(|r| r.from == self.cell) {
                return Outcome::MoveStep { open_messages: 0, duplicate: true };
            }
            return Outcome::rejected(ErrorCode::InvalidRequest, format!("shard {shard} is not frozen for a move"));
        };
        let owner = self.map.owner(crate::shard::ShardId(shard));
        if id != move_id || self.map.epoch() < move_id || owner != to {
            let msg = format!(
                "shard {shard} is frozen for move {id} to cell {to}; at epoch {} the map names cell {owner}",
                self.map.epoch()
            );
            return Outcome::rejected(ErrorCode::InvalidRequest, msg);
        }
        let open = self.open_messages_of(shard);
        if open > 0 {
            let msg = format!("shard {shard} still has {open} messages in flight");
            return Outcome::rejected(ErrorCode::InvalidRequest, msg);
        }
        // Commit point.
        let record = MoveRecord { id, shard, from: self.cell, to, accounts: 0, net: 0, digest: 0 };
        self.real.drop_shard(record);
        self.shadow.drop_shard(record);
        self.frozen.remove(&shard);
        self.moved_away.insert(shard, (to, move_id));
        Outcome::MoveStep { open_messages: 0, duplicate: false }
    }

    /// The export of a frozen shard whose payers' messages are all closed.
    fn export_shard(&self, shard: u32) -> QueryAnswer {
        let Some(&(move_id, to)) = self.frozen.get(&shard) else {
            return QueryAnswer::Rejected(crate::moves::export_not_frozen(shard));
        };
        let open = self.open_messages_of(shard);
        if open > 0 {
            let msg = format!("shard {shard} still has {open} messages in flight");
            return QueryAnswer::Rejected(Rejection::new(ErrorCode::ShardFrozen, msg));
        }
        QueryAnswer::ShardExport(Box::new(ShardExport {
            shard,
            move_id,
            from: self.cell,
            to,
            real: self.real.export_shard(shard),
            shadow: self.shadow.export_shard(shard),
        }))
    }

    fn apply_to_ledger(&mut self, shadow: bool, op: &Op, admission: &Admission, older: &dyn OlderRecords) -> Outcome {
        let place = Place {
            cell: self.cell,
            map: &self.map,
            admission,
            clock_ms: self.clock_ms,
            shadow,
            older,
            frozen: &self.frozen,
            moved_away: &self.moved_away,
        };
        let ledger = if shadow { &mut self.shadow } else { &mut self.real };
        match op {
            Op::OpenAccount(o) => ledger.open_account(&place, o),
            Op::Transfer(t) => ledger.transfer(&place, t),
            Op::Credit(c) => ledger.credit(&place, c),
            Op::Settle { dest, seq } => ledger.settle(*dest, *seq),
            Op::Compensate { dest, seq, reason } => ledger.compensate(&place, *dest, *seq, *reason),
            Op::InstallShardMap(_)
            | Op::FreezeShard { .. }
            | Op::UnfreezeShard { .. }
            | Op::InstallShard(_)
            | Op::DiscardShard { .. }
            | Op::DropShard { .. } => unreachable!("handled by apply"),
        }
    }

    /// Applies a batch in order, answers each command, and ends the batch.
    pub fn apply_batch(&mut self, cmds: &[Command]) -> Vec<Outcome> {
        let outcomes = cmds.iter().map(|c| self.apply(c)).collect();
        self.end_batch();
        outcomes
    }

    /// Answers a read-only query.
    pub fn query(&self, q: &Query) -> QueryAnswer {
        // The refusal for an account this cell does not own at its epoch (I6).
        let fenced = |id: &str| {
            let owner = self.map.owner_of(id);
            (owner != self.cell).then(|| {
                let epoch = self.map.epoch();
                let msg = format!("account {id} is owned by cell {owner} at epoch {epoch}");
                QueryAnswer::Rejected(Rejection::new(ErrorCode::WrongCell, msg))
            })
        };
        let not_found = |id: &dyn std::fmt::Display| {
            QueryAnswer::Rejected(Rejection::new(ErrorCode::AccountNotFound, format!("account {id} not found")))
        };
        let forbidden = |id: &dyn std::fmt::Display| {
            let msg = format!("account {id} belongs to another tenant");
            QueryAnswer::Rejected(Rejection::new(ErrorCode::Forbidden, msg))
        };
        match q {
            Query::Account { shadow, id, by } => {
                if let Some(refusal) = fenced(id.as_str()) {
                    return refusal;
                }
                match self.ledger(*shadow).account_for(id, by) {
                    Ok(view) => QueryAnswer::Account(view),
                    Err(true) => forbidden(id),
                    Err(false) => not_found(id),
                }
            }
            Query::Transfer { shadow, id, from, by } => {
                if let Some(from) = from {
                    if let Some(refusal) = fenced(from.as_str()) {
                        return refusal;
                    }
                    if self.ledger(*shadow).account_for(from, by) == Err(true) {
                        return forbidden(from);
                    }
                }
                // Asked without the payer, every cell is asked: each answers
                // only for the payers it owns at its epoch, so that a shard
                // arrived here but not yet owned (or frozen on its way out)
                // is answered once, by its owner.
                let mut found = self.ledger(*shadow).transfers(id, from.as_ref(), by);
                found.retain(|t| self.map.owner_of(t.from.as_str()) == self.cell);
                QueryAnswer::Transfers(found)
            }
            Query::Entries { shadow, account, limit, before, by } => {
                if let Some(refusal) = fenced(account.as_str()) {
                    return refusal;
                }
                if *limit == 0 || *limit > ENTRIES_PAGE_MAX {
                    let msg = format!("limit must be between 1 and {ENTRIES_PAGE_MAX}");
                    return QueryAnswer::Rejected(Rejection::new(ErrorCode::InvalidRequest, msg));
                }
                let ledger = self.ledger(*shadow);
                match ledger.account_for(account, by) {
                    Ok(_) => {}
                    Err(true) => return forbidden(account),
                    Err(false) => return not_found(account),
                }
                ledger.entries(account, *limit, *before).map_or_else(|| not_found(account), QueryAnswer::Entries)
            }
            Query::Digests { shadow } => {
                QueryAnswer::Digests { epoch: self.map.epoch(), digests: self.ledger(*shadow).digests().to_vec() }
            }
            Query::Audit { shadow } => {
                let mut audit = self.ledger(*shadow).audit(self.cell);
                let figures = self.figures(*shadow);
                (audit.figures.frozen, audit.figures.arrived) = (figures.frozen, figures.arrived);
                QueryAnswer::Audit(audit)
            }
            Query::Figures { shadow } => QueryAnswer::Figures(self.figures(*shadow)),
            Query::ExportShard { shard, .. } => self.export_shard(*shard),
            // A cell without a disk tier has no records outside memory to copy.
            Query::TierPage { .. } => QueryAnswer::TierPage(Box::default()),
            Query::TierImport { .. } => QueryAnswer::Rejected(Rejection::new(
                ErrorCode::InvalidRequest,
                "this cell keeps no disk tier of idempotency records",
            )),
            Query::ShardLoad => QueryAnswer::ShardLoad(self.load.0.clone()),
            Query::InboxAt { shadow, asked } => QueryAnswer::InboxAt(self.ledger(*shadow).inbox_at(asked)),
            Query::OutboxAt { shadow, asked } => QueryAnswer::OutboxAt(self.ledger(*shadow).outbox_at(asked)),
            Query::Outbox { shadow, dest, after_seq, limit } => {
                QueryAnswer::Outbox(self.ledger(*shadow).outbox_messages(*dest, *after_seq, *limit))
            }
        }
    }
}
