//! The state machine of one cell: the real ledger, the shadow ledger and the
//! shard map, driven by a batch of commands in order, deterministically.
//!
//! Same start state + same commands = same end state and same answers, which
//! is what lets the store log commands and recovery replay them.

use crate::command::{Command, Op, Outcome, Query, QueryAnswer};
use crate::error::{ErrorCode, Rejection};
use crate::ids::CellId;
use crate::ledger::{Admission, Ledger, Limits, Place};
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
        }
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
            op => self.apply_to_ledger(cmd.shadow, op, admission, older),
        };
        if outcome.changed_state() {
            self.applied += 1;
        }
        outcome
    }

    fn install_shard_map(&mut self, next: &ShardMap) -> Outcome {
        match self.map.check_successor(next) {
            Ok(()) => {
                self.map = next.clone();
                Outcome::ShardMapInstalled { epoch: next.epoch() }
            }
            Err(e) => Outcome::rejected(ErrorCode::InvalidRequest, e.to_string()),
        }
    }

    fn apply_to_ledger(&mut self, shadow: bool, op: &Op, admission: &Admission, older: &dyn OlderRecords) -> Outcome {
        let place = Place { cell: self.cell, map: &self.map, admission, clock_ms: self.clock_ms, shadow, older };
        let ledger = if shadow { &mut self.shadow } else { &mut self.real };
        match op {
            Op::OpenAccount(o) => ledger.open_account(&place, o),
            Op::Transfer(t) => ledger.transfer(&place, t),
            Op::Credit(c) => ledger.credit(&place, c),
            Op::Settle { dest, seq } => ledger.settle(*dest, *seq),
            Op::Compensate { dest, seq, .. } => ledger.compensate(&place, *dest, *seq),
            Op::InstallShardMap(_) => unreachable!("handled by apply"),
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
                QueryAnswer::Transfers(self.ledger(*shadow).transfers(id, from.as_ref(), by))
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
            Query::Audit { shadow } => QueryAnswer::Audit(self.ledger(*shadow).audit(self.cell)),
            Query::Figures { shadow } => QueryAnswer::Figures(self.ledger(*shadow).figures()),
            Query::InboxAt { shadow, asked } => QueryAnswer::InboxAt(self.ledger(*shadow).inbox_at(asked)),
            Query::OutboxAt { shadow, asked } => QueryAnswer::OutboxAt(self.ledger(*shadow).outbox_at(asked)),
            Query::Outbox { shadow, dest, after_seq, limit } => {
                QueryAnswer::Outbox(self.ledger(*shadow).outbox_messages(*dest, *after_seq, *limit))
            }
        }
    }
}
