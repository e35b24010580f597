//! The idempotency window is measured in time: a retry within it answers the
//! original transfer and pays nothing; a record older than it counts as gone;
//! an id that carries its own time (a UUIDv7) and is older than the window is
//! refused with `idempotency_expired` instead of being paid again. The clock
//! is the cell's, set per batch, never the wall clock read inside the core.

mod common;

use cellpay_core::*;
use common::{cny, id, open, transfer as pay};

const WINDOW_MS: u64 = 60_000;
const T0: u64 = 1_800_000_000_000;

fn admission() -> Admission {
    Admission { idempotency_window_ms: WINDOW_MS, ..Admission::UNLIMITED }
}

/// One cell with a funded payer `p` and a payee `q`, its clock at `T0`.
fn cell(limits: Limits) -> CellState {
    let mut c = CellState::new(CellId(0), ShardMap::round_robin(16, 1).unwrap(), limits);
    c.advance_clock(T0);
    for (name, overdraft) in [("bank", true), ("p", false), ("q", false)] {
        open(&mut c, name, overdraft);
    }
    assert!(c.admit(&pay("fund", "bank", "p", 1_000_000), &admission()).changed_state());
    c
}

fn balance(c: &CellState, name: &str) -> i64 {
    c.ledger(false).account(&id(name)).unwrap().balance
}

/// A UUIDv7 transfer id made at `ms`.
fn uuid_v7(ms: u64, tail: u64) -> String {
    let h = format!("{ms:012x}");
    format!("{}-{}-7{:03x}-8{:03x}-{:012x}", &h[..8], &h[8..12], tail & 0xfff, tail & 0xfff, tail)
}

#[test]
fn a_retry_within_the_window_pays_nothing_and_one_after_it_is_new() {
    let mut c = cell(Limits::default());
    assert!(matches!(c.admit(&pay("t1", "p", "q", 10), &admission()), Outcome::Transferred { created: true, .. }));
    c.advance_clock(T0 + WINDOW_MS);
    let retry = c.admit(&pay("t1", "p", "q", 10), &admission());
    assert!(matches!(retry, Outcome::Transferred { created: false, .. }), "at the window's edge: {retry:?}");
    assert_eq!(balance(&c, "q"), 10);
    // One millisecond past the promise, an id without a time is a new payment:
    // that is what the window promises, and the product says which window it holds.
    c.advance_clock(T0 + WINDOW_MS + 1);
    let late = c.admit(&pay("t1", "p", "q", 10), &admission());
    assert!(matches!(late, Outcome::Transferred { created: true, .. }), "{late:?}");
    assert_eq!(balance(&c, "q"), 20);
    // The newest record of the key answers from then on.
    let again = c.admit(&pay("t1", "p", "q", 10), &admission());
    assert!(matches!(again, Outcome::Transferred { created: false, .. }), "{again:?}");
}

#[test]
fn an_id_that_carries_its_time_is_refused_past_the_window_and_changes_nothing() {
    let mut c = cell(Limits::default());
    let fresh = uuid_v7(T0 - 1_000, 1);
    assert!(matches!(c.admit(&pay(&fresh, "p", "q", 10), &admission()), Outcome::Transferred { created: true, .. }));
    // A UUIDv7 made before the window: refused, not paid.
    let old = uuid_v7(T0 - WINDOW_MS - 1, 2);
    let before = c.clone();
    let answer = c.admit(&pay(&old, "p", "q", 10), &admission());
    assert!(matches!(&answer, Outcome::Rejected(r) if r.code == ErrorCode::IdempotencyExpired), "{answer:?}");
    assert!(c == before, "a refusal changes nothing");
    // The fresh one, retried after the window has passed over it: its record
    // counts as gone, and its id's time says it is a retry, so it is refused.
    c.advance_clock(T0 + WINDOW_MS + 1);
    let retry = c.admit(&pay(&fresh, "p", "q", 10), &admission());
    assert!(matches!(&retry, Outcome::Rejected(r) if r.code == ErrorCode::IdempotencyExpired), "{retry:?}");
    assert_eq!(balance(&c, "q"), 10, "paid once");
    assert_eq!(ErrorCode::IdempotencyExpired.http_status(), 409);
    assert_eq!(ErrorCode::IdempotencyExpired.as_str(), "idempotency_expired");
}

#[test]
fn replay_applies_a_logged_transfer_without_the_lookup() {
    // A logged transfer was new when it was admitted: replay must apply it
    // even if an older record of the key is still in memory (one the
    // original lookup counted as gone, past the window).
    let mut c = cell(Limits::default());
    assert!(c.admit(&pay("t1", "p", "q", 10), &admission()).changed_state());
    c.advance_clock(T0 + WINDOW_MS + 1);
    let mut replayed = c.clone();
    let cmd = pay("t1", "p", "q", 10);
    assert!(c.admit(&cmd, &admission()).changed_state());
    assert!(replayed.replay(&cmd).changed_state(), "replay does not look the key up");
    assert!(replayed == c);
}

#[test]
fn the_window_held_is_the_promise_until_records_leave_memory_then_their_age() {
    let limits = Limits { transfers_retained_max: 4, ..Limits::default() };
    let mut c = cell(limits);
    let reach = c.ledger(false).idempotency_reach();
    assert_eq!(reach.window_held_ms(c.clock_ms(), WINDOW_MS), WINDOW_MS, "nothing dropped yet");
    for i in 0..3 {
        c.advance_clock(T0 + 1_000 * (i + 1));
        assert!(c.admit(&pay(&format!("t{i}"), "p", "q", 1), &admission()).changed_state());
        c.end_batch();
    }
    // 4 records (the funding and t0..t2) fill memory; the next drops the funding record.
    c.advance_clock(T0 + 10_000);
    assert!(c.admit(&pay("t3", "p", "q", 1), &admission()).changed_state());
    c.end_batch();
    let reach = c.ledger(false).idempotency_reach();
    assert_eq!((reach.records_held, reach.records_dropped), (4, 1));
    assert_eq!(reach.oldest_at_ms, Some(T0 + 1_000));
    assert_eq!(reach.window_held_ms(c.clock_ms(), WINDOW_MS), 9_000, "the age of the oldest record held");
    // The dropped record's retry is paid again: the window held was 9 s, not 60.
    let retry = c.admit(&pay("fund", "bank", "p", 1_000_000), &admission());
    assert!(matches!(retry, Outcome::Transferred { created: true, .. }), "{retry:?}");
}

#[test]
fn the_clock_never_goes_back_and_survives_a_snapshot() {
    let mut c = cell(Limits::default());
    assert_eq!(c.advance_clock(T0 - 5_000), T0, "a wall clock that steps back leaves the cell's clock");
    assert_eq!(c.advance_clock(T0 + 5), T0 + 5);
    let decoded = snapshot::decode(&snapshot::encode(&c)).unwrap();
    assert_eq!(decoded.clock_ms(), T0 + 5);
    assert!(decoded == c);
}

/// Records outside memory, as an engine's disk tier would answer them.
#[derive(Default)]
struct Tier(std::collections::HashMap<Vec<u8>, OldRecord>);

impl Tier {
    fn put(&mut self, shadow: bool, records: Vec<OldRecord>) {
        for r in records {
            self.0.insert(r.key(shadow, 16), r);
        }
    }
}

impl OlderRecords for Tier {
    fn find(&self, shadow: bool, from: &AccountId, id: &TransferId) -> Option<OldRecord> {
        self.0.get(&idempotency_key(shadow, 16, from, id)).cloned()
    }
}

#[test]
fn a_record_that_left_memory_answers_a_retry_from_outside_it() {
    let mut c = cell(Limits { transfers_retained_max: 4, ..Limits::default() });
    c.set_spill(true);
    for i in 0..10 {
        assert!(c.admit(&pay(&format!("t{i}"), "p", "q", 1), &admission()).changed_state());
    }
    // Inside a batch nothing leaves memory: a retry of the oldest still finds it there.
    let retry = c.admit(&pay("t0", "p", "q", 1), &admission());
    assert!(matches!(retry, Outcome::Transferred { created: false, .. }), "{retry:?}");
    assert!(c.take_spilled().0.is_empty());
    c.end_batch();
    let (real, shadow) = c.take_spilled();
    assert!(shadow.is_empty());
    // The funding and t0..t5 left memory, oldest first, as they were.
    let ids: Vec<&str> = real.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["fund", "t0", "t1", "t2", "t3", "t4", "t5"]);
    assert_eq!((real[1].from.as_str(), real[1].to.as_str(), real[1].amount), ("p", "q", 1));
    assert_eq!(real[1].status, TransferStatus::Settled);
    assert!(c.take_spilled().0.is_empty(), "handed out once");

    // Without the records outside memory, the retry would pay again...
    let mut forgetful = c.clone();
    let paid = forgetful.admit(&pay("t0", "p", "q", 1), &admission());
    assert!(matches!(paid, Outcome::Transferred { created: true, .. }), "{paid:?}");
    // ...with them, it answers the original and changes nothing.
    let mut tier = Tier::default();
    tier.put(false, real);
    let before = c.clone();
    let retry = c.admit_with(&pay("t0", "p", "q", 1), &admission(), &tier);
    assert!(matches!(&retry, Outcome::Transferred { created: false, transfer, .. } if transfer.id.as_str() == "t0"));
    let other_body = c.admit_with(&pay("t0", "p", "q", 2), &admission(), &tier);
    assert!(matches!(&other_body, Outcome::Rejected(r) if r.code == ErrorCode::Conflict), "{other_body:?}");
    assert!(c == before, "answers from outside memory change nothing");
    // Past the window the record outside memory counts as gone too.
    c.advance_clock(T0 + WINDOW_MS + 1);
    let late = c.admit_with(&pay("t0", "p", "q", 1), &admission(), &tier);
    assert!(matches!(late, Outcome::Transferred { created: true, .. }), "{late:?}");
}

#[test]
fn a_pending_record_stays_in_memory_until_its_transfer_closes_then_leaves() {
    let map = ShardMap::round_robin(16, 2).unwrap();
    let payee = (0..).map(|i| format!("far{i}")).find(|n| map.owner_of(n) == CellId(1)).unwrap();
    let payer = (0..).map(|i| format!("near{i}")).find(|n| map.owner_of(n) == CellId(0)).unwrap();
    let mut c = CellState::new(CellId(0), map, Limits { transfers_retained_max: 2, ..Limits::default() });
    c.advance_clock(T0);
    c.set_spill(true);
    let open = OpenAccount { id: id(&payer), currency: cny(), overdraft: true, tenant: TenantId::default_tenant() };
    assert!(c.apply(&Command::real(Op::OpenAccount(open))).changed_state());
    let cross = c.admit(&pay("x", &payer, &payee, 5), &admission());
    let Outcome::Transferred { outbox: Some((dest, seq)), .. } = cross else { panic!("{cross:?}") };
    // Two more records push the pending one out of the ring.
    let local = (0..).map(|i| format!("near{i}")).find(|n| n != &payer && c.shard_map().owner_of(n) == CellId(0));
    let local = local.unwrap();
    let open = OpenAccount { id: id(&local), currency: cny(), overdraft: false, tenant: TenantId::default_tenant() };
    assert!(c.apply(&Command::real(Op::OpenAccount(open))).changed_state());
    for i in 0..2 {
        assert!(c.admit(&pay(&format!("l{i}"), &payer, &local, 1), &admission()).changed_state());
    }
    c.end_batch();
    assert_eq!(c.ledger(false).evicted_pending_len(), 1);
    assert!(c.take_spilled().0.is_empty(), "a pending record does not leave yet");
    // A retry still finds it, pending.
    let retry = c.admit(&pay("x", &payer, &payee, 5), &admission());
    assert!(
        matches!(&retry, Outcome::Transferred { created: false, transfer, .. } if transfer.status == TransferStatus::Pending),
        "{retry:?}"
    );
    let status = c.query(&Query::Transfer {
        shadow: false,
        id: TransferId::new("x").unwrap(),
        from: Some(id(&payer)),
        by: Authority::Admin,
    });
    assert!(matches!(&status, QueryAnswer::Transfers(v) if v.len() == 1), "{status:?}");
    // A snapshot keeps it.
    let decoded = snapshot::decode(&snapshot::encode(&c)).unwrap();
    assert!(decoded == c);
    assert_eq!(decoded.ledger(false).evicted_pending_len(), 1);
    // Settled: it leaves memory with its final status.
    assert!(c.apply(&Command::real(Op::Settle { dest, seq })).changed_state());
    c.end_batch();
    assert_eq!(c.ledger(false).evicted_pending_len(), 0);
    let (spilled, _) = c.take_spilled();
    assert_eq!(spilled.len(), 1);
    assert_eq!((spilled[0].id.as_str(), spilled[0].status), ("x", TransferStatus::Settled));
}

#[test]
fn records_are_copied_out_first_and_leave_memory_only_when_released() {
    let mut c = cell(Limits { transfers_retained_max: 2, ..Limits::default() });
    c.set_spill(true);
    for i in 0..4 {
        assert!(c.admit(&pay(&format!("t{i}"), "p", "q", 1), &admission()).changed_state());
    }
    // fund, t0, t1 are beyond the limit of 2: copied out, still in memory.
    let marks = c.copy_out();
    let (copied, _) = c.take_spilled();
    assert_eq!(copied.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["fund", "t0", "t1"]);
    let retry = c.admit(&pay("t0", "p", "q", 1), &admission());
    assert!(matches!(retry, Outcome::Transferred { created: false, .. }), "still answered from memory: {retry:?}");
    assert_eq!(c.ledger(false).idempotency_reach().records_held, 5);
    c.release(marks);
    let reach = c.ledger(false).idempotency_reach();
    assert_eq!((reach.records_held, reach.records_dropped), (2, 3));
    // A second round copies nothing new until more records arrive.
    let again = c.copy_out();
    assert!(c.take_spilled().0.is_empty());
    assert_eq!(again.real, marks.real);
}

#[test]
fn a_record_that_closes_after_its_round_is_copied_in_the_next_and_kept_until_then() {
    let map = ShardMap::round_robin(16, 2).unwrap();
    let payee = (0..).map(|i| format!("far{i}")).find(|n| map.owner_of(n) == CellId(1)).unwrap();
    let payer = (0..).map(|i| format!("near{i}")).find(|n| map.owner_of(n) == CellId(0)).unwrap();
    let local = (0..).map(|i| format!("near{i}")).filter(|n| map.owner_of(n) == CellId(0)).nth(1).unwrap();
    let mut c = CellState::new(CellId(0), map, Limits { transfers_retained_max: 1, ..Limits::default() });
    c.advance_clock(T0);
    c.set_spill(true);
    for (name, overdraft) in [(&payer, true), (&local, false)] {
        let open = OpenAccount { id: id(name), currency: cny(), overdraft, tenant: TenantId::default_tenant() };
        assert!(c.apply(&Command::real(Op::OpenAccount(open))).changed_state());
    }
    let Outcome::Transferred { outbox: Some((dest, seq)), .. } = c.admit(&pay("x", &payer, &payee, 5), &admission())
    else {
        panic!("a cross-cell transfer")
    };
    assert!(c.admit(&pay("l0", &payer, &local, 1), &admission()).changed_state());
    // Round 1: "x" is pending, so it is not copied.
    let round1 = c.copy_out();
    assert!(c.take_spilled().0.is_empty());
    // It settles before round 1 is released: the release copies it (for round 2) and keeps it.
    assert!(c.apply(&Command::real(Op::Settle { dest, seq })).changed_state());
    c.release(round1);
    assert_eq!(c.ledger(false).idempotency_reach().records_held, 2, "kept until its own round is released");
    assert_eq!(c.ledger(false).evicted_pending_len(), 0);
    let round2 = c.copy_out();
    let (copied, _) = c.take_spilled();
    assert_eq!(copied.iter().map(|r| (r.id.as_str(), r.status)).collect::<Vec<_>>(), [("x", TransferStatus::Settled)]);
    c.release(round1);
    assert_eq!(c.ledger(false).idempotency_reach().records_held, 2, "round 1 does not release a round-2 copy");
    c.release(round2);
    assert_eq!(c.ledger(false).idempotency_reach().records_held, 1);
}

#[test]
fn a_checkpoint_taken_while_records_wait_to_be_released_decodes() {
    // Records copied out stay in memory, over the limit, until released; a
    // snapshot taken then must decode (it once was refused as damaged).
    let mut c = cell(Limits { transfers_retained_max: 2, ..Limits::default() });
    c.set_spill(true);
    for i in 0..6 {
        assert!(c.admit(&pay(&format!("t{i}"), "p", "q", 1), &admission()).changed_state());
    }
    let marks = c.copy_out();
    assert_eq!(c.ledger(false).idempotency_reach().records_held, 7, "over the limit of 2 until released");
    let decoded = snapshot::decode(&snapshot::encode(&c)).expect("a snapshot over the ring's limit decodes");
    assert!(decoded == c);
    c.release(marks);
    assert_eq!(c.ledger(false).idempotency_reach().records_held, 2);
}
