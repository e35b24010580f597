//! One run file: an immutable set of entries sorted by key, covering the
//! spill generations `lo..=hi`. [`RunWriter`] streams one out (temporary
//! name, fsync, rename, fsync the directory); [`Run`] opens and verifies one
//! and answers lookups with one `pread` of one block.
//!
//! The layout is described in the crate documentation. Here, each block is
//! `count u32 | entries | crc32c u32`, the checksum seeded with the block's
//! offset so a block read from the wrong place is caught as surely as a
//! flipped bit; an entry is `key len u32 | value len u32 | seq u64 | at_ms u64 | key | value`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::bloom::{key_hash, Bloom};
use crate::{Entry, TierError};

const RUN_MAGIC: &[u8; 8] = b"CPTIER01";
const FOOTER_MAGIC: &[u8; 8] = b"CPTIEREN";
/// Bumped whenever the layout or the filter's hash changes.
const FORMAT_VERSION: u32 = 1;
pub(crate) const HEADER_BYTES: u64 = 32;
pub(crate) const FOOTER_BYTES: u64 = 120;
const ENTRY_HEADER_BYTES: usize = 24;
/// Bytes of a block's count and checksum.
const BLOCK_FRAME_BYTES: usize = 8;

/// A block closes after this many entries: the sparse index holds every 64th key.
const BLOCK_ENTRIES_MAX: u32 = 64;
/// A block also closes once it holds this many bytes, so one read stays small.
const BLOCK_BYTES_TARGET: usize = 4096;

/// The longest key the tier takes.
pub const KEY_BYTES_MAX: usize = 1024;
/// The longest value the tier takes.
pub const VALUE_BYTES_MAX: usize = 64 << 10;

/// No valid block is longer: the target plus one largest entry.
const BLOCK_BYTES_LIMIT: u64 =
    (BLOCK_FRAME_BYTES + BLOCK_BYTES_TARGET + ENTRY_HEADER_BYTES + KEY_BYTES_MAX + VALUE_BYTES_MAX) as u64;

/// The file name of the run covering generations `lo..=hi`.
pub(crate) fn run_name(lo: u64, hi: u64) -> String {
    format!("{lo:020}-{hi:020}.run")
}

/// The generations a run file name covers, if it is one.
pub(crate) fn parse_run_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".run")?;
    let (lo, hi) = stem.split_once('-')?;
    if lo.len() != 20 || hi.len() != 20 {
        return None;
    }
    Some((lo.parse().ok()?, hi.parse().ok()?))
}

/// The file name of an imported run: part `part` of import `tag` in group
/// `group` (a cell uses the shard and the move).
pub(crate) fn import_name(group: u32, tag: u64, part: u32) -> String {
    format!("imp-{group:010}-{tag:020}-{part:010}.run")
}

/// The group, tag and part an imported run's file name holds, if it is one.
pub(crate) fn parse_import_name(name: &str) -> Option<(u32, u64, u32)> {
    let stem = name.strip_prefix("imp-")?.strip_suffix(".run")?;
    let mut parts = stem.split('-');
    let (g, t, p) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || g.len() != 10 || t.len() != 20 || p.len() != 10 {
        return None;
    }
    Some((g.parse().ok()?, t.parse().ok()?, p.parse().ok()?))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), TierError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(TierError::io(dir))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// What a run holds, from its footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunMeta {
    pub lo: u64,
    pub hi: u64,
    pub entries: u64,
    /// Size of the file.
    pub bytes: u64,
    pub seq_min: u64,
    pub seq_max: u64,
    pub at_ms_min: u64,
    pub at_ms_max: u64,
}

/// The fixed-size trailer that locates everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footer {
    index_offset: u64,
    index_len: u64,
    filter_offset: u64,
    filter_len: u64,
    entries: u64,
    blocks: u64,
    lo: u64,
    hi: u64,
    seq_min: u64,
    seq_max: u64,
    at_ms_min: u64,
    at_ms_max: u64,
    header_crc: u32,
    index_crc: u32,
    filter_crc: u32,
}

impl Footer {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FOOTER_BYTES as usize);
        for word in [
            self.index_offset,
            self.index_len,
            self.filter_offset,
            self.filter_len,
            self.entries,
            self.blocks,
            self.lo,
            self.hi,
            self.seq_min,
            self.seq_max,
            self.at_ms_min,
            self.at_ms_max,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for crc in [self.header_crc, self.index_crc, self.filter_crc] {
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out.extend_from_slice(FOOTER_MAGIC);
        out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
        assert_eq!(out.len() as u64, FOOTER_BYTES, "the footer layout is fixed");
        out
    }

    fn decode(buf: &[u8]) -> Result<Footer, String> {
        assert_eq!(buf.len() as u64, FOOTER_BYTES, "the caller reads exactly one footer");
        let body = FOOTER_BYTES as usize - 4;
        if crc32c::crc32c(&buf[..body]) != u32_at(buf, body) {
            return Err("footer checksum mismatch".into());
        }
        if &buf[body - 8..body] != FOOTER_MAGIC {
            return Err("bad footer magic".into());
        }
        let word = |i: usize| u64_at(buf, i * 8);
        Ok(Footer {
            index_offset: word(0),
            index_len: word(1),
            filter_offset: word(2),
            filter_len: word(3),
            entries: word(4),
            blocks: word(5),
            lo: word(6),
            hi: word(7),
            seq_min: word(8),
            seq_max: word(9),
            at_ms_min: word(10),
            at_ms_max: word(11),
            header_crc: u32_at(buf, 96),
            index_crc: u32_at(buf, 100),
            filter_crc: u32_at(buf, 104),
        })
    }
}

fn encode_header(lo: u64, hi: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES as usize);
    out.extend_from_slice(RUN_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&lo.to_le_bytes());
    out.extend_from_slice(&hi.to_le_bytes());
    out
}

fn block_crc(offset: u64, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&offset.to_le_bytes()), body)
}

/// The first key of every block and where each block starts, in memory.
#[derive(Debug, Default)]
struct SparseIndex {
    /// The first keys, end to end.
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    /// Block `i` spans `offsets[i]..offsets[i + 1]`; the last offset is where the index starts.
    offsets: Vec<u64>,
}

impl SparseIndex {
    fn blocks(&self) -> usize {
        self.key_ends.len()
    }

    fn first_key(&self, block: usize) -> &[u8] {
        let start = if block == 0 { 0 } else { self.key_ends[block - 1] };
        &self.keys[start..self.key_ends[block]]
    }

    fn push(&mut self, first_key: &[u8], offset: u64) {
        self.keys.extend_from_slice(first_key);
        self.key_ends.push(self.keys.len());
        self.offsets.push(offset);
    }

    /// The block that holds `key` if any block does.
    fn block_of(&self, key: &[u8]) -> Option<usize> {
        let after = partition_point(self.blocks(), |i| self.first_key(i) <= key);
        after.checked_sub(1)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for block in 0..self.blocks() {
            let key = self.first_key(block);
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&self.offsets[block].to_le_bytes());
        }
    }

    /// Parses and checks the index of a run whose footer is `footer`.
    fn decode(buf: &[u8], footer: &Footer) -> Result<SparseIndex, String> {
        let mut index = SparseIndex::default();
        let mut at = 0;
        for block in 0..footer.blocks {
            let key_len = buf.get(at..at + 4).map(|b| u32_at(b, 0) as usize).ok_or("index is cut short")?;
            let key = buf.get(at + 4..at + 4 + key_len).ok_or("index is cut short")?;
            let offset =
                buf.get(at + 4 + key_len..at + 12 + key_len).map(|b| u64_at(b, 0)).ok_or("index is cut short")?;
            at += 12 + key_len;
            if key_len > KEY_BYTES_MAX {
                return Err(format!("block {block} has a first key of {key_len} bytes"));
            }
            if block > 0 && index.first_key(block as usize - 1) >= key {
                return Err(format!("block {block}'s first key is not above the previous block's"));
            }
            if block == 0 && offset != HEADER_BYTES {
                return Err(format!("the first block starts at {offset}, not after the header"));
            }
            index.push(key, offset);
            // A block's length is known once the next one starts: check the previous one's.
            index.check_last_len()?;
        }
        if at != buf.len() {
            return Err(format!("index holds {} bytes past its {} blocks", buf.len() - at, footer.blocks));
        }
        index.offsets.push(footer.index_offset);
        index.check_last_len()?;
        Ok(index)
    }

    /// Checks that the block ending at the last pushed offset has a possible length.
    fn check_last_len(&self) -> Result<(), String> {
        let n = self.offsets.len();
        if n < 2 {
            return Ok(());
        }
        let len = self.offsets[n - 1].saturating_sub(self.offsets[n - 2]);
        if !(BLOCK_FRAME_BYTES as u64 + ENTRY_HEADER_BYTES as u64..=BLOCK_BYTES_LIMIT).contains(&len) {
            return Err(format!("block {} is {len} bytes long", n - 2));
        }
        Ok(())
    }

    /// Bytes of memory the index takes.
    fn bytes(&self) -> usize {
        self.keys.len() + self.key_ends.len() * 8 + self.offsets.len() * 8
    }
}

/// The first index in `0..n` where `below` turns false (`below` is true then false).
fn partition_point(n: usize, below: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// One entry inside a block buffer.
pub(crate) struct EntryRef<'a> {
    pub key: &'a [u8],
    pub seq: u64,
    pub at_ms: u64,
    pub value: &'a [u8],
}

impl EntryRef<'_> {
    fn to_entry(&self) -> Entry {
        Entry { key: self.key.to_vec(), seq: self.seq, at_ms: self.at_ms, value: self.value.to_vec() }
    }
}

/// Walks the entries of one checksummed block.
struct BlockEntries<'a> {
    body: &'a [u8],
    at: usize,
    left: u32,
}

impl<'a> BlockEntries<'a> {
    /// Checks the block read from `offset` and returns its entries.
    fn new(offset: u64, block: &'a [u8]) -> Result<BlockEntries<'a>, String> {
        if block.len() < BLOCK_FRAME_BYTES {
            return Err("block is cut short".into());
        }
        let (body, crc) = block.split_at(block.len() - 4);
        if block_crc(offset, body) != u32_at(crc, 0) {
            return Err("block checksum mismatch".into());
        }
        let left = u32_at(body, 0);
        if left == 0 || left > BLOCK_ENTRIES_MAX {
            return Err(format!("block declares {left} entries"));
        }
        Ok(BlockEntries { body, at: 4, left })
    }

    fn next(&mut self) -> Result<Option<EntryRef<'a>>, String> {
        if self.left == 0 {
            return if self.at == self.body.len() { Ok(None) } else { Err("bytes after the last entry".into()) };
        }
        let header = self.body.get(self.at..self.at + ENTRY_HEADER_BYTES).ok_or("entry is cut short")?;
        let key_len = u32_at(header, 0) as usize;
        let value_len = u32_at(header, 4) as usize;
        if key_len > KEY_BYTES_MAX || value_len > VALUE_BYTES_MAX {
            return Err(format!("entry declares a key of {key_len} bytes and a value of {value_len}"));
        }
        let key_at = self.at + ENTRY_HEADER_BYTES;
        let value_at = key_at + key_len;
        let end = value_at + value_len;
        let key = self.body.get(key_at..value_at).ok_or("entry is cut short")?;
        let value = self.body.get(value_at..end).ok_or("entry is cut short")?;
        self.at = end;
        self.left -= 1;
        Ok(Some(EntryRef { key, seq: u64_at(header, 8), at_ms: u64_at(header, 16), value }))
    }
}

/// Counts of lookups that got past a filter, shared by all views of a tier.
#[derive(Debug, Default)]
pub(crate) struct ReadCounters {
    pub filter_passes: AtomicU64,
    pub block_reads: AtomicU64,
}

/// An open, verified run. Holds its file open, so a view keeps reading it
/// after compaction or expiry unlinked it.
#[derive(Debug)]
pub(crate) struct Run {
    pub path: PathBuf,
    file: File,
    pub meta: RunMeta,
    index: SparseIndex,
    bloom: Bloom,
}

impl Run {
    /// Opens the run at `path`, whose name says it covers `lo..=hi`, and
    /// verifies its header, footer, index and filter (not its data blocks).
    pub fn open(path: &Path, lo: u64, hi: u64) -> Result<Run, TierError> {
        let file = File::open(path).map_err(TierError::io(path))?;
        let bytes = file.metadata().map_err(TierError::io(path))?.len();
        let corrupt = |offset: u64, reason: String| TierError::Corrupt { file: path.to_path_buf(), offset, reason };
        if bytes < HEADER_BYTES + FOOTER_BYTES {
            return Err(corrupt(0, format!("a run of {bytes} bytes cannot hold a header and a footer")));
        }
        let footer_at = bytes - FOOTER_BYTES;
        let read = |offset: u64, len: u64| -> Result<Vec<u8>, TierError> {
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, offset).map_err(TierError::io(path))?;
            Ok(buf)
        };
        let footer = Footer::decode(&read(footer_at, FOOTER_BYTES)?).map_err(|r| corrupt(footer_at, r))?;
        let header = read(0, HEADER_BYTES)?;
        if crc32c::crc32c(&header) != footer.header_crc {
            return Err(corrupt(0, "header checksum mismatch".into()));
        }
        if &header[..8] != RUN_MAGIC || u32_at(&header, 8) != FORMAT_VERSION {
            return Err(corrupt(0, format!("not a run of format {FORMAT_VERSION}")));
        }
        if (u64_at(&header, 16), u64_at(&header, 24)) != (lo, hi) || (footer.lo, footer.hi) != (lo, hi) {
            return Err(corrupt(
                16,
                format!("the header or footer does not cover generations {lo}..={hi} as its name says"),
            ));
        }
        let laid_out = footer.index_offset >= HEADER_BYTES
            && footer.index_offset.checked_add(footer.index_len) == Some(footer.filter_offset)
            && footer.filter_offset.checked_add(footer.filter_len) == Some(footer_at)
            && footer.entries >= footer.blocks
            && footer.entries <= footer.blocks * u64::from(BLOCK_ENTRIES_MAX)
            && (footer.blocks == 0) == (footer.index_offset == HEADER_BYTES);
        if !laid_out {
            return Err(corrupt(footer_at, "the footer's offsets and counts do not fit the file".into()));
        }
        let index_buf = read(footer.index_offset, footer.index_len)?;
        if crc32c::crc32c(&index_buf) != footer.index_crc {
            return Err(corrupt(footer.index_offset, "index checksum mismatch".into()));
        }
        let index = SparseIndex::decode(&index_buf, &footer).map_err(|r| corrupt(footer.index_offset, r))?;
        let filter_buf = read(footer.filter_offset, footer.filter_len)?;
        if crc32c::crc32c(&filter_buf) != footer.filter_crc {
            return Err(corrupt(footer.filter_offset, "filter checksum mismatch".into()));
        }
        let bloom = Bloom::decode(&filter_buf).map_err(|r| corrupt(footer.filter_offset, r))?;
        let meta = RunMeta {
            lo,
            hi,
            entries: footer.entries,
            bytes,
            seq_min: footer.seq_min,
            seq_max: footer.seq_max,
            at_ms_min: footer.at_ms_min,
            at_ms_max: footer.at_ms_max,
        };
        Ok(Run { path: path.to_path_buf(), file, meta, index, bloom })
    }

    /// Bytes of memory the filter takes.
    pub fn filter_bytes(&self) -> usize {
        self.bloom.bytes()
    }

    /// Bytes of memory the sparse index takes.
    pub fn index_bytes(&self) -> usize {
        self.index.bytes()
    }

    /// Reads block `block` and checks its checksum.
    fn read_block(&self, block: usize) -> Result<(u64, Vec<u8>), TierError> {
        let offset = self.index.offsets[block];
        let len = self.index.offsets[block + 1] - offset;
        let mut buf = vec![0; len as usize];
        self.file.read_exact_at(&mut buf, offset).map_err(TierError::io(&self.path))?;
        Ok((offset, buf))
    }

    fn corrupt(&self, offset: u64, reason: String) -> TierError {
        TierError::Corrupt { file: self.path.clone(), offset, reason }
    }

    /// The entry with `key` (whose filter hash is `hash`), if this run holds it.
    pub fn get(&self, key: &[u8], hash: u64, counters: &ReadCounters) -> Result<Option<Entry>, TierError> {
        if !self.bloom.may_contain(hash) {
            return Ok(None);
        }
        counters.filter_passes.fetch_add(1, Relaxed);
        let Some(block) = self.index.block_of(key) else {
            return Ok(None);
        };
        counters.block_reads.fetch_add(1, Relaxed);
        let (offset, buf) = self.read_block(block)?;
        let mut entries = BlockEntries::new(offset, &buf).map_err(|r| self.corrupt(offset, r))?;
        while let Some(entry) = entries.next().map_err(|r| self.corrupt(offset, r))? {
            match entry.key.cmp(key) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Ok(Some(entry.to_entry())),
                std::cmp::Ordering::Greater => break,
            }
        }
        Ok(None)
    }

    /// The entries with `from <= key < to` (and `key > after`, when given),
    /// at most `limit` of them, in key order; and whether more are left.
    pub fn range(
        &self,
        from: &[u8],
        to: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), TierError> {
        let start = after.map_or(from, |a| a.max(from));
        let mut block = self.index.block_of(start).unwrap_or(0);
        let mut out = Vec::new();
        while block < self.index.blocks() && self.index.first_key(block) < to {
            for e in self.block_entries(block)? {
                if e.key.as_slice() >= to {
                    return Ok((out, false));
                }
                if e.key.as_slice() < from || after.is_some_and(|a| e.key.as_slice() <= a) {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(e);
            }
            block += 1;
        }
        Ok((out, false))
    }

    /// At most how many entries have `from <= key < to` (whole blocks counted).
    pub fn estimate(&self, from: &[u8], to: &[u8]) -> u64 {
        let first = self.index.block_of(from).unwrap_or(0);
        let end = partition_point(self.index.blocks(), |i| self.index.first_key(i) < to);
        (end.saturating_sub(first) as u64 * u64::from(BLOCK_ENTRIES_MAX)).min(self.meta.entries)
    }

    /// The bytes every key of the run starts with (empty for an empty run):
    /// the common prefix of its first and last key.
    pub fn key_prefix(&self) -> Result<Vec<u8>, TierError> {
        let blocks = self.index.blocks();
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let last = self.block_entries(blocks - 1)?.pop().map(|e| e.key).unwrap_or_default();
        Ok(self.index.first_key(0).iter().zip(&last).take_while(|(a, b)| a == b).map(|(a, _)| *a).collect())
    }

    /// The entries of block `block`, in key order.
    fn block_entries(&self, block: usize) -> Result<Vec<Entry>, TierError> {
        let (offset, buf) = self.read_block(block)?;
        let mut entries = BlockEntries::new(offset, &buf).map_err(|r| self.corrupt(offset, r))?;
        let mut out = Vec::with_capacity(BLOCK_ENTRIES_MAX as usize);
        while let Some(entry) = entries.next().map_err(|r| self.corrupt(offset, r))? {
            out.push(entry.to_entry());
        }
        Ok(out)
    }
}

/// Reads a run's entries in key order, one block at a time.
pub(crate) struct RunCursor {
    run: Arc<Run>,
    next_block: usize,
    entries: std::vec::IntoIter<Entry>,
}

impl RunCursor {
    pub fn new(run: Arc<Run>) -> RunCursor {
        RunCursor { run, next_block: 0, entries: Vec::new().into_iter() }
    }

    pub fn next(&mut self) -> Result<Option<Entry>, TierError> {
        loop {
            if let Some(entry) = self.entries.next() {
                return Ok(Some(entry));
            }
            if self.next_block == self.run.index.blocks() {
                return Ok(None);
            }
            self.entries = self.run.block_entries(self.next_block)?.into_iter();
            self.next_block += 1;
        }
    }
}

/// Streams one run out to a temporary file; [`RunWriter::finish`] makes it durable under its name.
pub(crate) struct RunWriter {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    /// Bytes written to `out` so far.
    at: u64,
    lo: u64,
    hi: u64,
    /// The open block: a count placeholder, then its entries.
    block: Vec<u8>,
    block_entries: u32,
    index: SparseIndex,
    bloom: Bloom,
    last_key: Vec<u8>,
    entries: u64,
    seq_min: u64,
    seq_max: u64,
    at_ms_min: u64,
    at_ms_max: u64,
}

impl RunWriter {
    /// Starts the run covering `lo..=hi` in `dir`, its filter sized for `keys_max` keys.
    pub fn create(dir: &Path, lo: u64, hi: u64, keys_max: u64, bits_per_key: u32) -> Result<RunWriter, TierError> {
        Self::create_named(dir, &run_name(lo, hi), lo, hi, keys_max, bits_per_key)
    }

    /// Starts a run under the file name `name` (an import: see [`import_name`]).
    pub fn create_named(
        dir: &Path,
        name: &str,
        lo: u64,
        hi: u64,
        keys_max: u64,
        bits_per_key: u32,
    ) -> Result<RunWriter, TierError> {
        let path = dir.join(name);
        let tmp = path.with_extension("run.tmp");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(TierError::io(&tmp))?;
        let mut writer = RunWriter {
            dir: dir.to_path_buf(),
            path,
            tmp,
            out: BufWriter::with_capacity(256 << 10, file),
            at: 0,
            lo,
            hi,
            block: Vec::with_capacity(BLOCK_BYTES_TARGET * 2),
            block_entries: 0,
            index: SparseIndex::default(),
            bloom: Bloom::with_capacity(keys_max, bits_per_key),
            last_key: Vec::new(),
            entries: 0,
            seq_min: u64::MAX,
            seq_max: 0,
            at_ms_min: u64::MAX,
            at_ms_max: 0,
        };
        writer.write(&encode_header(lo, hi))?;
        Ok(writer)
    }

    /// The temporary file, to remove if the run is abandoned.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), TierError> {
        self.out.write_all(bytes).map_err(TierError::io(&self.tmp))?;
        self.at += bytes.len() as u64;
        Ok(())
    }

    /// Entries pushed so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The last key pushed, if any.
    pub fn last_key(&self) -> Option<&[u8]> {
        (self.entries > 0).then_some(self.last_key.as_slice())
    }

    /// Appends one entry; keys must come strictly ascending and within the size limits.
    pub fn push(&mut self, entry: &Entry) -> Result<(), TierError> {
        assert!(self.entries == 0 || entry.key > self.last_key, "run keys are pushed strictly ascending");
        assert!(
            entry.key.len() <= KEY_BYTES_MAX && entry.value.len() <= VALUE_BYTES_MAX,
            "sizes checked by the caller"
        );
        if self.block_entries == 0 {
            self.index.push(&entry.key, self.at);
            self.block.clear();
            self.block.extend_from_slice(&0u32.to_le_bytes());
        }
        self.block.extend_from_slice(&(entry.key.len() as u32).to_le_bytes());
        self.block.extend_from_slice(&(entry.value.len() as u32).to_le_bytes());
        self.block.extend_from_slice(&entry.seq.to_le_bytes());
        self.block.extend_from_slice(&entry.at_ms.to_le_bytes());
        self.block.extend_from_slice(&entry.key);
        self.block.extend_from_slice(&entry.value);
        self.block_entries += 1;
        self.bloom.insert(key_hash(&entry.key));
        self.last_key.clear();
        self.last_key.extend_from_slice(&entry.key);
        self.entries += 1;
        self.seq_min = self.seq_min.min(entry.seq);
        self.seq_max = self.seq_max.max(entry.seq);
        self.at_ms_min = self.at_ms_min.min(entry.at_ms);
        self.at_ms_max = self.at_ms_max.max(entry.at_ms);
        if self.block_entries == BLOCK_ENTRIES_MAX || self.block.len() >= BLOCK_BYTES_TARGET {
            self.close_block()?;
        }
        Ok(())
    }

    fn close_block(&mut self) -> Result<(), TierError> {
        if self.block_entries == 0 {
            return Ok(());
        }
        self.block[..4].copy_from_slice(&self.block_entries.to_le_bytes());
        let crc = block_crc(self.at, &self.block);
        self.block.extend_from_slice(&crc.to_le_bytes());
        let block = std::mem::take(&mut self.block);
        self.write(&block)?;
        self.block = block;
        self.block_entries = 0;
        Ok(())
    }

    /// Writes the index, filter and footer, fsyncs, renames the file into
    /// place and fsyncs the directory: once this returns the run is durable.
    pub fn finish(mut self) -> Result<Run, TierError> {
        self.close_block()?;
        let index_offset = self.at;
        let mut index_buf = Vec::new();
        self.index.encode(&mut index_buf);
        self.write(&index_buf)?;
        let filter_offset = self.at;
        let mut filter_buf = Vec::with_capacity(self.bloom.bytes() + 8);
        self.bloom.encode(&mut filter_buf);
        self.write(&filter_buf)?;
        let empty = self.entries == 0;
        let footer = Footer {
            index_offset,
            index_len: index_buf.len() as u64,
            filter_offset,
            filter_len: filter_buf.len() as u64,
            entries: self.entries,
            blocks: self.index.blocks() as u64,
            lo: self.lo,
            hi: self.hi,
            seq_min: if empty { 0 } else { self.seq_min },
            seq_max: self.seq_max,
            at_ms_min: if empty { 0 } else { self.at_ms_min },
            at_ms_max: self.at_ms_max,
            header_crc: crc32c::crc32c(&encode_header(self.lo, self.hi)),
            index_crc: crc32c::crc32c(&index_buf),
            filter_crc: crc32c::crc32c(&filter_buf),
        };
        self.write(&footer.encode())?;
        let file =
            self.out.into_inner().map_err(|e| TierError::Io { path: self.tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(TierError::io(&self.tmp))?;
        fs::rename(&self.tmp, &self.path).map_err(TierError::io(&self.path))?;
        sync_dir(&self.dir)?;
        self.index.offsets.push(index_offset);
        let meta = RunMeta {
            lo: self.lo,
            hi: self.hi,
            entries: self.entries,
            bytes: self.at,
            seq_min: footer.seq_min,
            seq_max: footer.seq_max,
            at_ms_min: footer.at_ms_min,
            at_ms_max: footer.at_ms_max,
        };
        Ok(Run { path: self.path, file, meta, index: self.index, bloom: self.bloom })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32) -> Entry {
        Entry {
            key: format!("key-{i:08}").into_bytes(),
            seq: u64::from(i),
            at_ms: 1000 + u64::from(i),
            value: vec![i as u8; 20],
        }
    }

    fn write(dir: &Path, n: u32) -> Run {
        let mut writer = RunWriter::create(dir, 1, 2, u64::from(n), 10).expect("create");
        for i in 0..n {
            writer.push(&entry(i)).expect("push");
        }
        writer.finish().expect("finish")
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_run_name(&run_name(3, 17)), Some((3, 17)));
        assert_eq!(parse_run_name("3-17.run"), None);
        assert_eq!(parse_run_name(&format!("{}.tmp", run_name(3, 17))), None);
    }

    #[test]
    fn a_written_run_reopens_and_answers_every_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write(dir.path(), 500);
        let run = Run::open(&written.path, 1, 2).expect("open");
        assert_eq!(run.meta, written.meta);
        assert_eq!(run.index.offsets, written.index.offsets);
        assert_eq!(run.bloom, written.bloom);
        for i in 0..500 {
            let e = entry(i);
            assert_eq!(run.get(&e.key, key_hash(&e.key), &ReadCounters::default()).expect("get"), Some(e));
        }
        assert_eq!(run.get(b"key-", key_hash(b"key-"), &ReadCounters::default()).expect("get"), None);
        let mut cursor = RunCursor::new(Arc::new(run));
        for i in 0..500 {
            assert_eq!(cursor.next().expect("next"), Some(entry(i)));
        }
        assert_eq!(cursor.next().expect("next"), None);
    }

    #[test]
    fn an_empty_run_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write(dir.path(), 0);
        let run = Run::open(&written.path, 1, 2).expect("open");
        assert_eq!(run.meta.entries, 0);
        assert_eq!(run.get(b"x", key_hash(b"x"), &ReadCounters::default()).expect("get"), None);
    }

    #[test]
    fn every_flipped_bit_outside_the_data_blocks_is_caught_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), 100).path;
        let good = fs::read(&path).expect("read");
        let footer = Footer::decode(&good[good.len() - FOOTER_BYTES as usize..]).expect("footer");
        let checked = (0..HEADER_BYTES as usize).chain(footer.index_offset as usize..good.len());
        for i in checked {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                fs::write(&path, &bad).expect("write");
                match Run::open(&path, 1, 2) {
                    Err(TierError::Corrupt { file, .. }) => assert_eq!(file, path),
                    other => panic!("flip at byte {i} bit {bit}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_in_a_block_is_caught_when_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), 10).path;
        let good = fs::read(&path).expect("read");
        let footer = Footer::decode(&good[good.len() - FOOTER_BYTES as usize..]).expect("footer");
        for i in HEADER_BYTES as usize..footer.index_offset as usize {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                fs::write(&path, &bad).expect("write");
                let run = Run::open(&path, 1, 2).expect("blocks are not checked on open");
                let read = RunCursor::new(Arc::new(run)).next();
                assert!(matches!(read, Err(TierError::Corrupt { .. })), "flip at byte {i} bit {bit}: {read:?}");
            }
        }
    }
}
