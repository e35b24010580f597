//! `cellpay stress` against the real `cellpay serve`: a shadow run leaves the
//! real digests and balances unchanged and says go; a real transfer sent in the
//! middle of a shadow run changes a real digest and turns the verdict to no-go.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{conforms, Server, ADMIN, CLIENT};
use serde_json::{json, Value};

const PROFILE: &str = r#"
name = "suite"
accounts = 300
batch_size = 10
[[stages]]
name = "steady"
duration_s = 3
rate_from = 150
rate_to = 150
[mix]
transfer = 6
batch = 1
balance = 2
history = 1
status = 1
[keys]
hot_merchants = 3
hot_share = 0.3
cross_cell_share = 0.2
[slo.transfer]
p99_ms = 2000
p999_ms = 5000
error_rate = 0.01
"#;

fn stress(s: &Server, dir: &std::path::Path) -> std::process::Child {
    let profile = dir.join("suite.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["stress", "--quiet", "--target", &s.base, "--token", ADMIN, "--profile"])
        .arg(&profile)
        .arg("--report")
        .arg(dir.join("report"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report").join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_shadow_run_goes_and_a_real_transfer_in_the_middle_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]);
    assert_eq!(
        s.post("/v1/accounts", ADMIN, &json!({"id": "real-bank", "currency": "CNY", "overdraft": true})).status,
        201
    );
    assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": "real-shop", "currency": "CNY"})).status, 201);
    let real_before = s.get("/v1/accounts/real-bank", CLIENT).body["balance"].clone();

    let clean = stress(&s, dir.path()).wait_with_output().unwrap();
    let r = report(dir.path());
    assert_eq!(clean.status.code(), Some(0), "{}", r["readiness"]);
    assert_eq!(r["checks"]["real_digests_changed"], 0);
    assert_eq!(r["checks"]["wrong_cell_answers"], 0);
    assert!(r["checks"]["audit_polls"].as_u64().unwrap() >= 2);
    for key in [
        "peak_throughput_per_s",
        "operations",
        "cells",
        "errors_by_code",
        "shed",
        "degraded",
        "timeline",
        "slo",
        "cost",
        "bottleneck",
        "readiness",
    ] {
        assert!(!r[key].is_null(), "the report has {key}");
    }
    assert!(r["operations"]["transfer"]["requests"].as_u64().unwrap() > 200);
    // Each side's CPU, the whole server process's cost per payment beside the engines' alone.
    let placement = &r["placement"];
    assert_eq!(placement["mode"], "unknown", "a --target runs where it was started: {placement}");
    assert!(placement["server"]["cpu_s"].as_f64().is_some_and(|v| v > 0.0), "{placement}");
    assert!(placement["generator"]["cpu_s"].as_f64().is_some_and(|v| v > 0.0), "{placement}");
    assert!(placement["generator"]["cpu_share"].as_f64().is_some_and(|v| v > 0.0), "{placement}");
    assert!(r["generator"]["requests_per_cpu_s"].as_f64().is_some_and(|v| v > 0.0), "{}", r["generator"]);
    let (server, engine) = (r["cost"]["server_cpu_us_per_payment"].as_f64(), r["cost"]["cpu_us_per_payment"].as_f64());
    assert!(server.is_some_and(|v| v > 0.0) && server >= engine, "{}", r["cost"]);
    // No record left memory: the cells held the whole promised day.
    assert_eq!(r["idempotency"]["retry_horizon_s"], 86_400);
    assert_eq!(r["idempotency"]["window_held_min_s"].as_f64(), Some(86_400.0), "{}", r["idempotency"]);
    assert_eq!(s.get("/v1/accounts/real-bank", CLIENT).body["balance"], real_before, "real money untouched");

    let mut dirty = stress(&s, dir.path());
    std::thread::sleep(Duration::from_millis(2500));
    let t = json!({"id": "mid-run", "from": "real-bank", "to": "real-shop", "amount": 1});
    assert_eq!(s.post("/v1/transfers", ADMIN, &t).status, 201);
    let status = dirty.wait().unwrap();
    let r = report(dir.path());
    assert_eq!(status.code(), Some(1), "a touched real ledger is no-go");
    assert!(r["checks"]["real_digests_changed"].as_u64().unwrap() > 0);
    assert!(r["readiness"].as_str().unwrap().contains("real shard digests changed"));
}

#[test]
fn a_window_shorter_than_the_retry_horizon_is_no_go() {
    // 64 records per ledger per cell and no disk tier: the funding alone pushes
    // records out of memory, so the window a client could count on is seconds, not a day.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &["--transfers-retained-max", "64", "--idempotency-tier", "false"]);
    let status = stress(&s, dir.path()).wait().unwrap();
    let r = report(dir.path());
    assert_eq!(status.code(), Some(1), "{}", r["readiness"]);
    let held = r["idempotency"]["window_held_min_s"].as_f64().unwrap();
    assert!(held < 3_600.0, "{}", r["idempotency"]);
    assert_eq!(r["idempotency"]["window_promised_s"].as_f64(), Some(86_400.0));
    let readiness = r["readiness"].as_str().unwrap();
    assert!(readiness.contains("idempotency window held fell to"), "{readiness}");
    // /metrics says the same, per cell and ledger.
    let metrics = s.request("GET", "/metrics", None, &[], None).body;
    let metrics = metrics.as_str().unwrap();
    let shadow: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("cellpay_idempotency_window_seconds{") && l.contains("ledger=\"shadow\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(shadow.len(), 4, "{metrics}");
    assert!(shadow.iter().all(|&w| w < 86_400.0), "{shadow:?}");
}

/// Shards move while the run goes: a rebalance, one shard, a drain and a
/// refill, as profile events. Every answer still comes from the owner at the
/// epoch it was served at, the audit holds, the run says go, and the report
/// carries the capacity plan for the profile's target peak.
#[test]
fn shards_move_during_a_run_and_every_answer_comes_from_the_owner_at_its_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &["--cells", "3", "--shards", "16"]);
    let moving = PROFILE
        .replace("duration_s = 3", "duration_s = 5")
        .replace("batch_size = 10", "batch_size = 10\ntarget_peak_per_s = 100000\nheadroom = 0.5")
        .replace(
            "[mix]",
            r#"[[events]]
at_s = 0.5
action = "move_shards"
shard = 5
cell = 0
[[events]]
at_s = 1.0
action = "move_shards"
moves = 3
[[events]]
at_s = 2.0
action = "drain_cell"
cell = 2
[[events]]
at_s = 3.5
action = "add_cell"
cell = 2
[mix]"#,
        );
    let profile = dir.path().join("moving.toml");
    std::fs::write(&profile, moving).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["stress", "--quiet", "--target", &s.base, "--token", ADMIN, "--profile"])
        .arg(&profile)
        .arg("--report")
        .arg(dir.path().join("report"))
        .output()
        .unwrap();
    assert!(dir.path().join("report").join("report.json").exists(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", r["readiness"]);
    let statuses: Vec<u64> = r["events"].as_array().unwrap().iter().map(|e| e["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![200, 202, 202, 202], "{}", r["events"]);
    assert_eq!(r["checks"]["wrong_cell_answers"], 0, "{}", r["checks"]);
    assert_eq!(r["checks"]["audit_failures"], 0);
    assert_eq!(r["checks"]["real_digests_changed"], 0, "moving a shard changes no real digest");
    let moves = s.get("/v1/admin/moves", ADMIN).body;
    assert!(moves["moved"].as_u64().unwrap() >= 5, "{moves}");
    conforms(&moves, "MoverFigures");
    assert_eq!(moves["steps_us"]["install"]["count"], moves["pause_us"]["count"], "each kept pause has its steps");
    let cluster = s.get("/v1/cluster", ADMIN).body;
    assert!(cluster["cells"][2]["shards"].as_u64().unwrap() > 0, "the drained cell was filled again: {cluster}");
    let c = &r["capacity"];
    assert!(c["payments_per_s_at_slo"].as_f64().unwrap() > 0.0, "{c}");
    let per_cell = c["per_cell_per_s"].as_f64().unwrap();
    let needed = c["cells_needed"].as_u64().unwrap();
    assert_eq!(needed, (100_000.0 * 1.5 / per_cell).ceil() as u64, "{c}");
    let html = std::fs::read_to_string(dir.path().join("report").join("report.html")).unwrap();
    assert!(html.contains("Capacity plan") && html.contains(&format!("{needed} cells")), "the HTML carries the plan");
}
