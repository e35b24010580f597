//! Crash over HTTP: concurrent clients send same-cell and cross-cell transfers
//! to `cellpay serve`, which is `kill -9`ed mid-flight and restarted. Every
//! transfer that got a 2xx is there afterwards, pending ones settle, the audit
//! holds with Σ = 0 and no account without overdraft is negative. Several
//! rounds on one data dir.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ids_in_cells, Server, ADMIN, CLIENT};
use rand::{Rng, SeedableRng};
use serde_json::json;

const ROUNDS: usize = 4;
const CLIENTS: usize = 6;

struct Acked {
    id: String,
    from: String,
    to: String,
    amount: i64,
}

fn accounts() -> Vec<String> {
    ids_in_cells(4).into_iter().flat_map(|v| v.into_iter().take(4)).collect()
}

#[test]
fn every_acknowledged_transfer_survives_kill_9_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let accounts = accounts();
    {
        let s = Server::start(dir.path(), &[]);
        assert_eq!(
            s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true})).status,
            201
        );
        for a in &accounts {
            assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": a, "currency": "CNY"})).status, 201);
            let fund = json!({"id": format!("fund-{a}"), "from": "bank", "to": a, "amount": 1_000_000});
            assert_eq!(s.post("/v1/transfers", ADMIN, &fund).status, 201);
        }
        s.kill9();
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(u64::from(std::process::id()));
    let mut all_acked: Vec<Acked> = Vec::new();
    for round in 0..ROUNDS {
        let server = Arc::new(Server::start(dir.path(), &[]));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (server, stop, acked, accounts) = (server.clone(), stop.clone(), acked.clone(), accounts.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64((round * 100 + c) as u64);
                    for n in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let from = &accounts[rng.random_range(0..accounts.len())];
                        let to = &accounts[rng.random_range(0..accounts.len())];
                        if from == to {
                            continue;
                        }
                        let id = format!("r{round}-c{c}-{n}");
                        let amount = rng.random_range(1..100);
                        let body = json!({"id": id, "from": from, "to": to, "amount": amount}).to_string();
                        let Some(r) = server.try_request("POST", "/v1/transfers", CLIENT, &body) else { return };
                        if (200..300).contains(&r.status) {
                            acked.lock().unwrap().push(Acked { id, from: from.clone(), to: to.clone(), amount });
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        // kill -9 while the clients are sending; they stop at their next failed request.
        unsafe { libc::kill(server.child.id() as i32, libc::SIGKILL) };
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        drop(Arc::try_unwrap(server).ok().expect("the clients are done with the server"));
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        assert!(!acked.is_empty(), "round {round}: clients got answers before the kill");
        all_acked.extend(acked);
    }

    let s = Server::start(dir.path(), &[]);
    for a in &all_acked {
        let r = s.get(&format!("/v1/transfers/{}", a.id), CLIENT);
        assert_eq!(r.status, 200, "acknowledged transfer {} is lost: {}", a.id, r.body);
        let t = &r.body;
        assert_eq!(
            (t["from"].as_str(), t["to"].as_str(), t["amount"].as_i64()),
            (Some(&*a.from), Some(&*a.to), Some(a.amount))
        );
    }
    s.eventually("every pending transfer settles", || {
        all_acked
            .iter()
            .rev()
            .take(200)
            .all(|a| s.get(&format!("/v1/transfers/{}", a.id), CLIENT).body["status"] == "settled")
    });
    s.eventually("nothing is in flight", || s.get("/v1/audit", CLIENT).body["in_flight"] == 0);
    let audit = s.get("/v1/audit", CLIENT).body;
    assert_eq!(
        (audit["ok"].as_bool(), audit["sum"].as_i64(), audit["negative_accounts"].as_u64()),
        (Some(true), Some(0), Some(0)),
        "{audit}"
    );
    eprintln!("{ROUNDS} rounds, {} acknowledged transfers checked", all_acked.len());
}
