//! The embedded store against real files with real fsync: round trips,
//! checkpoints, torn tails and corruption in the middle.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use cellpay_store::{EmbeddedStore, Store, StoreError, StoreOptions};
use proptest::prelude::*;

fn payload(seq: u64) -> Vec<u8> {
    let len = 20 + (seq * 37 % 300) as usize;
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

fn open(dir: &Path, segment_bytes_max: u64) -> EmbeddedStore {
    EmbeddedStore::open(dir, StoreOptions { segment_bytes_max }).unwrap()
}

/// A reopened store, the batches it replayed, and its report.
type Recovered = (EmbeddedStore, Vec<(u64, Vec<u8>)>, cellpay_store::ReplayReport);

/// Opens, loads the checkpoint and replays; returns the store and what it replayed.
fn recover(dir: &Path, segment_bytes_max: u64) -> Result<Recovered, StoreError> {
    let mut store = open(dir, segment_bytes_max);
    let after = store.load_checkpoint()?.map_or(0, |c| c.seq);
    let mut seen = Vec::new();
    let report = store.replay(after, &mut |seq, bytes| {
        seen.push((seq, bytes.to_vec()));
        Ok(())
    })?;
    Ok((store, seen, report))
}

fn write_batches(dir: &Path, n: u64, segment_bytes_max: u64) {
    let (mut store, seen, _) = recover(dir, segment_bytes_max).unwrap();
    let start = seen.last().map_or(0, |(s, _)| *s) + 1;
    for seq in start..start + n {
        store.append(seq, &payload(seq)).unwrap();
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir.join("log")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn batches_survive_reopen_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 200, 4096);
    assert!(segments(dir.path()).len() > 5, "small segments roll over");
    let (_, seen, report) = recover(dir.path(), 4096).unwrap();
    assert_eq!(seen.len(), 200);
    for (i, (seq, bytes)) in seen.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(bytes, &payload(*seq));
    }
    assert_eq!(report.last_seq, 200);
    assert!(report.torn_tail.is_none());
}

#[test]
fn appends_must_follow_replay_and_be_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 1 << 20);
    assert!(matches!(store.append(1, b"x"), Err(StoreError::NotReplayed)));
    store.replay(0, &mut |_, _| Ok(())).unwrap();
    assert!(matches!(store.append(2, b"x"), Err(StoreError::OutOfOrder { seq: 2, expected: 1 })));
    store.append(1, b"x").unwrap();
}

#[test]
fn a_second_writer_is_fenced_out() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), 1 << 20);
    let second = EmbeddedStore::open(dir.path(), StoreOptions::default());
    assert!(matches!(second, Err(StoreError::Locked { .. })));
}

/// A child process forked by another thread holds a copy of the lock's descriptor until its exec.
/// The store it was copied from is closed meanwhile: opening the directory again waits for the
/// exec instead of answering `Locked`.
#[test]
fn a_lock_held_only_by_a_forked_child_until_its_exec_is_waited_for() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 1 << 20);
    let spawner = std::thread::spawn(move || {
        let mut child = std::process::Command::new("true");
        // SAFETY: the hook only sleeps, which is async-signal-safe.
        unsafe {
            child.pre_exec(|| {
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(())
            });
        }
        child.spawn().expect("spawn").wait().expect("wait")
    });
    // The fork happens at once; spawn returns only after the exec, 300 ms later.
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(first);
    let reopened = EmbeddedStore::open(dir.path(), StoreOptions::default());
    assert!(reopened.is_ok(), "reopened while the child had not yet exec'd: {:?}", reopened.err());
    assert!(spawner.join().expect("spawner").success());
}

#[test]
fn a_checkpoint_drops_covered_segments_and_replay_starts_after_it() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 100, 2048);
    {
        let (mut store, _, _) = recover(dir.path(), 2048).unwrap();
        store.checkpoint(100, b"state after 100".to_vec()).unwrap();
        for seq in 101..=120 {
            store.append(seq, &payload(seq)).unwrap();
        }
        store.checkpoint(120, b"state after 120".to_vec()).unwrap();
        for seq in 121..=130 {
            store.append(seq, &payload(seq)).unwrap();
        }
    }
    // Segments before the older kept checkpoint (100) are gone.
    let first: u64 = segments(dir.path())[0].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(first > 1 && first <= 101, "first segment starts at {first}");
    let (_, seen, report) = recover(dir.path(), 2048).unwrap();
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (121..=130).collect::<Vec<_>>());
    assert_eq!(report.last_seq, 130);
    let mut store = open(dir.path(), 2048);
    assert_eq!(store.load_checkpoint().unwrap().unwrap().snapshot, b"state after 120");
}

#[test]
fn a_checkpoint_counts_only_once_its_precondition_holds_and_not_at_all_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 10, 1 << 20);
    let (mut store, _, _) = recover(dir.path(), 1 << 20).unwrap();
    // The writer is not held up while the precondition waits (in the background).
    let (release, wait) = std::sync::mpsc::channel::<Result<(), String>>();
    let ready: cellpay_store::CheckpointReady = Box::new(move || wait.recv().unwrap());
    store.checkpoint_when(10, b"ten".to_vec(), ready).unwrap();
    store.append(11, &payload(11)).unwrap();
    assert!(store.checkpoints().unwrap().is_empty(), "not durable before its precondition holds");
    release.send(Ok(())).unwrap();
    store.sync_checkpoint().unwrap();
    assert_eq!(store.checkpoints().unwrap().iter().map(|c| c.seq).collect::<Vec<_>>(), [10]);
    // A failed precondition writes nothing, and the next call says why.
    store.checkpoint_when(11, b"eleven".to_vec(), Box::new(|| Err("the tier failed".into()))).unwrap();
    let err = store.sync_checkpoint().unwrap_err();
    assert!(matches!(&err, StoreError::CheckpointNotReady { seq: 11, reason } if reason == "the tier failed"), "{err}");
    assert_eq!(store.checkpoints().unwrap().iter().map(|c| c.seq).collect::<Vec<_>>(), [10]);
    drop(store);
    let (_, seen, _) = recover(dir.path(), 1 << 20).unwrap();
    assert_eq!(seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [11], "the log after checkpoint 10 is kept");
}

#[test]
fn a_checkpoint_with_no_later_batches_recovers_to_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 10, 1 << 20);
    {
        let (mut store, _, _) = recover(dir.path(), 1 << 20).unwrap();
        store.checkpoint(10, b"ten".to_vec()).unwrap();
    }
    let (mut store, seen, report) = recover(dir.path(), 1 << 20).unwrap();
    assert!(seen.is_empty());
    assert_eq!(report.last_seq, 10);
    store.append(11, b"eleven").unwrap();
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir).pop().unwrap()
}

#[test]
fn a_cut_tail_is_truncated_reported_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 50, 1 << 20);
    let seg = last_segment(dir.path());
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 5).unwrap();
    let (mut store, seen, report) = recover(dir.path(), 1 << 20).unwrap();
    assert_eq!(seen.len(), 49);
    let torn = report.torn_tail.expect("the cut is reported");
    assert_eq!(torn.file, seg);
    assert_eq!(torn.bytes_dropped, (16 + payload(50).len() - 5) as u64);
    store.append(50, b"again").unwrap();
    drop(store);
    let (_, seen, report) = recover(dir.path(), 1 << 20).unwrap();
    assert_eq!(seen.len(), 50);
    assert_eq!(seen[49].1, b"again");
    assert!(report.torn_tail.is_none());
}

#[test]
fn garbled_last_bytes_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 30, 1 << 20);
    let seg = last_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3..].copy_from_slice(b"\xde\xad\xbe");
    fs::write(&seg, &bytes).unwrap();
    let (_, seen, report) = recover(dir.path(), 1 << 20).unwrap();
    assert_eq!(seen.len(), 29);
    assert!(report.torn_tail.unwrap().reason.contains("checksum"));
}

#[test]
fn zeros_after_the_last_record_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 5, 1 << 20);
    let seg = last_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&seg, &bytes).unwrap();
    let (_, seen, report) = recover(dir.path(), 1 << 20).unwrap();
    assert_eq!(seen.len(), 5);
    assert_eq!(report.torn_tail.unwrap().bytes_dropped, 4096);
}

#[test]
fn corruption_in_the_middle_stops_recovery_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 20, 1 << 20);
    let seg = last_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    // Offset of record 10: segment header, then nine records.
    let offset: usize = 16 + (1..10).map(|s| 16 + payload(s).len()).sum::<usize>();
    bytes[offset + 20] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();
    let err = recover(dir.path(), 1 << 20).err().expect("recovery must stop");
    match &err {
        StoreError::Corrupt { file, offset: at, .. } => {
            assert_eq!(file, &seg);
            assert_eq!(*at, offset as u64);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(seg.to_str().unwrap()) && text.contains(&offset.to_string()), "{text}");
    // Nothing was cut: the file is as it was.
    assert_eq!(fs::read(&seg).unwrap(), bytes);
}

#[test]
fn corruption_in_an_earlier_segment_is_never_a_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 100, 2048);
    let first = segments(dir.path())[0].clone();
    let mut bytes = fs::read(&first).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    fs::write(&first, &bytes).unwrap();
    assert!(matches!(recover(dir.path(), 2048), Err(StoreError::Corrupt { .. })));
}

#[test]
fn a_corrupt_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 3, 1 << 20);
    {
        let (mut store, _, _) = recover(dir.path(), 1 << 20).unwrap();
        store.checkpoint(3, b"snapshot bytes".to_vec()).unwrap();
    }
    let ckpt = dir.path().join("checkpoint").join(format!("{:020}.ckpt", 3));
    let mut bytes = fs::read(&ckpt).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    fs::write(&ckpt, &bytes).unwrap();
    let err = recover(dir.path(), 1 << 20).err().unwrap();
    assert!(err.to_string().contains("checkpoint checksum mismatch"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Whatever number of bytes a crash tears off the end, recovery keeps every
    /// whole record before the cut and nothing after it.
    #[test]
    fn any_cut_keeps_exactly_the_whole_records(n in 1u64..40, cut in 1usize..400) {
        let dir = tempfile::tempdir().unwrap();
        write_batches(dir.path(), n, 1 << 20);
        let seg = last_segment(dir.path());
        let len = fs::metadata(&seg).unwrap().len() as usize;
        let cut = cut.min(len - 16);
        OpenOptions::new().write(true).open(&seg).unwrap().set_len((len - cut) as u64).unwrap();
        let kept_len = len - cut;
        let mut whole = 0u64;
        let mut end = 16usize;
        for s in 1..=n {
            end += 16 + payload(s).len();
            if end <= kept_len { whole = s; }
        }
        let (_, seen, _) = recover(dir.path(), 1 << 20).unwrap();
        prop_assert_eq!(seen.len() as u64, whole);
    }
}

#[test]
fn every_flipped_bit_of_a_checkpoint_file_is_caught_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 3, 1 << 20);
    {
        let (mut store, _, _) = recover(dir.path(), 1 << 20).unwrap();
        store.checkpoint(3, b"snapshot after batch 3".to_vec()).unwrap();
    }
    let ckpt = dir.path().join("checkpoint").join(format!("{:020}.ckpt", 3));
    let good = fs::read(&ckpt).unwrap();
    // The header (magic, seq, length, checksum) as surely as the snapshot: a
    // flipped seq would otherwise start replay at the wrong batch.
    for i in 0..good.len() {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[i] ^= 1 << bit;
            fs::write(&ckpt, &bad).unwrap();
            match open(dir.path(), 1 << 20).load_checkpoint() {
                Err(StoreError::Corrupt { file, .. }) => assert_eq!(file, ckpt),
                other => panic!("flip at byte {i} bit {bit} went unseen: {other:?}"),
            }
        }
    }
    fs::write(&ckpt, &good).unwrap();
    assert_eq!(open(dir.path(), 1 << 20).load_checkpoint().unwrap().unwrap().seq, 3);
}
