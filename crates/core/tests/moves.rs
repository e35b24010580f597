//! Shard moves in the state machine: a shard's accounts, idempotency records
//! and history arrive whole; money in flight follows the shard exactly once;
//! and the audit counts the move, so that it neither raises a false alarm nor
//! hides a loss. Each audit check is first shown to fail on the fault it is
//! there for.

mod common;

use cellpay_core::*;
use common::{cny, id, open, transfer};

fn balance(cell: &CellState, name: &str) -> i64 {
    cell.ledger(false).account(&id(name)).unwrap_or_else(|| panic!("{name} is not at cell {}", cell.cell())).balance
}

const SHARDS: u32 = 16;

/// Three cells over 16 shards; names of accounts in a given shard.
struct World {
    cells: Vec<CellState>,
    map: ShardMap,
}

impl World {
    fn new() -> Self {
        let map = ShardMap::round_robin(SHARDS, 3).unwrap();
        let cells = (0..3).map(|c| CellState::new(CellId(c), map.clone(), Limits::default())).collect();
        World { cells, map }
    }

    /// The `skip`th account name in `shard`.
    fn name_in(&self, shard: u32, skip: usize) -> String {
        (0..).map(|i| format!("acct-{i}")).filter(|n| self.map.shard_of(n).0 == shard).nth(skip).unwrap()
    }

    fn owner(&self, name: &str) -> usize {
        self.map.owner_of(name).0 as usize
    }

    fn open(&mut self, name: &str, overdraft: bool) {
        let c = self.owner(name);
        open(&mut self.cells[c], name, overdraft);
    }

    fn pay(&mut self, tid: &str, from: &str, to: &str, amount: i64) -> Outcome {
        let c = self.owner(from);
        self.cells[c].apply(&transfer(tid, from, to, amount))
    }

    /// One relay round a → b, answering each credit as b does; `lose_acks`
    /// drops the closes (the acknowledgement never reached a).
    fn relay(&mut self, a: usize, b: usize, lose_acks: bool) -> Vec<Outcome> {
        let q = Query::Outbox { shadow: false, dest: CellId(b as u32), after_seq: 0, limit: usize::MAX };
        let QueryAnswer::Outbox(msgs) = self.cells[a].query(&q) else { panic!() };
        let mut answers = Vec::new();
        for m in msgs {
            let answer = self.cells[b].apply(&Command::real(Op::Credit(m.credit(CellId(a as u32)))));
            let op = match &answer {
                Outcome::CreditApplied { .. } => Op::Settle { dest: CellId(b as u32), seq: m.seq },
                Outcome::CreditRefused { code, .. } => {
                    Op::Compensate { dest: CellId(b as u32), seq: m.seq, reason: *code }
                }
                _ => {
                    answers.push(answer);
                    break;
                }
            };
            if !lose_acks {
                let closed = self.cells[a].apply(&Command::real(op));
                assert!(matches!(closed, Outcome::OutboxClosed { duplicate: false, .. }), "{closed:?}");
            }
            answers.push(answer);
        }
        answers
    }

    /// Relays every pair until nothing moves.
    fn settle_all(&mut self) {
        for _ in 0..4 {
            for a in 0..3 {
                for b in 0..3 {
                    if a != b {
                        self.relay(a, b, false);
                    }
                }
            }
        }
    }

    fn freeze(&mut self, shard: u32, to: usize) -> Outcome {
        let from = self.map.owner(ShardId(shard)).0 as usize;
        let move_id = self.map.epoch() + 1;
        self.cells[from].apply(&Command::real(Op::FreezeShard { shard, move_id, to: CellId(to as u32) }))
    }

    /// The rest of a move after the freeze: export, install, the new map everywhere, drop.
    fn finish_move(&mut self, shard: u32) -> ShardExport {
        let from = self.map.owner(ShardId(shard)).0 as usize;
        let QueryAnswer::ShardExport(export) = self.cells[from].query(&Query::ExportShard { shard, older_after: 0 })
        else {
            panic!("shard {shard} could not be exported")
        };
        let to = export.to.0 as usize;
        let installed = self.cells[to].apply(&Command::real(Op::InstallShard(export.clone())));
        assert_eq!(installed, Outcome::MoveStep { open_messages: 0, duplicate: false });
        let mut owners = self.map.owners().to_vec();
        owners[shard as usize] = CellId(to as u32);
        self.map = ShardMap::new(export.move_id, owners).unwrap();
        for c in &mut self.cells {
            let installed = c.apply(&Command::real(Op::InstallShardMap(self.map.clone())));
            assert!(matches!(installed, Outcome::ShardMapInstalled { .. }), "{installed:?}");
        }
        // The source dropped the shard as it installed the map that gives it away.
        assert!(self.cells[from].ledger(false).digests()[shard as usize] == 0 || export.real.digest == 0);
        let dropped = self.cells[from].apply(&Command::real(Op::DropShard { shard, move_id: export.move_id }));
        assert_eq!(dropped, Outcome::MoveStep { open_messages: 0, duplicate: true });
        *export
    }

    fn move_shard(&mut self, shard: u32, to: usize) -> ShardExport {
        let frozen = self.freeze(shard, to);
        assert!(matches!(frozen, Outcome::MoveStep { duplicate: false, .. }), "{frozen:?}");
        self.finish_move(shard)
    }

    fn audit(&self) -> Vec<Finding> {
        audit_states(&self.cells, false)
    }

    fn total(&self) -> i128 {
        self.cells.iter().map(|c| c.ledger(false).figures().balance_sum).sum::<i128>()
            + self.cells.iter().map(|c| c.ledger(false).figures().open_sum()).sum::<i128>()
    }
}

/// A world with a bank in shard 0 (cell 0) and a funded payer and payee in shard 1 (cell 1).
fn funded() -> (World, String, String, String) {
    let mut w = World::new();
    let (bank, payer, payee) = (w.name_in(0, 0), w.name_in(1, 0), w.name_in(1, 1));
    w.open(&bank, true);
    w.open(&payer, false);
    w.open(&payee, false);
    assert!(matches!(w.pay("fund", &bank, &payer, 1000), Outcome::Transferred { .. }));
    w.settle_all();
    (w, bank, payer, payee)
}

#[test]
fn a_moved_shard_arrives_whole_with_its_balances_records_history_and_digest() {
    let (mut w, _bank, payer, payee) = funded();
    assert!(matches!(w.pay("p1", &payer, &payee, 70), Outcome::Transferred { created: true, .. }));
    let digest_before = w.cells[1].ledger(false).digests()[1];
    let entries_before = w.cells[1].ledger(false).entries(&id(&payer), 10, None).unwrap();
    let total = w.total();
    let export = w.move_shard(1, 2);
    assert_eq!(export.real.accounts.len(), 2);
    assert_eq!((balance(&w.cells[2], &payer), balance(&w.cells[2], &payee)), (930, 70));
    assert!(w.cells[1].ledger(false).account(&id(&payer)).is_none(), "the source no longer holds it");
    assert_eq!(w.cells[2].ledger(false).digests()[1], digest_before, "the shard's digest is equal after the move");
    assert_eq!(w.cells[1].ledger(false).digests()[1], 0);
    let entries_after = w.cells[2].ledger(false).entries(&id(&payer), 10, None).unwrap();
    let strip =
        |v: Vec<EntryView>| v.into_iter().map(|e| (e.transfer, e.kind, e.amount, e.balance_after)).collect::<Vec<_>>();
    assert_eq!(strip(entries_after), strip(entries_before), "history moved");
    // The idempotency record moved: a retry at the new owner pays nothing.
    let retry = w.pay("p1", &payer, &payee, 70);
    assert!(matches!(retry, Outcome::Transferred { created: false, .. }), "{retry:?}");
    assert_eq!(balance(&w.cells[2], &payer), 930);
    // The old owner refuses commands for it; the new one serves them.
    let stale = w.cells[1].apply(&transfer("p2", &payer, &payee, 1));
    assert!(matches!(&stale, Outcome::Rejected(r) if r.code == ErrorCode::WrongCell), "{stale:?}");
    assert!(matches!(w.pay("p2", &payer, &payee, 5), Outcome::Transferred { created: true, .. }));
    assert_eq!(w.total(), total, "no money made or lost");
    assert_eq!(w.audit(), vec![], "the move record keeps the audit exact");
    assert!(w.cells.iter().all(|c| c.ledger(false).figures().cell_term() == 0));
}

#[test]
fn commands_for_a_frozen_shard_wait_and_change_nothing() {
    let (mut w, bank, payer, payee) = funded();
    assert!(matches!(w.freeze(1, 2), Outcome::MoveStep { open_messages: 0, duplicate: false }));
    let before = w.cells[1].clone();
    let newcomer = w.name_in(1, 2);
    for cmd in [
        transfer("f1", &payer, &payee, 5),
        Command::real(Op::OpenAccount(OpenAccount {
            id: id(&newcomer),
            currency: cny(),
            overdraft: false,
            tenant: TenantId::default_tenant(),
        })),
    ] {
        let out = w.cells[1].apply(&cmd);
        assert!(matches!(&out, Outcome::Rejected(r) if r.code == ErrorCode::ShardFrozen), "{out:?}");
    }
    assert_eq!(w.cells[1], before, "a refusal changes nothing");
    // A credit to the frozen shard is held, not refused: its number is not used up.
    assert!(matches!(w.pay("c1", &bank, &payee, 9), Outcome::Transferred { .. }));
    let held = w.relay(0, 1, false);
    assert!(matches!(&held[..], [Outcome::Rejected(r)] if r.code == ErrorCode::ShardFrozen), "{held:?}");
    assert_eq!(w.cells[1], before);
    // A second freeze for another move is refused; the same one is a duplicate.
    let other = w.cells[1].apply(&Command::real(Op::FreezeShard { shard: 1, move_id: 9, to: CellId(0) }));
    assert!(matches!(&other, Outcome::Rejected(r) if r.code == ErrorCode::Conflict), "{other:?}");
    assert!(matches!(w.freeze(1, 2), Outcome::MoveStep { duplicate: true, .. }));
    // The move is undone: the shard serves again, the held credit goes through once.
    let undone = w.cells[1].apply(&Command::real(Op::UnfreezeShard { shard: 1, move_id: 2 }));
    assert_eq!(undone, Outcome::MoveStep { open_messages: 0, duplicate: false });
    w.settle_all();
    assert_eq!(balance(&w.cells[1], &payee), 9);
    assert!(matches!(w.pay("f1", &payer, &payee, 5), Outcome::Transferred { created: true, .. }));
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn credits_sent_to_a_shard_during_its_freeze_arrive_once_at_the_new_owner() {
    let (mut w, bank, _payer, payee) = funded();
    w.freeze(1, 2);
    for i in 0..3 {
        assert!(matches!(w.pay(&format!("c{i}"), &bank, &payee, 10), Outcome::Transferred { .. }));
    }
    let held = w.relay(0, 1, false);
    assert!(matches!(&held[..], [Outcome::Rejected(r)] if r.code == ErrorCode::ShardFrozen), "{held:?}");
    w.finish_move(1);
    // The old owner refuses them for good as moved; the payer's cell sends them on.
    let moved = w.relay(0, 1, false);
    assert_eq!(moved.len(), 3);
    assert!(moved.iter().all(|o| matches!(o, Outcome::CreditRefused { code: ErrorCode::ShardMoved, .. })), "{moved:?}");
    w.settle_all();
    assert_eq!(balance(&w.cells[2], &payee), 30, "each credit applied once, at the new owner");
    let statuses: Vec<TransferStatus> = (0..3)
        .map(|i| {
            let t = TransferId::new(&format!("c{i}")).unwrap();
            w.cells[0].ledger(false).transfers(&t, Some(&id(&bank)), &Authority::Admin)[0].status
        })
        .collect();
    assert_eq!(statuses, vec![TransferStatus::Settled; 3]);
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn a_credit_applied_before_the_move_whose_ack_was_lost_is_not_applied_again() {
    let (mut w, bank, _payer, payee) = funded();
    assert!(matches!(w.pay("once", &bank, &payee, 25), Outcome::Transferred { .. }));
    let applied = w.relay(0, 1, true);
    assert!(matches!(&applied[..], [Outcome::CreditApplied { duplicate: false }]), "{applied:?}");
    w.move_shard(1, 2);
    assert_eq!(balance(&w.cells[2], &payee), 25, "the credit moved with the payee");
    // The redelivery reaches the old owner, which remembers the number: applied.
    let again = w.relay(0, 1, false);
    assert!(matches!(&again[..], [Outcome::CreditApplied { duplicate: true }]), "{again:?}");
    w.settle_all();
    assert_eq!(balance(&w.cells[2], &payee), 25, "not applied twice");
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn a_credit_rerouted_by_its_old_number_is_caught() {
    // The mutation the design rules out: sending a credit stuck for the old
    // owner straight to the new one under the old stream's number.
    let (mut w, bank, _payer, payee) = funded();
    let third = w.name_in(2, 0);
    w.open(&third, false);
    assert!(matches!(w.pay("t1", &bank, &third, 1), Outcome::Transferred { .. }));
    w.settle_all();
    w.freeze(1, 2);
    assert!(matches!(w.pay("r1", &bank, &payee, 40), Outcome::Transferred { .. }));
    w.finish_move(1);
    let q = Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit: 10 };
    let QueryAnswer::Outbox(msgs) = w.cells[0].query(&q) else { panic!() };
    let wrong = w.cells[2].apply(&Command::real(Op::Credit(msgs[0].credit(CellId(0)))));
    assert!(matches!(wrong, Outcome::CreditApplied { duplicate: false }), "{wrong:?}");
    w.cells[0].apply(&Command::real(Op::Settle { dest: CellId(1), seq: msgs[0].seq }));
    let findings = w.audit();
    let kinds: Vec<&str> = findings.iter().map(Finding::kind).collect();
    assert_eq!(kinds, vec!["lost", "unsent"], "the pair reconciliation names both ends: {findings:?}");
}

#[test]
fn a_payer_with_a_message_in_flight_is_closed_before_the_shard_leaves() {
    let (mut w, _bank, payer, _payee) = funded();
    let far = w.name_in(0, 1);
    w.open(&far, false);
    // Cell 0 will refuse it: another currency.
    let usd_payee = w.name_in(0, 2);
    let out = w.cells[0].apply(&Command::real(Op::OpenAccount(OpenAccount {
        id: id(&usd_payee),
        currency: Currency::new("USD").unwrap(),
        overdraft: false,
        tenant: TenantId::default_tenant(),
    })));
    assert!(matches!(out, Outcome::AccountOpened { .. }));
    assert!(matches!(w.pay("x1", &payer, &usd_payee, 100), Outcome::Transferred { .. }));
    assert!(matches!(w.freeze(1, 2), Outcome::MoveStep { open_messages: 1, .. }));
    let early = w.cells[1].query(&Query::ExportShard { shard: 1, older_after: 0 });
    assert!(matches!(&early, QueryAnswer::Rejected(r) if r.code == ErrorCode::ShardFrozen), "{early:?}");
    // The payee's cell refuses during the freeze: the payer is compensated at its cell.
    let refused = w.relay(1, 0, false);
    assert!(matches!(&refused[..], [Outcome::CreditRefused { code: ErrorCode::CurrencyMismatch, .. }]));
    assert!(matches!(w.freeze(1, 2), Outcome::MoveStep { open_messages: 0, duplicate: true }));
    w.finish_move(1);
    assert_eq!(balance(&w.cells[2], &payer), 1000);
    let t = w.cells[2].ledger(false).transfers(&TransferId::new("x1").unwrap(), Some(&id(&payer)), &Authority::Admin);
    assert_eq!(t[0].status, TransferStatus::Reversed, "its status left pending and moved with it");
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn the_audit_catches_a_move_that_lost_or_changed_money() {
    // Lost: the source dropped the shard, the destination never counted it in.
    let (mut w, _, payer, _) = funded();
    let mut lost = w.clone_cells();
    w.move_shard(1, 2);
    lost[0] = w.cells[0].clone();
    lost[1] = w.cells[1].clone();
    let found = audit_states(&lost, false);
    assert!(found.iter().any(|f| matches!(f, Finding::MoveLost { amount: 1000, .. })), "{found:?}");
    // Changed: the destination installed a shard whose balance was altered on the way.
    let (mut w, _, _, _) = funded();
    w.freeze(1, 2);
    let QueryAnswer::ShardExport(mut export) = w.cells[1].query(&Query::ExportShard { shard: 1, older_after: 0 })
    else {
        panic!()
    };
    let k = export.real.accounts.iter().position(|a| a.id.as_str() == payer).unwrap();
    export.real.accounts[k].balance += 1;
    w.cells[2].apply(&Command::real(Op::InstallShard(export)));
    // (Undecided, the copy is nobody's money yet; the map decides the move.)
    let mut owners = w.map.owners().to_vec();
    owners[1] = CellId(2);
    w.map = ShardMap::new(2, owners).unwrap();
    for c in &mut w.cells {
        c.apply(&Command::real(Op::InstallShardMap(w.map.clone())));
    }
    let found = w.audit();
    assert!(found.iter().any(|f| matches!(f, Finding::MoveDiverged { transient: false, .. })), "{found:?}");
}

#[test]
fn a_credit_refused_as_moved_goes_back_to_a_shard_that_came_back() {
    let (mut w, bank, _payer, payee) = funded();
    w.freeze(1, 2);
    assert!(matches!(w.pay("c1", &bank, &payee, 10), Outcome::Transferred { .. }));
    w.finish_move(1);
    // Refused at the old owner as moved; the close never reached the payer's cell.
    let moved = w.relay(0, 1, true);
    assert!(matches!(&moved[..], [Outcome::CreditRefused { code: ErrorCode::ShardMoved, .. }]), "{moved:?}");
    // The shard comes back before the payer's cell sends the credit on.
    w.move_shard(1, 1);
    w.settle_all();
    assert_eq!(balance(&w.cells[1], &payee), 10, "applied once, where the shard is now");
    let t = w.cells[0].ledger(false).transfers(&TransferId::new("c1").unwrap(), Some(&id(&bank)), &Authority::Admin);
    assert_eq!(t[0].status, TransferStatus::Settled);
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn a_snapshot_keeps_moves_freezes_and_shards_that_came_back() {
    let (mut w, bank, _payer, payee) = funded();
    w.move_shard(1, 2);
    w.move_shard(1, 1);
    w.freeze(4, 0);
    assert!(matches!(w.pay("after", &bank, &payee, 3), Outcome::Transferred { .. }));
    w.settle_all();
    assert_eq!(balance(&w.cells[1], &payee), 3);
    for c in &w.cells {
        let decoded = snapshot::decode(&snapshot::encode(c)).unwrap();
        assert_eq!(&decoded, c);
        assert_eq!(decoded.frozen_shards(), c.frozen_shards());
        assert_eq!(decoded.moved_away(), c.moved_away());
        assert_eq!(decoded.ledger(false).accounts_len(), c.ledger(false).accounts_len());
    }
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn the_log_codec_carries_every_move_step() {
    let (mut w, _, _, _) = funded();
    w.freeze(1, 2);
    let QueryAnswer::ShardExport(export) = w.cells[1].query(&Query::ExportShard { shard: 1, older_after: 0 }) else {
        panic!()
    };
    let commands = [
        Command::real(Op::FreezeShard { shard: 1, move_id: 2, to: CellId(2) }),
        Command::real(Op::UnfreezeShard { shard: 1, move_id: 2 }),
        Command::real(Op::InstallShard(export)),
        Command::real(Op::DiscardShard { shard: 1, move_id: 2 }),
        Command::real(Op::DropShard { shard: 1, move_id: 2 }),
    ];
    let mut batch = codec::Writer::default();
    codec::encode_batch(&mut batch, 7, commands.iter());
    let decoded = codec::decode_batch(&batch.buf).unwrap();
    assert_eq!(decoded.commands, commands);
}

impl World {
    fn clone_cells(&self) -> Vec<CellState> {
        self.cells.clone()
    }
}

#[test]
fn a_move_that_loses_its_epoch_is_undone_on_both_sides_by_the_map() {
    let (mut w, _bank, payer, payee) = funded();
    w.freeze(1, 2);
    let QueryAnswer::ShardExport(export) = w.cells[1].query(&Query::ExportShard { shard: 1, older_after: 0 }) else {
        panic!()
    };
    w.cells[2].apply(&Command::real(Op::InstallShard(export)));
    // Another map won epoch 2 (the shard stays at cell 1): both cells follow it.
    let other = ShardMap::new(2, w.map.owners().to_vec()).unwrap();
    w.map = other.clone();
    for c in &mut w.cells {
        c.apply(&Command::real(Op::InstallShardMap(other.clone())));
    }
    assert!(w.cells[1].frozen_shards().is_empty(), "the source serves the shard again");
    assert!(w.cells[2].ledger(false).account(&id(&payer)).is_none(), "the destination undid its install");
    assert!(matches!(w.pay("after", &payer, &payee, 1), Outcome::Transferred { created: true, .. }));
    assert_eq!(w.audit(), vec![]);
}

#[test]
fn a_freeze_lifted_before_the_new_epoch_is_durable_is_caught() {
    // The mutation the freeze rules out: the source serves the shard again
    // while the destination holds its copy, then the map gives it away.
    let (mut w, _bank, payer, payee) = funded();
    w.freeze(1, 2);
    let QueryAnswer::ShardExport(export) = w.cells[1].query(&Query::ExportShard { shard: 1, older_after: 0 }) else {
        panic!()
    };
    w.cells[2].apply(&Command::real(Op::InstallShard(export.clone())));
    w.cells[1].apply(&Command::real(Op::UnfreezeShard { shard: 1, move_id: export.move_id }));
    assert!(matches!(w.pay("late", &payer, &payee, 5), Outcome::Transferred { created: true, .. }));
    let mut owners = w.map.owners().to_vec();
    owners[1] = CellId(2);
    w.map = ShardMap::new(export.move_id, owners).unwrap();
    for c in &mut w.cells {
        c.apply(&Command::real(Op::InstallShardMap(w.map.clone())));
    }
    let found = w.audit();
    assert!(found.iter().any(|f| matches!(f, Finding::MoveDiverged { .. })), "{found:?}");
}

#[test]
fn a_credit_meant_for_another_cell_is_refused_even_when_its_payee_moved_here() {
    // A stale address delivers a relay's call for the old owner to the new one.
    let (mut w, bank, _payer, payee) = funded();
    w.freeze(1, 2);
    assert!(matches!(w.pay("m1", &bank, &payee, 10), Outcome::Transferred { .. }));
    w.finish_move(1);
    let q = Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit: 10 };
    let QueryAnswer::Outbox(msgs) = w.cells[0].query(&q) else { panic!() };
    let before = w.cells[2].clone();
    let out = w.cells[2].apply(&Command::real(Op::Credit(msgs[0].credit_to(CellId(0), CellId(1)))));
    assert!(matches!(&out, Outcome::Rejected(r) if r.code == ErrorCode::WrongCell), "{out:?}");
    assert_eq!(w.cells[2], before, "nothing changed");
}

#[test]
fn an_install_that_arrives_after_the_map_decided_its_move_is_refused() {
    let (mut w, _bank, payer, _payee) = funded();
    w.freeze(1, 2);
    let QueryAnswer::ShardExport(export) = w.cells[1].query(&Query::ExportShard { shard: 1, older_after: 0 }) else {
        panic!()
    };
    // The coordinator died; the next one took the epoch with the shard where it was.
    let stay = ShardMap::new(2, w.map.owners().to_vec()).unwrap();
    for c in &mut w.cells {
        c.apply(&Command::real(Op::InstallShardMap(stay.clone())));
    }
    // The dead coordinator's install arrives late.
    let late = w.cells[2].apply(&Command::real(Op::InstallShard(export)));
    assert!(matches!(&late, Outcome::Rejected(r) if r.code == ErrorCode::InvalidRequest), "{late:?}");
    assert!(w.cells[2].ledger(false).account(&id(&payer)).is_none());
    assert_eq!(w.audit(), vec![]);
}
