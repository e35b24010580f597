//! cellpay-store: the durable store of one cell.
//!
//! The [`Store`] trait is deliberately narrow: append one batch durably, write
//! a checkpoint, list and read the checkpoints, and replay the batches after one.
//! The engine gives it opaque bytes; the store frames, checksums and fsyncs
//! them. That is all the PostgreSQL backend provides as well: a `batches` table
//! keyed by sequence number, a `checkpoints` table and a fence row.
//!
//! [`EmbeddedStore`] is the default backend: an append-only log of segment
//! files per cell, one `fdatasync` per batch, and snapshot checkpoints.
//! [`PostgresStore`] keeps the same log and checkpoints in one PostgreSQL
//! schema per cell, with a fence row instead of a file lock.

mod embedded;
mod frame;
mod postgres;

pub use crate::postgres::{PostgresOptions, PostgresStore, BATCHES_PER_PARTITION_DEFAULT, CHECKPOINT_CHUNK_BYTES_MAX};
pub use embedded::{EmbeddedStore, StoreOptions, CHECKPOINTS_KEPT};
pub use frame::{RECORD_BYTES_MAX, RECORD_HEADER_BYTES};

use std::path::PathBuf;

/// A checkpoint: the snapshot of the cell state after batch `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub snapshot: Vec<u8>,
}

/// A checkpoint the store holds, before it is read and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The batch it covers.
    pub seq: u64,
    /// Where it lives, for messages that name it.
    pub file: PathBuf,
}

/// A torn or corrupt tail that recovery cut off. Only the last record of the
/// log can be torn by a crash (each earlier one was fsynced before the next was
/// written), so cutting it loses nothing that was acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: String,
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Batches handed to the visitor.
    pub batches: u64,
    /// The sequence number of the last batch in the log (or of the checkpoint).
    pub last_seq: u64,
    pub bytes: u64,
    pub torn_tail: Option<TornTail>,
}

/// Counters of what a store wrote since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub log_bytes_written: u64,
    pub checkpoint_bytes_written: u64,
    pub fsyncs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt record in {} at offset {offset}: {reason}", file.display())]
    Corrupt { file: PathBuf, offset: u64, reason: String },
    #[error("the log has a gap: expected batch {expected}, found {found} in {}", file.display())]
    Gap { file: PathBuf, expected: u64, found: u64 },
    #[error("{} is locked by another writer of this cell", path.display())]
    Locked { path: PathBuf },
    #[error("batch {seq} is out of order: the next batch must be {expected}")]
    OutOfOrder { seq: u64, expected: u64 },
    #[error("batch of {bytes} bytes exceeds the record limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("replay rejected batch {seq}: {source}")]
    Visit { seq: u64, source: VisitError },
    #[error("the store must be replayed before it is appended to")]
    NotReplayed,
    #[error("an earlier write failed; the store refuses further writes until it is reopened")]
    Poisoned,
    #[error("checkpoint {seq} was not written: {reason}")]
    CheckpointNotReady { seq: u64, reason: String },
    /// A newer writer opened the cell (PostgreSQL): this store wrote nothing
    /// and never will; its process must step down.
    #[error("fenced out: this store holds fence token {mine}, but a newer writer took the cell over with token {current}; nothing was written")]
    Fenced { mine: i64, current: i64 },
    #[error("{place}: {source}")]
    Postgres { place: String, source: ::postgres::Error },
    #[error("{name:?} is not a plain identifier for a schema (a lowercase letter or _, then lowercase letters, digits or _; at most 63 bytes)")]
    SchemaName { name: String },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}

/// Why a visitor stopped a replay: the caller's own error (a batch that does
/// not decode, a command that does not apply again), carried as its source.
pub type VisitError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Receives each replayed batch: its sequence number and bytes. An `Err`
/// stops the replay with that error.
pub type Visitor<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), VisitError>;

/// What a checkpoint waits for before it may count (see [`Store::checkpoint_when`]).
pub type CheckpointReady = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// The durable store of one cell.
pub trait Store: Send {
    /// The durable checkpoints, newest first; none for a new cell. A store
    /// keeps the log since the oldest one it lists, so recovery can start from
    /// any of them: a damaged newest checkpoint costs a longer replay, not the cell.
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError>;

    /// Reads and verifies checkpoint `seq`. A damaged one is
    /// [`StoreError::Corrupt`], naming its file.
    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError>;

    /// The newest checkpoint, or `None` for a new cell; an error if it is damaged.
    fn load_checkpoint(&mut self) -> Result<Option<Checkpoint>, StoreError> {
        match self.checkpoints()?.first() {
            None => Ok(None),
            Some(newest) => self.read_checkpoint(newest.seq).map(Some),
        }
    }

    /// Takes damaged checkpoint `seq` out of the list (and out of the count of
    /// those kept) without deleting it, and answers where it now is.
    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<PathBuf, StoreError>;

    /// Hands every batch after `after_seq` to `visit`, in order. Cuts a torn tail
    /// and reports it; stops with an error on corruption before the tail.
    fn replay(&mut self, after_seq: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError>;

    /// Appends batch `seq` (the one after the last) and returns once it is durable.
    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError>;

    /// Records the state after batch `seq`. The write may finish in the
    /// background: a checkpoint counts (for `checkpoints` and for dropping
    /// older log) only once it is durable, and at most one is in flight. A
    /// background failure is answered by the next call.
    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError>;

    /// Like [`Store::checkpoint`], but checkpoint `seq` may count only once
    /// `ready` answers `Ok`: a precondition outside the store, such as the
    /// idempotency tier holding every record the snapshot no longer holds. A
    /// store that writes in the background waits for it there, so the caller
    /// does not; if it fails, nothing is written (older log is kept) and the
    /// next call answers [`StoreError::CheckpointNotReady`].
    fn checkpoint_when(&mut self, seq: u64, snapshot: Vec<u8>, ready: CheckpointReady) -> Result<(), StoreError> {
        ready().map_err(|reason| StoreError::CheckpointNotReady { seq, reason })?;
        self.checkpoint(seq, snapshot)
    }

    /// Returns once the checkpoint in flight, if any, is durable, or answers its failure.
    fn sync_checkpoint(&mut self) -> Result<(), StoreError>;

    fn stats(&self) -> StoreStats;
}
