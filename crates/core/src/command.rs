//! Commands the ledger applies, queries it answers, and what it answers with.
//!
//! A command changes state (and is written to the log); a query only reads.
//! Every command carries the `shadow` flag that selects the ledger it acts on (I5).

use crate::audit::{InboxAt, LedgerAudit, LedgerFigures, OutboxAt};
use crate::error::{ErrorCode, Rejection};
use crate::ids::{AccountId, CellId, TenantId, TransferId};
use crate::money::Currency;
use crate::moves::{ShardExport, TierCursor, TierEntry, TierPage};
use crate::shard::ShardMap;

/// The longest memo a transfer may carry, in bytes (I7).
pub const MEMO_BYTES_MAX: usize = 256;

/// One state change for the ledger, with the ledger it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// True selects the shadow ledger; shadow and real state never mix (I5).
    pub shadow: bool,
    pub op: Op,
}

impl Command {
    pub fn real(op: Op) -> Self {
        Self { shadow: false, op }
    }

    pub fn shadow(op: Op) -> Self {
        Self { shadow: true, op }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    OpenAccount(OpenAccount),
    Transfer(Transfer),
    /// A cross-cell credit arriving from the payer's cell through the relay.
    Credit(Credit),
    /// The payee's cell applied outbox message `seq`: the transfer is settled.
    Settle {
        dest: CellId,
        seq: u64,
    },
    /// The payee's cell refused outbox message `seq` for good: credit the payer back.
    Compensate {
        dest: CellId,
        seq: u64,
        reason: ErrorCode,
    },
    /// Replace the shard map with one of a higher epoch. Ignores the shadow flag.
    InstallShardMap(ShardMap),
    /// A shard move's steps (see `moves`); each acts on both ledgers and
    /// ignores the shadow flag. The move is numbered by the epoch it installs.
    /// At the source: nothing changes the shard from now on but the closes of
    /// its payers' messages in flight.
    FreezeShard {
        shard: u32,
        move_id: u64,
        to: CellId,
    },
    /// At the source: the move did not happen; the shard serves again.
    UnfreezeShard {
        shard: u32,
        move_id: u64,
    },
    /// At the destination: the shard's state, held but not served until the
    /// map names this cell.
    InstallShard(Box<ShardExport>),
    /// At the destination: undoes an install whose move did not happen.
    DiscardShard {
        shard: u32,
        move_id: u64,
    },
    /// At the source, once its map names the new owner: the shard leaves.
    DropShard {
        shard: u32,
        move_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAccount {
    pub id: AccountId,
    pub currency: Currency,
    pub overdraft: bool,
    /// The tenant the account belongs to: only its tokens (and admin) may
    /// debit it or read it.
    pub tenant: TenantId,
}

/// On whose behalf a request acts: an admin token acts for every tenant; a
/// client token for its own tenant only (DESIGN.md section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    Admin,
    Tenant(TenantId),
}

impl Authority {
    /// May this authority debit or read an account of `tenant`?
    pub fn acts_for(&self, tenant: &TenantId) -> bool {
        match self {
            Authority::Admin => true,
            Authority::Tenant(t) => t == tenant,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    /// When given, must equal both accounts' currency.
    pub currency: Option<Currency>,
    pub memo: Option<Box<str>>,
    /// Who asks: the payer must belong to this tenant (admin: any), and only
    /// admin may debit an overdraft account (it creates money). Checked when
    /// the transfer is admitted; not logged (replay reads `Admin`: a logged
    /// command was admitted and applies again as it did).
    pub by: Authority,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    pub source: CellId,
    /// The cell the credit is meant for (a relay always says; `None` in logs
    /// from before it did). Another cell refuses it `wrong_cell` and changes
    /// nothing: since shards move, owning the payee is not enough to tell.
    pub dest: Option<CellId>,
    /// Position in the source → this cell stream, from 1, without gaps.
    pub seq: u64,
    pub transfer: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
}

/// Read-only questions; answered from the state after the batch they came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    Account {
        shadow: bool,
        id: AccountId,
        by: Authority,
    },
    /// The transfers with this id (one per payer), or only payer `from`'s.
    /// A transfer id is unique per payer: the idempotency key is payer + id.
    Transfer {
        shadow: bool,
        id: TransferId,
        from: Option<AccountId>,
        by: Authority,
    },
    /// Newest first; `before` is an entry sequence number from an earlier page.
    Entries {
        shadow: bool,
        account: AccountId,
        limit: usize,
        before: Option<u64>,
        by: Authority,
    },
    /// Per-shard digests of the real or shadow ledger.
    Digests {
        shadow: bool,
    },
    /// The full audit of one ledger in this cell: the kept figures checked
    /// against a walk over all its state. O(accounts); the lowest class.
    Audit {
        shadow: bool,
    },
    /// The audit figures as kept, O(cells): for the pair reconciliation.
    Figures {
        shadow: bool,
    },
    /// What this cell counts from each `(source, seq)` asked, at that sequence
    /// (the second read of the pair reconciliation, see `audit`).
    InboxAt {
        shadow: bool,
        asked: Vec<(CellId, u64)>,
    },
    /// What this cell sent to each `(dest, seq)` asked, through that sequence
    /// (the third read of the pair reconciliation).
    OutboxAt {
        shadow: bool,
        asked: Vec<(CellId, u64)>,
    },
    /// Everything of a frozen shard whose payers' messages are all closed,
    /// to install in the cell it moves to (both ledgers).
    ExportShard {
        shard: u32,
        /// With a disk tier: the export carries the shard's records that left
        /// memory after this mark (`TierPage::through_seq` of the last copy);
        /// 0 carries them all.
        older_after: u64,
    },
    /// A page of a shard's records in this cell's disk tier, read from a
    /// snapshot of it, to copy to the cell the shard moves to before it
    /// freezes (see `moves::TierPage`).
    TierPage {
        shard: u32,
        /// 0 takes a new snapshot; else the one a previous page named.
        snapshot: u64,
        /// 0: every record (imported ones too); else only those of the
        /// tier's own runs above this mark.
        seq_after: u64,
        cursor: TierCursor,
    },
    /// Writes entries of a shard's records copied from another cell's tier
    /// into this cell's tier, as part `part` of the copy for move `move_id`.
    TierImport {
        shard: u32,
        move_id: u64,
        part: u32,
        keys_max: u64,
        entries: Vec<TierEntry>,
        /// The part's first page (it starts the part afresh) and its last
        /// (it makes the part durable).
        first: bool,
        last: bool,
    },
    /// Commands that changed each shard since the cell started: the load a rebalance weighs.
    ShardLoad,
    /// Undelivered outbox messages to `dest` after `after_seq`, oldest first, at most `limit`.
    Outbox {
        shadow: bool,
        dest: CellId,
        after_seq: u64,
        limit: usize,
    },
}

/// The status of a transfer (DESIGN.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStatus {
    Pending,
    Settled,
    Reversed,
}

impl TransferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Pending => "pending",
            TransferStatus::Settled => "settled",
            TransferStatus::Reversed => "reversed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub id: AccountId,
    pub currency: Currency,
    pub balance: i64,
    pub overdraft: bool,
    pub tenant: TenantId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferView {
    pub id: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
    pub status: TransferStatus,
}

/// What kind of movement a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Debit,
    Credit,
    /// The payer credited back after the payee's cell refused the money.
    Reversal,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Debit => "debit",
            EntryKind::Credit => "credit",
            EntryKind::Reversal => "reversal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    /// The entry's sequence number; pass it as `before` for the next page.
    pub seq: u64,
    pub transfer: TransferId,
    pub kind: EntryKind,
    /// Signed: negative for a debit.
    pub amount: i64,
    pub balance_after: i64,
    pub counterparty: AccountId,
}

/// One undelivered cross-cell credit in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub seq: u64,
    pub transfer: TransferId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: i64,
    pub currency: Currency,
}

impl OutboxMessage {
    /// The credit that carries this message from cell `source` to cell `dest`.
    pub fn credit_to(&self, source: CellId, dest: CellId) -> Credit {
        Credit { dest: Some(dest), ..self.credit(source) }
    }

    /// The credit that carries this message from cell `source` to the payee's cell.
    pub fn credit(&self, source: CellId) -> Credit {
        Credit {
            source,
            dest: None,
            seq: self.seq,
            transfer: self.transfer.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            amount: self.amount,
            currency: self.currency,
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `created` is false when the same account was opened before (idempotent replay).
    AccountOpened {
        account: AccountView,
        created: bool,
    },
    /// `created` is false when the same transfer was accepted before (idempotent replay).
    Transferred {
        transfer: TransferView,
        created: bool,
        outbox: Option<(CellId, u64)>,
        /// The payer is an overdraft account: this transfer created money
        /// (the operator log records each one).
        minted: bool,
    },
    /// The credit is applied (or was before, `duplicate`); the relay acknowledges it.
    CreditApplied {
        duplicate: bool,
    },
    /// The credit is refused for good; the payer's cell compensates.
    CreditRefused {
        code: ErrorCode,
        duplicate: bool,
    },
    /// Settle or compensate applied, or already done before (`duplicate`).
    OutboxClosed {
        status: TransferStatus,
        duplicate: bool,
    },
    ShardMapInstalled {
        epoch: u64,
    },
    /// A shard move's step is done (or was before, `duplicate`). After a
    /// freeze, `open_messages` counts the shard's payers' messages still in
    /// flight (the export waits for none).
    MoveStep {
        open_messages: u64,
        duplicate: bool,
    },
    Rejected(Rejection),
}

impl Outcome {
    /// True when the command changed state and so must be written to the log.
    pub fn changed_state(&self) -> bool {
        match self {
            Outcome::AccountOpened { created, .. } | Outcome::Transferred { created, .. } => *created,
            Outcome::CreditApplied { duplicate } | Outcome::CreditRefused { duplicate, .. } => !*duplicate,
            Outcome::OutboxClosed { duplicate, .. } => !*duplicate,
            Outcome::ShardMapInstalled { .. } => true,
            Outcome::MoveStep { duplicate, .. } => !*duplicate,
            Outcome::Rejected(_) => false,
        }
    }

    pub fn rejected(code: ErrorCode, message: impl Into<String>) -> Self {
        Outcome::Rejected(Rejection::new(code, message))
    }
}

/// What a query found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryAnswer {
    Account(AccountView),
    /// Newest first; empty when none is retained.
    Transfers(Vec<TransferView>),
    Entries(Vec<EntryView>),
    Digests {
        epoch: u64,
        digests: Vec<u64>,
    },
    Audit(LedgerAudit),
    Figures(LedgerFigures),
    InboxAt(Vec<InboxAt>),
    OutboxAt(Vec<OutboxAt>),
    Outbox(Vec<OutboxMessage>),
    ShardExport(Box<ShardExport>),
    TierPage(Box<TierPage>),
    /// A page of an import written (the part durable when it was the last page).
    TierImported {
        entries: u64,
    },
    /// Per shard, in shard order.
    ShardLoad(Vec<u64>),
    Rejected(Rejection),
}
