//! The binary codec of the log and of snapshots.
//!
//! Little-endian integers, length-prefixed strings. Decoding never panics on
//! bad bytes: it answers a [`DecodeError`] naming what was wrong. The store
//! frames and checksums these bytes; this layer only gives them meaning.

use crate::command::{Authority, Command, Credit, Op, OpenAccount, Transfer, TransferStatus};
use crate::error::ErrorCode;
use crate::ids::{AccountId, CellId, TenantId, TransferId};
use crate::money::Currency;
use crate::shard::ShardMap;

/// The format version written at the start of every batch and snapshot.
/// 2: accounts carry their tenant. 3: a batch carries its clock; transfer
/// records carry the time they were made.
pub const FORMAT_VERSION: u8 = 3;

/// The most commands one logged batch may hold (I7); far above any engine batch.
pub const BATCH_COMMANDS_MAX: u32 = 1 << 20;

/// The fewest bytes a command takes (an account opened with one-byte ids):
/// a batch's count reserves room for no more commands than its bytes hold.
/// Public for the codecs that carry commands inside their own bodies.
pub const COMMAND_BYTES_MIN: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {what} at byte {offset}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub offset: usize,
    pub reason: String,
}

/// Appends encoded values to a byte buffer.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(bytes: usize) -> Self {
        Self { buf: Vec::with_capacity(bytes) }
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i128(&mut self, v: i128) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
    }
    /// Bytes with their length (u32).
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
    pub fn currency(&mut self, c: Currency) {
        self.buf.extend_from_slice(&c.bytes());
    }
    /// A currency that may be absent: a flag byte, then the currency.
    pub fn opt_currency(&mut self, c: Option<Currency>) {
        match c {
            Some(c) => {
                self.u8(1);
                self.currency(c);
            }
            None => self.u8(0),
        }
    }
    pub fn status(&mut self, s: TransferStatus) {
        self.u8(match s {
            TransferStatus::Pending => 0,
            TransferStatus::Settled => 1,
            TransferStatus::Reversed => 2,
        });
    }
    /// An account or transfer id: one length byte (ids are at most 64 bytes), then the bytes.
    pub fn id(&mut self, s: &str) {
        debug_assert!(s.len() <= crate::ids::ID_BYTES_MAX, "ids are validated on entry");
        self.buf.push(s.len() as u8);
        self.buf.extend_from_slice(s.as_bytes());
    }
}

/// Reads encoded values from a byte slice, with errors instead of panics.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
    /// The last currency decoded: most ledgers hold one or a few, so this
    /// skips the ISO table lookup almost every time.
    last_currency: Option<Currency>,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, pos: 0, what, last_currency: None }
    }

    pub fn error(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { what: self.what, offset: self.pos, reason: reason.into() }
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| self.error(format!("needs {n} more bytes")))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.error(format!("bad boolean {other}"))),
        }
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub fn i128(&mut self) -> Result<i128, DecodeError> {
        Ok(i128::from_le_bytes(self.array()?))
    }
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| self.error("string is not UTF-8"))
    }
    /// Bytes written by `Writer::bytes`, at most `max` of them.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(self.error(format!("{len} bytes exceed the limit {max}")));
        }
        self.take(len)
    }
    fn id_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8()?);
        self.take(len)
    }
    pub fn account_id(&mut self) -> Result<AccountId, DecodeError> {
        let bytes = self.id_bytes()?;
        AccountId::from_bytes(bytes).map_err(|e| self.error(format!("account id: {e}")))
    }
    pub fn tenant_id(&mut self) -> Result<TenantId, DecodeError> {
        let bytes = self.id_bytes()?;
        TenantId::from_bytes(bytes).map_err(|e| self.error(format!("tenant id: {e}")))
    }
    pub fn transfer_id(&mut self) -> Result<TransferId, DecodeError> {
        let bytes = self.id_bytes()?;
        TransferId::from_bytes(bytes).map_err(|e| self.error(format!("transfer id: {e}")))
    }
    pub fn currency(&mut self) -> Result<Currency, DecodeError> {
        let bytes = self.array::<3>()?;
        if let Some(c) = self.last_currency.filter(|c| c.bytes() == bytes) {
            return Ok(c);
        }
        let c = Currency::from_bytes(bytes).map_err(|e| self.error(e.to_string()))?;
        self.last_currency = Some(c);
        Ok(c)
    }
    /// A currency written by [`Writer::opt_currency`].
    pub fn opt_currency(&mut self) -> Result<Option<Currency>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.currency().map(Some),
            other => Err(self.error(format!("bad currency flag {other}"))),
        }
    }
    pub fn status(&mut self) -> Result<TransferStatus, DecodeError> {
        match self.u8()? {
            0 => Ok(TransferStatus::Pending),
            1 => Ok(TransferStatus::Settled),
            2 => Ok(TransferStatus::Reversed),
            other => Err(self.error(format!("bad transfer status {other}"))),
        }
    }
    pub fn error_code(&mut self) -> Result<ErrorCode, DecodeError> {
        let tag = self.u8()?;
        ErrorCode::from_tag(tag).ok_or_else(|| self.error(format!("unknown error code {tag}")))
    }
    /// Room to reserve for `count` items that follow: no more than the bytes
    /// left could hold at `item_bytes_min` each, so a count that lies (up to
    /// its limit) reserves nothing the input cannot back (I7).
    pub fn capacity_for(&self, count: usize, item_bytes_min: usize) -> usize {
        count.min((self.bytes.len() - self.pos) / item_bytes_min.max(1))
    }
    /// A count of items that follow, checked against a limit before anything is allocated.
    pub fn count(&mut self, max: u64) -> Result<usize, DecodeError> {
        let n = self.u64()?;
        if n > max {
            return Err(self.error(format!("count {n} exceeds limit {max}")));
        }
        Ok(n as usize)
    }
}

const TAG_OPEN: u8 = 1;
const TAG_TRANSFER: u8 = 2;
const TAG_CREDIT: u8 = 3;
const TAG_SETTLE: u8 = 4;
const TAG_COMPENSATE: u8 = 5;
const TAG_SHARD_MAP: u8 = 6;
const TAG_FREEZE: u8 = 7;
const TAG_UNFREEZE: u8 = 8;
const TAG_INSTALL_SHARD: u8 = 9;
const TAG_DISCARD_SHARD: u8 = 10;
const TAG_DROP_SHARD: u8 = 11;
/// A credit that names the cell it is meant for.
const TAG_CREDIT_TO: u8 = 12;

pub fn encode_shard_map(w: &mut Writer, map: &ShardMap) {
    w.u64(map.epoch());
    w.u32(map.shards());
    for owner in map.owners() {
        w.u32(owner.0);
    }
}

pub fn decode_shard_map(r: &mut Reader<'_>) -> Result<ShardMap, DecodeError> {
    let epoch = r.u64()?;
    let shards = r.u32()?;
    if shards == 0 || shards > crate::shard::SHARDS_MAX {
        return Err(r.error(format!("shard count {shards} out of range")));
    }
    let owners = (0..shards).map(|_| r.u32().map(CellId)).collect::<Result<Vec<_>, _>>()?;
    ShardMap::new(epoch, owners).map_err(|e| r.error(e.to_string()))
}

/// Appends one command to `w`.
pub fn encode_command(w: &mut Writer, cmd: &Command) {
    match &cmd.op {
        Op::OpenAccount(o) => {
            w.u8(TAG_OPEN);
            w.bool(cmd.shadow);
            w.id(o.id.as_str());
            w.currency(o.currency);
            w.bool(o.overdraft);
            w.id(o.tenant.as_str());
        }
        Op::Transfer(t) => {
            w.u8(TAG_TRANSFER);
            w.bool(cmd.shadow);
            w.id(t.id.as_str());
            w.id(t.from.as_str());
            w.id(t.to.as_str());
            w.i64(t.amount);
            w.opt_currency(t.currency);
            w.str(t.memo.as_deref().unwrap_or(""));
            w.bool(t.memo.is_some());
            // `t.by` is not logged: the authority was checked when the
            // transfer was admitted, and a logged command applies again as is.
        }
        Op::Credit(c) => {
            w.u8(if c.dest.is_some() { TAG_CREDIT_TO } else { TAG_CREDIT });
            w.bool(cmd.shadow);
            w.u32(c.source.0);
            w.u64(c.seq);
            w.id(c.transfer.as_str());
            w.id(c.from.as_str());
            w.id(c.to.as_str());
            w.i64(c.amount);
            w.currency(c.currency);
            if let Some(dest) = c.dest {
                w.u32(dest.0);
            }
        }
        Op::Settle { dest, seq } => {
            w.u8(TAG_SETTLE);
            w.bool(cmd.shadow);
            w.u32(dest.0);
            w.u64(*seq);
        }
        Op::Compensate { dest, seq, reason } => {
            w.u8(TAG_COMPENSATE);
            w.bool(cmd.shadow);
            w.u32(dest.0);
            w.u64(*seq);
            w.u8(reason.tag());
        }
        Op::InstallShardMap(map) => {
            w.u8(TAG_SHARD_MAP);
            w.bool(cmd.shadow);
            encode_shard_map(w, map);
        }
        Op::FreezeShard { shard, move_id, to } => {
            w.u8(TAG_FREEZE);
            w.bool(cmd.shadow);
            w.u32(*shard);
            w.u64(*move_id);
            w.u32(to.0);
        }
        Op::UnfreezeShard { shard, move_id }
        | Op::DiscardShard { shard, move_id }
        | Op::DropShard { shard, move_id } => {
            w.u8(match &cmd.op {
                Op::UnfreezeShard { .. } => TAG_UNFREEZE,
                Op::DiscardShard { .. } => TAG_DISCARD_SHARD,
                _ => TAG_DROP_SHARD,
            });
            w.bool(cmd.shadow);
            w.u32(*shard);
            w.u64(*move_id);
        }
        Op::InstallShard(export) => {
            w.u8(TAG_INSTALL_SHARD);
            w.bool(cmd.shadow);
            crate::moves::encode_export(w, export);
        }
    }
}

/// Reads one command from `r`.
pub fn decode_command(r: &mut Reader<'_>) -> Result<Command, DecodeError> {
    let tag = r.u8()?;
    let shadow = r.bool()?;
    let op = match tag {
        TAG_OPEN => Op::OpenAccount(OpenAccount {
            id: r.account_id()?,
            currency: r.currency()?,
            overdraft: r.bool()?,
            tenant: r.tenant_id()?,
        }),
        TAG_TRANSFER => {
            let id = r.transfer_id()?;
            let from = r.account_id()?;
            let to = r.account_id()?;
            let amount = r.i64()?;
            let currency = r.opt_currency()?;
            let memo_text = r.str()?;
            let memo = r.bool()?.then(|| Box::from(memo_text));
            // Replay needs no authority check: the command was admitted once.
            Op::Transfer(Transfer { id, from, to, amount, currency, memo, by: Authority::Admin })
        }
        TAG_CREDIT | TAG_CREDIT_TO => {
            let mut c = Credit {
                source: CellId(r.u32()?),
                dest: None,
                seq: r.u64()?,
                transfer: r.transfer_id()?,
                from: r.account_id()?,
                to: r.account_id()?,
                amount: r.i64()?,
                currency: r.currency()?,
            };
            if tag == TAG_CREDIT_TO {
                c.dest = Some(CellId(r.u32()?));
            }
            Op::Credit(c)
        }
        TAG_SETTLE => Op::Settle { dest: CellId(r.u32()?), seq: r.u64()? },
        TAG_COMPENSATE => Op::Compensate { dest: CellId(r.u32()?), seq: r.u64()?, reason: r.error_code()? },
        TAG_SHARD_MAP => Op::InstallShardMap(decode_shard_map(r)?),
        TAG_FREEZE => Op::FreezeShard { shard: r.u32()?, move_id: r.u64()?, to: CellId(r.u32()?) },
        TAG_UNFREEZE => Op::UnfreezeShard { shard: r.u32()?, move_id: r.u64()? },
        TAG_DISCARD_SHARD => Op::DiscardShard { shard: r.u32()?, move_id: r.u64()? },
        TAG_DROP_SHARD => Op::DropShard { shard: r.u32()?, move_id: r.u64()? },
        TAG_INSTALL_SHARD => Op::InstallShard(Box::new(crate::moves::decode_export(r)?)),
        other => return Err(r.error(format!("unknown command tag {other}"))),
    };
    Ok(Command { shadow, op })
}

/// One logged batch: the cell's clock when it was applied, and its commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedBatch {
    /// Unix milliseconds, never lower than an earlier batch's (see
    /// [`crate::CellState::advance_clock`]); replay sets the clock from it, so
    /// the times records carry are the same on every replay.
    pub clock_ms: u64,
    pub commands: Vec<Command>,
}

/// Encodes a batch of commands: version, count, clock, commands.
pub fn encode_batch<'a>(w: &mut Writer, clock_ms: u64, commands: impl ExactSizeIterator<Item = &'a Command>) {
    w.u8(FORMAT_VERSION);
    w.u32(commands.len() as u32);
    w.u64(clock_ms);
    for cmd in commands {
        encode_command(w, cmd);
    }
}

/// Decodes a batch written by [`encode_batch`].
pub fn decode_batch(bytes: &[u8]) -> Result<LoggedBatch, DecodeError> {
    let mut r = Reader::new(bytes, "batch");
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(r.error(format!("unknown format version {version}")));
    }
    let n = r.u32()?;
    if n > BATCH_COMMANDS_MAX {
        return Err(r.error(format!("{n} commands exceed the limit {BATCH_COMMANDS_MAX}")));
    }
    let clock_ms = r.u64()?;
    let mut out = Vec::with_capacity(r.capacity_for(n as usize, COMMAND_BYTES_MIN));
    for _ in 0..n {
        out.push(decode_command(&mut r)?);
    }
    if !r.is_empty() {
        return Err(r.error("trailing bytes after the last command"));
    }
    Ok(LoggedBatch { clock_ms, commands: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Command> {
        let a = AccountId::new("alice").unwrap();
        let b = AccountId::new("bob").unwrap();
        let cny = Currency::new("CNY").unwrap();
        vec![
            Command::real(Op::OpenAccount(OpenAccount {
                id: a.clone(),
                currency: cny,
                overdraft: true,
                tenant: TenantId::default_tenant(),
            })),
            Command::shadow(Op::Transfer(Transfer {
                id: TransferId::new("t1").unwrap(),
                from: a.clone(),
                to: b.clone(),
                amount: 42,
                currency: Some(cny),
                memo: Some("lunch".into()),
                by: Authority::Admin,
            })),
            Command::real(Op::Transfer(Transfer {
                id: TransferId::new("t2").unwrap(),
                from: a.clone(),
                to: b.clone(),
                amount: 7,
                currency: None,
                memo: None,
                by: Authority::Admin,
            })),
            Command::real(Op::Credit(Credit {
                source: CellId(3),
                dest: None,
                seq: 9,
                transfer: TransferId::new("t3").unwrap(),
                from: b.clone(),
                to: a.clone(),
                amount: 5,
                currency: cny,
            })),
            Command::real(Op::Credit(Credit {
                source: CellId(3),
                dest: Some(CellId(1)),
                seq: 10,
                transfer: TransferId::new("t4").unwrap(),
                from: b,
                to: a,
                amount: 6,
                currency: cny,
            })),
            Command::real(Op::Settle { dest: CellId(1), seq: 2 }),
            Command::shadow(Op::Compensate { dest: CellId(2), seq: 4, reason: ErrorCode::AccountNotFound }),
            Command::real(Op::InstallShardMap(ShardMap::round_robin(16, 4).unwrap())),
        ]
    }

    #[test]
    fn batches_round_trip() {
        let cmds = sample();
        let mut w = Writer::default();
        encode_batch(&mut w, 1_700_000_000_123, cmds.iter());
        assert_eq!(decode_batch(&w.buf).unwrap(), LoggedBatch { clock_ms: 1_700_000_000_123, commands: cmds });
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut w = Writer::default();
        encode_batch(&mut w, 7, sample().iter());
        for cut in 0..w.buf.len() {
            assert!(decode_batch(&w.buf[..cut]).is_err(), "cut at {cut} decoded");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut w = Writer::default();
        encode_batch(&mut w, 7, sample().iter());
        for i in 0..w.buf.len() {
            let mut bytes = w.buf.clone();
            bytes[i] ^= 0xA5;
            let _ = decode_batch(&bytes);
        }
        assert!(decode_batch(&[FORMAT_VERSION, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// Found by the `batch` fuzz target: 13 bytes claiming 2^20 commands
    /// reserved 142 MB before the first command failed to decode.
    #[test]
    fn a_count_reserves_only_what_the_bytes_can_hold() {
        let mut bytes = vec![FORMAT_VERSION];
        bytes.extend_from_slice(&BATCH_COMMANDS_MAX.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        assert!(decode_batch(&bytes).is_err());
        let r = Reader::new(&[0; 25], "test");
        assert_eq!((r.capacity_for(1 << 20, 10), r.capacity_for(1, 10), r.capacity_for(9, 0)), (2, 1, 9));
    }
}

/// Builds one logged batch command by command, reusing its buffer.
///
/// The layout is that of [`encode_batch`]: version, count, clock, commands.
pub struct BatchEncoder {
    w: Writer,
    count: u32,
}

impl Default for BatchEncoder {
    fn default() -> Self {
        let mut e = Self { w: Writer::with_capacity(1 << 16), count: 0 };
        e.clear();
        e
    }
}

impl BatchEncoder {
    pub fn clear(&mut self) {
        self.w.buf.clear();
        self.w.u8(FORMAT_VERSION);
        self.w.u32(0);
        self.w.u64(0);
        self.count = 0;
    }

    /// Sets the batch's clock (Unix milliseconds).
    pub fn set_clock(&mut self, clock_ms: u64) {
        self.w.buf[5..13].copy_from_slice(&clock_ms.to_le_bytes());
    }

    pub fn push(&mut self, cmd: &Command) {
        assert!(self.count < BATCH_COMMANDS_MAX, "engine batches stay far below the log limit");
        encode_command(&mut self.w, cmd);
        self.count += 1;
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encoded batch.
    pub fn bytes(&mut self) -> &[u8] {
        self.w.buf[1..5].copy_from_slice(&self.count.to_le_bytes());
        &self.w.buf
    }
}

#[cfg(test)]
mod encoder_tests {
    use super::*;
    use crate::command::Op;

    #[test]
    fn the_encoder_writes_what_decode_batch_reads() {
        let mut e = BatchEncoder::default();
        let cmd = Command::real(Op::Settle { dest: CellId(1), seq: 5 });
        e.push(&cmd);
        e.push(&cmd);
        e.set_clock(42);
        let batch = decode_batch(e.bytes()).unwrap();
        assert_eq!(batch, LoggedBatch { clock_ms: 42, commands: vec![cmd.clone(), cmd.clone()] });
        e.clear();
        assert!(e.is_empty());
        assert_eq!(decode_batch(e.bytes()).unwrap(), LoggedBatch { clock_ms: 0, commands: vec![] });
    }
}
