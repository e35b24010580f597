//! Rebuilding a cell's state from its store: the latest checkpoint, then every
//! batch after it, re-applied by the same deterministic state machine.

use std::time::{Duration, Instant};

use cellpay_core::codec::{decode_batch, DecodeError};
use cellpay_core::{snapshot, CellId, CellState, Limits, ShardMap};
use cellpay_store::{Store, StoreError, TornTail};

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
/// state with `map` and `limits`, checkpointed at once so that its shard map
/// and limits are durable before the first batch.
pub fn recover(
    store: &mut dyn Store,
    cell: CellId,
    map: &ShardMap,
    limits: Limits,
) -> Result<(CellState, RecoveryReport), RecoveryError> {
    let started = Instant::now();
    let checkpoint = store.load_checkpoint()?;
    let had_checkpoint = checkpoint.is_some();
    let (mut state, checkpoint_seq) = match &checkpoint {
        Some(c) => {
            let state =
                snapshot::decode(&c.snapshot).map_err(|source| RecoveryError::Snapshot { seq: c.seq, source })?;
            (state, c.seq)
        }
        None => (CellState::new(cell, map.clone(), limits), 0),
    };
    drop(checkpoint);
    if state.cell() != cell {
        return Err(RecoveryError::WrongCell { expected: cell, found: state.cell() });
    }
    let mut commands = 0u64;
    let report = store.replay(checkpoint_seq, &mut |seq, bytes| {
        let batch = decode_batch(bytes).map_err(|e| e.to_string())?;
        for (i, cmd) in batch.iter().enumerate() {
            let outcome = state.apply(cmd);
            if !outcome.changed_state() {
                // Only state changes are logged, so each must apply again: anything
                // else means the log or the state machine is not what wrote it.
                return Err(format!("command {i} of batch {seq} did not apply on replay: {outcome:?}"));
            }
        }
        commands += batch.len() as u64;
        Ok(())
    })?;
    let created = !had_checkpoint;
    if created && report.last_seq > 0 {
        return Err(RecoveryError::MissingCheckpoint { last_seq: report.last_seq });
    }
    if created {
        store.checkpoint(0, snapshot::encode(&state))?;
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
