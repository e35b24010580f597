//! The cell protocol's bodies: commands (with the authority they act for),
//! outcomes, queries, answers and a cell's status, in the binary codec of the
//! log (`cellpay_core::codec`). Every body starts with the protocol version it
//! is written in. Decoding never panics and allocates no more than its input
//! backs (I7).
//!
//! Each body is `version: u8`, then its value, then nothing: trailing bytes
//! are refused, so a body cut or glued to another is never half-read. A list
//! is a `u64` count, checked against its named limit (below) before anything
//! is reserved, then its items; the room reserved is further capped by what
//! the bytes left could hold ([`Reader::capacity_for`]), so a count that lies
//! within its limit still reserves nothing the input does not back. Engine
//! results are a tag byte, 0 then the value or 1 then the [`EngineError`].
//! A query's page size (`Entries`, `Outbox`) is refused above what its
//! answer's list may carry, so no cell answers with a body its asker refuses.
//!
//! Two `&'static str` fields cannot carry any string a peer sends:
//! - `EngineError::Shed.class` decodes only to a [`Priority`] class name; any
//!   other is refused (it names the class the cell shed, and a router acts on it).
//! - `Finding::Walk.figure` decodes to one of [`WALK_FIGURES`], the names
//!   `Ledger::audit` gives its figures; any other name decodes to
//!   [`WALK_FIGURE_UNKNOWN`] rather than failing: a cell that names a new
//!   figure still reports the finding, with its kept and walked amounts, to
//!   an older router (losing the name costs less than losing the finding).
//!
//! The modules hold one family of values each: `submit` the commands and
//! outcomes, `query` the queries and answers, `view` the views and rejections
//! both carry, `audit` the audit figures and findings answers and status
//! carry, `status` a cell's status.

mod audit;
mod query;
mod status;
mod submit;
mod view;

use cellpay_cell::{CellFigures, CellStatus, EngineError};
use cellpay_core::codec::{DecodeError, Reader, Writer};
use cellpay_core::{CellId, Command, Outcome, Priority, Query, QueryAnswer, ShardMap};

pub use audit::{WALK_FIGURES, WALK_FIGURE_UNKNOWN};

/// The newest protocol version this build reads and writes. Version 2 added
/// the disk tier's copy of a moving shard (`ExportShard`'s mark, the
/// `TierPage` and `TierImport` queries and answers, a tier's imported runs);
/// a version-1 body reads as it did, with those zero. A body is written in
/// the oldest version that carries it, so a cell of the version before
/// still reads everything but the copy (a rolling upgrade keeps the reader
/// one version ahead of the writer).
pub const PROTOCOL_VERSION: u8 = 2;
/// The oldest protocol version this build still reads.
pub const PROTOCOL_VERSION_MIN: u8 = 1;
/// The most commands one submit call may carry (I7).
pub const SUBMIT_COMMANDS_MAX: usize = 1 << 16;
/// The most outcomes one submit answer may carry: one per command.
pub const SUBMIT_OUTCOMES_MAX: usize = SUBMIT_COMMANDS_MAX;
/// The most cells any per-cell list may name (a ledger's outbox and inbox
/// figures, the pairs an `InboxAt`/`OutboxAt` query asks and their answers):
/// every cell owns a shard, so a cluster has no more cells than shards.
pub const CELLS_MAX: usize = cellpay_core::SHARDS_MAX as usize;
/// The most per-shard digests a `Digests` answer may carry: one per shard.
pub const DIGESTS_MAX: usize = cellpay_core::SHARDS_MAX as usize;
/// The most transfers a `Transfers` answer may carry (one per payer that used
/// the id asked; a page of entries or outbox messages is bounded alike).
pub const ANSWER_TRANSFERS_MAX: usize = 1 << 16;
/// The most entries an `Entries` answer may carry: far above the engine's
/// page limit (`ENTRIES_PAGE_MAX`), so a cell that raises it still decodes.
/// An `Entries` query asking for a larger page is refused when decoded.
pub const ANSWER_ENTRIES_MAX: usize = 1 << 16;
/// The most outbox messages an `Outbox` answer may carry: far above a relay
/// round, which stays below half the inbox tail (`INBOX_TAIL_RETAINED`).
/// An `Outbox` query asking for a larger page is refused when decoded.
pub const ANSWER_OUTBOX_MESSAGES_MAX: usize = 1 << 16;
/// The most findings one ledger audit may carry: a walk finds at most three
/// per outbox (one per destination cell) plus a few for the ledger itself.
pub const AUDIT_FINDINGS_MAX: usize = 4 * CELLS_MAX;

const _: () = assert!(ANSWER_ENTRIES_MAX >= cellpay_core::ENTRIES_PAGE_MAX);
const _: () = assert!(ANSWER_OUTBOX_MESSAGES_MAX >= cellpay_core::INBOX_TAIL_RETAINED);

/// A cell's status as the status call answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub status: CellStatus,
    pub figures: CellFigures,
    /// Bumped whenever the cell's outbox may have grown.
    pub outbox_generation: u64,
}

pub fn encode_commands(commands: &[Command]) -> Vec<u8> {
    let mut w = open_body();
    write_list(&mut w, commands, SUBMIT_COMMANDS_MAX, submit::write_command);
    w.buf
}
pub fn decode_commands(bytes: &[u8]) -> Result<Vec<Command>, DecodeError> {
    decode_body(bytes, "commands", |r| {
        read_list(r, SUBMIT_COMMANDS_MAX, submit::COMMAND_BYTES_MIN, submit::read_command)
    })
}
pub fn encode_outcomes(result: &Result<Vec<Outcome>, EngineError>) -> Vec<u8> {
    let mut w = open_body();
    write_engine_result(&mut w, result, |w, outcomes| {
        write_list(w, outcomes, SUBMIT_OUTCOMES_MAX, submit::write_outcome)
    });
    w.buf
}
pub fn decode_outcomes(bytes: &[u8]) -> Result<Result<Vec<Outcome>, EngineError>, DecodeError> {
    decode_body(bytes, "outcomes", |r| {
        read_engine_result(r, |r| read_list(r, SUBMIT_OUTCOMES_MAX, submit::OUTCOME_BYTES_MIN, submit::read_outcome))
    })
}
pub fn encode_query(query: &Query) -> Vec<u8> {
    let version = match query {
        Query::TierPage { .. } | Query::TierImport { .. } => 2,
        Query::ExportShard { older_after, .. } if *older_after != 0 => 2,
        _ => 1,
    };
    write_body(version, |w| query::write_query(w, query))
}
pub fn decode_query(bytes: &[u8]) -> Result<Query, DecodeError> {
    decode_body(bytes, "query", query::read_query)
}
pub fn encode_answer(result: &Result<QueryAnswer, EngineError>) -> Vec<u8> {
    let version = match result {
        Ok(QueryAnswer::TierPage(_) | QueryAnswer::TierImported { .. }) => 2,
        _ => 1,
    };
    write_body(version, |w| write_engine_result(w, result, query::write_answer))
}
pub fn decode_answer(bytes: &[u8]) -> Result<Result<QueryAnswer, EngineError>, DecodeError> {
    decode_body(bytes, "answer", |r| read_engine_result(r, query::read_answer))
}
pub fn encode_status(report: &StatusReport) -> Vec<u8> {
    let version = if report.figures.tier.is_some_and(|t| t.imported_runs > 0) { 2 } else { 1 };
    write_body(version, |w| status::write_report(w, report))
}
pub fn decode_status(bytes: &[u8]) -> Result<StatusReport, DecodeError> {
    decode_body(bytes, "status", status::read_report)
}

/// The shard map a cell works at (the map call's answer).
pub fn encode_map(map: &ShardMap) -> Vec<u8> {
    let mut w = open_body();
    cellpay_core::codec::encode_shard_map(&mut w, map);
    w.buf
}
pub fn decode_map(bytes: &[u8]) -> Result<ShardMap, DecodeError> {
    decode_body(bytes, "shard map", cellpay_core::codec::decode_shard_map)
}

thread_local! {
    /// The version of the body being read (see [`decode_body`]).
    static BODY_VERSION: std::cell::Cell<u8> = const { std::cell::Cell::new(PROTOCOL_VERSION) };
}

/// The protocol version of the body being read or written: a field added
/// after version 1 is read from, and written to, only a body of a version
/// that has it.
pub(crate) fn body_version() -> u8 {
    BODY_VERSION.with(std::cell::Cell::get)
}

/// Writes a body of `version` with `write`.
fn write_body(version: u8, write: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut w = Writer::with_capacity(64);
    w.u8(version);
    let outer = BODY_VERSION.with(|v| v.replace(version));
    write(&mut w);
    BODY_VERSION.with(|v| v.set(outer));
    w.buf
}

/// A writer holding the version byte every body starts with: version 1,
/// for bodies that have not changed since.
fn open_body() -> Writer {
    let mut w = Writer::with_capacity(64);
    w.u8(1);
    w
}

/// Reads a whole body: the version (refused outside
/// `PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION`), the value, and no more bytes.
fn decode_body<'a, T>(
    bytes: &'a [u8],
    what: &'static str,
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let mut r = Reader::new(bytes, what);
    let version = r.u8()?;
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version) {
        return Err(r.error(format!(
            "protocol version {version} is not one this build reads ({PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION})"
        )));
    }
    let outer = BODY_VERSION.with(|v| v.replace(version));
    let value = read(&mut r);
    BODY_VERSION.with(|v| v.set(outer));
    let value = value?;
    if !r.is_empty() {
        return Err(r.error(format!("trailing bytes after the {what}")));
    }
    Ok(value)
}

/// A list: its count, then its items. A list over `max` would be refused by
/// the reader, so the writer never sends one (its callers bound it first).
fn write_list<T>(w: &mut Writer, items: &[T], max: usize, write: impl Fn(&mut Writer, &T)) {
    debug_assert!(items.len() <= max, "a list of {} items exceeds its protocol limit {max}", items.len());
    w.u64(items.len() as u64);
    for item in items {
        write(w, item);
    }
}

/// A list written by [`write_list`]: the count is checked against `max`
/// before anything is reserved, and no more items are reserved than the bytes
/// left hold at `item_bytes_min` each (I7).
fn read_list<'a, T>(
    r: &mut Reader<'a>,
    max: usize,
    item_bytes_min: usize,
    read: impl Fn(&mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let count = r.count(max as u64)?;
    let mut out = Vec::with_capacity(r.capacity_for(count, item_bytes_min));
    for _ in 0..count {
        out.push(read(r)?);
    }
    Ok(out)
}

/// An optional value: a flag byte (0 absent, 1 present), then the value.
fn write_opt<T>(w: &mut Writer, value: Option<&T>, write: impl FnOnce(&mut Writer, &T)) {
    match value {
        Some(v) => {
            w.u8(1);
            write(w, v);
        }
        None => w.u8(0),
    }
}

fn read_opt<'a, T>(
    r: &mut Reader<'a>,
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => read(r).map(Some),
        other => Err(r.error(format!("bad option flag {other}"))),
    }
}

fn write_opt_u64(w: &mut Writer, value: Option<u64>) {
    write_opt(w, value.as_ref(), |w, v| w.u64(*v));
}

fn read_opt_u64(r: &mut Reader<'_>) -> Result<Option<u64>, DecodeError> {
    read_opt(r, |r| r.u64())
}

/// A `usize` travels as a `u64`, whatever either side's word size.
fn write_usize(w: &mut Writer, value: usize) {
    w.u64(value as u64);
}

fn read_usize(r: &mut Reader<'_>) -> Result<usize, DecodeError> {
    let value = r.u64()?;
    usize::try_from(value).map_err(|_| r.error(format!("{value} does not fit this machine's usize")))
}

fn read_cell(r: &mut Reader<'_>) -> Result<CellId, DecodeError> {
    r.u32().map(CellId)
}

const RESULT_OK: u8 = 0;
const RESULT_ERR: u8 = 1;

fn write_engine_result<T>(w: &mut Writer, result: &Result<T, EngineError>, write: impl FnOnce(&mut Writer, &T)) {
    match result {
        Ok(value) => {
            w.u8(RESULT_OK);
            write(w, value);
        }
        Err(e) => {
            w.u8(RESULT_ERR);
            write_engine_error(w, e);
        }
    }
}

fn read_engine_result<'a, T>(
    r: &mut Reader<'a>,
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<Result<T, EngineError>, DecodeError> {
    match r.u8()? {
        RESULT_OK => read(r).map(Ok),
        RESULT_ERR => read_engine_error(r).map(Err),
        other => Err(r.error(format!("bad result tag {other}"))),
    }
}

const ENGINE_OVERLOADED: u8 = 0;
const ENGINE_TOO_LARGE: u8 = 1;
const ENGINE_SHED: u8 = 2;
const ENGINE_UNAVAILABLE: u8 = 3;

fn write_engine_error(w: &mut Writer, e: &EngineError) {
    match e {
        EngineError::Overloaded { cell, queued, max } => {
            w.u8(ENGINE_OVERLOADED);
            w.u32(cell.0);
            write_usize(w, *queued);
            write_usize(w, *max);
        }
        EngineError::TooLarge { commands, max } => {
            w.u8(ENGINE_TOO_LARGE);
            write_usize(w, *commands);
            write_usize(w, *max);
        }
        EngineError::Shed { cell, class, waited_ms, target_ms } => {
            w.u8(ENGINE_SHED);
            w.u32(cell.0);
            w.str(class);
            w.u64(*waited_ms);
            w.u64(*target_ms);
        }
        EngineError::Unavailable { cell, reason } => {
            w.u8(ENGINE_UNAVAILABLE);
            w.u32(cell.0);
            w.str(reason);
        }
    }
}

fn read_engine_error(r: &mut Reader<'_>) -> Result<EngineError, DecodeError> {
    Ok(match r.u8()? {
        ENGINE_OVERLOADED => {
            EngineError::Overloaded { cell: read_cell(r)?, queued: read_usize(r)?, max: read_usize(r)? }
        }
        ENGINE_TOO_LARGE => EngineError::TooLarge { commands: read_usize(r)?, max: read_usize(r)? },
        ENGINE_SHED => {
            let cell = read_cell(r)?;
            let name = r.str()?;
            let class = Priority::parse(name).ok_or_else(|| r.error(format!("unknown priority class {name:?}")))?;
            EngineError::Shed { cell, class: class.as_str(), waited_ms: r.u64()?, target_ms: r.u64()? }
        }
        ENGINE_UNAVAILABLE => EngineError::Unavailable { cell: read_cell(r)?, reason: r.str()?.to_owned() },
        other => return Err(r.error(format!("unknown engine error tag {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a list reserves per input byte, at most: its item's size over
    /// the fewest bytes an item takes. The fuzz targets abort on any single
    /// allocation above 64 bytes per input byte (plus 1 MiB,
    /// `cellpay_fuzzing::bound`); these keep every list of the protocol below it.
    #[test]
    fn no_list_reserves_more_than_the_fuzz_bound_per_input_byte() {
        use std::mem::size_of;
        let ratio = |size: usize, bytes_min: usize| size.div_ceil(bytes_min);
        let lists = [
            ("command", ratio(size_of::<Command>(), submit::COMMAND_BYTES_MIN)),
            ("outcome", ratio(size_of::<Outcome>(), submit::OUTCOME_BYTES_MIN)),
            ("asked pair", ratio(size_of::<(CellId, u64)>(), query::ASKED_BYTES)),
            ("transfer view", ratio(size_of::<cellpay_core::TransferView>(), view::TRANSFER_VIEW_BYTES_MIN)),
            ("entry view", ratio(size_of::<cellpay_core::EntryView>(), view::ENTRY_VIEW_BYTES_MIN)),
            ("outbox message", ratio(size_of::<cellpay_core::OutboxMessage>(), view::OUTBOX_MESSAGE_BYTES_MIN)),
            ("digest", ratio(size_of::<u64>(), 8)),
            ("inbox at", ratio(size_of::<cellpay_core::InboxAt>(), audit::INBOX_AT_BYTES_MIN)),
            ("outbox at", ratio(size_of::<cellpay_core::OutboxAt>(), audit::OUTBOX_AT_BYTES_MIN)),
            ("outbox figures", ratio(size_of::<cellpay_core::OutboxFigures>(), audit::OUTBOX_FIGURES_BYTES)),
            ("inbox figures", ratio(size_of::<cellpay_core::InboxFigures>(), audit::INBOX_FIGURES_BYTES)),
            ("finding", ratio(size_of::<cellpay_core::Finding>(), audit::FINDING_BYTES_MIN)),
        ];
        for (name, per_byte) in lists {
            assert!(per_byte <= 64, "a list of {name} may reserve {per_byte} bytes per input byte");
        }
    }

    #[test]
    fn a_usize_too_large_for_the_machine_is_refused_not_truncated() {
        let bytes = u64::MAX.to_le_bytes();
        let mut r = Reader::new(&bytes, "test");
        if usize::BITS < 64 {
            assert!(read_usize(&mut r).is_err());
        } else {
            assert_eq!(read_usize(&mut r).unwrap(), usize::MAX);
        }
    }
}
