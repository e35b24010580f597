//! The ledger's rules, case by case: each error code of a transfer, the
//! cross-cell flow to `settled` and to `reversed`, history paging, and the
//! retention limits.

mod common;

use cellpay_core::*;
use common::{id, transfer};

fn open(cell: &mut CellState, name: &str, currency: &str, overdraft: bool) -> Outcome {
    let currency = Currency::new(currency).unwrap();
    cell.apply(&Command::real(Op::OpenAccount(OpenAccount {
        id: id(name),
        currency,
        overdraft,
        tenant: TenantId::default_tenant(),
    })))
}

fn pay(cell: &mut CellState, tid: &str, from: &str, to: &str, amount: i64) -> Outcome {
    cell.apply(&transfer(tid, from, to, amount))
}

fn code(o: &Outcome) -> Option<ErrorCode> {
    match o {
        Outcome::Rejected(r) => Some(r.code),
        _ => None,
    }
}

fn balance(cell: &CellState, name: &str) -> i64 {
    cell.ledger(false).account(&id(name)).unwrap().balance
}

fn single_cell(limits: Limits) -> CellState {
    let mut cell = CellState::new(CellId(0), ShardMap::round_robin(16, 1).unwrap(), limits);
    open(&mut cell, "bank", "CNY", true);
    open(&mut cell, "alice", "CNY", false);
    open(&mut cell, "bob", "CNY", false);
    open(&mut cell, "yen", "JPY", false);
    cell
}

#[test]
fn every_transfer_rule_has_its_error_code_and_changes_nothing() {
    let mut cell = single_cell(Limits::default());
    assert!(code(&pay(&mut cell, "f1", "bank", "alice", 100)).is_none());
    let before = cell.clone();
    assert_eq!(code(&pay(&mut cell, "x1", "alice", "bob", 101)), Some(ErrorCode::InsufficientFunds));
    assert_eq!(code(&pay(&mut cell, "x2", "alice", "alice", 1)), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(&pay(&mut cell, "x3", "alice", "bob", 0)), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(&pay(&mut cell, "x4", "alice", "bob", -5)), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(&pay(&mut cell, "x5", "alice", "bob", AMOUNT_MAX + 1)), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(&pay(&mut cell, "x6", "alice", "nobody", 1)), Some(ErrorCode::AccountNotFound));
    assert_eq!(code(&pay(&mut cell, "x7", "nobody", "alice", 1)), Some(ErrorCode::AccountNotFound));
    assert_eq!(code(&pay(&mut cell, "x8", "alice", "yen", 1)), Some(ErrorCode::CurrencyMismatch));
    assert_eq!(code(&pay(&mut cell, "f1", "bank", "alice", 99)), Some(ErrorCode::Conflict));
    let usd = Transfer {
        id: TransferId::new("x9").unwrap(),
        from: id("alice"),
        to: id("bob"),
        amount: 1,
        currency: Some(Currency::new("USD").unwrap()),
        memo: None,
        by: Authority::Admin,
    };
    assert_eq!(code(&cell.apply(&Command::real(Op::Transfer(usd)))), Some(ErrorCode::CurrencyMismatch));
    let memo = Transfer {
        id: TransferId::new("x10").unwrap(),
        from: id("alice"),
        to: id("bob"),
        amount: 1,
        currency: None,
        memo: Some("m".repeat(MEMO_BYTES_MAX + 1).into()),
        by: Authority::Admin,
    };
    assert_eq!(code(&cell.apply(&Command::real(Op::Transfer(memo)))), Some(ErrorCode::InvalidRequest));
    assert!(cell == before, "rejections change nothing");
    // The idempotent replay answers the original transfer and changes nothing.
    assert!(matches!(pay(&mut cell, "f1", "bank", "alice", 100), Outcome::Transferred { created: false, .. }));
    assert!(cell == before);
}

#[test]
fn balances_never_wrap() {
    let mut cell = single_cell(Limits::default());
    // The bank's balance heads toward i64::MIN; alice's toward i64::MAX.
    let mut i = 0;
    loop {
        i += 1;
        let out = pay(&mut cell, &format!("big{i}"), "bank", "alice", AMOUNT_MAX);
        if let Some(c) = code(&out) {
            assert_eq!(c, ErrorCode::BalanceOverflow);
            break;
        }
    }
    assert!(balance(&cell, "alice") > i64::MAX - AMOUNT_MAX);
    assert_eq!(balance(&cell, "bank"), -balance(&cell, "alice"));
}

#[test]
fn an_account_reopened_with_other_attributes_is_a_conflict() {
    let mut cell = single_cell(Limits::default());
    assert!(matches!(open(&mut cell, "alice", "CNY", false), Outcome::AccountOpened { created: false, .. }));
    assert_eq!(code(&open(&mut cell, "alice", "CNY", true)), Some(ErrorCode::Conflict));
    assert_eq!(code(&open(&mut cell, "alice", "USD", false)), Some(ErrorCode::Conflict));
}

fn two_cells() -> (CellState, CellState, String, String) {
    let map = ShardMap::round_robin(16, 2).unwrap();
    let mut a = CellState::new(CellId(0), map.clone(), Limits::default());
    let mut b = CellState::new(CellId(1), map.clone(), Limits::default());
    let in_a = (0..).map(|i| format!("p{i}")).find(|n| map.owner_of(n) == CellId(0)).unwrap();
    let in_b = (0..).map(|i| format!("q{i}")).find(|n| map.owner_of(n) == CellId(1)).unwrap();
    open(&mut a, &in_a, "CNY", true);
    open(&mut b, &in_b, "CNY", false);
    (a, b, in_a, in_b)
}

/// The pair reconciliation of a → b (real ledger), both read at this moment.
fn reconcile(a: &CellState, b: &CellState) -> Option<Finding> {
    reconcile_states(a, b, false)
}

fn credit_for(a: &CellState, dest: CellId) -> Credit {
    let QueryAnswer::Outbox(msgs) = a.query(&Query::Outbox { shadow: false, dest, after_seq: 0, limit: 10 }) else {
        panic!()
    };
    msgs[0].credit(a.cell())
}

fn status(cell: &CellState, tid: &str) -> TransferStatus {
    let q = Query::Transfer { shadow: false, id: TransferId::new(tid).unwrap(), from: None, by: Authority::Admin };
    let QueryAnswer::Transfers(t) = cell.query(&q) else { panic!() };
    assert_eq!(t.len(), 1, "one payer used {tid}");
    t[0].status
}

#[test]
fn a_cross_cell_transfer_goes_pending_then_settled() {
    let (mut a, mut b, payer, payee) = two_cells();
    let out = pay(&mut a, "x", &payer, &payee, 70);
    assert!(matches!(out, Outcome::Transferred { outbox: Some((CellId(1), 1)), .. }));
    assert_eq!(status(&a, "x"), TransferStatus::Pending);
    let credit = credit_for(&a, CellId(1));
    assert_eq!(b.apply(&Command::real(Op::Credit(credit.clone()))), Outcome::CreditApplied { duplicate: false });
    assert_eq!(b.apply(&Command::real(Op::Credit(credit))), Outcome::CreditApplied { duplicate: true });
    assert_eq!(balance(&b, &payee), 70);
    a.apply(&Command::real(Op::Settle { dest: CellId(1), seq: 1 }));
    assert_eq!(status(&a, "x"), TransferStatus::Settled);
    assert_eq!(a.ledger(false).figures().cell_term(), 0);
    assert_eq!(b.ledger(false).figures().cell_term(), 0);
    assert_eq!(reconcile(&a, &b), None);
}

#[test]
fn a_credit_the_payee_cell_refuses_is_reversed_and_the_payer_made_whole() {
    let (mut a, mut b, payer, _) = two_cells();
    let map = a.shard_map().clone();
    let ghost = (0..).map(|i| format!("ghost{i}")).find(|n| map.owner_of(n) == CellId(1)).unwrap();
    pay(&mut a, "y", &payer, &ghost, 30);
    assert_eq!(balance(&a, &payer), -30);
    let credit = credit_for(&a, CellId(1));
    let refused = b.apply(&Command::real(Op::Credit(credit)));
    assert_eq!(refused, Outcome::CreditRefused { code: ErrorCode::AccountNotFound, duplicate: false });
    let out = a.apply(&Command::real(Op::Compensate { dest: CellId(1), seq: 1, reason: ErrorCode::AccountNotFound }));
    assert_eq!(out, Outcome::OutboxClosed { status: TransferStatus::Reversed, duplicate: false });
    assert_eq!(balance(&a, &payer), 0);
    assert_eq!(status(&a, "y"), TransferStatus::Reversed);
    let QueryAnswer::Entries(e) =
        a.query(&Query::Entries { shadow: false, account: id(&payer), limit: 10, before: None, by: Authority::Admin })
    else {
        panic!()
    };
    assert_eq!(e.iter().map(|e| e.kind).collect::<Vec<_>>(), vec![EntryKind::Reversal, EntryKind::Debit]);
}

#[test]
fn credits_out_of_order_are_refused_without_effect() {
    let (mut a, mut b, payer, payee) = two_cells();
    pay(&mut a, "1", &payer, &payee, 1);
    pay(&mut a, "2", &payer, &payee, 2);
    let QueryAnswer::Outbox(msgs) = a.query(&Query::Outbox { shadow: false, dest: CellId(1), after_seq: 1, limit: 10 })
    else {
        panic!()
    };
    let second = msgs[0].credit(CellId(0));
    assert_eq!(code(&b.apply(&Command::real(Op::Credit(second)))), Some(ErrorCode::OutOfOrder));
    assert_eq!(balance(&b, &payee), 0);
}

#[test]
fn history_pages_newest_first_and_old_entries_leave_the_window() {
    let mut cell = single_cell(Limits { transfers_retained_max: 1000, history_entries_max: 10 });
    for i in 0..8 {
        pay(&mut cell, &format!("h{i}"), "bank", "alice", i + 1);
    }
    let page = |before| {
        let QueryAnswer::Entries(e) =
            cell.query(&Query::Entries { shadow: false, account: id("alice"), limit: 3, before, by: Authority::Admin })
        else {
            panic!()
        };
        e
    };
    let first = page(None);
    assert_eq!(first.iter().map(|e| e.amount).collect::<Vec<_>>(), vec![8, 7, 6]);
    assert_eq!(first[0].balance_after, 36);
    let second = page(Some(first[2].seq));
    assert_eq!(second.iter().map(|e| e.amount).collect::<Vec<_>>(), vec![5, 4], "older ones left the window");
    // 16 entries were written to a window of 10: alice keeps only her newest 5.
    let QueryAnswer::Entries(all) = cell.query(&Query::Entries {
        shadow: false,
        account: id("alice"),
        limit: 100,
        before: None,
        by: Authority::Admin,
    }) else {
        panic!()
    };
    assert_eq!(all.len(), 5);
    let bad = cell.query(&Query::Entries {
        shadow: false,
        account: id("alice"),
        limit: ENTRIES_PAGE_MAX + 1,
        before: None,
        by: Authority::Admin,
    });
    assert!(matches!(bad, QueryAnswer::Rejected(r) if r.code == ErrorCode::InvalidRequest));
}

#[test]
fn idempotency_records_are_kept_up_to_the_retention_limit() {
    let mut cell = single_cell(Limits { transfers_retained_max: 4, history_entries_max: 100 });
    for i in 0..6 {
        pay(&mut cell, &format!("r{i}"), "bank", "alice", 1);
    }
    // Records leave memory between batches, never inside one.
    assert!(matches!(pay(&mut cell, "r0", "bank", "alice", 1), Outcome::Transferred { created: false, .. }));
    cell.end_batch();
    // r0 and r1 fell out of the window of 4; r2..r5 are still known.
    assert!(matches!(pay(&mut cell, "r5", "bank", "alice", 1), Outcome::Transferred { created: false, .. }));
    assert!(matches!(pay(&mut cell, "r2", "bank", "alice", 1), Outcome::Transferred { created: false, .. }));
    assert_eq!(balance(&cell, "alice"), 6);
    let q = cell.query(&Query::Transfer {
        shadow: false,
        id: TransferId::new("r0").unwrap(),
        from: None,
        by: Authority::Admin,
    });
    assert_eq!(q, QueryAnswer::Transfers(vec![]));
}

#[test]
fn a_new_shard_map_needs_a_higher_epoch_and_fences_moved_shards() {
    let mut cell = single_cell(Limits::default());
    let stale = ShardMap::round_robin(16, 1).unwrap();
    assert_eq!(code(&cell.apply(&Command::real(Op::InstallShardMap(stale)))), Some(ErrorCode::InvalidRequest));
    // Move every shard away from cell 0: its accounts are now fenced (I6).
    let moved = ShardMap::new(2, vec![CellId(1); 16]).unwrap();
    assert_eq!(cell.apply(&Command::real(Op::InstallShardMap(moved))), Outcome::ShardMapInstalled { epoch: 2 });
    assert_eq!(code(&pay(&mut cell, "z", "bank", "alice", 1)), Some(ErrorCode::WrongCell));
}
