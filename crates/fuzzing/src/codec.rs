//! The core's binary codecs: a logged batch, a snapshot, and an idempotency
//! record's value. No checksum guards them here (the store's frames do), so
//! the fuzzer reaches every field directly. What decodes must encode back to
//! bytes that decode to the same thing.

use cellpay_core::codec::{decode_batch, encode_batch, Writer};
use cellpay_core::{snapshot, AccountId, OldRecord, TransferId};

/// A batch decoded, and if it decodes, re-encoded and decoded again unchanged.
pub(crate) fn batch_checked(data: &[u8]) {
    let Ok(batch) = decode_batch(data) else { return };
    let mut w = Writer::default();
    encode_batch(&mut w, batch.clock_ms, batch.commands.iter());
    let again = decode_batch(&w.buf).expect("an encoded batch decodes");
    assert_eq!(again, batch, "a batch survives a round trip");
}

/// Target `batch`: [`decode_batch`] of the input.
pub fn batch(data: &[u8]) {
    batch_checked(data);
}

/// Target `snapshot`: [`snapshot::decode`] of the input; a decoded state
/// encodes to bytes that decode and encode to the same bytes.
pub fn snapshot(data: &[u8]) {
    let Ok(state) = snapshot::decode(data) else { return };
    let bytes = snapshot::encode(&state);
    let again = snapshot::decode(&bytes).expect("an encoded snapshot decodes");
    assert_eq!(snapshot::encode(&again), bytes, "a snapshot survives a round trip");
}

/// Target `idempotency_record`: [`OldRecord::decode_value`] of the input,
/// with a round trip of what decodes.
pub fn idempotency_record(data: &[u8]) {
    let from = AccountId::new("payer").expect("a valid id");
    let id = TransferId::new("t-1").expect("a valid id");
    let Ok(record) = OldRecord::decode_value(&from, &id, data) else { return };
    let again = OldRecord::decode_value(&from, &id, &record.encode_value()).expect("an encoded record decodes");
    assert_eq!(again, record, "a record survives a round trip");
}
