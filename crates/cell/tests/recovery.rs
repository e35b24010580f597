//! Recovery against the real embedded store on real files, at the points where
//! one crash or one damaged file used to stop a cell for good: a crash right
//! after a new cell's first batch, and a damaged newest checkpoint.

mod common;

use common::{open_cmd, transfer_cmd};
use std::fs;
use std::path::{Path, PathBuf};

use cellpay_cell::{recover, Cell, EngineConfig, RecoveryError};
use cellpay_core::*;
use cellpay_store::{
    Checkpoint, EmbeddedStore, ReplayReport, Store, StoreError, StoreOptions, StoreStats, StoredCheckpoint, Visitor,
    CHECKPOINTS_KEPT,
};

fn shadow(mut cmd: Command) -> Command {
    cmd.shadow = true;
    cmd
}

fn one_cell_map() -> ShardMap {
    ShardMap::round_robin(64, 1).unwrap()
}

/// Small checkpoints and segments, so that a short run writes several of
/// each and the store drops what its oldest kept checkpoint covers.
fn small_config() -> EngineConfig {
    EngineConfig {
        checkpoint_log_bytes: 4096,
        store: StoreOptions { segment_bytes_max: 8192 },
        ..EngineConfig::default()
    }
}

fn start(dir: &Path, config: EngineConfig) -> Cell {
    Cell::open_embedded(dir, CellId(0), &one_cell_map(), config).unwrap()
}

/// Opens a bank, accounts and transfers, real and shadow, over many batches.
fn write_ledger(cell: &Cell, rounds: usize) {
    let h = cell.handle();
    h.submit(vec![open_cmd("bank", true), shadow(open_cmd("bank", true))]).unwrap().wait_blocking().unwrap();
    for i in 0..rounds {
        let cmds = (0..10)
            .flat_map(|j| {
                let acct = format!("u{}", i * 10 + j);
                let t = format!("t{i}-{j}");
                [
                    open_cmd(&acct, false),
                    transfer_cmd(&t, "bank", &acct, 7 + j as i64),
                    shadow(open_cmd(&acct, false)),
                    shadow(transfer_cmd(&t, "bank", &acct, 3)),
                ]
            })
            .collect();
        h.submit(cmds).unwrap().wait_blocking().unwrap();
    }
}

/// What a client sees of the cell.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    real_digests: Vec<u64>,
    shadow_digests: Vec<u64>,
    bank_balance: i64,
    u7_balance: i64,
}

fn observe(cell: &Cell) -> Seen {
    let h = cell.handle();
    let digests = |shadow| match h.query(Query::Digests { shadow }).unwrap().wait_blocking().unwrap() {
        QueryAnswer::Digests { digests, .. } => digests,
        other => panic!("{other:?}"),
    };
    let balance = |id: &str| {
        let q = Query::Account { shadow: false, id: AccountId::new(id).unwrap(), by: Authority::Admin };
        match h.query(q).unwrap().wait_blocking().unwrap() {
            QueryAnswer::Account(a) => a.balance,
            other => panic!("{other:?}"),
        }
    };
    Seen {
        real_digests: digests(false),
        shadow_digests: digests(true),
        bank_balance: balance("bank"),
        u7_balance: balance("u7"),
    }
}

/// The whole state recovered from `dir`, straight from the store.
fn recovered_state(dir: &Path) -> CellState {
    let mut store = EmbeddedStore::open(dir, small_config().store).unwrap();
    recover(&mut store, CellId(0), &one_cell_map(), Limits::default()).unwrap().0
}

/// A checkpoint file and the batch it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckpointFile {
    seq: u64,
    file: PathBuf,
}

/// The checkpoint files, oldest first.
fn checkpoint_files(dir: &Path) -> Vec<CheckpointFile> {
    let mut out: Vec<CheckpointFile> = fs::read_dir(dir.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .map(|file| CheckpointFile { seq: file.file_stem().unwrap().to_str().unwrap().parse().unwrap(), file })
        .collect();
    out.sort_by_key(|c| c.seq);
    out
}

/// Flips 16 bytes in the middle of a file.
fn damage_middle(file: &Path) {
    let mut bytes = fs::read(file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    fs::write(file, &bytes).unwrap();
}

/// A cell written over many checkpoints and stopped cleanly.
struct Stopped {
    /// What a client saw just before the stop.
    seen: Seen,
    /// The whole state the store holds after the stop.
    state: CellState,
    /// The two checkpoints kept.
    older: CheckpointFile,
    newer: CheckpointFile,
}

fn stopped_cell(dir: &Path) -> Stopped {
    let cell = start(dir, small_config());
    write_ledger(&cell, 30);
    assert!(cell.handle().stats().snapshot().checkpoints > 3, "several checkpoints rotated");
    let seen = observe(&cell);
    cell.stop().unwrap();
    let state = recovered_state(dir);
    let mut kept = checkpoint_files(dir);
    assert_eq!(kept.len(), CHECKPOINTS_KEPT, "{kept:?}");
    let newer = kept.pop().unwrap();
    let older = kept.pop().unwrap();
    assert!(older.seq > 0, "the older kept checkpoint is not the first one, so older log was dropped");
    Stopped { seen, state, older, newer }
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_older_one_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Stopped { seen, state, older, newer } = stopped_cell(dir.path());
    damage_middle(&newer.file);

    let cell = start(dir.path(), small_config());
    let r = cell.recovery().clone();
    assert_eq!(r.checkpoint_seq, older.seq, "recovered from the older checkpoint");
    assert_eq!(r.batches_replayed, newer.seq - older.seq, "and replayed the log since it");
    assert_eq!(r.last_seq, newer.seq);
    let [passed_over] = &r.fell_back_from[..] else { panic!("one checkpoint passed over: {r:?}") };
    assert_eq!((passed_over.seq, &passed_over.file), (newer.seq, &newer.file));
    assert!(passed_over.reason.contains("checksum"), "{}", passed_over.reason);
    assert_eq!(observe(&cell), seen);
    cell.stop().unwrap();
    let after = recovered_state(dir.path());
    assert_eq!(after.applied(), state.applied());
    assert!(after == state, "the whole state is the one before the stop");
    assert_set_aside_and_healthy(dir.path(), &r, &state);
}

/// After a fall-back the damaged file is kept beside the others under another
/// name, a sound checkpoint covers the last batch again, and the next start
/// recovers from it with nothing to pass over and nothing to replay.
fn assert_set_aside_and_healthy(dir: &Path, r: &cellpay_cell::RecoveryReport, state: &CellState) {
    let damaged = &r.fell_back_from[0];
    let aside = damaged.set_aside_as.as_ref().expect("set aside");
    assert!(aside.exists() && aside.to_str().unwrap().ends_with(".ckpt.damaged"), "{} kept", aside.display());
    let kept = checkpoint_files(dir);
    assert_eq!(kept.len(), CHECKPOINTS_KEPT, "{kept:?}");
    assert_eq!(kept[0].seq, r.checkpoint_seq, "the checkpoint it fell back to is kept");
    assert_eq!(kept[1].seq, r.last_seq, "a sound newest checkpoint was written");
    let mut store = EmbeddedStore::open(dir, small_config().store).unwrap();
    let (again, report) = recover(&mut store, CellId(0), &one_cell_map(), Limits::default()).unwrap();
    assert!(report.fell_back_from.is_empty() && report.batches_replayed == 0, "{report:?}");
    assert!(again == *state);
}

#[test]
fn a_checkpoint_whose_snapshot_does_not_decode_falls_back_too() {
    let dir = tempfile::tempdir().unwrap();
    let Stopped { seen, state, older, newer } = stopped_cell(dir.path());
    // Checksummed bytes that are not a snapshot: what a writer bug would leave.
    let mut bytes = fs::read(&newer.file).unwrap();
    let body = b"CPSNAP01 and then nothing a snapshot decoder accepts";
    bytes.truncate(16);
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    fs::write(&newer.file, &bytes).unwrap();

    let cell = start(dir.path(), small_config());
    let r = cell.recovery().clone();
    assert_eq!(r.checkpoint_seq, older.seq);
    assert_eq!(r.batches_replayed, newer.seq - older.seq);
    let [passed_over] = &r.fell_back_from[..] else { panic!("one checkpoint passed over: {r:?}") };
    assert_eq!(passed_over.file, newer.file);
    assert!(passed_over.reason.contains("does not decode"), "{}", passed_over.reason);
    assert_eq!(observe(&cell), seen);
    cell.stop().unwrap();
    assert!(recovered_state(dir.path()) == state);
    assert_set_aside_and_healthy(dir.path(), &r, &state);
}

#[test]
fn when_every_checkpoint_is_damaged_the_cell_refuses_naming_each_file() {
    let dir = tempfile::tempdir().unwrap();
    let Stopped { older, newer, .. } = stopped_cell(dir.path());
    damage_middle(&older.file);
    damage_middle(&newer.file);
    let damaged = [fs::read(&older.file).unwrap(), fs::read(&newer.file).unwrap()];

    let err = Cell::open_embedded(dir.path(), CellId(0), &one_cell_map(), small_config()).err().expect("refused");
    let RecoveryError::CheckpointsDamaged { damaged: named } = &err else { panic!("{err}") };
    assert_eq!(named.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![newer.seq, older.seq], "newest first");
    assert!(named.iter().all(|d| d.set_aside_as.is_none()));
    let text = err.to_string();
    for file in [&older.file, &newer.file] {
        assert!(text.contains(file.to_str().unwrap()), "names {}: {text}", file.display());
    }
    // Refusing changes nothing: both files are where and as they were.
    assert_eq!(checkpoint_files(dir.path()), vec![older.clone(), newer.clone()]);
    assert_eq!([fs::read(&older.file).unwrap(), fs::read(&newer.file).unwrap()], damaged);
}

/// The embedded store on real files, with the slowest background checkpoint
/// writer the `Store` contract allows: a checkpoint reaches the disk only when
/// the caller waits for it (`sync_checkpoint`, or the next `checkpoint`).
/// Dropping it is a `kill -9`: what was appended is on disk, a checkpoint
/// still pending is lost.
struct SlowCheckpoints {
    inner: EmbeddedStore,
    pending: Option<Checkpoint>,
}

impl SlowCheckpoints {
    fn write_pending(&mut self) -> Result<(), StoreError> {
        if let Some(Checkpoint { seq, snapshot }) = self.pending.take() {
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
        self.pending = Some(Checkpoint { seq, snapshot });
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
    let q = Query::Account { shadow: false, id: AccountId::new("alice").unwrap(), by: Authority::Admin };
    match cell.handle().query(q).unwrap().wait_blocking().unwrap() {
        QueryAnswer::Account(a) => assert_eq!(a.balance, 500),
        other => panic!("{other:?}"),
    }
}
