//! The error codes of the HTTP contract (DESIGN.md section 4) and a rejection.
//!
//! The ledger answers with these codes; the API maps each to its HTTP status.
//! `WrongCell`, `OutOfOrder` and `SequenceReused` are internal: the router and the relay act on
//! them and a client never sees them as final answers.

use std::fmt;

/// Every error code a cell or router can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    AccountNotFound,
    TransferNotFound,
    Conflict,
    PayloadTooLarge,
    InsufficientFunds,
    CurrencyMismatch,
    /// A balance would leave the i64 range: refused, never wrapped.
    BalanceOverflow,
    RateLimited,
    Overloaded,
    Degraded,
    CellUnavailable,
    /// The shard is not owned by this cell at its epoch (I6); the router retries elsewhere.
    WrongCell,
    /// A relay credit arrived ahead of its predecessor; the relay resends in order.
    OutOfOrder,
    /// Too many cross-cell credits to the payee's cell wait for delivery (I7): retry later.
    OutboxFull,
    /// A relay credit reuses a sequence number with another message: the
    /// source's books went back in time. Internal; the audit names the pair.
    SequenceReused,
    /// A retry of a transfer whose id carries its own time (a UUIDv7) older
    /// than the idempotency window: the cell can no longer tell whether it was
    /// paid, so it refuses rather than risk paying twice.
    IdempotencyExpired,
    /// The shard is frozen for a move (for a few milliseconds): the router
    /// waits and tries again, a relay resends later. Internal.
    ShardFrozen,
    /// A relay credit for a shard that moved away from this cell: refused
    /// for good here, and the payer's cell sends it to the new owner. Internal.
    ShardMoved,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::AccountNotFound,
        ErrorCode::TransferNotFound,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InsufficientFunds,
        ErrorCode::CurrencyMismatch,
        ErrorCode::BalanceOverflow,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Degraded,
        ErrorCode::CellUnavailable,
        ErrorCode::WrongCell,
        ErrorCode::OutOfOrder,
        ErrorCode::OutboxFull,
        ErrorCode::SequenceReused,
        ErrorCode::IdempotencyExpired,
        ErrorCode::ShardFrozen,
        ErrorCode::ShardMoved,
    ];

    /// The code's name in the contract.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::AccountNotFound => "account_not_found",
            ErrorCode::TransferNotFound => "transfer_not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::InsufficientFunds => "insufficient_funds",
            ErrorCode::CurrencyMismatch => "currency_mismatch",
            ErrorCode::BalanceOverflow => "balance_overflow",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Degraded => "degraded",
            ErrorCode::CellUnavailable => "cell_unavailable",
            ErrorCode::WrongCell => "wrong_cell",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::OutboxFull => "outbox_full",
            ErrorCode::SequenceReused => "sequence_reused",
            ErrorCode::IdempotencyExpired => "idempotency_expired",
            ErrorCode::ShardFrozen => "shard_frozen",
            ErrorCode::ShardMoved => "shard_moved",
        }
    }

    /// The HTTP status the contract gives this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::AccountNotFound | ErrorCode::TransferNotFound => 404,
            ErrorCode::Conflict | ErrorCode::IdempotencyExpired => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::InsufficientFunds | ErrorCode::CurrencyMismatch | ErrorCode::BalanceOverflow => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::Overloaded
            | ErrorCode::Degraded
            | ErrorCode::CellUnavailable
            | ErrorCode::WrongCell
            | ErrorCode::OutOfOrder
            | ErrorCode::OutboxFull
            | ErrorCode::SequenceReused
            | ErrorCode::ShardFrozen
            | ErrorCode::ShardMoved => 503,
        }
    }

    /// A stable one-byte tag for the log and snapshot codec.
    pub fn tag(self) -> u8 {
        Self::ALL.iter().position(|c| *c == self).expect("ALL lists every code") as u8
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.get(usize::from(tag)).copied()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command the ledger refused. A rejection never changes state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_names_are_unique() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_tag(code.tag()), Some(code));
        }
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::from_tag(200), None);
    }

    #[test]
    fn client_errors_are_4xx_and_capacity_errors_503() {
        assert_eq!(ErrorCode::InsufficientFunds.http_status(), 422);
        assert_eq!(ErrorCode::Overloaded.http_status(), 503);
        assert!(ErrorCode::ALL.iter().all(|c| c.http_status() != 500));
    }
}
