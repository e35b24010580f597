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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use cellpay_core::{CellId, Command, ErrorCode, Op, OutboxMessage, Outcome, Query, QueryAnswer};
use tokio::sync::watch;

use crate::breaker::{Breaker, BreakerRules};
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
#[derive(Debug, Default)]
pub struct RelayStats {
    pub delivered: AtomicU64,
    pub refused: AtomicU64,
    pub failed_rounds: AtomicU64,
    /// Messages seen waiting at the start of the last round (capped at a round's size).
    pub backlog: AtomicU64,
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
        if messages.is_empty() {
            return Ok(0);
        }
        let source = self.source.cell();
        let credits = messages.iter().map(|m| self.credit(source, m)).collect();
        let answers = self.dest.submit(credits).await.map_err(unavailable)?;
        let mut acks = Vec::with_capacity(messages.len());
        for (m, answer) in messages.iter().zip(answers) {
            let op = match answer {
                Outcome::CreditApplied { .. } => Op::Settle { dest, seq: m.seq },
                Outcome::CreditRefused { code, .. } => Op::Compensate { dest, seq: m.seq, reason: code },
                // The payee's shard is not at that cell (a move in progress) or a
                // message is missing in between: stop here, retry later.
                Outcome::Rejected(r) if matches!(r.code, ErrorCode::WrongCell | ErrorCode::OutOfOrder) => break,
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
            if !matches!(outcome, Outcome::OutboxClosed { .. }) {
                return Err(RoundError::Unexpected(format!("closing a message answered {outcome:?}")));
            }
        }
        self.stats.delivered.fetch_add(acked as u64 - refused, Relaxed);
        self.stats.refused.fetch_add(refused, Relaxed);
        if acked < messages.len() {
            return Err(RoundError::Unavailable(format!("{} credits must wait", messages.len() - acked)));
        }
        Ok(acked)
    }

    fn credit(&self, source: CellId, m: &OutboxMessage) -> Command {
        Command { shadow: self.shadow, op: Op::Credit(m.credit(source)) }
    }
}
