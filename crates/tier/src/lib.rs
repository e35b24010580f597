//! cellpay-tier: the disk tier of idempotency records.
//!
//! Records that leave a cell's memory are spilled here, so that a client's
//! retry within the idempotency window still finds its original transfer. The
//! tier is derived data (the cell's log is the source of truth) but a record
//! it acknowledged durable is never lost by a crash, and a damaged file is an
//! error that names it, never a silent miss: a miss answers "new transfer",
//! which would pay twice.
//!
//! Keys and values are opaque bytes. Each spill is one immutable *run* covering
//! the caller's spill generations `lo..=hi`; [`Tier::compact`] merges adjacent
//! runs (size-tiered), [`Tier::expire`] and [`Tier::enforce_bytes_max`] delete
//! whole runs from the old end. Lookups go through a [`TierView`], an immutable
//! snapshot other threads hold while the tier changes; each run in it keeps its
//! file open, so a run unlinked by compaction stays readable through old views.
//!
//! # Files
//!
//! ```text
//! <dir>/LOCK                              flock: one Tier per directory
//! <dir>/<lo, 20 digits>-<hi, 20 digits>.run   one run, generations lo..=hi
//! <dir>/<…>.run.tmp                       a run being written; removed on open
//! <dir>/DURABLE                           the highest durable generation, once its run is gone
//! <dir>/imp-<group>-<tag>-<part>.run      a run imported from another tier (a moved shard's records)
//! ```
//!
//! A run file, little-endian:
//!
//! ```text
//! header  "CPTIER01" | format version u32 | 0 u32 | lo u64 | hi u64            (32 bytes)
//! blocks  count u32 | entries | crc32c u32 (seeded with the block's offset)   (≤ 64 entries, ~4 KiB)
//!         entry: key len u32 | value len u32 | seq u64 | at_ms u64 | key | value
//! index   per block: first key len u32 | first key | block offset u64
//! filter  blocked Bloom: k u32 | block count u32 | 64-byte blocks
//! footer  index offset, len | filter offset, len | entries | blocks | lo | hi |
//!         seq min, max | at_ms min, max (u64 each) | crc32c of header, index,
//!         filter (u32 each) | "CPTIEREN" | crc32c of the footer                (120 bytes)
//! ```
//!
//! Entries are sorted by key, one per key (the highest `seq`). Opening a run
//! reads the footer, header, index and filter and checks all their checksums
//! and that the offsets fit the file; memory per run is the filter and the
//! sparse index, never the entries. A lookup asks the filter, finds the block
//! in the index, and reads and checks that one block with one `pread`.
//!
//! # Crash safety
//!
//! - A run is written under a temporary name, fsynced, renamed into place, and
//!   the directory fsynced, before [`Tier::write_run`] returns. A run file
//!   under its final name is therefore whole; a temporary one was never
//!   acknowledged and `open` removes it.
//! - Compaction renames (and fsyncs) the merged run into place *before* it
//!   unlinks any input. The merged run covers the union of its inputs'
//!   generations and only adjacent runs merge, so after a crash at any point
//!   either the inputs are intact (no merged run under its name) or the merged
//!   run is whole and every run whose range it covers is redundant: `open`
//!   verifies the covering run, then deletes the covered ones. Two runs whose
//!   ranges overlap without one covering the other never arise; `open` refuses
//!   them ([`TierError::Overlap`]).
//! - Before a deletion removes the run holding the highest generation, that
//!   generation is written durably to `DURABLE`, so [`Tier::durable_through`]
//!   never goes back, and `write_run` refuses generations at or below it.
//! - After a failed change the tier refuses further changes
//!   ([`TierError::Poisoned`]) until it is reopened, because what reached the
//!   disk is then unknown; `open` settles it from the files.

mod bloom;
mod mark;
mod policy;
mod run;
mod tier;

pub use run::{KEY_BYTES_MAX, VALUE_BYTES_MAX};
pub use tier::{ImportPage, Source, Tier, TierView, IMPORTS_OPEN_MAX, IMPORT_KEYS_MAX};

use std::path::PathBuf;

/// Tuning of a [`Tier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierOptions {
    /// Bits of Bloom filter per key (default 10, ≈1 % false positives).
    pub bloom_bits_per_key: u32,
    /// The most bytes (run files on disk) the tier may hold; past it the oldest
    /// runs are dropped ([`Tier::enforce_bytes_max`]). Compaction builds no run
    /// larger than a sixteenth of it, so one drop costs a small slice of the window.
    pub bytes_max: u64,
    /// Compaction merges this many adjacent runs of similar size once more than
    /// this many exist (default 4).
    pub merge_fan_in: usize,
    /// Past this many runs, compaction merges the smallest adjacent ones even
    /// when no size class is full (default 64).
    pub runs_max: usize,
}

impl Default for TierOptions {
    fn default() -> Self {
        Self { bloom_bits_per_key: 10, bytes_max: 16 << 30, merge_fan_in: 4, runs_max: 64 }
    }
}

impl TierOptions {
    fn check(&self) -> Result<(), TierError> {
        let reason = if !(1..=32).contains(&self.bloom_bits_per_key) {
            "bloom_bits_per_key must be in 1..=32"
        } else if !(2..=16).contains(&self.merge_fan_in) {
            "merge_fan_in must be in 2..=16"
        } else if self.runs_max < self.merge_fan_in {
            "runs_max must be at least merge_fan_in"
        } else {
            return Ok(());
        };
        Err(TierError::Options { reason })
    }
}

/// One idempotency record: an opaque key and value, the `seq` that orders
/// versions of a key (the highest wins), and the time it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub seq: u64,
    pub at_ms: u64,
    pub value: Vec<u8>,
}

/// A run [`Tier::write_run`] made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// The spill generations it covers, `lo..=hi`.
    pub lo: u64,
    pub hi: u64,
    /// Entries after keeping one version per key.
    pub entries: u64,
    /// Size of the file.
    pub bytes: u64,
    pub path: PathBuf,
}

/// What a tier holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Runs, imported ones included.
    pub runs: usize,
    /// Runs imported from another tier (a shard that moved here).
    pub imported_runs: usize,
    /// Entries summed over runs (a key in two runs counts twice until they merge).
    pub entries: u64,
    /// Bytes of run files on disk.
    pub bytes: u64,
    /// Bytes of memory the Bloom filters take.
    pub filter_bytes: u64,
    /// Bytes of memory the sparse indexes take.
    pub index_bytes: u64,
    /// The time of the oldest and newest entry held; `None` when there are none.
    pub oldest_at_ms: Option<u64>,
    pub newest_at_ms: Option<u64>,
    pub durable_through: u64,
}

/// Lookups that got past a run's filter: each costs a sparse-index search, and
/// (unless the key sorts before the run's first key) one block read. For keys
/// the tier does not hold, `filter_passes` per run asked is the false-positive rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub filter_passes: u64,
    pub block_reads: u64,
}

/// Why the tier refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt tier file {} at offset {offset}: {reason}", file.display())]
    Corrupt { file: PathBuf, offset: u64, reason: String },
    #[error("runs {} and {} overlap without one covering the other", file.display(), other.display())]
    Overlap { file: PathBuf, other: PathBuf },
    #[error("{} is locked by another tier", path.display())]
    Locked { path: PathBuf },
    #[error("generations {lo}..={hi} must be a range after the durable generation {durable_through}")]
    OutOfOrder { lo: u64, hi: u64, durable_through: u64 },
    #[error("an entry with a key of {key_bytes} bytes and a value of {value_bytes} exceeds the limits ({KEY_BYTES_MAX}, {VALUE_BYTES_MAX})")]
    TooLarge { key_bytes: usize, value_bytes: usize },
    #[error("part {part} of import {tag} in group {group} did not come in strictly ascending key order")]
    Unsorted { group: u32, tag: u64, part: u32 },
    #[error("part {part} of import {tag} in group {group} is not open here (its beginning was lost): send it again from its first page")]
    ImportNotOpen { group: u32, tag: u64, part: u32 },
    #[error("part {part} of import {tag} in group {group} brought more than the {keys_max} entries it declared")]
    ImportTooLong { group: u32, tag: u64, part: u32, keys_max: u64 },
    #[error("invalid tier options: {reason}")]
    Options { reason: &'static str },
    #[error("an earlier change failed; the tier refuses further changes until it is reopened")]
    Poisoned,
}

impl TierError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TierError {
        let path = path.into();
        move |source| TierError::Io { path, source }
    }
}
