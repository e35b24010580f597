//! Property tests on the state machine: random command sequences across two
//! cells (with relay deliveries, redeliveries, acks, shadow traffic and
//! misrouted commands) keep I1, I3, I4, I5 and I6, and replaying the commands
//! that changed state rebuilds the same state and the same digests.

use std::collections::{BTreeMap, HashMap};

use cellpay_core::codec::{decode_batch, encode_batch, Writer};
use cellpay_core::*;
use proptest::prelude::*;

const ACCOUNTS: usize = 8;
const SHARDS: u32 = 64;

#[derive(Debug, Clone)]
enum Step {
    Open { account: usize, overdraft: bool, misroute: bool, shadow: bool },
    Transfer { id: u8, from: usize, to: usize, amount: i64, shadow: bool, misroute: bool },
    Deliver { src: usize, shadow: bool },
    Redeliver { src: usize, shadow: bool, back: u64 },
    Ack { src: usize, shadow: bool },
}

fn step() -> impl Strategy<Value = Step> {
    let acct = 0..ACCOUNTS;
    prop_oneof![
        2 => (acct.clone(), any::<bool>(), prop::bool::weighted(0.1), prop::bool::weighted(0.3))
            .prop_map(|(account, overdraft, misroute, shadow)| Step::Open { account, overdraft, misroute, shadow }),
        6 => (0u8..40, acct.clone(), acct.clone(), prop_oneof![1i64..500, Just(0), Just(-3), Just(AMOUNT_MAX), Just(AMOUNT_MAX + 1)],
              prop::bool::weighted(0.3), prop::bool::weighted(0.05))
            .prop_map(|(id, from, to, amount, shadow, misroute)| Step::Transfer { id, from, to, amount, shadow, misroute }),
        3 => (0usize..2, prop::bool::weighted(0.3)).prop_map(|(src, shadow)| Step::Deliver { src, shadow }),
        1 => (0usize..2, prop::bool::weighted(0.3), 0u64..3).prop_map(|(src, shadow, back)| Step::Redeliver { src, shadow, back }),
        3 => (0usize..2, prop::bool::weighted(0.3)).prop_map(|(src, shadow)| Step::Ack { src, shadow }),
    ]
}

fn name(i: usize) -> AccountId {
    AccountId::new(&format!("acct-{i}")).unwrap()
}

/// Two cells and the relay between them, as the test drives it.
struct Cluster {
    map: ShardMap,
    cells: Vec<CellState>,
    /// Every command that changed state, per cell, in order: the log.
    logs: Vec<Vec<Command>>,
    /// Per (src, shadow): highest seq delivered, and deliveries awaiting an ack.
    delivered: HashMap<(usize, bool), u64>,
    acks: HashMap<(usize, bool), Vec<(u64, Outcome)>>,
    /// Per (shadow, payer's cell, transfer id): times a debit and a credit leg
    /// were applied. Ids are idempotency keys within the payer's cell, which is
    /// where every retry of the same transfer is routed.
    legs: HashMap<(bool, usize, TransferId, AccountId), (u32, u32)>,
}

impl Cluster {
    fn new() -> Self {
        let map = ShardMap::round_robin(SHARDS, 2).unwrap();
        let limits = Limits { transfers_retained_max: 1000, history_entries_max: 50 };
        let cells = (0..2).map(|c| CellState::new(CellId(c), map.clone(), limits)).collect();
        Self {
            map,
            cells,
            logs: vec![Vec::new(), Vec::new()],
            delivered: HashMap::new(),
            acks: HashMap::new(),
            legs: HashMap::new(),
        }
    }

    fn owner(&self, id: &AccountId) -> usize {
        self.map.owner_of(id.as_str()).0 as usize
    }

    /// Applies one command; checks that a rejection changed nothing (and so is
    /// not logged) and that a change is logged.
    fn apply(&mut self, cell: usize, cmd: Command) -> Outcome {
        let before = self.cells[cell].clone();
        let outcome = self.cells[cell].apply(&cmd);
        if outcome.changed_state() {
            self.logs[cell].push(cmd);
        } else {
            assert!(self.cells[cell] == before, "{outcome:?} changed state");
        }
        outcome
    }

    fn run(&mut self, s: &Step) {
        match s.clone() {
            Step::Open { account, overdraft, misroute, shadow } => {
                let id = name(account);
                let cell = self.owner(&id) ^ usize::from(misroute);
                let cny = Currency::new("CNY").unwrap();
                let out = self.apply(
                    cell,
                    Command {
                        shadow,
                        op: Op::OpenAccount(OpenAccount {
                            id,
                            currency: cny,
                            overdraft,
                            tenant: TenantId::default_tenant(),
                        }),
                    },
                );
                if misroute {
                    assert!(matches!(&out, Outcome::Rejected(r) if r.code == ErrorCode::WrongCell), "I6");
                }
            }
            Step::Transfer { id, from, to, amount, shadow, misroute } => {
                let tid = TransferId::new(&format!("t{id}")).unwrap();
                let (from, to) = (name(from), name(to));
                let cell = self.owner(&from) ^ usize::from(misroute);
                let payer = from.clone();
                let t =
                    Transfer { id: tid.clone(), from, to, amount, currency: None, memo: None, by: Authority::Admin };
                let out = self.apply(cell, Command { shadow, op: Op::Transfer(t) });
                if misroute {
                    assert!(
                        matches!(&out, Outcome::Rejected(r) if r.code == ErrorCode::WrongCell || r.code == ErrorCode::InvalidRequest),
                        "I6"
                    );
                }
                if let Outcome::Transferred { created: true, outbox, .. } = out {
                    let legs = self.legs.entry((shadow, cell, tid, payer)).or_default();
                    legs.0 += 1;
                    if outbox.is_none() {
                        legs.1 += 1;
                    }
                }
            }
            Step::Deliver { src, shadow } => {
                let dst = 1 - src;
                let after = *self.delivered.get(&(src, shadow)).unwrap_or(&0);
                let q = Query::Outbox { shadow, dest: CellId(dst as u32), after_seq: after, limit: 1 };
                let QueryAnswer::Outbox(msgs) = self.cells[src].query(&q) else { panic!() };
                let Some(m) = msgs.into_iter().next() else {
                    return;
                };
                let out = self.deliver(src, dst, shadow, &m);
                assert!(
                    matches!(
                        out,
                        Outcome::CreditApplied { duplicate: false } | Outcome::CreditRefused { duplicate: false, .. }
                    ),
                    "{out:?}"
                );
                self.delivered.insert((src, shadow), m.seq);
                self.acks.entry((src, shadow)).or_default().push((m.seq, out));
            }
            Step::Redeliver { src, shadow, back } => {
                // Redeliver a message still in the outbox whose credit was already applied.
                let Some(pending) = self.acks.get(&(src, shadow)) else {
                    return;
                };
                let Some((seq, first)) = pending.iter().rev().nth(back as usize).cloned() else {
                    return;
                };
                let q = Query::Outbox { shadow, dest: CellId(1 - src as u32), after_seq: seq - 1, limit: 1 };
                let QueryAnswer::Outbox(msgs) = self.cells[src].query(&q) else { panic!() };
                let m = msgs.into_iter().next().expect("unacked messages stay in the outbox");
                let out = self.deliver(src, 1 - src, shadow, &m);
                let same = match (&first, &out) {
                    (Outcome::CreditApplied { .. }, Outcome::CreditApplied { duplicate: true }) => true,
                    (Outcome::CreditRefused { code: a, .. }, Outcome::CreditRefused { code: b, duplicate: true }) => {
                        a == b
                    }
                    _ => false,
                };
                assert!(same, "a redelivery answers as the first delivery did (I3): {first:?} then {out:?}");
            }
            Step::Ack { src, shadow } => {
                let Some(pending) = self.acks.get_mut(&(src, shadow)) else {
                    return;
                };
                if pending.is_empty() {
                    return;
                }
                let (seq, outcome) = pending.remove(0);
                let dest = CellId(1 - src as u32);
                let op = match outcome {
                    Outcome::CreditApplied { .. } => Op::Settle { dest, seq },
                    Outcome::CreditRefused { code, .. } => Op::Compensate { dest, seq, reason: code },
                    other => panic!("{other:?}"),
                };
                let out = self.apply(src, Command { shadow, op: op.clone() });
                assert!(matches!(out, Outcome::OutboxClosed { duplicate: false, .. }), "{out:?}");
                // An ack applied twice is a no-op the second time (I3).
                let again = self.apply(src, Command { shadow, op });
                assert!(matches!(again, Outcome::OutboxClosed { duplicate: true, .. }), "{again:?}");
            }
        }
    }

    fn deliver(&mut self, src: usize, dst: usize, shadow: bool, m: &OutboxMessage) -> Outcome {
        let credit = m.credit(CellId(src as u32));
        let out = self.apply(dst, Command { shadow, op: Op::Credit(credit) });
        if let Outcome::CreditApplied { duplicate: false } = out {
            self.legs.entry((shadow, src, m.transfer.clone(), m.from.clone())).or_default().1 += 1;
        }
        out
    }

    fn check_invariants(&self) {
        for shadow in [false, true] {
            let audits: Vec<LedgerFigures> = self.cells.iter().map(|c| c.ledger(shadow).figures()).collect();
            // I1: conservation over the cluster at this cut.
            let total: i128 = audits.iter().map(|a| a.cell_term()).sum();
            assert_eq!(total, 0, "I1 (shadow={shadow}): {audits:?}");
            // The full audit (a walk) agrees with the kept figures, and every
            // ordered pair reconciles.
            for (c, cell) in self.cells.iter().enumerate() {
                let audit = cell.ledger(shadow).audit(CellId(c as u32));
                assert!(audit.findings.is_empty(), "{:?}", audit.findings);
                assert_eq!(reconcile_states(cell, &self.cells[1 - c], shadow), None, "pair {c}→{}", 1 - c);
            }
            // I1 again, counted independently: balances plus outbox messages
            // whose credit the payee's cell has not applied yet.
            let balances: i128 = audits.iter().map(|a| a.balance_sum).sum();
            let mut in_flight = 0i128;
            for src in 0..2 {
                let applied = *self.delivered.get(&(src, shadow)).unwrap_or(&0);
                let refused: Vec<u64> = self.acks.get(&(src, shadow)).map_or(vec![], |v| {
                    v.iter().filter(|(_, o)| matches!(o, Outcome::CreditRefused { .. })).map(|(s, _)| *s).collect()
                });
                let q = Query::Outbox { shadow, dest: CellId(1 - src as u32), after_seq: 0, limit: usize::MAX };
                let QueryAnswer::Outbox(msgs) = self.cells[src].query(&q) else { panic!() };
                in_flight += msgs
                    .iter()
                    .filter(|m| m.seq > applied || refused.contains(&m.seq))
                    .map(|m| i128::from(m.amount))
                    .sum::<i128>();
            }
            assert_eq!(balances + in_flight, 0, "I1 by outbox (shadow={shadow})");
            // I4.
            assert!(audits.iter().all(|a| a.negative_accounts == 0), "I4 (shadow={shadow})");
        }
        // I3: no leg of any transfer applied twice.
        for (k, (debits, credits)) in &self.legs {
            assert!(*debits <= 1 && *credits <= 1, "I3: {k:?} debits {debits} credits {credits}");
        }
    }
}

/// Rebuilds each cell from its log (through the codec, as recovery does).
fn replay(cluster: &Cluster) -> Vec<CellState> {
    let limits = Limits { transfers_retained_max: 1000, history_entries_max: 50 };
    (0..2)
        .map(|c| {
            let mut w = Writer::default();
            encode_batch(&mut w, 0, cluster.logs[c].iter());
            let cmds = decode_batch(&w.buf).unwrap().commands;
            let mut state = CellState::new(CellId(c as u32), cluster.map.clone(), limits);
            for cmd in &cmds {
                assert!(state.replay(cmd).changed_state(), "a logged command applies again");
            }
            state
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_sequences_keep_the_invariants_and_replay_exactly(steps in prop::collection::vec(step(), 1..120)) {
        let mut cluster = Cluster::new();
        for s in &steps {
            cluster.run(s);
            cluster.check_invariants();
        }
        let rebuilt = replay(&cluster);
        for (c, state) in rebuilt.iter().enumerate() {
            prop_assert!(state == &cluster.cells[c], "replay of cell {} differs", c);
            prop_assert_eq!(state.ledger(false).digests(), cluster.cells[c].ledger(false).digests());
            // A snapshot round-trips to the same state.
            let decoded = snapshot::decode(&snapshot::encode(&cluster.cells[c])).unwrap();
            prop_assert!(decoded == cluster.cells[c], "snapshot of cell {} differs", c);
        }
    }

    /// I5: whatever shadow traffic does, the real ledger and its digests stay as they were.
    #[test]
    fn shadow_traffic_never_touches_the_real_ledger(real in prop::collection::vec(step(), 1..40), shadow in prop::collection::vec(step(), 1..80)) {
        let mut cluster = Cluster::new();
        let as_shadow = |s: &Step, on: bool| match s.clone() {
            Step::Open { account, overdraft, misroute, .. } => Step::Open { account, overdraft, misroute, shadow: on },
            Step::Transfer { id, from, to, amount, misroute, .. } => Step::Transfer { id, from, to, amount, shadow: on, misroute },
            Step::Deliver { src, .. } => Step::Deliver { src, shadow: on },
            Step::Redeliver { src, back, .. } => Step::Redeliver { src, shadow: on, back },
            Step::Ack { src, .. } => Step::Ack { src, shadow: on },
        };
        for s in &real {
            cluster.run(&as_shadow(s, false));
        }
        let before: Vec<(Vec<u64>, LedgerFigures)> = cluster.cells.iter().map(|c| (c.ledger(false).digests().to_vec(), c.ledger(false).figures())).collect();
        let balances: BTreeMap<String, Option<i64>> = (0..ACCOUNTS).map(|i| {
            let id = name(i);
            (id.to_string(), cluster.cells[cluster.owner(&id)].ledger(false).account(&id).map(|a| a.balance))
        }).collect();
        for s in &shadow {
            cluster.run(&as_shadow(s, true));
            cluster.check_invariants();
        }
        let after: Vec<(Vec<u64>, LedgerFigures)> = cluster.cells.iter().map(|c| (c.ledger(false).digests().to_vec(), c.ledger(false).figures())).collect();
        prop_assert_eq!(before, after);
        for (id, bal) in balances {
            let id = AccountId::new(&id).unwrap();
            prop_assert_eq!(cluster.cells[cluster.owner(&id)].ledger(false).account(&id).map(|a| a.balance), bal);
        }
    }
}

#[test]
fn a_digest_changes_when_a_real_balance_changes() {
    let mut cluster = Cluster::new();
    cluster.run(&Step::Open { account: 0, overdraft: true, misroute: false, shadow: false });
    // Find an account in the same cell as acct-0, so the transfer is local.
    let home = cluster.owner(&name(0));
    let peer = (1..ACCOUNTS).find(|&i| cluster.owner(&name(i)) == home).expect("8 accounts over 2 cells");
    cluster.run(&Step::Open { account: peer, overdraft: false, misroute: false, shadow: false });
    let before = cluster.cells[home].ledger(false).digests().to_vec();
    cluster.run(&Step::Transfer { id: 1, from: 0, to: peer, amount: 5, shadow: false, misroute: false });
    assert_ne!(cluster.cells[home].ledger(false).digests(), &before[..]);
}
