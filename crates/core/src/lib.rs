//! cellpay-core: the pure ledger of one cell.
//!
//! No tokio, no I/O, no clock. Ids, money, shard hashing, commands and their
//! outcomes, the deterministic state machine ([`CellState`]) that applies a
//! batch of commands in order, the per-shard digests, and the codec the store
//! writes. Storage, network and time live at the edges (`cellpay-store`,
//! `cellpay-cell`), so tests can drive this code directly.
//!
//! ```
//! use cellpay_core::*;
//! let map = ShardMap::round_robin(SHARDS_DEFAULT, 1).unwrap();
//! let mut cell = CellState::new(CellId(0), map, Limits::default());
//! let cny = Currency::new("CNY").unwrap();
//! let bank = AccountId::new("bank").unwrap();
//! let alice = AccountId::new("alice").unwrap();
//! let tenant = TenantId::default_tenant();
//! cell.apply(&Command::real(Op::OpenAccount(OpenAccount { id: bank.clone(), currency: cny, overdraft: true, tenant: tenant.clone() })));
//! cell.apply(&Command::real(Op::OpenAccount(OpenAccount { id: alice.clone(), currency: cny, overdraft: false, tenant })));
//! // Only admin may debit an overdraft account: it creates money.
//! let pay = Transfer { id: TransferId::new("t1").unwrap(), from: bank, to: alice.clone(), amount: 100, currency: None, memo: None, by: Authority::Admin };
//! assert!(matches!(cell.apply(&Command::real(Op::Transfer(pay))), Outcome::Transferred { created: true, .. }));
//! assert_eq!(cell.ledger(false).account(&alice).unwrap().balance, 100);
//! ```

pub mod audit;
pub mod codec;
pub mod command;
pub mod digest;
pub mod error;
pub mod ids;
pub mod ledger;
pub mod money;
pub mod moves;
pub mod older;
pub mod priority;
pub mod shard;
pub mod snapshot;
pub mod state;

pub use audit::reconcile_figures_moves;
pub use audit::{
    audit_states, reconcile_pair, reconcile_states, Finding, InboxAt, InboxFigures, InboxPrefix, LedgerAudit,
    LedgerFigures, OutboxAt, OutboxFigures, SentPrefix, INBOX_TAIL_RETAINED,
};
pub use command::*;
pub use error::{ErrorCode, Rejection};
pub use ids::{AccountId, CellId, IdError, TenantId, TransferId, TENANT_DEFAULT};
pub use ledger::{Admission, IdempotencyReach, Ledger, Limits, Touched, TransferRow, IDEMPOTENCY_WINDOW_MS_DEFAULT};
pub use money::{amount_is_valid, Currency, AMOUNT_MAX};
pub use moves::{
    export_not_ready, reconcile_moves, ExportedAccount, ExportedEntry, ExportedRecord, LedgerExport, MoveFigures,
    MoveRecord, ShardExport, TierCursor, TierEntry, TierPage, FROZEN_SHARDS_MAX, MOVES_RETAINED,
};
pub use older::{idempotency_key, parse_idempotency_key, shard_key_range, NoOlder, OldRecord, OlderRecords};
pub use priority::{is_control, priority_of, Priority};
pub use shard::{shard_of, stable_hash, ShardId, ShardMap, SHARDS_DEFAULT, SHARDS_MAX};
pub use state::{CellState, CopyMarks, ENTRIES_PAGE_MAX};
