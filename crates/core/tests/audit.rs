//! The audit can fail: each test injects one way money goes wrong between
//! cells (a payee restored from an old copy, a credit applied twice under two
//! numbers, a source that reuses sequence numbers) and sees the pair
//! reconciliation name it. Also: transfer ids are unique per payer, and the
//! outbox towards one cell is bounded.

mod common;

use cellpay_core::*;
use common::{cny, id, open, transfer};

/// Two cells; `payer` (overdraft) and `other` live in cell 0, `payee` in cell 1.
fn two_cells() -> (CellState, CellState, String, String, String) {
    let map = ShardMap::round_robin(16, 2).unwrap();
    let mut a = CellState::new(CellId(0), map.clone(), Limits::default());
    let mut b = CellState::new(CellId(1), map.clone(), Limits::default());
    let in_cell = |c: u32, skip: usize| {
        (0..).map(|i| format!("acct{c}-{i}")).filter(|n| map.owner_of(n) == CellId(c)).nth(skip).unwrap()
    };
    let (payer, other, payee) = (in_cell(0, 0), in_cell(0, 1), in_cell(1, 0));
    open(&mut a, &payer, true);
    open(&mut a, &other, true);
    open(&mut b, &payee, false);
    (a, b, payer, other, payee)
}

/// One relay round a → b: every open message is credited at b and closed at a.
fn relay(a: &mut CellState, b: &mut CellState) {
    let q = Query::Outbox { shadow: false, dest: b.cell(), after_seq: 0, limit: usize::MAX };
    let QueryAnswer::Outbox(msgs) = a.query(&q) else { panic!() };
    for m in msgs {
        let op = match b.apply(&Command::real(Op::Credit(m.credit(a.cell())))) {
            Outcome::CreditApplied { .. } => Op::Settle { dest: b.cell(), seq: m.seq },
            Outcome::CreditRefused { code, .. } => Op::Compensate { dest: b.cell(), seq: m.seq, reason: code },
            other => panic!("credit {} answered {other:?}", m.seq),
        };
        assert!(matches!(a.apply(&Command::real(op)), Outcome::OutboxClosed { duplicate: false, .. }));
    }
}

/// The three reads of the pair reconciliation, in their order.
fn reconcile(a: &CellState, b: &CellState) -> Option<Finding> {
    reconcile_states(a, b, false)
}

#[test]
fn a_payee_cell_restored_from_an_old_copy_is_lost_money_named_by_pair_sequence_and_amount() {
    let (mut a, mut b, payer, _, payee) = two_cells();
    for i in 0..10 {
        a.apply(&transfer(&format!("early{i}"), &payer, &payee, 5));
    }
    relay(&mut a, &mut b);
    let old_copy = b.clone();
    for i in 0..30 {
        a.apply(&transfer(&format!("t{i}"), &payer, &payee, 7));
    }
    relay(&mut a, &mut b);
    assert_eq!(reconcile(&a, &b), None, "sound before the restore");
    // Each cell on its own still balances: the old check could not see it.
    assert_eq!(a.ledger(false).figures().cell_term() + old_copy.ledger(false).figures().cell_term(), 0);
    let found = reconcile(&a, &old_copy);
    let lost = Finding::Lost { source: CellId(0), dest: CellId(1), first_seq: 11, last_seq: 40, amount: 210 };
    assert_eq!(found, Some(lost.clone()));
    assert!(lost.to_string().contains("11..=40") && lost.to_string().contains("210 lost"), "{lost}");
}

#[test]
fn a_credit_applied_twice_under_two_numbers_is_created_money() {
    let (mut a, mut b, payer, _, payee) = two_cells();
    a.apply(&transfer("t1", &payer, &payee, 40));
    relay(&mut a, &mut b);
    // The same message again under the next number, as a buggy or forged relay would send it.
    let q = Query::Transfer { shadow: false, id: TransferId::new("t1").unwrap(), from: None, by: Authority::Admin };
    assert!(matches!(a.query(&q), QueryAnswer::Transfers(t) if t.len() == 1));
    let dup = Credit {
        source: CellId(0),
        dest: None,
        seq: 2,
        transfer: TransferId::new("t1").unwrap(),
        from: id(&payer),
        to: id(&payee),
        amount: 40,
        currency: cny(),
    };
    assert_eq!(b.apply(&Command::real(Op::Credit(dup))), Outcome::CreditApplied { duplicate: false });
    let found = reconcile(&a, &b);
    let unsent = Finding::Unsent { source: CellId(0), dest: CellId(1), first_seq: 2, last_seq: 2, amount: 40 };
    assert_eq!(found, Some(unsent));
}

#[test]
fn a_source_that_reuses_sequence_numbers_is_refused_loudly_and_named_by_the_audit() {
    let (mut a, mut b, payer, _, payee) = two_cells();
    let old_copy = a.clone();
    a.apply(&transfer("t1", &payer, &payee, 40));
    relay(&mut a, &mut b);
    // The source is restored from before t1 and makes another transfer: it
    // gets sequence 1 again, carrying another message.
    let mut a = old_copy;
    a.apply(&transfer("t2", &payer, &payee, 99));
    let q = Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit: 1 };
    let QueryAnswer::Outbox(msgs) = a.query(&q) else { panic!() };
    assert_eq!(msgs[0].seq, 1);
    let before = b.clone();
    let answer = b.apply(&Command::real(Op::Credit(msgs[0].credit(CellId(0)))));
    assert!(matches!(&answer, Outcome::Rejected(r) if r.code == ErrorCode::SequenceReused), "{answer:?}");
    assert!(b == before, "the refusal changed nothing");
    // The restored source sent sequence 1 again, so nothing looks unsent, but
    // the two books hold different messages under it.
    let found = reconcile(&a, &b);
    assert!(matches!(found, Some(Finding::Diverged { through: 1, .. })), "{found:?}");
}

#[test]
fn books_that_disagree_about_an_outcome_diverge() {
    let (mut a, mut b, payer, _, payee) = two_cells();
    a.apply(&transfer("t1", &payer, &payee, 40));
    let q = Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit: 1 };
    let QueryAnswer::Outbox(msgs) = a.query(&q) else { panic!() };
    assert_eq!(
        b.apply(&Command::real(Op::Credit(msgs[0].credit(CellId(0))))),
        Outcome::CreditApplied { duplicate: false }
    );
    // The source compensates what the payee applied: the payer is paid twice.
    let wrong = Op::Compensate { dest: CellId(1), seq: 1, reason: ErrorCode::AccountNotFound };
    assert!(matches!(a.apply(&Command::real(wrong)), Outcome::OutboxClosed { duplicate: false, .. }));
    assert!(matches!(reconcile(&a, &b), Some(Finding::Diverged { through: 1, .. })));
}

#[test]
fn messages_close_in_sequence_order() {
    let (mut a, _, payer, _, payee) = two_cells();
    a.apply(&transfer("t1", &payer, &payee, 1));
    a.apply(&transfer("t2", &payer, &payee, 2));
    let early = a.apply(&Command::real(Op::Settle { dest: CellId(1), seq: 2 }));
    assert!(matches!(&early, Outcome::Rejected(r) if r.code == ErrorCode::OutOfOrder), "{early:?}");
    assert!(matches!(a.apply(&Command::real(Op::Settle { dest: CellId(1), seq: 1 })), Outcome::OutboxClosed { .. }));
    assert!(matches!(a.apply(&Command::real(Op::Settle { dest: CellId(1), seq: 2 })), Outcome::OutboxClosed { .. }));
}

#[test]
fn a_transfer_id_is_unique_per_payer_not_per_cell() {
    let (mut a, mut b, payer, other, payee) = two_cells();
    let first = a.apply(&transfer("same", &payer, &payee, 10));
    let second = a.apply(&transfer("same", &other, &payee, 20));
    assert!(matches!(first, Outcome::Transferred { created: true, .. }));
    assert!(matches!(second, Outcome::Transferred { created: true, .. }), "{second:?}");
    // Each is idempotent on its own payer + id.
    assert!(matches!(a.apply(&transfer("same", &other, &payee, 20)), Outcome::Transferred { created: false, .. }));
    let conflict = a.apply(&transfer("same", &payer, &payee, 11));
    assert!(matches!(&conflict, Outcome::Rejected(r) if r.code == ErrorCode::Conflict));
    relay(&mut a, &mut b);
    assert_eq!(b.ledger(false).account(&id(&payee)).unwrap().balance, 30);
    let read = |from: Option<&str>| {
        let q = Query::Transfer {
            shadow: false,
            id: TransferId::new("same").unwrap(),
            from: from.map(id),
            by: Authority::Admin,
        };
        let QueryAnswer::Transfers(t) = a.query(&q) else { panic!() };
        t.iter().map(|t| (t.from.to_string(), t.amount)).collect::<Vec<_>>()
    };
    assert_eq!(read(Some(&payer)), vec![(payer.clone(), 10)]);
    assert_eq!(read(Some(&other)), vec![(other.clone(), 20)]);
    assert_eq!(read(None).len(), 2, "a read without the payer sees both");
    // A snapshot keeps both, and the per-payer index.
    let decoded = snapshot::decode(&snapshot::encode(&a)).unwrap();
    assert!(decoded == a);
}

#[test]
fn the_outbox_towards_one_cell_is_bounded_and_a_refusal_changes_nothing() {
    let (mut a, mut b, payer, _, payee) = two_cells();
    let admission = Admission { outbox_messages_max: 3, ..Admission::UNLIMITED };
    for i in 0..3 {
        assert!(matches!(
            a.admit(&transfer(&format!("t{i}"), &payer, &payee, 1), &admission),
            Outcome::Transferred { .. }
        ));
    }
    let before = a.clone();
    let full = a.admit(&transfer("t3", &payer, &payee, 1), &admission);
    assert!(matches!(&full, Outcome::Rejected(r) if r.code == ErrorCode::OutboxFull), "{full:?}");
    assert_eq!(ErrorCode::OutboxFull.http_status(), 503);
    assert!(a == before, "the refusal changed nothing");
    relay(&mut a, &mut b);
    assert!(matches!(a.admit(&transfer("t3", &payer, &payee, 1), &admission), Outcome::Transferred { .. }));
}

#[test]
fn the_inbox_tail_answers_redeliveries_and_the_audit_within_its_window_only() {
    let (mut a, mut b, payer, _, payee) = two_cells();
    let n = INBOX_TAIL_RETAINED as u64 + 10;
    for i in 0..n {
        a.apply(&transfer(&format!("t{i}"), &payer, &payee, 1));
    }
    let q = Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit: usize::MAX };
    let QueryAnswer::Outbox(msgs) = a.query(&q) else { panic!() };
    for m in &msgs {
        b.apply(&Command::real(Op::Credit(m.credit(CellId(0)))));
    }
    let newest = msgs.last().unwrap().credit(CellId(0));
    assert_eq!(b.apply(&Command::real(Op::Credit(newest))), Outcome::CreditApplied { duplicate: true });
    let oldest = msgs[0].credit(CellId(0));
    let out = b.apply(&Command::real(Op::Credit(oldest)));
    assert!(matches!(&out, Outcome::Rejected(r) if r.code == ErrorCode::OutOfOrder), "{out:?}");
    // Nothing closed yet and the tail no longer reaches back to 0: unverified, never ok.
    assert!(matches!(reconcile(&a, &b), Some(Finding::Unverified { seq: 0, .. })));
    for m in &msgs {
        assert!(matches!(
            a.apply(&Command::real(Op::Settle { dest: CellId(1), seq: m.seq })),
            Outcome::OutboxClosed { .. }
        ));
    }
    assert_eq!(reconcile(&a, &b), None);
}
