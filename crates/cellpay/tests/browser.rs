//! Real headless Chromium (Debian's `chromium`, which `.ci/run` installs) opens
//! the live dashboard and the HTML readiness report: the pages load without a
//! console error, show every cell, and the dashboard's numbers and charts
//! change while load runs.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Server, ADMIN, CLIENT};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Loads `url` in headless Chromium, lets its timers run for `budget_ms` of
/// virtual time, and answers the DOM and the console messages.
fn load(url: &str, budget_ms: u32, profile_dir: &std::path::Path) -> (String, Vec<String>) {
    assert!(std::path::Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: install Debian's chromium (.ci/run does)");
    let out = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = stderr.lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// The text of each cell of each row of the table with `id`.
fn rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no table {id}"));
    let table = &dom[start..start + dom[start..].find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").unwrap()..];
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|td| {
                    let text = &td[td.find('>').unwrap() + 1..];
                    text[..text.find("</td>").unwrap()].to_string()
                })
                .collect()
        })
        .collect()
}

/// The charts of the dashboard: every chart's `data-max` (the highest value it
/// drew), its number of points, and whether it drew a line, by element id.
const CHARTS: &[&str] = &[
    "chart-answers",
    "chart-p99",
    "chart-cells",
    "chart-queue",
    "chart-backlog",
    "chart-refused-class",
    "chart-refused-layer",
    "chart-shards",
];

struct Chart {
    max: f64,
    points: usize,
    drawn: bool,
}

fn chart(dom: &str, id: &str) -> Chart {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no chart {id}"));
    let tag = &dom[start..start + dom[start..].find('>').unwrap()];
    let attr = |name: &str| -> String {
        let at = tag.find(&format!("{name}=\"")).unwrap_or_else(|| panic!("chart {id} has no {name}: {tag}"));
        let value = &tag[at + name.len() + 2..];
        value[..value.find('"').unwrap()].to_string()
    };
    let body = &dom[start..];
    let body = &body[..body.find("</svg>").unwrap_or_else(|| panic!("chart {id} drew no svg"))];
    Chart {
        max: attr("data-max").parse().unwrap(),
        points: attr("data-points").parse().unwrap(),
        drawn: body.contains("<polyline") || body.contains("<rect"),
    }
}

#[test]
fn the_dashboard_and_the_report_load_cleanly_and_show_every_cell() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Server::start(&dir.path().join("data"), &["--cells", "4"]));
    assert_eq!(s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true})).status, 201);
    let payees: Vec<String> = (0..40).map(|i| format!("shop-{i}")).collect();
    for p in &payees {
        assert_eq!(s.post("/v1/accounts", CLIENT, &json!({"id": p, "currency": "CNY"})).status, 201);
    }
    let url = format!("{}/dashboard#token={CLIENT}", s.base);

    let (dom, console) = load(&url, 2500, &dir.path().join("chromium-1"));
    assert!(console.is_empty(), "console messages: {console:?}");
    let before = rows(&dom, "cells");
    assert_eq!(before.len(), 4, "every cell has a row");
    for (i, row) in before.iter().enumerate() {
        assert_eq!(row[0], format!("cell {i}"));
        assert_eq!(row[1], "ready");
    }

    let switches = rows(&dom, "degrade");
    let names: Vec<&str> = switches.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["shadow_off", "history_off", "balance_reads_stale", "cross_cell_defer"], "{switches:?}");
    assert!(switches.iter().all(|r| r[1] == "off"));
    assert_eq!(rows(&dom, "guards").len(), 4, "a breaker and a limit per cell");
    for id in CHARTS {
        let c = chart(&dom, id);
        assert!(c.drawn && c.points >= 1, "{id} is drawn with history");
    }
    let idle = chart(&dom, "chart-answers");
    assert_eq!(idle.max, 0.0, "no ledger traffic while the page was open the first time");
    let shards = chart(&dom, "chart-shards");
    assert_eq!((shards.max, shards.points), (1024.0, 4), "the shard map: 1,024 shards over 4 cells");
    let r = s.request("PUT", "/v1/admin/degrade/history_off", Some(ADMIN), &[], Some(r#"{"mode":"on"}"#));
    assert_eq!(r.status, 200);

    // Load runs while the page is open a second time.
    let running = Arc::new(AtomicBool::new(true));
    let load_thread = {
        let (s, running, payees) = (s.clone(), running.clone(), payees.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while running.load(Ordering::Relaxed) && n < 20_000 {
                let batch: Vec<_> = (0..50).map(|k| json!({"id": format!("load-{n}-{k}"), "from": "bank", "to": payees[(n + k) % payees.len()], "amount": 1})).collect();
                assert_eq!(s.post("/v1/transfers/batch", ADMIN, &json!({"transfers": batch})).status, 200);
                n += 1;
            }
        })
    };
    let (dom, console) = load(&url, 3500, &dir.path().join("chromium-2"));
    running.store(false, Ordering::Relaxed);
    load_thread.join().unwrap();
    assert!(console.is_empty(), "console messages: {console:?}");
    let after = rows(&dom, "cells");
    let total = |rows: &[Vec<String>]| rows.iter().map(|r| r[5].parse::<u64>().unwrap()).sum::<u64>();
    assert!(total(&after) > total(&before), "the command totals moved: {before:?} → {after:?}");
    for id in ["chart-answers", "chart-p99", "chart-cells"] {
        let c = chart(&dom, id);
        assert!(c.max > 0.0 && c.points >= 2, "{id} moves under load: max {}, {} points", c.max, c.points);
    }
    let rates: Vec<u64> = after.iter().filter_map(|r| r[4].parse().ok()).collect();
    assert!(rates.iter().any(|r| *r > 0), "a live rate shows while load runs: {after:?}");
    assert!(!rows(&dom, "relays").is_empty(), "the relays are listed");
    let history = rows(&dom, "degrade").into_iter().find(|r| r[0] == "history_off").unwrap();
    assert_eq!((history[1].as_str(), history[2].as_str()), ("ON", "on"), "the operator's switch shows");
    let changes = rows(&dom, "changes");
    assert_eq!((changes.len(), changes[0][1].as_str(), changes[0][3].as_str()), (1, "history_off", "operator"));

    // The HTML readiness report of a short stress run.
    let profile = dir.path().join("p.toml");
    std::fs::write(&profile, "name = \"browser\"\naccounts = 100\n[[stages]]\nname = \"s\"\nduration_s = 2\nrate_from = 50\nrate_to = 50\n[mix]\ntransfer = 1\nbalance = 1\n[keys]\ncross_cell_share = 0.5\n").unwrap();
    let report_dir = dir.path().join("report");
    let status = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["stress", "--quiet", "--target", &s.base, "--token", ADMIN, "--profile"])
        .arg(&profile)
        .arg("--report")
        .arg(&report_dir)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let (dom, console) =
        load(&format!("file://{}", report_dir.join("report.html").display()), 500, &dir.path().join("chromium-3"));
    assert!(console.is_empty(), "console messages: {console:?}");
    assert!(dom.contains("Readiness report: browser") && dom.contains("<svg"));
    for c in 0..4 {
        assert!(dom.contains(&format!("cell {c}")), "the report shows cell {c}");
    }
}
