//! Moving a shard between cells: what leaves one cell and arrives in another,
//! and the move records the audit reconciles (DESIGN.md section 8).
//!
//! A move of shard S from cell B to cell C, numbered by the epoch it installs:
//! 1. B logs `FreezeShard`: no command changes S at B from now on except the
//!    closes (settle, compensate) of S's payers' messages still in flight.
//! 2. Once those are closed (the move waits, with a bound), B exports S: its
//!    accounts, transfer records (idempotency) and history, real and shadow.
//! 3. C logs `InstallShard` with the export: the accounts are there, not
//!    served (C's map still names B).
//! 4. The control plane's map moves to the new epoch by compare-and-set.
//! 5. C installs the map and serves S; B installs it and logs `DropShard`.
//!
//! The money of S leaves B's books and enters C's without a payment: each
//! side keeps a move record (shard, accounts, net balance, digest) and per
//! peer sums of them, so each cell's own identity still balances and the
//! pair reconciliation compares B's moves out with C's moves in.
//!
//! Money in flight: S's payers' messages are closed at B before the export
//! (step 2), so none is pending across the move. A credit for S still on its
//! way to B when S has gone is refused by B with `shard_moved` (its sequence
//! number is used up, so the stream goes on); the payer's cell then sends it
//! again to the shard's owner under the new map, under a new number. A credit
//! B applied before the move, redelivered after it, is answered by B's inbox
//! as applied, as any redelivery is: it is never applied again.

use std::collections::BTreeMap;

use crate::command::{EntryKind, TransferStatus};
use crate::digest;
use crate::ids::{AccountId, CellId, TenantId, TransferId};
use crate::ledger::{AccountRef, Ledger};
use crate::money::Currency;
use crate::older::OldRecord;
use crate::shard::{mix64, stable_hash};

/// How a shard's export is refused while the shard is not frozen for a move.
const NOT_FROZEN: &str = "is not frozen for a move here";

/// The refusal of an export of `shard`, which the cell has not frozen (yet).
pub(crate) fn export_not_frozen(shard: u32) -> crate::Rejection {
    crate::Rejection::new(crate::ErrorCode::InvalidRequest, format!("shard {shard} {NOT_FROZEN}"))
}

/// Whether an export was refused only for not being ready yet: the shard's
/// freeze has not been applied, or its payers' messages are still in flight.
/// A coordinator sends the export together with the freeze, and the export
/// may reach the cell first (see `CellHandle`'s wait for it).
pub fn export_not_ready(r: &crate::Rejection) -> bool {
    r.code == crate::ErrorCode::ShardFrozen
        || (r.code == crate::ErrorCode::InvalidRequest && r.message.ends_with(NOT_FROZEN))
}

/// The most shards one cell may have frozen at once (I7): moves go a few at a time.
pub const FROZEN_SHARDS_MAX: usize = 64;

/// The move records a ledger keeps, newest last, to answer a repeated install (I7).
pub const MOVES_RETAINED: usize = 4096;

/// An account's shard field once it has moved away: its slot stays (records
/// and history name it by position) but nothing reaches it any more.
pub(crate) const GONE: u32 = u32::MAX;

/// One shard's move as one side records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveRecord {
    /// The epoch of the shard map the move installs: unique per move.
    pub id: u64,
    pub shard: u32,
    pub from: CellId,
    pub to: CellId,
    pub accounts: u64,
    /// Σ balances of the shard's accounts.
    pub net: i128,
    /// The shard's digest (accounts and legs).
    pub digest: u64,
}

impl MoveRecord {
    /// The record's fingerprint; peers sum them, so the order of moves does not matter.
    pub fn mix(&self) -> u64 {
        let mut h = mix64(self.id ^ 0x6a09_e667_f3bc_c908);
        h = mix64(h ^ u64::from(self.shard) ^ (u64::from(self.from.0) << 32));
        h = mix64(h ^ u64::from(self.to.0) ^ self.accounts.rotate_left(17));
        h = mix64(h ^ (self.net as u64) ^ ((self.net >> 64) as u64).rotate_left(7));
        mix64(h ^ self.digest)
    }
}

/// The moves between this ledger and one peer cell, both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveFigures {
    pub peer: CellId,
    pub out_moves: u64,
    pub out_net: i128,
    pub out_mix: u64,
    pub in_moves: u64,
    pub in_net: i128,
    pub in_mix: u64,
}

impl MoveFigures {
    pub fn new(peer: CellId) -> Self {
        Self { peer, ..Self::default() }
    }

    fn add_out(&mut self, r: &MoveRecord) {
        self.out_moves += 1;
        self.out_net += r.net;
        self.out_mix = self.out_mix.wrapping_add(r.mix());
    }

    fn add_in(&mut self, r: &MoveRecord) {
        self.in_moves += 1;
        self.in_net += r.net;
        self.in_mix = self.in_mix.wrapping_add(r.mix());
    }

    fn remove_in(&mut self, r: &MoveRecord) {
        self.in_moves -= 1;
        self.in_net -= r.net;
        self.in_mix = self.in_mix.wrapping_sub(r.mix());
    }
}

/// One account as it leaves its cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedAccount {
    pub id: AccountId,
    pub currency: Currency,
    pub balance: i64,
    pub overdraft: bool,
    pub tenant: TenantId,
}

/// One transfer record (the idempotency key and its answer) as it leaves its cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedRecord {
    pub id: TransferId,
    /// Position of the payer in the export's accounts.
    pub from: u32,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
    pub currency_given: Option<Currency>,
    pub memo_hash: u64,
    pub status: TransferStatus,
    pub at_s: u32,
}

/// One history entry as it leaves its cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedEntry {
    /// Position of the account in the export's accounts.
    pub account: u32,
    pub transfer: TransferId,
    pub counterparty: AccountId,
    pub kind: EntryKind,
    pub amount: i64,
    pub balance_after: i64,
}

/// One ledger's part of a shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerExport {
    pub accounts: Vec<ExportedAccount>,
    /// Oldest first.
    pub records: Vec<ExportedRecord>,
    /// Oldest first.
    pub history: Vec<ExportedEntry>,
    /// The digest's part that the accounts' balances do not give: the legs.
    pub legs_digest: u64,
    /// The shard's digest at the source (accounts and legs): the receiving
    /// side computes its own from what it installs and must find this.
    pub digest: u64,
}

impl LedgerExport {
    pub fn net(&self) -> i128 {
        self.accounts.iter().map(|a| i128::from(a.balance)).sum()
    }
}

/// A whole shard on its way from one cell to another: both ledgers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardExport {
    pub shard: u32,
    pub move_id: u64,
    pub from: CellId,
    pub to: CellId,
    pub real: LedgerExport,
    pub shadow: LedgerExport,
}

impl ShardExport {
    pub fn ledger(&self, shadow: bool) -> &LedgerExport {
        if shadow {
            &self.shadow
        } else {
            &self.real
        }
    }

    /// The record of this move for one ledger, as the source counts it.
    pub fn record(&self, shadow: bool) -> MoveRecord {
        let l = self.ledger(shadow);
        MoveRecord {
            id: self.move_id,
            shard: self.shard,
            from: self.from,
            to: self.to,
            accounts: l.accounts.len() as u64,
            net: l.net(),
            digest: l.digest,
        }
    }
}

impl ShardExport {
    /// Adds records of the shard that had left the source's memory (its disk
    /// tier) to the export, oldest first and ahead of those in memory, so the
    /// receiving cell answers their retries. A record the export holds
    /// already (copied to the tier but still in memory) is left out; one
    /// whose payer the export does not carry is answered as an error.
    pub fn add_older(&mut self, older: Vec<(bool, OldRecord)>) -> Result<u64, String> {
        let mut added = 0;
        for shadow in [false, true] {
            let ledger = if shadow { &mut self.shadow } else { &mut self.real };
            let position: std::collections::HashMap<&AccountId, u32> =
                ledger.accounts.iter().enumerate().map(|(k, a)| (&a.id, k as u32)).collect();
            let held: std::collections::HashSet<(u32, &TransferId)> =
                ledger.records.iter().map(|r| (r.from, &r.id)).collect();
            let mut fresh: Vec<ExportedRecord> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut mine: Vec<&OldRecord> = older.iter().filter(|(s, _)| *s == shadow).map(|(_, r)| r).collect();
            // Newest first, so the newest version of a key is the one kept.
            mine.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
            for r in mine {
                let Some(&from) = position.get(&r.from) else {
                    return Err(format!(
                        "a record of transfer {} names payer {}, not in shard {}",
                        r.id, r.from, self.shard
                    ));
                };
                if held.contains(&(from, &r.id)) || !seen.insert((from, r.id.clone())) {
                    continue;
                }
                fresh.push(ExportedRecord {
                    id: r.id.clone(),
                    from,
                    to: r.to.clone(),
                    amount: r.amount,
                    currency: r.currency,
                    currency_given: r.currency_given,
                    memo_hash: r.memo_hash,
                    status: r.status,
                    at_s: (r.at_ms / 1000).min(u64::from(u32::MAX)) as u32,
                });
            }
            fresh.reverse();
            added += fresh.len() as u64;
            fresh.append(&mut ledger.records);
            ledger.records = fresh;
        }
        Ok(added)
    }
}

/// One record of a cell's disk tier on its way to another cell's: raw key,
/// version, time and value (see `older::idempotency_key`, `OldRecord::encode_value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierEntry {
    pub key: Vec<u8>,
    pub seq: u64,
    pub at_ms: u64,
    pub value: Vec<u8>,
}

/// Where the next page of a tier copy starts: a part (a source run of the
/// snapshot × 2 + the ledger) and the last key read in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierCursor {
    pub part: u32,
    pub after_key: Option<Vec<u8>>,
}

/// A page of a shard's records in a cell's disk tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierPage {
    /// The snapshot read (name it in the next page's query).
    pub snapshot: u64,
    /// The highest `seq` of the tier's own records in the snapshot: a later
    /// copy (or the export) reads above it.
    pub through_seq: u64,
    /// The part the entries belong to, and at most how many entries it holds.
    pub part: u32,
    pub keys_max: u64,
    /// In key order.
    pub entries: Vec<TierEntry>,
    /// True when this page ends its part.
    pub last: bool,
    /// Where the next page starts; `None` once the snapshot is read.
    pub next: Option<TierCursor>,
}

/// The moves a ledger took part in: per peer sums, and the newest records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Moves {
    pub per_peer: BTreeMap<CellId, MoveFigures>,
    /// Newest last, at most [`MOVES_RETAINED`].
    pub recent: std::collections::VecDeque<MoveRecord>,
}

impl Moves {
    pub fn is_empty(&self) -> bool {
        self.per_peer.is_empty() && self.recent.is_empty()
    }

    fn remember(&mut self, r: MoveRecord) {
        if self.recent.len() == MOVES_RETAINED {
            self.recent.pop_front();
        }
        self.recent.push_back(r);
    }

    pub fn find(&self, id: u64, shard: u32) -> Option<&MoveRecord> {
        self.recent.iter().rev().find(|r| r.id == id && r.shard == shard)
    }
}

impl Ledger {
    /// Positions of the live accounts of `shard`, in position order.
    fn shard_accounts(&self, shard: u32) -> Vec<u32> {
        let mut members = self.members.get(shard as usize).cloned().unwrap_or_default();
        members.sort_unstable();
        debug_assert!(members.iter().all(|&i| self.accounts[i as usize].shard == shard));
        members
    }

    /// Σ balances and the count of `shard`'s accounts.
    pub(crate) fn shard_net(&self, shard: u32) -> (u64, i128) {
        let members = self.members.get(shard as usize).map_or(&[][..], Vec::as_slice);
        let net = members.iter().map(|&i| i128::from(self.accounts[i as usize].balance)).sum();
        (members.len() as u64, net)
    }

    /// The shard's digest as it stands.
    pub(crate) fn shard_digest(&self, shard: u32) -> u64 {
        self.digests[shard as usize]
    }

    /// Pending transfers of `shard`'s payers: messages in flight that must
    /// close before the shard can leave.
    pub(crate) fn open_messages_of(&self, shard: u32, shards: u32) -> u64 {
        let in_shard = |id: &AccountId| stable_hash(id.as_str().as_bytes()) % u64::from(shards) == u64::from(shard);
        self.outbox.values().flat_map(|o| o.entries.values()).filter(|e| in_shard(&e.from)).count() as u64
    }

    /// Everything of `shard` in this ledger, to install in another cell.
    pub(crate) fn export_shard(&self, shard: u32) -> LedgerExport {
        let members = self.shard_accounts(shard);
        let mut position: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        let mut accounts = Vec::with_capacity(members.len());
        let mut account_terms = 0u64;
        for (k, &i) in members.iter().enumerate() {
            position.insert(i, k as u32);
            let a = &self.accounts[i as usize];
            account_terms = account_terms.wrapping_add(digest::account_term(a.id_hash, a.balance));
            accounts.push(ExportedAccount {
                id: a.id.clone(),
                currency: a.currency,
                balance: a.balance,
                overdraft: a.overdraft,
                tenant: self.tenants[a.tenant as usize].clone(),
            });
        }
        // The shard's accounts as a bitmap over positions: one cached bit per
        // record to tell the shard's records from the others'.
        let mut mine = vec![0u64; self.accounts.len().div_ceil(64)];
        for &i in &members {
            mine[i as usize / 64] |= 1 << (i % 64);
        }
        let is_mine = |i: u32| mine[i as usize / 64] & (1 << (i % 64)) != 0;
        let records = self
            .records
            .iter()
            .chain(self.evicted_pending.values())
            .filter(|r| is_mine(r.from))
            .filter_map(|r| {
                let from = *position.get(&r.from)?;
                Some(ExportedRecord {
                    id: r.id.clone(),
                    from,
                    to: self.resolve(&r.to),
                    amount: r.amount,
                    currency: r.currency,
                    currency_given: r.currency_given,
                    memo_hash: r.memo_hash,
                    status: r.status,
                    at_s: r.at_s,
                })
            })
            .collect();
        // Each account's entries are linked newest to oldest: walk them, then
        // put them back in the ring's order.
        let mut held: Vec<u64> = Vec::new();
        for &i in &members {
            let mut next = self.accounts[i as usize].history_head;
            while let Some(seq) = next.checked_sub(1).filter(|s| *s >= self.history_first_seq) {
                held.push(seq);
                next = self.history[(seq - self.history_first_seq) as usize].prev;
            }
        }
        held.sort_unstable();
        let history = held
            .iter()
            .map(|&seq| &self.history[(seq - self.history_first_seq) as usize])
            .filter_map(|e| {
                let account = *position.get(&e.account)?;
                Some(ExportedEntry {
                    account,
                    transfer: e.transfer.clone(),
                    counterparty: self.resolve(&e.counterparty),
                    kind: e.kind,
                    amount: e.amount,
                    balance_after: e.balance_after,
                })
            })
            .collect();
        let digest = self.digests[shard as usize];
        LedgerExport { accounts, records, history, legs_digest: digest.wrapping_sub(account_terms), digest }
    }

    /// Why `export` cannot be installed here as shard `shard`, if it cannot.
    pub(crate) fn check_install(&self, export: &LedgerExport, shard: u32, shards: u32) -> Result<(), String> {
        if let Some(a) = export.accounts.iter().find(|a| self.index.contains_key(&a.id)) {
            return Err(format!("account {} is already in this cell", a.id));
        }
        let bad_account = |k: u32| k as usize >= export.accounts.len();
        if export.records.iter().any(|r| bad_account(r.from)) || export.history.iter().any(|e| bad_account(e.account)) {
            return Err("the export names an account it does not carry".into());
        }
        if let Some(a) = export.accounts.iter().find(|a| crate::shard::shard_of(a.id.as_str(), shards).0 != shard) {
            return Err(format!("account {} is not in shard {shard}", a.id));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(a) = export.accounts.iter().find(|a| !seen.insert(&a.id)) {
            return Err(format!("account {} appears twice in the export", a.id));
        }
        Ok(())
    }

    /// Puts an exported shard in this ledger (not yet served: the map decides
    /// that) and records the move in, as it arrived; `check_install` first.
    pub(crate) fn install_shard(&mut self, export: &LedgerExport, record: MoveRecord, _shards: u32) -> MoveRecord {
        let base = self.accounts.len() as u32;
        let mut account_terms = 0u64;
        for a in &export.accounts {
            let i = self.accounts.len() as u32;
            let id_hash = stable_hash(a.id.as_str().as_bytes());
            let tenant = self.intern_tenant(&a.tenant);
            self.accounts.push(crate::ledger::Account {
                id: a.id.clone(),
                currency: a.currency,
                balance: a.balance,
                overdraft: a.overdraft,
                tenant,
                shard: record.shard,
                id_hash,
                history_head: 0,
            });
            self.index.insert(a.id.clone(), i);
            self.members[record.shard as usize].push(i);
            self.balance_sum += i128::from(a.balance);
            if !a.overdraft && a.balance < 0 {
                self.negative_accounts += 1;
            }
            account_terms = account_terms.wrapping_add(digest::account_term(id_hash, a.balance));
            if let Some(t) = &mut self.touched {
                t.accounts.push(i);
            }
        }
        let d = &mut self.digests[record.shard as usize];
        *d = d.wrapping_add(account_terms).wrapping_add(export.legs_digest);
        let local = |me: &Self, id: &AccountId| match me.index.get(id) {
            Some(&i) => AccountRef::Local(i),
            None => AccountRef::Remote(id.clone()),
        };
        for r in &export.records {
            let to = local(self, &r.to);
            self.push_record(crate::ledger::TransferRecord {
                id: r.id.clone(),
                from: base + r.from,
                to,
                amount: r.amount,
                currency: r.currency,
                currency_given: r.currency_given,
                memo_hash: r.memo_hash,
                status: r.status,
                at_s: r.at_s,
                same_id_prev: 0,
                copied_at: 0,
            });
        }
        for e in &export.history {
            let counterparty = local(self, &e.counterparty);
            let i = base + e.account;
            self.push_history_entry(i, &e.transfer, counterparty, e.kind, e.amount, e.balance_after);
        }
        // What arrived, counted here: equal to the source's record unless something was lost on the way.
        let mut arrived = record;
        arrived.accounts = export.accounts.len() as u64;
        arrived.net = export.net();
        arrived.digest = self.digests[record.shard as usize];
        self.moves.per_peer.entry(record.from).or_insert_with(|| MoveFigures::new(record.from)).add_in(&arrived);
        self.moves.remember(arrived);
        arrived
    }

    /// Takes a shard's accounts out of this ledger (they have moved away, or
    /// an install is undone) and answers what they held.
    fn take_out(&mut self, shard: u32) -> (u64, i128) {
        let members = self.shard_accounts(shard);
        let mut net = 0i128;
        for &i in &members {
            let a = &mut self.accounts[i as usize];
            net += i128::from(a.balance);
            self.balance_sum -= i128::from(a.balance);
            if !a.overdraft && a.balance < 0 {
                self.negative_accounts -= 1;
            }
            a.balance = 0;
            a.shard = GONE;
            let id = a.id.clone();
            self.index.remove(&id);
        }
        self.members[shard as usize].clear();
        self.digests[shard as usize] = 0;
        (members.len() as u64, net)
    }

    /// Drops a shard that has moved to `record.to`, recording the move out.
    pub(crate) fn drop_shard(&mut self, mut record: MoveRecord) -> MoveRecord {
        record.digest = self.digests[record.shard as usize];
        let (accounts, net) = self.take_out(record.shard);
        record.accounts = accounts;
        record.net = net;
        self.moves.per_peer.entry(record.to).or_insert_with(|| MoveFigures::new(record.to)).add_out(&record);
        self.moves.remember(record);
        record
    }

    /// Undoes an install whose move did not happen (the map never named this cell).
    pub(crate) fn discard_shard(&mut self, id: u64, shard: u32) -> bool {
        let Some(k) = self.moves.recent.iter().rposition(|r| r.id == id && r.shard == shard) else {
            return false;
        };
        let record = self.moves.recent.remove(k).expect("found above");
        self.take_out(shard);
        if let Some(m) = self.moves.per_peer.get_mut(&record.from) {
            m.remove_in(&record);
        }
        true
    }

    /// The move figures, per peer, in cell order.
    pub fn move_figures(&self) -> Vec<MoveFigures> {
        self.moves.per_peer.values().copied().collect()
    }
}

/// The most moves in flight between one pair the reconciliation tells apart
/// (it tries each way they may stand); past it a mismatch is only transient.
const PENDING_MOVES_COMPARED_MAX: usize = 12;

/// Reconciles the moves of one ordered pair B → C from B's figures and C's:
/// every move B counts out (it dropped the shard) must be counted in by C
/// with the same accounts, net and digest, and every move C counts in and
/// serves must be counted out by B. A move in flight may stand half done:
/// frozen at B (`b_frozen`, as it would be recorded now) and counted in at
/// C, or dropped at B and still undecided at C (`c_arrived`: installs no map
/// has decided at C), or undone at B while C has not yet undone its copy.
pub fn reconcile_moves(
    b: CellId,
    b_moves: &MoveFigures,
    b_frozen: &[MoveRecord],
    c: CellId,
    c_moves: &MoveFigures,
    c_arrived: &[MoveRecord],
) -> Option<crate::audit::Finding> {
    use crate::audit::Finding;
    let x = (b_moves.out_moves, b_moves.out_net, b_moves.out_mix);
    let y = (c_moves.in_moves, c_moves.in_net, c_moves.in_mix);
    if x == y {
        return None;
    }
    let frozen: Vec<&MoveRecord> = b_frozen.iter().filter(|r| r.to == c).collect();
    let arrived: Vec<&MoveRecord> = c_arrived.iter().filter(|r| r.from == b).collect();
    let add = |t: (u64, i128, u64), r: &MoveRecord| (t.0 + 1, t.1 + r.net, t.2.wrapping_add(r.mix()));
    // What C counts in and serves (or served): its installs minus those undecided.
    let decided = arrived.iter().fold(y, |t, r| (t.0 - 1, t.1 - r.net, t.2.wrapping_sub(r.mix())));
    let pending = frozen.len() + arrived.len();
    if pending <= PENDING_MOVES_COMPARED_MAX {
        for k in 0u32..(1 << pending) {
            // Frozen at B and already served at C; dropped at B and still undecided at C.
            let pick = |i: usize| k & (1 << i) != 0;
            let out = frozen.iter().enumerate().filter(|(i, _)| pick(*i)).fold(x, |t, (_, r)| add(t, r));
            let inn =
                arrived.iter().enumerate().filter(|(i, _)| pick(frozen.len() + i)).fold(decided, |t, (_, r)| add(t, r));
            if out == inn {
                return None;
            }
        }
    }
    if y.0 < x.0 {
        return Some(Finding::MoveLost { source: b, dest: c, moves: x.0 - y.0, amount: x.1 - y.1 });
    }
    let detail = format!(
        "cell {b} moved out {} shards holding {}, cell {c} moved in {} holding {}{}",
        x.0,
        x.1,
        y.0,
        y.1,
        if x.0 == y.0 && x.1 == y.1 { " (the shards' digests or accounts differ)" } else { "" }
    );
    // More moves in at C than B accounts for: B may have started one between the reads.
    Some(Finding::MoveDiverged {
        source: b,
        dest: c,
        detail,
        transient: decided.0 > x.0 || pending > PENDING_MOVES_COMPARED_MAX,
    })
}

/// The most accounts, records or entries one ledger's export may carry (I7).
pub const EXPORT_ITEMS_MAX: u64 = 1 << 24;

use crate::codec::{DecodeError, Reader, Writer};
use crate::snapshot::{decode_kind, kind_tag};

/// Appends a move record.
pub fn encode_move_record(w: &mut Writer, m: &MoveRecord) {
    w.u64(m.id);
    w.u32(m.shard);
    w.u32(m.from.0);
    w.u32(m.to.0);
    w.u64(m.accounts);
    w.i128(m.net);
    w.u64(m.digest);
}

pub fn decode_move_record(r: &mut Reader<'_>) -> Result<MoveRecord, DecodeError> {
    Ok(MoveRecord {
        id: r.u64()?,
        shard: r.u32()?,
        from: CellId(r.u32()?),
        to: CellId(r.u32()?),
        accounts: r.u64()?,
        net: r.i128()?,
        digest: r.u64()?,
    })
}

/// Appends a move's per-peer figures.
pub fn encode_move_figures(w: &mut Writer, m: &MoveFigures) {
    w.u32(m.peer.0);
    w.u64(m.out_moves);
    w.i128(m.out_net);
    w.u64(m.out_mix);
    w.u64(m.in_moves);
    w.i128(m.in_net);
    w.u64(m.in_mix);
}

pub fn decode_move_figures(r: &mut Reader<'_>) -> Result<MoveFigures, DecodeError> {
    Ok(MoveFigures {
        peer: CellId(r.u32()?),
        out_moves: r.u64()?,
        out_net: r.i128()?,
        out_mix: r.u64()?,
        in_moves: r.u64()?,
        in_net: r.i128()?,
        in_mix: r.u64()?,
    })
}

fn encode_ledger_export(w: &mut Writer, l: &LedgerExport) {
    w.u64(l.accounts.len() as u64);
    for a in &l.accounts {
        w.id(a.id.as_str());
        w.currency(a.currency);
        w.i64(a.balance);
        w.bool(a.overdraft);
        w.id(a.tenant.as_str());
    }
    w.u64(l.records.len() as u64);
    for r in &l.records {
        w.id(r.id.as_str());
        w.u32(r.from);
        w.id(r.to.as_str());
        w.i64(r.amount);
        w.currency(r.currency);
        w.opt_currency(r.currency_given);
        w.u64(r.memo_hash);
        w.status(r.status);
        w.u32(r.at_s);
    }
    w.u64(l.history.len() as u64);
    for e in &l.history {
        w.u32(e.account);
        w.id(e.transfer.as_str());
        w.id(e.counterparty.as_str());
        w.u8(kind_tag(e.kind));
        w.i64(e.amount);
        w.i64(e.balance_after);
    }
    w.u64(l.legs_digest);
    w.u64(l.digest);
}

fn decode_ledger_export(r: &mut Reader<'_>) -> Result<LedgerExport, DecodeError> {
    let n = r.count(EXPORT_ITEMS_MAX)?;
    let mut accounts = Vec::with_capacity(r.capacity_for(n, 16));
    for _ in 0..n {
        accounts.push(ExportedAccount {
            id: r.account_id()?,
            currency: r.currency()?,
            balance: r.i64()?,
            overdraft: r.bool()?,
            tenant: r.tenant_id()?,
        });
    }
    let n = r.count(EXPORT_ITEMS_MAX)?;
    let mut records = Vec::with_capacity(r.capacity_for(n, 32));
    for _ in 0..n {
        records.push(ExportedRecord {
            id: r.transfer_id()?,
            from: r.u32()?,
            to: r.account_id()?,
            amount: r.i64()?,
            currency: r.currency()?,
            currency_given: r.opt_currency()?,
            memo_hash: r.u64()?,
            status: r.status()?,
            at_s: r.u32()?,
        });
    }
    let n = r.count(EXPORT_ITEMS_MAX)?;
    let mut history = Vec::with_capacity(r.capacity_for(n, 24));
    for _ in 0..n {
        history.push(ExportedEntry {
            account: r.u32()?,
            transfer: r.transfer_id()?,
            counterparty: r.account_id()?,
            kind: decode_kind(r)?,
            amount: r.i64()?,
            balance_after: r.i64()?,
        });
    }
    Ok(LedgerExport { accounts, records, history, legs_digest: r.u64()?, digest: r.u64()? })
}

/// Appends a shard export (the log's `InstallShard`, the wire's export answer).
pub fn encode_export(w: &mut Writer, e: &ShardExport) {
    w.u32(e.shard);
    w.u64(e.move_id);
    w.u32(e.from.0);
    w.u32(e.to.0);
    encode_ledger_export(w, &e.real);
    encode_ledger_export(w, &e.shadow);
}

pub fn decode_export(r: &mut Reader<'_>) -> Result<ShardExport, DecodeError> {
    Ok(ShardExport {
        shard: r.u32()?,
        move_id: r.u64()?,
        from: CellId(r.u32()?),
        to: CellId(r.u32()?),
        real: decode_ledger_export(r)?,
        shadow: decode_ledger_export(r)?,
    })
}
