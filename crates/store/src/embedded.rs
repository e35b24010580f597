//! The embedded store: segment files of framed records, one `fdatasync` per
//! batch, and checkpoint files, all under one directory per cell.
//!
//! ```text
//! <dir>/LOCK                          flock: one writer per cell
//! <dir>/log/<first seq, 20 digits>.seg  "CPSEG001" | first seq u64 | records…
//! <dir>/checkpoint/<seq, 20 digits>.ckpt "CPCKPT01" | seq u64 | len u64 | crc32c u32 | snapshot
//! <dir>/checkpoint/<seq>.ckpt.damaged    a damaged checkpoint recovery set aside
//! ```
//!
//! A checkpoint is written to a temporary file, fsynced and renamed into place,
//! so it is either whole or absent. Reading one checks all of it: the checksum
//! covers the snapshot, and the header's seq and length must match the file's
//! name and size. After a checkpoint the next append starts a new segment. The
//! newest [`CHECKPOINTS_KEPT`] checkpoints are kept, and with them the log since
//! the oldest of them: only segments wholly covered by that one are deleted, so
//! recovery can fall back to it when a newer checkpoint is damaged.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::frame::{self, RECORD_BYTES_MAX, RECORD_HEADER_BYTES};
use crate::{
    Checkpoint, CheckpointReady, ReplayReport, Store, StoreError, StoreStats, StoredCheckpoint, TornTail, Visitor,
};

const SEGMENT_MAGIC: &[u8; 8] = b"CPSEG001";
const SEGMENT_HEADER_BYTES: usize = 16;
const CHECKPOINT_MAGIC: &[u8; 8] = b"CPCKPT01";
const CHECKPOINT_HEADER_BYTES: usize = 28;

/// A checkpoint is written and flushed in pieces of this size.
const CHECKPOINT_CHUNK_BYTES: usize = 4 << 20;

/// Checkpoints kept on disk: the newest and the one before it, to fall back to.
pub const CHECKPOINTS_KEPT: usize = 2;

/// Tuning of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// A segment is closed once it holds this many bytes; the next batch opens a new one.
    pub segment_bytes_max: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { segment_bytes_max: 64 << 20 }
    }
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
}

/// The segment appends go to.
struct Active {
    file: File,
    path: PathBuf,
    len: u64,
}

/// The embedded backend of [`Store`].
pub struct EmbeddedStore {
    dir: PathBuf,
    options: StoreOptions,
    _lock: File,
    active: Option<Active>,
    /// The next batch sequence number; `None` until `replay` has run.
    next_seq: Option<u64>,
    roll_on_next_append: bool,
    buf: Vec<u8>,
    stats: StoreStats,
    checkpoint_counters: Arc<CheckpointCounters>,
    /// The background writer of the latest checkpoint, until it is joined.
    checkpoint_in_flight: Option<JoinHandle<Result<(), StoreError>>>,
    poisoned: bool,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // A checkpoint in flight finishes (or fails) before the lock is let go.
        let _ = self.finish_checkpoint();
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn checkpoint_name(seq: u64) -> String {
    format!("{seq:020}.ckpt")
}

fn parse_numbered(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?;
    (stem.len() == 20).then(|| stem.parse().ok()).flatten()
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(StoreError::io(dir))
}

fn list_numbered(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(StoreError::io(dir))? {
        let entry = entry.map_err(StoreError::io(dir))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|s| parse_numbered(s, ext)) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Counters the background checkpoint writer adds to.
#[derive(Default)]
struct CheckpointCounters {
    bytes: AtomicU64,
    fsyncs: AtomicU64,
}

/// Writes a checkpoint file (temporary name, fsync, rename, fsync the directory).
fn write_checkpoint_file(
    dir: &Path,
    seq: u64,
    snapshot: &[u8],
    counters: &CheckpointCounters,
) -> Result<(), StoreError> {
    let path = dir.join(checkpoint_name(seq));
    let tmp = path.with_extension("ckpt.tmp");
    let mut f = File::create(&tmp).map_err(StoreError::io(&tmp))?;
    let mut header = Vec::with_capacity(CHECKPOINT_HEADER_BYTES);
    header.extend_from_slice(CHECKPOINT_MAGIC);
    header.extend_from_slice(&seq.to_le_bytes());
    header.extend_from_slice(&(snapshot.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32c::crc32c(snapshot).to_le_bytes());
    f.write_all(&header).map_err(StoreError::io(&tmp))?;
    // Write and flush in chunks: one large flush at the end would queue the
    // whole snapshot ahead of the log's next fdatasync and stall commits.
    for chunk in snapshot.chunks(CHECKPOINT_CHUNK_BYTES) {
        f.write_all(chunk).map_err(StoreError::io(&tmp))?;
        f.sync_data().map_err(StoreError::io(&tmp))?;
        counters.fsyncs.fetch_add(1, Relaxed);
    }
    f.sync_all().map_err(StoreError::io(&tmp))?;
    fs::rename(&tmp, &path).map_err(StoreError::io(&path))?;
    sync_dir(dir)?;
    counters.fsyncs.fetch_add(2, Relaxed);
    counters.bytes.fetch_add((header.len() + snapshot.len()) as u64, Relaxed);
    Ok(())
}

fn list_segments(log_dir: &Path) -> Result<Vec<Segment>, StoreError> {
    let list = list_numbered(log_dir, ".seg")?;
    Ok(list.into_iter().map(|(first_seq, path)| Segment { first_seq, path }).collect())
}

/// Drops checkpoints beyond the newest [`CHECKPOINTS_KEPT`] and the segments
/// that the oldest kept checkpoint wholly covers: the log after it stays, so
/// that recovery can start from it. Safe beside appends: it never touches the
/// newest segment.
fn drop_covered(checkpoint_dir: &Path, log_dir: &Path) -> Result<(), StoreError> {
    let checkpoints = list_numbered(checkpoint_dir, ".ckpt")?;
    let keep_from = checkpoints.len().saturating_sub(CHECKPOINTS_KEPT);
    for (_, path) in &checkpoints[..keep_from] {
        fs::remove_file(path).map_err(StoreError::io(path))?;
    }
    let Some(&(oldest_kept, _)) = checkpoints.get(keep_from) else {
        return Ok(());
    };
    let segments = list_segments(log_dir)?;
    for pair in segments.windows(2) {
        // pair[0] holds batches first_seq..pair[1].first_seq - 1.
        if pair[1].first_seq <= oldest_kept + 1 {
            fs::remove_file(&pair[0].path).map_err(StoreError::io(&pair[0].path))?;
        }
    }
    sync_dir(log_dir)?;
    sync_dir(checkpoint_dir)
}

/// How long `open` waits for the writer lock before answering `Locked`. A
/// child process forked by another thread holds a copy of the lock's
/// descriptor from its fork to its exec (the descriptor is close-on-exec), so
/// a lock just released can look held for a moment; a writer that really
/// holds it holds it for far longer.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` and takes its writer lock.
    pub fn open(dir: impl Into<PathBuf>, options: StoreOptions) -> Result<Self, StoreError> {
        let dir = dir.into();
        for sub in ["log", "checkpoint"] {
            fs::create_dir_all(dir.join(sub)).map_err(StoreError::io(dir.join(sub)))?;
        }
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::io(&lock_path))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked { path: lock_path }),
                Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io(&lock_path)(e)),
            }
        }
        sync_dir(&dir)?;
        Ok(Self {
            dir,
            options,
            _lock: lock,
            active: None,
            next_seq: None,
            roll_on_next_append: false,
            buf: Vec::new(),
            stats: StoreStats::default(),
            checkpoint_counters: Arc::default(),
            checkpoint_in_flight: None,
            poisoned: false,
        })
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    fn segments(&self) -> Result<Vec<Segment>, StoreError> {
        list_segments(&self.log_dir())
    }

    /// Waits for the checkpoint in flight, if any, and answers its failure.
    fn finish_checkpoint(&mut self) -> Result<(), StoreError> {
        match self.checkpoint_in_flight.take() {
            None => Ok(()),
            Some(writer) => writer.join().unwrap_or(Err(StoreError::Poisoned)),
        }
    }

    fn truncate(&mut self, path: &Path, len: u64) -> Result<(), StoreError> {
        let f = OpenOptions::new().write(true).open(path).map_err(StoreError::io(path))?;
        f.set_len(len).map_err(StoreError::io(path))?;
        f.sync_all().map_err(StoreError::io(path))?;
        self.stats.fsyncs += 1;
        Ok(())
    }

    fn open_for_append(&mut self, path: &Path) -> Result<(), StoreError> {
        let f = OpenOptions::new().append(true).open(path).map_err(StoreError::io(path))?;
        let len = f.metadata().map_err(StoreError::io(path))?.len();
        self.active = Some(Active { file: f, path: path.to_path_buf(), len });
        Ok(())
    }

    fn create_segment(&mut self, first_seq: u64) -> Result<(), StoreError> {
        let path = self.log_dir().join(segment_name(first_seq));
        let mut f = OpenOptions::new().create_new(true).append(true).open(&path).map_err(StoreError::io(&path))?;
        let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES);
        header.extend_from_slice(SEGMENT_MAGIC);
        header.extend_from_slice(&first_seq.to_le_bytes());
        f.write_all(&header).map_err(StoreError::io(&path))?;
        f.sync_all().map_err(StoreError::io(&path))?;
        sync_dir(&self.log_dir())?;
        self.stats.fsyncs += 2;
        self.stats.log_bytes_written += SEGMENT_HEADER_BYTES as u64;
        self.active = Some(Active { file: f, path, len: SEGMENT_HEADER_BYTES as u64 });
        Ok(())
    }

    /// Reads one segment, visits its batches after `after_seq`, and returns the
    /// last sequence number it holds. `expected` is the seq its first record must carry.
    fn replay_segment(
        &mut self,
        seg: &Segment,
        is_last: bool,
        after_seq: u64,
        report: &mut ReplayReport,
        visit: Visitor<'_>,
    ) -> Result<(), StoreError> {
        let buf = fs::read(&seg.path).map_err(StoreError::io(&seg.path))?;
        let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
            file: seg.path.clone(),
            offset: offset as u64,
            reason,
        };
        if buf.len() < SEGMENT_HEADER_BYTES && is_last {
            // A crash while creating the segment: nothing in it was acknowledged.
            fs::remove_file(&seg.path).map_err(StoreError::io(&seg.path))?;
            sync_dir(&self.log_dir())?;
            report.torn_tail = Some(TornTail {
                file: seg.path.clone(),
                offset: 0,
                bytes_dropped: buf.len() as u64,
                reason: "segment header is cut short; segment removed".into(),
            });
            return Ok(());
        }
        if buf.len() < SEGMENT_HEADER_BYTES || &buf[..8] != SEGMENT_MAGIC {
            return Err(corrupt(0, "bad segment header".into()));
        }
        let first = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        if first != seg.first_seq {
            return Err(corrupt(8, format!("header says first batch {first}, file name says {}", seg.first_seq)));
        }
        let mut at = SEGMENT_HEADER_BYTES;
        let mut expected = seg.first_seq;
        while at < buf.len() {
            match frame::decode(&buf, at) {
                Ok(record) => {
                    if record.seq != expected {
                        return Err(StoreError::Gap { file: seg.path.clone(), expected, found: record.seq });
                    }
                    if record.seq > after_seq {
                        visit(record.seq, record.payload)
                            .map_err(|source| StoreError::Visit { seq: record.seq, source })?;
                        report.batches += 1;
                        report.bytes += (record.end - at) as u64;
                    }
                    report.last_seq = record.seq;
                    expected += 1;
                    at = record.end;
                }
                Err(bad) => {
                    let seq_max = expected + (buf.len() / RECORD_HEADER_BYTES) as u64 + 1;
                    let later = frame::valid_record_after(&buf, at + 1, expected, seq_max);
                    if !is_last || later.is_some() {
                        let why = match later {
                            Some(next) => format!("{}; a valid record follows at offset {next}", bad.describe()),
                            None => format!("{}; later segments follow", bad.describe()),
                        };
                        return Err(corrupt(at, why));
                    }
                    let dropped = (buf.len() - at) as u64;
                    self.truncate(&seg.path, at as u64)?;
                    report.torn_tail = Some(TornTail {
                        file: seg.path.clone(),
                        offset: at as u64,
                        bytes_dropped: dropped,
                        reason: bad.describe(),
                    });
                    break;
                }
            }
        }
        if expected == seg.first_seq && seg.first_seq <= after_seq {
            // An empty segment that a checkpoint already covers.
            report.last_seq = report.last_seq.max(seg.first_seq - 1);
        }
        Ok(())
    }

    fn checkpoint_path(&self, seq: u64) -> PathBuf {
        self.checkpoint_dir().join(checkpoint_name(seq))
    }

    /// Reads checkpoint file `path`, which its name says covers batch `named_seq`.
    fn read_checkpoint_file(path: &Path, named_seq: u64) -> Result<Checkpoint, StoreError> {
        let buf = fs::read(path).map_err(StoreError::io(path))?;
        let corrupt =
            |offset: u64, reason: &str| StoreError::Corrupt { file: path.to_path_buf(), offset, reason: reason.into() };
        if buf.len() < CHECKPOINT_HEADER_BYTES || &buf[..8] != CHECKPOINT_MAGIC {
            return Err(corrupt(0, "bad checkpoint header"));
        }
        let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
        let body = &buf[CHECKPOINT_HEADER_BYTES..];
        if seq != named_seq {
            // The checksum does not cover the header; the name stands in for it.
            return Err(corrupt(8, "checkpoint header names another batch than its file name"));
        }
        if body.len() as u64 != len {
            return Err(corrupt(16, "checkpoint length does not match the file"));
        }
        if crc32c::crc32c(body) != crc {
            return Err(corrupt(CHECKPOINT_HEADER_BYTES as u64, "checkpoint checksum mismatch"));
        }
        Ok(Checkpoint { seq, snapshot: body.to_vec() })
    }
}

impl Store for EmbeddedStore {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let dir = self.checkpoint_dir();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let path = entry.map_err(StoreError::io(&dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A checkpoint that was never renamed into place: never counted on.
                fs::remove_file(&path).map_err(StoreError::io(&path))?;
            }
        }
        let listed = list_numbered(&dir, ".ckpt")?;
        Ok(listed.into_iter().rev().map(|(seq, file)| StoredCheckpoint { seq, file }).collect())
    }

    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        Self::read_checkpoint_file(&self.checkpoint_path(seq), seq)
    }

    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<PathBuf, StoreError> {
        // The background writer may be deleting old checkpoints: let it finish.
        self.finish_checkpoint()?;
        let path = self.checkpoint_path(seq);
        // Replaces an earlier one set aside at the same seq, if any.
        let aside = path.with_extension("ckpt.damaged");
        fs::rename(&path, &aside).map_err(StoreError::io(&path))?;
        sync_dir(&self.checkpoint_dir())?;
        self.stats.fsyncs += 1;
        Ok(aside)
    }

    fn replay(&mut self, after_seq: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        let segments = self.segments()?;
        let mut report = ReplayReport { last_seq: after_seq, ..ReplayReport::default() };
        // Segments wholly before the checkpoint are skipped (a crash may have
        // stopped their deletion); the first one read must hold after_seq + 1.
        let start = segments.iter().rposition(|s| s.first_seq <= after_seq + 1).unwrap_or(0);
        if let Some(first) = segments.get(start) {
            if first.first_seq > after_seq + 1 {
                return Err(StoreError::Gap {
                    file: first.path.clone(),
                    expected: after_seq + 1,
                    found: first.first_seq,
                });
            }
        }
        for (i, seg) in segments.iter().enumerate().skip(start) {
            if i > start && seg.first_seq != report.last_seq + 1 {
                return Err(StoreError::Gap {
                    file: seg.path.clone(),
                    expected: report.last_seq + 1,
                    found: seg.first_seq,
                });
            }
            self.replay_segment(seg, i + 1 == segments.len(), after_seq, &mut report, visit)?;
        }
        // Continue appending in the last segment, unless it was removed as torn.
        self.active = None;
        if let Some(last) = segments.last().filter(|s| s.path.exists()) {
            let path = last.path.clone();
            self.open_for_append(&path)?;
            self.roll_on_next_append = self.active.as_ref().is_some_and(|a| a.len >= self.options.segment_bytes_max);
        }
        self.next_seq = Some(report.last_seq + 1);
        Ok(report)
    }

    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if self.checkpoint_in_flight.as_ref().is_some_and(|w| w.is_finished()) {
            self.finish_checkpoint()?;
        }
        let expected = self.next_seq.ok_or(StoreError::NotReplayed)?;
        if seq != expected {
            return Err(StoreError::OutOfOrder { seq, expected });
        }
        if batch.len() > RECORD_BYTES_MAX {
            return Err(StoreError::TooLarge { bytes: batch.len(), max: RECORD_BYTES_MAX });
        }
        self.poisoned = true; // cleared below once the batch is durable
        if self.active.is_none() || self.roll_on_next_append {
            self.create_segment(seq)?;
            self.roll_on_next_append = false;
        }
        self.buf.clear();
        frame::encode(&mut self.buf, seq, batch);
        let active = self.active.as_mut().expect("created above");
        active.file.write_all(&self.buf).map_err(StoreError::io(&active.path))?;
        active.file.sync_data().map_err(StoreError::io(&active.path))?;
        active.len += self.buf.len() as u64;
        if active.len >= self.options.segment_bytes_max {
            self.roll_on_next_append = true;
        }
        self.stats.log_bytes_written += self.buf.len() as u64;
        self.stats.fsyncs += 1;
        self.next_seq = Some(seq + 1);
        self.poisoned = false;
        Ok(())
    }

    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.checkpoint_when(seq, snapshot, Box::new(|| Ok(())))
    }

    fn checkpoint_when(&mut self, seq: u64, snapshot: Vec<u8>, ready: CheckpointReady) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let next = self.next_seq.ok_or(StoreError::NotReplayed)?;
        assert!(seq < next, "a checkpoint covers only batches already appended");
        // At most one checkpoint in flight: wait for the previous one.
        self.finish_checkpoint()?;
        // Batches after this checkpoint go to a new segment, so that the
        // segments before it can be dropped whole.
        self.roll_on_next_append = true;
        let (checkpoint_dir, log_dir) = (self.checkpoint_dir(), self.log_dir());
        let counters = self.checkpoint_counters.clone();
        let writer = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                ready().map_err(|reason| StoreError::CheckpointNotReady { seq, reason })?;
                write_checkpoint_file(&checkpoint_dir, seq, &snapshot, &counters)?;
                drop_covered(&checkpoint_dir, &log_dir)
            })
            .map_err(StoreError::io(self.checkpoint_dir()))?;
        self.checkpoint_in_flight = Some(writer);
        Ok(())
    }

    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.finish_checkpoint()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            checkpoint_bytes_written: self.checkpoint_counters.bytes.load(Relaxed),
            fsyncs: self.stats.fsyncs + self.checkpoint_counters.fsyncs.load(Relaxed),
            ..self.stats
        }
    }
}
