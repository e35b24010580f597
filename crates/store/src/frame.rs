//! Record framing: `len u32 | crc32c u32 | seq u64 | payload`, little-endian.
//!
//! The checksum covers the length, the sequence number and the payload, so a
//! garbled header is caught as surely as a garbled payload.

/// Bytes before each payload.
pub const RECORD_HEADER_BYTES: usize = 16;

/// The largest payload one record may carry (I7).
pub const RECORD_BYTES_MAX: usize = 256 << 20;

pub(crate) fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let len = payload.len() as u32;
    let crc = crc32c::crc32c(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &seq.to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Appends one framed record to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    assert!(payload.len() <= RECORD_BYTES_MAX, "checked by the caller");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A record found in a buffer.
pub(crate) struct Record<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
    /// Offset just past the record.
    pub end: usize,
}

/// Why the bytes at an offset are not a valid record.
pub(crate) enum Bad {
    /// Fewer bytes than the header or the declared payload need.
    Short,
    Checksum,
    Length(usize),
}

impl Bad {
    pub fn describe(&self) -> String {
        match self {
            Bad::Short => "record is cut short".into(),
            Bad::Checksum => "checksum mismatch".into(),
            Bad::Length(n) => format!("declared length {n} exceeds the record limit"),
        }
    }
}

/// Parses the record starting at `at`.
pub(crate) fn decode(buf: &[u8], at: usize) -> Result<Record<'_>, Bad> {
    let header = buf.get(at..at + RECORD_HEADER_BYTES).ok_or(Bad::Short)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len > RECORD_BYTES_MAX {
        return Err(Bad::Length(len));
    }
    let start = at + RECORD_HEADER_BYTES;
    let payload = buf.get(start..start + len).ok_or(Bad::Short)?;
    if checksum(seq, payload) != crc {
        return Err(Bad::Checksum);
    }
    Ok(Record { seq, payload, end: start + len })
}

/// True when a valid record with a sequence number in `seq_min..seq_max` starts
/// anywhere in `buf[from..]`. Used to tell a torn tail (nothing valid follows)
/// from corruption in the middle (acknowledged records follow).
pub(crate) fn valid_record_after(buf: &[u8], from: usize, seq_min: u64, seq_max: u64) -> Option<usize> {
    let last = buf.len().checked_sub(RECORD_HEADER_BYTES)?;
    (from..=last).find(|&at| {
        let seq = u64::from_le_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes"));
        (seq_min..seq_max).contains(&seq) && decode(buf, at).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_every_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, b"hello ledger");
        let r = decode(&buf, 0).ok().expect("valid");
        assert_eq!((r.seq, r.payload, r.end), (7, &b"hello ledger"[..], buf.len()));
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[i] ^= 1 << bit;
                assert!(decode(&bad, 0).is_err(), "flip at byte {i} bit {bit} went unseen");
            }
        }
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut], 0).is_err());
        }
    }
}
