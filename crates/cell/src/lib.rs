//! cellpay-cell: the cell engine.
//!
//! One writer thread per cell owns the [`CellState`](cellpay_core::CellState)
//! and the cell's [`Store`](cellpay_store::Store). Requests reach it through a
//! bounded queue; it takes whatever is queued up to a maximum batch (smart
//! batching: no fixed wait), applies the batch in order, writes the commands
//! that changed state in one durable append, and only then answers every
//! request of the batch. A full queue answers `overloaded` at once.

mod client;
mod engine;
mod recovery;
mod relay;
mod stats;

pub use client::{BoxFuture, CellClient, CellStatus};
pub use engine::{Cell, CellHandle, EngineConfig, EngineError, Submission};
pub use recovery::{recover, RecoveryError, RecoveryReport};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use stats::{EngineStats, Percentiles, StatsSnapshot};
