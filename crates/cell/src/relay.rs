//! The relay: carries cross-cell credits from a payer's cell to a payee's
//! cell, exactly once in effect, in order, per (source, destination, ledger).
//!
//! One round: read the oldest undelivered messages from the source's outbox,
//! submit them as `Credit`s to the destination in one request (the
//! destination applies them in sequence order and answers each), then submit
//! `Settle` (applied) or `Compensate` (refused for good) for each to the
//! source. Nothing is acknowledged before the destination's batch is durable,
//! and a message leaves the outbox only when its `Settle`/`Compensate` is
//! durable at the source. After any failure or restart the next round starts
//! again from the oldest message still in the outbox; the destination answers
//! a redelivery with what it answered the first time, so nothing is applied
//! twice and nothing is lost (I3).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellpay_core::{CellId, Command, ErrorCode, Op, OutboxMessage, Outcome, Query, QueryAnswer, TransferStatus};
use tokio::sync::watch;

use crate::breaker::{Breaker, BreakerRules};
use crate::buckets::Buckets;
use crate::client::CellClient;

/// Limits and timing of one relay (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Messages carried per round (one request to each side). Must stay below
    /// the engine batch limit and half the inbox tail (`INBOX_TAIL_RETAINED`),
    /// so a redelivered round is always recognised.
    pub messages_per_round_max: usize,
    /// How long an idle relay waits for the outbox signal before looking anyway.
    pub idle_poll: Duration,
    /// Pause after a failed round (a cell unavailable or overloaded).
    pub backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self { messages_per_round_max: 4096, idle_poll: Duration::from_millis(200), backoff: Duration::from_millis(50) }
    }
}

/// Counters of one relay, for metrics.
#[derive(Debug)]
pub struct RelayStats {
    pub delivered: AtomicU64,
    pub refused: AtomicU64,
    pub failed_rounds: AtomicU64,
    /// Messages seen waiting at the start of the last round (capped at a round's size).
    pub backlog: AtomicU64,
    /// Seconds from a credit's debit at the payer's cell to its settlement
    /// there (the payee applied it and the close is durable).
    pub settle_seconds: Buckets,
    sent: Mutex<SentClock>,
}

impl Default for RelayStats {
    fn default() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failed_rounds: AtomicU64::new(0),
            backlog: AtomicU64::new(0),
            settle_seconds: Buckets::latency(),
            sent: Mutex::new(SentClock::default()),
        }
    }
}

/// The most stretches of sequences a relay remembers the sending time of (I7).
const SENT_MARKS_MAX: usize = 4096;

/// When the relay first saw each stretch of sequences sent, read from the
/// source's published figures at the start of every round and every wake-up
/// of an idle relay (the outbox signal fires right after the debit's batch is
/// durable). A message is timed from the first mark that covers it: the
/// measure of debit-to-settled that needs nothing from the ledger. After a
/// restart, messages already waiting are timed from the restart.
#[derive(Debug, Default)]
struct SentClock {
    /// (last sequence sent, when it was first seen), both rising.
    marks: VecDeque<(u64, Instant)>,
}

impl SentClock {
    fn mark(&mut self, last_seq: u64, now: Instant) {
        let grew = self.marks.back().is_none_or(|(seen, _)| *seen < last_seq);
        // Full: the newest mark covers the rest, timed a little late.
        if grew && last_seq > 0 && self.marks.len() < SENT_MARKS_MAX {
            self.marks.push_back((last_seq, now));
        }
    }

    /// When `seq` was first seen sent.
    fn sent_at(&self, seq: u64) -> Option<Instant> {
        let i = self.marks.partition_point(|(seen, _)| *seen < seq);
        self.marks.get(i).map(|(_, at)| *at)
    }

    /// Forgets the marks whose every sequence is closed.
    fn forget_through(&mut self, closed: u64) {
        while self.marks.front().is_some_and(|(seen, _)| *seen <= closed) {
            self.marks.pop_front();
        }
    }
}

/// What may hold a relay back: its pair's circuit breaker, and the
/// `cross_cell_defer` degrade switch. Either way the credits wait in the
/// payer cell's durable outbox and nothing is lost or doubled.
pub struct RelayGate {
    pub breaker: Breaker,
    /// True while cross-cell delivery is deferred.
    pub deferred: Arc<AtomicBool>,
    /// Rounds skipped because the breaker was open or delivery deferred.
    pub held_rounds: AtomicU64,
}

impl RelayGate {
    pub fn new(rules: BreakerRules, deferred: Arc<AtomicBool>) -> Self {
        Self { breaker: Breaker::new(rules), deferred, held_rounds: AtomicU64::new(0) }
    }
}

/// The stream of one (source, destination, ledger).
pub struct Relay {
    pub source: Arc<dyn CellClient>,
    pub dest: Arc<dyn CellClient>,
    pub shadow: bool,
    pub config: RelayConfig,
    pub stats: Arc<RelayStats>,
    pub gate: Arc<RelayGate>,
}

/// Why a round did not finish; the next round retries from the outbox.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// A cell could not answer (down, overloaded, or credits must wait).
    #[error("a cell is unavailable: {0}")]
    Unavailable(String),
    /// A cell answered something a relay never expects (logged at WARN or ERROR).
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// Not attempted: the breaker is open or delivery is deferred; look again after this long.
    #[error("held back by the breaker or a deferral for {} ms", .0.as_millis())]
    Held(Duration),
}

impl Relay {
    /// Runs rounds until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut signal = self.source.outbox_signal();
        loop {
            if *stop.borrow() {
                return;
            }
            let pause = match self.gated_round().await {
                Ok(0) => {
                    // Idle: wait for the outbox to grow (or poll anyway now and then).
                    let _ = tokio::time::timeout(self.config.idle_poll, signal.changed()).await;
                    None
                }
                Ok(_) => None,
                Err(RoundError::Held(wait)) => {
                    self.gate.held_rounds.fetch_add(1, Relaxed);
                    Some(wait)
                }
                Err(e) => {
                    self.stats.failed_rounds.fetch_add(1, Relaxed);
                    if let RoundError::Unexpected(why) = &e {
                        tracing::warn!(source = %self.source.cell(), dest = %self.dest.cell(), shadow = self.shadow, "relay round failed: {why}");
                    }
                    Some(self.config.backoff)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Carries one round of messages; answers how many were closed.
    pub async fn round(&self) -> Result<usize, RoundError> {
        self.gated_round().await
    }

    /// A round, if the gate lets it run; its outcome feeds the pair's breaker.
    async fn gated_round(&self) -> Result<usize, RoundError> {
        let sent = self.source.figures().ledger(self.shadow).outbox_to(self.dest.cell()).last_seq;
        self.stats.sent.lock().expect("sent clock lock").mark(sent, Instant::now());
        if self.gate.deferred.load(Relaxed) {
            return Err(RoundError::Held(self.config.idle_poll));
        }
        let pass = self.gate.breaker.try_pass().map_err(|open| RoundError::Held(open.retry_after))?;
        let result = self.round_inner().await;
        self.gate.breaker.record(pass, matches!(result, Err(RoundError::Unavailable(_))));
        result
    }

    async fn round_inner(&self) -> Result<usize, RoundError> {
        let unavailable = |e: crate::EngineError| RoundError::Unavailable(e.to_string());
        let dest = self.dest.cell();
        let limit = self.config.messages_per_round_max;
        let query = Query::Outbox { shadow: self.shadow, dest, after_seq: 0, limit };
        let messages = match self.source.query(query).await.map_err(unavailable)? {
            QueryAnswer::Outbox(m) => m,
            other => return Err(RoundError::Unexpected(format!("outbox query answered {other:?}"))),
        };
        self.stats.backlog.store(messages.len() as u64, Relaxed);
        let Some(newest) = messages.last() else { return Ok(0) };
        // Sent after the figures were read at the top of the round: seen now.
        self.stats.sent.lock().expect("sent clock lock").mark(newest.seq, Instant::now());
        let source = self.source.cell();
        let credits = messages.iter().map(|m| self.credit(source, m)).collect();
        let answers = self.dest.submit(credits).await.map_err(unavailable)?;
        // A credit refused because its payee's shard moved away goes on to the
        // new owner under the source's map: give the source the destination's
        // map first (the one that moved the shard), in case it lags.
        if answers.iter().any(|a| matches!(a, Outcome::CreditRefused { code: ErrorCode::ShardMoved, .. })) {
            if let Some(map) = self.dest.shard_map().await {
                if map.epoch() > self.source.status().epoch {
                    let _ = self.source.submit(vec![Command::real(Op::InstallShardMap(map))]).await;
                }
            }
        }
        let mut acks = Vec::with_capacity(messages.len());
        for (m, answer) in messages.iter().zip(answers) {
            let op = match answer {
                Outcome::CreditApplied { .. } => Op::Settle { dest, seq: m.seq },
                Outcome::CreditRefused { code, .. } => Op::Compensate { dest, seq: m.seq, reason: code },
                // The payee's shard is not at that cell or frozen there (a move in
                // progress), or a message is missing in between: stop here, retry later.
                Outcome::Rejected(r)
                    if matches!(r.code, ErrorCode::WrongCell | ErrorCode::OutOfOrder | ErrorCode::ShardFrozen) =>
                {
                    break
                }
                // The books of this pair went back in time: nothing more is
                // delivered (the credits wait in the outbox) and the audit
                // names the pair until an operator reconciles it.
                Outcome::Rejected(r) if r.code == ErrorCode::SequenceReused => {
                    tracing::error!(source = %source, dest = %dest, shadow = self.shadow, "relay stopped: {}", r.message);
                    return Err(RoundError::Unexpected(r.message));
                }
                other => return Err(RoundError::Unexpected(format!("credit {} answered {other:?}", m.seq))),
            };
            acks.push(Command { shadow: self.shadow, op });
        }
        let acked = acks.len();
        let refused = acks.iter().filter(|c| matches!(c.op, Op::Compensate { .. })).count() as u64;
        let closed = self.source.submit(acks).await.map_err(unavailable)?;
        for outcome in &closed {
            // A credit refused `shard_moved` goes on to the shard's new owner,
            // which the source's map must name first (it follows the control
            // plane): until then the close waits, like a cell unavailable.
            if let Outcome::Rejected(r) = outcome {
                if matches!(r.code, ErrorCode::WrongCell | ErrorCode::ShardFrozen | ErrorCode::OutOfOrder) {
                    return Err(RoundError::Unavailable(r.message.clone()));
                }
            }
            if !matches!(outcome, Outcome::OutboxClosed { .. }) {
                return Err(RoundError::Unexpected(format!("closing a message answered {outcome:?}")));
            }
        }
        self.time_settled(&messages[..acked], &closed);
        self.stats.delivered.fetch_add(acked as u64 - refused, Relaxed);
        self.stats.refused.fetch_add(refused, Relaxed);
        if acked < messages.len() {
            return Err(RoundError::Unavailable(format!("{} credits must wait", messages.len() - acked)));
        }
        Ok(acked)
    }

    /// Observes debit-to-settled for each message this round settled.
    fn time_settled(&self, messages: &[OutboxMessage], closed: &[Outcome]) {
        let now = Instant::now();
        let mut clock = self.stats.sent.lock().expect("sent clock lock");
        for (m, outcome) in messages.iter().zip(closed) {
            let settled =
                matches!(outcome, Outcome::OutboxClosed { status: TransferStatus::Settled, duplicate: false });
            if let (true, Some(at)) = (settled, clock.sent_at(m.seq)) {
                self.stats.settle_seconds.observe_duration(now.saturating_duration_since(at));
            }
        }
        if let Some(last) = messages.last() {
            clock.forget_through(last.seq);
        }
    }

    fn credit(&self, source: CellId, m: &OutboxMessage) -> Command {
        Command { shadow: self.shadow, op: Op::Credit(m.credit_to(source, self.dest.cell())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_timed_from_the_first_mark_that_covers_it() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(5), t0 + Duration::from_millis(9));
        let mut clock = SentClock::default();
        clock.mark(0, t0);
        clock.mark(3, t1);
        clock.mark(3, t2);
        clock.mark(7, t2);
        assert_eq!(clock.marks.len(), 2, "a mark only when more was sent");
        assert_eq!((clock.sent_at(1), clock.sent_at(3), clock.sent_at(4)), (Some(t1), Some(t1), Some(t2)));
        assert_eq!(clock.sent_at(8), None, "not seen sent yet");
        clock.forget_through(5);
        assert_eq!(clock.sent_at(6), Some(t2), "the stretch 4..=7 is still open");
        clock.forget_through(7);
        assert!(clock.marks.is_empty());
    }

    #[test]
    fn the_marks_are_bounded() {
        let now = Instant::now();
        let mut clock = SentClock::default();
        for seq in 1..=(SENT_MARKS_MAX as u64 + 10) {
            clock.mark(seq, now);
        }
        assert_eq!(clock.marks.len(), SENT_MARKS_MAX);
    }
}
