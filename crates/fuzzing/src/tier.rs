//! The idempotency tier's run file: the input is written as the one run of
//! a fresh tier directory, the tier is opened (footer, header, sparse index
//! and filter are decoded and checked), and every key the file seems to hold
//! is looked up (each lookup decodes one block and the value found).
//!
//! Input: one flags byte, then the run file. With flag bit 0 set, the harness
//! first re-seals the file: it recomputes every checksum it can locate (the
//! blocks the index names, the header, index and filter, then the footer), so
//! mutations reach the decoders behind the checksums.

use std::path::Path;

use cellpay_core::{AccountId, OldRecord, TransferId};
use cellpay_tier::{Tier, TierError, TierOptions};

/// The run's name: generations 1..=2, as the seeds are written.
pub const RUN_NAME: &str = "00000000000000000001-00000000000000000002.run";
pub const FLAG_RESEAL: u8 = 1;

const HEADER_BYTES: usize = 32;
const FOOTER_BYTES: usize = 120;
const ENTRY_HEADER_BYTES: usize = 24;
/// Lookups per input at most.
const KEYS_MAX: usize = 256;

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// A byte range of `file` that a footer word pair names, if it lies in the file.
fn region(file: &[u8], offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
    region_in(file.len(), offset, len)
}

fn region_in(file_len: usize, offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= file_len).then_some(start..end)
}

/// The sparse index, read leniently: each block's first key and offset.
fn index_entries(index: &[u8]) -> Vec<(&[u8], u64)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(len) = u32_at(index, at) {
        let key_at = at + 4;
        let Some(key) = key_at.checked_add(len as usize).and_then(|end| index.get(key_at..end)) else { break };
        let Some(offset) = u64_at(index, key_at + key.len()) else { break };
        out.push((key, offset));
        at = key_at + key.len() + 8;
    }
    out
}

/// The blocks an index names, as byte ranges of the file: each from its
/// offset to the next block's, the last one to the index.
fn blocks(index: &[(&[u8], u64)], index_offset: u64, file_len: usize) -> Vec<std::ops::Range<usize>> {
    let ends = index.iter().skip(1).map(|(_, o)| *o).chain(std::iter::once(index_offset));
    index
        .iter()
        .zip(ends)
        .filter_map(|((_, start), end)| region_in(file_len, *start, end.checked_sub(*start)?))
        .filter(|r| r.len() >= 8)
        .collect()
}

/// Recomputes every checksum of a run file that can be located.
pub fn reseal(file: &mut [u8]) {
    if file.len() < HEADER_BYTES + FOOTER_BYTES {
        return;
    }
    let footer_at = file.len() - FOOTER_BYTES;
    let word = |file: &[u8], i: usize| u64_at(file, footer_at + i * 8).expect("the footer is in the file");
    let (index_offset, index_len) = (word(file, 0), word(file, 1));
    let (filter_offset, filter_len) = (word(file, 2), word(file, 3));
    if let Some(index) = region(file, index_offset, index_len) {
        let blocks = blocks(&index_entries(&file[index]), index_offset, file.len());
        for block in blocks {
            let body_end = block.end - 4;
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&(block.start as u64).to_le_bytes()),
                &file[block.start..body_end],
            );
            file[body_end..block.end].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let header_crc = crc32c::crc32c(&file[..HEADER_BYTES]);
    file[footer_at + 96..footer_at + 100].copy_from_slice(&header_crc.to_le_bytes());
    if let Some(index) = region(file, index_offset, index_len) {
        let crc = crc32c::crc32c(&file[index]);
        file[footer_at + 100..footer_at + 104].copy_from_slice(&crc.to_le_bytes());
    }
    if let Some(filter) = region(file, filter_offset, filter_len) {
        let crc = crc32c::crc32c(&file[filter]);
        file[footer_at + 104..footer_at + 108].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c(&file[footer_at..footer_at + FOOTER_BYTES - 4]);
    file[footer_at + FOOTER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// The keys a run file seems to hold: each block's first key and the keys of
/// the entries a lenient walk of each block finds, plus two it cannot hold.
fn keys(file: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new(), vec![0xff; 8]];
    let Some(footer_at) = file.len().checked_sub(FOOTER_BYTES) else { return out };
    let (Some(index_offset), Some(index_len)) = (u64_at(file, footer_at), u64_at(file, footer_at + 8)) else {
        return out;
    };
    let Some(index) = region(file, index_offset, index_len) else { return out };
    let entries = index_entries(&file[index]);
    for block in blocks(&entries, index_offset, file.len()) {
        let body = &file[block.start..block.end - 4];
        let mut at = 4;
        while let (Some(key_len), Some(value_len)) = (u32_at(body, at), u32_at(body, at + 4)) {
            let key_at = at + ENTRY_HEADER_BYTES;
            let Some(key) = key_at.checked_add(key_len as usize).and_then(|end| body.get(key_at..end)) else { break };
            out.push(key.to_vec());
            at = key_at + key.len() + value_len as usize;
        }
    }
    out.extend(entries.iter().map(|(k, _)| k.to_vec()));
    out.truncate(KEYS_MAX);
    out
}

fn names_the_run(e: &TierError, run: &Path) -> bool {
    match e {
        TierError::Corrupt { file, .. } => file == run,
        TierError::Io { path, .. } => path == run,
        _ => false,
    }
}

/// Opens a tier whose one run is the input, and looks up what it seems to hold.
pub fn tier_run(data: &[u8]) {
    let Some((&flags, file)) = data.split_first() else { return };
    let mut file = file.to_vec();
    if flags & FLAG_RESEAL != 0 {
        reseal(&mut file);
    }
    let dir = crate::scratch_dir();
    let run = dir.path().join(RUN_NAME);
    std::fs::write(&run, &file).expect("write the run");
    let tier = match Tier::open(dir.path(), TierOptions::default()) {
        Ok(tier) => tier,
        Err(e) => {
            assert!(names_the_run(&e, &run), "a refused run is named: {e}");
            return;
        }
    };
    let view = tier.view();
    let from = AccountId::new("payer").expect("a valid id");
    let id = TransferId::new("t-1").expect("a valid id");
    for key in keys(&file) {
        match view.get(&key) {
            Ok(Some(entry)) => {
                assert_eq!(entry.key, key, "a lookup answers the key it was asked");
                let _ = OldRecord::decode_value(&from, &id, &entry.value);
            }
            Ok(None) => {}
            Err(e) => assert!(names_the_run(&e, &run), "a damaged block is named: {e}"),
        }
    }
}
