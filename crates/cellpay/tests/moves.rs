//! Shard moves on a real server: a shard leaves its cell while payments to,
//! from and within it flow, every acknowledged payment is there exactly once
//! afterwards, the audit is exact, and a `kill -9` after the move finds the
//! shard at its new owner.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cellpay_core::ShardMap;
use common::*;
use serde_json::{json, Value};

const SHARDS: u32 = 16;
const CELLS: u32 = 3;

fn map() -> ShardMap {
    ShardMap::round_robin(SHARDS, CELLS).unwrap()
}

/// `n` account ids in `shard`.
fn ids_in_shard(shard: u32, n: usize, prefix: &str) -> Vec<String> {
    let map = map();
    (0..).map(|i| format!("{prefix}-{i}")).filter(|id| map.shard_of(id).0 == shard).take(n).collect()
}

/// Sets `stop` when dropped, so the payers stop even when the test panics
/// (a scope waits for its threads before it lets a panic through).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Opens an overdraft bank (in shard 0) and each of `ids`, funds each with
/// `amount` from the bank.
fn open_funded<'a>(s: &Server, ids: impl IntoIterator<Item = &'a String>, amount: i64) {
    let bank = ids_in_shard(0, 1, "bank").remove(0);
    open(s, ADMIN, &bank, true);
    for id in ids {
        open(s, CLIENT, id, false);
        let r = s.post(
            "/v1/transfers",
            ADMIN,
            &json!({"id": format!("fund-{id}"), "from": bank, "to": id, "amount": amount}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
}

/// Each account's balance after its funding and the acknowledged payments.
fn expected_balances<'a>(
    ids: impl IntoIterator<Item = &'a String>,
    funded: i64,
    paid: &[Paid],
) -> std::collections::HashMap<String, i64> {
    let mut expected: std::collections::HashMap<String, i64> = ids.into_iter().map(|id| (id.clone(), funded)).collect();
    for (_, from, to, amount) in paid {
        *expected.get_mut(from).unwrap() -= amount;
        *expected.get_mut(to).unwrap() += amount;
    }
    expected
}

/// Every acknowledged payment is there exactly once: each balance is what was acknowledged.
fn assert_balances(s: &Server, expected: &std::collections::HashMap<String, i64>) {
    for (id, want) in expected {
        assert_eq!(balance(s, id), *want, "{id}");
    }
}

/// An acknowledged payment: (id, payer, payee, amount).
type Paid = (String, String, String, i64);

/// Pays `from[k] → to[k]` in a loop until `stop`, retrying each payment with
/// its own id until it is answered for good; records what was acknowledged.
fn pay_loop(s: &Server, tag: &str, pairs: &[(String, String)], stop: &AtomicBool, paid: &Mutex<Vec<Paid>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (from, to) = &pairs[n as usize % pairs.len()];
        let id = format!("{tag}-{n}");
        let body = json!({"id": id, "from": from, "to": to, "amount": 1});
        // Retried with its id until answered for good; 10 s of refusals fail the test.
        for attempt in 0.. {
            let r = s.post("/v1/transfers", CLIENT, &body);
            match r.status {
                200 | 201 => {
                    paid.lock().unwrap().push((id.clone(), from.clone(), to.clone(), 1));
                    break;
                }
                503 | 429 if attempt < 2000 => std::thread::sleep(Duration::from_millis(5)),
                other => panic!("payment {id} answered {other} (attempt {attempt}): {}", r.body),
            }
        }
        n += 1;
    }
}

fn audit(s: &Server) -> Value {
    let r = s.get("/v1/audit?full=true", ADMIN);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn settled(s: &Server) -> Value {
    let mut last = Value::Null;
    s.eventually("every credit settles and the audit is exact", || {
        last = audit(s);
        last["ok"] == true && last["in_flight"] == 0
    });
    last
}

fn move_shard(s: &Server, shard: u32, to: u32) -> Value {
    let r = s.post(&format!("/v1/admin/shards/{shard}/move"), ADMIN, &json!({"to": to}));
    assert_eq!(r.status, 200, "{}", r.body);
    conforms(&r.body, "ShardMove");
    r.body
}

#[test]
fn a_shard_moves_while_payments_flow_and_every_payment_is_there_once() {
    let dir = tempfile::tempdir().unwrap();
    let cells = CELLS.to_string();
    let shards = SHARDS.to_string();
    // 32 records of each ledger stay in a cell's memory: most reach its disk
    // tier, some while the shard is being copied, frozen or exported.
    let args = ["--cells", &cells, "--shards", &shards, "--transfers-retained-max", "32"];
    let s = Server::start(dir.path(), &args);
    // Shard 4 lives in cell 1; it moves to cell 2 and then to cell 0.
    let moving = ids_in_shard(4, 4, "mv");
    let elsewhere: Vec<String> = [0u32, 2, 3, 5].iter().flat_map(|&sh| ids_in_shard(sh, 1, "ot")).collect();
    open_funded(&s, moving.iter().chain(&elsewhere), 100_000);
    settled(&s);
    // Out of the shard (to every cell), into it (from every cell), and within it.
    let out: Vec<(String, String)> =
        moving.iter().zip(elsewhere.iter().cycle()).map(|(a, b)| (a.clone(), b.clone())).collect();
    let inn: Vec<(String, String)> =
        elsewhere.iter().zip(moving.iter().cycle()).map(|(a, b)| (a.clone(), b.clone())).collect();
    let within = vec![(moving[0].clone(), moving[1].clone()), (moving[2].clone(), moving[3].clone())];
    let stop = AtomicBool::new(false);
    let paid = Mutex::new(Vec::new());
    let reports = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| pay_loop(&s, "out", &out, &stop, &paid));
        scope.spawn(|| pay_loop(&s, "in", &inn, &stop, &paid));
        scope.spawn(|| pay_loop(&s, "within", &within, &stop, &paid));
        std::thread::sleep(Duration::from_millis(300));
        let first = move_shard(&s, 4, 2);
        std::thread::sleep(Duration::from_millis(300));
        let second = move_shard(&s, 4, 0);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        vec![first, second]
    });
    eprintln!("moves: {}", serde_json::to_string(&reports).unwrap());
    assert_eq!((reports[0]["from"].as_u64(), reports[0]["to"].as_u64()), (Some(1), Some(2)));
    assert_eq!((reports[1]["from"].as_u64(), reports[1]["to"].as_u64()), (Some(2), Some(0)));
    assert_eq!(reports[0]["accounts"], 4, "{}", reports[0]);
    assert!(reports[0]["records"].as_u64().unwrap() >= 4, "the shard's idempotency records travel: {}", reports[0]);
    let audit = settled(&s);
    assert_eq!(audit["findings"], json!([]), "{audit}");
    assert_eq!(audit["balances"], 0, "money is conserved: the bank's overdraft is everything else");
    let paid = paid.into_inner().unwrap();
    eprintln!("{} payments acknowledged", paid.len());
    assert!(paid.len() > 30, "payments flowed through the moves: {}", paid.len());
    // Every acknowledged payment is there exactly once: balances equal what was acknowledged.
    let expected = expected_balances(moving.iter().chain(&elsewhere), 100_000, &paid);
    assert_balances(&s, &expected);
    // A retry of a payment made before, during or between the moves is
    // recognised at the shard's owner, from memory or from the disk tier.
    let out: Vec<&Paid> = paid.iter().filter(|p| p.0.starts_with("out") || p.0.starts_with("within")).collect();
    for (id, from, to, amount) in out.iter().step_by(out.len().div_ceil(150)) {
        let r = s.post("/v1/transfers", CLIENT, &json!({"id": id, "from": from, "to": to, "amount": amount}));
        assert_eq!((r.status, r.cell), (200, Some(0)), "a retry of {id}: {}", r.body);
    }
    assert_balances(&s, &expected);
    // The write pause of each move is reported, and the moves show in /metrics and the dashboard.
    for r in &reports {
        assert!(r["pause_us"].as_u64().unwrap() < 10_000_000, "{r}");
    }
    let metrics = s.get("/metrics", ADMIN).body;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("cellpay_shard_moves_total{outcome=\"moved\"} 2"), "{text}");
    assert!(text.contains("cellpay_shard_move_pause_seconds{quantile=\"0.99\"}"), "{text}");
    let dashboard = s.get("/dashboard/data", ADMIN).body;
    assert_eq!(dashboard["moves"]["moved"], 2, "{}", dashboard["moves"]);
    let actions = s.get("/v1/admin/actions", ADMIN).body;
    assert_eq!(actions.to_string().matches("shard_move").count(), 2, "the operator log records each move: {actions}");
    // After a kill -9 the shard is at its new owner, with its money.
    s.kill9();
    let s = Server::start(dir.path(), &args);
    let r = s.get(&format!("/v1/accounts/{}", moving[0]), CLIENT);
    assert_eq!((r.status, r.cell), (200, Some(0)), "{}", r.body);
    assert_eq!(r.body["balance"].as_i64(), Some(expected[&moving[0]]));
    let audit = settled(&s);
    assert_eq!(audit["findings"], json!([]), "{audit}");
}

#[test]
fn a_move_to_the_same_cell_or_an_unknown_one_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "3", "--shards", "16"]);
    for (shard, body, code) in [
        ("4", json!({"to": 1}), "invalid_request"),
        ("4", json!({"to": 7}), "invalid_request"),
        ("99", json!({"to": 0}), "invalid_request"),
        ("x", json!({"to": 0}), "invalid_request"),
        ("4", json!({"to": 0, "extra": 1}), "invalid_request"),
    ] {
        let r = s.post(&format!("/v1/admin/shards/{shard}/move"), ADMIN, &body);
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (400, Some(code)), "{shard} {body}: {}", r.body);
    }
    let r = s.post("/v1/admin/shards/4/move", CLIENT, &json!({"to": 0}));
    assert_eq!(r.status, 403, "{}", r.body);
    let r = s.get("/v1/digests", ADMIN);
    assert_eq!(r.body["epoch"], 1, "nothing moved");
}

/// The coordinator killed at each step of a move: on restart the move goes
/// the way the map says (forward once the map took it, back before), the
/// shard has one owner, its money is all there and the audit is exact.
#[test]
fn a_coordinator_killed_at_any_step_leaves_one_owner_and_every_payment() {
    for (step, owner_after) in [("frozen", 1u32), ("installed", 1), ("swapped", 2), ("served", 2)] {
        let dir = tempfile::tempdir().unwrap();
        let args = ["--cells", "3", "--shards", "16"];
        let s = Server::start_with_env(dir.path(), &args, &[("CELLPAY_TEST_CRASH_MOVE_AT", step)]);
        let moving = ids_in_shard(4, 2, "mv");
        let other = ids_in_shard(2, 1, "ot").remove(0);
        open_funded(&s, moving.iter().chain([&other]), 1000);
        let r = s.post("/v1/transfers", CLIENT, &json!({"id": "p1", "from": moving[0], "to": other, "amount": 10}));
        assert_eq!(r.status, 201, "{}", r.body);
        settled(&s);
        let body = json!({"to": 2}).to_string();
        let crashed = s.try_request("POST", "/v1/admin/shards/4/move", ADMIN, &body);
        assert!(
            crashed.is_none(),
            "{step}: the server aborted mid-move, it did not answer {:?}",
            crashed.map(|r| r.body)
        );
        s.kill9();
        let s = Server::start(dir.path(), &args);
        let cluster = s.get("/v1/cluster", ADMIN);
        assert_eq!(cluster.body["shard_map"][4], owner_after, "{step}: {}", cluster.body);
        let r = s.get(&format!("/v1/accounts/{}", moving[0]), CLIENT);
        assert_eq!((r.status, r.cell, r.body["balance"].as_i64()), (200, Some(owner_after), Some(990)), "{step}");
        // The shard serves: a retry is recognised, a new payment goes through.
        let r = s.post("/v1/transfers", CLIENT, &json!({"id": "p1", "from": moving[0], "to": other, "amount": 10}));
        assert_eq!(r.status, 200, "{step}: {}", r.body);
        let r = s.post("/v1/transfers", CLIENT, &json!({"id": "p2", "from": moving[1], "to": moving[0], "amount": 5}));
        assert_eq!(r.status, 201, "{step}: {}", r.body);
        let audit = settled(&s);
        assert_eq!(audit["findings"], json!([]), "{step}: {audit}");
        assert_eq!(balance(&s, &other), 1010, "{step}");
        // And it can move again.
        let again = move_shard(&s, 4, if owner_after == 1 { 2 } else { 1 });
        assert_eq!(again["accounts"], 2, "{step}: {again}");
        assert_eq!(settled(&s)["findings"], json!([]), "{step}");
        s.terminate();
    }
}

/// Waits for the plan of moves under way to finish; answers `GET /v1/admin/moves`.
fn plan_done(s: &Server) -> Value {
    let mut last = Value::Null;
    s.eventually("the plan of moves finishes", || {
        last = s.get("/v1/admin/moves", ADMIN).body;
        last["plan"]["running"] == false
    });
    last
}

fn shards_of(s: &Server) -> Vec<u64> {
    let c = s.get("/v1/cluster", ADMIN).body;
    c["cells"].as_array().unwrap().iter().map(|cell| cell["shards"].as_u64().unwrap()).collect()
}

/// A cell added to a running cluster fills up by measured load, and a drained
/// cell empties, while payments flow; afterwards every acknowledged payment
/// is there once and the audit is exact.
#[test]
fn a_cell_added_fills_up_and_a_drained_cell_empties_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "2", "--shards", "16"]);
    let accounts: Vec<String> = (0..16).flat_map(|sh| ids_in_shard(sh, 1, "ac")).collect();
    open_funded(&s, &accounts, 100_000);
    settled(&s);
    assert_eq!(s.terminate(), Some(0));
    // The cluster grows by a cell: it starts empty.
    let s = Server::start(dir.path(), &["--cells", "3", "--shards", "16"]);
    assert_eq!(shards_of(&s), vec![8, 8, 0]);
    let pairs: Vec<(String, String)> =
        (0..accounts.len()).map(|i| (accounts[i].clone(), accounts[(i * 5 + 3) % accounts.len()].clone())).collect();
    let stop = AtomicBool::new(false);
    let paid = Mutex::new(Vec::new());
    let (filled, drained) = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| pay_loop(&s, "a", &pairs[..8], &stop, &paid));
        scope.spawn(|| pay_loop(&s, "b", &pairs[8..], &stop, &paid));
        std::thread::sleep(Duration::from_millis(300));
        let r = s.post("/v1/admin/rebalance", ADMIN, &json!({"pace_ms": 5}));
        assert_eq!(r.status, 202, "{}", r.body);
        let to_new = r.body["moves"].as_array().unwrap().iter().filter(|m| m[2] == 2).count();
        assert!(to_new >= 3, "the new cell takes a share: {}", r.body);
        let filled = plan_done(&s);
        let r = s.post("/v1/admin/cells/0/drain", ADMIN, &json!({"pace_ms": 5}));
        assert_eq!(r.status, 202, "{}", r.body);
        let drained = plan_done(&s);
        let shards = shards_of(&s);
        assert_eq!(shards[0], 0, "the drained cell owns nothing: {shards:?}");
        assert!(shards[2] >= 4, "the new cell took a share: {shards:?}");
        // A second drain sends nothing back to the cell drained first.
        let r = s.post("/v1/admin/cells/1/drain", ADMIN, &json!({"pace_ms": 5}));
        assert_eq!(r.status, 202, "{}", r.body);
        assert!(r.body["moves"].as_array().unwrap().iter().all(|m| m[2] == 2), "{}", r.body);
        let again = plan_done(&s);
        assert_eq!(again["plan"]["failed"].as_u64(), Some(0), "{again}");
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (filled, drained)
    });
    eprintln!("rebalance: {filled}\ndrain: {drained}");
    assert_eq!((filled["plan"]["failed"].as_u64(), drained["plan"]["failed"].as_u64()), (Some(0), Some(0)));
    assert_eq!(shards_of(&s), vec![0, 0, 16], "two cells drained: the third owns every shard");
    // The last cell in service cannot be drained.
    let r = s.post("/v1/admin/cells/2/drain", ADMIN, &json!({}));
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (409, Some("conflict")), "{}", r.body);
    let audit = settled(&s);
    assert_eq!(audit["findings"], json!([]), "{audit}");
    assert_eq!(audit["balances"], 0);
    let paid = paid.into_inner().unwrap();
    let expected = expected_balances(&accounts, 100_000, &paid);
    assert_balances(&s, &expected);
    assert!(paid.len() > 50, "payments flowed: {}", paid.len());
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellpay")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Cells as processes, the map in the control plane (PostgreSQL): the
/// operator's CLI adds a cell that stood by, moves a shard and drains a cell
/// through a router, while payments flow; the router and the cells follow
/// the control plane's map.
#[test]
fn shards_move_between_cell_processes_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    // Four cell processes; cell 3 stands by, owning nothing.
    let s = Server::up(dir.path(), 4, 1, &["--shards", "16", "--spare-cells", "1"]);
    assert_eq!(shards_of(&s), vec![6, 5, 5, 0]);
    let accounts: Vec<String> = (0..16).flat_map(|sh| ids_in_shard(sh, 1, "pr")).collect();
    open_funded(&s, &accounts, 10_000);
    let pairs: Vec<(String, String)> =
        (0..accounts.len()).map(|i| (accounts[i].clone(), accounts[(i * 7 + 1) % accounts.len()].clone())).collect();
    let stop = AtomicBool::new(false);
    let paid = Mutex::new(Vec::new());
    let (moved, drained) = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| pay_loop(&s, "p", &pairs, &stop, &paid));
        std::thread::sleep(Duration::from_millis(300));
        let added =
            cli(&["cluster", "add-cell", "--cell", "3", "--pace-ms", "5", "--server", &s.base, "--token", ADMIN]);
        assert!(added.0, "{}", added.1);
        let moved = cli(&["cluster", "move-shard", "4", "--to", "2", "--server", &s.base, "--token", ADMIN]);
        let drained =
            cli(&["cluster", "drain-cell", "--cell", "0", "--pace-ms", "5", "--server", &s.base, "--token", ADMIN]);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (moved, drained)
    });
    assert!(moved.0, "{}", moved.1);
    assert!(moved.1.contains("\"pause_us\""), "{}", moved.1);
    assert!(drained.0, "{}", drained.1);
    s.eventually("the router follows the control plane's map", || shards_of(&s)[0] == 0);
    assert!(shards_of(&s)[3] >= 3, "the added cell took a fair share: {:?}", shards_of(&s));
    assert_eq!(s.get("/v1/cluster", ADMIN).body["shard_map"][4], 2);
    let audit = settled(&s);
    assert_eq!(audit["findings"], json!([]), "{audit}");
    let paid = paid.into_inner().unwrap();
    let expected = expected_balances(&accounts, 10_000, &paid);
    assert_balances(&s, &expected);
    assert!(paid.len() > 20, "payments flowed: {}", paid.len());
}

/// A per-cell gauge of the disk tier (`records`, `imported_runs`), by cell id.
fn tier_gauge(s: &Server, name: &str) -> std::collections::BTreeMap<u32, f64> {
    // /metrics answers at most 20 scrapes a second: an eager poll waits its turn.
    let mut r = s.get("/metrics", ADMIN);
    while r.status == 429 {
        std::thread::sleep(Duration::from_millis(60));
        r = s.get("/metrics", ADMIN);
    }
    let metrics = r.body.as_str().unwrap_or_else(|| panic!("/metrics answered {}: {}", r.status, r.body));
    let prefix = format!("cellpay_idempotency_tier_{name}{{cell=\"");
    let mut by_cell = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let (cell, value) = rest.split_once("\"} ").unwrap();
        by_cell.insert(cell.parse().unwrap(), value.parse().unwrap());
    }
    by_cell
}

/// Retries each of `paid` (payer, id) at the shard's owner: every one is
/// answered as the original (200), none pays again.
fn retries_pay_nothing(s: &Server, paid: &[(String, String)], payee: &str, owner: u32, when: &str) {
    for (from, id) in paid {
        let r = s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": from, "to": payee, "amount": 1}));
        assert_eq!((r.status, r.cell), (200, Some(owner)), "{when}: a retry of {id} by {from}: {}", r.body);
        assert_eq!(r.body["id"], id.as_str(), "{when}: {}", r.body);
    }
}

/// Opens two payers in shard 4 (cell 1) and a payee in shard 1 (cell 1), pays
/// `n` transfers of 1, and waits until all but 20 of their records are in
/// cell 1's disk tier (16 of each ledger stay in memory); answers the payers,
/// the payee and each payment's (payer, id).
fn pay_into_the_tier(s: &Server, n: usize) -> (Vec<String>, String, Vec<(String, String)>) {
    let payers = ids_in_shard(4, 2, "mv");
    let payee = ids_in_shard(1, 1, "shop").remove(0);
    open_funded(s, payers.iter().chain([&payee]), 100_000);
    let mut paid = Vec::new();
    for k in 0..n {
        let (from, id) = (payers[k % 2].clone(), format!("old-{k}"));
        let r = s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": from, "to": payee, "amount": 1}));
        assert_eq!(r.status, 201, "{}", r.body);
        paid.push((from, id));
    }
    let tiered = (n - 20) as f64;
    s.eventually("the payments' records reach cell 1's disk tier", || tier_gauge(s, "records")[&1] >= tiered);
    (payers, payee, paid)
}

#[test]
fn a_shard_moves_with_the_records_in_its_disk_tier_and_no_retry_pays_twice() {
    let dir = tempfile::tempdir().unwrap();
    // 16 records of each ledger stay in a cell's memory: the rest go to its disk tier.
    let args = ["--cells", "3", "--shards", "16", "--transfers-retained-max", "16"];
    let s = Server::start(dir.path(), &args);
    let (payers, payee, paid) = pay_into_the_tier(&s, 400);
    let balances = |s: &Server| payers.iter().chain([&payee]).map(|id| balance(s, id)).collect::<Vec<_>>();
    let before = balances(&s);
    let moved = move_shard(&s, 4, 2);
    eprintln!("the move: {moved}");
    let carried = moved["tier_records"].as_u64().unwrap() + moved["records"].as_u64().unwrap();
    assert!(moved["tier_records"].as_u64().unwrap() >= 300, "copied before the freeze: {moved}");
    assert!(carried >= 400, "every record of the shard travels: {moved}");
    retries_pay_nothing(&s, &paid, &payee, 2, "after the move");
    assert_eq!(balances(&s), before, "no retry paid again");
    // The copied records are durable at the new owner.
    s.kill9();
    let s = Server::start(dir.path(), &args);
    retries_pay_nothing(&s, &paid, &payee, 2, "after a kill -9");
    // And they travel on: back to cell 1, imported records included.
    let back = move_shard(&s, 4, 1);
    eprintln!("the move back: {back}");
    assert!(back["tier_records"].as_u64().unwrap() + back["records"].as_u64().unwrap() >= 400, "{back}");
    retries_pay_nothing(&s, &paid, &payee, 1, "after the move back");
    assert_eq!(balances(&s), before, "no retry paid again");
    let audit = settled(&s);
    assert_eq!(audit["findings"], json!([]), "{audit}");
}

/// A coordinator killed once the tier's records are copied, before the
/// freeze: the shard stays where it was, the copy is durable at the would-be
/// owner, and the next map that decides the move's epoch without it prunes
/// the copy there. Then the shard moves for real and no retry pays twice.
#[test]
fn a_copy_left_by_a_crashed_move_is_pruned_and_the_shard_moves_after() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cells", "3", "--shards", "16", "--transfers-retained-max", "16"];
    let s = Server::start_with_env(dir.path(), &args, &[("CELLPAY_TEST_CRASH_MOVE_AT", "copied")]);
    let (_, payee, paid) = pay_into_the_tier(&s, 200);
    let body = json!({"to": 2}).to_string();
    assert!(s.try_request("POST", "/v1/admin/shards/4/move", ADMIN, &body).is_none(), "the server aborted mid-move");
    s.kill9();
    let s = Server::start(dir.path(), &args);
    assert!(tier_gauge(&s, "imported_runs")[&2] >= 1.0, "the copy is durable at cell 2");
    assert_eq!(s.get("/v1/cluster", ADMIN).body["shard_map"][4], 1, "the shard never froze: it stays");
    retries_pay_nothing(&s, &paid, &payee, 1, "after the crash");
    // Another shard's move wins the crashed move's epoch; cell 2 installs that map.
    move_shard(&s, 7, 0);
    s.eventually("cell 2 prunes the copy of a move the map decided without it", || {
        tier_gauge(&s, "imported_runs")[&2] == 0.0
    });
    let moved = move_shard(&s, 4, 2);
    assert!(moved["tier_records"].as_u64().unwrap() >= 150, "{moved}");
    retries_pay_nothing(&s, &paid, &payee, 2, "after the move");
    assert!(tier_gauge(&s, "imported_runs")[&2] >= 1.0);
    let audit = settled(&s);
    assert_eq!(audit["findings"], json!([]), "{audit}");
}
