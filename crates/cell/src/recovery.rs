//! Rebuilding a cell's state from its store: the latest checkpoint, then every
//! batch after it, re-applied by the same deterministic state machine.

use std::time::{Duration, Instant};

use cellpay_core::codec::{decode_batch, DecodeError};
use cellpay_core::{snapshot, CellId, CellState, Command, Limits, ShardMap};
use cellpay_store::{Store, StoreError, TornTail};

/// Decoded log batches waiting for the snapshot to finish decoding (I7).
const REPLAY_BATCHES_BUFFERED: usize = 64;

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
    pub duration: Duration,
    /// True when the store was empty and a new cell was created.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("checkpoint after batch {seq} cannot be decoded: {source}")]
    Snapshot { seq: u64, source: DecodeError },
    #[error("the log holds batches through {last_seq} but there is no checkpoint to start from")]
    MissingCheckpoint { last_seq: u64 },
    #[error("the store belongs to cell {found}, not cell {expected}")]
    WrongCell { expected: CellId, found: CellId },
}

/// Rebuilds the state of `cell` from `store`. A new, empty store yields a fresh
/// state with `map` and `limits`, whose checkpoint 0 is durable when this
/// returns, so that its shard map and limits are durable before the first batch.
pub fn recover(
    store: &mut dyn Store,
    cell: CellId,
    map: &ShardMap,
    limits: Limits,
) -> Result<(CellState, RecoveryReport), RecoveryError> {
    let started = Instant::now();
    let checkpoint = store.load_checkpoint()?;
    let had_checkpoint = checkpoint.is_some();
    let checkpoint_seq = checkpoint.as_ref().map_or(0, |c| c.seq);
    // Two cores at work: one thread decodes the snapshot and then applies the
    // log's batches; this thread reads and decodes those batches meanwhile,
    // handing them over through a bounded channel (I7).
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<Command>)>(REPLAY_BATCHES_BUFFERED);
    let (applied, report) = std::thread::scope(|scope| {
        let applier = scope.spawn(move || -> Result<(CellState, u64), RecoveryError> {
            let mut state = match checkpoint {
                Some(c) => {
                    snapshot::decode(&c.snapshot).map_err(|source| RecoveryError::Snapshot { seq: c.seq, source })?
                }
                None => CellState::new(cell, map.clone(), limits),
            };
            if state.cell() != cell {
                return Err(RecoveryError::WrongCell { expected: cell, found: state.cell() });
            }
            let mut commands = 0u64;
            for (seq, batch) in rx {
                for (i, cmd) in batch.iter().enumerate() {
                    let outcome = state.apply(cmd);
                    if !outcome.changed_state() {
                        // Only state changes are logged, so each must apply again: anything
                        // else means the log or the state machine is not what wrote it.
                        let reason = format!("command {i} of batch {seq} did not apply on replay: {outcome:?}");
                        return Err(RecoveryError::Store(cellpay_store::StoreError::Visit { seq, reason }));
                    }
                }
                commands += batch.len() as u64;
            }
            Ok((state, commands))
        });
        let report = store.replay(checkpoint_seq, &mut |seq, bytes| {
            let batch = decode_batch(bytes).map_err(|e| e.to_string())?;
            // A closed channel means the applier stopped on an error, answered below.
            tx.send((seq, batch)).map_err(|_| "replay stopped".to_string())
        });
        drop(tx);
        let applied = applier.join().expect("the recovery thread does not panic");
        (applied, report)
    });
    // The applier's error is the cause when both failed.
    let (state, commands) = applied?;
    let report = report?;
    let created = !had_checkpoint;
    if created && report.last_seq > 0 {
        return Err(RecoveryError::MissingCheckpoint { last_seq: report.last_seq });
    }
    if created {
        // Checkpoint 0 is durable before recovery returns, so before the first
        // append: a crash can never leave a logged batch without a checkpoint
        // under it. The other way out, a genesis that needs no checkpoint, would
        // rebuild the start state from the shard map and limits the *next* start
        // passes in (another `--cells`, other limits), and replaying the log onto
        // a different start state is a different ledger. This one small, fsynced
        // file, written once when a cell is created, pins them instead.
        store.checkpoint(0, snapshot::encode(&state))?;
        store.sync_checkpoint()?;
    }
    Ok((
        state,
        RecoveryReport {
            checkpoint_seq,
            batches_replayed: report.batches,
            commands_replayed: commands,
            bytes_replayed: report.bytes,
            last_seq: report.last_seq,
            torn_tail: report.torn_tail,
            duration: started.elapsed(),
            created,
        },
    ))
}
