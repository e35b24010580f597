//! The tier: the set of runs in one directory, changed by one maintenance
//! thread (spill, compact, expire, bound) and read through immutable views.

use std::cmp::Ordering;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bloom::key_hash;
use crate::mark::{read_mark, write_mark, MARK_TMP_NAME};
use crate::policy::MergePolicy;
use crate::run::{parse_run_name, sync_dir, ReadCounters, Run, RunCursor, RunWriter};
use crate::{Entry, ReadStats, RunInfo, TierError, TierOptions, TierStats, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use std::sync::atomic::Ordering::Relaxed;

/// Compaction builds no run larger than this share of `bytes_max`.
const RUNS_PER_BYTES_MAX: u64 = 16;

/// An immutable snapshot of the tier's runs, cheap to share between threads.
#[derive(Debug, Default)]
pub struct TierView {
    /// In generation order, ranges disjoint.
    runs: Vec<Arc<Run>>,
    durable_through: u64,
    counters: Arc<ReadCounters>,
}

impl TierView {
    /// The entry with this key (the highest `seq` across runs), or `None`.
    /// A run's filter answers first, so a missing key rarely reads the disk;
    /// a damaged block read on the way is an error naming its file.
    pub fn get(&self, key: &[u8]) -> Result<Option<Entry>, TierError> {
        let hash = key_hash(key);
        let mut best: Option<Entry> = None;
        for run in self.runs.iter().rev() {
            if best.as_ref().is_some_and(|b| b.seq >= run.meta.seq_max) {
                continue;
            }
            if let Some(found) = run.get(key, hash, &self.counters)? {
                if best.as_ref().is_none_or(|b| found.seq > b.seq) {
                    best = Some(found);
                }
            }
        }
        Ok(best)
    }

    /// The highest spill generation durable in the tier (0 for none).
    pub fn durable_through(&self) -> u64 {
        self.durable_through
    }

    /// The time of the oldest entry held, or `None` when the tier holds none.
    pub fn oldest_at_ms(&self) -> Option<u64> {
        self.runs.iter().filter(|r| r.meta.entries > 0).map(|r| r.meta.at_ms_min).min()
    }

    /// What the view holds.
    pub fn stats(&self) -> TierStats {
        let with_entries = || self.runs.iter().filter(|r| r.meta.entries > 0);
        TierStats {
            runs: self.runs.len(),
            entries: self.runs.iter().map(|r| r.meta.entries).sum(),
            bytes: self.runs.iter().map(|r| r.meta.bytes).sum(),
            filter_bytes: self.runs.iter().map(|r| r.filter_bytes() as u64).sum(),
            index_bytes: self.runs.iter().map(|r| r.index_bytes() as u64).sum(),
            oldest_at_ms: self.oldest_at_ms(),
            newest_at_ms: with_entries().map(|r| r.meta.at_ms_max).max(),
            durable_through: self.durable_through,
        }
    }

    /// Lookups that went past a filter, over every view of this tier since it was opened.
    pub fn read_stats(&self) -> ReadStats {
        ReadStats {
            filter_passes: self.counters.filter_passes.load(Relaxed),
            block_reads: self.counters.block_reads.load(Relaxed),
        }
    }
}

/// The disk tier in one directory, owned by one maintenance thread.
#[derive(Debug)]
pub struct Tier {
    dir: PathBuf,
    opts: TierOptions,
    _lock: File,
    view: Arc<TierView>,
    /// The generation the `DURABLE` mark holds.
    mark: u64,
    poisoned: bool,
}

/// A run file found in the directory.
struct Found {
    lo: u64,
    hi: u64,
    path: PathBuf,
}

/// How long `open` waits for the directory lock before answering `Locked`. A
/// child process forked by another thread holds a copy of the lock's
/// descriptor from its fork to its exec (the descriptor is close-on-exec), so
/// a lock just released can look held for a moment; a tier that really holds
/// it holds it for far longer.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);

fn lock(dir: &Path) -> Result<File, TierError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(TierError::io(&path))?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(TierError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(TierError::io(&path)(e)),
        }
    }
}

/// Lists the run files and removes temporary ones; answers whether it removed any.
fn scan(dir: &Path) -> Result<(Vec<Found>, bool), TierError> {
    let mut found = Vec::new();
    let mut removed = false;
    for entry in fs::read_dir(dir).map_err(TierError::io(dir))? {
        let entry = entry.map_err(TierError::io(dir))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if name.ends_with(".run.tmp") || name == MARK_TMP_NAME {
            // Never renamed into place, so never acknowledged.
            fs::remove_file(&path).map_err(TierError::io(&path))?;
            removed = true;
        } else if let Some((lo, hi)) = parse_run_name(&name) {
            found.push(Found { lo, hi, path });
        }
    }
    Ok((found, removed))
}

/// Splits runs into live ones (generation order) and those another run's
/// range covers (a crash between a merge's rename and its deletes).
fn split_covered(mut found: Vec<Found>) -> Result<(Vec<Found>, Vec<Found>), TierError> {
    found.sort_by(|a, b| a.lo.cmp(&b.lo).then(b.hi.cmp(&a.hi)));
    let mut live: Vec<Found> = Vec::new();
    let mut covered = Vec::new();
    for run in found {
        match live.last() {
            Some(last) if run.hi <= last.hi => covered.push(run),
            Some(last) if run.lo <= last.hi => {
                return Err(TierError::Overlap { file: run.path, other: last.path.clone() });
            }
            _ => live.push(run),
        }
    }
    Ok((live, covered))
}

/// Streams a run out with `fill`, removing the temporary file if it fails.
fn build_run(
    dir: &Path,
    lo: u64,
    hi: u64,
    keys_max: u64,
    opts: &TierOptions,
    fill: impl FnOnce(&mut RunWriter) -> Result<(), TierError>,
) -> Result<Run, TierError> {
    let mut writer = RunWriter::create(dir, lo, hi, keys_max, opts.bloom_bits_per_key)?;
    let tmp = writer.tmp_path().to_path_buf();
    let run = fill(&mut writer).and_then(|()| writer.finish());
    if run.is_err() {
        // Best effort: open removes it anyway.
        let _ = fs::remove_file(&tmp);
    }
    run
}

/// Merges the runs' entries in key order into `writer`, one version per key (the highest seq).
fn merge_into(inputs: &[Arc<Run>], writer: &mut RunWriter) -> Result<(), TierError> {
    let mut cursors: Vec<RunCursor> = inputs.iter().cloned().map(RunCursor::new).collect();
    let mut heads = cursors.iter_mut().map(RunCursor::next).collect::<Result<Vec<_>, _>>()?;
    loop {
        let mut pick: Option<usize> = None;
        for (i, head) in heads.iter().enumerate() {
            let Some(entry) = head else { continue };
            let better = pick.is_none_or(|p| {
                let best = heads[p].as_ref().expect("a picked head is present");
                entry.key.cmp(&best.key).then(best.seq.cmp(&entry.seq)) == Ordering::Less
            });
            if better {
                pick = Some(i);
            }
        }
        let Some(pick) = pick else { return Ok(()) };
        let chosen = heads[pick].take().expect("a picked head is present");
        heads[pick] = cursors[pick].next()?;
        // Older versions of the key (a run holds each key once) are skipped.
        for (head, cursor) in heads.iter_mut().zip(cursors.iter_mut()) {
            if head.as_ref().is_some_and(|e| e.key == chosen.key) {
                *head = cursor.next()?;
            }
        }
        writer.push(&chosen)?;
    }
}

impl Tier {
    /// Opens (creating if needed) the tier in `dir` and takes its lock. Removes
    /// temporary files and runs covered by a merged run, and verifies every
    /// other run's header, footer, index and filter.
    pub fn open(dir: &Path, opts: TierOptions) -> Result<Tier, TierError> {
        opts.check()?;
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(TierError::io(dir))?;
            // The new directory's own entry must be durable before any run in it is.
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            sync_dir(parent)?;
        }
        let lock = lock(dir)?;
        let (found, removed_tmp) = scan(dir)?;
        let (live, covered) = split_covered(found)?;
        // Verify the covering runs before deleting what they cover.
        let runs = live.iter().map(|f| Run::open(&f.path, f.lo, f.hi).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        for run in &covered {
            fs::remove_file(&run.path).map_err(TierError::io(&run.path))?;
        }
        if removed_tmp || !covered.is_empty() {
            sync_dir(dir)?;
        }
        let mark = read_mark(dir)?;
        let durable_through = runs.last().map_or(0, |r| r.meta.hi).max(mark);
        Ok(Tier {
            dir: dir.to_path_buf(),
            opts,
            _lock: lock,
            view: Arc::new(TierView { runs, durable_through, counters: Arc::default() }),
            mark,
            poisoned: false,
        })
    }

    /// Runs a change; a failure poisons the tier, since what reached the disk is unknown.
    fn change<T>(&mut self, op: impl FnOnce(&mut Tier) -> Result<T, TierError>) -> Result<T, TierError> {
        if self.poisoned {
            return Err(TierError::Poisoned);
        }
        let result = op(self);
        self.poisoned = result.is_err();
        result
    }

    /// Writes one immutable run covering spill generations `lo..=hi`, durably:
    /// entries sorted by key, one per key (the highest `seq`). Returns once it is
    /// durable; it is in [`Tier::view`] afterwards. Generations must come after
    /// [`Tier::durable_through`]; `entries` may be empty.
    pub fn write_run(&mut self, lo: u64, hi: u64, mut entries: Vec<Entry>) -> Result<RunInfo, TierError> {
        let durable_through = self.durable_through();
        if lo > hi || lo <= durable_through {
            return Err(TierError::OutOfOrder { lo, hi, durable_through });
        }
        if let Some(e) = entries.iter().find(|e| e.key.len() > KEY_BYTES_MAX || e.value.len() > VALUE_BYTES_MAX) {
            return Err(TierError::TooLarge { key_bytes: e.key.len(), value_bytes: e.value.len() });
        }
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key).then(b.seq.cmp(&a.seq)));
        entries.dedup_by(|later, kept| later.key == kept.key);
        self.change(|tier| {
            let run = build_run(&tier.dir, lo, hi, entries.len() as u64, &tier.opts, |writer| {
                entries.iter().try_for_each(|e| writer.push(e))
            })?;
            let info = RunInfo { lo, hi, entries: run.meta.entries, bytes: run.meta.bytes, path: run.path.clone() };
            let mut runs = tier.view.runs.clone();
            runs.push(Arc::new(run));
            tier.view = Arc::new(TierView { runs, durable_through: hi, counters: Arc::clone(&tier.view.counters) });
            Ok(info)
        })
    }

    /// The highest spill generation durable in the tier (0 for none). Survives reopen.
    pub fn durable_through(&self) -> u64 {
        self.view.durable_through
    }

    /// An immutable snapshot of the current runs, for lookups from any thread.
    pub fn view(&self) -> Arc<TierView> {
        Arc::clone(&self.view)
    }

    /// Deletes the runs whose newest entry is older than `before_at_ms` (and
    /// empty runs); answers how many entries went.
    pub fn expire(&mut self, before_at_ms: u64) -> Result<u64, TierError> {
        self.change(|tier| {
            let doomed: Vec<bool> =
                tier.view.runs.iter().map(|r| r.meta.entries == 0 || r.meta.at_ms_max < before_at_ms).collect();
            let dropped = tier.view.runs.iter().zip(&doomed).filter(|(_, d)| **d).map(|(r, _)| r.meta.entries).sum();
            tier.delete_runs(&doomed)?;
            Ok(dropped)
        })
    }

    /// Deletes the oldest runs until the run files take at most `bytes_max`.
    /// When entries were dropped, answers the time of the oldest entry still
    /// held (or, if none is, one past the newest dropped): the tier no longer
    /// answers for anything older, so the caller's window shrank. Else `None`.
    pub fn enforce_bytes_max(&mut self) -> Result<Option<u64>, TierError> {
        self.change(|tier| {
            let runs = &tier.view.runs;
            let mut bytes: u64 = runs.iter().map(|r| r.meta.bytes).sum();
            let mut doomed = vec![false; runs.len()];
            for (run, doom) in runs.iter().zip(doomed.iter_mut()) {
                if bytes <= tier.opts.bytes_max {
                    break;
                }
                bytes -= run.meta.bytes;
                *doom = true;
            }
            let newest_dropped = runs
                .iter()
                .zip(&doomed)
                .filter(|(r, d)| **d && r.meta.entries > 0)
                .map(|(r, _)| r.meta.at_ms_max)
                .max();
            tier.delete_runs(&doomed)?;
            Ok(newest_dropped.map(|newest| tier.view.oldest_at_ms().unwrap_or(newest.saturating_add(1))))
        })
    }

    /// Deletes the runs marked doomed and publishes the view without them.
    fn delete_runs(&mut self, doomed: &[bool]) -> Result<(), TierError> {
        if !doomed.contains(&true) {
            return Ok(());
        }
        let (gone, kept): (Vec<_>, Vec<_>) = self.view.runs.iter().cloned().zip(doomed).partition(|(_, d)| **d);
        let kept: Vec<Arc<Run>> = kept.into_iter().map(|(r, _)| r).collect();
        let durable_through = self.view.durable_through;
        let kept_through = kept.last().map_or(0, |r| r.meta.hi);
        if kept_through < durable_through && self.mark < durable_through {
            // Commit point: the highest generation outlives its run.
            write_mark(&self.dir, durable_through)?;
            self.mark = durable_through;
        }
        for (run, _) in &gone {
            fs::remove_file(&run.path).map_err(TierError::io(&run.path))?;
        }
        sync_dir(&self.dir)?;
        self.view = Arc::new(TierView { runs: kept, durable_through, counters: Arc::clone(&self.view.counters) });
        Ok(())
    }

    fn merge_policy(&self) -> MergePolicy {
        MergePolicy {
            fan_in: self.opts.merge_fan_in,
            runs_max: self.opts.runs_max,
            run_bytes_max: self.opts.bytes_max / RUNS_PER_BYTES_MAX,
        }
    }

    /// One step of compaction if one is due: merges adjacent runs of similar
    /// size into one run covering their generations, one version per key.
    /// Answers whether it merged anything.
    pub fn compact(&mut self) -> Result<bool, TierError> {
        self.change(|tier| {
            let sizes: Vec<u64> = tier.view.runs.iter().map(|r| r.meta.bytes).collect();
            let Some(range) = tier.merge_policy().pick(&sizes) else {
                return Ok(false);
            };
            let inputs: Vec<Arc<Run>> = tier.view.runs[range.clone()].to_vec();
            let lo = inputs[0].meta.lo;
            let hi = inputs[inputs.len() - 1].meta.hi;
            let keys_max = inputs.iter().map(|r| r.meta.entries).sum();
            let merged = build_run(&tier.dir, lo, hi, keys_max, &tier.opts, |writer| merge_into(&inputs, writer))?;
            // Commit point: the merged run is durable, its inputs redundant.
            for input in &inputs {
                fs::remove_file(&input.path).map_err(TierError::io(&input.path))?;
            }
            sync_dir(&tier.dir)?;
            let mut runs = tier.view.runs.clone();
            runs.splice(range, [Arc::new(merged)]);
            tier.view = Arc::new(TierView {
                runs,
                durable_through: tier.view.durable_through,
                counters: Arc::clone(&tier.view.counters),
            });
            Ok(true)
        })
    }

    /// What the tier holds now.
    pub fn stats(&self) -> TierStats {
        self.view.stats()
    }

    /// The directory the tier lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
