//! How the router and the relays talk to a cell, wherever it runs.
//!
//! [`CellClient`] is the one interface: submit commands, ask a query, read the
//! cell's status, and wait for its outbox to change. A [`CellHandle`] serves it
//! for a cell in this process; a cell in another process gets a client that
//! speaks the same calls over the network, and nothing above this line changes.

use std::future::Future;
use std::pin::Pin;

use cellpay_core::{CellId, Command, ErrorCode, Outcome, Query, QueryAnswer, Rejection, ShardMap};
use tokio::sync::watch;

use crate::engine::{CellFigures, CellHandle, EngineError};
use crate::health::Health;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A cell's health as its client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellStatus {
    pub cell: CellId,
    /// The shard map epoch the cell works at.
    pub epoch: u64,
    pub queue_depth: usize,
    /// The longest queue wait of the cell's latest batch, in µs (0 when idle).
    pub queue_delay_us: u64,
    /// Serving, or why not: failed (fail-stop until a restart) or stalled
    /// (refusing new work until its batch finishes).
    pub health: Health,
}

impl CellStatus {
    /// The status of a cell whose engine is not running (or cannot be reached), and why.
    pub fn down(cell: CellId, reason: &str) -> Self {
        CellStatus {
            cell,
            epoch: 0,
            queue_depth: 0,
            queue_delay_us: 0,
            health: Health::Failed { reason: reason.into() },
        }
    }
}

/// The refusal of a call whose sender works at a newer shard map than the
/// cell (`wrong_cell`: the cell acts on no map older than its caller's and
/// catches up first), or `None` when the cell may take it. A sender's epoch
/// of 0 says nothing (a caller that does not send one).
pub fn behind_refusal(cell: CellId, cell_epoch: u64, sender_epoch: u64) -> Option<Rejection> {
    (sender_epoch > cell_epoch).then(|| {
        Rejection::new(
            ErrorCode::WrongCell,
            format!("cell {cell} works at shard map epoch {cell_epoch}, behind its caller's {sender_epoch}; it is catching up"),
        )
    })
}

pub trait CellClient: Send + Sync + 'static {
    fn cell(&self) -> CellId;
    fn status(&self) -> CellStatus;
    /// Commands, answered once their batch is durable.
    fn submit(&self, commands: Vec<Command>) -> BoxFuture<'_, Result<Vec<Outcome>, EngineError>>;
    fn query(&self, query: Query) -> BoxFuture<'_, Result<QueryAnswer, EngineError>>;
    /// A signal that changes whenever the cell's outbox may have grown; a relay
    /// keeps one receiver for its whole life, so no change is missed.
    fn outbox_signal(&self) -> watch::Receiver<u64>;
    /// Both ledgers' audit figures as last published by the cell: cheap, for
    /// metrics and dashboards (the audit itself asks the cell in order).
    fn figures(&self) -> std::sync::Arc<CellFigures>;
    /// Sets the cell's limit of undelivered credits per destination (flow rules).
    fn set_outbox_messages_max(&self, max: u64);
    /// The shard map the cell works at, when it can tell (a router that was
    /// refused `wrong_cell` learns a newer map from the cell that refused it).
    fn shard_map(&self) -> BoxFuture<'_, Option<ShardMap>> {
        Box::pin(async { None })
    }
    /// The epoch of the map the sender works at, carried by every call where
    /// the cell is in another process: a cell behind it refuses the call
    /// (`wrong_cell`) rather than act on its older map. In-process cells share
    /// the sender's map, so the default does nothing.
    fn set_sender_epoch(&self, _epoch: u64) {}
}

impl CellClient for CellHandle {
    fn cell(&self) -> CellId {
        CellHandle::cell(self)
    }

    fn status(&self) -> CellStatus {
        CellStatus {
            cell: self.cell(),
            epoch: self.epoch(),
            queue_depth: self.queue_depth(),
            queue_delay_us: self.queue_delay_us(),
            health: self.health(),
        }
    }

    fn submit(&self, commands: Vec<Command>) -> BoxFuture<'_, Result<Vec<Outcome>, EngineError>> {
        let submitted = CellHandle::submit(self, commands);
        Box::pin(async move { submitted?.wait().await })
    }

    fn query(&self, query: Query) -> BoxFuture<'_, Result<QueryAnswer, EngineError>> {
        if matches!(query, Query::TierPage { .. } | Query::TierImport { .. } | Query::ExportShard { .. }) {
            return Box::pin(self.tier_query(query));
        }
        let submitted = CellHandle::query(self, query);
        Box::pin(async move { submitted?.wait().await })
    }

    fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.outbox_watch()
    }

    fn figures(&self) -> std::sync::Arc<CellFigures> {
        CellHandle::figures(self)
    }

    fn set_outbox_messages_max(&self, max: u64) {
        CellHandle::set_outbox_messages_max(self, max)
    }

    fn shard_map(&self) -> BoxFuture<'_, Option<ShardMap>> {
        let map = CellHandle::shard_map(self);
        Box::pin(async move { Some((*map).clone()) })
    }
}
