//! The status call's body: a cell's status (with its health), both ledgers'
//! figures with their idempotency reach, the disk tier's figures, and the
//! outbox generation.

use std::sync::Arc;

use cellpay_cell::{CellFigures, CellStatus, Health, TierFigures};
use cellpay_core::codec::{DecodeError, Reader, Writer};
use cellpay_core::IdempotencyReach;

use super::StatusReport;
use super::{audit, read_cell, read_opt, read_opt_u64, read_usize, write_opt, write_opt_u64, write_usize};

pub(super) fn write_report(w: &mut Writer, report: &StatusReport) {
    write_cell_status(w, &report.status);
    write_cell_figures(w, &report.figures);
    w.u64(report.outbox_generation);
}

pub(super) fn read_report(r: &mut Reader<'_>) -> Result<StatusReport, DecodeError> {
    Ok(StatusReport { status: read_cell_status(r)?, figures: read_cell_figures(r)?, outbox_generation: r.u64()? })
}

fn write_cell_status(w: &mut Writer, s: &CellStatus) {
    w.u32(s.cell.0);
    w.u64(s.epoch);
    write_usize(w, s.queue_depth);
    w.u64(s.queue_delay_us);
    write_health(w, &s.health);
}

fn read_cell_status(r: &mut Reader<'_>) -> Result<CellStatus, DecodeError> {
    Ok(CellStatus {
        cell: read_cell(r)?,
        epoch: r.u64()?,
        queue_depth: read_usize(r)?,
        queue_delay_us: r.u64()?,
        health: read_health(r)?,
    })
}

const HEALTH_SERVING: u8 = 0;
const HEALTH_STALLED: u8 = 1;
const HEALTH_FAILED: u8 = 2;

fn write_health(w: &mut Writer, health: &Health) {
    match health {
        Health::Serving => w.u8(HEALTH_SERVING),
        Health::Stalled { busy_ms, stall_after_ms } => {
            w.u8(HEALTH_STALLED);
            w.u64(*busy_ms);
            w.u64(*stall_after_ms);
        }
        Health::Failed { reason } => {
            w.u8(HEALTH_FAILED);
            w.str(reason);
        }
    }
}

fn read_health(r: &mut Reader<'_>) -> Result<Health, DecodeError> {
    Ok(match r.u8()? {
        HEALTH_SERVING => Health::Serving,
        HEALTH_STALLED => Health::Stalled { busy_ms: r.u64()?, stall_after_ms: r.u64()? },
        HEALTH_FAILED => Health::Failed { reason: Arc::from(r.str()?) },
        other => return Err(r.error(format!("unknown health tag {other}"))),
    })
}

fn write_cell_figures(w: &mut Writer, f: &CellFigures) {
    audit::write_figures(w, &f.real, false);
    audit::write_figures(w, &f.shadow, false);
    w.u64(f.clock_ms);
    write_reach(w, &f.reach_real);
    write_reach(w, &f.reach_shadow);
    w.u64(f.window_promised_ms);
    write_opt(w, f.tier.as_ref(), write_tier);
}

fn read_cell_figures(r: &mut Reader<'_>) -> Result<CellFigures, DecodeError> {
    Ok(CellFigures {
        real: audit::read_figures(r, false)?,
        shadow: audit::read_figures(r, false)?,
        clock_ms: r.u64()?,
        reach_real: read_reach(r)?,
        reach_shadow: read_reach(r)?,
        window_promised_ms: r.u64()?,
        tier: read_opt(r, read_tier)?,
    })
}

fn write_reach(w: &mut Writer, reach: &IdempotencyReach) {
    w.u64(reach.records_held);
    w.u64(reach.records_dropped);
    write_opt_u64(w, reach.oldest_at_ms);
}

fn read_reach(r: &mut Reader<'_>) -> Result<IdempotencyReach, DecodeError> {
    Ok(IdempotencyReach { records_held: r.u64()?, records_dropped: r.u64()?, oldest_at_ms: read_opt_u64(r)? })
}

fn write_tier(w: &mut Writer, t: &TierFigures) {
    w.u64(t.runs);
    w.u64(t.entries);
    w.u64(t.bytes);
    w.u64(t.memory_bytes);
    write_opt_u64(w, t.oldest_at_ms);
    write_opt_u64(w, t.bound_floor_at_ms);
    w.u64(t.disk_reads);
    w.u64(t.disk_hits);
    w.u64(t.disk_read_ns);
    if super::body_version() >= 2 {
        w.u64(t.imported_runs);
    }
}

fn read_tier(r: &mut Reader<'_>) -> Result<TierFigures, DecodeError> {
    Ok(TierFigures {
        runs: r.u64()?,
        entries: r.u64()?,
        bytes: r.u64()?,
        memory_bytes: r.u64()?,
        oldest_at_ms: read_opt_u64(r)?,
        bound_floor_at_ms: read_opt_u64(r)?,
        disk_reads: r.u64()?,
        disk_hits: r.u64()?,
        disk_read_ns: r.u64()?,
        imported_runs: if super::body_version() >= 2 { r.u64()? } else { 0 },
    })
}
