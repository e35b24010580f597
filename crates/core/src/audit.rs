//! The audit: the figures each ledger keeps as it goes, and the reconciliation
//! of every ordered pair of cells, which is the part that can fail.
//!
//! A cell's own figures (Σ balances, what it sent, compensated and received)
//! balance by construction: every change updates both sides of the identity.
//! Summing them over cells therefore proves nothing about money *between*
//! cells: a payee cell restored from an old backup still balances on its own.
//! What can fail is comparing two cells' books about the same stream. Every
//! credit cell A sends to cell B has a sequence number; A folds each message
//! and its outcome into a chain digest as it closes it (in sequence order),
//! and B folds the same message and its outcome (applied or refused) into its
//! own chain as it applies it (in sequence order). Both also keep sums.
//!
//! The read order makes the comparison exact at any moment, with no tolerance:
//! 1. read A: it has closed every sequence up to `c`;
//! 2. read B: it has applied every sequence up to `b`, and tells its chain
//!    and sums at `c` (from a bounded tail it keeps);
//! 3. read A again: it has sent every sequence up to `a`.
//!
//! A closes a sequence only after B applied it, and B applies a sequence only
//! after A sent it, so in a sound cluster `c ≤ b ≤ a` whatever happens
//! between the reads. `c > b` means B lost credits that A counts as delivered
//! (lost money); `b > a` means B applied credits A never sent (A lost its
//! record of them, and will reuse their sequence numbers); different chains or
//! sums at `c` mean the two books disagree about what moved. Each finding
//! names the pair, the sequences and the amount.

use std::borrow::Borrow;
use std::fmt;

use crate::ids::CellId;
use crate::state::CellState;

/// How many of the latest applied sequences a payee cell remembers per source
/// (digest, amount, outcome, chain): enough to recognise a redelivery of
/// anything a relay round may resend, and to answer the audit about any
/// sequence the source may still be closing. The relay's round must stay
/// well below this (I7).
pub const INBOX_TAIL_RETAINED: usize = 8192;

/// One direction of a cell pair, as the sending cell counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxFigures {
    pub dest: CellId,
    /// Sequences given out so far: 1..=last_seq.
    pub last_seq: u64,
    /// Σ amounts of sequences 1..=last_seq.
    pub sent: i128,
    /// Every sequence up to here is closed (settled or compensated); closing goes in order.
    pub closed_through: u64,
    /// Σ amounts of the closed sequences the payee applied.
    pub settled: i128,
    /// Σ amounts of the closed sequences the payee refused (credited back to the payer).
    pub compensated: i128,
    /// The chain digest over (message, outcome) of sequences 1..=closed_through.
    pub closed_chain: u64,
    /// The chain digest over the messages of sequences 1..=last_seq.
    pub sent_chain: u64,
}

impl OutboxFigures {
    pub fn new(dest: CellId) -> Self {
        Self { dest, ..Self::default() }
    }

    /// Messages sent and not yet closed: the relay's backlog.
    pub fn open_messages(&self) -> u64 {
        self.last_seq - self.closed_through
    }

    /// Money debited here and not yet settled or compensated.
    pub fn open_sum(&self) -> i128 {
        self.sent - self.settled - self.compensated
    }
}

/// One direction of a cell pair, as the receiving cell counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxFigures {
    pub source: CellId,
    /// Every sequence up to here is applied or refused, in order.
    pub applied_through: u64,
    /// Σ amounts credited to payees.
    pub received: i128,
    /// Σ amounts refused for good (the source compensates them).
    pub refused: i128,
    /// The chain digest over (message, outcome) of sequences 1..=applied_through.
    pub chain: u64,
    /// The chain digest over the messages alone of sequences 1..=applied_through.
    pub message_chain: u64,
}

impl InboxFigures {
    pub fn new(source: CellId) -> Self {
        Self { source, ..Self::default() }
    }
}

/// What a receiving cell counts over sequences 1..=seq of one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxPrefix {
    pub seq: u64,
    pub received: i128,
    pub refused: i128,
    pub chain: u64,
}

/// A receiving cell's answer about one source: its figures now, and its
/// prefix at the sequence asked, when it still remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxAt {
    pub figures: InboxFigures,
    /// `None` when the sequence asked is beyond `applied_through` or older than the tail kept.
    pub prefix: Option<InboxPrefix>,
}

/// What a sending cell sent over sequences 1..=seq to one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentPrefix {
    pub seq: u64,
    pub sent: i128,
    /// The chain digest over the messages of sequences 1..=seq.
    pub chain: u64,
}

/// A sending cell's answer about one destination: its figures now, and what
/// it sent through the sequence asked while that sequence is still open (or
/// the last one sent); `None` once it closed, which the next audit checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxAt {
    pub figures: OutboxFigures,
    pub prefix: Option<SentPrefix>,
}

/// A ledger's audit figures, kept incrementally: reading them costs
/// O(cells), never a walk over accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerFigures {
    pub accounts: u64,
    pub balance_sum: i128,
    /// Accounts without overdraft whose balance is negative: must be zero (I4).
    pub negative_accounts: u64,
    /// Per destination cell, in cell order.
    pub outbox: Vec<OutboxFigures>,
    /// Per source cell, in cell order.
    pub inbox: Vec<InboxFigures>,
    /// Shards moved in and out, per peer cell, in cell order.
    pub moves: Vec<crate::moves::MoveFigures>,
    /// The shards this cell holds frozen for a move, as their move records
    /// would read now (empty outside a move).
    pub frozen: Vec<crate::moves::MoveRecord>,
    /// The shards installed here for a move that no map has decided yet, as
    /// their move-in records read (empty outside a move).
    pub arrived: Vec<crate::moves::MoveRecord>,
}

impl LedgerFigures {
    /// Σ balances + Σ (sent − compensated) − Σ received + Σ moved out −
    /// Σ moved in: zero in every sound cell, since every change moves both
    /// sides. A non-zero term means the cell's own books disagree.
    pub fn cell_term(&self) -> i128 {
        let out: i128 = self.outbox.iter().map(|o| o.sent - o.compensated).sum();
        let inn: i128 = self.inbox.iter().map(|i| i.received).sum();
        let moved: i128 = self.moves.iter().map(|m| m.out_net - m.in_net).sum();
        self.balance_sum + out - inn + moved
    }

    /// The move figures with `peer` (zero if no shard ever moved between them).
    pub fn moves_with(&self, peer: CellId) -> crate::moves::MoveFigures {
        self.moves.iter().find(|m| m.peer == peer).copied().unwrap_or(crate::moves::MoveFigures::new(peer))
    }

    /// What the kept figures alone show wrong in cell `cell`: its own terms
    /// off, or accounts without overdraft below zero.
    pub fn own_findings(&self, cell: CellId) -> Vec<Finding> {
        let mut findings = Vec::new();
        if self.cell_term() != 0 {
            findings.push(Finding::CellTerm { cell, term: self.cell_term() });
        }
        if self.negative_accounts > 0 {
            findings.push(Finding::Negative { cell, accounts: self.negative_accounts });
        }
        findings
    }

    /// Money this cell debited that is not yet settled or compensated.
    pub fn open_sum(&self) -> i128 {
        self.outbox.iter().map(OutboxFigures::open_sum).sum()
    }

    pub fn open_messages(&self) -> u64 {
        self.outbox.iter().map(OutboxFigures::open_messages).sum()
    }

    /// The outbox figures towards `dest` (zero if nothing was ever sent there).
    pub fn outbox_to(&self, dest: CellId) -> OutboxFigures {
        self.outbox.iter().find(|o| o.dest == dest).copied().unwrap_or(OutboxFigures::new(dest))
    }
}

/// A ledger's full audit: the incremental figures and what a walk over every
/// account and outbox entry found that they did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerAudit {
    pub figures: LedgerFigures,
    pub findings: Vec<Finding>,
}

/// Something the audit found wrong. Every finding means money may have been
/// lost or created; none is expected in a sound cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A cell's own figures do not balance (`cell_term` ≠ 0).
    CellTerm { cell: CellId, term: i128 },
    /// A kept figure differs from what a walk over the state computes.
    Walk { cell: CellId, figure: &'static str, kept: i128, walked: i128 },
    /// Accounts without overdraft hold a negative balance (I4).
    Negative { cell: CellId, accounts: u64 },
    /// The source closed sequences the destination has not applied: lost money.
    Lost { source: CellId, dest: CellId, first_seq: u64, last_seq: u64, amount: i128 },
    /// The destination applied sequences the source never sent (or no longer
    /// remembers): money created, and the source will reuse those numbers.
    Unsent { source: CellId, dest: CellId, first_seq: u64, last_seq: u64, amount: i128 },
    /// The two books disagree over sequences 1..=through: different messages,
    /// outcomes or amounts under the same numbers.
    Diverged { source: CellId, dest: CellId, through: u64, detail: String },
    /// The destination no longer remembers the sequence asked, so the pair
    /// could not be compared at this moment (a retry usually can).
    Unverified { source: CellId, dest: CellId, seq: u64, applied_through: u64 },
    /// Shards the source moved out that the destination never counted in:
    /// their money left one cell and arrived nowhere.
    MoveLost { source: CellId, dest: CellId, moves: u64, amount: i128 },
    /// The two cells disagree about the shards moved between them (accounts,
    /// net or digest); `transient` when the destination counts a move the
    /// source may have started between the reads.
    MoveDiverged { source: CellId, dest: CellId, detail: String, transient: bool },
}

impl Finding {
    /// True when a second try may not find it (the pair moved too far between reads).
    pub fn is_transient(&self) -> bool {
        // A move that completes between the reads of its two cells (they are
        // read at once, not in order) shows as lost or diverged once.
        matches!(
            self,
            Finding::Unverified { .. } | Finding::MoveLost { .. } | Finding::MoveDiverged { transient: true, .. }
        )
    }

    /// The contract's short name of the finding.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::CellTerm { .. } => "cell_term",
            Finding::Walk { .. } => "walk_mismatch",
            Finding::Negative { .. } => "negative_balance",
            Finding::Lost { .. } => "lost",
            Finding::Unsent { .. } => "unsent",
            Finding::Diverged { .. } => "diverged",
            Finding::Unverified { .. } => "unverified",
            Finding::MoveLost { .. } => "move_lost",
            Finding::MoveDiverged { .. } => "move_diverged",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::CellTerm { cell, term } => write!(f, "cell {cell}: its own figures are off by {term}"),
            Finding::Walk { cell, figure, kept, walked } => {
                write!(f, "cell {cell}: {figure} is kept as {kept} but a walk over the state gives {walked}")
            }
            Finding::Negative { cell, accounts } => {
                write!(f, "cell {cell}: {accounts} accounts without overdraft have a negative balance")
            }
            Finding::Lost { source, dest, first_seq, last_seq, amount } => write!(
                f,
                "cell {source}→{dest}: sequences {first_seq}..={last_seq} are closed at cell {source} but not applied at cell {dest}: {amount} lost"
            ),
            Finding::Unsent { source, dest, first_seq, last_seq, amount } => write!(
                f,
                "cell {source}→{dest}: cell {dest} applied sequences {first_seq}..={last_seq} that cell {source} never sent: {amount} created"
            ),
            Finding::Diverged { source, dest, through, detail } => {
                write!(f, "cell {source}→{dest}: the books disagree over sequences 1..={through}: {detail}")
            }
            Finding::Unverified { source, dest, seq, applied_through } => write!(
                f,
                "cell {source}→{dest}: cell {dest} no longer remembers sequence {seq} (applied through {applied_through})"
            ),
            Finding::MoveLost { source, dest, moves, amount } => write!(
                f,
                "cell {source}→{dest}: {moves} shard moves are done at cell {source} but not counted at cell {dest}: {amount} lost"
            ),
            Finding::MoveDiverged { source, dest, detail, .. } => {
                write!(f, "cell {source}→{dest}: the books disagree about the shards moved: {detail}")
            }
        }
    }
}

/// Reconciles one ordered pair from the three reads described in the module
/// doc: `before` is the source's outbox figures (read first), `at_dest` the
/// destination's answer at `before.closed_through` (read second), `after_at`
/// the source's answer at the destination's `applied_through` (read last).
pub fn reconcile_pair(before: &OutboxFigures, at_dest: &InboxAt, after_at: &OutboxAt) -> Option<Finding> {
    let after = &after_at.figures;
    let (source, dest) = (at_dest.figures.source, before.dest);
    let inbox = &at_dest.figures;
    let b = inbox.applied_through;
    let c = before.closed_through;
    let dest_total = inbox.received + inbox.refused;
    if c > b {
        let amount = before.settled + before.compensated - dest_total;
        return Some(Finding::Lost { source, dest, first_seq: b + 1, last_seq: c, amount });
    }
    if b > after.last_seq {
        let amount = dest_total - after.sent;
        return Some(Finding::Unsent { source, dest, first_seq: after.last_seq + 1, last_seq: b, amount });
    }
    // What the destination applied but the source has not closed: the same messages?
    if let Some(sent) = after_at.prefix {
        debug_assert_eq!(sent.seq, b, "the prefix answers the sequence asked");
        if sent.sent != dest_total || sent.chain != inbox.message_chain {
            let detail = format!(
                "cell {source} sent {} under them, cell {dest} applied or refused {}{}",
                sent.sent,
                dest_total,
                if sent.chain != inbox.message_chain { " (the message chains differ)" } else { "" }
            );
            return Some(Finding::Diverged { source, dest, through: b, detail });
        }
    }
    let Some(p) = at_dest.prefix else {
        return Some(Finding::Unverified { source, dest, seq: c, applied_through: b });
    };
    debug_assert_eq!(p.seq, c, "the prefix answers the sequence asked");
    let mut detail = Vec::new();
    if p.received != before.settled {
        detail.push(format!("cell {dest} applied {} where cell {source} settled {}", p.received, before.settled));
    }
    if p.refused != before.compensated {
        detail
            .push(format!("cell {dest} refused {} where cell {source} compensated {}", p.refused, before.compensated));
    }
    if p.chain != before.closed_chain {
        detail.push("the message chains differ (a sequence number carried two different messages)".to_string());
    }
    (!detail.is_empty()).then(|| Finding::Diverged { source, dest, through: c, detail: detail.join("; ") })
}

/// The audit of cells that are not running (or all read at one moment, as
/// `cellpay check` does with stopped data directories): each cell's full
/// audit, and every ordered pair reconciled.
pub fn audit_states<S: std::borrow::Borrow<CellState>>(cells: &[S], shadow: bool) -> Vec<Finding> {
    let cells: Vec<&CellState> = cells.iter().map(Borrow::borrow).collect();
    let mut findings: Vec<Finding> = cells.iter().flat_map(|c| c.ledger(shadow).audit(c.cell()).findings).collect();
    for a in &cells {
        for b in cells.iter().filter(|b| b.cell() != a.cell()) {
            findings.extend(reconcile_states(a, b, shadow));
            let (fa, fb) = (a.figures(shadow), b.figures(shadow));
            findings.extend(reconcile_figures_moves(a.cell(), &fa, b.cell(), &fb));
        }
    }
    findings
}

/// The moves of the pair a → b, from each side's figures (a read first).
pub fn reconcile_figures_moves(a: CellId, fa: &LedgerFigures, b: CellId, fb: &LedgerFigures) -> Option<Finding> {
    crate::moves::reconcile_moves(a, &fa.moves_with(b), &fa.frozen, b, &fb.moves_with(a), &fb.arrived)
}

/// The pair a → b of one ledger, its three reads made on states in hand.
pub fn reconcile_states(a: &CellState, b: &CellState, shadow: bool) -> Option<Finding> {
    let before = a.ledger(shadow).figures().outbox_to(b.cell());
    let at = b.ledger(shadow).inbox_at(&[(a.cell(), before.closed_through)]);
    let after = a.ledger(shadow).outbox_at(&[(b.cell(), at[0].figures.applied_through)]);
    reconcile_pair(&before, &at[0], &after[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sound() -> (OutboxFigures, InboxAt, OutboxAt) {
        let before = OutboxFigures {
            dest: CellId(1),
            last_seq: 10,
            sent: 1000,
            closed_through: 6,
            settled: 500,
            compensated: 100,
            closed_chain: 77,
            sent_chain: 55,
        };
        let figures = InboxFigures {
            source: CellId(0),
            applied_through: 8,
            received: 700,
            refused: 100,
            chain: 99,
            message_chain: 88,
        };
        let prefix = InboxPrefix { seq: 6, received: 500, refused: 100, chain: 77 };
        let after = OutboxFigures { last_seq: 12, sent: 1200, sent_chain: 66, ..before };
        let sent = SentPrefix { seq: 8, sent: 800, chain: 88 };
        (before, InboxAt { figures, prefix: Some(prefix) }, OutboxAt { figures: after, prefix: Some(sent) })
    }

    #[test]
    fn a_sound_pair_has_no_finding() {
        let (before, at, after) = sound();
        assert_eq!(reconcile_pair(&before, &at, &after), None);
    }

    #[test]
    fn a_destination_behind_what_the_source_closed_is_lost_money() {
        let (before, mut at, after) = sound();
        at.figures.applied_through = 3;
        at.figures.received = 300;
        at.figures.refused = 0;
        let found = reconcile_pair(&before, &at, &after);
        let expected = Finding::Lost { source: CellId(0), dest: CellId(1), first_seq: 4, last_seq: 6, amount: 300 };
        assert_eq!(found, Some(expected));
    }

    #[test]
    fn a_destination_ahead_of_what_the_source_sent_is_created_money() {
        let (before, at, mut after) = sound();
        after.figures.last_seq = 7;
        after.figures.sent = 750;
        after.prefix = None;
        let found = reconcile_pair(&before, &at, &after);
        let expected = Finding::Unsent { source: CellId(0), dest: CellId(1), first_seq: 8, last_seq: 8, amount: 50 };
        assert_eq!(found, Some(expected));
    }

    #[test]
    fn a_different_chain_sum_or_outcome_diverges() {
        for change in 0..3 {
            let (before, mut at, after) = sound();
            let p = at.prefix.as_mut().unwrap();
            match change {
                0 => p.chain ^= 1,
                1 => p.received += 1,
                _ => (p.received, p.refused) = (600, 0),
            }
            assert!(matches!(reconcile_pair(&before, &at, &after), Some(Finding::Diverged { through: 6, .. })));
        }
    }

    #[test]
    fn different_messages_under_the_open_sequences_diverge() {
        let (before, at, mut after) = sound();
        after.prefix.as_mut().unwrap().chain ^= 1;
        assert!(matches!(reconcile_pair(&before, &at, &after), Some(Finding::Diverged { through: 8, .. })));
    }

    #[test]
    fn a_forgotten_prefix_is_unverified_not_ok() {
        let (before, mut at, after) = sound();
        at.prefix = None;
        let found = reconcile_pair(&before, &at, &after).unwrap();
        assert!(found.is_transient(), "{found}");
    }
}
