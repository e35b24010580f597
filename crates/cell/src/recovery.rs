//! Rebuilding a cell's state from its store: a checkpoint, then every batch
//! after it, re-applied by the same deterministic state machine.
//!
//! Recovery starts from the newest sound checkpoint. A damaged one (its file
//! fails the store's checks, or its snapshot does not decode) is passed over,
//! loudly, for the one before it: the store keeps the log since its oldest
//! checkpoint, so the longer replay ends in the same state and loses nothing.
//! Only when every checkpoint is damaged does the cell refuse to start, naming
//! them all. A log that does not replay is never passed over: every starting
//! point shares it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cellpay_core::codec::{decode_batch, DecodeError, LoggedBatch};
use cellpay_core::{snapshot, CellId, CellState, Limits, ShardMap};
use cellpay_store::{Checkpoint, Store, StoreError, StoredCheckpoint, TornTail};

/// Decoded log batches waiting for the snapshot to finish decoding (I7).
const REPLAY_BATCHES_BUFFERED: usize = 64;

/// A checkpoint recovery passed over because it is damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedCheckpoint {
    /// The batch it claims to cover.
    pub seq: u64,
    pub file: PathBuf,
    pub reason: String,
    /// Where the file was moved once the cell recovered without it; `None`
    /// when recovery refused and left every file where it was.
    pub set_aside_as: Option<PathBuf>,
}

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The batch the checkpoint covered (0: none yet).
    pub checkpoint_seq: u64,
    pub batches_replayed: u64,
    pub commands_replayed: u64,
    pub bytes_replayed: u64,
    /// The last batch in the store; the next append is `last_seq + 1`.
    pub last_seq: u64,
    pub torn_tail: Option<TornTail>,
    /// Damaged checkpoints passed over for an older one, newest first; empty
    /// when the newest checkpoint was sound.
    pub fell_back_from: Vec<DamagedCheckpoint>,
    pub duration: Duration,
    /// True when the store was empty and a new cell was created.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("every checkpoint is damaged, so there is no state to replay the log onto: {}", describe(.damaged))]
    CheckpointsDamaged { damaged: Vec<DamagedCheckpoint> },
    #[error("the log holds batches through {last_seq} but there is no checkpoint to start from")]
    MissingCheckpoint { last_seq: u64 },
    #[error("the store belongs to cell {found}, not cell {expected}")]
    WrongCell { expected: CellId, found: CellId },
    #[error("the idempotency tier: {0}")]
    Tier(#[from] cellpay_tier::TierError),
}

fn describe(damaged: &[DamagedCheckpoint]) -> String {
    let each: Vec<String> = damaged.iter().map(|d| format!("{} ({})", d.file.display(), d.reason)).collect();
    each.join("; ")
}

/// Where an attempt starts from.
enum Start {
    Checkpoint(Checkpoint),
    /// A new cell: nothing durable yet.
    Genesis(Box<CellState>),
}

impl Start {
    fn after_seq(&self) -> u64 {
        match self {
            Start::Checkpoint(c) => c.seq,
            Start::Genesis(_) => 0,
        }
    }
}

/// Why an attempt failed.
/// Why replaying a logged batch stopped (the store reports it with the batch).
#[derive(Debug, thiserror::Error)]
enum ReplayRefused {
    /// Only state changes are logged: one that does not apply again means the
    /// log or the state machine is not what wrote it.
    #[error("command {index} did not apply on replay: {outcome}")]
    NotApplied { index: usize, outcome: String },
    #[error("replay stopped")]
    Stopped,
}

enum Failure {
    /// The checkpoint's snapshot does not decode: an older checkpoint may.
    Snapshot(DecodeError),
    Fatal(RecoveryError),
}

/// The state an attempt rebuilt.
struct Replayed {
    state: CellState,
    commands: u64,
    log: cellpay_store::ReplayReport,
}

/// Rebuilds the state of `cell` from `store`, from its newest sound checkpoint.
/// A new, empty store yields a fresh state with `map` and `limits`, whose
/// checkpoint 0 is durable when this returns.
pub fn recover(
    store: &mut dyn Store,
    cell: CellId,
    map: &ShardMap,
    limits: Limits,
) -> Result<(CellState, RecoveryReport), RecoveryError> {
    recover_with_tier(store, cell, map, limits, None)
}

/// As [`recover`], for a cell with a disk tier of idempotency records: the
/// records the replay moves out of memory are left for the caller to hand to
/// the tier (`CellState::take_spilled`) before its next checkpoint, or, when
/// recovery itself checkpoints (after a fall-back), written to `tier` durably
/// first, since the checkpoint the replay started from held them and the next
/// one will not.
pub fn recover_with_tier(
    store: &mut dyn Store,
    cell: CellId,
    map: &ShardMap,
    limits: Limits,
    mut tier: Option<&mut cellpay_tier::Tier>,
) -> Result<(CellState, RecoveryReport), RecoveryError> {
    let spill = tier.is_some();
    let started = Instant::now();
    let mut damaged = Vec::new();
    let mut torn_tail = None;
    for stored in store.checkpoints()? {
        let checkpoint = match store.read_checkpoint(stored.seq) {
            Ok(checkpoint) => checkpoint,
            Err(StoreError::Corrupt { reason, .. }) => {
                damaged.push(pass_over(stored, reason));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match replay_onto(store, Start::Checkpoint(checkpoint), cell, &mut torn_tail, spill) {
            Ok(mut replayed) => {
                // A fall-back checkpoints at once, so what the replay moved out
                // of memory must be in the tier first; otherwise the engine hands
                // it to the tier as its first generation (`take_spilled`), and
                // its first checkpoint waits for it like any other.
                if !damaged.is_empty() {
                    spill_replayed(&mut replayed.state, tier.as_deref_mut())?;
                }
                let report = RecoveryReport {
                    checkpoint_seq: stored.seq,
                    fell_back_from: damaged,
                    ..report_of(&replayed, torn_tail, started)
                };
                return set_damaged_aside(store, replayed.state, report);
            }
            Err(Failure::Snapshot(e)) => damaged.push(pass_over(stored, format!("snapshot does not decode: {e}"))),
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    if !damaged.is_empty() {
        return Err(RecoveryError::CheckpointsDamaged { damaged });
    }
    let genesis = Start::Genesis(Box::new(CellState::new(cell, map.clone(), limits)));
    let replayed = match replay_onto(store, genesis, cell, &mut torn_tail, spill) {
        Ok(replayed) => replayed,
        Err(Failure::Fatal(e)) => return Err(e),
        Err(Failure::Snapshot(_)) => unreachable!("genesis decodes no snapshot"),
    };
    if replayed.log.last_seq > 0 {
        return Err(RecoveryError::MissingCheckpoint { last_seq: replayed.log.last_seq });
    }
    // Checkpoint 0 is durable before recovery returns, so before the first
    // append: a crash can never leave a logged batch without a checkpoint
    // under it. The other way out, a genesis that needs no checkpoint, would
    // rebuild the start state from the shard map and limits the *next* start
    // passes in (another `--cells`, other limits), and replaying the log onto
    // a different start state is a different ledger. This one small, fsynced
    // file, written once when a cell is created, pins them instead.
    store.checkpoint(0, snapshot::encode(&replayed.state))?;
    store.sync_checkpoint()?;
    let report = RecoveryReport { created: true, ..report_of(&replayed, torn_tail, started) };
    Ok((replayed.state, report))
}

fn report_of(replayed: &Replayed, torn_tail: Option<TornTail>, started: Instant) -> RecoveryReport {
    RecoveryReport {
        checkpoint_seq: 0,
        batches_replayed: replayed.log.batches,
        commands_replayed: replayed.commands,
        bytes_replayed: replayed.log.bytes,
        last_seq: replayed.log.last_seq,
        torn_tail,
        fell_back_from: Vec::new(),
        duration: started.elapsed(),
        created: false,
    }
}

fn pass_over(stored: StoredCheckpoint, reason: String) -> DamagedCheckpoint {
    tracing::error!(
        file = %stored.file.display(),
        seq = stored.seq,
        "checkpoint is damaged and passed over: {reason}"
    );
    DamagedCheckpoint { seq: stored.seq, file: stored.file, reason, set_aside_as: None }
}

/// After a fall-back: moves the damaged checkpoints out of the way (kept, not
/// deleted) and checkpoints the recovered state at once, so that the store
/// again keeps two sound checkpoints and the next start does not replay as far.
fn set_damaged_aside(
    store: &mut dyn Store,
    state: CellState,
    mut report: RecoveryReport,
) -> Result<(CellState, RecoveryReport), RecoveryError> {
    if report.fell_back_from.is_empty() {
        return Ok((state, report));
    }
    for damaged in &mut report.fell_back_from {
        damaged.set_aside_as = Some(store.set_aside_checkpoint(damaged.seq)?);
    }
    store.checkpoint(report.last_seq, snapshot::encode(&state))?;
    store.sync_checkpoint()?;
    tracing::warn!(
        checkpoint = report.checkpoint_seq,
        batches = report.batches_replayed,
        "recovered from an older checkpoint; damaged ones set aside: {}",
        describe(&report.fell_back_from)
    );
    Ok((state, report))
}

/// Rebuilds the state from `start` and the log after it. Two cores at work:
/// one thread decodes the snapshot and then applies the log's batches; this
/// thread reads and decodes those batches meanwhile, handing them over
/// through a bounded channel (I7). A torn tail the replay cut is recorded in
/// `torn_tail`, even when the attempt fails: a later attempt will not see it.
/// Writes the records a replay moved out of memory to the tier, as one run.
fn spill_replayed(state: &mut CellState, tier: Option<&mut cellpay_tier::Tier>) -> Result<(), RecoveryError> {
    let Some(tier) = tier else { return Ok(()) };
    let (real, shadow) = state.take_spilled();
    if real.is_empty() && shadow.is_empty() {
        return Ok(());
    }
    let gen = tier.durable_through() + 1;
    let records = real.iter().map(|r| (false, r)).chain(shadow.iter().map(|r| (true, r)));
    let entries = crate::tier::entries(gen, state.shard_map().shards(), records);
    tier.write_run(gen, gen, entries)?;
    Ok(())
}

fn replay_onto(
    store: &mut dyn Store,
    start: Start,
    cell: CellId,
    torn_tail: &mut Option<TornTail>,
    spill: bool,
) -> Result<Replayed, Failure> {
    let after_seq = start.after_seq();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, LoggedBatch)>(REPLAY_BATCHES_BUFFERED);
    let (applied, log) = std::thread::scope(|scope| {
        let applier = scope.spawn(move || -> Result<(CellState, u64), Failure> {
            let mut state = match start {
                Start::Checkpoint(c) => snapshot::decode(&c.snapshot).map_err(Failure::Snapshot)?,
                Start::Genesis(state) => *state,
            };
            state.set_spill(spill);
            if state.cell() != cell {
                return Err(Failure::Fatal(RecoveryError::WrongCell { expected: cell, found: state.cell() }));
            }
            let mut commands = 0u64;
            for (seq, batch) in rx {
                state.advance_clock(batch.clock_ms);
                for (i, cmd) in batch.commands.iter().enumerate() {
                    let outcome = state.replay(cmd);
                    if !outcome.changed_state() {
                        // Only state changes are logged, so each must apply again: anything
                        // else means the log or the state machine is not what wrote it.
                        let source = Box::new(ReplayRefused::NotApplied { index: i, outcome: format!("{outcome:?}") });
                        return Err(Failure::Fatal(StoreError::Visit { seq, source }.into()));
                    }
                }
                state.end_batch();
                commands += batch.commands.len() as u64;
            }
            Ok((state, commands))
        });
        let log = store.replay(after_seq, &mut |seq, bytes| {
            let batch = decode_batch(bytes)?;
            // A closed channel means the applier stopped on an error, answered below.
            tx.send((seq, batch)).map_err(|_| ReplayRefused::Stopped.into())
        });
        drop(tx);
        let applied = applier.join().expect("the recovery thread does not panic");
        (applied, log)
    });
    if let Ok(log) = &log {
        *torn_tail = torn_tail.take().or_else(|| log.torn_tail.clone());
    }
    // The applier's error is the cause when both failed.
    let (state, commands) = applied?;
    let log = log.map_err(|e| Failure::Fatal(e.into()))?;
    Ok(Replayed { state, commands, log })
}
