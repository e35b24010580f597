//! Shadow traffic end to end (I5): a run of shadow accounts and transfers,
//! same-cell and cross-cell, single and batch, leaves every real balance and
//! every real shard digest exactly as it was, while the shadow ledger moves
//! and both audits hold.

mod common;

use common::{ids_in_cells, Server, ADMIN, CLIENT};
use serde_json::{json, Value};

fn real_balances(s: &Server, ids: &[String]) -> Vec<Value> {
    ids.iter().map(|id| s.get(&format!("/v1/accounts/{id}"), CLIENT).body["balance"].clone()).collect()
}

fn digests(s: &Server, shadow: bool) -> Value {
    let headers: &[(&str, &str)] = if shadow { &[("X-Cellpay-Shadow", "1")] } else { &[] };
    let r = s.request("GET", "/v1/digests", Some(ADMIN), headers, None);
    assert_eq!(r.status, 200);
    r.body["digests"].clone()
}

#[test]
fn shadow_traffic_never_touches_real_money() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "4"]);
    let ids: Vec<String> = ids_in_cells(4).into_iter().flat_map(|v| v.into_iter().take(3)).collect();
    // Real money: a bank and accounts in every cell, funded, some paying each other.
    assert_eq!(s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true})).status, 201);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": id, "currency": "CNY"})).status, 201);
        let fund = json!({"id": format!("real-{i}"), "from": "bank", "to": id, "amount": 10_000});
        assert_eq!(s.post("/v1/transfers", ADMIN, &fund).status, 201);
    }
    s.eventually("real funding settles", || s.get("/v1/audit", CLIENT).body["in_flight"] == 0);
    let balances = real_balances(&s, &ids);
    let digests_before = digests(&s, false);
    let shadow_digests_before = digests(&s, true);

    // Shadow: the same ids, a shadow bank, single and batch transfers across cells.
    let bank = json!({"id": "bank", "currency": "CNY", "overdraft": true});
    assert_eq!(s.post_shadow("/v1/accounts", ADMIN, &bank).status, 201, "a shadow account apart from the real one");
    for id in &ids {
        assert_eq!(s.post_shadow("/v1/accounts", CLIENT, &json!({"id": id, "currency": "CNY"})).status, 201);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = json!({"id": format!("real-{i}"), "from": "bank", "to": id, "amount": 777});
        let r = s.post_shadow("/v1/transfers", ADMIN, &t);
        assert_eq!(r.status, 201, "a shadow id never collides with a real one: {}", r.body);
    }
    s.eventually("shadow funding arrives", || s.get("/v1/audit", CLIENT).body["shadow"]["in_flight"] == 0);
    let batch: Vec<Value> = (0..200)
        .map(|n| {
            let (from, to) = (&ids[n % ids.len()], &ids[(n * 7 + 1) % ids.len()]);
            json!({"id": format!("shadow-{n}"), "from": from, "to": to, "amount": 1 + n % 5})
        })
        .filter(|t| t["from"] != t["to"])
        .collect();
    let r = s.post_shadow("/v1/transfers/batch", CLIENT, &json!({"transfers": batch}));
    assert_eq!(r.status, 200);
    assert!(r.body["results"].as_array().unwrap().iter().all(|x| x.get("status").is_some()), "{}", r.body);
    s.eventually("shadow credits settle", || s.get("/v1/audit", CLIENT).body["shadow"]["in_flight"] == 0);

    assert_eq!(real_balances(&s, &ids), balances, "real balances unchanged");
    assert_eq!(digests(&s, false), digests_before, "real shard digests unchanged");
    assert_ne!(digests(&s, true), shadow_digests_before, "the shadow ledger did move");
    let shadow_bank = s.request("GET", "/v1/accounts/bank", Some(CLIENT), &[("X-Cellpay-Shadow", "1")], None);
    assert_eq!(shadow_bank.body["balance"], -777 * ids.len() as i64);
    assert_eq!(s.get("/v1/accounts/bank", CLIENT).body["balance"], -10_000 * ids.len() as i64);
    let audit = s.get("/v1/audit", CLIENT).body;
    assert_eq!(
        (audit["ok"].as_bool(), audit["real"]["sum"].as_i64(), audit["shadow"]["sum"].as_i64()),
        (Some(true), Some(0), Some(0))
    );

    // And the other way: a real transfer changes the real digests (the check can fail).
    let t = json!({"id": "real-after", "from": &ids[0], "to": &ids[1], "amount": 1});
    assert_eq!(s.post("/v1/transfers", CLIENT, &t).status, 201);
    assert_ne!(digests(&s, false), digests_before);
}
