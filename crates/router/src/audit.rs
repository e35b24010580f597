//! The cluster audit of one ledger: every cell's own figures (I1 within the
//! cell, I4), and the reconciliation of every ordered pair of cells, which is
//! what can fail when money is lost between cells (see `cellpay_core::audit`).
//!
//! The reads go in three rounds, each over all cells at once, and each round
//! starts after the one before has answered: that gives every pair A→B the
//! order the reconciliation needs (A, then B, then A again). A pair that moved
//! too far between the reads to be compared is read again, a few times.

use std::collections::BTreeMap;

use cellpay_cell::{CellClient, EngineError};
use cellpay_core::{
    reconcile_figures_moves, reconcile_pair, CellId, Finding, InboxAt, LedgerFigures, OutboxAt, Query, QueryAnswer,
};
use tokio::task::JoinSet;

use crate::cluster::Cluster;

/// How many times the audit reads again when a pair could not be compared
/// because it moved too far between the reads (I7).
pub const AUDIT_ATTEMPTS_MAX: u32 = 4;

/// The audit of one ledger over the whole cluster.
#[derive(Debug, Clone)]
pub struct AuditReport {
    /// Each cell's kept figures, from the first round.
    pub cells: Vec<(CellId, LedgerFigures)>,
    /// Everything found wrong; empty when the ledger is sound.
    pub findings: Vec<Finding>,
    /// True when every cell also walked its whole state (the admin's full audit).
    pub full: bool,
    /// Rounds of reads it took (more than one when a pair moved too far).
    pub attempts: u32,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    /// Σ over cells of their own terms: zero unless a cell's books disagree.
    pub fn sum(&self) -> i128 {
        self.cells.iter().map(|(_, f)| f.cell_term()).sum()
    }

    /// Σ balances over all accounts of all cells.
    pub fn balances(&self) -> i128 {
        self.cells.iter().map(|(_, f)| f.balance_sum).sum()
    }

    /// Money debited in one cell and not yet settled or compensated.
    pub fn in_flight(&self) -> i128 {
        self.cells.iter().map(|(_, f)| f.open_sum()).sum()
    }

    pub fn negative_accounts(&self) -> u64 {
        self.cells.iter().map(|(_, f)| f.negative_accounts).sum()
    }
}

pub type ClusterAudit = Result<AuditReport, (CellId, EngineError)>;

/// Asks every cell its own query at once; answers in cell order.
async fn ask_all<T: Send + 'static>(
    cells: &[std::sync::Arc<dyn CellClient>],
    query: impl Fn(CellId) -> Query,
    pick: fn(QueryAnswer) -> Option<T>,
) -> Result<Vec<T>, (CellId, EngineError)> {
    let mut tasks = JoinSet::new();
    for (i, cell) in cells.iter().enumerate() {
        let (cell, q) = (cell.clone(), query(cell.cell()));
        tasks.spawn(async move { (i, cell.cell(), cell.query(q).await) });
    }
    let mut out: Vec<Option<T>> = (0..cells.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, cell, answer) = joined.expect("audit tasks do not panic");
        let answer = answer.map_err(|e| (cell, e))?;
        let reason = format!("the audit query answered {answer:?}");
        out[i] = Some(pick(answer).ok_or((cell, EngineError::Unavailable { cell, reason }))?);
    }
    Ok(out.into_iter().map(|a| a.expect("every cell answered")).collect())
}

impl Cluster {
    /// Audits one ledger. `full` also has every cell walk its whole state (at
    /// the lowest priority class) and check its kept figures against it.
    pub async fn audit(&self, shadow: bool, full: bool) -> ClusterAudit {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut report = self.audit_once(shadow, full).await?;
            report.attempts = attempts;
            let transient_only = !report.ok() && report.findings.iter().all(Finding::is_transient);
            if !transient_only || attempts >= AUDIT_ATTEMPTS_MAX {
                return Ok(report);
            }
        }
    }

    async fn audit_once(&self, shadow: bool, full: bool) -> ClusterAudit {
        let cells = self.cells();
        let ids: Vec<CellId> = cells.iter().map(|c| c.cell()).collect();
        // Round 1: each cell's own figures (and its walk, for a full audit).
        let (figures, mut findings): (Vec<LedgerFigures>, Vec<Finding>) = if full {
            let audits = ask_all(
                cells,
                |_| Query::Audit { shadow },
                |a| match a {
                    QueryAnswer::Audit(a) => Some(a),
                    _ => None,
                },
            )
            .await?;
            let findings = audits.iter().flat_map(|a| a.findings.clone()).collect();
            (audits.into_iter().map(|a| a.figures).collect(), findings)
        } else {
            let figures = ask_all(
                cells,
                |_| Query::Figures { shadow },
                |a| match a {
                    QueryAnswer::Figures(f) => Some(f),
                    _ => None,
                },
            )
            .await?;
            let findings = ids.iter().zip(&figures).flat_map(|(cell, f)| f.own_findings(*cell)).collect();
            (figures, findings)
        };
        let by_cell: BTreeMap<CellId, &LedgerFigures> = ids.iter().copied().zip(&figures).collect();
        let others = |me: CellId| ids.iter().copied().filter(move |c| *c != me);
        // Round 2: each destination, at what each source has closed towards it.
        let asked_in = |dest: CellId| {
            others(dest).map(|source| (source, by_cell[&source].outbox_to(dest).closed_through)).collect()
        };
        let inboxes: Vec<Vec<InboxAt>> = ask_all(
            cells,
            |dest| Query::InboxAt { shadow, asked: asked_in(dest) },
            |a| match a {
                QueryAnswer::InboxAt(v) => Some(v),
                _ => None,
            },
        )
        .await?;
        let inbox_of = |dest: CellId, source: CellId| -> InboxAt {
            let i = ids.iter().position(|c| *c == dest).expect("a known cell");
            *inboxes[i].iter().find(|a| a.figures.source == source).expect("asked about every source")
        };
        // Round 3: each source, at what each destination has applied from it.
        let asked_out = |source: CellId| {
            others(source).map(|dest| (dest, inbox_of(dest, source).figures.applied_through)).collect()
        };
        let outboxes: Vec<Vec<OutboxAt>> = ask_all(
            cells,
            |source| Query::OutboxAt { shadow, asked: asked_out(source) },
            |a| match a {
                QueryAnswer::OutboxAt(v) => Some(v),
                _ => None,
            },
        )
        .await?;
        for (i, source) in ids.iter().copied().enumerate() {
            for after in &outboxes[i] {
                let dest = after.figures.dest;
                let before = by_cell[&source].outbox_to(dest);
                findings.extend(reconcile_pair(&before, &inbox_of(dest, source), after));
            }
        }
        // Shard moves, from the first round's figures: what one cell moved out
        // the other moved in (a move read half-done is told apart, see `moves`).
        for &a in &ids {
            for b in others(a) {
                findings.extend(reconcile_figures_moves(a, by_cell[&a], b, by_cell[&b]));
            }
        }
        let cells = ids.into_iter().zip(figures).collect();
        Ok(AuditReport { cells, findings, full, attempts: 1 })
    }
}
