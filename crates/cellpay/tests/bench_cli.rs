//! `cellpay bench engine --json` prints one JSON object with the fields the
//! benchmark contract names, and its figures add up. Not a speed test: it
//! runs a tiny workload and checks the report, not the rate.

use std::process::Command;

#[test]
fn bench_engine_json_reports_the_contract_fields() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args([
            "bench",
            "engine",
            "--accounts",
            "2000",
            "--batch",
            "100",
            "--seconds",
            "0.5",
            "--recovery",
            "--checkpoint-mib",
            "1",
            "--json",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in ["transfers_per_s", "commit_p99_ms", "cpu_us_per_transfer", "bytes_per_transfer"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} missing or zero in {v}");
    }
    let transfers = v["transfers"].as_f64().unwrap();
    let seconds = v["seconds"].as_f64().unwrap();
    let rate = v["transfers_per_s"].as_f64().unwrap();
    assert!((transfers / seconds - rate).abs() < 1.0, "rate = transfers / seconds");
    assert!(v["bytes_per_transfer"].as_f64().unwrap() >= v["log_bytes_per_transfer"].as_f64().unwrap());
    // Every transfer was funded: none may be refused for lack of money.
    assert!(v["rejected"].as_object().unwrap().is_empty(), "{v}");
    assert!(v["recovery"]["recovery_ms"].as_f64().is_some_and(|ms| ms > 0.0));
}

#[test]
fn bench_engine_refuses_bad_flags_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay")).args(["bench", "engine", "--batch", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch must be between"));
}
