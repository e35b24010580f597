//! The log: a segment file made of the input, replayed by [`EmbeddedStore`],
//! and each record's payload decoded as a batch, as recovery does.
//!
//! Input: one flags byte, then the segment file (`"CPSEG001" | first seq u64 |
//! records`). With flag bit 0 set the harness first re-seals every record it
//! can walk (recomputes its checksum), so mutations get past the checksum into
//! the framing and batch code behind it; without it they test the checksum.

use cellpay_store::{EmbeddedStore, ReplayReport, Store, StoreError, StoreOptions, RECORD_HEADER_BYTES};

/// The segment's name: the harness's segment holds batches from 1.
pub const SEGMENT_NAME: &str = "00000000000000000001.seg";
const SEGMENT_HEADER_BYTES: usize = 16;
pub const FLAG_RESEAL: u8 = 1;

/// Recomputes the checksum of every record from the segment header on, as
/// long as each declared length fits what is left.
pub fn reseal(segment: &mut [u8]) {
    let mut at = SEGMENT_HEADER_BYTES;
    while at + RECORD_HEADER_BYTES <= segment.len() {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().expect("4 bytes")) as usize;
        let seq = u64::from_le_bytes(segment[at + 8..at + 16].try_into().expect("8 bytes"));
        let end = at + RECORD_HEADER_BYTES + len;
        let Some(payload) = segment.get(at + RECORD_HEADER_BYTES..end) else { break };
        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&(len as u32).to_le_bytes()), &seq.to_le_bytes()),
            payload,
        );
        segment[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// Replays the input as the only segment of a fresh store directory.
pub fn log_segment(data: &[u8]) {
    let Some((&flags, segment)) = data.split_first() else { return };
    let mut segment = segment.to_vec();
    if flags & FLAG_RESEAL != 0 {
        reseal(&mut segment);
    }
    let dir = crate::scratch_dir();
    let path = dir.path().join("log").join(SEGMENT_NAME);
    std::fs::create_dir_all(path.parent().expect("a segment path has a parent")).expect("scratch dir");
    std::fs::write(&path, &segment).expect("write the segment");
    let mut store = EmbeddedStore::open(dir.path(), StoreOptions::default()).expect("open a fresh store");
    let mut decoded = 0u64;
    let mut visit = |_seq: u64, payload: &[u8]| {
        crate::codec::batch_checked(payload);
        decoded += 1;
        Ok(())
    };
    match store.replay(0, &mut visit) {
        Ok(ReplayReport { batches, .. }) => assert_eq!(batches, decoded, "every batch replayed was visited"),
        Err(StoreError::Corrupt { file, .. } | StoreError::Gap { file, .. }) => {
            assert_eq!(file, path, "a refusal names the damaged segment")
        }
        Err(other) => panic!("replay of a segment failed other than as corrupt: {other}"),
    }
}
