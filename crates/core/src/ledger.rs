//! One ledger (real or shadow) of one cell: accounts, transfer records, history,
//! outbox and inbox, and the per-shard digests.
//!
//! Every method here either changes state completely or not at all: all checks
//! run before the first mutation ("commit point"), so a rejection never leaves
//! a trace (DESIGN.md section 2, "bad input changes nothing").

use std::collections::{BTreeMap, HashMap, VecDeque};

use foldhash::fast::RandomState;

use crate::audit::{
    Finding, InboxAt, InboxFigures, InboxPrefix, LedgerAudit, LedgerFigures, OutboxAt, OutboxFigures, SentPrefix,
    INBOX_TAIL_RETAINED,
};
use crate::command::{
    AccountView, Authority, Credit, EntryKind, EntryView, OpenAccount, OutboxMessage, Outcome, Transfer,
    TransferStatus, TransferView, MEMO_BYTES_MAX,
};
use crate::digest;
use crate::error::ErrorCode;
use crate::ids::{AccountId, CellId, TenantId, TransferId};
use crate::money::{amount_is_valid, Currency, AMOUNT_MAX};
use crate::older::{OldRecord, OlderRecords};
use crate::shard::{stable_hash, ShardMap};

/// Retention limits of one ledger (I7). Both are counted in items, not time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Transfer records kept for idempotency and status; the oldest is dropped
    /// first. A retry of a transfer older than this is treated as new.
    pub transfers_retained_max: usize,
    /// History entries kept for the entries endpoint, over all accounts.
    pub history_entries_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { transfers_retained_max: 1 << 20, history_entries_max: 1 << 20 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub balance: i64,
    pub overdraft: bool,
    /// Its tenant, as a position in the ledger's tenant table (an account
    /// stays one cache line; tenants are few).
    pub tenant: u32,
    pub shard: u32,
    pub id_hash: u64,
    /// Sequence number + 1 of this account's newest history entry, 0 for none.
    pub history_head: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct TransferRecord {
    pub id: TransferId,
    /// The payer is always an account of this ledger.
    pub from: u32,
    pub to: AccountRef,
    pub amount: i64,
    pub currency: Currency,
    /// The currency as the client sent it (part of the idempotency body).
    pub currency_given: Option<Currency>,
    pub memo_hash: u64,
    pub status: TransferStatus,
    /// The cell's clock when the transfer was accepted, in Unix seconds
    /// rounded up (4 bytes: a record stays small; rounding up can only make
    /// the window a little longer, never shorter).
    pub at_s: u32,
    /// Sequence number + 1 of the newest earlier record with the same id (a
    /// transfer id is unique per payer, not per cell), 0 for none.
    pub same_id_prev: u64,
    /// The `copy_out` round that copied it out to the disk tier (mod 2^32),
    /// 0 for not yet; not part of a snapshot.
    pub copied_at: u32,
}

impl TransferRecord {
    pub fn at_ms(&self) -> u64 {
        u64::from(self.at_s) * 1000
    }
}

impl PartialEq for TransferRecord {
    /// Equal as records: whether one was copied out yet is bookkeeping, not state.
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
            && self.from == o.from
            && self.to == o.to
            && self.amount == o.amount
            && self.currency == o.currency
            && self.currency_given == o.currency_given
            && self.memo_hash == o.memo_hash
            && self.status == o.status
            && self.at_s == o.at_s
            && self.same_id_prev == o.same_id_prev
    }
}

impl Eq for TransferRecord {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub account: u32,
    /// Sequence number + 1 of the same account's previous entry, 0 for none.
    pub prev: u64,
    pub transfer: TransferId,
    pub counterparty: AccountRef,
    pub kind: EntryKind,
    pub amount: i64,
    pub balance_after: i64,
}

/// An account named by a record or entry: an index into this ledger's
/// accounts when it lives here (no string to copy, store or compare), its id
/// when it lives in another cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AccountRef {
    Local(u32),
    Remote(AccountId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxEntry {
    pub record_seq: u64,
    /// Σ amounts sent to this destination through this message.
    pub sent_through: i128,
    /// The chain over the messages sent to this destination through this one.
    pub sent_chain: u64,
    pub transfer: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
}

impl OutboxEntry {
    fn digest(&self) -> u64 {
        digest::message(&self.transfer, &self.from, &self.to, self.amount, self.currency)
    }
}

/// The stream of credits to one destination cell. Messages are closed
/// (settled or compensated) in sequence order, so everything up to
/// `figures.closed_through` is closed and everything after it is in `entries`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Outbox {
    pub figures: OutboxFigures,
    pub entries: BTreeMap<u64, OutboxEntry>,
}

/// What a payee cell remembers of one applied (or refused) sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboxMark {
    pub digest: u64,
    pub amount: i64,
    pub refused: Option<ErrorCode>,
    /// The chain digest through this sequence.
    pub chain: u64,
}

/// The stream of credits from one source cell, applied in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Inbox {
    pub figures: InboxFigures,
    /// The last [`INBOX_TAIL_RETAINED`] sequences, oldest first; the last is `applied_through`.
    pub tail: VecDeque<InboxMark>,
}

impl Inbox {
    /// Folds sequence `applied_through + 1` in.
    fn push(&mut self, digest: u64, amount: i64, refused: Option<ErrorCode>) {
        let f = &mut self.figures;
        f.applied_through += 1;
        f.chain = digest::chain_link(f.chain, digest, refused.is_some());
        f.message_chain = digest::chain_link(f.message_chain, digest, false);
        match refused {
            None => f.received += i128::from(amount),
            Some(_) => f.refused += i128::from(amount),
        }
        self.tail.push_back(InboxMark { digest, amount, refused, chain: f.chain });
        if self.tail.len() > INBOX_TAIL_RETAINED {
            self.tail.pop_front();
        }
    }

    /// The mark of an applied sequence, if it is still in the tail.
    fn mark(&self, seq: u64) -> Option<&InboxMark> {
        let back = self.figures.applied_through.checked_sub(seq)?;
        let back = usize::try_from(back).ok()?;
        self.tail.len().checked_sub(back + 1).map(|i| &self.tail[i])
    }

    /// The figures over sequences 1..=seq, if this inbox can still tell them.
    fn prefix(&self, seq: u64) -> Option<InboxPrefix> {
        let f = &self.figures;
        if seq > f.applied_through {
            return None;
        }
        let chain = match seq {
            0 if f.applied_through > self.tail.len() as u64 => return None, // the sums before the tail are not kept
            0 => 0,
            s => self.mark(s)?.chain,
        };
        let (mut received, mut refused) = (f.received, f.refused);
        let newer = (f.applied_through - seq) as usize;
        for m in self.tail.iter().rev().take(newer) {
            match m.refused {
                None => received -= i128::from(m.amount),
                Some(_) => refused -= i128::from(m.amount),
            }
        }
        Some(InboxPrefix { seq, received, refused, chain })
    }
}

/// Room the ring of transfer records keeps beyond its limit: a batch, and the
/// records a disk tier's readers may still need (about a queue's worth).
const RECORDS_OVER_LIMIT_RESERVED: usize = 1 << 17;

/// A `copy_out` round as a record keeps it: mod 2^32, never 0 (0 is "not copied").
fn round_tag(round: u64) -> u32 {
    (round as u32).max(1)
}

/// Where the ledger lives: which cell it is and who owns which shard.
pub(crate) struct Place<'a> {
    pub cell: CellId,
    pub map: &'a ShardMap,
    /// Admission limits for new commands (replay passes none: what was logged applies again).
    pub admission: &'a Admission,
    /// The cell's clock for this batch (Unix milliseconds).
    pub clock_ms: u64,
    /// Which ledger this is, for the lookups below.
    pub shadow: bool,
    /// Records outside memory, looked up for this batch before it ran.
    pub older: &'a dyn OlderRecords,
    /// Shards frozen in this cell for a move: shard → (move id, destination).
    pub frozen: &'a BTreeMap<u32, (u64, CellId)>,
    /// Shards that moved away from this cell: shard → (destination, move id).
    pub moved_away: &'a BTreeMap<u32, (CellId, u64)>,
}

/// Limits that apply when a command is first admitted, and not when the log
/// is replayed: a command that was admitted and logged must apply again,
/// whatever the limits are by then (they are flow rules, changed live).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Undelivered cross-cell credits per destination cell (and ledger);
    /// past it a cross-cell transfer is refused with `outbox_full` (I7). A
    /// credit a shard move reroutes is not refused (it was admitted within
    /// the limit of the stream it leaves), so an outbox may hold this many
    /// plus the credits rerouted into it: at most this many per other cell.
    pub outbox_messages_max: u64,
    /// The idempotency window promised to clients, in milliseconds: a retry
    /// finds its transfer's record while the record is younger than this (and
    /// still held); an older record counts as gone.
    pub idempotency_window_ms: u64,
    /// False on replay: a logged transfer was new when it was admitted, so it
    /// is applied without looking for an earlier record.
    pub lookup: bool,
}

impl Admission {
    /// No limit: for tests that do not exercise admission.
    pub const UNLIMITED: Admission =
        Admission { outbox_messages_max: u64::MAX, idempotency_window_ms: u64::MAX, lookup: true };
    /// Replay of the log: no limit, no idempotency lookup.
    pub const REPLAY: Admission =
        Admission { outbox_messages_max: u64::MAX, idempotency_window_ms: u64::MAX, lookup: false };
}

/// How far back a ledger's idempotency records reach: what `/metrics`, the
/// dashboard and the readiness report call the window held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdempotencyReach {
    /// Records held in memory.
    pub records_held: u64,
    /// Records that have left memory (and, with no disk tier, the window).
    pub records_dropped: u64,
    /// The time of the oldest record held (Unix milliseconds).
    pub oldest_at_ms: Option<u64>,
}

impl IdempotencyReach {
    /// The window this ledger holds at `clock_ms` against the promise: the
    /// whole promise while no record has been dropped, else the age of the
    /// oldest record still held, if that is shorter.
    pub fn window_held_ms(&self, clock_ms: u64, promised_ms: u64) -> u64 {
        match (self.records_dropped, self.oldest_at_ms) {
            (0, _) => promised_ms,
            (_, None) => 0,
            (_, Some(oldest)) => promised_ms.min(clock_ms.saturating_sub(oldest)),
        }
    }
}

/// The default idempotency window: a day, as payment APIs promise.
pub const IDEMPOTENCY_WINDOW_MS_DEFAULT: u64 = 24 * 3600 * 1000;

impl Place<'_> {
    fn owns(&self, id: &AccountId) -> bool {
        self.map.owner_of(id.as_str()) == self.cell
    }

    /// Is `id`'s shard frozen here for a move?
    fn frozen(&self, id: &AccountId) -> bool {
        !self.frozen.is_empty() && self.frozen.contains_key(&self.map.shard_of(id.as_str()).0)
    }

    fn frozen_refusal(&self, id: &AccountId) -> Outcome {
        let shard = self.map.shard_of(id.as_str()).0;
        Outcome::rejected(
            ErrorCode::ShardFrozen,
            format!("shard {shard} of account {id} is frozen for a move to another cell: try again in a moment"),
        )
    }

    fn wrong_cell(&self, id: &AccountId) -> Outcome {
        let owner = self.map.owner_of(id.as_str());
        Outcome::rejected(
            ErrorCode::WrongCell,
            format!("account {id} is owned by cell {owner} at epoch {}", self.map.epoch()),
        )
    }
}

/// One ledger: all state of one kind (real or shadow) in one cell.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub(crate) limits: Limits,
    pub(crate) accounts: Vec<Account>,
    pub(crate) index: HashMap<AccountId, u32, RandomState>,
    /// The tenants accounts belong to, in the order first seen; accounts name them by position.
    pub(crate) tenants: Vec<TenantId>,
    pub(crate) tenant_index: HashMap<TenantId, u32, RandomState>,
    pub(crate) records: VecDeque<TransferRecord>,
    /// Whether `records` has its full capacity (see `push_record`).
    pub(crate) records_reserved: bool,
    pub(crate) records_first_seq: u64,
    pub(crate) record_index: HashMap<TransferId, u64, RandomState>,
    /// Records that left memory while their transfer was still pending, by
    /// key (id, payer): they stay until it closes (bounded by the outboxes).
    pub(crate) evicted_pending: HashMap<(TransferId, u32), TransferRecord, RandomState>,
    /// The same records by sequence number, for the settle or compensate that closes them.
    pub(crate) evicted_pending_seq: HashMap<u64, (TransferId, u32), RandomState>,
    /// True when records that leave memory are handed out (`take_spilled`) to a disk tier.
    pub(crate) spill: bool,
    /// Records copied out since the last `take_spilled`, closed, oldest first.
    pub(crate) spilled: Vec<OldRecord>,
    /// Records before this sequence number are copied out (or were pending then).
    pub(crate) copied_through: u64,
    /// `copy_out` rounds so far.
    pub(crate) copy_round: u64,
    pub(crate) history: VecDeque<Entry>,
    pub(crate) history_first_seq: u64,
    pub(crate) outbox: BTreeMap<CellId, Outbox>,
    pub(crate) inbox: BTreeMap<CellId, Inbox>,
    pub(crate) digests: Vec<u64>,
    /// Σ balances, kept with every change (checked against a walk by `audit`).
    pub(crate) balance_sum: i128,
    /// Accounts without overdraft below zero, kept with every change (I4).
    pub(crate) negative_accounts: u64,
    /// What changed since the last `take_touched`, when a projection asks
    /// (`set_touched`); not state: neither in a snapshot nor compared.
    pub(crate) touched: Option<TouchedMarks>,
    /// The shards that moved in and out of this ledger (see `moves`).
    pub(crate) moves: crate::moves::Moves,
    /// Positions of each shard's accounts (derived from `accounts`; not
    /// compared, rebuilt when a snapshot is read).
    pub(crate) members: Vec<Vec<u32>>,
}

/// The accounts and transfer records changed since the last `take_touched`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TouchedMarks {
    pub(crate) accounts: Vec<u32>,
    records: Vec<u64>,
    /// Records closed after they left memory (pending ones kept aside).
    closed_evicted: Vec<TransferRow>,
}

/// A transfer as a projection writes it: its view, and when it was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub transfer: TransferView,
    /// The cell's clock when it was accepted, Unix milliseconds (rounded up to a second).
    pub accepted_at_ms: u64,
}

/// What a stretch of batches changed, for a projection: each account and
/// transfer once, as they are now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub accounts: Vec<AccountView>,
    pub transfers: Vec<TransferRow>,
}

impl PartialEq for Ledger {
    /// Equal when every piece of state is equal; the hash indexes follow from it.
    fn eq(&self, other: &Self) -> bool {
        self.limits == other.limits
            && self.accounts == other.accounts
            && self.tenants == other.tenants
            && self.records == other.records
            && self.records_first_seq == other.records_first_seq
            && self.evicted_pending == other.evicted_pending
            && self.history == other.history
            && self.history_first_seq == other.history_first_seq
            && self.outbox == other.outbox
            && self.inbox == other.inbox
            && self.digests == other.digests
            && self.balance_sum == other.balance_sum
            && self.negative_accounts == other.negative_accounts
            && self.moves == other.moves
    }
}

fn memo_hash(memo: Option<&str>) -> u64 {
    match memo {
        None => 0,
        Some(m) => stable_hash(m.as_bytes()) | 1,
    }
}

impl Ledger {
    pub fn new(limits: Limits, shards: u32) -> Self {
        assert!(limits.transfers_retained_max > 0 && limits.history_entries_max > 0);
        Self {
            limits,
            accounts: Vec::new(),
            index: HashMap::default(),
            tenants: Vec::new(),
            tenant_index: HashMap::default(),
            records: VecDeque::new(),
            records_reserved: false,
            records_first_seq: 0,
            record_index: HashMap::default(),
            evicted_pending: HashMap::default(),
            evicted_pending_seq: HashMap::default(),
            spill: false,
            spilled: Vec::new(),
            copied_through: 0,
            copy_round: 0,
            history: VecDeque::new(),
            history_first_seq: 0,
            outbox: BTreeMap::new(),
            inbox: BTreeMap::new(),
            digests: vec![0; shards as usize],
            balance_sum: 0,
            negative_accounts: 0,
            touched: None,
            moves: crate::moves::Moves::default(),
            members: vec![Vec::new(); shards as usize],
        }
    }

    /// How far back this ledger's idempotency records reach.
    pub fn idempotency_reach(&self) -> IdempotencyReach {
        IdempotencyReach {
            records_held: self.records.len() as u64,
            records_dropped: self.records_first_seq,
            oldest_at_ms: self.records.front().map(|r| r.at_ms()),
        }
    }

    /// Accounts this ledger holds (those that moved away are not counted).
    pub fn accounts_len(&self) -> usize {
        self.index.len()
    }

    /// Whether the account at position `i` is still here (it did not move away).
    fn live(&self, i: u32) -> bool {
        self.accounts[i as usize].shard != crate::moves::GONE
    }

    pub fn digests(&self) -> &[u64] {
        &self.digests
    }

    fn view(&self, i: u32) -> AccountView {
        let a = &self.accounts[i as usize];
        AccountView {
            id: a.id.clone(),
            currency: a.currency,
            balance: a.balance,
            overdraft: a.overdraft,
            tenant: self.tenants[a.tenant as usize].clone(),
        }
    }

    /// Sets a balance and keeps the account's shard digest in step.
    fn set_balance(&mut self, i: u32, balance: i64) {
        let a = &mut self.accounts[i as usize];
        let d = &mut self.digests[a.shard as usize];
        *d = d.wrapping_sub(digest::account_term(a.id_hash, a.balance));
        *d = d.wrapping_add(digest::account_term(a.id_hash, balance));
        self.balance_sum += i128::from(balance) - i128::from(a.balance);
        if !a.overdraft {
            let (was, is) = (a.balance < 0, balance < 0);
            self.negative_accounts = self.negative_accounts + u64::from(is) - u64::from(was);
        }
        a.balance = balance;
        debug_assert!(a.overdraft || a.balance >= 0, "I4: {} went negative", a.id);
        if let Some(t) = &mut self.touched {
            t.accounts.push(i);
        }
    }

    fn add_leg(&mut self, i: u32, transfer: &TransferId, kind: EntryKind) {
        let shard = self.accounts[i as usize].shard as usize;
        let d = &mut self.digests[shard];
        *d = d.wrapping_add(digest::leg_term(transfer, kind));
    }

    fn push_history(&mut self, i: u32, transfer: &TransferId, counterparty: AccountRef, kind: EntryKind, amount: i64) {
        let balance_after = self.accounts[i as usize].balance;
        self.push_history_entry(i, transfer, counterparty, kind, amount, balance_after);
    }

    pub(crate) fn push_history_entry(
        &mut self,
        i: u32,
        transfer: &TransferId,
        counterparty: AccountRef,
        kind: EntryKind,
        amount: i64,
        balance_after: i64,
    ) {
        if self.history.len() == self.limits.history_entries_max {
            self.history.pop_front();
            self.history_first_seq += 1;
        }
        let seq = self.history_first_seq + self.history.len() as u64;
        let account = &mut self.accounts[i as usize];
        let entry = Entry {
            account: i,
            prev: account.history_head,
            transfer: transfer.clone(),
            counterparty,
            kind,
            amount,
            balance_after,
        };
        account.history_head = seq + 1;
        self.history.push_back(entry);
    }

    pub(crate) fn push_record(&mut self, mut record: TransferRecord) -> u64 {
        if !self.records_reserved && self.records.len() + 1 >= self.limits.transfers_retained_max {
            // Once full, the ring holds its limit plus what waits between
            // batches (and, with a disk tier, for release). Reserving that
            // once keeps the buffer from doubling past the limit, so the slot
            // a new record takes was freed a few batches ago and is still in
            // cache, rather than a whole ring ago.
            self.records.reserve_exact(RECORDS_OVER_LIMIT_RESERVED);
            self.records_reserved = true;
        }
        let seq = self.records_first_seq + self.records.len() as u64;
        record.same_id_prev = self.record_index.insert(record.id.clone(), seq).map_or(0, |prev| prev + 1);
        self.records.push_back(record);
        if let Some(t) = &mut self.touched {
            t.records.push(seq);
        }
        seq
    }

    /// Records, from now on, what changes (for a projection); off, forgets.
    pub fn set_touched(&mut self, on: bool) {
        self.touched = on.then(TouchedMarks::default);
    }

    /// What changed since the last call (or `set_touched`): each account and
    /// record once, as it is now. Call it before the batch ends (records
    /// leave memory only at a batch's end).
    pub fn take_touched(&mut self) -> Touched {
        let Some(marks) = self.touched.as_mut().map(std::mem::take) else { return Touched::default() };
        let mut accounts = marks.accounts;
        accounts.sort_unstable();
        accounts.dedup();
        let mut records = marks.records;
        records.sort_unstable();
        records.dedup();
        let mut transfers: Vec<TransferRow> =
            records.iter().filter_map(|&seq| self.record(seq)).map(|r| self.transfer_row(r)).collect();
        transfers.extend(marks.closed_evicted);
        Touched { accounts: accounts.into_iter().map(|i| self.view(i)).collect(), transfers }
    }

    /// Every account and every transfer record in memory (a projection's resync).
    pub fn everything(&self) -> Touched {
        Touched {
            accounts: (0..self.accounts.len() as u32).filter(|&i| self.live(i)).map(|i| self.view(i)).collect(),
            transfers: self
                .records
                .iter()
                .chain(self.evicted_pending.values())
                .filter(|r| self.live(r.from))
                .map(|r| self.transfer_row(r))
                .collect(),
        }
    }

    /// A record as a projection writes it.
    fn transfer_row(&self, record: &TransferRecord) -> TransferRow {
        TransferRow { transfer: self.transfer_view(record), accepted_at_ms: record.at_ms() }
    }

    /// Moves the oldest records out of memory until at most
    /// `transfers_retained_max` remain (to `take_spilled` when spilling).
    /// Called between batches only (see `CellState::end_batch`), so no record
    /// leaves memory in the middle of a batch, where a later transfer of the
    /// same batch could miss it.
    pub(crate) fn trim_records(&mut self) {
        self.copy_out();
        self.release_records(u64::MAX, u64::MAX);
    }

    /// First step of moving records out of memory: copies the closed records
    /// beyond `transfers_retained_max` to `take_spilled`, and leaves them in
    /// memory, where lookups still find them, until `release_records`.
    /// Answers the sequence number through which records are copied (the
    /// mark to release through once the disk tier's readers can see them).
    /// Each call is a round (`copy_round`), named on what it copies.
    pub(crate) fn copy_out(&mut self) -> u64 {
        self.copy_round += 1;
        let beyond =
            self.records_first_seq + self.records.len().saturating_sub(self.limits.transfers_retained_max) as u64;
        let from = self.copied_through.max(self.records_first_seq);
        if !self.spill || beyond <= from {
            self.copied_through = self.copied_through.max(beyond);
            return self.copied_through;
        }
        let range = (from - self.records_first_seq) as usize..(beyond - self.records_first_seq) as usize;
        if range.len() > 1 {
            // The accounts these records name are long out of cache: touch them
            // all first, in a loop of independent loads that overlap, rather
            // than one miss after another while the records are built below.
            let mut touched = 0u64;
            for r in self.records.range(range.clone()) {
                touched ^= self.accounts[r.from as usize].id_hash;
                if let AccountRef::Local(to) = r.to {
                    touched ^= self.accounts[to as usize].id_hash;
                }
            }
            std::hint::black_box(touched);
        }
        for k in range {
            let r = &self.records[k];
            if r.status != TransferStatus::Pending {
                let old = self.old_record(r);
                self.spilled.push(old);
                self.records[k].copied_at = round_tag(self.copy_round);
            }
        }
        self.copied_through = beyond;
        beyond
    }

    /// Second step: drops from memory the records before `through` copied
    /// out in round `round` or earlier. A pending record moves aside
    /// (`evicted_pending`) until its transfer closes; one that closed after
    /// its round passed is copied now, in the next round, and stays until
    /// that round is released.
    pub(crate) fn release_records(&mut self, through: u64, round: u64) {
        let through = through.min(self.copied_through);
        while self.records_first_seq < through {
            let front = self.records.front().expect("records before copied_through are in memory");
            if self.spill && front.status != TransferStatus::Pending {
                if front.copied_at == 0 {
                    let old = self.old_record(front);
                    self.spilled.push(old);
                    self.records[0].copied_at = round_tag(self.copy_round + 1);
                    break;
                }
                // Copied in a later round than the one released (rounds in
                // flight differ by far less than 2^31, so the wrapping compare holds).
                if round != u64::MAX && front.copied_at.wrapping_sub(round_tag(round)) as i32 > 0 {
                    break;
                }
            }
            self.evict_front();
        }
    }

    /// Drops the oldest record from memory; a pending one moves aside
    /// (`evicted_pending`) until its transfer closes, so the close finds it
    /// and a retry still does.
    fn evict_front(&mut self) {
        let old = self.records.pop_front().expect("evict_front on a ring with records");
        // The index names the newest record of an id; an older one leaves quietly.
        if let std::collections::hash_map::Entry::Occupied(e) = self.record_index.entry(old.id.clone()) {
            if *e.get() == self.records_first_seq {
                e.remove();
            }
        }
        if old.status == TransferStatus::Pending {
            let key = (old.id.clone(), old.from);
            self.evicted_pending_seq.insert(self.records_first_seq, key.clone());
            self.evicted_pending.insert(key, old);
        }
        self.records_first_seq += 1;
    }

    /// Every retained record with this id, newest first (one per payer).
    fn records_with_id<'a>(&'a self, id: &TransferId) -> impl Iterator<Item = &'a TransferRecord> + 'a {
        let mut next = self.record_index.get(id).map_or(0, |&seq| seq + 1);
        std::iter::from_fn(move || {
            let record = self.record(next.checked_sub(1)?)?;
            next = record.same_id_prev;
            Some(record)
        })
    }

    /// The record of transfer `id` made by payer `from` (the idempotency key), if it is in memory.
    fn find_record(&self, id: &TransferId, from: u32) -> Option<&TransferRecord> {
        self.records_with_id(id).find(|r| r.from == from).or_else(|| {
            if self.evicted_pending.is_empty() {
                return None;
            }
            self.evicted_pending.get(&(id.clone(), from))
        })
    }

    /// A record as it is kept outside memory.
    fn old_record(&self, r: &TransferRecord) -> OldRecord {
        OldRecord {
            id: r.id.clone(),
            from: self.accounts[r.from as usize].id.clone(),
            to: self.resolve(&r.to),
            amount: r.amount,
            currency: r.currency,
            currency_given: r.currency_given,
            memo_hash: r.memo_hash,
            status: r.status,
            at_ms: r.at_ms(),
        }
    }

    /// Hands records that leave memory to a disk tier from now on (see `take_spilled`).
    pub fn set_spill(&mut self, spill: bool) {
        self.spill = spill;
    }

    /// The records that left memory since the last call, oldest first: the
    /// engine writes them to its disk tier.
    pub fn take_spilled(&mut self) -> Vec<OldRecord> {
        std::mem::take(&mut self.spilled)
    }

    /// Records that left memory with their transfer pending and wait for it to close.
    pub fn evicted_pending_len(&self) -> usize {
        self.evicted_pending.len()
    }

    fn record(&self, seq: u64) -> Option<&TransferRecord> {
        let i = seq.checked_sub(self.records_first_seq)?;
        self.records.get(usize::try_from(i).ok()?)
    }

    fn record_mut(&mut self, seq: u64) -> Option<&mut TransferRecord> {
        let i = seq.checked_sub(self.records_first_seq)?;
        self.records.get_mut(usize::try_from(i).ok()?)
    }

    pub(crate) fn open_account(&mut self, place: &Place<'_>, o: &OpenAccount) -> Outcome {
        if !place.owns(&o.id) {
            return place.wrong_cell(&o.id);
        }
        if place.frozen(&o.id) {
            return place.frozen_refusal(&o.id);
        }
        if let Some(&i) = self.index.get(&o.id) {
            let a = &self.accounts[i as usize];
            if a.currency == o.currency && a.overdraft == o.overdraft && self.tenants[a.tenant as usize] == o.tenant {
                return Outcome::AccountOpened { account: self.view(i), created: false };
            }
            return Outcome::rejected(ErrorCode::Conflict, format!("account {} exists with other attributes", o.id));
        }
        assert!(self.accounts.len() < u32::MAX as usize, "accounts per cell fit a u32 index");
        let i = self.accounts.len() as u32;
        let id_hash = stable_hash(o.id.as_str().as_bytes());
        // shard_of is this same hash modulo the shard count; reuse it.
        let shard = (id_hash % u64::from(place.map.shards())) as u32;
        let tenant = self.intern_tenant(&o.tenant);
        self.accounts.push(Account {
            id: o.id.clone(),
            currency: o.currency,
            balance: 0,
            overdraft: o.overdraft,
            tenant,
            shard,
            id_hash,
            history_head: 0,
        });
        self.index.insert(o.id.clone(), i);
        self.members[shard as usize].push(i);
        let d = &mut self.digests[shard as usize];
        *d = d.wrapping_add(digest::account_term(id_hash, 0));
        if let Some(t) = &mut self.touched {
            t.accounts.push(i);
        }
        Outcome::AccountOpened { account: self.view(i), created: true }
    }

    pub(crate) fn resolve(&self, r: &AccountRef) -> AccountId {
        match r {
            AccountRef::Local(i) => self.accounts[*i as usize].id.clone(),
            AccountRef::Remote(id) => id.clone(),
        }
    }

    fn refers_to(&self, r: &AccountRef, id: &AccountId) -> bool {
        match r {
            AccountRef::Local(i) => self.accounts[*i as usize].id == *id,
            AccountRef::Remote(remote) => remote == id,
        }
    }

    fn transfer_view(&self, record: &TransferRecord) -> TransferView {
        TransferView {
            id: record.id.clone(),
            from: self.accounts[record.from as usize].id.clone(),
            to: self.resolve(&record.to),
            amount: record.amount,
            currency: record.currency,
            status: record.status,
        }
    }

    /// The view of a transfer just accepted, built from its command.
    fn accepted_view(t: &Transfer, currency: Currency, status: TransferStatus) -> TransferView {
        TransferView { id: t.id.clone(), from: t.from.clone(), to: t.to.clone(), amount: t.amount, currency, status }
    }

    fn same_body(&self, record: &TransferRecord, t: &Transfer) -> bool {
        self.accounts[record.from as usize].id == t.from
            && self.refers_to(&record.to, &t.to)
            && record.amount == t.amount
            && record.currency_given == t.currency
            && record.memo_hash == memo_hash(t.memo.as_deref())
    }

    fn same_old_body(old: &OldRecord, t: &Transfer) -> bool {
        old.from == t.from
            && old.to == t.to
            && old.amount == t.amount
            && old.currency_given == t.currency
            && old.memo_hash == memo_hash(t.memo.as_deref())
    }

    /// Checks a transfer's own fields, before any state is looked at.
    pub fn validate_transfer(t: &Transfer) -> Result<(), Outcome> {
        if !amount_is_valid(t.amount) {
            let msg = format!("amount must be between 1 and {AMOUNT_MAX} minor units");
            return Err(Outcome::rejected(ErrorCode::InvalidRequest, msg));
        }
        if t.from == t.to {
            return Err(Outcome::rejected(ErrorCode::InvalidRequest, "from and to must differ"));
        }
        if t.memo.as_ref().is_some_and(|m| m.len() > MEMO_BYTES_MAX) {
            let msg = format!("memo is longer than {MEMO_BYTES_MAX} bytes");
            return Err(Outcome::rejected(ErrorCode::InvalidRequest, msg));
        }
        Ok(())
    }

    /// The position of `tenant` in the tenant table, added if new.
    pub(crate) fn intern_tenant(&mut self, tenant: &TenantId) -> u32 {
        if let Some(&i) = self.tenant_index.get(tenant) {
            return i;
        }
        assert!(self.tenants.len() < u32::MAX as usize, "tenants fit a u32 index");
        let i = self.tenants.len() as u32;
        self.tenants.push(tenant.clone());
        self.tenant_index.insert(tenant.clone(), i);
        i
    }

    /// Only the payer's tenant (or admin) may debit it, and only admin an
    /// overdraft account: debiting one creates money.
    fn may_debit(&self, payer: &Account, by: &Authority) -> Result<(), Outcome> {
        if payer.overdraft && *by != Authority::Admin {
            let msg = format!("account {} allows overdraft: only an admin token may debit it", payer.id);
            return Err(Outcome::rejected(ErrorCode::Forbidden, msg));
        }
        if !by.acts_for(&self.tenants[payer.tenant as usize]) {
            let msg = format!("account {} belongs to another tenant", payer.id);
            return Err(Outcome::rejected(ErrorCode::Forbidden, msg));
        }
        Ok(())
    }

    /// The account, if `by` may read it; `Err(true)` when it exists but belongs to another tenant.
    pub fn account_for(&self, id: &AccountId, by: &Authority) -> Result<AccountView, bool> {
        let &i = self.index.get(id).ok_or(false)?;
        if !by.acts_for(&self.tenants[self.accounts[i as usize].tenant as usize]) {
            return Err(true);
        }
        Ok(self.view(i))
    }

    pub(crate) fn transfer(&mut self, place: &Place<'_>, t: &Transfer) -> Outcome {
        if let Err(rejection) = Self::validate_transfer(t) {
            return rejection;
        }
        if !place.owns(&t.from) {
            return place.wrong_cell(&t.from);
        }
        // During a move's freeze nothing may change the shard (its payers'
        // closes aside): not a debit of its payer nor a local credit to it.
        if !place.frozen.is_empty() {
            for id in [&t.from, &t.to] {
                if place.frozen(id) && place.owns(id) {
                    return place.frozen_refusal(id);
                }
            }
        }
        // Both accounts are looked up here, back to back, so the two probes of
        // the (large, cold) account index overlap instead of waiting one after
        // the other; a missing payee is still refused in its place below.
        let payee_local = place.owns(&t.to);
        let payer = self.index.get(&t.from).copied();
        let payee = if payee_local { self.index.get(&t.to).copied() } else { None };
        let Some(payer) = payer else {
            return Outcome::rejected(ErrorCode::AccountNotFound, format!("payer account {} not found", t.from));
        };
        if let Err(rejection) = self.may_debit(&self.accounts[payer as usize], &t.by) {
            return rejection;
        }
        // The idempotency key is the payer and the id; a record older than
        // the window counts as gone. Replay does not look: what was logged was new.
        let window = place.admission.idempotency_window_ms;
        let oldest_held_ms = place.clock_ms.saturating_sub(window);
        if place.admission.lookup {
            let record = self.find_record(&t.id, payer).filter(|r| r.at_ms() >= oldest_held_ms);
            if let Some(record) = record {
                if self.same_body(record, t) {
                    let transfer = self.transfer_view(record);
                    return Outcome::Transferred { transfer, created: false, outbox: None, minted: false };
                }
                let msg = format!("transfer {} of payer {} exists with a different body", t.id, t.from);
                return Outcome::rejected(ErrorCode::Conflict, msg);
            }
            let older = place.older.find(place.shadow, &t.from, &t.id).filter(|r| r.at_ms >= oldest_held_ms);
            if let Some(old) = older {
                if Self::same_old_body(&old, t) {
                    return Outcome::Transferred { transfer: old.view(), created: false, outbox: None, minted: false };
                }
                let msg = format!("transfer {} of payer {} exists with a different body", t.id, t.from);
                return Outcome::rejected(ErrorCode::Conflict, msg);
            }
            if let Some(made_ms) = t.id.uuid_v7_ms().filter(|&ms| ms < oldest_held_ms) {
                let age_s = (place.clock_ms - made_ms) / 1000;
                let msg = format!(
                    "transfer id {} was made {age_s} s ago, beyond the idempotency window of {} s: \
                     a retry this old cannot be told from a new payment (use a new id for a new payment)",
                    t.id,
                    window / 1000
                );
                return Outcome::rejected(ErrorCode::IdempotencyExpired, msg);
            }
        }
        let payer_account = &self.accounts[payer as usize];
        let currency = payer_account.currency;
        if t.currency.is_some_and(|c| c != currency) {
            let msg = format!("payer account holds {currency}");
            return Outcome::rejected(ErrorCode::CurrencyMismatch, msg);
        }
        let Some(payer_after) = payer_account.balance.checked_sub(t.amount) else {
            return Outcome::rejected(ErrorCode::BalanceOverflow, "payer balance would overflow");
        };
        if !payer_account.overdraft && payer_after < 0 {
            return Outcome::rejected(ErrorCode::InsufficientFunds, format!("account {} lacks funds", t.from));
        }
        if payee_local {
            let Some(payee) = payee else {
                return Outcome::rejected(ErrorCode::AccountNotFound, format!("payee account {} not found", t.to));
            };
            self.transfer_local(t, payer, payee, payer_after, currency, place.clock_ms)
        } else {
            self.transfer_remote(place, t, payer, payer_after, currency)
        }
    }

    fn transfer_local(
        &mut self,
        t: &Transfer,
        payer: u32,
        payee: u32,
        payer_after: i64,
        currency: Currency,
        clock_ms: u64,
    ) -> Outcome {
        let payee_account = &self.accounts[payee as usize];
        if payee_account.currency != currency {
            let msg = format!("payee account holds {}", payee_account.currency);
            return Outcome::rejected(ErrorCode::CurrencyMismatch, msg);
        }
        let Some(payee_after) = payee_account.balance.checked_add(t.amount) else {
            return Outcome::rejected(ErrorCode::BalanceOverflow, "payee balance would overflow");
        };
        // Commit point: every check passed; from here on nothing may fail.
        self.set_balance(payer, payer_after);
        self.set_balance(payee, payee_after);
        self.add_leg(payer, &t.id, EntryKind::Debit);
        self.add_leg(payee, &t.id, EntryKind::Credit);
        self.push_history(payer, &t.id, AccountRef::Local(payee), EntryKind::Debit, -t.amount);
        self.push_history(payee, &t.id, AccountRef::Local(payer), EntryKind::Credit, t.amount);
        let record = Self::new_record(t, payer, AccountRef::Local(payee), currency, TransferStatus::Settled, clock_ms);
        self.push_record(record);
        let transfer = Self::accepted_view(t, currency, TransferStatus::Settled);
        let minted = self.accounts[payer as usize].overdraft;
        Outcome::Transferred { transfer, created: true, outbox: None, minted }
    }

    fn transfer_remote(
        &mut self,
        place: &Place<'_>,
        t: &Transfer,
        payer: u32,
        payer_after: i64,
        currency: Currency,
    ) -> Outcome {
        let dest = place.map.owner_of(t.to.as_str());
        assert_ne!(dest, place.cell, "a remote payee lives in another cell");
        let queued = self.outbox.get(&dest).map_or(0, |o| o.entries.len() as u64);
        if queued >= place.admission.outbox_messages_max {
            let max = place.admission.outbox_messages_max;
            let msg = format!(
                "{queued} credits to cell {dest} wait for delivery (limit {max}); cross-cell payments to it resume as they drain"
            );
            return Outcome::rejected(ErrorCode::OutboxFull, msg);
        }
        // Commit point.
        self.set_balance(payer, payer_after);
        self.add_leg(payer, &t.id, EntryKind::Debit);
        let payee = AccountRef::Remote(t.to.clone());
        self.push_history(payer, &t.id, payee.clone(), EntryKind::Debit, -t.amount);
        let record = Self::new_record(t, payer, payee, currency, TransferStatus::Pending, place.clock_ms);
        let record_seq = self.push_record(record);
        let transfer = Self::accepted_view(t, currency, TransferStatus::Pending);
        let seq = self.send(dest, record_seq, &t.id, &t.from, &t.to, t.amount, currency);
        let minted = self.accounts[payer as usize].overdraft;
        Outcome::Transferred { transfer, created: true, outbox: Some((dest, seq)), minted }
    }

    /// Puts a credit in the outbox towards `dest` under its next sequence number.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        dest: CellId,
        record_seq: u64,
        transfer: &TransferId,
        from: &AccountId,
        to: &AccountId,
        amount: i64,
        currency: Currency,
    ) -> u64 {
        let outbox = self.outbox.entry(dest).or_insert_with(|| Outbox::new(dest));
        let f = &mut outbox.figures;
        f.last_seq += 1;
        let seq = f.last_seq;
        f.sent += i128::from(amount);
        f.sent_chain = digest::chain_link(f.sent_chain, digest::message(transfer, from, to, amount, currency), false);
        let (sent_through, sent_chain) = (f.sent, f.sent_chain);
        outbox.entries.insert(
            seq,
            OutboxEntry {
                record_seq,
                sent_through,
                sent_chain,
                transfer: transfer.clone(),
                from: from.clone(),
                to: to.clone(),
                amount,
                currency,
            },
        );
        seq
    }

    fn new_record(
        t: &Transfer,
        payer: u32,
        to: AccountRef,
        currency: Currency,
        status: TransferStatus,
        at_ms: u64,
    ) -> TransferRecord {
        TransferRecord {
            at_s: at_ms.div_ceil(1000).min(u64::from(u32::MAX)) as u32,
            id: t.id.clone(),
            from: payer,
            to,
            amount: t.amount,
            currency,
            currency_given: t.currency,
            memo_hash: memo_hash(t.memo.as_deref()),
            status,
            same_id_prev: 0,
            copied_at: 0,
        }
    }

    pub(crate) fn credit(&mut self, place: &Place<'_>, c: &Credit) -> Outcome {
        if let Some(dest) = c.dest.filter(|d| *d != place.cell) {
            let msg =
                format!("credit {} from cell {} is meant for cell {dest}, not cell {}", c.seq, c.source, place.cell);
            return Outcome::rejected(ErrorCode::WrongCell, msg);
        }
        // A credit for a payee this cell does not own at its epoch is not for
        // it: refused before its inbox is read or made (a message meant for
        // another cell must not look like a reused or out-of-order number
        // here), unless the payee's shard moved away from here: the credit
        // was sent here, so its number is this stream's (see `moves`).
        let moved_away = !place.owns(&c.to);
        if moved_away && !place.moved_away.contains_key(&place.map.shard_of(c.to.as_str()).0) {
            return place.wrong_cell(&c.to);
        }
        let digest = digest::message(&c.transfer, &c.from, &c.to, c.amount, c.currency);
        let applied_through = self.inbox.get(&c.source).map_or(0, |i| i.figures.applied_through);
        if c.seq <= applied_through {
            let inbox = &self.inbox[&c.source];
            return match inbox.mark(c.seq) {
                None => {
                    let msg = format!("credit {} from cell {} is older than the inbox tail", c.seq, c.source);
                    Outcome::rejected(ErrorCode::OutOfOrder, msg)
                }
                Some(mark) if mark.digest != digest => {
                    let msg = format!(
                        "credit {} from cell {} carries another message than the one applied under that number \
                         (was cell {} rolled back?)",
                        c.seq, c.source, c.source
                    );
                    Outcome::rejected(ErrorCode::SequenceReused, msg)
                }
                Some(mark) => match mark.refused {
                    Some(code) => Outcome::CreditRefused { code, duplicate: true },
                    None => Outcome::CreditApplied { duplicate: true },
                },
            };
        }
        if c.seq != applied_through + 1 {
            let msg = format!("expected credit {} from cell {}", applied_through + 1, c.source);
            return Outcome::rejected(ErrorCode::OutOfOrder, msg);
        }
        if !moved_away && place.frozen(&c.to) {
            // Held, not refused: the relay sends it again once the move is done.
            return place.frozen_refusal(&c.to);
        }
        let target = if moved_away { Err(ErrorCode::ShardMoved) } else { self.credit_target(c) };
        let inbox = self.inbox.entry(c.source).or_insert_with(|| Inbox::new(c.source));
        match target {
            Ok((payee, payee_after)) => {
                // Commit point.
                inbox.push(digest, c.amount, None);
                self.set_balance(payee, payee_after);
                self.add_leg(payee, &c.transfer, EntryKind::Credit);
                self.push_history(payee, &c.transfer, AccountRef::Remote(c.from.clone()), EntryKind::Credit, c.amount);
                Outcome::CreditApplied { duplicate: false }
            }
            Err(code) => {
                inbox.push(digest, c.amount, Some(code));
                Outcome::CreditRefused { code, duplicate: false }
            }
        }
    }

    /// The payee and its balance after the credit, or why the credit is refused for good.
    fn credit_target(&self, c: &Credit) -> Result<(u32, i64), ErrorCode> {
        if !amount_is_valid(c.amount) {
            return Err(ErrorCode::InvalidRequest);
        }
        let payee = self.index.get(&c.to).copied().ok_or(ErrorCode::AccountNotFound)?;
        let account = &self.accounts[payee as usize];
        if account.currency != c.currency {
            return Err(ErrorCode::CurrencyMismatch);
        }
        let after = account.balance.checked_add(c.amount).ok_or(ErrorCode::BalanceOverflow)?;
        Ok((payee, after))
    }

    /// Checks that `seq` is the next message to close towards `dest`:
    /// messages close in sequence order (the pair's chain folds them so).
    /// `Err` carries the answer for anything else: a duplicate, or a refusal.
    fn next_to_close(&self, dest: CellId, seq: u64, fallback: TransferStatus) -> Result<(), Outcome> {
        let figures = self.outbox.get(&dest).map_or(OutboxFigures::new(dest), |o| o.figures);
        if seq == 0 || seq > figures.last_seq {
            let msg = format!("outbox to cell {dest} has no message {seq}");
            return Err(Outcome::rejected(ErrorCode::InvalidRequest, msg));
        }
        if seq <= figures.closed_through {
            return Err(Outcome::OutboxClosed { status: fallback, duplicate: true });
        }
        if seq != figures.closed_through + 1 {
            let msg = format!("outbox to cell {dest} closes message {} first", figures.closed_through + 1);
            return Err(Outcome::rejected(ErrorCode::OutOfOrder, msg));
        }
        Ok(())
    }

    /// Closes the oldest open message towards `dest` and folds it into the pair's figures.
    fn close(&mut self, dest: CellId, seq: u64, refused: bool) -> OutboxEntry {
        let status = if refused { TransferStatus::Reversed } else { TransferStatus::Settled };
        self.close_as(dest, seq, refused, status)
    }

    /// Closes the oldest open message towards `dest` (`refused` by the payee's
    /// cell or not) and gives its transfer `status`; `Pending` leaves the
    /// record as it is (the credit goes on under another number).
    fn close_as(&mut self, dest: CellId, seq: u64, refused: bool, status: TransferStatus) -> OutboxEntry {
        let outbox = self.outbox.get_mut(&dest).expect("checked by next_to_close");
        let entry = outbox.entries.remove(&seq).expect("an open message is in the outbox");
        let f = &mut outbox.figures;
        f.closed_through = seq;
        f.closed_chain = digest::chain_link(f.closed_chain, entry.digest(), refused);
        if refused {
            f.compensated += i128::from(entry.amount);
        } else {
            f.settled += i128::from(entry.amount);
        }
        if status == TransferStatus::Pending {
            return entry;
        }
        if let Some(record) = self.record_mut(entry.record_seq) {
            debug_assert_eq!(record.status, TransferStatus::Pending);
            record.status = status;
            if let Some(t) = &mut self.touched {
                t.records.push(entry.record_seq);
            }
        } else if let Some(key) = self.evicted_pending_seq.remove(&entry.record_seq) {
            let mut record = self.evicted_pending.remove(&key).expect("both maps hold an evicted pending record");
            record.status = status;
            let row = self.touched.is_some().then(|| self.transfer_row(&record));
            if let (Some(t), Some(row)) = (&mut self.touched, row) {
                t.closed_evicted.push(row);
            }
            if self.spill {
                let old = self.old_record(&record);
                self.spilled.push(old);
            }
        }
        entry
    }

    pub(crate) fn settle(&mut self, dest: CellId, seq: u64) -> Outcome {
        if let Err(answer) = self.next_to_close(dest, seq, TransferStatus::Settled) {
            return answer;
        }
        // Commit point.
        self.close(dest, seq, false);
        Outcome::OutboxClosed { status: TransferStatus::Settled, duplicate: false }
    }

    pub(crate) fn compensate(&mut self, place: &Place<'_>, dest: CellId, seq: u64, reason: ErrorCode) -> Outcome {
        if let Err(answer) = self.next_to_close(dest, seq, TransferStatus::Reversed) {
            return answer;
        }
        if reason == ErrorCode::ShardMoved {
            return self.reroute(place, dest, seq);
        }
        self.credit_back(place, dest, seq)
    }

    /// The payee's shard moved away from `dest`, which refused message `seq`
    /// for that: the credit goes to the shard's owner under this cell's map,
    /// under that stream's next number (or applies here, if the shard moved
    /// here). The pair with `dest` counts it refused, as `dest` does. The
    /// relay gives this cell `dest`'s map first, so a map that still names
    /// `dest` means the shard went back there: the credit goes to `dest`
    /// again, under a new number.
    fn reroute(&mut self, place: &Place<'_>, dest: CellId, seq: u64) -> Outcome {
        let entry = self.outbox[&dest].entries[&seq].clone();
        let owner = place.map.owner_of(entry.to.as_str());
        if owner != place.cell {
            // Commit point.
            self.close_as(dest, seq, true, TransferStatus::Pending);
            self.send(owner, entry.record_seq, &entry.transfer, &entry.from, &entry.to, entry.amount, entry.currency);
            return Outcome::OutboxClosed { status: TransferStatus::Pending, duplicate: false };
        }
        if place.frozen(&entry.to) {
            return place.frozen_refusal(&entry.to);
        }
        let credit = Credit {
            source: place.cell,
            dest: None,
            seq,
            transfer: entry.transfer.clone(),
            from: entry.from.clone(),
            to: entry.to.clone(),
            amount: entry.amount,
            currency: entry.currency,
        };
        let Ok((payee, payee_after)) = self.credit_target(&credit) else {
            return self.credit_back(place, dest, seq);
        };
        // Commit point: the payee's shard moved here, the credit is local now.
        self.close_as(dest, seq, true, TransferStatus::Settled);
        self.set_balance(payee, payee_after);
        self.add_leg(payee, &entry.transfer, EntryKind::Credit);
        let payer =
            self.index.get(&entry.from).map_or(AccountRef::Remote(entry.from.clone()), |&i| AccountRef::Local(i));
        self.push_history(payee, &entry.transfer, payer, EntryKind::Credit, entry.amount);
        Outcome::OutboxClosed { status: TransferStatus::Settled, duplicate: false }
    }

    /// The payee's cell refused message `seq` for good: the payer gets its money back.
    fn credit_back(&mut self, place: &Place<'_>, dest: CellId, seq: u64) -> Outcome {
        let entry = &self.outbox[&dest].entries[&seq];
        if !place.owns(&entry.from) {
            return place.wrong_cell(&entry.from);
        }
        let payer = self.index.get(&entry.from).copied().expect("a payer with an outbox entry exists");
        let Some(after) = self.accounts[payer as usize].balance.checked_add(entry.amount) else {
            return Outcome::rejected(ErrorCode::BalanceOverflow, "payer balance would overflow");
        };
        // Commit point.
        let entry = self.close(dest, seq, true);
        self.set_balance(payer, after);
        self.add_leg(payer, &entry.transfer, EntryKind::Reversal);
        self.push_history(payer, &entry.transfer, AccountRef::Remote(entry.to), EntryKind::Reversal, entry.amount);
        Outcome::OutboxClosed { status: TransferStatus::Reversed, duplicate: false }
    }

    pub fn account(&self, id: &AccountId) -> Option<AccountView> {
        self.index.get(id).map(|&i| self.view(i))
    }

    /// The retained transfers with this id, newest first: one per payer, or
    /// only payer `from`'s when it is named; only those whose payer `by` acts for.
    pub fn transfers(&self, id: &TransferId, from: Option<&AccountId>, by: &Authority) -> Vec<TransferView> {
        let payer = match from {
            Some(from) => match self.index.get(from) {
                Some(&i) => Some(i),
                None => return Vec::new(),
            },
            None => None,
        };
        let found: Vec<&TransferRecord> = match payer {
            Some(p) => self.find_record(id, p).into_iter().collect(),
            None => self.records_with_id(id).collect(),
        };
        found
            .into_iter()
            .filter(|r| self.live(r.from) && by.acts_for(&self.tenants[self.accounts[r.from as usize].tenant as usize]))
            .map(|r| self.transfer_view(r))
            .collect()
    }

    /// History of one account, newest first, entries with `seq < before` only.
    pub fn entries(&self, id: &AccountId, limit: usize, before: Option<u64>) -> Option<Vec<EntryView>> {
        let &i = self.index.get(id)?;
        let mut out = Vec::with_capacity(limit.min(256));
        let mut next = self.accounts[i as usize].history_head;
        while next > 0 && out.len() < limit {
            let seq = next - 1;
            let Some(entry) = seq.checked_sub(self.history_first_seq).and_then(|k| self.history.get(k as usize)) else {
                break; // older entries have left the retention window
            };
            debug_assert_eq!(entry.account, i);
            if before.is_none_or(|b| seq < b) {
                out.push(EntryView {
                    seq,
                    transfer: entry.transfer.clone(),
                    kind: entry.kind,
                    amount: entry.amount,
                    balance_after: entry.balance_after,
                    counterparty: self.resolve(&entry.counterparty),
                });
            }
            next = entry.prev;
        }
        Some(out)
    }

    pub fn outbox_messages(&self, dest: CellId, after_seq: u64, limit: usize) -> Vec<OutboxMessage> {
        let Some(outbox) = self.outbox.get(&dest) else {
            return Vec::new();
        };
        outbox
            .entries
            .range(after_seq.saturating_add(1)..)
            .take(limit)
            .map(|(&seq, e)| OutboxMessage {
                seq,
                transfer: e.transfer.clone(),
                from: e.from.clone(),
                to: e.to.clone(),
                amount: e.amount,
                currency: e.currency,
            })
            .collect()
    }

    /// The audit figures as kept: O(cells).
    pub fn figures(&self) -> LedgerFigures {
        LedgerFigures {
            accounts: self.index.len() as u64,
            balance_sum: self.balance_sum,
            negative_accounts: self.negative_accounts,
            outbox: self.outbox.values().map(|o| o.figures).collect(),
            inbox: self.inbox.values().map(|i| i.figures).collect(),
            moves: self.move_figures(),
            frozen: Vec::new(),
            arrived: Vec::new(),
        }
    }

    /// What this ledger, as the payee side, counts from each source asked
    /// about, at the sequence asked (step 2 of the pair reconciliation).
    pub fn inbox_at(&self, asked: &[(CellId, u64)]) -> Vec<InboxAt> {
        asked
            .iter()
            .map(|&(source, seq)| match self.inbox.get(&source) {
                Some(inbox) => InboxAt { figures: inbox.figures, prefix: inbox.prefix(seq) },
                None => {
                    let prefix = (seq == 0).then(InboxPrefix::default);
                    InboxAt { figures: InboxFigures::new(source), prefix }
                }
            })
            .collect()
    }

    /// What this ledger, as the source side, sent to each destination asked
    /// about, through the sequence asked (step 3 of the pair reconciliation).
    pub fn outbox_at(&self, asked: &[(CellId, u64)]) -> Vec<OutboxAt> {
        asked
            .iter()
            .map(|&(dest, seq)| {
                let Some(o) = self.outbox.get(&dest) else {
                    let prefix = (seq == 0).then(SentPrefix::default);
                    return OutboxAt { figures: OutboxFigures::new(dest), prefix };
                };
                let f = o.figures;
                let prefix = if seq == f.last_seq {
                    Some(SentPrefix { seq, sent: f.sent, chain: f.sent_chain })
                } else {
                    o.entries.get(&seq).map(|e| SentPrefix { seq, sent: e.sent_through, chain: e.sent_chain })
                };
                OutboxAt { figures: f, prefix }
            })
            .collect()
    }

    /// The full audit of this ledger in cell `cell`: the kept figures, checked
    /// against a walk over every account and outbox entry. O(accounts).
    pub fn audit(&self, cell: CellId) -> LedgerAudit {
        let figures = self.figures();
        let mut findings = Vec::new();
        let mut walk = |figure: &'static str, kept: i128, walked: i128| {
            if kept != walked {
                findings.push(Finding::Walk { cell, figure, kept, walked });
            }
        };
        let balance_sum: i128 = self.accounts.iter().map(|a| i128::from(a.balance)).sum();
        let negative = self.accounts.iter().filter(|a| !a.overdraft && a.balance < 0).count();
        walk("balance_sum", figures.balance_sum, balance_sum);
        walk("negative_accounts", i128::from(figures.negative_accounts), negative as i128);
        for o in self.outbox.values() {
            let f = &o.figures;
            let open: i128 = o.entries.values().map(|e| i128::from(e.amount)).sum();
            walk("outbox open sum", f.open_sum(), open);
            walk("outbox open messages", i128::from(f.open_messages()), o.entries.len() as i128);
            let in_range = o.entries.keys().all(|&s| s > f.closed_through && s <= f.last_seq);
            walk("outbox entries outside the open range", 0, i128::from(!in_range));
        }
        if negative > 0 {
            findings.push(Finding::Negative { cell, accounts: negative as u64 });
        }
        if figures.cell_term() != 0 {
            findings.push(Finding::CellTerm { cell, term: figures.cell_term() });
        }
        LedgerAudit { figures, findings }
    }
}

impl Outbox {
    fn new(dest: CellId) -> Self {
        Self { figures: OutboxFigures::new(dest), entries: BTreeMap::new() }
    }
}

impl Inbox {
    fn new(source: CellId) -> Self {
        Self { figures: InboxFigures::new(source), tail: VecDeque::new() }
    }
}
