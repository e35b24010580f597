//! The readiness report as one self-contained HTML page: inline SVG charts and
//! tables, no script and nothing fetched from anywhere.

use std::fmt::Write;

use crate::report::Report;

const COLORS: [&str; 8] = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A line chart of several series over the run's seconds.
fn chart(title: &str, unit: &str, series: &[(String, Vec<f64>)]) -> String {
    let (w, h, pad) = (640.0, 200.0, 40.0);
    let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0).max(2);
    let top = series.iter().flat_map(|(_, v)| v.iter().copied()).fold(0.0_f64, f64::max).max(1e-9);
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\">",
        esc(title)
    );
    let _ = write!(svg, "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{w}\" y2=\"{0}\" stroke=\"#999\"/>", h - pad / 2.0);
    let _ = write!(svg, "<text x=\"2\" y=\"12\" font-size=\"10\">{top:.1} {}</text>", esc(unit));
    let _ = write!(svg, "<text x=\"{pad}\" y=\"{h}\" font-size=\"10\">0 s</text>");
    let _ = write!(svg, "<text x=\"{}\" y=\"{h}\" font-size=\"10\">{} s</text>", w - 30.0, n - 1);
    for (i, (name, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(x, y)| {
                let px = pad + (w - pad) * x as f64 / (n - 1) as f64;
                let py = (h - pad / 2.0) - (h - pad) * y / top;
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let color = COLORS[i % COLORS.len()];
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">{}</text>",
            pad + 80.0 + 90.0 * i as f64,
            12,
            esc(name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = String::from("<table><tr>");
    for h in head {
        let _ = write!(t, "<th>{}</th>", esc(h));
    }
    t.push_str("</tr>");
    for r in rows {
        t.push_str("<tr>");
        for c in r {
            let _ = write!(t, "<td>{}</td>", esc(c));
        }
        t.push_str("</tr>");
    }
    t.push_str("</table>");
    t
}

pub fn render(r: &Report) -> String {
    let ops: Vec<&String> = r.operations.keys().collect();
    let per_second = |f: &dyn Fn(&crate::report::Second, &str) -> f64| -> Vec<(String, Vec<f64>)> {
        ops.iter().map(|op| ((*op).clone(), r.timeline.iter().map(|s| f(s, op)).collect())).collect()
    };
    let throughput = per_second(&|s, op| s.requests.get(op).copied().unwrap_or(0) as f64);
    let p99 = per_second(&|s, op| s.p99_ms.get(op).copied().unwrap_or(0.0));
    let cells: Vec<u32> = r.cells.iter().map(|c| c.cell).collect();
    let cell_series = |f: &dyn Fn(&crate::report::Second, u32) -> f64| -> Vec<(String, Vec<f64>)> {
        cells.iter().map(|c| (format!("cell {c}"), r.timeline.iter().map(|s| f(s, *c)).collect())).collect()
    };
    let cell_rate = cell_series(&|s, c| s.cells.get(&c).copied().unwrap_or(0) as f64);
    let queue = cell_series(&|s, c| s.queue_depth.get(&c).copied().unwrap_or(0) as f64);
    let verdict_class = if r.go { "go" } else { "nogo" };
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>cellpay readiness: {}</title><style>\
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f4f6}}\
.go{{background:#dcfce7;padding:1em;font-size:1.2em}}.nogo{{background:#fee2e2;padding:1em;font-size:1.2em}}\
figure{{margin:1em 0}}figcaption{{font-weight:600}}</style></head><body>\
<h1>Readiness report: {}</h1><p id=\"readiness\" class=\"{verdict_class}\">{}</p>",
        esc(&r.profile),
        esc(&r.profile),
        esc(&r.readiness)
    );
    let _ = write!(
        html,
        "<p>Target {} · {} traffic · {:.1} s · peak {:.0} requests/s · bottleneck: {}</p>",
        esc(&r.target),
        if r.shadow { "shadow" } else { "REAL" },
        r.duration_s,
        r.peak_throughput_per_s,
        esc(&r.bottleneck)
    );
    html.push_str(&chart("Throughput per operation (requests/s)", "req/s", &throughput));
    html.push_str(&chart("p99 latency per operation (ms)", "ms", &p99));
    html.push_str(&chart("Throughput per cell (answers/s)", "req/s", &cell_rate));
    html.push_str(&chart("Queue depth per cell", "commands", &queue));
    html.push_str("<h2>Latency</h2>");
    let rows: Vec<Vec<String>> = r
        .operations
        .iter()
        .map(|(op, o)| {
            let l = &o.latency;
            vec![
                op.clone(),
                o.requests.to_string(),
                o.errors.to_string(),
                format!("{:.1}", o.throughput_per_s),
                format!("{:.2}", l.p50_ms),
                format!("{:.2}", l.p95_ms),
                format!("{:.2}", l.p99_ms),
                format!("{:.2}", l.p999_ms),
                format!("{:.2}", l.max_ms),
            ]
        })
        .collect();
    html.push_str(&table(
        &["operation", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "p999 ms", "max ms"],
        &rows,
    ));
    let rows: Vec<Vec<String>> = r
        .cells
        .iter()
        .map(|c| {
            vec![
                format!("cell {}", c.cell),
                c.requests.to_string(),
                format!("{:.1}", c.throughput_per_s),
                format!("{:.2}", c.latency.p99_ms),
                c.engine_cpu_share.map_or("n/a".into(), |s| format!("{:.0} %", s * 100.0)),
            ]
        })
        .collect();
    html.push_str("<h2>Cells</h2>");
    html.push_str(&table(&["cell", "answers", "answers/s", "p99 ms", "engine CPU (of a core)"], &rows));
    html.push_str("<h2>SLO verdict</h2>");
    let rows: Vec<Vec<String>> = r
        .slo
        .iter()
        .map(|v| {
            vec![
                v.operation.clone(),
                v.threshold.clone(),
                format!("{:.3}", v.limit),
                format!("{:.3}", v.measured),
                if v.pass { "pass" } else { "FAIL" }.into(),
            ]
        })
        .collect();
    html.push_str(&table(&["operation", "threshold", "limit", "measured", "verdict"], &rows));
    html.push_str("<h2>Errors, shedding, degradation</h2>");
    let mut rows: Vec<Vec<String>> = r.errors_by_code.iter().map(|(c, n)| vec![c.clone(), n.to_string()]).collect();
    rows.push(vec!["shed (overloaded)".into(), r.shed.to_string()]);
    rows.push(vec!["degraded".into(), r.degraded.to_string()]);
    html.push_str(&table(&["code", "count"], &rows));
    html.push_str("<h2>Checks and cost</h2>");
    let c = &r.checks;
    let g = &r.generator;
    let fmt_opt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
    let rows = vec![
        vec!["answers from the wrong cell".into(), c.wrong_cell_answers.to_string()],
        vec!["audit polls / failures".into(), format!("{} / {}", c.audit_polls, c.audit_failures)],
        vec!["real shard digests changed".into(), c.real_digests_changed.to_string()],
        vec!["requests intended / sent".into(), format!("{} / {}", g.intended_requests, g.sent_requests)],
        vec!["generator send lag max (ms)".into(), format!("{:.1}", g.send_lag_max_ms)],
        vec!["generator saturated".into(), g.saturated.to_string()],
        vec!["payments".into(), r.cost.payments.to_string()],
        vec!["placement".into(), r.placement.summary()],
        vec![
            "server CPU s / share of its CPUs".into(),
            format!("{} / {}", fmt_opt(r.placement.server.cpu_s), fmt_opt(r.placement.server.cpu_share)),
        ],
        vec![
            "generator CPU s / share of its CPUs".into(),
            format!("{} / {}", fmt_opt(r.placement.generator.cpu_s), fmt_opt(r.placement.generator.cpu_share)),
        ],
        vec!["generator requests per CPU-second".into(), fmt_opt(g.requests_per_cpu_s)],
        vec!["server CPU µs per payment (whole process)".into(), fmt_opt(r.cost.server_cpu_us_per_payment)],
        vec!["engine CPU µs per payment (engine threads)".into(), fmt_opt(r.cost.cpu_us_per_payment)],
        vec!["bytes written per payment".into(), fmt_opt(r.cost.bytes_per_payment)],
        vec!["retry horizon promised to clients (s)".into(), r.idempotency.retry_horizon_s.to_string()],
        vec!["idempotency window configured (s)".into(), fmt_opt(r.idempotency.window_promised_s)],
        vec!["idempotency window held, shortest (s)".into(), fmt_opt(r.idempotency.window_held_min_s)],
    ];
    html.push_str(&table(&["check", "value"], &rows));
    let c = &r.capacity;
    html.push_str("<h2>Capacity plan</h2>");
    let needs = match (c.target_peak_per_s, c.cells_needed) {
        (Some(t), Some(n)) => format!(
            "{t:.0} payments/s with {:.0} % headroom needs <b>{n} cells</b> ({} cores of server CPU)",
            c.headroom * 100.0,
            fmt_opt(c.cores_needed)
        ),
        (Some(t), None) => format!("{t:.0} payments/s: no second of this run met the SLOs, so no plan"),
        (None, _) => "no target_peak_per_s in the profile".into(),
    };
    let _ = write!(html, "<p>{}</p>", needs);
    let rows: Vec<Vec<String>> = vec![
        vec!["payments/s at the SLO (busiest second within them)".into(), format!("{:.0}", c.payments_per_s_at_slo)],
        vec![
            "seconds within the SLO / with load".into(),
            format!("{} / {}", c.seconds_within_slo, c.seconds_with_load),
        ],
        vec!["cells measured".into(), c.cells.to_string()],
        vec!["payments/s per cell at the SLO".into(), format!("{:.0}", c.per_cell_per_s)],
        vec!["server cores used".into(), fmt_opt(c.server_cores_used)],
        vec!["payments/s per server core at the SLO".into(), fmt_opt(c.per_core_per_s)],
        vec!["bottleneck".into(), c.bottleneck.clone()],
        vec!["server CPU µs per payment at that size".into(), fmt_opt(c.server_cpu_us_per_payment)],
        vec!["bytes written per payment at that size".into(), fmt_opt(c.bytes_per_payment)],
        vec!["assumes".into(), c.assumes.clone()],
    ];
    html.push_str(&table(&["figure", "value"], &rows));
    html.push_str("</body></html>\n");
    html
}
