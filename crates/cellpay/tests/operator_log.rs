//! The operator log against the real binary: money-creating and
//! peak-changing actions leave durable, append-only entries naming the
//! token's role and tenant, readable by admin only, surviving a restart, and
//! no secret ever enters them.

mod common;

use common::{conforms, Server, ADMIN, CLIENT};
use serde_json::{json, Value};

fn actions(s: &Server) -> Vec<Value> {
    let r = s.get("/v1/admin/actions", ADMIN);
    assert_eq!(r.status, 200, "{}", r.body);
    conforms(&r.body, "OperatorActions");
    r.body["actions"].as_array().unwrap().clone()
}

#[test]
fn operator_actions_are_recorded_durably_and_readable_by_admin_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "2"]);
    assert_eq!(s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true})).status, 201);
    let r = s.post("/v1/accounts", ADMIN, &json!({"id": "acme-1", "currency": "CNY", "tenant": "acme"}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": "alice", "currency": "CNY"})).status, 201);
    let fund = json!({"id": "mint-1", "from": "bank", "to": "alice", "amount": 500});
    assert_eq!(s.post("/v1/transfers", ADMIN, &fund).status, 201);
    assert_eq!(s.post("/v1/transfers", ADMIN, &fund).status, 200, "a replay is not a second action");
    let batch = json!({"transfers": [{"id": "mint-2", "from": "bank", "to": "alice", "amount": 7}]});
    assert_eq!(s.post("/v1/transfers/batch", ADMIN, &batch).status, 200);
    let client_pay = json!({"id": "p-1", "from": "alice", "to": "acme-1", "amount": 1});
    assert_eq!(s.post("/v1/transfers", CLIENT, &client_pay).status, 201);
    assert_eq!(s.put("/v1/admin/degrade/history_off", ADMIN, &json!({"mode": "on"})).status, 200);
    let mut rules = s.get("/v1/admin/rules", ADMIN).body;
    rules["outbox_messages_max"] = json!(1000);
    assert_eq!(s.put("/v1/admin/rules", ADMIN, &rules).status, 200);

    let r = s.get("/v1/admin/actions", CLIENT);
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (403, Some("forbidden")));
    let names = |a: &[Value]| a.iter().map(|e| e["action"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let expected = ["open_account", "open_account", "transfer", "transfer_batch", "degrade_switch", "flow_rules"]
        .map(String::from);
    let got = actions(&s);
    assert_eq!(names(&got), expected, "{got:?}");
    assert!(got.iter().all(|e| e["role"] == "admin" && e["tenant"].is_null()), "{got:?}");
    assert_eq!(got[1]["args"]["tenant"], "acme", "an account opened for another tenant names it");
    assert_eq!(got[2]["args"]["from"], "bank");
    assert_eq!(got[4]["args"], json!({"switch": "history_off", "mode": "on"}));
    assert_eq!(s.get("/v1/admin/actions?limit=2", ADMIN).body["actions"].as_array().unwrap().len(), 2);
    assert_eq!(s.get("/v1/admin/actions?limit=0", ADMIN).status, 400);

    // Durable: it survives a kill -9, and holds no secret.
    s.kill9();
    let text = std::fs::read_to_string(dir.path().join("operator.log")).unwrap();
    assert!(!text.contains(ADMIN) && !text.contains(CLIENT), "no secret in the operator log");
    let s = Server::start(dir.path(), &["--cells", "2"]);
    assert_eq!(names(&actions(&s)), expected);
}
