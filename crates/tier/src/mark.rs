//! The `DURABLE` file: the highest generation the tier has made durable.
//!
//! Runs carry their generations in their names, so the mark is only needed
//! once the run holding the highest generation is deleted (expired, or dropped
//! under the disk bound): it is written, durably, before that deletion, so
//! `durable_through` never goes back. `magic | generation u64 | crc32c u32`.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::run::sync_dir;
use crate::TierError;

const MARK_MAGIC: &[u8; 8] = b"CPTIERHW";
const MARK_BYTES: usize = 20;
/// The mark's file name in the tier's directory.
pub(crate) const MARK_NAME: &str = "DURABLE";
/// Its temporary name while it is written.
pub(crate) const MARK_TMP_NAME: &str = "DURABLE.tmp";

/// The generation the mark holds, or 0 when there is none.
pub(crate) fn read_mark(dir: &Path) -> Result<u64, TierError> {
    let path = dir.join(MARK_NAME);
    let buf = match fs::read(&path) {
        Ok(buf) => buf,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(TierError::Io { path, source }),
    };
    let valid =
        buf.len() == MARK_BYTES && &buf[..8] == MARK_MAGIC && crc32c::crc32c(&buf[..16]).to_le_bytes() == buf[16..20];
    if !valid {
        return Err(TierError::Corrupt { file: path, offset: 0, reason: "bad durable mark".into() });
    }
    Ok(u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")))
}

/// Makes `generation` the mark, durably (temporary file, fsync, rename, fsync the directory).
pub(crate) fn write_mark(dir: &Path, generation: u64) -> Result<(), TierError> {
    let tmp = dir.join(MARK_TMP_NAME);
    let path = dir.join(MARK_NAME);
    let mut buf = Vec::with_capacity(MARK_BYTES);
    buf.extend_from_slice(MARK_MAGIC);
    buf.extend_from_slice(&generation.to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&buf).to_le_bytes());
    let mut file = File::create(&tmp).map_err(TierError::io(&tmp))?;
    file.write_all(&buf).map_err(TierError::io(&tmp))?;
    file.sync_all().map_err(TierError::io(&tmp))?;
    fs::rename(&tmp, &path).map_err(TierError::io(&path))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_mark(dir.path()).expect("read"), 0);
        write_mark(dir.path(), 42).expect("write");
        assert_eq!(read_mark(dir.path()).expect("read"), 42);
        let path = dir.path().join(MARK_NAME);
        let mut buf = fs::read(&path).expect("read");
        buf[9] ^= 1;
        fs::write(&path, buf).expect("write");
        assert!(matches!(read_mark(dir.path()), Err(TierError::Corrupt { file, .. }) if file == path));
    }
}
