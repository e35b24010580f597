//! The audit's figures and findings: what the `Audit`, `Figures`, `InboxAt`
//! and `OutboxAt` answers carry, and (both ledgers' figures) the status.

use cellpay_core::codec::{DecodeError, Reader, Writer};
use cellpay_core::{
    Finding, InboxAt, InboxFigures, InboxPrefix, LedgerAudit, LedgerFigures, OutboxAt, OutboxFigures, SentPrefix,
};

use super::{read_cell, read_list, read_opt, write_list, write_opt, AUDIT_FINDINGS_MAX, CELLS_MAX};

/// The names `Ledger::audit` (crates/core/src/ledger.rs) gives the figures a
/// walk over the state checks: a decoded `Finding::Walk` names one of these.
pub const WALK_FIGURES: [&str; 5] = [
    "balance_sum",
    "negative_accounts",
    "outbox open sum",
    "outbox open messages",
    "outbox entries outside the open range",
];
/// What a decoded `Finding::Walk` names when the cell named a figure this
/// build does not know (see the module doc of `codec`): the finding is kept.
pub const WALK_FIGURE_UNKNOWN: &str = "unknown";

/// The bytes outbox figures take: dest, then four sequences or digests and three sums.
pub(super) const OUTBOX_FIGURES_BYTES: usize = 4 + 4 * 8 + 3 * 16;
/// The bytes inbox figures take: source, then three sequences or digests and two sums.
pub(super) const INBOX_FIGURES_BYTES: usize = 4 + 3 * 8 + 2 * 16;
/// The fewest bytes an `InboxAt` takes: its figures and an absent prefix.
pub(super) const INBOX_AT_BYTES_MIN: usize = INBOX_FIGURES_BYTES + 1;
/// The fewest bytes an `OutboxAt` takes: its figures and an absent prefix.
pub(super) const OUTBOX_AT_BYTES_MIN: usize = OUTBOX_FIGURES_BYTES + 1;
/// The fewest bytes a finding takes: a tag, a cell and a count (`Negative`).
pub(super) const FINDING_BYTES_MIN: usize = 1 + 4 + 8;

fn write_outbox_figures(w: &mut Writer, f: &OutboxFigures) {
    w.u32(f.dest.0);
    w.u64(f.last_seq);
    w.i128(f.sent);
    w.u64(f.closed_through);
    w.i128(f.settled);
    w.i128(f.compensated);
    w.u64(f.closed_chain);
    w.u64(f.sent_chain);
}

fn read_outbox_figures(r: &mut Reader<'_>) -> Result<OutboxFigures, DecodeError> {
    Ok(OutboxFigures {
        dest: read_cell(r)?,
        last_seq: r.u64()?,
        sent: r.i128()?,
        closed_through: r.u64()?,
        settled: r.i128()?,
        compensated: r.i128()?,
        closed_chain: r.u64()?,
        sent_chain: r.u64()?,
    })
}

fn write_inbox_figures(w: &mut Writer, f: &InboxFigures) {
    w.u32(f.source.0);
    w.u64(f.applied_through);
    w.i128(f.received);
    w.i128(f.refused);
    w.u64(f.chain);
    w.u64(f.message_chain);
}

fn read_inbox_figures(r: &mut Reader<'_>) -> Result<InboxFigures, DecodeError> {
    Ok(InboxFigures {
        source: read_cell(r)?,
        applied_through: r.u64()?,
        received: r.i128()?,
        refused: r.i128()?,
        chain: r.u64()?,
        message_chain: r.u64()?,
    })
}

pub(super) fn write_inbox_at(w: &mut Writer, at: &InboxAt) {
    write_inbox_figures(w, &at.figures);
    write_opt(w, at.prefix.as_ref(), |w, p| {
        w.u64(p.seq);
        w.i128(p.received);
        w.i128(p.refused);
        w.u64(p.chain);
    });
}

pub(super) fn read_inbox_at(r: &mut Reader<'_>) -> Result<InboxAt, DecodeError> {
    let figures = read_inbox_figures(r)?;
    let prefix =
        read_opt(r, |r| Ok(InboxPrefix { seq: r.u64()?, received: r.i128()?, refused: r.i128()?, chain: r.u64()? }))?;
    Ok(InboxAt { figures, prefix })
}

pub(super) fn write_outbox_at(w: &mut Writer, at: &OutboxAt) {
    write_outbox_figures(w, &at.figures);
    write_opt(w, at.prefix.as_ref(), |w, p| {
        w.u64(p.seq);
        w.i128(p.sent);
        w.u64(p.chain);
    });
}

pub(super) fn read_outbox_at(r: &mut Reader<'_>) -> Result<OutboxAt, DecodeError> {
    let figures = read_outbox_figures(r)?;
    let prefix = read_opt(r, |r| Ok(SentPrefix { seq: r.u64()?, sent: r.i128()?, chain: r.u64()? }))?;
    Ok(OutboxAt { figures, prefix })
}

/// Whether figures carry shard moves: version 1 bodies do not (a status
/// never does; an answer does under its own tag, only when there are any).
pub(super) fn has_moves(f: &LedgerFigures) -> bool {
    !f.moves.is_empty() || !f.frozen.is_empty() || !f.arrived.is_empty()
}

pub(super) fn write_figures(w: &mut Writer, f: &LedgerFigures, with_moves: bool) {
    w.u64(f.accounts);
    w.i128(f.balance_sum);
    w.u64(f.negative_accounts);
    write_list(w, &f.outbox, CELLS_MAX, write_outbox_figures);
    write_list(w, &f.inbox, CELLS_MAX, write_inbox_figures);
    if with_moves {
        write_list(w, &f.moves, CELLS_MAX, cellpay_core::moves::encode_move_figures);
        write_list(w, &f.frozen, cellpay_core::FROZEN_SHARDS_MAX, cellpay_core::moves::encode_move_record);
        write_list(w, &f.arrived, CELLS_MAX, cellpay_core::moves::encode_move_record);
    }
}

pub(super) fn read_figures(r: &mut Reader<'_>, with_moves: bool) -> Result<LedgerFigures, DecodeError> {
    let mut f = LedgerFigures {
        accounts: r.u64()?,
        balance_sum: r.i128()?,
        negative_accounts: r.u64()?,
        outbox: read_list(r, CELLS_MAX, OUTBOX_FIGURES_BYTES, read_outbox_figures)?,
        inbox: read_list(r, CELLS_MAX, INBOX_FIGURES_BYTES, read_inbox_figures)?,
        moves: Vec::new(),
        frozen: Vec::new(),
        arrived: Vec::new(),
    };
    if with_moves {
        f.moves = read_list(r, CELLS_MAX, MOVE_FIGURES_BYTES, cellpay_core::moves::decode_move_figures)?;
        f.frozen =
            read_list(r, cellpay_core::FROZEN_SHARDS_MAX, MOVE_RECORD_BYTES, cellpay_core::moves::decode_move_record)?;
        f.arrived = read_list(r, CELLS_MAX, MOVE_RECORD_BYTES, cellpay_core::moves::decode_move_record)?;
    }
    Ok(f)
}

pub(super) fn write_audit(w: &mut Writer, audit: &LedgerAudit, with_moves: bool) {
    write_figures(w, &audit.figures, with_moves);
    write_list(w, &audit.findings, AUDIT_FINDINGS_MAX, write_finding);
}

pub(super) fn read_audit(r: &mut Reader<'_>, with_moves: bool) -> Result<LedgerAudit, DecodeError> {
    Ok(LedgerAudit {
        figures: read_figures(r, with_moves)?,
        findings: read_list(r, AUDIT_FINDINGS_MAX, FINDING_BYTES_MIN, read_finding)?,
    })
}

/// The known figure name equal to `name`, else [`WALK_FIGURE_UNKNOWN`].
fn walk_figure(name: &str) -> &'static str {
    WALK_FIGURES.into_iter().find(|known| *known == name).unwrap_or(WALK_FIGURE_UNKNOWN)
}

const FINDING_CELL_TERM: u8 = 0;
const FINDING_WALK: u8 = 1;
const FINDING_NEGATIVE: u8 = 2;
const FINDING_LOST: u8 = 3;
const FINDING_UNSENT: u8 = 4;
const FINDING_DIVERGED: u8 = 5;
const FINDING_UNVERIFIED: u8 = 6;
const FINDING_MOVE_LOST: u8 = 7;
const FINDING_MOVE_DIVERGED: u8 = 8;
/// A move's per-peer figures and a move record, encoded.
const MOVE_FIGURES_BYTES: usize = 4 + 8 + 16 + 8 + 8 + 16 + 8;
const MOVE_RECORD_BYTES: usize = 8 + 4 + 4 + 4 + 8 + 16 + 8;

fn write_finding(w: &mut Writer, finding: &Finding) {
    match finding {
        Finding::CellTerm { cell, term } => {
            w.u8(FINDING_CELL_TERM);
            w.u32(cell.0);
            w.i128(*term);
        }
        Finding::Walk { cell, figure, kept, walked } => {
            w.u8(FINDING_WALK);
            w.u32(cell.0);
            w.str(figure);
            w.i128(*kept);
            w.i128(*walked);
        }
        Finding::Negative { cell, accounts } => {
            w.u8(FINDING_NEGATIVE);
            w.u32(cell.0);
            w.u64(*accounts);
        }
        Finding::Lost { source, dest, first_seq, last_seq, amount }
        | Finding::Unsent { source, dest, first_seq, last_seq, amount } => {
            w.u8(if matches!(finding, Finding::Lost { .. }) { FINDING_LOST } else { FINDING_UNSENT });
            w.u32(source.0);
            w.u32(dest.0);
            w.u64(*first_seq);
            w.u64(*last_seq);
            w.i128(*amount);
        }
        Finding::Diverged { source, dest, through, detail } => {
            w.u8(FINDING_DIVERGED);
            w.u32(source.0);
            w.u32(dest.0);
            w.u64(*through);
            w.str(detail);
        }
        Finding::Unverified { source, dest, seq, applied_through } => {
            w.u8(FINDING_UNVERIFIED);
            w.u32(source.0);
            w.u32(dest.0);
            w.u64(*seq);
            w.u64(*applied_through);
        }
        Finding::MoveLost { source, dest, moves, amount } => {
            w.u8(FINDING_MOVE_LOST);
            w.u32(source.0);
            w.u32(dest.0);
            w.u64(*moves);
            w.i128(*amount);
        }
        Finding::MoveDiverged { source, dest, detail, transient } => {
            w.u8(FINDING_MOVE_DIVERGED);
            w.u32(source.0);
            w.u32(dest.0);
            w.str(detail);
            w.bool(*transient);
        }
    }
}

fn read_finding(r: &mut Reader<'_>) -> Result<Finding, DecodeError> {
    Ok(match r.u8()? {
        FINDING_CELL_TERM => Finding::CellTerm { cell: read_cell(r)?, term: r.i128()? },
        FINDING_WALK => {
            Finding::Walk { cell: read_cell(r)?, figure: walk_figure(r.str()?), kept: r.i128()?, walked: r.i128()? }
        }
        FINDING_NEGATIVE => Finding::Negative { cell: read_cell(r)?, accounts: r.u64()? },
        FINDING_LOST => Finding::Lost {
            source: read_cell(r)?,
            dest: read_cell(r)?,
            first_seq: r.u64()?,
            last_seq: r.u64()?,
            amount: r.i128()?,
        },
        FINDING_UNSENT => Finding::Unsent {
            source: read_cell(r)?,
            dest: read_cell(r)?,
            first_seq: r.u64()?,
            last_seq: r.u64()?,
            amount: r.i128()?,
        },
        FINDING_DIVERGED => Finding::Diverged {
            source: read_cell(r)?,
            dest: read_cell(r)?,
            through: r.u64()?,
            detail: r.str()?.to_owned(),
        },
        FINDING_UNVERIFIED => {
            Finding::Unverified { source: read_cell(r)?, dest: read_cell(r)?, seq: r.u64()?, applied_through: r.u64()? }
        }
        FINDING_MOVE_LOST => {
            Finding::MoveLost { source: read_cell(r)?, dest: read_cell(r)?, moves: r.u64()?, amount: r.i128()? }
        }
        FINDING_MOVE_DIVERGED => Finding::MoveDiverged {
            source: read_cell(r)?,
            dest: read_cell(r)?,
            detail: r.str()?.to_owned(),
            transient: r.bool()?,
        },
        other => return Err(r.error(format!("unknown finding tag {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellpay_core::CellId;

    #[test]
    fn the_minimum_sizes_are_those_of_the_smallest_values() {
        let mut w = Writer::default();
        write_inbox_at(&mut w, &InboxAt { figures: InboxFigures::new(CellId(1)), prefix: None });
        assert_eq!(w.buf.len(), INBOX_AT_BYTES_MIN);
        let mut w = Writer::default();
        write_outbox_at(&mut w, &OutboxAt { figures: OutboxFigures::new(CellId(1)), prefix: None });
        assert_eq!(w.buf.len(), OUTBOX_AT_BYTES_MIN);
        let mut w = Writer::default();
        write_finding(&mut w, &Finding::Negative { cell: CellId(1), accounts: 1 });
        assert_eq!(w.buf.len(), FINDING_BYTES_MIN);
    }

    #[test]
    fn a_walk_figure_is_known_or_unknown() {
        for name in WALK_FIGURES {
            assert_eq!(walk_figure(name), name);
        }
        assert_eq!(walk_figure("balance_sum "), WALK_FIGURE_UNKNOWN);
        assert_eq!(walk_figure(WALK_FIGURE_UNKNOWN), WALK_FIGURE_UNKNOWN);
    }
}
