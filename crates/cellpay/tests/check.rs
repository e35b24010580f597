//! `cellpay check` on real stores: a healthy one passes; a record corrupted in
//! the middle of the log stops recovery with the file and offset named, a
//! non-zero exit code and no panic; a torn tail is cut and reported; a damaged
//! newest checkpoint is passed over for the older one, and said so.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellpay_cell::{Cell, EngineConfig};
use cellpay_core::Command as Command_;
use cellpay_core::*;

fn run_check(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellpay")).args(["check", "--cell-dir"]).arg(dir).output().unwrap()
}

/// A cell with a bank, two accounts and `batches` logged batches after its last checkpoint.
fn make_store(dir: &Path, batches: usize) {
    fill_cell(dir, batches).halt().unwrap(); // leave the batches in the log, as a crash would
}

/// A running cell with a bank, two accounts and `batches` transfers, each in a batch of its own.
fn fill_cell(dir: &Path, batches: usize) -> Cell {
    let map = ShardMap::round_robin(SHARDS_DEFAULT, 1).unwrap();
    let cell = Cell::open_embedded(dir, CellId(0), &map, EngineConfig::default()).unwrap();
    let h = cell.handle();
    let cny = Currency::new("CNY").unwrap();
    let open = |id: &str, overdraft| {
        Command_::real(Op::OpenAccount(OpenAccount {
            id: AccountId::new(id).unwrap(),
            currency: cny,
            overdraft,
            tenant: TenantId::default_tenant(),
        }))
    };
    h.submit(vec![open("bank", true), open("a", false), open("b", false)]).unwrap().wait_blocking().unwrap();
    for i in 0..batches {
        let t = Transfer {
            id: TransferId::new(&format!("t{i}")).unwrap(),
            from: AccountId::new("bank").unwrap(),
            to: AccountId::new("a").unwrap(),
            amount: 10,
            currency: None,
            memo: None,
            by: Authority::Admin,
        };
        h.submit(vec![Command_::real(Op::Transfer(t))]).unwrap().wait_blocking().unwrap();
    }
    drop(h);
    cell
}

fn segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<_> = fs::read_dir(dir.join("log")).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Offsets of the records in a segment file.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = 16;
    let mut out = Vec::new();
    while at + 16 <= bytes.len() {
        out.push(at);
        at += 16 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    out
}

#[test]
fn a_healthy_store_checks_ok() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path(), 5);
    let out = run_check(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("replayed 6 batches") && stdout.contains("balance sum 0") && stdout.ends_with("ok\n"),
        "{stdout}"
    );
}

#[test]
fn a_corrupt_record_in_the_middle_names_file_and_offset_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path(), 10);
    let seg = segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let offsets = record_offsets(&bytes);
    assert!(offsets.len() >= 10);
    let victim = offsets[4];
    bytes[victim + 20] ^= 0x5a;
    fs::write(&seg, &bytes).unwrap();
    let out = run_check(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(seg.to_str().unwrap()), "names the file: {stderr}");
    assert!(stderr.contains(&format!("offset {victim}")), "names the offset: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path(), 4);
    let seg = segment(dir.path());
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 7).unwrap();
    let out = run_check(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("torn tail cut"), "{stdout}");
    assert!(stdout.contains("replayed 4 batches"), "the last of 5 batches was torn: {stdout}");
}

#[test]
fn a_directory_that_is_no_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_check(dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a cell store"));
}

#[test]
fn a_damaged_newest_checkpoint_is_passed_over_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    fill_cell(dir.path(), 5).stop().unwrap(); // checkpoints after batch 0 and batch 6
    let newest = dir.path().join("checkpoint").join(format!("{:020}.ckpt", 6));
    let mut bytes = fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 16].iter_mut().for_each(|b| *b ^= 0xff);
    fs::write(&newest, &bytes).unwrap();
    let out = run_check(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("checkpoint after batch 0, replayed 6 batches"), "{stdout}");
    assert!(stdout.contains("fell back from the checkpoint after batch 6"), "{stdout}");
    assert!(stdout.contains(newest.to_str().unwrap()), "names the damaged file: {stdout}");
    assert!(stdout.contains("balance sum 0") && stdout.ends_with("ok\n"), "{stdout}");
}
