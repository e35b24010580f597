//! A cell's place in the cluster, which outlives one run of its engine.
//!
//! The router and the relays hold a [`CellSlot`] rather than the engine's
//! handle, so an engine can be stopped and started again (the kill-cell
//! drill, a restart after a failure) without rewiring them: while the slot is
//! empty every call answers `cell_unavailable`, and the outbox signal the
//! relays wait on stays the same across engines.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use cellpay_core::{CellId, Command, Outcome, Query, QueryAnswer, ShardMap};
use tokio::sync::watch;

use crate::client::{BoxFuture, CellClient, CellStatus};
use crate::engine::{CellFigures, CellHandle, EngineError};

pub struct CellSlot {
    cell: CellId,
    current: RwLock<Option<CellHandle>>,
    /// Stable across engines: bumped whenever the current engine's outbox grows.
    outbox: watch::Sender<u64>,
    /// The flow rules' outbox limit, given to every engine installed (0: the engine's own).
    outbox_messages_max: AtomicU64,
}

impl CellSlot {
    pub fn new(cell: CellId) -> Self {
        Self { cell, current: RwLock::new(None), outbox: watch::Sender::new(0), outbox_messages_max: AtomicU64::new(0) }
    }

    /// The running engine's handle, if one runs.
    pub fn handle(&self) -> Option<CellHandle> {
        self.current.read().expect("slot lock is never held across a panic").clone()
    }

    /// Puts a running engine in the slot, and forwards its outbox signal
    /// (needs a tokio runtime) until the engine goes.
    pub fn install(&self, handle: CellHandle) {
        assert_eq!(handle.cell(), self.cell, "a slot holds its own cell");
        let mut engine_signal = handle.outbox_watch();
        let slot_signal = self.outbox.clone();
        tokio::spawn(async move {
            while engine_signal.changed().await.is_ok() {
                slot_signal.send_modify(|g| *g += 1);
            }
        });
        let max = self.outbox_messages_max.load(Relaxed);
        if max > 0 {
            handle.set_outbox_messages_max(max);
        }
        *self.current.write().expect("slot lock is never held across a panic") = Some(handle);
        self.outbox.send_modify(|g| *g += 1);
    }

    /// Empties the slot: calls answer `cell_unavailable` until the next install.
    pub fn clear(&self) -> Option<CellHandle> {
        self.current.write().expect("slot lock is never held across a panic").take()
    }

    fn down(&self) -> EngineError {
        EngineError::Unavailable { cell: self.cell, reason: "the cell's engine is not running".into() }
    }
}

impl CellClient for CellSlot {
    fn cell(&self) -> CellId {
        self.cell
    }

    fn status(&self) -> CellStatus {
        match self.handle() {
            Some(h) => CellClient::status(&h),
            None => CellStatus::down(self.cell, "the cell's engine is not running"),
        }
    }

    fn submit(&self, commands: Vec<Command>) -> BoxFuture<'_, Result<Vec<Outcome>, EngineError>> {
        let submitted = self.handle().ok_or_else(|| self.down()).and_then(|h| h.submit(commands));
        Box::pin(async move { submitted?.wait().await })
    }

    fn query(&self, query: Query) -> BoxFuture<'_, Result<QueryAnswer, EngineError>> {
        // Through the handle's client: tier copies and exports are completed there.
        let handle = self.handle();
        Box::pin(async move {
            match handle {
                Some(h) => CellClient::query(&h, query).await,
                None => Err(self.down()),
            }
        })
    }

    fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.outbox.subscribe()
    }

    /// The running engine's figures; empty while no engine runs (`status` says it is down).
    fn figures(&self) -> Arc<CellFigures> {
        self.handle().map_or_else(Default::default, |h| h.figures())
    }

    fn set_outbox_messages_max(&self, max: u64) {
        self.outbox_messages_max.store(max, Relaxed);
        if let Some(h) = self.handle() {
            h.set_outbox_messages_max(max);
        }
    }

    fn shard_map(&self) -> BoxFuture<'_, Option<ShardMap>> {
        let map = self.handle().map(|h| h.shard_map());
        Box::pin(async move { map.map(|m| (*m).clone()) })
    }
}
