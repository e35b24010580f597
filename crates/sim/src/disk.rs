//! A simulated disk behind the real [`Store`] interface: the log and the
//! checkpoints of one cell in memory, surviving the cell's crashes (the
//! [`Disk`] outlives every [`SimStore`] opened on it), with the faults a
//! real disk has.
//!
//! What it models, record by record (the byte format is the embedded store's
//! business and its own tests'):
//! - **fsync errors.** An append whose fsync fails answers an error; whether
//!   its bytes reached the platter is unknown, so the disk keeps them or not
//!   at random. The engine must fail-stop without answering the batch.
//! - **Torn writes at a crash.** A crash may leave a partial record after the
//!   last durable one; recovery must cut it (it was never acknowledged).
//! - **Lost unsynced writes.** A checkpoint is written in the background and
//!   counts only once durable: a crash before that loses it.
//! - **A corrupted sector.** A damaged checkpoint must be passed over (recovery
//!   falls back to an older one and the log since it); a damaged record in the
//!   middle of the log must stop recovery with an error naming it, never be
//!   skipped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cellpay_store::{
    Checkpoint, CheckpointReady, ReplayReport, Store, StoreError, StoreStats, StoredCheckpoint, TornTail, Visitor,
    CHECKPOINTS_KEPT,
};

#[derive(Debug, Clone)]
struct Record {
    seq: u64,
    bytes: Vec<u8>,
    /// A sector under it went bad: reading it fails its checksum.
    damaged: bool,
}

#[derive(Debug, Clone)]
struct StoredSnapshot {
    seq: u64,
    bytes: Vec<u8>,
    damaged: bool,
    set_aside: bool,
}

/// One cell's disk. Shared by the stores opened on it, one at a time.
#[derive(Debug, Default)]
pub struct Disk {
    name: String,
    log: Vec<Record>,
    /// A partial record after the last whole one, left by a crash.
    torn: Option<Vec<u8>>,
    checkpoints: Vec<StoredSnapshot>,
    /// The checkpoint written in the background, not durable yet.
    in_flight: Option<StoredSnapshot>,
    /// The next fsync fails.
    pub fail_next_fsync: bool,
    /// Whether a failed fsync still got the bytes down (decided by the simulation).
    pub failed_fsync_kept: bool,
    pub fsyncs: u64,
}

pub type SharedDisk = Arc<Mutex<Disk>>;

impl Disk {
    pub fn new(name: String) -> SharedDisk {
        Arc::new(Mutex::new(Disk { name, ..Disk::default() }))
    }

    fn file(&self, what: &str) -> PathBuf {
        PathBuf::from(format!("sim://{}/{what}", self.name))
    }

    /// A crash: the checkpoint in flight is lost unless `keep_checkpoint`
    /// (its write may have finished just before), and a partial record of
    /// `torn_bytes` bytes may be left after the last whole one.
    pub fn crash(&mut self, keep_checkpoint: bool, torn_bytes: Option<Vec<u8>>) {
        if let Some(c) = self.in_flight.take() {
            if keep_checkpoint {
                self.install(c);
            }
        }
        if let Some(bytes) = torn_bytes {
            self.torn = Some(bytes);
        }
    }

    /// Damages the log record `seq`; answers false if the log does not hold it.
    pub fn damage_record(&mut self, seq: u64) -> bool {
        self.log.iter_mut().find(|r| r.seq == seq).map(|r| r.damaged = true).is_some()
    }

    /// Damages the newest durable checkpoint, unless a kept one is damaged
    /// already (two damaged checkpoints are a double fault the design refuses:
    /// [`cellpay_cell::RecoveryError::CheckpointsDamaged`]); answers its sequence.
    pub fn damage_newest_checkpoint(&mut self) -> Option<u64> {
        if self.kept().any(|c| c.damaged) {
            return None;
        }
        let c = self.checkpoints.iter_mut().filter(|c| !c.set_aside).max_by_key(|c| c.seq)?;
        c.damaged = true;
        Some(c.seq)
    }

    /// The log records held, first and last.
    pub fn log_range(&self) -> Option<(u64, u64)> {
        Some((self.log.first()?.seq, self.log.last()?.seq))
    }

    pub fn has_damaged_record(&self) -> bool {
        self.log.iter().any(|r| r.damaged)
    }

    /// Whether a damaged record lies after checkpoint `seq` (a replay from it reads it).
    pub fn damaged_after(&self, seq: u64) -> bool {
        self.log.iter().any(|r| r.damaged && r.seq > seq)
    }

    /// The operator restores the damaged sectors (from a backup or a replica).
    pub fn repair_records(&mut self) {
        self.log.iter_mut().for_each(|r| r.damaged = false);
    }

    /// Durable checkpoints not set aside.
    pub fn kept_checkpoints(&self) -> usize {
        self.kept().count()
    }

    fn kept(&self) -> impl Iterator<Item = &StoredSnapshot> {
        self.checkpoints.iter().filter(|c| !c.set_aside)
    }

    /// A checkpoint becomes durable: the oldest kept ones beyond the limit go,
    /// and with them the log no kept checkpoint needs.
    fn install(&mut self, c: StoredSnapshot) {
        // Written under its final name: it replaces a kept one of the same batch.
        self.checkpoints.retain(|k| k.seq != c.seq || k.set_aside);
        self.checkpoints.push(c);
        self.checkpoints.sort_by_key(|c| c.seq);
        while self.kept().count() > CHECKPOINTS_KEPT {
            let oldest = self.checkpoints.iter().position(|c| !c.set_aside).expect("counted above");
            self.checkpoints.remove(oldest);
        }
        if let Some(oldest) = self.kept().map(|c| c.seq).min() {
            self.log.retain(|r| r.seq > oldest);
        }
    }
}

/// A [`Store`] on a simulated [`Disk`].
pub struct SimStore {
    disk: SharedDisk,
    next_seq: Option<u64>,
    poisoned: bool,
    stats: StoreStats,
}

impl SimStore {
    pub fn open(disk: SharedDisk) -> SimStore {
        SimStore { disk, next_seq: None, poisoned: false, stats: StoreStats::default() }
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().expect("the simulation is one thread")
    }

    fn finish_checkpoint(&mut self) {
        let mut disk = self.disk();
        if let Some(c) = disk.in_flight.take() {
            disk.install(c);
        }
    }
}

impl Store for SimStore {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let disk = self.disk();
        let mut list: Vec<StoredCheckpoint> =
            disk.kept().map(|c| StoredCheckpoint { seq: c.seq, file: disk.file(&format!("{}.ckpt", c.seq)) }).collect();
        list.sort_by_key(|c| std::cmp::Reverse(c.seq));
        Ok(list)
    }

    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        let disk = self.disk();
        let c = disk.kept().find(|c| c.seq == seq).ok_or_else(|| StoreError::Corrupt {
            file: disk.file(&format!("{seq}.ckpt")),
            offset: 0,
            reason: "no such checkpoint".into(),
        })?;
        if c.damaged {
            return Err(StoreError::Corrupt {
                file: disk.file(&format!("{seq}.ckpt")),
                offset: 0,
                reason: "checksum mismatch".into(),
            });
        }
        Ok(Checkpoint { seq, snapshot: c.bytes.clone() })
    }

    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<PathBuf, StoreError> {
        let mut disk = self.disk();
        let file = disk.file(&format!("{seq}.ckpt.damaged"));
        if let Some(c) = disk.checkpoints.iter_mut().find(|c| c.seq == seq && !c.set_aside) {
            c.set_aside = true;
        }
        Ok(file)
    }

    fn replay(&mut self, after_seq: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        let (records, torn, file) = {
            let mut disk = self.disk();
            let torn = disk.torn.take();
            let file = disk.file("log");
            (disk.log.iter().filter(|r| r.seq > after_seq).cloned().collect::<Vec<_>>(), torn, file)
        };
        let mut report = ReplayReport { last_seq: after_seq, ..ReplayReport::default() };
        for r in records {
            if r.seq != report.last_seq + 1 {
                return Err(StoreError::Gap { file, expected: report.last_seq + 1, found: r.seq });
            }
            if r.damaged {
                // Whole and acknowledged once: never a tail to cut, whatever its place.
                return Err(StoreError::Corrupt {
                    file,
                    offset: r.seq,
                    reason: format!("record {} fails its checksum", r.seq),
                });
            }
            visit(r.seq, &r.bytes).map_err(|source| StoreError::Visit { seq: r.seq, source })?;
            report.batches += 1;
            report.bytes += r.bytes.len() as u64;
            report.last_seq = r.seq;
        }
        if let Some(bytes) = torn {
            report.torn_tail = Some(TornTail {
                file,
                offset: report.last_seq,
                bytes_dropped: bytes.len() as u64,
                reason: "torn write".into(),
            });
        }
        self.next_seq = Some(report.last_seq + 1);
        Ok(report)
    }

    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let expected = self.next_seq.ok_or(StoreError::NotReplayed)?;
        if seq != expected {
            return Err(StoreError::OutOfOrder { seq, expected });
        }
        self.finish_checkpoint();
        let mut disk = self.disk();
        disk.fsyncs += 1;
        if std::mem::take(&mut disk.fail_next_fsync) {
            if disk.failed_fsync_kept {
                disk.log.push(Record { seq, bytes: batch.to_vec(), damaged: false });
            }
            let file = disk.file("log");
            drop(disk);
            self.poisoned = true;
            return Err(StoreError::Io { path: file, source: std::io::Error::other("fsync failed (simulated)") });
        }
        disk.log.push(Record { seq, bytes: batch.to_vec(), damaged: false });
        drop(disk);
        self.stats.log_bytes_written += batch.len() as u64;
        self.stats.fsyncs += 1;
        self.next_seq = Some(seq + 1);
        Ok(())
    }

    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.checkpoint_when(seq, snapshot, Box::new(|| Ok(())))
    }

    fn checkpoint_when(&mut self, seq: u64, snapshot: Vec<u8>, ready: CheckpointReady) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        self.finish_checkpoint();
        ready().map_err(|reason| StoreError::CheckpointNotReady { seq, reason })?;
        self.stats.checkpoint_bytes_written += snapshot.len() as u64;
        // In flight until the next store call (or a sync): a crash before that loses it.
        self.disk().in_flight = Some(StoredSnapshot { seq, bytes: snapshot, damaged: false, set_aside: false });
        Ok(())
    }

    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.finish_checkpoint();
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }
}
