//! The idempotency window through HTTP: an id that carries its own time (a
//! UUIDv7) and is older than the window is refused with 409
//! `idempotency_expired`, never paid; a fresh one is paid once and its retry
//! answers the original; once the window has passed over it, its retry is
//! refused too. `/metrics` says the window promised and the window held.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Server, ADMIN, CLIENT};
use serde_json::json;

fn uuid_v7(ms: u64, tail: u64) -> String {
    let h = format!("{ms:012x}");
    format!("{}-{}-7{:03x}-8{:03x}-{:012x}", &h[..8], &h[8..12], tail & 0xfff, tail & 0xfff, tail)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn a_retry_older_than_the_window_is_refused_not_paid_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &["--idempotency-window-s", "3"]);
    assert_eq!(s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true})).status, 201);
    assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": "shop", "currency": "CNY"})).status, 201);
    let pay = |id: &str| s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": "bank", "to": "shop", "amount": 7}));
    let balance = || s.get("/v1/accounts/shop", CLIENT).body["balance"].as_i64().unwrap();

    // Made a minute ago, beyond a 3 s window: refused, nothing paid.
    let stale = pay(&uuid_v7(now_ms() - 60_000, 1));
    assert_eq!(
        (stale.status, stale.body["error"]["code"].as_str()),
        (409, Some("idempotency_expired")),
        "{}",
        stale.body
    );
    common::conforms(&stale.body, "Error");
    assert_eq!(balance(), 0);

    let fresh = uuid_v7(now_ms(), 2);
    assert_eq!(pay(&fresh).status, 201);
    let retry = pay(&fresh);
    assert_eq!(retry.status, 200, "a retry within the window answers the original: {}", retry.body);
    assert_eq!(balance(), 7);

    // The window passes over it: the record counts as gone, the id says it is a
    // retry. (A record keeps its time in whole seconds rounded up, so the
    // window can be up to a second longer, never shorter.)
    std::thread::sleep(Duration::from_millis(4_500));
    let late = pay(&fresh);
    assert_eq!((late.status, late.body["error"]["code"].as_str()), (409, Some("idempotency_expired")), "{}", late.body);
    assert_eq!(balance(), 7, "paid once");

    let metrics = s.request("GET", "/metrics", None, &[], None).body;
    let metrics = metrics.as_str().unwrap();
    let value = |prefix: &str| -> Vec<f64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(value("cellpay_idempotency_window_promised_seconds{"), vec![3.0; 4], "{metrics}");
    let held = value("cellpay_idempotency_window_seconds{");
    assert_eq!(held.len(), 8, "per cell and ledger: {metrics}");
    assert!(held.iter().all(|&w| w == 3.0), "no record has left memory: {held:?}");
}

fn metric_values(s: &Server, prefix: &str) -> Vec<f64> {
    let metrics = s.request("GET", "/metrics", None, &[], None).body;
    let metrics = metrics.as_str().unwrap().to_string();
    metrics.lines().filter(|l| l.starts_with(prefix)).map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect()
}

/// Pays transfers of 1 bank → shop through the batch endpoint, 100 an item; answers the ids accepted.
fn pay_batches(s: &Server, ids: &[String]) -> Vec<String> {
    let mut accepted = Vec::new();
    for chunk in ids.chunks(100) {
        let items: Vec<_> =
            chunk.iter().map(|id| json!({"id": id, "from": "bank", "to": "shop", "amount": 1})).collect();
        let r = s.post("/v1/transfers/batch", ADMIN, &json!({ "transfers": items }));
        assert_eq!(r.status, 200, "{}", r.body);
        for (item, id) in r.body["results"].as_array().unwrap().iter().zip(chunk) {
            if item["status"] == "settled" {
                accepted.push(id.clone());
            }
        }
    }
    accepted
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn open_bank_and_shop(s: &Server) {
    assert_eq!(s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true})).status, 201);
    assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": "shop", "currency": "CNY"})).status, 201);
}

#[test]
fn a_retry_after_its_record_left_memory_answers_the_original_and_pays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // 16 records per ledger per cell in memory: almost every record moves to the disk tier.
    let s = Server::start(&dir.path().join("data"), &["--transfers-retained-max", "16"]);
    open_bank_and_shop(&s);
    let pay = |id: &str| s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": "bank", "to": "shop", "amount": 1}));
    for i in 0..300 {
        assert_eq!(pay(&format!("one-{i}")).status, 201);
    }
    let balance = || s.get("/v1/accounts/shop", CLIENT).body["balance"].as_i64().unwrap();
    assert_eq!(balance(), 300);
    // Right away (from the records on their way to disk) and once the tier holds them.
    for round in 0..2 {
        for i in (0..300).step_by(7) {
            let r = pay(&format!("one-{i}"));
            assert_eq!(r.status, 200, "round {round}, one-{i}: {}", r.body);
            assert_eq!(r.body["id"], format!("one-{i}"));
        }
        let other = s.post("/v1/transfers", ADMIN, &json!({"id": "one-3", "from": "bank", "to": "shop", "amount": 2}));
        assert_eq!(other.body["error"]["code"], "conflict", "another body under a key on disk");
        let read = s.get("/v1/transfers/one-5?from=bank", CLIENT);
        assert_eq!((read.status, read.body["status"].as_str()), (200, Some("settled")), "{}", read.body);
        assert_eq!(balance(), 300, "nothing paid twice");
        s.eventually("the tier holds records", || {
            metric_values(&s, "cellpay_idempotency_tier_records{").iter().sum::<f64>() > 250.0
        });
    }
    assert!(metric_values(&s, "cellpay_idempotency_disk_hits_total{").iter().sum::<f64>() > 0.0);
    let held = metric_values(&s, "cellpay_idempotency_window_seconds{");
    assert!(held.iter().all(|&w| w == 86_400.0), "the tier holds the whole window: {held:?}");
}

#[test]
fn a_kill_9_while_records_move_to_disk_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--transfers-retained-max", "8"];
    let s = Server::start(&data, &args);
    open_bank_and_shop(&s);
    // A clean stop checkpoints after the tier holds every record that left
    // memory: from then on, those records live in the tier only.
    let mut acked = pay_batches(&s, &ids("early", 1_200));
    assert_eq!(s.terminate(), Some(0));
    let s = Server::start(&data, &args);
    // Batches land while the tier thread writes, expires and merges runs
    // (one a second, or sooner on a flush); kill -9 lands somewhere in that.
    for round in 0..6 {
        acked.extend(pay_batches(&s, &ids(&format!("k{round}"), 400)));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(acked.len(), 3_600);
    s.kill9();
    let s = Server::start(&data, &args);
    let balance = || s.get("/v1/accounts/shop", CLIENT).body["balance"].as_i64().unwrap();
    assert_eq!(balance(), 3_600);
    // Every acknowledged transfer, retried: each answers as accepted, none moves money.
    let again = pay_batches(&s, &acked);
    assert_eq!(again.len(), acked.len());
    assert_eq!(balance(), 3_600, "a retry after kill -9 paid again");
    for id in acked.iter().step_by(97) {
        let r = s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": "bank", "to": "shop", "amount": 1}));
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
}

#[test]
fn the_window_held_drops_loudly_when_the_disk_bound_bites() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &["--transfers-retained-max", "8", "--idempotency-disk-bytes-max", "65536"],
    );
    open_bank_and_shop(&s);
    let promised = metric_values(&s, "cellpay_idempotency_window_seconds{");
    assert!(promised.iter().all(|&w| w == 86_400.0), "{promised:?}");
    // ~100 bytes a record: a few thousand records are well past 64 KiB per cell.
    for round in 0..8 {
        pay_batches(&s, &ids(&format!("b{round}"), 800));
        std::thread::sleep(Duration::from_millis(400));
    }
    s.eventually("the window held drops", || {
        metric_values(&s, "cellpay_idempotency_window_seconds{").iter().any(|&w| w < 86_400.0)
    });
    let bytes = metric_values(&s, "cellpay_idempotency_tier_bytes{");
    assert!(bytes.iter().all(|&b| b <= 65_536.0 * 2.0), "the bound holds (one run of slack): {bytes:?}");
}
