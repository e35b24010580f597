//! Placement end to end: `cellpay serve --cpus` pins every thread of the
//! server, a bad list is refused naming the flag, and `bench http` splits
//! the CPUs between the server it starts and itself and reports the CPU each
//! side used.

mod common;

use std::process::Command;

use common::{allowed_cpus as allowed, Server};

/// Every thread's `Cpus_allowed_list` of process `pid`.
fn thread_cpus(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|s| Some(s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?.trim().to_string()))
        .collect()
}

#[test]
fn serve_with_cpus_runs_every_thread_on_that_cpu() {
    let cpus = allowed();
    let last = *cpus.last().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cpus", &last.to_string()]);
    let threads = thread_cpus(s.child.id());
    // Engines, relays, the runtime's workers: more than the main thread.
    assert!(threads.len() > 4, "{threads:?}");
    if cpus.len() < 2 {
        eprintln!("one CPU: every thread runs on it whatever --cpus says; nothing more to check");
        return;
    }
    assert!(threads.iter().all(|t| *t == last.to_string()), "every thread on CPU {last}: {threads:?}");
}

#[test]
fn a_bad_cpu_list_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let beyond = std::thread::available_parallelism().unwrap().get().max(allowed().len()) + 64;
    for (cpus, why) in
        [("x", "is not a CPU list"), ("3-1", "runs backwards"), (&beyond.to_string(), "this machine has no CPU")]
    {
        let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(["--cpus", cpus])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--cpus {cpus}: {stderr}");
        assert!(stderr.contains("--cpus") && stderr.contains(why), "--cpus {cpus}: {stderr}");
    }
    // The same through the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CELLPAY_CPUS", "0-x")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--cpus \"0-x\" is not a CPU list"), "{stderr}");
    // And on the generator's side.
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["bench", "http", "--accounts", "100", "--seconds", "0.1", "--server-cpus", "1-"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--server-cpus"), "{stderr}");
}

#[test]
fn bench_http_splits_the_cpus_and_reports_each_sides_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["bench", "http", "--accounts", "2000", "--connections", "8", "--seconds", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["placement"];
    for key in ["server_cpu_us_per_payment", "engine_cpu_us_per_payment", "generator_requests_per_cpu_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} missing or zero in {v}");
    }
    assert!(
        v["server_cpu_us_per_payment"].as_f64() >= v["engine_cpu_us_per_payment"].as_f64(),
        "the whole process includes its engine threads: {v}"
    );
    for side in ["server", "generator"] {
        assert!(p[side]["cpu_s"].as_f64().is_some_and(|x| x > 0.0), "{side} in {p}");
        assert!(p[side]["cpu_share"].as_f64().is_some_and(|x| x > 0.0), "{side} in {p}");
    }
    let cpus = allowed();
    if cpus.len() >= 2 {
        let list = |c: &[usize]| c.iter().map(usize::to_string).collect::<Vec<_>>();
        let half = cpus.len() / 2;
        assert_eq!(p["mode"], "split", "{p}");
        // The kernel's list form; on 2 CPUs simply "0" and "1".
        let first = list(&cpus[..half]);
        let rest = list(&cpus[half..]);
        assert!(first.iter().all(|c| p["server"]["cpus"].as_str().unwrap().contains(c.as_str())), "{p}");
        assert!(rest.iter().all(|c| p["generator"]["cpus"].as_str().unwrap().contains(c.as_str())), "{p}");
    } else {
        assert_eq!(p["mode"], "shared", "one CPU: nothing to split: {p}");
    }
}
