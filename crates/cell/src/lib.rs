//! cellpay-cell: the cell engine.
//!
//! One writer thread per cell owns the [`CellState`](cellpay_core::CellState)
//! and the cell's [`Store`](cellpay_store::Store). Requests reach it through a
//! bounded queue; it takes whatever is queued up to a maximum batch (smart
//! batching: no fixed wait), applies the batch in order, writes the commands
//! that changed state in one durable append, and only then answers every
//! request of the batch. A full queue answers `overloaded` at once, and a
//! queue that stays long sheds its lowest classes first ([`QueueDelay`]).
//! A cell that fails (a store error, an engine panic) or stalls (a hung disk)
//! says so in its [`Health`] and refuses work at once.

mod breaker;
mod buckets;
mod client;
mod codel;
mod engine;
mod health;
mod projector;
mod recovery;
mod relay;
mod slot;
mod stats;
mod tier;

pub use breaker::{Breaker, BreakerRules, BreakerState, Open as BreakerOpen, Pass as BreakerPass};
pub use buckets::{BucketCounts, Buckets, BATCH_SIZE_BOUNDS, LATENCY_BOUNDS_S};
pub use client::{behind_refusal, BoxFuture, CellClient, CellStatus};
pub use codel::{QueueDelay, SHED_LEVEL_MAX};
pub use engine::{
    BatchClock, Cell, CellFigures, CellHandle, EngineConfig, EngineError, SteppedCell, Submission, EXPORT_WAIT_MAX,
    OUTBOX_MESSAGES_MAX_DEFAULT, QUEUE_SHARE_PERCENT,
};
pub use health::Health;
pub use projector::{
    Projector, ProjectorError, ProjectorStats, ProjectorThread, PROJECTION_BATCHES_MAX, PROJECTION_POLL,
    PROJECTION_RETRY, PROJECTION_RETRY_MAX, PROJECTION_ROWS_MAX,
};
pub use recovery::{recover, recover_with_tier, DamagedCheckpoint, RecoveryError, RecoveryReport};
pub use relay::{Relay, RelayConfig, RelayGate, RelayStats, RoundError};
pub use slot::CellSlot;
pub use stats::{EngineStats, Percentiles, StatsSnapshot};
pub use tier::{TierConfig, TierFigures, EXPORT_BYTES_MAX, EXPORT_OLDER_MAX, TIER_PAGE_ENTRIES_MAX};
