//! Helpers shared by the tier's integration tests: deterministic entries and run-file surgery.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use cellpay_tier::{Entry, Tier, TierOptions};

/// The key of record `n`: a shard prefix and a transfer id, as the cell encodes them.
pub fn key(n: u64) -> Vec<u8> {
    let mut key = b"shard-0007/".to_vec();
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// The value version `seq` of record `n` carries.
pub fn value(n: u64, seq: u64) -> Vec<u8> {
    format!("transfer {n} version {seq}").into_bytes()
}

pub fn entry(n: u64, seq: u64, at_ms: u64) -> Entry {
    Entry { key: key(n), seq, at_ms, value: value(n, seq) }
}

/// Options that never drop runs for size.
pub fn roomy() -> TierOptions {
    TierOptions { bytes_max: u64::MAX, ..TierOptions::default() }
}

pub fn open(dir: &Path) -> Tier {
    Tier::open(dir, roomy()).expect("open tier")
}

/// The run files in `dir`, sorted by name (so by generation).
pub fn run_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "run"))
        .collect();
    files.sort();
    files
}

/// Names in `dir` other than run files, the lock and the durable mark.
pub fn stray_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".run") && n != "LOCK" && n != "DURABLE")
        .collect()
}

/// Where a run file's sections start, read from its footer (see the crate's format doc).
pub struct Layout {
    pub data: u64,
    pub index: u64,
    pub filter: u64,
    pub footer: u64,
}

pub fn layout(path: &Path) -> Layout {
    let buf = fs::read(path).expect("read run");
    let footer = buf.len() - 120;
    let word = |i: usize| u64::from_le_bytes(buf[footer + i * 8..footer + i * 8 + 8].try_into().expect("8 bytes"));
    Layout { data: 32, index: word(0), filter: word(2), footer: footer as u64 }
}

/// Flips one bit of the file at `offset`.
pub fn flip(path: &Path, offset: u64) {
    let mut buf = fs::read(path).expect("read run");
    buf[offset as usize] ^= 0x10;
    fs::write(path, buf).expect("write run");
}
