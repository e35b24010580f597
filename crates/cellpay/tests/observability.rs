//! Observability as an SRE checks it: `/metrics` of a live server after
//! real traffic passes `promtool check metrics`, and carries the SLI
//! histograms by class, status class and tenant, the engine's commit and
//! queue-wait histograms and the relay's settle time.
//!
//! `promtool` comes from Debian's `prometheus` package (`.ci/run` installs
//! it). Without it these tests fail: a skipped check proves nothing.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{ids_in_cells, Server, ADMIN, CLIENT};
use serde_json::json;

/// Runs `promtool` with `args`, feeding `stdin`; answers (success, stdout + stderr).
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    child.stdin.take().expect("piped").write_all(stdin.as_bytes()).expect("promtool reads its input");
    let out = child.wait_with_output().expect("promtool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The value of one sample line (`name{labels} value`), exactly as named.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_after_traffic_pass_promtool_and_carry_the_slis() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "2"]);
    let ids = ids_in_cells(2);
    let (bank, alice, bob) = (&ids[0][0], &ids[0][1], &ids[1][0]);
    let open = |token, id: &str, overdraft| {
        s.post("/v1/accounts", token, &json!({"id": id, "currency": "CNY", "overdraft": overdraft}))
    };
    assert_eq!(open(ADMIN, bank, true).status, 201);
    assert_eq!(open(CLIENT, alice, false).status, 201);
    assert_eq!(open(CLIENT, bob, false).status, 201);
    let fund = s.post("/v1/transfers", ADMIN, &json!({"id": "f-1", "from": bank, "to": alice, "amount": 1000}));
    assert_eq!(fund.status, 201);
    for i in 0..20 {
        // Cross-cell: alice lives in cell 0, bob in cell 1.
        let r =
            s.post("/v1/transfers", CLIENT, &json!({"id": format!("p-{i}"), "from": alice, "to": bob, "amount": 1}));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let refused = s.post("/v1/transfers", CLIENT, &json!({"id": "big", "from": alice, "to": bob, "amount": 1_000_000}));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(s.request("GET", "/no/such/route", Some(CLIENT), &[], None).status, 404);
    assert_eq!(s.request("POST", "/v1/transfers", Some("not-a-token-at-all-000"), &[], Some("{}")).status, 401);
    let shadow = s.post_shadow("/v1/accounts", CLIENT, &json!({"id": alice, "currency": "CNY"}));
    assert_eq!(shadow.status, 201, "{}", shadow.body);

    // At most 20 scrapes a second are answered; a 429 reads as no figures yet.
    let scrape = || s.request("GET", "/metrics", None, &[], None).body.as_str().unwrap_or_default().to_string();
    let settled = r#"cellpay_relay_settle_duration_seconds_count{source="0",dest="1",ledger="real"}"#;
    s.eventually("the relay settles and times every cross-cell payment", || sample(&scrape(), settled) == Some(20.0));
    let text = scrape();

    let (clean, problems) = promtool(&["check", "metrics"], &text);
    assert!(clean && problems.trim().is_empty(), "promtool check metrics:\n{problems}\n--- /metrics ---\n{text}");

    // The SLI histograms, by class, status class and tenant.
    let class = |route: &str, class: &str, status: &str| {
        let series = format!(
            r#"cellpay_http_request_class_duration_seconds_count{{route="{route}",class="{class}",status_class="{status}"}}"#
        );
        sample(&text, &series).unwrap_or(0.0)
    };
    assert_eq!(class("/v1/transfers", "critical", "2xx"), 21.0, "{text}");
    assert_eq!(class("/v1/transfers", "critical", "4xx"), 2.0, "the 422 and the 401");
    assert_eq!(class("/v1/accounts", "shadow", "2xx"), 1.0);
    assert_eq!(class("unmatched", "none", "4xx"), 1.0, "the 404");
    let tenant = |tenant: &str, status: &str| {
        let series =
            format!(r#"cellpay_critical_request_duration_seconds_count{{tenant="{tenant}",status_class="{status}"}}"#);
        sample(&text, &series).unwrap_or(0.0)
    };
    assert_eq!(tenant("default", "2xx"), 22.0, "alice and bob opened, 20 payments");
    assert_eq!(tenant("(admin)", "2xx"), 2.0, "the bank opened and funded alice");
    assert_eq!((tenant("default", "4xx"), tenant("(unknown)", "4xx")), (1.0, 1.0), "the 422; the 401 has no tenant");
    // The engines' own histograms: every answered payment was one batch or part of one.
    let commits = sample(&text, r#"cellpay_cell_commit_duration_seconds_count{cell="0"}"#).unwrap();
    assert!(commits >= 20.0, "{commits} commits in cell 0");
    assert!(sample(&text, r#"cellpay_cell_batch_size_commands_count{cell="1"}"#).unwrap() > 0.0);
    assert!(text.contains("# TYPE cellpay_cell_queue_wait_seconds histogram"));
    assert!(!text.contains(CLIENT) && !text.contains(ADMIN), "no secret in metrics");
    // The whole process's CPU, every thread and the kernel's share: what a payment costs the server.
    assert!(sample(&text, "process_cpu_seconds_total").is_some_and(|s| s > 0.0), "{text}");
}

/// `deploy/observability/`, from this crate's manifest directory.
fn deploy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/observability")
}

#[test]
fn the_alerting_rules_are_valid_and_their_unit_tests_pass() {
    let dir = deploy_dir();
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("SUCCESS"), "promtool {}:\n{text}", args.join(" "));
    }
}

/// The anchor GitHub gives a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_links_to_a_runbook_section_that_exists() {
    let rules = std::fs::read_to_string(deploy_dir().join("alerts.yml")).unwrap();
    let operations = include_str!("../../../docs/OPERATIONS.md");
    let sections: Vec<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(anchor)
        .collect();
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let links: Vec<&str> =
        rules.lines().filter_map(|l| l.trim_start().strip_prefix("runbook_url: docs/OPERATIONS.md#")).collect();
    assert!(alerts >= 10, "{alerts} alerts");
    assert_eq!(links.len(), alerts, "every alert has a runbook_url into docs/OPERATIONS.md");
    for link in links {
        assert!(sections.iter().any(|s| s == link), "no section of docs/OPERATIONS.md has the anchor #{link}");
    }
}

/// A family the rules and the dashboard accept as the promised retry horizon
/// when it is published cluster-wide rather than per cell.
const FAMILIES_EXPECTED_SOON: &[&str] = &["cellpay_idempotency_retry_horizon_seconds"];

/// Every `cellpay_…` name in `expr` is a family of `/metrics` (or of its
/// histogram series), a family expected soon, or a rule recorded in `rules`.
fn names_are_known(expr: &str, rules: &str) {
    let mut rest = expr;
    while let Some(at) = rest.find("cellpay_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        rest = &rest[at + name.len()..];
        if name.contains(':') {
            assert!(rules.contains(&format!("record: {name}\n")), "{name} is not recorded by alerts.yml: {expr}");
            continue;
        }
        let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        let known = cellpay_api::metrics::FAMILIES.iter().any(|f| f.name == family || f.name == name)
            || FAMILIES_EXPECTED_SOON.contains(&family);
        assert!(known, "{name} is no metric cellpay exposes: {expr}");
    }
}

#[test]
fn the_grafana_dashboard_queries_parse_and_name_only_metrics_that_exist() {
    let dir = deploy_dir();
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    exprs.extend(
        dashboard["annotations"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["expr"].as_str().map(String::from)),
    );
    assert!(exprs.len() >= 25, "{} queries", exprs.len());
    for expr in &exprs {
        names_are_known(expr, &rules);
    }
    // promtool parses each query as the expression of a recording rule.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr.replace("$job", "cellpay.*");
        file.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dashboard-queries.yml");
    std::fs::write(&path, file).unwrap();
    let out = Command::new("promtool").args(["check", "rules"]).arg(&path).output().expect("promtool is installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "a dashboard query does not parse:\n{text}");
}

#[test]
fn every_answer_carries_a_request_id_and_the_log_lines_about_it_carry_it_too() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let data = dir.path().join("data");
    let s = Server::start_with_stderr(
        &data,
        &["--cells", "2", "--drills", "true", "--log-format", "json"],
        &[],
        log.into(),
    );
    let ids = ids_in_cells(2);
    let (bank, payer) = (&ids[1][0], &ids[1][1]);
    let open = |id: &str, overdraft| {
        let body = json!({"id": id, "currency": "CNY", "overdraft": overdraft}).to_string();
        s.request("POST", "/v1/accounts", Some(ADMIN), &[("X-Request-Id", "open-1")], Some(&body))
    };
    let r = open(bank, true);
    assert_eq!((r.status, r.request_id.as_deref()), (201, Some("open-1")), "a sane client id is echoed");
    assert_eq!(open(payer, false).status, 201);

    // Ids that are too long or carry other characters are replaced, not refused.
    for bad in ["x".repeat(65), "a b".to_string(), "a\"b".to_string(), "{evil}".to_string()] {
        let r = s.request("GET", "/v1/cluster", Some(CLIENT), &[("X-Request-Id", &bad)], None);
        assert_eq!(r.status, 200);
        let id = r.request_id.expect("an id on every answer");
        assert!(id != bad && id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()), "{bad:?} -> {id}");
    }
    // Made up when none is sent, distinct per request, on errors and operator routes too.
    let mut seen = std::collections::HashSet::new();
    for (method, path, token) in [
        ("GET", "/healthz", None),
        ("GET", "/no/such/route", Some(CLIENT)),
        ("POST", "/v1/transfers", None),
        ("GET", "/metrics", None),
    ] {
        let r = s.request(method, path, token, &[], None);
        assert!(seen.insert(r.request_id.clone().expect("an id on every answer")), "{path}: ids repeat");
    }

    // A 5xx is logged at WARN with its id, as JSON.
    assert_eq!(s.request("POST", "/v1/admin/cells/1/halt", Some(ADMIN), &[], None).status, 200);
    let body = json!({"id": "t-1", "from": payer, "to": bank, "amount": 1}).to_string();
    let r = s.request("POST", "/v1/transfers", Some(ADMIN), &[("X-Request-Id", "pay-while-down-7")], Some(&body));
    assert_eq!((r.status, r.request_id.as_deref()), (503, Some("pay-while-down-7")), "{}", r.body);
    let line_of = |id: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(&log_path).unwrap();
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|l| l["span"]["id"] == id)
    };
    let mut line = None;
    s.eventually("the 5xx is logged", || {
        line = line_of("pay-while-down-7");
        line.is_some()
    });
    let line = line.unwrap();
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(
        (line["fields"]["status"].as_u64(), line["span"]["route"].as_str()),
        (Some(503), Some("/v1/transfers")),
        "{line}"
    );
    assert!(line_of("open-1").is_none(), "a 2xx is not logged at WARN (RUST_LOG=warn)");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.contains(CLIENT) && !text.contains(ADMIN), "no secret in the log");
}
