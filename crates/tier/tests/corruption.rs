//! A damaged run is an error that names its file, never a silent miss: a miss
//! would answer "new transfer" to a retry and pay it twice.

mod common;

use std::path::{Path, PathBuf};

use cellpay_tier::{Tier, TierError};
use common::{entry, flip, key, layout, open, roomy, run_files};

/// One run of 1000 records, the tier closed; answers the run's path.
fn one_run(dir: &Path) -> PathBuf {
    let mut tier = open(dir);
    tier.write_run(1, 1, (0..1000).map(|n| entry(n, n, 1)).collect()).expect("write");
    drop(tier);
    run_files(dir).pop().expect("one run")
}

fn assert_open_names(dir: &Path, run: &Path) {
    match Tier::open(dir, roomy()) {
        Err(TierError::Corrupt { file, .. }) => assert_eq!(file, run),
        other => panic!("expected {} reported corrupt, got {other:?}", run.display()),
    }
}

#[test]
fn a_flipped_byte_in_the_filter_fails_open_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = one_run(dir.path());
    let at = layout(&run);
    flip(&run, at.filter + (at.footer - at.filter) / 2);
    assert_open_names(dir.path(), &run);
}

#[test]
fn a_flipped_byte_in_the_footer_index_or_header_fails_open_naming_the_file() {
    for offset in [|l: &common::Layout| l.footer + 5, |l: &common::Layout| l.index + 9, |_: &common::Layout| 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = one_run(dir.path());
        flip(&run, offset(&layout(&run)));
        assert_open_names(dir.path(), &run);
    }
}

#[test]
fn a_truncated_run_fails_open_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = one_run(dir.path());
    let len = std::fs::metadata(&run).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&run).expect("open").set_len(len - 1).expect("truncate");
    assert_open_names(dir.path(), &run);
}

#[test]
fn a_flipped_byte_in_an_entry_fails_the_lookup_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = one_run(dir.path());
    let at = layout(&run);
    // Somewhere in the middle of the first block: inside record 0..64's bytes.
    flip(&run, at.data + 200);
    let mut tier = Tier::open(dir.path(), roomy()).expect("open checks no data block");
    let view = tier.view();
    let mut errors = 0;
    for n in 0..64 {
        match view.get(&key(n)) {
            Err(TierError::Corrupt { file, offset, .. }) => {
                assert_eq!((file, offset), (run.clone(), at.data), "record {n}");
                errors += 1;
            }
            other => panic!("record {n} in the damaged block answered {other:?}"),
        }
    }
    assert_eq!(errors, 64);
    // Other blocks still answer.
    assert_eq!(view.get(&key(500)).expect("get").expect("present").seq, 500);
    // Compaction reads every block, so it reports the damage too (and changes nothing).
    tier.write_run(2, 2, vec![entry(5000, 5000, 2)]).expect("write");
    let opts = cellpay_tier::TierOptions { merge_fan_in: 2, ..roomy() };
    drop(tier);
    let mut tier = Tier::open(dir.path(), opts).expect("open");
    tier.write_run(3, 3, vec![entry(5001, 5001, 3)]).expect("write");
    match tier.compact() {
        Err(TierError::Corrupt { file, .. }) => assert_eq!(file, run),
        other => panic!("compaction over a damaged block answered {other:?}"),
    }
    assert!(matches!(tier.compact(), Err(TierError::Poisoned)));
    assert_eq!(run_files(dir.path()).len(), 3, "nothing was deleted");
}
