//! The ledger's safety net against the real binary and real data
//! directories: a payee cell restored from an old copy and a payer cell that
//! reuses sequence numbers are both found by `GET /v1/audit` and by
//! `cellpay check --data-dir`; the outbox towards a cell is bounded; a
//! transfer id is unique per payer; `/metrics` and the dashboard queue no
//! work on the cells; the full audit is admin-only.

mod common;

use std::path::Path;
use std::process::Command;

use common::{ids_in_cells, Server, ADMIN, CLIENT};
use serde_json::{json, Value};

fn open(s: &Server, id: &str, overdraft: bool) {
    let r = s.post("/v1/accounts", ADMIN, &json!({"id": id, "currency": "CNY", "overdraft": overdraft}));
    assert!(r.status == 201 || r.status == 200, "{}", r.body);
}

fn pay(s: &Server, token: &str, id: &str, from: &str, to: &str, amount: i64) -> common::Reply {
    s.post("/v1/transfers", token, &json!({"id": id, "from": from, "to": to, "amount": amount}))
}

fn drained(s: &Server) -> bool {
    let a = s.get("/v1/audit", CLIENT).body;
    a["in_flight"] == 0 && a["shadow"]["in_flight"] == 0
}

/// Copies a directory tree (a cell's store) as a backup would.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn restore(backup: &Path, cell_dir: &Path) {
    std::fs::remove_dir_all(cell_dir).unwrap();
    copy_dir(backup, cell_dir);
}

fn check(data: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay")).args(["check", "--data-dir"]).arg(data).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kinds(audit: &Value) -> Vec<String> {
    audit["findings"].as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_payee_cell_restored_from_an_old_copy_fails_the_audit_and_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ids_in_cells(2);
    let (bank, payee) = (&ids[0][0], &ids[1][0]);
    let s = Server::start(dir.path(), &["--cells", "2"]);
    open(&s, bank, true);
    open(&s, payee, false);
    assert_eq!(s.terminate(), Some(0));
    let backup = dir.path().join("backup-cell-1");
    copy_dir(&dir.path().join("cell-1"), &backup);

    let s = Server::start(dir.path(), &["--cells", "2"]);
    for i in 0..30 {
        assert_eq!(pay(&s, ADMIN, &format!("t{i}"), bank, payee, 7).status, 201);
    }
    s.eventually("the credits settle", || drained(&s));
    assert_eq!(s.get("/v1/audit", CLIENT).body["ok"], true);
    assert_eq!(s.terminate(), Some(0));
    assert_eq!(check(dir.path()).0, 0, "{}", check(dir.path()).1);

    // The payee's cell comes back from the copy taken before the 30 credits.
    restore(&backup, &dir.path().join("cell-1"));
    let (code, out) = check(dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("lost") && out.contains("cell 0→1") && out.contains("1..=30") && out.contains("210 lost"),
        "{out}"
    );

    let s = Server::start(dir.path(), &["--cells", "2"]);
    let audit = s.get("/v1/audit", CLIENT).body;
    assert_eq!(audit["ok"], false, "{audit}");
    assert_eq!(kinds(&audit), vec!["lost"], "{audit}");
    let message = audit["findings"][0]["message"].as_str().unwrap();
    assert!(message.contains("1..=30") && message.contains("210"), "{message}");
}

#[test]
fn a_payer_cell_that_reuses_sequence_numbers_is_refused_and_fails_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ids_in_cells(2);
    let (bank, payee) = (&ids[0][0], &ids[1][0]);
    let s = Server::start(dir.path(), &["--cells", "2"]);
    open(&s, bank, true);
    open(&s, payee, false);
    assert_eq!(s.terminate(), Some(0));
    let backup = dir.path().join("backup-cell-0");
    copy_dir(&dir.path().join("cell-0"), &backup);

    let s = Server::start(dir.path(), &["--cells", "2"]);
    for i in 0..5 {
        assert_eq!(pay(&s, ADMIN, &format!("t{i}"), bank, payee, 10).status, 201);
    }
    s.eventually("the credits settle", || drained(&s));
    assert_eq!(s.terminate(), Some(0));

    // The payer's cell comes back from before those 5 sends and sends again:
    // its next credit reuses sequence 1 with another message.
    restore(&backup, &dir.path().join("cell-0"));
    let s = Server::start(dir.path(), &["--cells", "2"]);
    let r = pay(&s, ADMIN, "after-restore", bank, payee, 99);
    assert_eq!((r.status, r.body["status"].as_str()), (201, Some("pending")), "{}", r.body);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let balance = s.get(&format!("/v1/accounts/{payee}"), ADMIN).body["balance"].as_i64();
    assert_eq!(balance, Some(50), "the reused sequence number is refused, not taken as a duplicate");
    let audit = s.get("/v1/audit", CLIENT).body;
    assert_eq!(audit["ok"], false, "{audit}");
    assert!(kinds(&audit).iter().any(|k| k == "unsent" || k == "diverged"), "{audit}");
    assert_eq!(s.terminate(), Some(0));
    let (code, out) = check(dir.path());
    assert_eq!(code, 1, "{out}");
}

#[test]
fn the_outbox_towards_a_cell_is_bounded_with_a_clear_503_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ids_in_cells(2);
    let (bank, local, payee) = (&ids[0][0], &ids[0][1], &ids[1][0]);
    let s = Server::start(dir.path(), &["--cells", "2"]);
    open(&s, bank, true);
    open(&s, local, false);
    open(&s, payee, false);
    let mut rules = s.get("/v1/admin/rules", ADMIN).body;
    rules["outbox_messages_max"] = json!(5);
    assert_eq!(s.put("/v1/admin/rules", ADMIN, &rules).status, 200);
    // Hold cross-cell delivery, as while the payee's cell is down.
    assert_eq!(s.put("/v1/admin/degrade/cross_cell_defer", ADMIN, &json!({"mode": "on"})).status, 200);
    for i in 0..5 {
        let r = pay(&s, ADMIN, &format!("t{i}"), bank, payee, 1);
        assert_eq!((r.status, r.body["status"].as_str()), (201, Some("pending")), "{}", r.body);
    }
    let r = pay(&s, ADMIN, "t5", bank, payee, 1);
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (503, Some("outbox_full")), "{}", r.body);
    assert!(r.retry_after.is_some(), "503 carries Retry-After");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("limit 5"), "{}", r.body);
    // Payments inside the cell are not held back.
    assert_eq!(pay(&s, ADMIN, "local", bank, local, 1).status, 201);
    let metrics = s.request("GET", "/metrics", None, &[], None).body;
    let metrics = metrics.as_str().unwrap();
    let backlog = metrics
        .lines()
        .find(|l| {
            l.starts_with("cellpay_outbox_backlog_messages{")
                && l.contains("source=\"0\"")
                && l.contains("dest=\"1\"")
                && l.contains("ledger=\"real\"")
        })
        .unwrap_or_else(|| panic!("no backlog gauge in {metrics}"));
    assert!(backlog.ends_with(" 5"), "{backlog}");
    assert_eq!(s.put("/v1/admin/degrade/cross_cell_defer", ADMIN, &json!({"mode": "off"})).status, 200);
    s.eventually("the outbox drains", || drained(&s));
    assert_eq!(pay(&s, ADMIN, "t5", bank, payee, 1).status, 201);
    s.eventually("the last credit settles", || drained(&s));
    assert_eq!(s.get(&format!("/v1/accounts/{payee}"), ADMIN).body["balance"], 6);
    assert_eq!(s.get("/v1/audit", CLIENT).body["ok"], true);
}

#[test]
fn a_transfer_id_is_unique_per_payer_and_a_read_without_the_payer_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ids_in_cells(2);
    let (a, b, payee) = (&ids[0][0], &ids[1][0], &ids[1][1]);
    let s = Server::start(dir.path(), &["--cells", "2"]);
    open(&s, a, true);
    open(&s, b, true);
    open(&s, payee, false);
    // Two payers in two cells use the same id, in one batch.
    let batch = json!({"transfers": [
        {"id": "same", "from": a, "to": payee, "amount": 10},
        {"id": "same", "from": b, "to": payee, "amount": 20},
    ]});
    let r = s.post("/v1/transfers/batch", ADMIN, &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["results"].as_array().unwrap().iter().all(|x| x.get("status").is_some()), "{}", r.body);
    s.eventually("both settle", || drained(&s));
    assert_eq!(s.get(&format!("/v1/accounts/{payee}"), ADMIN).body["balance"], 30, "each payer's transfer once");
    for _ in 0..20 {
        let r = s.get("/v1/transfers/same", ADMIN);
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (409, Some("conflict")), "{}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap().starts_with("2 transfers"), "{}", r.body);
    }
    for (payer, amount, cell) in [(a, 10, 0), (b, 20, 1)] {
        let r = s.get(&format!("/v1/transfers/same?from={payer}"), ADMIN);
        assert_eq!((r.status, r.body["amount"].as_i64(), r.cell), (200, Some(amount), Some(cell)), "{}", r.body);
    }
    let r = s.get(&format!("/v1/transfers/other?from={a}"), ADMIN);
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("transfer_not_found")));
    let r = s.get("/v1/transfers/same?payer=x", ADMIN);
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (400, Some("invalid_request")));
    // Replays stay idempotent per payer.
    let again = pay(&s, ADMIN, "same", a, payee, 10);
    assert_eq!(again.status, 200, "{}", again.body);
    let clash = pay(&s, ADMIN, "same", b, payee, 21);
    assert_eq!(clash.status, 409, "{}", clash.body);
}

/// Reads `cellpay_cell_queries_total` summed over cells.
fn queries_total(s: &Server) -> u64 {
    let text = s.request("GET", "/metrics", None, &[], None).body;
    text.as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cellpay_cell_queries_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn metrics_and_the_dashboard_read_published_figures_and_queue_nothing_on_the_cells() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ids_in_cells(2);
    let s = Server::start(dir.path(), &["--cells", "2"]);
    open(&s, &ids[0][0], true);
    open(&s, &ids[1][0], false);
    assert_eq!(pay(&s, ADMIN, "m1", &ids[0][0], &ids[1][0], 5).status, 201);
    s.eventually("settled", || drained(&s));
    std::thread::sleep(std::time::Duration::from_millis(300)); // let idle relays finish a poll
    let before = queries_total(&s);
    // Within /metrics' rate (20 a second, at once), each scrape is answered.
    for _ in 0..15 {
        assert_eq!(s.request("GET", "/metrics", None, &[], None).status, 200);
        assert_eq!(s.get("/dashboard/data", CLIENT).status, 200);
    }
    let after = queries_total(&s);
    // The dashboard's figures need a token.
    assert_eq!(s.request("GET", "/dashboard/data", None, &[], None).status, 401);
    // Idle relays poll each outbox now and then (8 relays, every 200 ms):
    // allow those, never one query per scrape.
    assert!(after - before < 15, "{} queries for 15 scrapes of each", after - before);
    // A flood of scrapes is refused cheaply, with the contract's error.
    let codes: Vec<u16> = (0..40).map(|_| s.request("GET", "/metrics", None, &[], None).status).collect();
    assert!(codes.contains(&429), "{codes:?}");
    let r = s.request("GET", "/metrics", None, &[], None);
    if r.status == 429 {
        assert_eq!(r.body["error"]["code"], "rate_limited", "{}", r.body);
    }
    // The full audit walks every account: admin only.
    let r = s.get("/v1/audit?full=true", CLIENT);
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (403, Some("forbidden")), "{}", r.body);
    let r = s.get("/v1/audit?full=true", ADMIN);
    assert_eq!(
        (r.status, r.body["ok"].as_bool(), r.body["full"].as_bool()),
        (200, Some(true), Some(true)),
        "{}",
        r.body
    );
    let r = s.get("/v1/audit?full=maybe", ADMIN);
    assert_eq!(r.status, 400);
}
