//! The query call's bodies: a query, with the authority it reads for where it
//! has one, and the answer.

use cellpay_core::codec::{DecodeError, Reader, Writer};
use cellpay_core::{CellId, Query, QueryAnswer, TierCursor, TierEntry, TierPage};

use super::submit::{read_authority, write_authority};
use super::{audit, read_cell, read_list, read_opt, read_opt_u64, read_usize, view, write_list, write_opt};
use super::{write_opt_u64, write_usize};
use super::{ANSWER_ENTRIES_MAX, ANSWER_OUTBOX_MESSAGES_MAX, ANSWER_TRANSFERS_MAX, CELLS_MAX, DIGESTS_MAX};

/// The bytes one `(cell, seq)` pair of an `InboxAt`/`OutboxAt` query takes.
pub(super) const ASKED_BYTES: usize = 4 + 8;
const DIGEST_BYTES: usize = 8;

const QUERY_ACCOUNT: u8 = 0;
const QUERY_TRANSFER: u8 = 1;
const QUERY_ENTRIES: u8 = 2;
const QUERY_DIGESTS: u8 = 3;
const QUERY_AUDIT: u8 = 4;
const QUERY_FIGURES: u8 = 5;
const QUERY_INBOX_AT: u8 = 6;
const QUERY_OUTBOX_AT: u8 = 7;
const QUERY_OUTBOX: u8 = 8;
const QUERY_EXPORT_SHARD: u8 = 9;
const QUERY_SHARD_LOAD: u8 = 10;
const QUERY_TIER_PAGE: u8 = 11;
const QUERY_TIER_IMPORT: u8 = 12;

/// The most entries one tier page or import carries (a page the cell
/// answers is smaller: `cellpay_cell::TIER_PAGE_ENTRIES_MAX`).
pub const TIER_ENTRIES_MAX: usize = 1 << 16;
/// Bytes of the smallest tier entry: two lengths, seq and time.
const TIER_ENTRY_BYTES_MIN: usize = 4 + 8 + 8 + 4;
/// The longest key and value a tier entry may carry (the tier's own limits).
const TIER_KEY_BYTES_MAX: usize = 1024;
const TIER_VALUE_BYTES_MAX: usize = 64 << 10;

fn write_tier_entry(w: &mut Writer, e: &TierEntry) {
    w.bytes(&e.key);
    w.u64(e.seq);
    w.u64(e.at_ms);
    w.bytes(&e.value);
}

fn read_tier_entry(r: &mut Reader<'_>) -> Result<TierEntry, DecodeError> {
    let key = r.bytes(TIER_KEY_BYTES_MAX)?.to_vec();
    let seq = r.u64()?;
    let at_ms = r.u64()?;
    let value = r.bytes(TIER_VALUE_BYTES_MAX)?.to_vec();
    Ok(TierEntry { key, seq, at_ms, value })
}

fn write_cursor(w: &mut Writer, c: &TierCursor) {
    w.u32(c.part);
    write_opt(w, c.after_key.as_ref(), |w, k| w.bytes(k));
}

fn read_cursor(r: &mut Reader<'_>) -> Result<TierCursor, DecodeError> {
    Ok(TierCursor { part: r.u32()?, after_key: read_opt(r, |r| Ok(r.bytes(TIER_KEY_BYTES_MAX)?.to_vec()))? })
}

fn write_asked(w: &mut Writer, asked: &[(CellId, u64)]) {
    write_list(w, asked, CELLS_MAX, |w, (cell, seq)| {
        w.u32(cell.0);
        w.u64(*seq);
    });
}

fn read_asked(r: &mut Reader<'_>) -> Result<Vec<(CellId, u64)>, DecodeError> {
    read_list(r, CELLS_MAX, ASKED_BYTES, |r| Ok((read_cell(r)?, r.u64()?)))
}

pub(super) fn write_query(w: &mut Writer, query: &Query) {
    match query {
        Query::Account { shadow, id, by } => {
            w.u8(QUERY_ACCOUNT);
            w.bool(*shadow);
            w.id(id.as_str());
            write_authority(w, by);
        }
        Query::Transfer { shadow, id, from, by } => {
            w.u8(QUERY_TRANSFER);
            w.bool(*shadow);
            w.id(id.as_str());
            write_opt(w, from.as_ref(), |w, from| w.id(from.as_str()));
            write_authority(w, by);
        }
        Query::Entries { shadow, account, limit, before, by } => {
            w.u8(QUERY_ENTRIES);
            w.bool(*shadow);
            w.id(account.as_str());
            write_usize(w, *limit);
            write_opt_u64(w, *before);
            write_authority(w, by);
        }
        Query::Digests { shadow } => {
            w.u8(QUERY_DIGESTS);
            w.bool(*shadow);
        }
        Query::Audit { shadow } => {
            w.u8(QUERY_AUDIT);
            w.bool(*shadow);
        }
        Query::Figures { shadow } => {
            w.u8(QUERY_FIGURES);
            w.bool(*shadow);
        }
        Query::InboxAt { shadow, asked } => {
            w.u8(QUERY_INBOX_AT);
            w.bool(*shadow);
            write_asked(w, asked);
        }
        Query::OutboxAt { shadow, asked } => {
            w.u8(QUERY_OUTBOX_AT);
            w.bool(*shadow);
            write_asked(w, asked);
        }
        Query::Outbox { shadow, dest, after_seq, limit } => {
            w.u8(QUERY_OUTBOX);
            w.bool(*shadow);
            w.u32(dest.0);
            w.u64(*after_seq);
            write_usize(w, *limit);
        }
        Query::ExportShard { shard, older_after } => {
            w.u8(QUERY_EXPORT_SHARD);
            w.bool(false);
            w.u32(*shard);
            if super::body_version() >= 2 {
                w.u64(*older_after);
            }
        }
        Query::TierPage { shard, snapshot, seq_after, cursor } => {
            w.u8(QUERY_TIER_PAGE);
            w.bool(false);
            w.u32(*shard);
            w.u64(*snapshot);
            w.u64(*seq_after);
            write_cursor(w, cursor);
        }
        Query::TierImport { shard, move_id, part, keys_max, entries, first, last } => {
            w.u8(QUERY_TIER_IMPORT);
            w.bool(false);
            w.u32(*shard);
            w.u64(*move_id);
            w.u32(*part);
            w.u64(*keys_max);
            write_list(w, entries, TIER_ENTRIES_MAX, write_tier_entry);
            w.bool(*first);
            w.bool(*last);
        }
        Query::ShardLoad => {
            w.u8(QUERY_SHARD_LOAD);
            w.bool(false);
        }
    }
}

/// A page size asked for: no more than the answer's list may carry, so a
/// query is refused up front rather than answered with a body the asker refuses.
fn read_limit(r: &mut Reader<'_>, max: usize) -> Result<usize, DecodeError> {
    let limit = read_usize(r)?;
    if limit > max {
        return Err(r.error(format!("a page of {limit} exceeds the answer's limit {max}")));
    }
    Ok(limit)
}

pub(super) fn read_query(r: &mut Reader<'_>) -> Result<Query, DecodeError> {
    let tag = r.u8()?;
    let shadow = r.bool()?;
    Ok(match tag {
        QUERY_ACCOUNT => Query::Account { shadow, id: r.account_id()?, by: read_authority(r)? },
        QUERY_TRANSFER => Query::Transfer {
            shadow,
            id: r.transfer_id()?,
            from: read_opt(r, |r| r.account_id())?,
            by: read_authority(r)?,
        },
        QUERY_ENTRIES => Query::Entries {
            shadow,
            account: r.account_id()?,
            limit: read_limit(r, ANSWER_ENTRIES_MAX)?,
            before: read_opt_u64(r)?,
            by: read_authority(r)?,
        },
        QUERY_DIGESTS => Query::Digests { shadow },
        QUERY_AUDIT => Query::Audit { shadow },
        QUERY_FIGURES => Query::Figures { shadow },
        QUERY_INBOX_AT => Query::InboxAt { shadow, asked: read_asked(r)? },
        QUERY_OUTBOX_AT => Query::OutboxAt { shadow, asked: read_asked(r)? },
        QUERY_OUTBOX => Query::Outbox {
            shadow,
            dest: read_cell(r)?,
            after_seq: r.u64()?,
            limit: read_limit(r, ANSWER_OUTBOX_MESSAGES_MAX)?,
        },
        QUERY_EXPORT_SHARD => {
            Query::ExportShard { shard: r.u32()?, older_after: if super::body_version() >= 2 { r.u64()? } else { 0 } }
        }
        QUERY_TIER_PAGE => {
            Query::TierPage { shard: r.u32()?, snapshot: r.u64()?, seq_after: r.u64()?, cursor: read_cursor(r)? }
        }
        QUERY_TIER_IMPORT => Query::TierImport {
            shard: r.u32()?,
            move_id: r.u64()?,
            part: r.u32()?,
            keys_max: r.u64()?,
            entries: read_list(r, TIER_ENTRIES_MAX, TIER_ENTRY_BYTES_MIN, read_tier_entry)?,
            first: r.bool()?,
            last: r.bool()?,
        },
        QUERY_SHARD_LOAD => Query::ShardLoad,
        other => return Err(r.error(format!("unknown query tag {other}"))),
    })
}

const ANSWER_ACCOUNT: u8 = 0;
const ANSWER_TRANSFERS: u8 = 1;
const ANSWER_ENTRIES: u8 = 2;
const ANSWER_DIGESTS: u8 = 3;
const ANSWER_AUDIT: u8 = 4;
const ANSWER_FIGURES: u8 = 5;
const ANSWER_INBOX_AT: u8 = 6;
const ANSWER_OUTBOX_AT: u8 = 7;
const ANSWER_OUTBOX: u8 = 8;
const ANSWER_REJECTED: u8 = 9;
const ANSWER_SHARD_EXPORT: u8 = 10;
/// The audit and the figures of a ledger that took part in shard moves: the
/// version 1 bodies, followed by the moves (only then, so a cluster that
/// never moved a shard writes version 1 bodies byte for byte).
const ANSWER_AUDIT_MOVES: u8 = 11;
const ANSWER_FIGURES_MOVES: u8 = 12;
const ANSWER_SHARD_LOAD: u8 = 13;
const ANSWER_TIER_PAGE: u8 = 14;
const ANSWER_TIER_IMPORTED: u8 = 15;

pub(super) fn write_answer(w: &mut Writer, answer: &QueryAnswer) {
    match answer {
        QueryAnswer::Account(account) => {
            w.u8(ANSWER_ACCOUNT);
            view::write_account(w, account);
        }
        QueryAnswer::Transfers(transfers) => {
            w.u8(ANSWER_TRANSFERS);
            write_list(w, transfers, ANSWER_TRANSFERS_MAX, view::write_transfer);
        }
        QueryAnswer::Entries(entries) => {
            w.u8(ANSWER_ENTRIES);
            write_list(w, entries, ANSWER_ENTRIES_MAX, view::write_entry);
        }
        QueryAnswer::Digests { epoch, digests } => {
            w.u8(ANSWER_DIGESTS);
            w.u64(*epoch);
            write_list(w, digests, DIGESTS_MAX, |w, d| w.u64(*d));
        }
        QueryAnswer::Audit(audit) => {
            let moves = audit::has_moves(&audit.figures);
            w.u8(if moves { ANSWER_AUDIT_MOVES } else { ANSWER_AUDIT });
            audit::write_audit(w, audit, moves);
        }
        QueryAnswer::Figures(figures) => {
            let moves = audit::has_moves(figures);
            w.u8(if moves { ANSWER_FIGURES_MOVES } else { ANSWER_FIGURES });
            audit::write_figures(w, figures, moves);
        }
        QueryAnswer::InboxAt(at) => {
            w.u8(ANSWER_INBOX_AT);
            write_list(w, at, CELLS_MAX, audit::write_inbox_at);
        }
        QueryAnswer::OutboxAt(at) => {
            w.u8(ANSWER_OUTBOX_AT);
            write_list(w, at, CELLS_MAX, audit::write_outbox_at);
        }
        QueryAnswer::Outbox(messages) => {
            w.u8(ANSWER_OUTBOX);
            write_list(w, messages, ANSWER_OUTBOX_MESSAGES_MAX, view::write_outbox_message);
        }
        QueryAnswer::Rejected(rejection) => {
            w.u8(ANSWER_REJECTED);
            view::write_rejection(w, rejection);
        }
        QueryAnswer::ShardExport(export) => {
            w.u8(ANSWER_SHARD_EXPORT);
            cellpay_core::moves::encode_export(w, export);
        }
        QueryAnswer::ShardLoad(load) => {
            w.u8(ANSWER_SHARD_LOAD);
            write_list(w, load, DIGESTS_MAX, |w, n| w.u64(*n));
        }
        QueryAnswer::TierPage(page) => {
            w.u8(ANSWER_TIER_PAGE);
            w.u64(page.snapshot);
            w.u64(page.through_seq);
            w.u32(page.part);
            w.u64(page.keys_max);
            write_list(w, &page.entries, TIER_ENTRIES_MAX, write_tier_entry);
            w.bool(page.last);
            write_opt(w, page.next.as_ref(), write_cursor);
        }
        QueryAnswer::TierImported { entries } => {
            w.u8(ANSWER_TIER_IMPORTED);
            w.u64(*entries);
        }
    }
}

pub(super) fn read_answer(r: &mut Reader<'_>) -> Result<QueryAnswer, DecodeError> {
    Ok(match r.u8()? {
        ANSWER_ACCOUNT => QueryAnswer::Account(view::read_account(r)?),
        ANSWER_TRANSFERS => QueryAnswer::Transfers(read_list(
            r,
            ANSWER_TRANSFERS_MAX,
            view::TRANSFER_VIEW_BYTES_MIN,
            view::read_transfer,
        )?),
        ANSWER_ENTRIES => {
            QueryAnswer::Entries(read_list(r, ANSWER_ENTRIES_MAX, view::ENTRY_VIEW_BYTES_MIN, view::read_entry)?)
        }
        ANSWER_DIGESTS => {
            let epoch = r.u64()?;
            QueryAnswer::Digests { epoch, digests: read_list(r, DIGESTS_MAX, DIGEST_BYTES, |r| r.u64())? }
        }
        ANSWER_AUDIT => QueryAnswer::Audit(audit::read_audit(r, false)?),
        ANSWER_FIGURES => QueryAnswer::Figures(audit::read_figures(r, false)?),
        ANSWER_AUDIT_MOVES => QueryAnswer::Audit(audit::read_audit(r, true)?),
        ANSWER_FIGURES_MOVES => QueryAnswer::Figures(audit::read_figures(r, true)?),
        ANSWER_INBOX_AT => {
            QueryAnswer::InboxAt(read_list(r, CELLS_MAX, audit::INBOX_AT_BYTES_MIN, audit::read_inbox_at)?)
        }
        ANSWER_OUTBOX_AT => {
            QueryAnswer::OutboxAt(read_list(r, CELLS_MAX, audit::OUTBOX_AT_BYTES_MIN, audit::read_outbox_at)?)
        }
        ANSWER_OUTBOX => QueryAnswer::Outbox(read_list(
            r,
            ANSWER_OUTBOX_MESSAGES_MAX,
            view::OUTBOX_MESSAGE_BYTES_MIN,
            view::read_outbox_message,
        )?),
        ANSWER_REJECTED => QueryAnswer::Rejected(view::read_rejection(r)?),
        ANSWER_SHARD_EXPORT => QueryAnswer::ShardExport(Box::new(cellpay_core::moves::decode_export(r)?)),
        ANSWER_SHARD_LOAD => QueryAnswer::ShardLoad(read_list(r, DIGESTS_MAX, DIGEST_BYTES, |r| r.u64())?),
        ANSWER_TIER_PAGE => QueryAnswer::TierPage(Box::new(TierPage {
            snapshot: r.u64()?,
            through_seq: r.u64()?,
            part: r.u32()?,
            keys_max: r.u64()?,
            entries: read_list(r, TIER_ENTRIES_MAX, TIER_ENTRY_BYTES_MIN, read_tier_entry)?,
            last: r.bool()?,
            next: read_opt(r, read_cursor)?,
        })),
        ANSWER_TIER_IMPORTED => QueryAnswer::TierImported { entries: r.u64()? },
        other => return Err(r.error(format!("unknown answer tag {other}"))),
    })
}
