//! The tier: the set of runs in one directory, changed by one maintenance
//! thread (spill, compact, expire, bound) and read through immutable views.

use std::cmp::Ordering;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bloom::key_hash;
use crate::mark::{read_mark, write_mark, MARK_TMP_NAME};
use crate::policy::MergePolicy;
use crate::run::{import_name, parse_import_name, parse_run_name, sync_dir, ReadCounters, Run, RunCursor, RunWriter};
use crate::{Entry, ReadStats, RunInfo, TierError, TierOptions, TierStats, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use std::sync::atomic::Ordering::Relaxed;

/// Compaction builds no run larger than this share of `bytes_max`.
const RUNS_PER_BYTES_MAX: u64 = 16;

/// An immutable snapshot of the tier's runs, cheap to share between threads.
#[derive(Debug, Default)]
pub struct TierView {
    /// In generation order, ranges disjoint.
    runs: Vec<Arc<Run>>,
    /// Runs imported from another tier (see [`Tier::import`]), oldest part first.
    imports: Vec<Arc<Imported>>,
    durable_through: u64,
    counters: Arc<ReadCounters>,
}

/// A run copied in from another tier: part `part` of import `tag` in `group`.
#[derive(Debug)]
pub(crate) struct Imported {
    pub group: u32,
    pub tag: u64,
    pub part: u32,
    /// The bytes every key of the run starts with: a lookup of another key skips it.
    pub prefix: Vec<u8>,
    pub run: Arc<Run>,
}

impl Imported {
    fn open(path: &Path, group: u32, tag: u64, part: u32) -> Result<Imported, TierError> {
        let run = Arc::new(Run::open(path, 0, 0)?);
        Self::of(run, group, tag, part)
    }

    fn of(run: Arc<Run>, group: u32, tag: u64, part: u32) -> Result<Imported, TierError> {
        let prefix = run.key_prefix()?;
        Ok(Imported { group, tag, part, prefix, run })
    }
}

/// Which of two versions of a key is newer: the later time, then the higher
/// `seq`. Within one tier both grow together; across tiers (an imported run)
/// only the time orders them, and two versions of one key differ only when
/// an id was used again after its window.
fn newer(a: &Entry, b: &Entry) -> bool {
    (a.at_ms, a.seq) > (b.at_ms, b.seq)
}

/// Where [`TierView::scan`] reads: a run of the tier, or an imported one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Run { lo: u64, hi: u64 },
    Import { group: u32, tag: u64, part: u32 },
}

impl TierView {
    /// The same view with other runs.
    fn with(&self, runs: Vec<Arc<Run>>, mut imports: Vec<Arc<Imported>>, durable_through: u64) -> Arc<TierView> {
        imports.sort_by_key(|i| (i.group, i.tag, i.part));
        Arc::new(TierView { runs, imports, durable_through, counters: Arc::clone(&self.counters) })
    }

    /// The entry with this key (the highest `seq` across runs), or `None`.
    /// A run's filter answers first, so a missing key rarely reads the disk;
    /// a damaged block read on the way is an error naming its file.
    pub fn get(&self, key: &[u8]) -> Result<Option<Entry>, TierError> {
        let hash = key_hash(key);
        let mut best: Option<Entry> = None;
        let imports = self.imports.iter().rev().filter(|i| key.starts_with(&i.prefix)).map(|i| &i.run);
        for run in self.runs.iter().rev().chain(imports) {
            if best.as_ref().is_some_and(|b| (b.at_ms, b.seq) >= (run.meta.at_ms_max, run.meta.seq_max)) {
                continue;
            }
            if let Some(found) = run.get(key, hash, &self.counters)? {
                if best.as_ref().is_none_or(|b| newer(&found, b)) {
                    best = Some(found);
                }
            }
        }
        Ok(best)
    }

    /// Where entries may be read from: every run and every imported run; or,
    /// with `seq_after`, only the tier's own runs holding a `seq` above it.
    pub fn sources(&self, seq_after: Option<u64>) -> Vec<Source> {
        let runs = self
            .runs
            .iter()
            .filter(|r| seq_after.is_none_or(|s| r.meta.seq_max > s))
            .map(|r| Source::Run { lo: r.meta.lo, hi: r.meta.hi });
        let imports = self.imports.iter().filter(|_| seq_after.is_none()).map(|i| Source::Import {
            group: i.group,
            tag: i.tag,
            part: i.part,
        });
        runs.chain(imports).collect()
    }

    fn source(&self, source: Source) -> Option<&Arc<Run>> {
        match source {
            Source::Run { lo, hi } => self.runs.iter().find(|r| (r.meta.lo, r.meta.hi) == (lo, hi)),
            Source::Import { group, tag, part } => {
                self.imports.iter().find(|i| (i.group, i.tag, i.part) == (group, tag, part)).map(|i| &i.run)
            }
        }
    }

    /// Up to `limit` entries of `source` with `from <= key < to`, after
    /// `after` (exclusive) when given, and with a `seq` above `seq_after`
    /// when given; and whether the range holds more. `None` when the view
    /// has no such source.
    pub fn scan(
        &self,
        source: Source,
        from: &[u8],
        to: &[u8],
        after: Option<&[u8]>,
        seq_after: Option<u64>,
        limit: usize,
    ) -> Result<Option<(Vec<Entry>, bool)>, TierError> {
        let Some(run) = self.source(source) else { return Ok(None) };
        let (mut entries, more) = run.range(from, to, after, limit)?;
        if let Some(s) = seq_after {
            entries.retain(|e| e.seq > s);
        }
        Ok(Some((entries, more)))
    }

    /// At most how many entries `source` holds with `from <= key < to`.
    pub fn estimate(&self, source: Source, from: &[u8], to: &[u8]) -> u64 {
        self.source(source).map_or(0, |r| r.estimate(from, to))
    }

    /// The highest spill generation durable in the tier (0 for none).
    pub fn durable_through(&self) -> u64 {
        self.durable_through
    }

    /// The time of the oldest entry held, or `None` when the tier holds none.
    pub fn oldest_at_ms(&self) -> Option<u64> {
        self.all_runs().filter(|r| r.meta.entries > 0).map(|r| r.meta.at_ms_min).min()
    }

    /// The tier's own runs, then the imported ones.
    fn all_runs(&self) -> impl Iterator<Item = &Arc<Run>> + '_ {
        self.runs.iter().chain(self.imports.iter().map(|i| &i.run))
    }

    /// What the view holds.
    pub fn stats(&self) -> TierStats {
        let with_entries = || self.all_runs().filter(|r| r.meta.entries > 0);
        TierStats {
            runs: self.runs.len() + self.imports.len(),
            imported_runs: self.imports.len(),
            entries: self.all_runs().map(|r| r.meta.entries).sum(),
            bytes: self.all_runs().map(|r| r.meta.bytes).sum(),
            filter_bytes: self.all_runs().map(|r| r.filter_bytes() as u64).sum(),
            index_bytes: self.all_runs().map(|r| r.index_bytes() as u64).sum(),
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
    /// Imports being written, oldest first (at most [`IMPORTS_OPEN_MAX`]).
    importing: Vec<Importing>,
}

/// The most imported runs [`Tier::import`] writes at once; a new one past it
/// abandons the oldest (a copy whose sender went away), I7.
pub const IMPORTS_OPEN_MAX: usize = 8;

/// The most keys one imported run may hold (its filter is sized for the
/// keys the sender declares, clamped to this), I7.
pub const IMPORT_KEYS_MAX: u64 = 1 << 24;

/// One call's worth of an import (see [`Tier::import`]).
#[derive(Debug, Clone, Copy)]
pub struct ImportPage<'a> {
    /// At most how many entries the part holds: its filter is sized for them
    /// (clamped to [`IMPORT_KEYS_MAX`]) and a part that brings more is refused.
    pub keys_max: u64,
    /// The part's first call: it starts the part afresh.
    pub first: bool,
    /// The part's last call: it makes the part durable.
    pub last: bool,
    pub entries: &'a [Entry],
}

/// An imported run part way written.
struct Importing {
    group: u32,
    tag: u64,
    part: u32,
    keys_max: u64,
    writer: RunWriter,
}

impl std::fmt::Debug for Importing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Importing({}, {}, {})", self.group, self.tag, self.part)
    }
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

/// An imported run found in the directory.
struct FoundImport {
    group: u32,
    tag: u64,
    part: u32,
    path: PathBuf,
}

/// Lists the run files and removes temporary ones; answers whether it removed any.
fn scan(dir: &Path) -> Result<(Vec<Found>, Vec<FoundImport>, bool), TierError> {
    let mut found = Vec::new();
    let mut imports = Vec::new();
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
        } else if let Some((group, tag, part)) = parse_import_name(&name) {
            imports.push(FoundImport { group, tag, part, path });
        }
    }
    imports.sort_by_key(|i| (i.group, i.tag, i.part));
    Ok((found, imports, removed))
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
                entry.key.cmp(&best.key).then((best.at_ms, best.seq).cmp(&(entry.at_ms, entry.seq))) == Ordering::Less
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
        let (found, found_imports, removed_tmp) = scan(dir)?;
        let (live, covered) = split_covered(found)?;
        // Verify the covering runs before deleting what they cover.
        let runs = live.iter().map(|f| Run::open(&f.path, f.lo, f.hi).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        let imports = found_imports
            .iter()
            .map(|i| Imported::open(&i.path, i.group, i.tag, i.part).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
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
            view: Arc::new(TierView { runs, imports, durable_through, counters: Arc::default() }),
            mark,
            poisoned: false,
            importing: Vec::new(),
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
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key).then((b.at_ms, b.seq).cmp(&(a.at_ms, a.seq))));
        entries.dedup_by(|later, kept| later.key == kept.key);
        self.change(|tier| {
            let run = build_run(&tier.dir, lo, hi, entries.len() as u64, &tier.opts, |writer| {
                entries.iter().try_for_each(|e| writer.push(e))
            })?;
            let info = RunInfo { lo, hi, entries: run.meta.entries, bytes: run.meta.bytes, path: run.path.clone() };
            let mut runs = tier.view.runs.clone();
            runs.push(Arc::new(run));
            tier.view = tier.view.with(runs, tier.view.imports.clone(), hi);
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
            let old = |r: &Run| r.meta.entries == 0 || r.meta.at_ms_max < before_at_ms;
            let doomed: Vec<bool> = tier.view.runs.iter().map(|r| old(r)).collect();
            let doomed_imports: Vec<bool> = tier.view.imports.iter().map(|i| old(&i.run)).collect();
            let dropped =
                tier.view.runs.iter().zip(&doomed).filter(|(_, d)| **d).map(|(r, _)| r.meta.entries).sum::<u64>()
                    + tier
                        .view
                        .imports
                        .iter()
                        .zip(&doomed_imports)
                        .filter(|(_, d)| **d)
                        .map(|(i, _)| i.run.meta.entries)
                        .sum::<u64>();
            tier.delete_runs(&doomed, &doomed_imports)?;
            Ok(dropped)
        })
    }

    /// Deletes the oldest runs until the run files take at most `bytes_max`.
    /// When entries were dropped, answers the time of the oldest entry still
    /// held (or, if none is, one past the newest dropped): the tier no longer
    /// answers for anything older, so the caller's window shrank. Else `None`.
    pub fn enforce_bytes_max(&mut self) -> Result<Option<u64>, TierError> {
        self.change(|tier| {
            let (runs, imports) = (&tier.view.runs, &tier.view.imports);
            let mut bytes: u64 = tier.view.all_runs().map(|r| r.meta.bytes).sum();
            let mut doomed = vec![false; runs.len()];
            let mut doomed_imports = vec![false; imports.len()];
            // The oldest first, the tier's own runs and imported ones alike.
            let mut order: Vec<(u64, bool, usize)> =
                runs.iter().enumerate().map(|(k, r)| (r.meta.at_ms_max, false, k)).collect();
            order.extend(imports.iter().enumerate().map(|(k, i)| (i.run.meta.at_ms_max, true, k)));
            order.sort_unstable();
            let mut newest_dropped: Option<u64> = None;
            for (at_ms_max, imported, k) in order {
                if bytes <= tier.opts.bytes_max {
                    break;
                }
                let run = if imported { &imports[k].run } else { &runs[k] };
                bytes -= run.meta.bytes;
                if imported {
                    doomed_imports[k] = true;
                } else {
                    doomed[k] = true;
                }
                if run.meta.entries > 0 {
                    newest_dropped = newest_dropped.max(Some(at_ms_max));
                }
            }
            tier.delete_runs(&doomed, &doomed_imports)?;
            Ok(newest_dropped.map(|newest| tier.view.oldest_at_ms().unwrap_or(newest.saturating_add(1))))
        })
    }

    /// Deletes the runs and imported runs marked doomed and publishes the view without them.
    fn delete_runs(&mut self, doomed: &[bool], doomed_imports: &[bool]) -> Result<(), TierError> {
        if !doomed.contains(&true) && !doomed_imports.contains(&true) {
            return Ok(());
        }
        let (gone, kept): (Vec<_>, Vec<_>) = self.view.runs.iter().cloned().zip(doomed).partition(|(_, d)| **d);
        let kept: Vec<Arc<Run>> = kept.into_iter().map(|(r, _)| r).collect();
        let (gone_imports, kept_imports): (Vec<_>, Vec<_>) =
            self.view.imports.iter().cloned().zip(doomed_imports).partition(|(_, d)| **d);
        let kept_imports: Vec<Arc<Imported>> = kept_imports.into_iter().map(|(i, _)| i).collect();
        let durable_through = self.view.durable_through;
        let kept_through = kept.last().map_or(0, |r| r.meta.hi);
        if kept_through < durable_through && self.mark < durable_through {
            // Commit point: the highest generation outlives its run.
            write_mark(&self.dir, durable_through)?;
            self.mark = durable_through;
        }
        for path in gone.iter().map(|(r, _)| &r.path).chain(gone_imports.iter().map(|(i, _)| &i.run.path)) {
            fs::remove_file(path).map_err(TierError::io(path))?;
        }
        sync_dir(&self.dir)?;
        self.view = self.view.with(kept, kept_imports, durable_through);
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
            tier.view = tier.view.with(runs, tier.view.imports.clone(), tier.view.durable_through);
            Ok(true)
        })
    }

    /// What the tier holds now.
    pub fn stats(&self) -> TierStats {
        self.view.stats()
    }

    /// Writes part of an imported run: the entries of one call of part
    /// `part` of import `tag` in `group`, keys strictly ascending across the
    /// calls of one part. The part's first call starts it afresh (a part left
    /// half written is abandoned); a later call finds it open or is refused
    /// ([`TierError::ImportNotOpen`]: the writer restarted, so the sender must
    /// start the part again rather than finish it without its beginning).
    /// With `last`, the part is made durable and joins the view; answers it
    /// then. Imported runs are looked up with the tier's own, the newer
    /// version of a key winning by time; they expire and count against
    /// `bytes_max` like the tier's own (the oldest records go first, loudly,
    /// see [`Tier::enforce_bytes_max`]), and are never merged into them.
    pub fn import(
        &mut self,
        (group, tag, part): (u32, u64, u32),
        page: ImportPage<'_>,
    ) -> Result<Option<RunInfo>, TierError> {
        if let Some(e) = page.entries.iter().find(|e| e.key.len() > KEY_BYTES_MAX || e.value.len() > VALUE_BYTES_MAX) {
            return Err(TierError::TooLarge { key_bytes: e.key.len(), value_bytes: e.value.len() });
        }
        let keys_max = page.keys_max.clamp(1, IMPORT_KEYS_MAX);
        let open = self.importing.iter().position(|i| (i.group, i.tag, i.part) == (group, tag, part));
        let at = match (open, page.first) {
            (Some(at), false) => at,
            (None, false) => return Err(TierError::ImportNotOpen { group, tag, part }),
            (open, true) => {
                if let Some(at) = open {
                    self.abandon(at);
                }
                if self.importing.len() == IMPORTS_OPEN_MAX {
                    self.abandon(0);
                }
                let name = import_name(group, tag, part);
                let writer = RunWriter::create_named(&self.dir, &name, 0, 0, keys_max, self.opts.bloom_bits_per_key)?;
                self.importing.push(Importing { group, tag, part, keys_max, writer });
                self.importing.len() - 1
            }
        };
        let importing = &mut self.importing[at];
        if importing.writer.entries() + page.entries.len() as u64 > importing.keys_max {
            self.abandon(at);
            return Err(TierError::ImportTooLong { group, tag, part, keys_max });
        }
        let mut last_key = importing.writer.last_key().map(<[u8]>::to_vec);
        for e in page.entries {
            if last_key.as_ref().is_some_and(|k| e.key <= *k) {
                self.abandon(at);
                return Err(TierError::Unsorted { group, tag, part });
            }
            last_key = Some(e.key.clone());
        }
        if let Err(e) = page.entries.iter().try_for_each(|e| self.importing[at].writer.push(e)) {
            self.abandon(at);
            return Err(e);
        }
        if !page.last {
            return Ok(None);
        }
        let Importing { writer, .. } = self.importing.remove(at);
        let tmp = writer.tmp_path().to_path_buf();
        // A part that fails to reach the disk is the sender's to send again:
        // it does not poison the tier, whose own runs are untouched.
        let run = match writer.finish() {
            Ok(run) => Arc::new(run),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let info = RunInfo { lo: 0, hi: 0, entries: run.meta.entries, bytes: run.meta.bytes, path: run.path.clone() };
        let imported = Arc::new(Imported::of(run, group, tag, part)?);
        let mut imports: Vec<Arc<Imported>> =
            self.view.imports.iter().filter(|i| (i.group, i.tag, i.part) != (group, tag, part)).cloned().collect();
        imports.push(imported);
        self.view = self.view.with(self.view.runs.clone(), imports, self.view.durable_through);
        Ok(Some(info))
    }

    /// Abandons the import part way written at `at`, removing its temporary file.
    fn abandon(&mut self, at: usize) {
        let abandoned = self.importing.remove(at);
        let _ = fs::remove_file(abandoned.writer.tmp_path());
    }

    /// Deletes the imported runs for which `doomed(group, tag)` holds, and
    /// abandons such imports part way written; answers how many runs went.
    pub fn drop_imports(&mut self, doomed: impl Fn(u32, u64) -> bool) -> Result<usize, TierError> {
        self.importing.retain(|i| {
            let keep = !doomed(i.group, i.tag);
            if !keep {
                let _ = fs::remove_file(i.writer.tmp_path());
            }
            keep
        });
        let marks: Vec<bool> = self.view.imports.iter().map(|i| doomed(i.group, i.tag)).collect();
        let n = marks.iter().filter(|d| **d).count();
        if n > 0 {
            let none = vec![false; self.view.runs.len()];
            self.change(|tier| tier.delete_runs(&none, &marks))?;
        }
        Ok(n)
    }

    /// The imports the tier holds: (group, tag, parts), in order.
    pub fn imports(&self) -> Vec<(u32, u64, u32)> {
        let mut out: Vec<(u32, u64, u32)> = Vec::new();
        for i in &self.view.imports {
            match out.last_mut() {
                Some(last) if (last.0, last.1) == (i.group, i.tag) => last.2 += 1,
                _ => out.push((i.group, i.tag, 1)),
            }
        }
        out
    }

    /// The directory the tier lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
