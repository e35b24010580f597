//! The HTTP v1 contract against the real binary on a loopback port: every
//! endpoint and every error code a client can cause, idempotency, cross-cell
//! settlement and reversal, and every answer checked against the OpenAPI
//! document's schemas.

mod common;

use common::{conforms, ids_in_cells, Reply, Server, ADMIN, CLIENT};
use serde_json::{json, Value};

fn openapi() -> Value {
    serde_json::from_str(include_str!("../../api/openapi.json")).unwrap()
}

/// Asserts an error answer: status, code, the contract's shape, Retry-After on 503.
fn is_error(r: &Reply, status: u16, code: &str) {
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (status, Some(code)), "{}", r.body);
    conforms(&r.body, "Error");
    if status == 503 {
        assert!(r.retry_after.is_some(), "503 carries Retry-After");
    }
}

fn open(s: &Server, token: &str, id: &str, overdraft: bool) -> Reply {
    s.post("/v1/accounts", token, &json!({"id": id, "currency": "CNY", "overdraft": overdraft}))
}

fn pay(s: &Server, id: &str, from: &str, to: &str, amount: i64) -> Reply {
    s.post("/v1/transfers", CLIENT, &json!({"id": id, "from": from, "to": to, "amount": amount}))
}

/// A transfer out of an overdraft account (it creates money): admin only.
fn fund(s: &Server, id: &str, from: &str, to: &str, amount: i64) -> Reply {
    s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": from, "to": to, "amount": amount}))
}

fn balance(s: &Server, id: &str) -> i64 {
    let r = s.get(&format!("/v1/accounts/{id}"), CLIENT);
    assert_eq!(r.status, 200, "{}", r.body);
    conforms(&r.body, "Account");
    r.body["balance"].as_i64().unwrap()
}

const CLIENT_ERROR_FLAGS: [&str; 4] = ["--body-bytes-max", "65536", "--batch-items-max", "100"];

#[test]
fn accounts_transfers_and_every_client_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[&["--cells", "2"][..], &CLIENT_ERROR_FLAGS].concat());
    every_client_error(&s, 2, true);
}

/// The same contract through the first of 2 routers in front of 3 cell processes.
#[test]
fn accounts_transfers_and_every_client_error_many_processes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::up(dir.path(), 3, 2, &CLIENT_ERROR_FLAGS);
    every_client_error(&s, 3, false);
}

/// The same contract with the cells' data in PostgreSQL (`--store`).
#[test]
fn accounts_transfers_and_every_client_error_cells_on_postgresql() {
    let (dir, store) = (tempfile::tempdir().unwrap(), common::TempDatabase::create("api"));
    let s = Server::up(dir.path(), 3, 1, &[&["--store", &store.url()][..], &CLIENT_ERROR_FLAGS].concat());
    assert!(s.printed("data in PostgreSQL, schema cell_2"));
    every_client_error(&s, 3, false);
}

/// `in_process`: the cells run in the server's process, so its `/metrics` shows their engines.
fn every_client_error(s: &Server, cells: u32, in_process: bool) {
    let ids = ids_in_cells(cells);
    let (bank, alice, bob) = (&ids[0][0], &ids[0][1], &ids[0][2]);

    // Accounts: created, replayed, conflicting, forbidden, malformed.
    let r = open(s, ADMIN, bank, true);
    assert_eq!(r.status, 201);
    conforms(&r.body, "Account");
    assert_eq!((r.cell, r.epoch), (Some(0), Some(1)), "served by the owning cell");
    assert_eq!(open(s, ADMIN, bank, true).status, 200, "same body: replay");
    is_error(&open(s, ADMIN, bank, false), 409, "conflict");
    is_error(&open(s, CLIENT, "other", true), 403, "forbidden");
    for id in [alice, bob] {
        assert_eq!(open(s, CLIENT, id, false).status, 201);
    }
    is_error(&s.post("/v1/accounts", CLIENT, &json!({"id": "x", "currency": "XYZ"})), 400, "invalid_request");
    is_error(&s.post("/v1/accounts", CLIENT, &json!({"id": "bad id", "currency": "CNY"})), 400, "invalid_request");
    is_error(
        &s.post("/v1/accounts", CLIENT, &json!({"id": "x", "currency": "CNY", "extra": 1})),
        400,
        "invalid_request",
    );
    is_error(&s.request("POST", "/v1/accounts", Some(CLIENT), &[], Some("{not json")), 400, "invalid_request");

    // Auth: no token, a wrong token, on every /v1 route.
    for path in ["/v1/accounts/x", "/v1/transfers/x", "/v1/audit", "/v1/cluster", "/v1/digests"] {
        is_error(&s.request("GET", path, None, &[], None), 401, "unauthorized");
        is_error(&s.request("GET", path, Some("wrong-token-wrong-token"), &[], None), 401, "unauthorized");
    }
    is_error(&s.get("/v1/digests", CLIENT), 403, "forbidden");

    // Transfers: accepted, replayed, conflicting; each rule's error.
    let r = fund(s, "fund-1", bank, alice, 1_000);
    assert_eq!(r.status, 201);
    conforms(&r.body, "Transfer");
    assert_eq!(r.body["status"], "settled");
    assert_eq!(fund(s, "fund-1", bank, alice, 1_000).status, 200);
    is_error(&fund(s, "fund-1", bank, alice, 999), 409, "conflict");
    is_error(&pay(s, "t-zero", alice, bob, 0), 400, "invalid_request");
    is_error(&pay(s, "t-neg", alice, bob, -5), 400, "invalid_request");
    is_error(&pay(s, "t-big", alice, bob, 1 << 53), 400, "invalid_request");
    is_error(&pay(s, "t-self", alice, alice, 5), 400, "invalid_request");
    is_error(&pay(s, "t-poor", alice, bob, 1_001), 422, "insufficient_funds");
    is_error(&pay(s, "t-ghost", "ghost-payer", bob, 1), 404, "account_not_found");
    let usd = json!({"id": "t-usd", "from": alice, "to": bob, "amount": 1, "currency": "USD"});
    is_error(&s.post("/v1/transfers", CLIENT, &usd), 422, "currency_mismatch");
    let wrong_type = json!({"id": "t-type", "from": alice, "to": bob, "amount": "5"});
    is_error(&s.post("/v1/transfers", CLIENT, &wrong_type), 400, "invalid_request");
    let float = json!({"id": "t-float", "from": alice, "to": bob, "amount": 1.5});
    is_error(&s.post("/v1/transfers", CLIENT, &float), 400, "invalid_request");
    let memo = json!({"id": "t-memo", "from": alice, "to": bob, "amount": 1, "memo": "m".repeat(257)});
    is_error(&s.post("/v1/transfers", CLIENT, &memo), 400, "invalid_request");
    let huge = json!({"id": "t-huge", "from": alice, "to": bob, "amount": 1, "memo": "m".repeat(70_000)});
    is_error(&s.post("/v1/transfers", CLIENT, &huge), 413, "payload_too_large");
    assert_eq!(balance(s, alice), 1_000, "no rejected transfer moved money");
    is_error(&s.get("/v1/accounts/nobody", CLIENT), 404, "account_not_found");
    is_error(&s.get("/v1/transfers/nothing", CLIENT), 404, "transfer_not_found");
    is_error(&s.get("/v1/accounts/bad%20id", CLIENT), 400, "invalid_request");

    // A transfer's status and the payer's history.
    assert_eq!(pay(s, "t-ok", alice, bob, 250).status, 201);
    let r = s.get("/v1/transfers/t-ok", CLIENT);
    conforms(&r.body, "Transfer");
    assert_eq!((r.body["status"].as_str(), r.cell), (Some("settled"), Some(0)));
    let r = s.get(&format!("/v1/accounts/{alice}/entries?limit=1"), CLIENT);
    conforms(&r.body, "Entries");
    assert_eq!(r.body["entries"][0]["amount"], -250);
    let next = r.body["next_before"].as_u64().expect("a full page names the next one");
    let r = s.get(&format!("/v1/accounts/{alice}/entries?limit=5&before={next}"), CLIENT);
    assert_eq!(r.body["entries"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["entries"][0]["amount"], 1_000);
    is_error(&s.get(&format!("/v1/accounts/{alice}/entries?limit=0"), CLIENT), 400, "invalid_request");
    is_error(&s.get(&format!("/v1/accounts/{alice}/entries?limit=1001"), CLIENT), 400, "invalid_request");
    is_error(&s.get(&format!("/v1/accounts/{alice}/entries?cursor=1"), CLIENT), 400, "invalid_request");

    // The operations endpoints.
    let r = s.get("/v1/cluster", CLIENT);
    conforms(&r.body, "Cluster");
    assert_eq!(r.body["cells"].as_array().unwrap().len(), cells as usize);
    let r = s.get("/v1/audit", CLIENT);
    conforms(&r.body, "Audit");
    assert_eq!((r.body["ok"].as_bool(), r.body["sum"].as_i64()), (Some(true), Some(0)));
    let r = s.get("/v1/digests", ADMIN);
    conforms(&r.body, "Digests");
    assert_eq!(r.body["digests"].as_array().unwrap().len(), 1024);
    for path in ["/healthz", "/readyz"] {
        let r = s.request("GET", path, None, &[], None);
        assert_eq!(r.status, 200);
        conforms(&r.body, "Status");
    }
    let r = s.request("GET", "/openapi.json", None, &[], None);
    assert_eq!(r.body, openapi());
    let metrics = s.request("GET", "/metrics", None, &[], None);
    let text = metrics.body.as_str().unwrap();
    let mut names = vec!["cellpay_http_requests_total", "cellpay_http_request_duration_seconds_bucket"];
    if in_process {
        names.extend([
            "cellpay_cell_queue_depth",
            "cellpay_cell_commit_duration_seconds_bucket",
            "cellpay_cell_batch_size_commands_bucket",
            "cellpay_outbox_backlog_messages",
        ]);
    }
    for name in names {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    assert!(!text.contains(CLIENT) && !text.contains(ADMIN), "no secret in metrics");
    let r = s.request("GET", "/v2/nothing", Some(CLIENT), &[], None);
    assert_eq!(r.status, 404);
    conforms(&r.body, "Error");
}

#[test]
fn batches_answer_each_item_and_are_idempotent_per_item() {
    let dir = tempfile::tempdir().unwrap();
    batches(&Server::start(dir.path(), &["--cells", "2", "--batch-items-max", "100"]), 2);
}

#[test]
fn batches_answer_each_item_and_are_idempotent_per_item_many_processes() {
    let dir = tempfile::tempdir().unwrap();
    batches(&Server::up(dir.path(), 3, 2, &["--batch-items-max", "100"]), 3);
}

#[test]
fn batches_answer_each_item_and_are_idempotent_per_item_cells_on_postgresql() {
    let (dir, store) = (tempfile::tempdir().unwrap(), common::TempDatabase::create("api"));
    batches(&Server::up(dir.path(), 3, 1, &["--batch-items-max", "100", "--store", &store.url()]), 3);
}

fn batches(s: &Server, cells: u32) {
    let ids = ids_in_cells(cells);
    let (bank, a, b) = (&ids[0][0], &ids[0][1], &ids[1][0]);
    open(s, ADMIN, bank, true);
    open(s, CLIENT, a, false);
    open(s, CLIENT, b, false);
    let batch = json!({"transfers": [
        {"id": "b-1", "from": bank, "to": a, "amount": 100},
        {"id": "b-2", "from": bank, "to": b, "amount": 50},
        {"id": "b-3", "from": a, "to": a, "amount": 1},
        {"id": "b-4", "from": a, "to": b, "amount": 1_000_000},
        {"nonsense": true},
    ]});
    let r = s.post("/v1/transfers/batch", ADMIN, &batch);
    assert_eq!(r.status, 200);
    conforms(&r.body, "BatchResponse");
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results[0], json!({"id": "b-1", "status": "settled"}));
    assert_eq!(results[1], json!({"id": "b-2", "status": "pending"}), "b is in the other cell");
    assert_eq!(results[2]["error"]["code"], "invalid_request");
    assert_eq!(results[3]["error"]["code"], "insufficient_funds");
    assert_eq!(
        (results[4]["id"].clone(), results[4]["error"]["code"].as_str()),
        (Value::Null, Some("invalid_request"))
    );
    // The same batch again: accepted items replay, nothing moves twice.
    let again = s.post("/v1/transfers/batch", ADMIN, &batch);
    assert_eq!(again.body["results"][0], results[0]);
    let conflict = json!({"transfers": [{"id": "b-1", "from": bank, "to": a, "amount": 101}]});
    assert_eq!(s.post("/v1/transfers/batch", ADMIN, &conflict).body["results"][0]["error"]["code"], "conflict");
    s.eventually("b-2 settles", || s.get("/v1/transfers/b-2", CLIENT).body["status"] == "settled");
    assert_eq!((balance(s, a), balance(s, b)), (100, 50));
    // Too many items, none at all, malformed.
    let many: Vec<Value> = (0..101).map(|i| json!({"id": format!("m{i}"), "from": a, "to": b, "amount": 1})).collect();
    is_error(&s.post("/v1/transfers/batch", CLIENT, &json!({"transfers": many})), 413, "payload_too_large");
    is_error(&s.post("/v1/transfers/batch", CLIENT, &json!({"transfers": []})), 400, "invalid_request");
    is_error(&s.post("/v1/transfers/batch", CLIENT, &json!({"items": []})), 400, "invalid_request");
    assert_eq!(balance(s, a), 100);
}

#[test]
fn cross_cell_transfers_settle_and_a_missing_payee_is_reversed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "4"]);
    cross_cell(&s);
    assert_eq!(s.terminate(), Some(0), "SIGTERM drains and exits 0");
    // A restart finds the same cluster.
    let s = Server::start(dir.path(), &["--cells", "4"]);
    let ids = ids_in_cells(4);
    assert_eq!(balance(&s, &ids[3][0]), 300);
    assert_eq!(s.get("/v1/transfers/to-ghost", CLIENT).body["status"], "reversed");
}

/// Credits cross between cell processes through their relays.
#[test]
fn cross_cell_transfers_settle_and_a_missing_payee_is_reversed_many_processes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::up(dir.path(), 4, 2, &[]);
    cross_cell(&s);
}

#[test]
fn cross_cell_transfers_settle_and_a_missing_payee_is_reversed_cells_on_postgresql() {
    let (dir, store) = (tempfile::tempdir().unwrap(), common::TempDatabase::create("api"));
    let s = Server::up(dir.path(), 4, 1, &["--store", &store.url()]);
    cross_cell(&s);
}

fn cross_cell(s: &Server) {
    let ids = ids_in_cells(4);
    let bank = &ids[0][0];
    open(s, ADMIN, bank, true);
    for payees in &ids[1..] {
        open(s, CLIENT, &payees[0], false);
    }
    for (cell, payees) in ids.iter().enumerate().skip(1) {
        let r = fund(s, &format!("x{cell}"), bank, &payees[0], 100 * cell as i64);
        assert_eq!((r.status, r.body["status"].as_str(), r.cell), (201, Some("pending"), Some(0)));
    }
    for (cell, payees) in ids.iter().enumerate().skip(1) {
        let id = format!("x{cell}");
        s.eventually(&format!("{id} settles"), || {
            s.get(&format!("/v1/transfers/{id}"), CLIENT).body["status"] == "settled"
        });
        assert_eq!(balance(s, &payees[0]), 100 * cell as i64);
    }
    // A payee that does not exist in its cell: the credit is refused, the payer made whole.
    let ghost = &ids[2][5];
    let r = fund(s, "to-ghost", bank, ghost, 77);
    assert_eq!(r.body["status"], "pending");
    s.eventually("to-ghost is reversed", || s.get("/v1/transfers/to-ghost", CLIENT).body["status"] == "reversed");
    assert_eq!(balance(s, bank), -600);
    let r = s.get(&format!("/v1/accounts/{bank}/entries"), CLIENT);
    assert_eq!(r.body["entries"][0]["kind"], "reversal");
    let audit = s.get("/v1/audit", CLIENT);
    assert_eq!(
        (audit.body["ok"].as_bool(), audit.body["sum"].as_i64(), audit.body["in_flight"].as_i64()),
        (Some(true), Some(0), Some(0))
    );
}

#[test]
fn fewer_cells_than_the_stored_cluster_is_a_clear_error() {
    // A cluster grows (a new cell starts empty) but never drops a cell that
    // may own shards: fewer cells are refused, with the reason.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "3"]);
    assert_eq!(s.terminate(), Some(0));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cells", "2", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds a cluster of 3 cells, but 2 were asked for"), "{stderr}");
}

#[test]
fn without_configured_tokens_serve_writes_private_ones_and_never_prints_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cells", "1", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let path = dir.path().join("tokens.toml");
    for _ in 0..500 {
        if path.exists() && std::fs::read_to_string(&path).is_ok_and(|t| t.contains("admin")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    let secrets: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("secret = \"")).map(|s| s.trim_end_matches('"')).collect();
    assert_eq!(secrets.len(), 2);
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains(path.to_str().unwrap()), "the path is printed: {printed}");
    for secret in secrets {
        assert!(!printed.contains(secret), "a secret was printed");
    }
}

#[test]
fn the_schema_check_refuses_what_does_not_match() {
    let wrong = json!({"id": "a", "currency": "CNY", "balance": "12", "overdraft": false});
    let caught = std::panic::catch_unwind(|| conforms(&wrong, "Account"));
    assert!(caught.is_err(), "a string balance must not pass the Account schema");
    let extra = json!({"error": {"code": "invalid_request", "message": "m", "more": 1}});
    assert!(std::panic::catch_unwind(|| conforms(&extra, "Error")).is_err());
}

#[test]
fn settings_come_from_flag_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cellpay.toml");
    std::fs::write(&config, "cells = 3\nbatch_items_max = 5\nbody_bytes_max = 10000\n").unwrap();
    let data = dir.path().join("data");
    let path = config.to_str().unwrap();
    let s = Server::start_with_env(
        &data,
        &["--config", path, "--body-bytes-max", "20000"],
        &[("CELLPAY_BATCH_ITEMS_MAX", "7")],
    );
    assert_eq!(s.get("/v1/cluster", CLIENT).body["cells"].as_array().unwrap().len(), 3, "from the file");
    let items = |n: usize| json!({"transfers": (0..n).map(|i| json!({"id": format!("c{i}"), "from": "a", "to": "b", "amount": 1})).collect::<Vec<_>>()});
    assert_eq!(s.post("/v1/transfers/batch", CLIENT, &items(7)).status, 200, "the environment beats the file");
    is_error(&s.post("/v1/transfers/batch", CLIENT, &items(8)), 413, "payload_too_large");
    // 15 kB passes the flag's 20 kB limit (not the file's 10 kB) and reaches the memo check.
    let memo = |n: usize| json!({"id": "m", "from": "a", "to": "b", "amount": 1, "memo": "x".repeat(n)});
    is_error(&s.post("/v1/transfers", CLIENT, &memo(15_000)), 400, "invalid_request");
    is_error(&s.post("/v1/transfers", CLIENT, &memo(25_000)), 413, "payload_too_large");
    drop(s);
    std::fs::write(&config, "cells = 3\nunknown_setting = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["serve", "--config", path, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not valid at line 2") && stderr.contains("unknown_setting"), "{stderr}");
    // A line with a secret on it is never quoted back.
    std::fs::write(&config, "[[auth.tokens]]\nrole = \"admin\"\nsecret = \"very-secret-admin-token-000\" oops\n")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["serve", "--config", path, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 3") && !stderr.contains("very-secret"), "{stderr}");
}

#[test]
fn a_full_cell_queue_answers_503_overloaded_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let limits = [
        "--cells",
        "1",
        "--queue-commands-max",
        "2",
        "--batch-commands-max",
        "1",
        "--batch-items-max",
        "1",
        "--relay-messages-per-round-max",
        "1",
    ];
    let s = std::sync::Arc::new(Server::start(dir.path(), &limits));
    assert_eq!(open(&s, ADMIN, "bank", true).status, 201);
    assert_eq!(open(&s, CLIENT, "shop", false).status, 201);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for n in 0..40 {
                    let r = fund(&s, &format!("q{t}-{n}"), "bank", "shop", 1);
                    if r.status == 503 {
                        is_error(&r, 503, "overloaded");
                    } else {
                        assert_eq!(r.status, 201, "{}", r.body);
                    }
                    seen.push(r.status);
                }
                seen
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let accepted = statuses.iter().filter(|s| **s == 201).count() as i64;
    assert!(statuses.contains(&503), "16 clients against a queue of 2 overflow it");
    assert_eq!(balance(&s, "shop"), accepted, "exactly the accepted payments moved money");
}

#[test]
fn degrade_switches_and_flow_rules_change_live_and_every_answer_matches_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "2"]);
    let ids = ids_in_cells(2);
    let (bank, alice, merchant) = (&ids[0][0], &ids[0][1], &ids[1][0]);
    for (id, overdraft) in [(bank, true), (alice, false), (merchant, false)] {
        assert_eq!(open(&s, ADMIN, id, overdraft).status, 201);
        let r = s.post_shadow("/v1/accounts", ADMIN, &json!({"id": id, "currency": "CNY", "overdraft": overdraft}));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_eq!(fund(&s, "fund-alice", bank, alice, 10_000).status, 201);

    // The plan: declared switches, all off, readable by admins only.
    let r = s.get("/v1/admin/degrade", ADMIN);
    assert_eq!(r.status, 200);
    conforms(&r.body, "DegradeState");
    assert!(r.body["switches"].as_array().unwrap().iter().all(|w| w["active"] == false));
    is_error(&s.get("/v1/admin/degrade", CLIENT), 403, "forbidden");

    // shadow_off by hand: shadow traffic answers degraded, real traffic is untouched.
    let r = s.put("/v1/admin/degrade/shadow_off", ADMIN, &json!({"mode": "on"}));
    assert_eq!((r.status, &r.body["active"]), (200, &json!(true)), "{}", r.body);
    conforms(&r.body, "Switch");
    let shadow_pay = json!({"id": "sh-1", "from": bank, "to": alice, "amount": 5});
    is_error(&s.post_shadow("/v1/transfers", ADMIN, &shadow_pay), 503, "degraded");
    assert_eq!(pay(&s, "real-1", alice, merchant, 5).status, 201);
    let metrics = s.request("GET", "/metrics", None, &[], None).body;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("cellpay_degrade_changes_total{switch=\"shadow_off\",to=\"on\"} 1"),
        "changes are counted"
    );
    assert!(metrics.contains("cellpay_shed_total{layer=\"degrade\",class=\"shadow\",cell=\"router\"} 1"));
    assert_eq!(s.put("/v1/admin/degrade/shadow_off", ADMIN, &json!({"mode": "auto"})).status, 200);
    assert_eq!(s.post_shadow("/v1/transfers", ADMIN, &shadow_pay).status, 201);
    let r = s.get("/v1/admin/degrade", ADMIN);
    assert_eq!(r.body["changes"].as_array().unwrap().len(), 2, "{}", r.body);
    // Nothing undeclared can be switched, and a bad order changes nothing.
    is_error(&s.put("/v1/admin/degrade/payments_off", ADMIN, &json!({"mode": "on"})), 400, "invalid_request");
    is_error(&s.put("/v1/admin/degrade/history_off", ADMIN, &json!({"mode": "sideways"})), 400, "invalid_request");
    let bad_plan = json!({"switch": [{"name": "history_off", "description": "x",
        "trigger": {"signal": "error_ratio", "above": 0.5, "for_s": 1.0}}]});
    is_error(&s.put("/v1/admin/degrade", ADMIN, &bad_plan), 400, "invalid_request");
    assert_eq!(s.get("/v1/admin/degrade", ADMIN).body["switches"].as_array().unwrap().len(), 4, "the old plan stays");

    // Stale balances: the second read is served from the cache, with its age.
    assert_eq!(s.put("/v1/admin/degrade/balance_reads_stale", ADMIN, &json!({"mode": "on"})).status, 200);
    assert_eq!(balance(&s, merchant), 5);
    assert_eq!(pay(&s, "real-2", alice, merchant, 7).status, 201);
    let r = s.get(&format!("/v1/accounts/{merchant}"), CLIENT);
    assert_eq!((r.status, r.body["balance"].as_i64()), (200, Some(5)), "served stale");
    assert!(r.stale_ms.is_some() && r.cell.is_some());
    conforms(&r.body, "Account");
    assert_eq!(s.put("/v1/admin/degrade/balance_reads_stale", ADMIN, &json!({"mode": "off"})).status, 200);
    s.eventually("the payee's credit", || balance(&s, merchant) == 12);

    // Flow rules: a bad set is refused and the old one stays; a good one applies at once.
    let r = s.get("/v1/admin/rules", ADMIN);
    assert_eq!(r.status, 200);
    conforms(&r.body, "FlowRules");
    let mut rules = r.body.clone();
    rules["retry"]["budget_percent"] = json!(50.0);
    is_error(&s.put("/v1/admin/rules", ADMIN, &rules), 400, "invalid_request");
    assert_eq!(s.get("/v1/admin/rules", ADMIN).body, r.body, "the old rules stay");
    let mut rules = r.body.clone();
    rules["hot_keys"]["accounts"] = json!({ merchant.as_str(): {"rate_per_s": 1, "burst": 2} });
    let r = s.put("/v1/admin/rules", ADMIN, &rules);
    assert_eq!(r.status, 200, "{}", r.body);
    conforms(&r.body, "FlowRules");
    assert_eq!(pay(&s, "hot-1", alice, merchant, 1).status, 201);
    assert_eq!(pay(&s, "hot-2", alice, merchant, 1).status, 201);
    is_error(&pay(&s, "hot-3", alice, merchant, 1), 429, "rate_limited");
    assert_eq!(pay(&s, "cold-1", alice, bank, 1).status, 201, "other payees are not limited");

    // The drill endpoints are closed unless serve runs with --drills true.
    is_error(&s.post("/v1/admin/cells/0/halt", ADMIN, &json!({})), 403, "forbidden");
}
