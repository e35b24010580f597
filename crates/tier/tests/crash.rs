//! Crash safety on real files: leftovers of an interrupted write or merge are
//! settled by `open`, and a child process killed with SIGKILL while it writes
//! and compacts loses no run it acknowledged.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use cellpay_tier::{Entry, Tier, TierError, TierOptions};
use common::{entry, key, open, roomy, run_files, stray_files, value};
use rand::{Rng, SeedableRng};

/// Five runs of 200 records at fan-in 4: one merge is due (runs 1..=4).
fn five_runs(dir: &Path) -> Tier {
    let mut tier = open(dir);
    for g in 1..=5 {
        tier.write_run(g, g, (0..200).map(|i| entry(g * 100 + i, g * 1000 + i, g)).collect()).expect("write");
    }
    tier
}

/// Every record of `five_runs` answers with its newest version.
fn check_five_runs(tier: &Tier) {
    let view = tier.view();
    for n in 100..700 {
        let g = (n / 100).min(5);
        let seq = g * 1000 + (n - g * 100);
        let found = view.get(&key(n)).expect("get").expect("present");
        assert_eq!((found.seq, found.value), (seq, value(n, seq)), "record {n}");
    }
}

#[test]
fn a_temporary_file_left_by_a_crash_is_removed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier = five_runs(dir.path());
    drop(tier);
    // A run cut off half way, as a crash before its rename leaves it, and a half-written mark.
    let whole = fs::read(&run_files(dir.path())[4]).expect("read");
    fs::write(dir.path().join(format!("{:020}-{:020}.run.tmp", 6, 6)), &whole[..whole.len() / 2]).expect("write");
    fs::write(dir.path().join("DURABLE.tmp"), b"CPTI").expect("write");
    let tier = open(dir.path());
    assert_eq!(stray_files(dir.path()), Vec::<String>::new());
    assert_eq!(tier.durable_through(), 5, "the unacknowledged run is not counted");
    check_five_runs(&tier);
}

#[test]
fn inputs_a_merge_did_not_get_to_delete_are_deleted_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tier = five_runs(dir.path());
    let inputs: Vec<(std::path::PathBuf, Vec<u8>)> =
        run_files(dir.path())[..4].iter().map(|p| (p.clone(), fs::read(p).expect("read"))).collect();
    assert!(tier.compact().expect("compact"));
    drop(tier);
    assert_eq!(run_files(dir.path()).len(), 2);
    // Every subset of the inputs left behind, as a crash between the merge's rename and its deletes leaves them.
    for subset in 1u32..16 {
        for (i, (path, bytes)) in inputs.iter().enumerate() {
            if subset & (1 << i) != 0 {
                fs::write(path, bytes).expect("restore input");
            }
        }
        let tier = open(dir.path());
        let names: Vec<String> =
            run_files(dir.path()).iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            [format!("{:020}-{:020}.run", 1, 4), format!("{:020}-{:020}.run", 5, 5)],
            "subset {subset:04b}"
        );
        assert_eq!((tier.stats().runs, tier.durable_through()), (2, 5));
        check_five_runs(&tier);
    }
}

#[test]
fn a_damaged_merged_run_is_reported_and_its_inputs_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tier = five_runs(dir.path());
    let inputs: Vec<(std::path::PathBuf, Vec<u8>)> =
        run_files(dir.path())[..4].iter().map(|p| (p.clone(), fs::read(p).expect("read"))).collect();
    assert!(tier.compact().expect("compact"));
    drop(tier);
    for (path, bytes) in &inputs {
        fs::write(path, bytes).expect("restore input");
    }
    let merged = dir.path().join(format!("{:020}-{:020}.run", 1, 4));
    let layout = common::layout(&merged);
    common::flip(&merged, layout.footer + 3);
    match Tier::open(dir.path(), roomy()) {
        Err(TierError::Corrupt { file, .. }) => assert_eq!(file, merged),
        other => panic!("expected the merged run reported corrupt, got {other:?}"),
    }
    for (path, _) in &inputs {
        assert!(path.exists(), "{} was deleted on the word of a damaged run", path.display());
    }
}

#[test]
fn runs_that_overlap_without_covering_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tier = open(dir.path());
    tier.write_run(1, 4, vec![entry(1, 1, 1)]).expect("write");
    drop(tier);
    let other = tempfile::tempdir().expect("tempdir");
    let mut tier = open(other.path());
    tier.write_run(3, 6, vec![entry(2, 2, 2)]).expect("write");
    drop(tier);
    let name = format!("{:020}-{:020}.run", 3, 6);
    fs::copy(other.path().join(&name), dir.path().join(&name)).expect("copy");
    assert!(matches!(Tier::open(dir.path(), roomy()), Err(TierError::Overlap { .. })));
}

// ---- kill -9 ------------------------------------------------------------------------------

/// Set in the child process to the directory it works in.
const CHILD_DIR_ENV: &str = "CELLPAY_TIER_CRASH_CHILD_DIR";
const RECORDS_PER_GENERATION: u64 = 1000;
const SEQS_PER_GENERATION: u64 = 1_000_000;

fn child_options() -> TierOptions {
    TierOptions { bytes_max: u64::MAX, merge_fan_in: 4, ..TierOptions::default() }
}

/// Generation g holds records g·500 .. g·500+1000: half of them newer versions of g−1's.
fn generation(g: u64) -> Vec<Entry> {
    (0..RECORDS_PER_GENERATION).map(|i| entry(g * 500 + i, g * SEQS_PER_GENERATION + i, g)).collect()
}

/// The child's side of the kill -9 test: writes generations and compacts
/// after each, reporting on stdout each generation `write_run` returned.
/// Does nothing unless started by the parent test.
#[test]
fn kill_9_child_process() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else { return };
    let mut tier = Tier::open(Path::new(&dir), child_options()).expect("child opens the tier");
    let mut out = std::io::stdout().lock();
    let first = tier.durable_through() + 1;
    // Bounded, in case the parent never kills.
    for g in first..first + 1000 {
        tier.write_run(g, g, generation(g)).expect("child writes a run");
        writeln!(out, "@durable {g}").and_then(|()| out.flush()).expect("child reports");
        writeln!(out, "@compacting").and_then(|()| out.flush()).expect("child reports");
        while tier.compact().expect("child compacts") {}
        writeln!(out, "@compacted").and_then(|()| out.flush()).expect("child reports");
    }
}

/// Notes what one line of the child's output reports: a durable generation, and the last marker seen.
fn record(line: &str, last: &mut String, durable: &mut BTreeSet<u64>) {
    if let Some(g) = line.split("@durable ").nth(1) {
        durable.insert(g.trim().parse::<u64>().expect("generation"));
    }
    if let Some(at) = line.find('@') {
        *last = line[at..].split_whitespace().next().unwrap_or_default().to_owned();
    }
}

/// Kills the child if the parent panics first.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Checks that every record of generation `g` answers, with `g`'s version or a newer one.
fn check_generation(view: &cellpay_tier::TierView, g: u64) {
    for i in 0..RECORDS_PER_GENERATION {
        let n = g * 500 + i;
        let found = view.get(&key(n)).expect("get").unwrap_or_else(|| panic!("record {n} of generation {g} lost"));
        assert!(found.seq >= g * SEQS_PER_GENERATION + i, "record {n} went back to seq {}", found.seq);
        assert_eq!(found.value, value(n, found.seq));
    }
}

#[test]
fn kill_9_while_writing_and_compacting_loses_no_acknowledged_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7ee7);
    let mut durable = BTreeSet::new();
    let mut killed_in_compaction = 0;
    let (mut left_tmp, mut left_covered) = (0, 0);
    let rounds = 12;
    for round in 0..rounds {
        let child = Command::new(&exe)
            .args(["kill_9_child_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.expect("read child stdout")).is_err() {
                    return;
                }
            }
        });
        let mut last = String::new();
        if round % 2 == 0 {
            // Right after the n-th compaction starts, plus a little: in a write, a merge or its deletes.
            let compactions = rng.random_range(1..=12);
            let mut seen = 0;
            while seen < compactions {
                let line = lines.recv().expect("the child runs until killed");
                record(&line, &mut last, &mut durable);
                seen += usize::from(line.contains("@compacting"));
            }
            std::thread::sleep(std::time::Duration::from_micros(rng.random_range(0..3000)));
        } else {
            // As soon as a merged run is seen beside its inputs: between the merge's rename and its deletes.
            while leftovers(dir.path()).covered == 0 {
                assert!(child.0.try_wait().expect("poll child").is_none(), "the child exited on its own");
            }
        }
        child.0.kill().expect("SIGKILL");
        reader.join().expect("reader thread");
        for line in lines.try_iter() {
            record(&line, &mut last, &mut durable);
        }
        let status = child.0.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "round {round}");
        killed_in_compaction += usize::from(last == "@compacting");
        let leftovers = leftovers(dir.path());
        left_tmp += usize::from(leftovers.tmp > 0);
        left_covered += usize::from(leftovers.covered > 0);

        let tier = Tier::open(dir.path(), child_options()).expect("reopen after kill -9");
        assert_eq!(stray_files(dir.path()), Vec::<String>::new(), "round {round}");
        let newest = *durable.last().expect("the child made something durable");
        assert!(tier.durable_through() >= newest, "round {round}");
        let view = tier.view();
        for &g in durable.iter().rev().take(4) {
            check_generation(&view, g);
        }
    }
    eprintln!(
        "{rounds} kills: {killed_in_compaction} during a compaction step; {left_tmp} left a temporary file, \
         {left_covered} a merged run's inputs; {} generations durable",
        durable.len()
    );
    let tier = Tier::open(dir.path(), child_options()).expect("reopen");
    let view = tier.view();
    for &g in &durable {
        check_generation(&view, g);
    }
    // Runs never overlap: a merge's leftovers were all settled.
    let files = run_files(dir.path());
    assert_eq!(files.len(), tier.stats().runs);
}

/// What a crash left for `open` to settle.
struct Leftovers {
    tmp: usize,
    /// Runs whose generations another run covers.
    covered: usize,
}

fn leftovers(dir: &Path) -> Leftovers {
    let ranges: Vec<(u64, u64)> = run_files(dir)
        .iter()
        .map(|p| {
            let name = p.file_stem().expect("name").to_string_lossy().into_owned();
            let (lo, hi) = name.split_once('-').expect("lo-hi");
            (lo.parse().expect("lo"), hi.parse().expect("hi"))
        })
        .collect();
    let covered = ranges
        .iter()
        .filter(|&&(lo, hi)| ranges.iter().any(|&(l, h)| (l, h) != (lo, hi) && l <= lo && hi <= h))
        .count();
    Leftovers { tmp: stray_files(dir).iter().filter(|n| n.ends_with(".tmp")).count(), covered }
}
