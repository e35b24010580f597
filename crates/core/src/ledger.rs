//! One ledger (real or shadow) of one cell: accounts, transfer records, history,
//! outbox and inbox, and the per-shard digests.
//!
//! Every method here either changes state completely or not at all: all checks
//! run before the first mutation ("commit point"), so a rejection never leaves
//! a trace (DESIGN.md section 2, "bad input changes nothing").

use std::collections::{BTreeMap, HashMap, VecDeque};

use foldhash::fast::RandomState;

use crate::command::{
    AccountView, AuditView, Credit, EntryKind, EntryView, OpenAccount, OutboxMessage, Outcome, Transfer,
    TransferStatus, TransferView, MEMO_BYTES_MAX,
};
use crate::digest;
use crate::error::ErrorCode;
use crate::ids::{AccountId, CellId, TransferId};
use crate::money::{amount_is_valid, Currency, AMOUNT_MAX};
use crate::shard::{stable_hash, ShardMap};

/// How many refused inbox sequence numbers are remembered per source, so a
/// redelivered refusal gets the same answer. The relay's window of messages in
/// flight must stay below this.
pub const INBOX_REFUSALS_RETAINED: u64 = 1 << 16;

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
    pub shard: u32,
    pub id_hash: u64,
    /// Sequence number + 1 of this account's newest history entry, 0 for none.
    pub history_head: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
}

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
    pub transfer: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Outbox {
    /// The last sequence number given out; the next message gets `last_seq + 1`.
    pub last_seq: u64,
    pub entries: BTreeMap<u64, OutboxEntry>,
    pub sent: i128,
    pub compensated: i128,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Inbox {
    pub applied_through: u64,
    pub refused: BTreeMap<u64, ErrorCode>,
    pub received: i128,
}

/// Where the ledger lives: which cell it is and who owns which shard.
pub(crate) struct Place<'a> {
    pub cell: CellId,
    pub map: &'a ShardMap,
}

impl Place<'_> {
    fn owns(&self, id: &AccountId) -> bool {
        self.map.owner_of(id.as_str()) == self.cell
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
    pub(crate) records: VecDeque<TransferRecord>,
    pub(crate) records_first_seq: u64,
    pub(crate) record_index: HashMap<TransferId, u64, RandomState>,
    pub(crate) history: VecDeque<Entry>,
    pub(crate) history_first_seq: u64,
    pub(crate) outbox: BTreeMap<CellId, Outbox>,
    pub(crate) inbox: BTreeMap<CellId, Inbox>,
    pub(crate) digests: Vec<u64>,
}

impl PartialEq for Ledger {
    /// Equal when every piece of state is equal; the hash indexes follow from it.
    fn eq(&self, other: &Self) -> bool {
        self.limits == other.limits
            && self.accounts == other.accounts
            && self.records == other.records
            && self.records_first_seq == other.records_first_seq
            && self.history == other.history
            && self.history_first_seq == other.history_first_seq
            && self.outbox == other.outbox
            && self.inbox == other.inbox
            && self.digests == other.digests
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
            records: VecDeque::new(),
            records_first_seq: 0,
            record_index: HashMap::default(),
            history: VecDeque::new(),
            history_first_seq: 0,
            outbox: BTreeMap::new(),
            inbox: BTreeMap::new(),
            digests: vec![0; shards as usize],
        }
    }

    pub fn accounts_len(&self) -> usize {
        self.accounts.len()
    }

    pub fn digests(&self) -> &[u64] {
        &self.digests
    }

    fn view(&self, i: u32) -> AccountView {
        let a = &self.accounts[i as usize];
        AccountView { id: a.id.clone(), currency: a.currency, balance: a.balance, overdraft: a.overdraft }
    }

    /// Sets a balance and keeps the account's shard digest in step.
    fn set_balance(&mut self, i: u32, balance: i64) {
        let a = &mut self.accounts[i as usize];
        let d = &mut self.digests[a.shard as usize];
        *d = d.wrapping_sub(digest::account_term(a.id_hash, a.balance));
        *d = d.wrapping_add(digest::account_term(a.id_hash, balance));
        a.balance = balance;
        debug_assert!(a.overdraft || a.balance >= 0, "I4: {} went negative", a.id);
    }

    fn add_leg(&mut self, i: u32, transfer: &TransferId, kind: EntryKind) {
        let shard = self.accounts[i as usize].shard as usize;
        let d = &mut self.digests[shard];
        *d = d.wrapping_add(digest::leg_term(transfer, kind));
    }

    fn push_history(&mut self, i: u32, transfer: &TransferId, counterparty: AccountRef, kind: EntryKind, amount: i64) {
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
            balance_after: account.balance,
        };
        account.history_head = seq + 1;
        self.history.push_back(entry);
    }

    fn push_record(&mut self, record: TransferRecord) -> u64 {
        if self.records.len() == self.limits.transfers_retained_max {
            let old = self.records.pop_front().expect("a full ring is not empty");
            let removed = self.record_index.remove(&old.id);
            debug_assert_eq!(removed, Some(self.records_first_seq), "the index points at the ring");
            self.records_first_seq += 1;
        }
        let seq = self.records_first_seq + self.records.len() as u64;
        let fresh = self.record_index.insert(record.id.clone(), seq).is_none();
        assert!(fresh, "a transfer id is recorded once (I3)");
        self.records.push_back(record);
        seq
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
        if let Some(&i) = self.index.get(&o.id) {
            let a = &self.accounts[i as usize];
            if a.currency == o.currency && a.overdraft == o.overdraft {
                return Outcome::AccountOpened { account: self.view(i), created: false };
            }
            return Outcome::rejected(ErrorCode::Conflict, format!("account {} exists with other attributes", o.id));
        }
        assert!(self.accounts.len() < u32::MAX as usize, "accounts per cell fit a u32 index");
        let i = self.accounts.len() as u32;
        let id_hash = stable_hash(o.id.as_str().as_bytes());
        // shard_of is this same hash modulo the shard count; reuse it.
        let shard = (id_hash % u64::from(place.map.shards())) as u32;
        self.accounts.push(Account {
            id: o.id.clone(),
            currency: o.currency,
            balance: 0,
            overdraft: o.overdraft,
            shard,
            id_hash,
            history_head: 0,
        });
        self.index.insert(o.id.clone(), i);
        let d = &mut self.digests[shard as usize];
        *d = d.wrapping_add(digest::account_term(id_hash, 0));
        Outcome::AccountOpened { account: self.view(i), created: true }
    }

    fn resolve(&self, r: &AccountRef) -> AccountId {
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

    fn find(&self, id: &AccountId, role: &str) -> Result<u32, Outcome> {
        self.index
            .get(id)
            .copied()
            .ok_or_else(|| Outcome::rejected(ErrorCode::AccountNotFound, format!("{role} account {id} not found")))
    }

    pub(crate) fn transfer(&mut self, place: &Place<'_>, t: &Transfer) -> Outcome {
        if let Err(rejection) = Self::validate_transfer(t) {
            return rejection;
        }
        if !place.owns(&t.from) {
            return place.wrong_cell(&t.from);
        }
        if let Some(&seq) = self.record_index.get(&t.id) {
            let record = self.record(seq).expect("the index points into the ring");
            if self.same_body(record, t) {
                let transfer = self.transfer_view(record);
                return Outcome::Transferred { transfer, created: false, outbox: None };
            }
            let msg = format!("transfer {} exists with a different body", t.id);
            return Outcome::rejected(ErrorCode::Conflict, msg);
        }
        let payer = match self.find(&t.from, "payer") {
            Ok(i) => i,
            Err(rejection) => return rejection,
        };
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
        if place.owns(&t.to) {
            self.transfer_local(t, payer, payer_after, currency)
        } else {
            self.transfer_remote(place, t, payer, payer_after, currency)
        }
    }

    fn transfer_local(&mut self, t: &Transfer, payer: u32, payer_after: i64, currency: Currency) -> Outcome {
        let payee = match self.find(&t.to, "payee") {
            Ok(i) => i,
            Err(rejection) => return rejection,
        };
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
        self.push_record(Self::new_record(t, payer, AccountRef::Local(payee), currency, TransferStatus::Settled));
        let transfer = Self::accepted_view(t, currency, TransferStatus::Settled);
        Outcome::Transferred { transfer, created: true, outbox: None }
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
        // Commit point.
        self.set_balance(payer, payer_after);
        self.add_leg(payer, &t.id, EntryKind::Debit);
        let payee = AccountRef::Remote(t.to.clone());
        self.push_history(payer, &t.id, payee.clone(), EntryKind::Debit, -t.amount);
        let record_seq = self.push_record(Self::new_record(t, payer, payee, currency, TransferStatus::Pending));
        let transfer = Self::accepted_view(t, currency, TransferStatus::Pending);
        let outbox = self.outbox.entry(dest).or_default();
        outbox.last_seq += 1;
        let seq = outbox.last_seq;
        outbox.sent += i128::from(t.amount);
        outbox.entries.insert(
            seq,
            OutboxEntry {
                record_seq,
                transfer: t.id.clone(),
                from: t.from.clone(),
                to: t.to.clone(),
                amount: t.amount,
                currency,
            },
        );
        Outcome::Transferred { transfer, created: true, outbox: Some((dest, seq)) }
    }

    fn new_record(
        t: &Transfer,
        payer: u32,
        to: AccountRef,
        currency: Currency,
        status: TransferStatus,
    ) -> TransferRecord {
        TransferRecord {
            id: t.id.clone(),
            from: payer,
            to,
            amount: t.amount,
            currency,
            currency_given: t.currency,
            memo_hash: memo_hash(t.memo.as_deref()),
            status,
        }
    }

    pub(crate) fn credit(&mut self, place: &Place<'_>, c: &Credit) -> Outcome {
        let inbox = self.inbox.entry(c.source).or_default();
        if c.seq <= inbox.applied_through {
            if c.seq + INBOX_REFUSALS_RETAINED <= inbox.applied_through {
                let msg = format!("credit {} from cell {} is older than the refusal window", c.seq, c.source);
                return Outcome::rejected(ErrorCode::OutOfOrder, msg);
            }
            return match inbox.refused.get(&c.seq) {
                Some(&code) => Outcome::CreditRefused { code, duplicate: true },
                None => Outcome::CreditApplied { duplicate: true },
            };
        }
        if c.seq != inbox.applied_through + 1 {
            let msg = format!("expected credit {} from cell {}", inbox.applied_through + 1, c.source);
            return Outcome::rejected(ErrorCode::OutOfOrder, msg);
        }
        if !place.owns(&c.to) {
            return place.wrong_cell(&c.to);
        }
        match self.credit_target(c) {
            Ok((payee, payee_after)) => {
                // Commit point.
                let inbox = self.inbox.get_mut(&c.source).expect("created above");
                inbox.applied_through = c.seq;
                inbox.received += i128::from(c.amount);
                self.set_balance(payee, payee_after);
                self.add_leg(payee, &c.transfer, EntryKind::Credit);
                self.push_history(payee, &c.transfer, AccountRef::Remote(c.from.clone()), EntryKind::Credit, c.amount);
                Outcome::CreditApplied { duplicate: false }
            }
            Err(code) => {
                let inbox = self.inbox.get_mut(&c.source).expect("created above");
                inbox.applied_through = c.seq;
                inbox.refused.insert(c.seq, code);
                let horizon = c.seq.saturating_sub(INBOX_REFUSALS_RETAINED);
                while inbox.refused.first_key_value().is_some_and(|(&s, _)| s <= horizon) {
                    inbox.refused.pop_first();
                }
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

    fn closed_before(&self, dest: CellId, seq: u64, fallback: TransferStatus) -> Outcome {
        let sent = self.outbox.get(&dest).map_or(0, |o| o.last_seq);
        if seq == 0 || seq > sent {
            let msg = format!("outbox to cell {dest} has no message {seq}");
            return Outcome::rejected(ErrorCode::InvalidRequest, msg);
        }
        Outcome::OutboxClosed { status: fallback, duplicate: true }
    }

    pub(crate) fn settle(&mut self, dest: CellId, seq: u64) -> Outcome {
        let Some(entry) = self.outbox.get_mut(&dest).and_then(|o| o.entries.remove(&seq)) else {
            return self.closed_before(dest, seq, TransferStatus::Settled);
        };
        if let Some(record) = self.record_mut(entry.record_seq) {
            debug_assert_eq!(record.status, TransferStatus::Pending);
            record.status = TransferStatus::Settled;
        }
        Outcome::OutboxClosed { status: TransferStatus::Settled, duplicate: false }
    }

    pub(crate) fn compensate(&mut self, place: &Place<'_>, dest: CellId, seq: u64) -> Outcome {
        let Some(entry) = self.outbox.get(&dest).and_then(|o| o.entries.get(&seq)) else {
            return self.closed_before(dest, seq, TransferStatus::Reversed);
        };
        if !place.owns(&entry.from) {
            return place.wrong_cell(&entry.from);
        }
        let payer = self.index.get(&entry.from).copied().expect("a payer with an outbox entry exists");
        let Some(after) = self.accounts[payer as usize].balance.checked_add(entry.amount) else {
            return Outcome::rejected(ErrorCode::BalanceOverflow, "payer balance would overflow");
        };
        // Commit point.
        let outbox = self.outbox.get_mut(&dest).expect("found above");
        let entry = outbox.entries.remove(&seq).expect("found above");
        outbox.compensated += i128::from(entry.amount);
        self.set_balance(payer, after);
        self.add_leg(payer, &entry.transfer, EntryKind::Reversal);
        self.push_history(
            payer,
            &entry.transfer,
            AccountRef::Remote(entry.to.clone()),
            EntryKind::Reversal,
            entry.amount,
        );
        if let Some(record) = self.record_mut(entry.record_seq) {
            debug_assert_eq!(record.status, TransferStatus::Pending);
            record.status = TransferStatus::Reversed;
        }
        Outcome::OutboxClosed { status: TransferStatus::Reversed, duplicate: false }
    }

    pub fn account(&self, id: &AccountId) -> Option<AccountView> {
        self.index.get(id).map(|&i| self.view(i))
    }

    pub fn transfer_status(&self, id: &TransferId) -> Option<TransferView> {
        let seq = *self.record_index.get(id)?;
        self.record(seq).map(|r| self.transfer_view(r))
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

    pub fn audit(&self) -> AuditView {
        let mut view = AuditView { accounts: self.accounts.len() as u64, ..AuditView::default() };
        for a in &self.accounts {
            view.balance_sum += i128::from(a.balance);
            if !a.overdraft && a.balance < 0 {
                view.negative_accounts += 1;
            }
        }
        for (&dest, o) in &self.outbox {
            view.sent.push((dest, o.sent));
            view.compensated.push((dest, o.compensated));
            view.outbox_messages += o.entries.len() as u64;
            view.outbox_backlog.push((dest, o.entries.len() as u64));
            view.outbox_sum += o.entries.values().map(|e| i128::from(e.amount)).sum::<i128>();
        }
        view.received = self.inbox.iter().map(|(&s, i)| (s, i.received)).collect();
        view
    }
}
