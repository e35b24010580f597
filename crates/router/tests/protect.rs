//! The protection layers against real parts: limiters on the real clock,
//! the hot-key table under a million keys, the retry budget against a cell
//! that is down, and a relay's breaker across a real cell's restart.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cell::{BreakerState, Cell, CellClient, CellSlot, EngineConfig, RelayConfig};
use cellpay_core::*;
use cellpay_router::protect::hotkey::{HotKeys, Side};
use cellpay_router::protect::rate::EdgeLimits;
use cellpay_router::protect::rules::{FlowRules, Rate, RetryRules};
use cellpay_router::{Cluster, Plan, Protection, Route, RouteError};

#[test]
fn a_route_limit_admits_its_configured_rate_within_ten_percent() {
    let mut rules = FlowRules::default();
    // A burst of 100 ms worth: a test thread descheduled for less loses no slot.
    rules.routes.insert(Route::Payments, Rate { rate_per_s: 2_000, burst: 200 });
    let limits = EdgeLimits::new(&rules, &[]);
    let started = Instant::now();
    let mut admitted = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        if limits.admit(Route::Payments, None, 1).is_ok() {
            admitted += 1;
        }
        std::hint::spin_loop();
    }
    let rate = (admitted - 200) as f64 / started.elapsed().as_secs_f64();
    assert!((1_800.0..=2_200.0).contains(&rate), "admitted {rate:.0}/s beyond the burst at 2000/s");
    assert!(limits.admit(Route::Balance, None, 1).is_ok(), "a route without a rule is not limited");
}

#[test]
fn the_hot_key_table_stays_under_its_cap_with_a_million_distinct_keys() {
    let mut rules = FlowRules::default().hot_keys;
    rules.payee = Some(Rate { rate_per_s: 1_000, burst: 10 });
    rules.keys_tracked_max = 65_536;
    let hot = HotKeys::new(rules);
    for i in 0..1_000_000 {
        let id = AccountId::new(&format!("payee-{i}")).unwrap();
        hot.admit(false, &id, Side::Payee).unwrap();
    }
    assert!(hot.tracked() <= hot.keys_max(), "{} keys tracked, cap {}", hot.tracked(), hot.keys_max());
    assert!(hot.capacity() <= 2 * hot.keys_max(), "{} slots allocated, cap {}", hot.capacity(), hot.keys_max());
    // A hot key is still limited after the flood.
    let merchant = AccountId::new("merchant").unwrap();
    let admitted = (0..100).filter(|_| hot.admit(false, &merchant, Side::Payee).is_ok()).count();
    assert!((10..=12).contains(&admitted), "burst of 10, got {admitted}");
}

fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_never_exceed_the_budget_when_a_cell_fails_every_request() {
    let retry = RetryRules { budget_percent: 10.0, attempts_max: 3, backoff_base_ms: 1, backoff_max_ms: 2 };
    let rules = FlowRules { retry, ..FlowRules::default() };
    let protection = Protection::new(rules, Plan { switches: vec![] }, vec![], 1);
    // A real cell slot with no engine running: every call is `cell_unavailable`.
    let down = CellSlot::new(CellId(0));
    let q = Query::Account { shadow: false, id: AccountId::new("a").unwrap(), by: Authority::Admin };
    let mut failed = 0;
    for _ in 0..500 {
        let attempt = || async { down.query(q.clone()).await.map_err(RouteError::from) };
        failed += u32::from(protection.call(&down, q.priority(), attempt).await.is_err());
    }
    let c = &protection.counters;
    assert_eq!(failed, 500);
    let (requests, retries) = (c.requests.load(Relaxed).max(500), c.retries.load(Relaxed));
    assert!(retries <= requests / 10, "{retries} retries for {requests} requests");
    assert!(retries >= 1, "the budget allows some retries");
    assert!(c.retries_refused.load(Relaxed) > 0, "the budget refused the rest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_breaker_opens_while_the_payee_cell_is_down_and_delivery_resumes_exactly_once() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let map = ShardMap::round_robin(64, 2).unwrap();
    let open = |c: u32| Cell::open_embedded(dirs[c as usize].path(), CellId(c), &map, EngineConfig::default()).unwrap();
    let cells = [open(0), open(1)];
    let slots: Vec<Arc<CellSlot>> = cells.iter().map(|c| Arc::new(CellSlot::new(c.handle().cell()))).collect();
    for (slot, cell) in slots.iter().zip(&cells) {
        slot.install(cell.handle());
    }
    let mut rules = FlowRules::default();
    rules.breaker.min_calls = 3;
    rules.breaker.window_calls = 5;
    rules.breaker.open_ms = 200;
    let protection = Arc::new(Protection::new(rules, Plan { switches: vec![] }, vec![], 2));
    let clients = slots.iter().map(|s| s.clone() as Arc<dyn CellClient>).collect();
    let cluster = Cluster::new(map.clone(), clients, protection);
    // A payer in cell 0 and a payee in cell 1.
    let name_in = |cell: u32| (0..).map(|i| format!("acct{i}")).find(|n| map.owner_of(n) == CellId(cell)).unwrap();
    let (payer, payee) = (name_in(0), name_in(1));
    let account = |id: &str, overdraft| {
        Command::real(Op::OpenAccount(OpenAccount {
            id: AccountId::new(id).unwrap(),
            currency: cny(),
            overdraft,
            tenant: TenantId::default_tenant(),
        }))
    };
    assert!(cluster.submit_one(account(&payer, true)).await.result.is_ok());
    assert!(cluster.submit_one(account(&payee, false)).await.result.is_ok());

    // The payee's cell goes down; a payment from cell 0 is still taken (pending in the outbox).
    let [cell0, cell1] = cells;
    slots[1].clear();
    cell1.halt().unwrap();
    let transfer = Command::real(Op::Transfer(Transfer {
        id: TransferId::new("t1").unwrap(),
        from: AccountId::new(&payer).unwrap(),
        to: AccountId::new(&payee).unwrap(),
        amount: 700,
        currency: None,
        memo: None,
        by: Authority::Admin,
    }));
    let routed = cluster.submit_one(transfer).await;
    assert!(matches!(routed.result, Ok(Outcome::Transferred { .. })));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let config = RelayConfig { backoff: Duration::from_millis(10), ..RelayConfig::default() };
    let relays = cluster.spawn_relays(config, &stop);
    let real_0_to_1 = relays.iter().find(|r| r.source == CellId(0) && !r.shadow).unwrap().gate.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while real_0_to_1.breaker.opened() == 0 {
        assert!(Instant::now() < deadline, "the relay's breaker never opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(real_0_to_1.held_rounds.load(Relaxed) > 0 || real_0_to_1.breaker.state() != BreakerState::Closed);

    // The cell comes back from its store; the relay half-opens, delivers once, and closes.
    let dir1 = dirs[1].path().to_path_buf();
    let map1 = map.clone();
    let cell1 = tokio::task::spawn_blocking(move || {
        Cell::open_embedded(&dir1, CellId(1), &map1, EngineConfig::default()).unwrap()
    })
    .await
    .unwrap();
    slots[1].install(cell1.handle());
    let balance = |slot: Arc<CellSlot>, id: String| async move {
        match slot.query(Query::Account { shadow: false, id: AccountId::new(&id).unwrap(), by: Authority::Admin }).await
        {
            Ok(QueryAnswer::Account(a)) => a.balance,
            other => panic!("{other:?}"),
        }
    };
    while balance(slots[1].clone(), payee.clone()).await != 700 {
        assert!(Instant::now() < deadline, "the credit was never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let audit = cluster.audit(false, true).await.unwrap();
    assert!(audit.ok(), "{audit:?}");
    // Let more rounds run: a redelivery must change nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(balance(slots[1].clone(), payee.clone()).await, 700, "credited exactly once");
    assert_eq!(balance(slots[0].clone(), payer.clone()).await, -700);
    assert_eq!(real_0_to_1.breaker.state(), BreakerState::Closed);
    let _ = stop_tx.send(true);
    drop((cell0, cell1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cell_is_retried_within_the_budget_and_never_trips_the_breaker() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let owners = ShardMap::round_robin(64, 2).unwrap();
    let open =
        |c: u32| Cell::open_embedded(dirs[c as usize].path(), CellId(c), &owners, EngineConfig::default()).unwrap();
    let cells = [open(0), open(1)];
    // A stale router map: every shard at cell 0, so cell 1's accounts reach the wrong cell.
    let stale = ShardMap::round_robin(64, 1).unwrap();
    let retry = RetryRules { budget_percent: 10.0, attempts_max: 3, backoff_base_ms: 1, backoff_max_ms: 2 };
    let protection =
        Arc::new(Protection::new(FlowRules { retry, ..FlowRules::default() }, Plan { switches: vec![] }, vec![], 2));
    let clients = cells.iter().map(|c| Arc::new(c.handle()) as Arc<dyn CellClient>).collect();
    let cluster = Cluster::new(stale, clients, protection.clone());
    let (mut answered, mut wrong) = (0, 0);
    for i in 0..400 {
        let id = format!("acct{i}");
        if owners.owner_of(&id) != CellId(1) {
            continue;
        }
        let q = Query::Account { shadow: false, id: AccountId::new(&id).unwrap(), by: Authority::Admin };
        let routed = cluster.query_account(&AccountId::new(&id).unwrap(), q).await;
        answered += 1;
        wrong += u32::from(matches!(routed.result, Err(RouteError::WrongCell { .. })));
    }
    assert_eq!(wrong, answered, "every misrouted read ends as wrong_cell");
    let retries = protection.counters.retries.load(Relaxed);
    assert!(retries >= 1 && retries <= u64::from(answered) / 10 + 1, "{retries} retries for {answered} reads");
    assert_eq!(protection.layers().cells[0].breaker.state(), BreakerState::Closed, "a healthy cell stays closed");
}
