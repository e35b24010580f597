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
