//! Recovery against the real embedded store on real files, at the points where
//! one crash used to stop a cell for good: a crash right after a new cell's
//! first batch.

use std::fs;
use std::path::PathBuf;

use cellpay_cell::{Cell, EngineConfig};
use cellpay_core::*;
use cellpay_store::{
    Checkpoint, EmbeddedStore, ReplayReport, Store, StoreError, StoreOptions, StoreStats, StoredCheckpoint, Visitor,
};

fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

fn open_cmd(id: &str, overdraft: bool) -> Command {
    Command::real(Op::OpenAccount(OpenAccount { id: AccountId::new(id).unwrap(), currency: cny(), overdraft }))
}

fn transfer_cmd(id: &str, from: &str, to: &str, amount: i64) -> Command {
    Command::real(Op::Transfer(Transfer {
        id: TransferId::new(id).unwrap(),
        from: AccountId::new(from).unwrap(),
        to: AccountId::new(to).unwrap(),
        amount,
        currency: None,
        memo: None,
    }))
}

fn one_cell_map() -> ShardMap {
    ShardMap::round_robin(64, 1).unwrap()
}

/// The embedded store on real files, with the slowest background checkpoint
/// writer the `Store` contract allows: a checkpoint reaches the disk only when
/// the caller waits for it (`sync_checkpoint`, or the next `checkpoint`).
/// Dropping it is a `kill -9`: what was appended is on disk, a checkpoint
/// still pending is lost.
struct SlowCheckpoints {
    inner: EmbeddedStore,
    pending: Option<(u64, Vec<u8>)>,
}

impl SlowCheckpoints {
    fn write_pending(&mut self) -> Result<(), StoreError> {
        if let Some((seq, snapshot)) = self.pending.take() {
            self.inner.checkpoint(seq, snapshot)?;
            self.inner.sync_checkpoint()?;
        }
        Ok(())
    }
}

impl Store for SlowCheckpoints {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.inner.checkpoints()
    }
    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        self.inner.read_checkpoint(seq)
    }
    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<PathBuf, StoreError> {
        self.write_pending()?;
        self.inner.set_aside_checkpoint(seq)
    }
    fn replay(&mut self, after: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        self.inner.replay(after, visit)
    }
    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        self.inner.append(seq, batch)
    }
    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.write_pending()?; // at most one in flight
        self.pending = Some((seq, snapshot));
        Ok(())
    }
    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.write_pending()
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

#[test]
fn a_crash_right_after_a_new_cells_first_batch_leaves_a_cell_that_starts() {
    let dir = tempfile::tempdir().unwrap();
    let inner = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
    let store = SlowCheckpoints { inner, pending: None };
    let cell = Cell::start(Box::new(store), CellId(0), &one_cell_map(), EngineConfig::default()).unwrap();
    assert!(cell.recovery().created);
    let first = vec![open_cmd("bank", true), open_cmd("alice", false), transfer_cmd("t1", "bank", "alice", 500)];
    cell.handle().submit(first).unwrap().wait_blocking().unwrap();
    // The first batch is acknowledged, so durable. Crash now: halt writes no
    // checkpoint, and dropping the store loses whatever was still pending.
    cell.halt().unwrap();
    let logged: Vec<_> = fs::read_dir(dir.path().join("log")).unwrap().collect();
    assert_eq!(logged.len(), 1, "the first batch is in the log");

    let cell = Cell::open_embedded(dir.path(), CellId(0), &one_cell_map(), EngineConfig::default())
        .expect("a crash after the first batch must not brick the cell");
    let r = cell.recovery();
    assert!(!r.created);
    assert_eq!((r.checkpoint_seq, r.batches_replayed, r.last_seq), (0, 1, 1));
    let q = Query::Account { shadow: false, id: AccountId::new("alice").unwrap() };
    match cell.handle().query(q).unwrap().wait_blocking().unwrap() {
        QueryAnswer::Account(a) => assert_eq!(a.balance, 500),
        other => panic!("{other:?}"),
    }
}
