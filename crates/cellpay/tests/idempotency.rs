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

    // The window passes over it: the record counts as gone, the id says it is a retry.
    std::thread::sleep(Duration::from_millis(3_500));
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
