//! The engine against the real embedded store on real files: answers after
//! durability, smart batching, overload, idempotency across restarts,
//! checkpoints and fail-stop on a store error.

mod common;

use common::{open_cmd, transfer_cmd};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use cellpay_cell::{Cell, EngineConfig, EngineError, Submission};
use cellpay_core::*;
use cellpay_store::{
    Checkpoint, EmbeddedStore, ReplayReport, Store, StoreError, StoreOptions, StoreStats, StoredCheckpoint, Visitor,
};

fn one_cell_map() -> ShardMap {
    ShardMap::round_robin(64, 1).unwrap()
}

fn start(dir: &Path, config: EngineConfig) -> Cell {
    Cell::open_embedded(dir, CellId(0), &one_cell_map(), config).unwrap()
}

fn balance(cell: &Cell, id: &str) -> i64 {
    let q = Query::Account { shadow: false, id: AccountId::new(id).unwrap(), by: Authority::Admin };
    match cell.handle().query(q).unwrap().wait_blocking().unwrap() {
        QueryAnswer::Account(a) => a.balance,
        other => panic!("{other:?}"),
    }
}

fn digests(cell: &Cell, shadow: bool) -> Vec<u64> {
    match cell.handle().query(Query::Digests { shadow }).unwrap().wait_blocking().unwrap() {
        QueryAnswer::Digests { digests, .. } => digests,
        other => panic!("{other:?}"),
    }
}

#[test]
fn transfers_are_answered_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cell = start(dir.path(), EngineConfig::default());
    assert!(cell.recovery().created);
    let h = cell.handle();
    let out = h
        .submit(vec![open_cmd("bank", true), open_cmd("alice", false), transfer_cmd("t1", "bank", "alice", 500)])
        .unwrap()
        .wait_blocking()
        .unwrap();
    assert!(
        matches!(&out[2], Outcome::Transferred { created: true, transfer, .. } if transfer.status == TransferStatus::Settled)
    );
    assert_eq!(balance(&cell, "alice"), 500);
    let before = digests(&cell, false);
    drop(cell);

    let cell = start(dir.path(), EngineConfig::default());
    assert!(!cell.recovery().created);
    assert_eq!(balance(&cell, "alice"), 500);
    assert_eq!(balance(&cell, "bank"), -500);
    assert_eq!(digests(&cell, false), before);
    // Same id, same body: the original result. Same id, other body: conflict.
    let out = cell
        .handle()
        .submit(vec![transfer_cmd("t1", "bank", "alice", 500), transfer_cmd("t1", "bank", "alice", 501)])
        .unwrap()
        .wait_blocking()
        .unwrap();
    assert!(matches!(&out[0], Outcome::Transferred { created: false, .. }));
    assert!(matches!(&out[1], Outcome::Rejected(r) if r.code == ErrorCode::Conflict));
    assert_eq!(balance(&cell, "alice"), 500);
}

#[test]
fn a_request_larger_than_a_batch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { batch_commands_max: 4, queue_commands_max: 16, ..EngineConfig::default() };
    let cell = start(dir.path(), config);
    let cmds = (0..5).map(|i| open_cmd(&format!("a{i}"), false)).collect();
    assert!(matches!(cell.handle().submit(cmds), Err(EngineError::TooLarge { commands: 5, max: 4 })));
}

/// The real embedded store, with appends held until the test lets them go
/// (or failed on demand), so the test controls when a batch becomes durable.
struct GatedStore {
    inner: EmbeddedStore,
    gate: Arc<Mutex<std_mpsc::Receiver<bool>>>,
    gated: bool,
}

impl Store for GatedStore {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.inner.checkpoints()
    }
    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        self.inner.read_checkpoint(seq)
    }
    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<PathBuf, StoreError> {
        self.inner.set_aside_checkpoint(seq)
    }
    fn replay(&mut self, after: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        self.inner.replay(after, visit)
    }
    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        if self.gated && !self.gate.lock().unwrap().recv().unwrap_or(true) {
            return Err(StoreError::Io { path: "gated".into(), source: std::io::Error::other("injected failure") });
        }
        self.inner.append(seq, batch)
    }
    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.inner.checkpoint(seq, snapshot)
    }
    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.inner.sync_checkpoint()
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

fn gated(dir: &Path, config: EngineConfig) -> (Cell, std_mpsc::Sender<bool>) {
    let (tx, rx) = std_mpsc::channel();
    let inner = EmbeddedStore::open(dir, StoreOptions::default()).unwrap();
    let store = GatedStore { inner, gate: Arc::new(Mutex::new(rx)), gated: true };
    let cell = Cell::start(Box::new(store), CellId(0), &one_cell_map(), config).unwrap();
    (cell, tx)
}

fn wait_until(mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("condition not reached in 2 s");
}

#[test]
fn what_queues_behind_a_batch_goes_into_the_next_one_and_nothing_is_answered_before_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (cell, gate) = gated(dir.path(), EngineConfig::default());
    let h = cell.handle();
    let first = h.submit(vec![open_cmd("bank", true)]).unwrap();
    wait_until(|| h.queue_depth() == 0); // the engine took it and waits on the gate
    let rest: Vec<_> = (0..50).map(|i| h.submit(vec![open_cmd(&format!("u{i}"), false)]).unwrap()).collect();
    assert_eq!(h.queue_depth(), 50);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(h.stats().snapshot().batches, 0, "no batch completes before its append");
    gate.send(true).unwrap();
    gate.send(true).unwrap();
    first.wait_blocking().unwrap();
    for s in rest {
        assert!(matches!(s.wait_blocking().unwrap()[0], Outcome::AccountOpened { created: true, .. }));
    }
    let stats = h.stats().snapshot();
    assert_eq!(stats.batches, 2, "the 50 queued requests share one batch");
    assert_eq!(stats.commands, 51);
}

/// Group commit: once load is concurrent (the previous batch held more than
/// one command), the engine lingers before its append, and commands that
/// arrive meanwhile share the fsync; a lone command after a lone one does not wait.
#[test]
fn under_concurrent_load_a_batch_lingers_and_later_commands_share_its_append() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { batch_linger: std::time::Duration::from_secs(1), ..EngineConfig::default() };
    let (cell, gate) = gated(dir.path(), config);
    let h = cell.handle();
    // A lone command: no linger (nothing before it), its append waits on the gate.
    let first = h.submit(vec![open_cmd("bank", true)]).unwrap();
    wait_until(|| h.queue_depth() == 0);
    let pair: Vec<_> = (0..2).map(|i| h.submit(vec![open_cmd(&format!("u{i}"), false)]).unwrap()).collect();
    gate.send(true).unwrap();
    first.wait_blocking().unwrap();
    // The pair is one batch of two: from now on the load counts as concurrent.
    gate.send(true).unwrap();
    for s in pair {
        s.wait_blocking().unwrap();
    }
    assert_eq!(h.stats().snapshot().batches, 2);
    // X is taken alone; the engine lingers, so Y and Z, sent after it was
    // taken, join its batch (without the linger X's append would wait on the
    // gate alone, and Y and Z would make a fourth batch).
    let x = h.submit(vec![open_cmd("x", false)]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let yz: Vec<_> = ["y", "z"].iter().map(|id| h.submit(vec![open_cmd(id, false)]).unwrap()).collect();
    gate.send(true).unwrap();
    gate.send(true).unwrap();
    x.wait_blocking().unwrap();
    for s in yz {
        s.wait_blocking().unwrap();
    }
    let stats = h.stats().snapshot();
    assert_eq!((stats.batches, stats.commands), (3, 6), "X, Y and Z shared one append");
}

#[test]
fn a_full_queue_answers_overloaded_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { batch_commands_max: 8, queue_commands_max: 8, ..EngineConfig::default() };
    let (cell, gate) = gated(dir.path(), config);
    let h = cell.handle();
    let first = h.submit(vec![open_cmd("bank", true)]).unwrap();
    wait_until(|| h.queue_depth() == 0);
    let queued = h.submit((0..8).map(|i| open_cmd(&format!("q{i}"), false)).collect()).unwrap();
    match h.submit(vec![open_cmd("late", false)]) {
        Err(EngineError::Overloaded { queued: 8, max: 8, .. }) => {}
        Err(other) => panic!("expected Overloaded, got {other}"),
        Ok(_) => panic!("expected Overloaded, got a queued submission"),
    }
    gate.send(true).unwrap();
    gate.send(true).unwrap();
    first.wait_blocking().unwrap();
    queued.wait_blocking().unwrap();
    assert_eq!(h.queue_depth(), 0);
}

#[test]
fn a_store_failure_stops_the_cell_and_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (cell, gate) = gated(dir.path(), EngineConfig::default());
    let h = cell.handle();
    let first = h.submit(vec![open_cmd("bank", true)]).unwrap();
    gate.send(false).unwrap();
    assert!(matches!(first.wait_blocking(), Err(EngineError::Unavailable { .. })));
    wait_until(|| h.is_failed());
    assert!(matches!(h.submit(vec![open_cmd("x", false)]), Err(EngineError::Unavailable { .. })));
    drop(cell);
    // Nothing of the failed batch was acknowledged, and nothing of it is there.
    let cell = start(dir.path(), EngineConfig::default());
    let q = Query::Account { shadow: false, id: AccountId::new("bank").unwrap(), by: Authority::Admin };
    let answer = cell.handle().query(q).unwrap().wait_blocking().unwrap();
    assert!(matches!(answer, QueryAnswer::Rejected(r) if r.code == ErrorCode::AccountNotFound));
}

#[test]
fn checkpoints_bound_replay_and_recover_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { checkpoint_log_bytes: 4096, ..EngineConfig::default() };
    let cell = start(dir.path(), config);
    let h = cell.handle();
    h.submit(vec![open_cmd("bank", true)]).unwrap().wait_blocking().unwrap();
    for i in 0..40 {
        let cmds = (0..20)
            .flat_map(|j| {
                let acct = format!("u{}", i * 20 + j);
                [open_cmd(&acct, false), transfer_cmd(&format!("t{i}-{j}"), "bank", &acct, 7)]
            })
            .collect();
        h.submit(cmds).unwrap().wait_blocking().unwrap();
    }
    assert!(h.stats().snapshot().checkpoints > 5);
    let before = (digests(&cell, false), balance(&cell, "bank"));
    cell.stop().unwrap();
    let cell = start(dir.path(), config);
    let r = cell.recovery();
    assert!(r.checkpoint_seq > 0);
    assert_eq!(r.batches_replayed, 0, "a clean stop checkpoints everything");
    assert_eq!((digests(&cell, false), balance(&cell, "bank")), before);
    assert_eq!(before.1, -40 * 20 * 7);
}

#[test]
fn a_standing_queue_sheds_shadow_then_history_then_reads_and_never_payments() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        queue_delay_target: std::time::Duration::from_millis(2),
        queue_delay_interval: std::time::Duration::from_millis(10),
        ..EngineConfig::default()
    };
    let (cell, gate) = gated(dir.path(), config);
    let h = cell.handle();
    let id = |s: &str| AccountId::new(s).unwrap();
    let per_class = 10;
    // Each round queues its reads and the next write while the engine is
    // held on the previous write's append, so every request waits ~15 ms.
    let mut held = h.submit(vec![open_cmd("w0", false)]).unwrap();
    wait_until(|| h.queue_depth() == 0);
    let mut answers: Vec<(Priority, Submission<QueryAnswer>)> = Vec::new();
    for round in 1..=5 {
        for i in 0..per_class {
            let n = format!("a{round}-{i}");
            answers.push((
                Priority::Shadow,
                h.query(Query::Account { shadow: true, id: id(&n), by: Authority::Admin }).unwrap(),
            ));
            let entries =
                Query::Entries { shadow: false, account: id(&n), limit: 1, before: None, by: Authority::Admin };
            answers.push((Priority::History, h.query(entries).unwrap()));
            answers.push((
                Priority::Reads,
                h.query(Query::Account { shadow: false, id: id(&n), by: Authority::Admin }).unwrap(),
            ));
            let status =
                Query::Transfer { shadow: false, id: TransferId::new(&n).unwrap(), from: None, by: Authority::Admin };
            answers.push((Priority::Critical, h.query(status).unwrap()));
        }
        let next = h.submit(vec![open_cmd(&format!("w{round}"), false)]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(15));
        gate.send(true).unwrap();
        held.wait_blocking().unwrap();
        // The engine has taken this round's batch and holds on its write's
        // append before the next round queues anything.
        wait_until(|| h.queue_depth() == 0);
        held = next;
    }
    gate.send(true).unwrap();
    held.wait_blocking().unwrap();
    let mut shed = [0u64; 4];
    for (class, answer) in answers {
        match answer.wait_blocking() {
            Err(EngineError::Shed { .. }) => shed[class.rank()] += 1,
            Err(other) => panic!("{class:?}: {other}"),
            Ok(_) => {}
        }
    }
    let [critical, reads, history, shadow] = shed;
    assert_eq!(critical, 0, "payments are never shed by queue delay");
    assert!(shadow > history && history > reads && reads > 0, "shed per class {shed:?}");
    // The first interval also saw the unqueued first write, so shedding starts one interval later.
    assert!(shadow >= 3 * per_class as u64, "shadow is shed from the first standing interval on: {shed:?}");
    let counted: Vec<u64> = h.stats().shed.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect();
    assert_eq!(counted, shed.to_vec(), "the engine counts what it shed, per class");
}

/// A map install (like every step of a shard move) goes in the control lane:
/// it is answered with the next batch, not after the payments queued before
/// it. The engine is paced to 200 commands a second in batches of 10, so the
/// 300 transfers queued first take 1.5 s; in one queue the install would wait
/// for all of them.
#[test]
fn a_map_install_goes_ahead_of_queued_payments() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { commands_per_s_max: 200, batch_commands_max: 10, ..EngineConfig::default() };
    let cell = start(dir.path(), config);
    let h = cell.handle();
    h.submit(vec![open_cmd("bank", true), open_cmd("alice", false)]).unwrap().wait_blocking().unwrap();
    let started = std::time::Instant::now();
    let queued: Vec<_> =
        (0..300).map(|i| h.submit(vec![transfer_cmd(&format!("q{i}"), "bank", "alice", 1)]).unwrap()).collect();
    let next = ShardMap::new(2, one_cell_map().owners().to_vec()).unwrap();
    let install = h.submit(vec![Command::real(Op::InstallShardMap(next))]).unwrap().wait_blocking().unwrap();
    let control = started.elapsed();
    assert!(install[0].changed_state(), "{install:?}");
    for q in queued {
        q.wait_blocking().unwrap();
    }
    let payments = started.elapsed();
    assert!(payments >= std::time::Duration::from_millis(1200), "the pace held the payments: {payments:?}");
    assert!(control * 3 < payments, "the install waited {control:?} of the payments' {payments:?}");
    assert_eq!(h.epoch(), 2);
    assert_eq!(balance(&cell, "alice"), 300);
}
