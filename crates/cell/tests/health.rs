//! A cell that stops serving says so and refuses work at once: an engine that
//! panics fails for good and answers everyone it owed; a hung disk makes the
//! cell stalled until the disk comes back. Real engine, real embedded store in
//! a temporary directory, with faults injected at its append.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cellpay_cell::{Cell, CellClient, CellHandle, EngineConfig, EngineError, Health};
use cellpay_core::*;
use cellpay_store::{
    Checkpoint, EmbeddedStore, ReplayReport, Store, StoreError, StoreOptions, StoreStats, StoredCheckpoint, Visitor,
};

/// How long a test waits for something that must happen; generous, for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

fn open_cmd(id: &str) -> Command {
    let currency = Currency::new("CNY").unwrap();
    Command::real(Op::OpenAccount(OpenAccount {
        id: AccountId::new(id).unwrap(),
        currency,
        overdraft: false,
        tenant: TenantId::default_tenant(),
    }))
}

fn account_query(id: &str) -> Query {
    Query::Account { shadow: false, id: AccountId::new(id).unwrap(), by: Authority::Admin }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    /// Appends block until the mode changes: a hung disk.
    Hold,
    /// Appends panic.
    Panic,
}

/// The switch a test flips to make the store's appends pass, hang or panic.
#[derive(Clone)]
struct Faults(Arc<(Mutex<Mode>, Condvar)>);

impl Faults {
    fn set(&self, mode: Mode) {
        *self.0 .0.lock().unwrap() = mode;
        self.0 .1.notify_all();
    }
}

/// The real embedded store, with faults injected at its append.
struct FaultyStore {
    inner: EmbeddedStore,
    faults: Faults,
}

impl Store for FaultyStore {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.inner.checkpoints()
    }
    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        self.inner.read_checkpoint(seq)
    }
    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<std::path::PathBuf, StoreError> {
        self.inner.set_aside_checkpoint(seq)
    }
    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.inner.sync_checkpoint()
    }
    fn replay(&mut self, after: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        self.inner.replay(after, visit)
    }
    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        let mode = {
            let (lock, changed) = &*self.faults.0;
            let mut mode = lock.lock().unwrap();
            while *mode == Mode::Hold {
                mode = changed.wait(mode).unwrap();
            }
            *mode
        };
        if mode == Mode::Panic {
            panic!("injected panic in the append of batch {seq}");
        }
        self.inner.append(seq, batch)
    }
    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.inner.checkpoint(seq, snapshot)
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

/// Lets appends pass again when dropped, so a test that fails while the disk
/// hangs ends (dropping a cell joins its engine) instead of hanging.
struct ReleaseOnDrop(Faults);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.set(Mode::Pass);
    }
}

fn faulty(dir: &Path, config: EngineConfig) -> (Cell, Faults) {
    let faults = Faults(Arc::new((Mutex::new(Mode::Pass), Condvar::new())));
    let inner = EmbeddedStore::open(dir, StoreOptions::default()).unwrap();
    let store = FaultyStore { inner, faults: faults.clone() };
    let map = ShardMap::round_robin(64, 1).unwrap();
    let cell = Cell::start(Box::new(store), CellId(0), &map, config).unwrap();
    (cell, faults)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < PATIENCE, "{what}: not reached in {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn refused_unavailable<T>(submitted: Result<T, EngineError>) -> String {
    match submitted {
        Err(EngineError::Unavailable { reason, .. }) => reason,
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("expected Unavailable at once, got a queued submission"),
    }
}

#[test]
fn a_panicking_engine_fails_with_its_reason_answers_every_waiter_and_refuses_new_work_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cell, faults) = faulty(dir.path(), EngineConfig::default());
    let _release = ReleaseOnDrop(faults.clone());
    let h = cell.handle();
    h.submit(vec![open_cmd("before")]).unwrap().wait_blocking().unwrap();
    assert_eq!(h.health(), Health::Serving);

    // The engine holds one batch in its append while more work queues behind it.
    faults.set(Mode::Hold);
    let held = h.submit(vec![open_cmd("held")]).unwrap();
    wait_until("the engine takes the held batch", || h.queue_depth() == 0);
    let queued: Vec<_> = (0..20).map(|i| h.submit(vec![open_cmd(&format!("q{i}"))]).unwrap()).collect();
    let queued_read = h.query(account_query("before")).unwrap();
    faults.set(Mode::Panic);

    // Every answer owed is given, and only after the failure is recorded.
    assert!(refused_unavailable(held.wait_blocking()).contains("panicked"));
    for s in queued {
        assert!(refused_unavailable(s.wait_blocking()).contains("panicked"));
    }
    assert!(refused_unavailable(queued_read.wait_blocking()).contains("panicked"));
    assert!(h.is_failed(), "a panicked engine is failed");
    let status = CellClient::status(&h);
    match &status.health {
        Health::Failed { reason } => {
            assert!(reason.contains("the engine panicked") && reason.contains("injected panic"), "{reason}")
        }
        other => panic!("expected failed, got {other}"),
    }
    assert_eq!(status.health.as_str(), "failed");

    // Later work is refused by `submit` itself, before anything is queued.
    assert!(refused_unavailable(h.submit(vec![open_cmd("after")])).contains("panicked"));
    assert!(refused_unavailable(h.query(account_query("before"))).contains("panicked"));
    assert_eq!(h.queue_depth(), 0);
    drop(cell);

    // Nothing of the batch that panicked was acknowledged, and nothing of it is there.
    let (cell, _) = faulty(dir.path(), EngineConfig::default());
    let answer = |id: &str| cell.handle().query(account_query(id)).unwrap().wait_blocking().unwrap();
    assert!(matches!(answer("before"), QueryAnswer::Account(_)));
    assert!(matches!(answer("held"), QueryAnswer::Rejected(r) if r.code == ErrorCode::AccountNotFound));
}

#[test]
fn a_hung_disk_stalls_the_cell_which_refuses_new_work_at_once_and_serves_again_when_the_disk_returns() {
    let dir = tempfile::tempdir().unwrap();
    let stall_after = Duration::from_millis(300);
    let (cell, faults) = faulty(dir.path(), EngineConfig { stall_after, ..EngineConfig::default() });
    let _release = ReleaseOnDrop(faults.clone());
    let h: CellHandle = cell.handle();
    h.submit(vec![open_cmd("before")]).unwrap().wait_blocking().unwrap();

    faults.set(Mode::Hold);
    let held_at = Instant::now();
    let held = h.submit(vec![open_cmd("held")]).unwrap();
    wait_until("the cell reports the stall", || !h.health().is_serving());
    assert!(held_at.elapsed() >= stall_after, "a stall is never reported before its limit");
    let health = CellClient::status(&h).health;
    assert!(matches!(health, Health::Stalled { stall_after_ms: 300, .. }), "{health}");
    assert_eq!(health.as_str(), "stalled");
    assert!(health.reason().unwrap().contains("300 ms"), "{health}");
    assert!(!h.is_failed(), "a stall is not a failure");

    // While stalled, new work is refused by `submit` itself: at once, not after a timeout.
    assert!(refused_unavailable(h.submit(vec![open_cmd("refused")])).contains("stalled"));
    assert!(refused_unavailable(h.query(account_query("before"))).contains("stalled"));

    // The disk comes back: the held batch is answered and the cell serves again.
    faults.set(Mode::Pass);
    assert!(matches!(held.wait_blocking().unwrap()[0], Outcome::AccountOpened { created: true, .. }));
    wait_until("the stall clears", || h.health().is_serving());
    h.submit(vec![open_cmd("after")]).unwrap().wait_blocking().unwrap();
    let answer = |id: &str| h.query(account_query(id)).unwrap().wait_blocking().unwrap();
    assert!(matches!(answer("held"), QueryAnswer::Account(_)));
    assert!(matches!(answer("after"), QueryAnswer::Account(_)));
    assert!(matches!(answer("refused"), QueryAnswer::Rejected(r) if r.code == ErrorCode::AccountNotFound));
}

#[test]
fn a_stopped_engine_no_longer_shows_as_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (cell, _) = faulty(dir.path(), EngineConfig::default());
    let h = cell.handle();
    h.submit(vec![open_cmd("a")]).unwrap().wait_blocking().unwrap();
    cell.stop().unwrap();
    assert!(h.is_failed());
    assert_eq!(CellClient::status(&h).health, Health::Failed { reason: "the engine has stopped".into() });
    assert!(refused_unavailable(h.submit(vec![open_cmd("b")])).contains("stopped"));
}
