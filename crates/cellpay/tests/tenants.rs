//! Tenants against the real binary: a client token acts for its tenant only.
//! It may debit and read only its tenant's accounts and their transfers, and
//! pay into any account; only admin debits an overdraft account. Every
//! refusal is 403 `forbidden` and changes nothing.

mod common;

use common::{ids_in_cells, Server, ADMIN};
use serde_json::json;

const ACME: &str = "acme-client-secret-000000001";
const GLOBEX: &str = "globex-client-secret-0000001";

fn start(dir: &std::path::Path) -> Server {
    let acme = format!("client@acme:{ACME}");
    let globex = format!("client@globex:{GLOBEX}");
    Server::start(dir, &["--cells", "2", "--token", &acme, "--token", &globex])
}

fn forbidden(r: &common::Reply) {
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (403, Some("forbidden")), "{}", r.body);
}

fn pay(s: &Server, token: &str, id: &str, from: &str, to: &str, amount: i64) -> common::Reply {
    s.post("/v1/transfers", token, &json!({"id": id, "from": from, "to": to, "amount": amount}))
}

#[test]
fn a_client_token_spends_and_reads_only_its_tenants_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let ids = ids_in_cells(2);
    // Accounts in both cells for each tenant, so every rule is tried locally and across cells.
    let (bank, a1, a2, g1) = (&ids[0][0], &ids[0][1], &ids[1][1], &ids[1][2]);
    assert_eq!(s.post("/v1/accounts", ADMIN, &json!({"id": bank, "currency": "CNY", "overdraft": true})).status, 201);
    let r = s.post("/v1/accounts", ACME, &json!({"id": a1, "currency": "CNY"}));
    assert_eq!((r.status, r.body["tenant"].as_str()), (201, Some("acme")), "{}", r.body);
    assert_eq!(s.post("/v1/accounts", ACME, &json!({"id": a2, "currency": "CNY", "tenant": "acme"})).status, 201);
    forbidden(&s.post("/v1/accounts", ACME, &json!({"id": "x-1", "currency": "CNY", "tenant": "globex"})));
    forbidden(&s.post("/v1/accounts", ACME, &json!({"id": "x-2", "currency": "CNY", "overdraft": true})));
    // Admin opens for any tenant.
    let r = s.post("/v1/accounts", ADMIN, &json!({"id": g1, "currency": "CNY", "tenant": "globex"}));
    assert_eq!((r.status, r.body["tenant"].as_str()), (201, Some("globex")), "{}", r.body);
    // The same id opened again for another tenant is a conflict, not a takeover.
    let r = s.post("/v1/accounts", GLOBEX, &json!({"id": a1, "currency": "CNY"}));
    assert_eq!(r.status, 409, "{}", r.body);

    // Only admin debits the overdraft account: a client token cannot create money.
    forbidden(&pay(&s, ACME, "mint", bank, a1, (1 << 53) - 1));
    forbidden(&pay(&s, GLOBEX, "mint", bank, g1, 1));
    for (id, to) in [("f1", a1), ("f2", g1)] {
        assert_eq!(pay(&s, ADMIN, id, bank, to, 1_000).status, 201);
    }
    s.eventually("funding settles", || s.get("/v1/audit", ADMIN).body["in_flight"] == 0);

    // Paying into another tenant's account is allowed; debiting it is not.
    assert_eq!(pay(&s, ACME, "a-pays-g", a1, g1, 100).status, 201);
    assert_eq!(pay(&s, ACME, "a-moves", a1, a2, 50).status, 201);
    forbidden(&pay(&s, ACME, "steal", g1, a1, 500));
    forbidden(&pay(&s, ACME, "steal-2", g1, a2, 500));
    let batch = json!({"transfers": [
        {"id": "ok-item", "from": a1, "to": a2, "amount": 1},
        {"id": "bad-item", "from": g1, "to": a1, "amount": 1},
    ]});
    let r = s.post("/v1/transfers/batch", ACME, &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["results"][0]["status"].is_string(), "{}", r.body);
    assert_eq!(r.body["results"][1]["error"]["code"], "forbidden", "{}", r.body);
    s.eventually("payments settle", || s.get("/v1/audit", ADMIN).body["in_flight"] == 0);
    let balance = |id: &str| s.get(&format!("/v1/accounts/{id}"), ADMIN).body["balance"].as_i64().unwrap();
    assert_eq!((balance(a1), balance(a2), balance(g1)), (849, 51, 1_100), "the refusals changed nothing");

    // Reads: own accounts and transfers only.
    assert_eq!(s.get(&format!("/v1/accounts/{a1}"), ACME).status, 200);
    forbidden(&s.get(&format!("/v1/accounts/{g1}"), ACME));
    forbidden(&s.get(&format!("/v1/accounts/{g1}/entries"), ACME));
    assert_eq!(s.get(&format!("/v1/accounts/{g1}"), GLOBEX).status, 200);
    assert_eq!(s.get(&format!("/v1/accounts/{g1}"), ADMIN).status, 200);
    assert_eq!(pay(&s, GLOBEX, "g-own", g1, a1, 10).status, 201);
    forbidden(&s.get(&format!("/v1/transfers/g-own?from={g1}"), ACME));
    let r = s.get("/v1/transfers/g-own", ACME);
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("transfer_not_found")), "{}", r.body);
    assert_eq!(s.get("/v1/transfers/g-own", GLOBEX).status, 200);
    assert_eq!(s.get("/v1/transfers/g-own", ADMIN).status, 200);
    assert_eq!(s.get(&format!("/v1/transfers/a-pays-g?from={a1}"), ACME).status, 200);
    // The payee's tenant does not see the payer's transfer record.
    let r = s.get("/v1/transfers/a-pays-g", GLOBEX);
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(s.get("/v1/audit", ADMIN).body["ok"], true);
}
