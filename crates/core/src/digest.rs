//! Per-shard digests: a cheap fingerprint of a shard's state.
//!
//! A shard's digest is the wrapping sum of one term per account (its id and
//! balance) and one term per applied transfer leg. Sums are order-independent
//! and update in O(1): a balance change subtracts the old term and adds the new
//! one. A test proves that a shadow run changed nothing real by comparing the
//! real digests before and after (I5).

use crate::command::EntryKind;
use crate::ids::TransferId;
use crate::shard::{mix64, stable_hash};

const BALANCE_SALT: u64 = 0x2545_f491_4f6c_dd1d;

/// The term an account contributes at `balance`.
pub fn account_term(id_hash: u64, balance: i64) -> u64 {
    mix64(id_hash ^ mix64(balance as u64 ^ BALANCE_SALT))
}

/// The term one applied leg of a transfer contributes.
pub fn leg_term(transfer: &TransferId, kind: EntryKind) -> u64 {
    let salt = match kind {
        EntryKind::Debit => 0x9e37_79b9_7f4a_7c15,
        EntryKind::Credit => 0xc2b2_ae3d_27d4_eb4f,
        EntryKind::Reversal => 0x1656_67b1_9e37_79f9,
    };
    mix64(stable_hash(transfer.as_str().as_bytes()) ^ salt)
}

/// The fingerprint of one cross-cell message: everything that makes it this
/// credit and no other. Both ends compute it from the fields, so a sequence
/// number that comes back carrying another message is recognised.
pub fn message(
    transfer: &TransferId,
    from: &crate::ids::AccountId,
    to: &crate::ids::AccountId,
    amount: i64,
    currency: crate::money::Currency,
) -> u64 {
    let mut h = stable_hash(transfer.as_str().as_bytes());
    h = mix64(h ^ stable_hash(from.as_str().as_bytes()).rotate_left(1));
    h = mix64(h ^ stable_hash(to.as_str().as_bytes()).rotate_left(2));
    h = mix64(h ^ amount as u64);
    mix64(h ^ stable_hash(&currency.bytes()))
}

/// The next link of a pair's chain digest: the previous link, the message's
/// fingerprint and its outcome (applied or refused). Both ends fold the same
/// sequence in the same order, so equal chains mean equal books.
pub fn chain_link(prev: u64, message: u64, refused: bool) -> u64 {
    let outcome = if refused { 0x8cb9_2ba7_2f3d_8dd7 } else { 0x5851_f42d_4c95_7f2d };
    mix64(prev.rotate_left(29) ^ message ^ outcome)
}
