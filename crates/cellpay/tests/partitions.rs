//! Partitions of a many-process cluster, made by fault-injecting proxies on
//! the cell-protocol links and in front of the control plane: a cell cut off
//! under load, a one-way cut (work arrives, acknowledgements do not), and the
//! control plane gone while payments flow; and shard maps that change while
//! a router cannot hear of it, or while every LISTEN connection is down.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellpay_core::{CellId, ShardMap, SHARDS_DEFAULT};
use cellpay_wire::faults::Fault;
use common::{balance, ids_in_cells, open, postgres_admin, Pieces, Server, ADMIN, CLIENT};
use serde_json::json;

/// Three cells; in each a funded payer paying a payee in the next cell.
struct Load {
    payers: Vec<String>,
    payees: Vec<String>,
}

fn accounts(s: &Server) -> Load {
    let ids = ids_in_cells(3);
    let (mut payers, mut payees) = (Vec::new(), Vec::new());
    for (c, in_cell) in ids.iter().enumerate() {
        open(s, ADMIN, &in_cell[0], true);
        open(s, CLIENT, &in_cell[1], false);
        let fund = json!({"id": format!("fund-{c}"), "from": in_cell[0], "to": in_cell[1], "amount": 1_000_000});
        assert_eq!(s.post("/v1/transfers", ADMIN, &fund).status, 201);
        payers.push(in_cell[1].clone());
    }
    for c in 0..3 {
        let payee = ids[(c + 1) % 3][2].clone();
        open(s, CLIENT, &payee, false);
        payees.push(payee);
    }
    Load { payers, payees }
}

/// (payer cell, id, status, code, when answered)
type Tried = (usize, String, u16, String, Instant);

/// Pays from every payer until `stop`; returns every attempt.
fn pay_until(s: &Server, load: &Load, stop: &AtomicBool, during: impl FnOnce()) -> Vec<Tried> {
    let tried = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for c in 0..3 {
            let (tried, payer, payee) = (&tried, &load.payers[c], &load.payees[c]);
            scope.spawn(move || {
                let mut n = 0;
                while !stop.load(Relaxed) {
                    let id = format!("p{c}-{n}");
                    let r =
                        s.post("/v1/transfers", CLIENT, &json!({"id": id, "from": payer, "to": payee, "amount": 1}));
                    let code = r.body["error"]["code"].as_str().unwrap_or("").to_string();
                    tried.lock().unwrap().push((c, id, r.status, code, Instant::now()));
                    n += 1;
                    if r.status != 201 {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        during();
        stop.store(true, Relaxed);
    });
    tried.into_inner().unwrap()
}

/// Retries every payment not acknowledged, with its id, until acknowledged;
/// then checks each id was paid exactly once and the audit is exact.
fn every_id_once(s: &Server, load: &Load, tried: &[Tried]) {
    let mut per_payer = [0i64; 3];
    for (c, id, status, _, _) in tried {
        per_payer[*c] += 1;
        if *status == 201 {
            continue;
        }
        let body = json!({"id": id, "from": load.payers[*c], "to": load.payees[*c], "amount": 1});
        let acknowledged = (0..300).any(|_| {
            let r = s.post("/v1/transfers", CLIENT, &body);
            r.status == 201 || r.status == 200 || {
                std::thread::sleep(Duration::from_millis(50));
                false
            }
        });
        assert!(acknowledged, "{id} was never acknowledged");
    }
    s.eventually("every credit arrives and the audit is exact", || {
        let r = s.get("/v1/audit", CLIENT);
        r.status == 200 && r.body["ok"] == true && r.body["in_flight"] == 0
    });
    for (c, paid) in per_payer.iter().enumerate() {
        assert_eq!(balance(s, &load.payers[c]), 1_000_000 - paid, "payer {c}: each id debited once");
        assert_eq!(balance(s, &load.payees[c]), *paid, "payee of payer {c}: each credit applied once");
    }
}

fn breaker_state(s: &Server, cell: u32) -> f64 {
    let text = s.request("GET", "/metrics", None, &[], None).body.as_str().unwrap_or("").to_string();
    let prefix = format!("cellpay_breaker_state{{cell=\"{cell}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[test]
fn a_cell_cut_off_for_10_s_under_load_gets_every_credit_exactly_once_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pieces::start(dir.path(), 3);
    let s = &p.server;
    let load = accounts(s);
    let stop = AtomicBool::new(false);
    let mut cut_at = Instant::now();
    let mut breaker_opened = false;
    let tried = pay_until(s, &load, &stop, || {
        std::thread::sleep(Duration::from_millis(500));
        p.cell_proxies[2].set(Fault::Cut);
        cut_at = Instant::now();
        while cut_at.elapsed() < Duration::from_secs(10) {
            breaker_opened |= breaker_state(s, 2) > 0.0;
            std::thread::sleep(Duration::from_millis(200));
        }
        p.cell_proxies[2].set(Fault::Pass);
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(breaker_opened, "the router's breaker for the cut cell opened");
    let during: Vec<&Tried> = tried
        .iter()
        .filter(|t| t.4 > cut_at + Duration::from_millis(500) && t.4 < cut_at + Duration::from_secs(10))
        .collect();
    // Payers in the other cells keep paying, including into the cut cell (credits wait in their outboxes).
    let others: Vec<&&Tried> = during.iter().filter(|t| t.0 != 2).collect();
    let served = others.iter().filter(|t| t.2 == 201).count();
    assert!(
        served as f64 >= 0.999 * others.len() as f64,
        "{served} of {} other payments served during the cut",
        others.len()
    );
    assert!(others.iter().any(|t| t.0 == 1), "cell 1's payer paid into the cut cell");
    // The cut cell's payers are refused with cell_unavailable.
    for t in during.iter().filter(|t| t.0 == 2) {
        assert_eq!((t.2, t.3.as_str()), (503, "cell_unavailable"), "{}", t.1);
    }
    every_id_once(s, &load, &tried);
}

#[test]
fn a_one_way_cut_delivers_credits_whose_acknowledgements_were_lost_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pieces::start(dir.path(), 3);
    let s = &p.server;
    let load = accounts(s);
    let stop = AtomicBool::new(false);
    let mut held = (Instant::now(), Instant::now());
    let tried = pay_until(s, &load, &stop, || {
        std::thread::sleep(Duration::from_millis(500));
        // Cell 2 receives calls (credits from cell 1's relay among them) but its answers do not get out.
        p.cell_proxies[2].set(Fault::StallReplies);
        held.0 = Instant::now();
        std::thread::sleep(Duration::from_secs(6));
        held.1 = Instant::now();
        p.cell_proxies[2].set(Fault::Pass);
        std::thread::sleep(Duration::from_secs(1));
    });
    let answered_while_held =
        |c: usize| tried.iter().filter(|t| t.0 == c && t.4 > held.0 + Duration::from_secs(1) && t.4 < held.1).count();
    let (payer1, payer2) = (answered_while_held(1), answered_while_held(2));
    eprintln!("while cell 2's replies were held: cell 1's payer got {payer1} answers, cell 2's {payer2}");
    // Cell 1 goes on paying into cell 2 (its debits do not wait for cell 2); cell 2's own
    // payers wait on answers that do not come (each call's deadline is 5 s).
    assert!(
        payer1 > 10 * payer2.max(1),
        "while cell 2's replies were held: cell 1's payer {payer1} answers, cell 2's {payer2}"
    );
    every_id_once(s, &load, &tried);
}

#[test]
fn payments_go_on_while_the_control_plane_is_down_for_60_s() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pieces::start(dir.path(), 3);
    let s = &p.server;
    let load = accounts(s);
    let stop = AtomicBool::new(false);
    let mut down = (Instant::now(), Instant::now());
    let tried = pay_until(s, &load, &stop, || {
        std::thread::sleep(Duration::from_millis(500));
        p.control_proxy.set(Fault::Cut);
        down.0 = Instant::now();
        std::thread::sleep(Duration::from_secs(60));
        down.1 = Instant::now();
        p.control_proxy.set(Fault::Pass);
        std::thread::sleep(Duration::from_secs(2));
    });
    let during: Vec<&Tried> = tried.iter().filter(|t| t.4 > down.0 && t.4 < down.1).collect();
    let served = during.iter().filter(|t| t.2 == 201).count();
    let refused: Vec<String> =
        during.iter().filter(|t| t.2 != 201).map(|t| format!("{} {}", t.2, t.3)).take(5).collect();
    assert!(during.len() > 100, "payments were tried while the control plane was down");
    assert!(
        served as f64 >= 0.999 * during.len() as f64,
        "{served} of {} served with the control plane down: {refused:?}",
        during.len()
    );
    every_id_once(s, &load, &tried);
    // And the status reports come back once it returns.
    s.eventually("the control plane is read again", || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args([
                "cluster",
                "status",
                "--json",
                "--control",
                &format!("{}/{}", common::POSTGRES, s.database.as_ref().unwrap()),
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["cells"].as_array().is_some_and(|cells| cells.iter().all(|c| c["reporting"] == true))
            && v["routers"].as_array().is_some_and(|r| r.len() == 1)
    });
}

// ---- shard map changes ---------------------------------------------------------------------

/// An account of cell 0 (under the first map) whose shard holds none of `used`.
fn id_in_an_empty_shard_of_cell_0(used: &[&str]) -> String {
    let map = ShardMap::round_robin(SHARDS_DEFAULT, 3).unwrap();
    let taken: Vec<_> = used.iter().map(|id| map.shard_of(id)).collect();
    (0..)
        .map(|i| format!("moved-{i}"))
        .find(|id| map.owner_of(id) == CellId(0) && !taken.contains(&map.shard_of(id)))
        .unwrap()
}

/// A bank account opened in cell 0, and an account id of cell 0 in a shard that holds nothing.
fn bank_and_an_empty_shard(s: &Server) -> (String, String) {
    let bank = ids_in_cells(3)[0][0].clone();
    open(s, ADMIN, &bank, true);
    let moved = id_in_an_empty_shard_of_cell_0(&[&bank]);
    (bank, moved)
}

/// As an operator: gives the (empty) shard of `id` to cell `to`, in a map one epoch newer.
fn reassign(p: &Pieces, id: &str, to: u32) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let control = cellpay_control::Control::connect(&p.control_direct).await.unwrap();
        let map = control.view().await.unwrap().map;
        let mut owners = map.owners().to_vec();
        owners[map.shard_of(id).0 as usize] = CellId(to);
        let next = ShardMap::new(map.epoch() + 1, owners).unwrap();
        control.set_map(&next, "test").await.unwrap();
        next.epoch()
    })
}

/// The router's map epoch and its cells' epochs, from `GET /v1/cluster`.
fn epochs(s: &Server) -> (u64, Vec<u64>) {
    let c = s.get("/v1/cluster", ADMIN);
    let cells = c.body["cells"].as_array().unwrap().iter().map(|c| c["epoch"].as_u64().unwrap()).collect();
    (c.body["epoch"].as_u64().unwrap(), cells)
}

#[test]
fn a_router_with_a_stale_map_is_refused_wrong_cell_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pieces::start(dir.path(), 3);
    let s = &p.server;
    let (bank, moved) = bank_and_an_empty_shard(s);

    // The router alone loses the control plane and keeps its map at epoch 1;
    // the operator gives the moved account's shard to cell 1, and the cells follow.
    p.router_control_proxy.set(Fault::Cut);
    let epoch = reassign(&p, &moved, 1);
    assert_eq!(epoch, 2);
    s.eventually("every cell works at epoch 2", || epochs(s).1 == [2, 2, 2]);
    assert_eq!(epochs(s).0, 1, "the router's own map is stale");

    // Its first command for that shard goes to cell 0, which refuses it
    // `wrong_cell`; the router learns epoch 2 from cell 0 and goes once more, to cell 1.
    let r = s.post("/v1/accounts", CLIENT, &json!({"id": moved, "currency": "CNY"}));
    assert_eq!((r.status, r.cell, r.epoch), (201, Some(1), Some(2)), "{}", r.body);
    assert_eq!(epochs(s).0, 2, "the router works at the map cell 0 gave it");
    // Money reaches the moved account across cells, and leaves it from cell 1.
    let pay = s.post("/v1/transfers", ADMIN, &json!({"id": "to-moved", "from": bank, "to": moved, "amount": 500}));
    assert_eq!((pay.status, pay.cell), (201, Some(0)), "{}", pay.body);
    s.eventually("the credit arrives in cell 1", || balance(s, &moved) == 500);
    let back = s.post("/v1/transfers", CLIENT, &json!({"id": "from-moved", "from": moved, "to": bank, "amount": 200}));
    assert_eq!((back.status, back.cell, back.epoch), (201, Some(1), Some(2)), "{}", back.body);
    s.eventually("the payment back is credited", || balance(s, &moved) == 300);
    // Cell 0 holds nothing of the shard it gave away.
    assert_eq!(s.get(&format!("/v1/accounts/{moved}"), CLIENT).cell, Some(1));
    p.router_control_proxy.set(Fault::Pass);
}

#[test]
fn a_map_changed_while_every_listen_connection_is_killed_still_reaches_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pieces::start(dir.path(), 3);
    let s = &p.server;
    let (bank, moved) = bank_and_an_empty_shard(s);

    // Every connection the cluster holds to the control plane (the LISTENs
    // among them) is killed, and the map changes before they are back: the
    // notification reaches no one, and the followers' reads after reconnecting must find it.
    let database = s.database.as_deref().unwrap();
    postgres_admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    ));
    assert_eq!(reassign(&p, &moved, 2), 2);
    s.eventually("the router and every cell work at epoch 2", || epochs(s) == (2, vec![2, 2, 2]));
    let r = s.post("/v1/accounts", CLIENT, &json!({"id": moved, "currency": "CNY"}));
    assert_eq!((r.status, r.cell, r.epoch), (201, Some(2), Some(2)), "{}", r.body);
    let pay = s.post("/v1/transfers", ADMIN, &json!({"id": "to-moved", "from": bank, "to": moved, "amount": 700}));
    assert_eq!(pay.status, 201, "{}", pay.body);
    s.eventually("the credit arrives in cell 2", || balance(s, &moved) == 700);
}

#[test]
fn a_cell_cut_off_from_the_control_plane_catches_up_on_the_map_from_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pieces::start(dir.path(), 3);
    let s = &p.server;
    let ids = ids_in_cells(3);
    let (bank, payer) = (ids[0][0].clone(), ids[2][1].clone());
    open(s, ADMIN, &bank, true);
    open(s, CLIENT, &payer, false);
    let fund = s.post("/v1/transfers", ADMIN, &json!({"id": "fund", "from": bank, "to": payer, "amount": 1000}));
    assert_eq!(fund.status, 201, "{}", fund.body);
    s.eventually("the payer is funded", || balance(s, &payer) == 1000);
    let moved = id_in_an_empty_shard_of_cell_0(&[&bank, &payer]);

    // Cell 2 cannot hear of the new map; the router and cells 0 and 1 take it.
    p.cell_control_proxies[2].set(Fault::Cut);
    assert_eq!(reassign(&p, &moved, 1), 2);
    s.eventually("the router and cells 0 and 1 work at epoch 2", || epochs(s) == (2, vec![2, 2, 1]));

    // A payment of cell 2's payer reaches cell 2 from a router at epoch 2:
    // cell 2 refuses it, asks its peers for their map, takes epoch 2, and serves.
    let started = Instant::now();
    loop {
        let r = s.post("/v1/transfers", CLIENT, &json!({"id": "behind", "from": payer, "to": bank, "amount": 10}));
        if r.status == 201 || r.status == 200 {
            break;
        }
        assert_eq!(r.body["error"]["code"], "cell_unavailable", "{}", r.body);
        assert!(started.elapsed() < Duration::from_secs(10), "cell 2 never caught up: {}", r.body);
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("cell 2 caught up and served {:?} after the first refusal", started.elapsed());
    // Its control link still cut: the map came from its peers.
    s.eventually("cell 2 works at epoch 2", || epochs(s).1 == [2, 2, 2]);
    assert_eq!(balance(s, &payer), 990, "paid once");
    p.cell_control_proxies[2].set(Fault::Pass);
}
