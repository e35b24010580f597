//! The idempotency window is measured in time: a retry within it answers the
//! original transfer and pays nothing; a record older than it counts as gone;
//! an id that carries its own time (a UUIDv7) and is older than the window is
//! refused with `idempotency_expired` instead of being paid again. The clock
//! is the cell's, set per batch, never the wall clock read inside the core.

use cellpay_core::*;

const WINDOW_MS: u64 = 60_000;
const T0: u64 = 1_800_000_000_000;

fn id(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}

fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

fn admission() -> Admission {
    Admission { idempotency_window_ms: WINDOW_MS, ..Admission::UNLIMITED }
}

/// One cell with a funded payer `p` and a payee `q`, its clock at `T0`.
fn cell(limits: Limits) -> CellState {
    let mut c = CellState::new(CellId(0), ShardMap::round_robin(16, 1).unwrap(), limits);
    c.advance_clock(T0);
    for (name, overdraft) in [("bank", true), ("p", false), ("q", false)] {
        let open = OpenAccount { id: id(name), currency: cny(), overdraft, tenant: TenantId::default_tenant() };
        assert!(c.apply(&Command::real(Op::OpenAccount(open))).changed_state());
    }
    assert!(c.admit(&pay("fund", "bank", "p", 1_000_000), &admission()).changed_state());
    c
}

fn pay(tid: &str, from: &str, to: &str, amount: i64) -> Command {
    let by = Authority::Admin;
    let t = Transfer {
        id: TransferId::new(tid).unwrap(),
        from: id(from),
        to: id(to),
        amount,
        currency: None,
        memo: None,
        by,
    };
    Command::real(Op::Transfer(t))
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
    }
    // 4 records (the funding and t0..t2) fill memory; the next drops the funding record.
    c.advance_clock(T0 + 10_000);
    assert!(c.admit(&pay("t3", "p", "q", 1), &admission()).changed_state());
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
