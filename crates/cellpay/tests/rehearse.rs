//! `cellpay rehearse --quick` end to end: a fresh cluster, the bundled quick
//! profile on shadow traffic, and a report whose JSON has every field the
//! readiness report promises, plus the self-contained HTML page. Exit 0 on a
//! healthy cluster.

mod common;

use std::process::Command;

#[test]
fn a_quick_rehearsal_on_a_healthy_cluster_goes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["rehearse", "--quick", "--quiet", "--report"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("GO:"), "{stdout}");
    assert!(stdout.contains(dir.path().join("report.html").to_str().unwrap()));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    for key in [
        "profile",
        "peak_throughput_per_s",
        "operations",
        "cells",
        "errors_by_code",
        "shed",
        "degraded",
        "timeline",
        "slo",
        "checks",
        "generator",
        "cost",
        "placement",
        "bottleneck",
        "go",
        "readiness",
    ] {
        assert!(!r[key].is_null(), "report.json lacks {key}");
    }
    for op in ["transfer", "batch", "balance", "history", "status"] {
        let l = &r["operations"][op]["latency"];
        for q in ["p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(l[q].as_f64().is_some(), "{op} lacks {q}");
        }
    }
    assert_eq!(r["cells"].as_array().unwrap().len(), 4);
    assert!(r["cost"]["cpu_us_per_payment"].as_f64().is_some_and(|v| v > 0.0));
    assert!(r["cost"]["bytes_per_payment"].as_f64().is_some_and(|v| v > 0.0));
    assert!(r["cost"]["server_cpu_us_per_payment"].as_f64().is_some_and(|v| v > 0.0), "{}", r["cost"]);
    assert!(r["generator"]["requests_per_cpu_s"].as_f64().is_some_and(|v| v > 0.0), "{}", r["generator"]);
    // A fresh cluster of its own: the server's CPUs are known, and on 2 or more CPUs split from the generator's.
    let p = &r["placement"];
    for side in ["server", "generator"] {
        for key in ["cpu_s", "cpu_share"] {
            assert!(p[side][key].as_f64().is_some_and(|v| v > 0.0), "{side} {key}: {p}");
        }
        assert!(p[side]["cpus"].is_string(), "{p}");
    }
    let cpus = common::allowed_cpus().len();
    assert_eq!(p["mode"], if cpus >= 2 { "split" } else { "shared" }, "{p}");
    assert_eq!(r["checks"]["real_digests_changed"], 0);
    assert_eq!(r["generator"]["saturated"], false);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("GO:"), "charts and the verdict");
    assert!(!html.contains("<script src") && !html.contains("https://"), "self-contained: nothing fetched");
}
