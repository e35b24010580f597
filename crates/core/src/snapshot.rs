//! Snapshots: the whole state of a cell as bytes, so recovery starts from a
//! checkpoint instead of replaying all history.
//!
//! The encoding is deterministic: the same state always gives the same bytes.
//! Hash indexes are not stored; they are rebuilt from the vectors they index.

use std::collections::{BTreeMap, VecDeque};

use crate::audit::{InboxFigures, OutboxFigures};
use crate::codec::{decode_shard_map, encode_shard_map, DecodeError, Reader, Writer, FORMAT_VERSION};
use crate::command::{EntryKind, TransferStatus};
use crate::ids::{CellId, TransferId};
use crate::ledger::{
    Account, AccountRef, Entry, Inbox, InboxMark, Ledger, Limits, Outbox, OutboxEntry, TransferRecord,
};
use crate::state::CellState;

/// 02: pair figures and chains in outboxes and inboxes, the inbox tail,
/// transfer ids unique per payer. 03: accounts carry their tenant. 04: the
/// cell's clock, and the time of each transfer record. An older snapshot is
/// refused with its magic.
const MAGIC: &[u8; 8] = b"CPSNAP04";
/// No count in a snapshot may exceed this (I7). Room reserved for a count is
/// also bounded by the bytes left ([`Reader::capacity_for`]), at the fewest
/// bytes each item takes below, so a count that lies allocates nothing big.
const COUNT_MAX: u64 = 1 << 32;
/// An account with one-byte ids: id, currency, balance, overdraft, tenant, history head.
const ACCOUNT_BYTES_MIN: usize = 2 + 3 + 8 + 1 + 2 + 8;
/// A transfer record with a one-byte id and a local payee.
const RECORD_BYTES_MIN: usize = 2 + 4 + 5 + 8 + 3 + 1 + 8 + 1 + 4;
/// A history entry with a one-byte transfer id and a local counterparty.
const ENTRY_BYTES_MIN: usize = 4 + 8 + 2 + 5 + 1 + 8 + 8;
/// An inbox mark that refused nothing.
const MARK_BYTES_MIN: usize = 8 + 8 + 1 + 8;

pub(crate) fn kind_tag(k: EntryKind) -> u8 {
    match k {
        EntryKind::Debit => 0,
        EntryKind::Credit => 1,
        EntryKind::Reversal => 2,
    }
}

/// Encodes the whole cell state.
pub fn encode(state: &CellState) -> Vec<u8> {
    encode_with_capacity(state, 0)
}

/// Encodes the whole cell state into a buffer of at least `capacity` bytes;
/// pass the size of the last snapshot to avoid regrowing the buffer.
pub fn encode_with_capacity(state: &CellState, capacity: usize) -> Vec<u8> {
    let mut w = Writer::with_capacity(capacity.max(4096));
    w.buf.extend_from_slice(MAGIC);
    w.u8(FORMAT_VERSION);
    w.u32(state.cell.0);
    w.u64(state.applied);
    w.u64(state.clock_ms);
    encode_shard_map(&mut w, &state.map);
    encode_ledger(&mut w, &state.real);
    encode_ledger(&mut w, &state.shadow);
    encode_moves(&mut w, state);
    w.buf
}

/// Marks the optional trailer with the state of shard moves; a cell that
/// never moved a shard writes none, so its snapshots read as before.
const MOVES_TRAILER: u8 = b'M';

fn gone(l: &Ledger) -> Vec<u32> {
    (0..l.accounts.len() as u32).filter(|&i| l.accounts[i as usize].shard == crate::moves::GONE).collect()
}

fn encode_moves(w: &mut Writer, state: &CellState) {
    let ledgers = [&state.real, &state.shadow];
    let any = !state.frozen.is_empty()
        || !state.moved_away.is_empty()
        || !state.arrived.is_empty()
        || ledgers.iter().any(|l| !l.moves.is_empty() || !gone(l).is_empty());
    if !any {
        return;
    }
    w.u8(MOVES_TRAILER);
    w.u64(state.frozen.len() as u64);
    for (&shard, &(id, to)) in &state.frozen {
        w.u32(shard);
        w.u64(id);
        w.u32(to.0);
    }
    w.u64(state.moved_away.len() as u64);
    for (&shard, &(to, id)) in &state.moved_away {
        w.u32(shard);
        w.u32(to.0);
        w.u64(id);
    }
    w.u64(state.arrived.len() as u64);
    for (&shard, &id) in &state.arrived {
        w.u32(shard);
        w.u64(id);
    }
    for l in ledgers {
        let gone = gone(l);
        w.u64(gone.len() as u64);
        gone.iter().for_each(|&i| w.u32(i));
        w.u64(l.moves.per_peer.len() as u64);
        l.moves.per_peer.values().for_each(|m| crate::moves::encode_move_figures(w, m));
        w.u64(l.moves.recent.len() as u64);
        l.moves.recent.iter().for_each(|m| crate::moves::encode_move_record(w, m));
    }
}

/// Reads the moves trailer, if any; `dups` are the accounts each ledger
/// found twice (a shard that moved away and back): each must be gone.
fn decode_moves(r: &mut Reader<'_>, state: &mut CellState, dups: [Vec<u32>; 2]) -> Result<(), DecodeError> {
    if r.is_empty() {
        return if dups.iter().all(Vec::is_empty) { Ok(()) } else { Err(r.error("an account appears twice")) };
    }
    if r.u8()? != MOVES_TRAILER {
        return Err(r.error("trailing bytes after the snapshot"));
    }
    let shards = state.map.shards();
    for _ in 0..r.count(u64::from(shards))? {
        let (shard, id, to) = (r.u32()?, r.u64()?, CellId(r.u32()?));
        state.frozen.insert(shard, (id, to));
    }
    for _ in 0..r.count(u64::from(shards))? {
        let (shard, to, id) = (r.u32()?, CellId(r.u32()?), r.u64()?);
        state.moved_away.insert(shard, (to, id));
    }
    for _ in 0..r.count(u64::from(shards))? {
        let (shard, id) = (r.u32()?, r.u64()?);
        state.arrived.insert(shard, id);
    }
    for (l, dups) in [&mut state.real, &mut state.shadow].into_iter().zip(dups) {
        let n = r.count(l.accounts.len() as u64)?;
        let mut gone = std::collections::BTreeSet::new();
        for _ in 0..n {
            let i = r.u32()?;
            if i as usize >= l.accounts.len() || !gone.insert(i) {
                return Err(r.error("a moved-away account is not an account"));
            }
            let a = &mut l.accounts[i as usize];
            if a.balance != 0 {
                return Err(r.error("a moved-away account holds money"));
            }
            if l.index.get(&a.id) == Some(&i) {
                l.index.remove(&a.id);
            }
            a.shard = crate::moves::GONE;
        }
        if dups.iter().any(|i| !gone.contains(i)) {
            return Err(r.error("an account appears twice"));
        }
        for _ in 0..r.count(COUNT_MAX)? {
            let m = crate::moves::decode_move_figures(r)?;
            l.moves.per_peer.insert(m.peer, m);
        }
        for _ in 0..r.count(crate::moves::MOVES_RETAINED as u64)? {
            l.moves.recent.push_back(crate::moves::decode_move_record(r)?);
        }
    }
    // Digests of the shards that left were zeroed when they left; the sums are rebuilt by walking.
    Ok(())
}

fn encode_ledger(w: &mut Writer, l: &Ledger) {
    w.u64(l.limits.transfers_retained_max as u64);
    w.u64(l.limits.history_entries_max as u64);
    w.u64(l.accounts.len() as u64);
    for a in &l.accounts {
        w.id(a.id.as_str());
        w.currency(a.currency);
        w.i64(a.balance);
        w.bool(a.overdraft);
        w.id(l.tenants[a.tenant as usize].as_str());
        w.u64(a.history_head);
    }
    w.u64(l.records_first_seq);
    w.u64(l.records.len() as u64);
    for r in &l.records {
        encode_record(w, r);
    }
    // Records that left memory pending, by sequence number (a deterministic order).
    let mut pending: Vec<(&u64, &(TransferId, u32))> = l.evicted_pending_seq.iter().collect();
    pending.sort_unstable_by_key(|(seq, _)| **seq);
    w.u64(pending.len() as u64);
    for (seq, key) in pending {
        w.u64(*seq);
        encode_record(w, &l.evicted_pending[key]);
    }
    w.u64(l.history_first_seq);
    w.u64(l.history.len() as u64);
    for e in &l.history {
        w.u32(e.account);
        w.u64(e.prev);
        w.id(e.transfer.as_str());
        encode_ref(w, &e.counterparty);
        w.u8(kind_tag(e.kind));
        w.i64(e.amount);
        w.i64(e.balance_after);
    }
    w.u64(l.outbox.len() as u64);
    for (dest, o) in &l.outbox {
        w.u32(dest.0);
        let f = &o.figures;
        w.u64(f.last_seq);
        w.i128(f.sent);
        w.u64(f.closed_through);
        w.i128(f.settled);
        w.i128(f.compensated);
        w.u64(f.closed_chain);
        w.u64(f.sent_chain);
        w.u64(o.entries.len() as u64);
        for (seq, e) in &o.entries {
            w.u64(*seq);
            w.u64(e.record_seq);
            w.i128(e.sent_through);
            w.u64(e.sent_chain);
            w.id(e.transfer.as_str());
            w.id(e.from.as_str());
            w.id(e.to.as_str());
            w.i64(e.amount);
            w.currency(e.currency);
        }
    }
    w.u64(l.inbox.len() as u64);
    for (source, i) in &l.inbox {
        w.u32(source.0);
        let f = &i.figures;
        w.u64(f.applied_through);
        w.i128(f.received);
        w.i128(f.refused);
        w.u64(f.chain);
        w.u64(f.message_chain);
        w.u64(i.tail.len() as u64);
        for m in &i.tail {
            w.u64(m.digest);
            w.i64(m.amount);
            match m.refused {
                Some(code) => {
                    w.u8(1);
                    w.u8(code.tag());
                }
                None => w.u8(0),
            }
            w.u64(m.chain);
        }
    }
    w.i128(l.balance_sum);
    w.u64(l.negative_accounts);
    for d in &l.digests {
        w.u64(*d);
    }
}

/// Decodes a snapshot written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<CellState, DecodeError> {
    let mut r = Reader::new(bytes, "snapshot");
    let magic: Vec<u8> = (0..MAGIC.len()).map(|_| r.u8()).collect::<Result<_, _>>()?;
    if magic != MAGIC {
        return Err(r.error("not a cellpay snapshot"));
    }
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(r.error(format!("unknown format version {version}")));
    }
    let cell = CellId(r.u32()?);
    let applied = r.u64()?;
    let clock_ms = r.u64()?;
    let map = decode_shard_map(&mut r)?;
    let map_shards = map.shards();
    let (real, real_dups) = decode_ledger(&mut r, &map)?;
    let (shadow, shadow_dups) = decode_ledger(&mut r, &map)?;
    let mut state = CellState {
        cell,
        map,
        real,
        shadow,
        applied,
        clock_ms,
        frozen: BTreeMap::new(),
        moved_away: BTreeMap::new(),
        arrived: BTreeMap::new(),
        load: crate::state::ShardLoad(vec![0; map_shards as usize]),
    };
    decode_moves(&mut r, &mut state, [real_dups, shadow_dups])?;
    for l in [&mut state.real, &mut state.shadow] {
        for (i, a) in l.accounts.iter().enumerate().filter(|(_, a)| a.shard != crate::moves::GONE) {
            l.members[a.shard as usize].push(i as u32);
        }
    }
    if !r.is_empty() {
        return Err(r.error("trailing bytes after the snapshot"));
    }
    Ok(state)
}

fn encode_record(w: &mut Writer, r: &TransferRecord) {
    w.id(r.id.as_str());
    w.u32(r.from);
    encode_ref(w, &r.to);
    w.i64(r.amount);
    w.currency(r.currency);
    w.opt_currency(r.currency_given);
    w.u64(r.memo_hash);
    w.status(r.status);
    w.u32(r.at_s);
}

fn decode_record(r: &mut Reader<'_>, accounts: usize) -> Result<TransferRecord, DecodeError> {
    Ok(TransferRecord {
        id: r.transfer_id()?,
        from: decode_local(r, accounts)?,
        to: decode_ref(r, accounts)?,
        amount: r.i64()?,
        currency: r.currency()?,
        currency_given: r.opt_currency()?,
        memo_hash: r.u64()?,
        status: r.status()?,
        at_s: r.u32()?,
        same_id_prev: 0,
        copied_at: 0,
    })
}

fn encode_ref(w: &mut Writer, r: &AccountRef) {
    match r {
        AccountRef::Local(i) => {
            w.u8(0);
            w.u32(*i);
        }
        AccountRef::Remote(id) => {
            w.u8(1);
            w.id(id.as_str());
        }
    }
}

fn decode_local(r: &mut Reader<'_>, accounts: usize) -> Result<u32, DecodeError> {
    let i = r.u32()?;
    if i as usize >= accounts {
        return Err(r.error(format!("account index {i} out of range")));
    }
    Ok(i)
}

fn decode_ref(r: &mut Reader<'_>, accounts: usize) -> Result<AccountRef, DecodeError> {
    match r.u8()? {
        0 => decode_local(r, accounts).map(AccountRef::Local),
        1 => r.account_id().map(AccountRef::Remote),
        other => Err(r.error(format!("bad account reference tag {other}"))),
    }
}

pub(crate) fn decode_kind(r: &mut Reader<'_>) -> Result<EntryKind, DecodeError> {
    match r.u8()? {
        0 => Ok(EntryKind::Debit),
        1 => Ok(EntryKind::Credit),
        2 => Ok(EntryKind::Reversal),
        other => Err(r.error(format!("bad entry kind {other}"))),
    }
}

fn decode_ledger(r: &mut Reader<'_>, map: &crate::shard::ShardMap) -> Result<(Ledger, Vec<u32>), DecodeError> {
    let mut dups = Vec::new();
    let transfers_retained_max = r.count(COUNT_MAX)?;
    let history_entries_max = r.count(COUNT_MAX)?;
    if transfers_retained_max == 0 || history_entries_max == 0 {
        return Err(r.error("retention limits must be positive"));
    }
    let limits = Limits { transfers_retained_max, history_entries_max };
    let mut l = Ledger::new(limits, map.shards());
    let n = r.count(u64::from(u32::MAX))?;
    l.accounts.reserve(r.capacity_for(n, ACCOUNT_BYTES_MIN));
    l.index.reserve(r.capacity_for(n, ACCOUNT_BYTES_MIN));
    for i in 0..n {
        let id = r.account_id()?;
        let id_hash = crate::shard::stable_hash(id.as_str().as_bytes());
        let shard = (id_hash % u64::from(map.shards())) as u32;
        debug_assert_eq!(shard, map.shard_of(id.as_str()).0);
        let (currency, balance, overdraft) = (r.currency()?, r.i64()?, r.bool()?);
        let tenant = l.intern_tenant(&r.tenant_id()?);
        let account =
            Account { currency, balance, overdraft, tenant, history_head: r.u64()?, id: id.clone(), shard, id_hash };
        // An id seen before is an account that moved away and came back:
        // the moves trailer must name the earlier one gone.
        if let Some(earlier) = l.index.insert(id, i as u32) {
            dups.push(earlier);
        }
        l.accounts.push(account);
    }
    let accounts = l.accounts.len();
    l.records_first_seq = r.u64()?;
    // The ring may hold more than its limit at a checkpoint: records copied out
    // to the disk tier stay until every queued work could see them there
    // (`Ledger::release_records`), at most about a queue's worth more. So the
    // count is bounded like any other, and only the allocation by the limit.
    let n = r.count(COUNT_MAX)?;
    let expected = r.capacity_for(n.min(transfers_retained_max.saturating_mul(2)), RECORD_BYTES_MIN);
    l.records = VecDeque::with_capacity(expected);
    l.record_index.reserve(expected);
    for k in 0..n {
        let record = decode_record(r, accounts)?;
        let mut record = record;
        let seq = l.records_first_seq + k as u64;
        let prev = l.record_index.insert(record.id.clone(), seq);
        record.same_id_prev = prev.map_or(0, |p| p + 1);
        l.records.push_back(record);
    }
    let n = r.count(COUNT_MAX)?;
    for _ in 0..n {
        let seq = r.u64()?;
        let record = decode_record(r, accounts)?;
        if seq >= l.records_first_seq || record.status != TransferStatus::Pending {
            return Err(r.error("an evicted pending record is not an evicted pending record"));
        }
        let key = (record.id.clone(), record.from);
        if l.evicted_pending_seq.insert(seq, key.clone()).is_some() || l.evicted_pending.insert(key, record).is_some() {
            return Err(r.error("an evicted pending record appears twice"));
        }
    }
    l.history_first_seq = r.u64()?;
    let n = r.count(history_entries_max as u64)?;
    l.history = VecDeque::with_capacity(r.capacity_for(n, ENTRY_BYTES_MIN));
    for _ in 0..n {
        let entry = Entry {
            account: r.u32()?,
            prev: r.u64()?,
            transfer: r.transfer_id()?,
            counterparty: decode_ref(r, accounts)?,
            kind: decode_kind(r)?,
            amount: r.i64()?,
            balance_after: r.i64()?,
        };
        if entry.account as usize >= l.accounts.len() {
            return Err(r.error("a history entry names an unknown account"));
        }
        l.history.push_back(entry);
    }
    let n = r.count(COUNT_MAX)?;
    for _ in 0..n {
        let dest = CellId(r.u32()?);
        let figures = OutboxFigures {
            dest,
            last_seq: r.u64()?,
            sent: r.i128()?,
            closed_through: r.u64()?,
            settled: r.i128()?,
            compensated: r.i128()?,
            closed_chain: r.u64()?,
            sent_chain: r.u64()?,
        };
        if figures.closed_through > figures.last_seq {
            return Err(r.error("an outbox closed more than it sent"));
        }
        let mut o = Outbox { figures, entries: BTreeMap::new() };
        let m = r.count(COUNT_MAX)?;
        for _ in 0..m {
            let seq = r.u64()?;
            if seq <= figures.closed_through || seq > figures.last_seq {
                return Err(r.error(format!("outbox message {seq} is outside the open range")));
            }
            let entry = OutboxEntry {
                record_seq: r.u64()?,
                sent_through: r.i128()?,
                sent_chain: r.u64()?,
                transfer: r.transfer_id()?,
                from: r.account_id()?,
                to: r.account_id()?,
                amount: r.i64()?,
                currency: r.currency()?,
            };
            o.entries.insert(seq, entry);
        }
        l.outbox.insert(dest, o);
    }
    let n = r.count(COUNT_MAX)?;
    for _ in 0..n {
        let source = CellId(r.u32()?);
        let figures = InboxFigures {
            source,
            applied_through: r.u64()?,
            received: r.i128()?,
            refused: r.i128()?,
            chain: r.u64()?,
            message_chain: r.u64()?,
        };
        let m = r.count(crate::audit::INBOX_TAIL_RETAINED as u64)?;
        if m as u64 > figures.applied_through {
            return Err(r.error("an inbox tail is longer than what it applied"));
        }
        let mut tail = VecDeque::with_capacity(r.capacity_for(m, MARK_BYTES_MIN));
        for _ in 0..m {
            let digest = r.u64()?;
            let amount = r.i64()?;
            let refused = match r.u8()? {
                0 => None,
                1 => Some(r.error_code()?),
                other => return Err(r.error(format!("bad refusal flag {other}"))),
            };
            tail.push_back(InboxMark { digest, amount, refused, chain: r.u64()? });
        }
        l.inbox.insert(source, Inbox { figures, tail });
    }
    l.balance_sum = r.i128()?;
    l.negative_accounts = r.u64()?;
    for d in l.digests.iter_mut() {
        *d = r.u64()?;
    }
    Ok((l, dups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::ShardMap;

    /// The empty state of one cell of one shard, and where its real ledger starts.
    fn empty() -> (Vec<u8>, usize) {
        let state = CellState::new(CellId(0), ShardMap::round_robin(1, 1).unwrap(), Limits::default());
        let bytes = encode(&state);
        assert!(decode(&bytes).is_ok());
        (bytes, MAGIC.len() + 1 + 4 + 8 + 8 + 8 + 4 + 4)
    }

    fn set_u64(bytes: &mut [u8], at: usize, v: u64) {
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Found by the `snapshot` fuzz target: a count of 2^32 - 1 accounts
    /// reserved room for all of them (hundreds of GB) before the first failed
    /// to decode; a history count up to its limit of 2^32 did the same.
    #[test]
    fn a_count_reserves_only_what_the_bytes_can_hold() {
        let (good, ledger) = empty();
        let mut bytes = good.clone();
        set_u64(&mut bytes, ledger + 16, u64::from(u32::MAX));
        assert!(decode(&bytes).is_err());
        // No accounts and no records: the history count follows the two
        // record counts and their first sequence number.
        let mut bytes = good.clone();
        set_u64(&mut bytes, ledger + 8, COUNT_MAX);
        let history = ledger + 24 + 8 + 8 + 8 + 8;
        set_u64(&mut bytes, history, COUNT_MAX);
        assert!(decode(&bytes).is_err());
    }
}
