//! Idempotency records that have left a ledger's memory.
//!
//! A ledger keeps its newest transfer records in memory (`transfers_retained_max`).
//! When the engine gives it a place to put older ones (a disk tier), a record
//! that leaves memory is handed out as an [`OldRecord`] (see
//! `Ledger::take_spilled`), and a transfer whose key is not in memory asks an
//! [`OlderRecords`] the engine looked up *before* the batch ran: the writer
//! never reads a disk. The key starts with the ledger and the payer's shard, so
//! the records of a shard can move with it.

use crate::codec::{DecodeError, Reader, Writer};
use crate::command::{TransferStatus, TransferView};
use crate::ids::{AccountId, TransferId};
use crate::money::Currency;
use crate::shard::stable_hash;

/// A transfer record as it is kept outside memory: what a retry needs to be
/// answered (the original transfer) or refused (another body: `conflict`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRecord {
    pub id: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
    /// The currency as the client sent it (part of the idempotency body).
    pub currency_given: Option<Currency>,
    pub memo_hash: u64,
    /// Settled or reversed: a record leaves memory pending only to stay in
    /// the ledger until its transfer closes.
    pub status: TransferStatus,
    /// The cell's clock when the transfer was accepted (Unix milliseconds).
    pub at_ms: u64,
}

impl OldRecord {
    pub fn view(&self) -> TransferView {
        TransferView {
            id: self.id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            amount: self.amount,
            currency: self.currency,
            status: self.status,
        }
    }

    /// The record's key in a tier of `shards` shards: see [`idempotency_key`].
    pub fn key(&self, shadow: bool, shards: u32) -> Vec<u8> {
        idempotency_key(shadow, shards, &self.from, &self.id)
    }

    /// The value stored under the key (the key's parts are not repeated).
    pub fn encode_value(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.id(self.to.as_str());
        w.i64(self.amount);
        w.currency(self.currency);
        w.opt_currency(self.currency_given);
        w.u64(self.memo_hash);
        w.status(self.status);
        w.u64(self.at_ms);
        w.buf
    }

    /// The record of `from` + `id` from its stored value.
    pub fn decode_value(from: &AccountId, id: &TransferId, bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "idempotency record");
        let to = r.account_id()?;
        let amount = r.i64()?;
        let currency = r.currency()?;
        let currency_given = r.opt_currency()?;
        let memo_hash = r.u64()?;
        let status = r.status()?;
        let at_ms = r.u64()?;
        if !r.is_empty() {
            return Err(r.error("trailing bytes after the record"));
        }
        Ok(Self { id: id.clone(), from: from.clone(), to, amount, currency, currency_given, memo_hash, status, at_ms })
    }
}

/// The key of payer + transfer id in a ledger: the ledger (1 byte), the
/// payer's shard (4 bytes, big-endian, so a shard's records are one range),
/// the payer's id with its length, then the transfer id.
pub fn idempotency_key(shadow: bool, shards: u32, payer: &AccountId, id: &TransferId) -> Vec<u8> {
    let shard = (stable_hash(payer.as_str().as_bytes()) % u64::from(shards.max(1))) as u32;
    let (p, t) = (payer.as_str().as_bytes(), id.as_str().as_bytes());
    let mut key = Vec::with_capacity(6 + p.len() + t.len());
    key.push(u8::from(shadow));
    key.extend_from_slice(&shard.to_be_bytes());
    key.push(p.len() as u8);
    key.extend_from_slice(p);
    key.extend_from_slice(t);
    key
}

/// The keys of one ledger's records of one shard: `from <= key < to`.
pub fn shard_key_range(shadow: bool, shard: u32) -> (Vec<u8>, Vec<u8>) {
    let bound = |s: u64| {
        let mut k = vec![u8::from(shadow)];
        k.extend_from_slice(&(s as u32).to_be_bytes());
        if s > u64::from(u32::MAX) {
            // Past the last shard: the next ledger's first key.
            return vec![u8::from(shadow) + 1];
        }
        k
    };
    (bound(u64::from(shard)), bound(u64::from(shard) + 1))
}

/// The ledger, payer and transfer id of a key made by [`idempotency_key`].
pub fn parse_idempotency_key(key: &[u8]) -> Option<(bool, AccountId, TransferId)> {
    let shadow = match *key.first()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let len = *key.get(5)? as usize;
    let payer = std::str::from_utf8(key.get(6..6 + len)?).ok()?;
    let id = std::str::from_utf8(key.get(6 + len..)?).ok()?;
    Some((shadow, AccountId::new(payer).ok()?, TransferId::new(id).ok()?))
}

/// Records looked up outside memory for one batch, before it runs.
pub trait OlderRecords {
    /// The newest record of payer `from` and transfer `id` in the shadow or
    /// real ledger, if one was found (the caller checks it is in the window).
    fn find(&self, shadow: bool, from: &AccountId, id: &TransferId) -> Option<OldRecord>;
}

/// No records outside memory: tests, replay, a cell without a disk tier.
pub struct NoOlder;

impl OlderRecords for NoOlder {
    fn find(&self, _: bool, _: &AccountId, _: &TransferId) -> Option<OldRecord> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_bad_bytes_are_an_error() {
        let r = OldRecord {
            id: TransferId::new("t-1").unwrap(),
            from: AccountId::new("alice").unwrap(),
            to: AccountId::new("bob").unwrap(),
            amount: 125,
            currency: Currency::new("CNY").unwrap(),
            currency_given: Some(Currency::new("CNY").unwrap()),
            memo_hash: 99,
            status: TransferStatus::Reversed,
            at_ms: 1_800_000_000_000,
        };
        let bytes = r.encode_value();
        assert_eq!(OldRecord::decode_value(&r.from, &r.id, &bytes).unwrap(), r);
        for cut in 0..bytes.len() {
            assert!(OldRecord::decode_value(&r.from, &r.id, &bytes[..cut]).is_err());
        }
        let k = r.key(false, 1024);
        assert_eq!(k[0], 0);
        assert_ne!(k, r.key(true, 1024), "the ledger is part of the key");
        // A payer's id and a transfer id never run into each other.
        let a = idempotency_key(false, 8, &AccountId::new("ab").unwrap(), &TransferId::new("c").unwrap());
        let b = idempotency_key(false, 8, &AccountId::new("a").unwrap(), &TransferId::new("bc").unwrap());
        assert_ne!(a, b);
        // A key parses back, and falls in its shard's range.
        let (shadow, from, id) = parse_idempotency_key(&k).unwrap();
        assert_eq!((shadow, &from, &id), (false, &r.from, &r.id));
        let shard = (stable_hash(b"alice") % 1024) as u32;
        let (lo, hi) = shard_key_range(false, shard);
        assert!(lo.as_slice() <= k.as_slice() && k.as_slice() < hi.as_slice());
        let (lo, hi) = shard_key_range(false, shard + 1);
        assert!(k.as_slice() < lo.as_slice() && lo < hi);
        assert_eq!(parse_idempotency_key(&[2, 0, 0, 0, 0, 1, b'a']), None);
        assert_eq!(shard_key_range(true, u32::MAX).1, vec![2]);
    }
}
