//! Prometheus metrics: HTTP requests by route and code with latency
//! histograms, and per-cell engine figures (batches, batch sizes, commit
//! latency, queue depth, CPU, bytes written), whether each cell serves
//! (`cellpay_cell_failed` is 1 for a cell that does not, whatever the cause;
//! `cellpay_cell_stalled` is 1 while that cause is a stall, which clears by
//! itself; the reason is in `/readyz` and `/v1/cluster`), relay counters and the outbox
//! backlog per cell pair, read fresh at every scrape; the protection stack's
//! refusals by layer and class (`cellpay_shed_total`), retries, breakers,
//! concurrency limits and degrade switches.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::atomic::Ordering::Relaxed;

use cellpay_cell::CellClient;
use cellpay_core::Priority;
use cellpay_router::Layer;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::AppState;

const LATENCY_BUCKETS_S: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// The process-wide recorder (installed once) and its handle.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_S)
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once per process")
        })
        .clone()
}

/// Middleware: counts every request by route and status code and times it.
pub async fn track(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    state.answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if response.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE {
        state.unavailable_answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let code = response.status().as_u16().to_string();
    counter!("cellpay_http_requests_total", "route" => route.clone(), "code" => code).increment(1);
    histogram!("cellpay_http_request_duration_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// Refreshes the per-cell and per-relay figures, then renders everything.
pub async fn render(state: &AppState) -> String {
    if let Some(cells) = state.local_cells.get() {
        for slot in cells {
            let cell = slot.cell().to_string();
            let Some(h) = slot.handle() else {
                gauge!("cellpay_cell_failed", "cell" => cell.clone()).set(1.0);
                gauge!("cellpay_cell_stalled", "cell" => cell).set(0.0);
                continue;
            };
            let health = h.health();
            let s = h.stats().snapshot();
            for class in Priority::ALL {
                counter!("cellpay_shed_total", "layer" => "cell_queue", "class" => class.as_str(), "cell" => cell.clone())
                    .absolute(h.stats().shed[class.rank()].load(Relaxed));
            }
            gauge!("cellpay_cell_shed_level", "cell" => cell.clone()).set(h.shed_level() as f64);
            gauge!("cellpay_cell_queue_depth", "cell" => cell.clone()).set(h.queue_depth() as f64);
            gauge!("cellpay_cell_failed", "cell" => cell.clone()).set(f64::from(u8::from(!health.is_serving())));
            let stalled = matches!(health, cellpay_cell::Health::Stalled { .. });
            gauge!("cellpay_cell_stalled", "cell" => cell.clone()).set(f64::from(u8::from(stalled)));
            counter!("cellpay_cell_batches_total", "cell" => cell.clone()).absolute(s.batches);
            counter!("cellpay_cell_commands_total", "cell" => cell.clone()).absolute(s.commands);
            counter!("cellpay_cell_queries_total", "cell" => cell.clone()).absolute(s.queries);
            counter!("cellpay_cell_log_bytes_total", "cell" => cell.clone()).absolute(s.log_bytes);
            counter!("cellpay_cell_checkpoint_bytes_total", "cell" => cell.clone()).absolute(s.checkpoint_bytes);
            counter!("cellpay_cell_fsyncs_total", "cell" => cell.clone()).absolute(s.fsyncs);
            counter!("cellpay_cell_checkpoints_total", "cell" => cell.clone()).absolute(s.checkpoints);
            gauge!("cellpay_cell_cpu_seconds_total", "cell" => cell.clone()).set(s.cpu_ns as f64 / 1e9);
            gauge!("cellpay_cell_batch_size_mean", "cell" => cell.clone()).set(s.batch_size.mean);
            for (q, us) in [("0.5", s.batch_us.p50), ("0.99", s.batch_us.p99), ("1", s.batch_us.max)] {
                gauge!("cellpay_cell_commit_latency_quantile_seconds", "cell" => cell.clone(), "quantile" => q)
                    .set(us as f64 / 1e6);
            }
        }
    }
    if let Some(relays) = state.relays.get() {
        for r in relays {
            let (source, dest) = (r.source.to_string(), r.dest.to_string());
            let ledger = if r.shadow { "shadow" } else { "real" };
            let labels = [("source", source), ("dest", dest), ("ledger", ledger.to_string())];
            counter!("cellpay_relay_delivered_total", &labels)
                .absolute(r.stats.delivered.load(std::sync::atomic::Ordering::Relaxed));
            counter!("cellpay_relay_refused_total", &labels)
                .absolute(r.stats.refused.load(std::sync::atomic::Ordering::Relaxed));
            counter!("cellpay_relay_failed_rounds_total", &labels)
                .absolute(r.stats.failed_rounds.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    if let Ok(cluster) = state.cluster() {
        let p = cluster.protection();
        for layer in Layer::ALL {
            for class in Priority::ALL {
                counter!("cellpay_shed_total", "layer" => layer.as_str(), "class" => class.as_str(), "cell" => "router")
                    .absolute(p.counters.refused(layer, class));
            }
        }
        gauge!("cellpay_edge_concurrency_limit").set(f64::from(p.layers().edge.limit()));
        gauge!("cellpay_body_bytes_in_flight").set(state.intake.budget.bytes_in_use() as f64);
        counter!("cellpay_router_requests_total").absolute(p.counters.requests.load(Relaxed));
        counter!("cellpay_retries_total").absolute(p.counters.retries.load(Relaxed));
        counter!("cellpay_retries_refused_by_budget_total").absolute(p.counters.retries_refused.load(Relaxed));
        counter!("cellpay_hot_keys_untracked_total").absolute(p.layers().hot_keys.untracked.load(Relaxed));
        // The figures each cell published with its latest batch: O(cells²), no work queued.
        for cell in cluster.cells() {
            let figures = cell.figures();
            for shadow in [false, true] {
                let ledger = if shadow { "shadow" } else { "real" };
                let f = figures.ledger(shadow);
                for dest in cluster.cells().iter().map(|c| c.cell()).filter(|d| *d != cell.cell()) {
                    let out = f.outbox_to(dest);
                    let labels = [
                        ("source", cell.cell().to_string()),
                        ("dest", dest.to_string()),
                        ("ledger", ledger.to_string()),
                    ];
                    gauge!("cellpay_outbox_backlog_messages", &labels).set(out.open_messages() as f64);
                    gauge!("cellpay_outbox_backlog_amount", &labels).set(out.open_sum() as f64);
                }
                let labels = [("cell", cell.cell().to_string()), ("ledger", ledger.to_string())];
                gauge!("cellpay_ledger_accounts", &labels).set(f.accounts as f64);
                gauge!("cellpay_ledger_negative_accounts", &labels).set(f.negative_accounts as f64);
                let reach = if shadow { &figures.reach_shadow } else { &figures.reach_real };
                gauge!("cellpay_idempotency_window_seconds", &labels)
                    .set(figures.window_held_ms(shadow) as f64 / 1000.0);
                gauge!("cellpay_idempotency_records_in_memory", &labels).set(reach.records_held as f64);
            }
            let id = cell.cell().to_string();
            gauge!("cellpay_idempotency_window_promised_seconds", "cell" => id.clone())
                .set(figures.window_promised_ms as f64 / 1000.0);
            if let Some(t) = &figures.tier {
                gauge!("cellpay_idempotency_tier_bytes", "cell" => id.clone()).set(t.bytes as f64);
                gauge!("cellpay_idempotency_tier_records", "cell" => id.clone()).set(t.entries as f64);
                gauge!("cellpay_idempotency_tier_runs", "cell" => id.clone()).set(t.runs as f64);
                gauge!("cellpay_idempotency_tier_memory_bytes", "cell" => id.clone()).set(t.memory_bytes as f64);
                counter!("cellpay_idempotency_disk_reads_total", "cell" => id.clone()).absolute(t.disk_reads);
                counter!("cellpay_idempotency_disk_hits_total", "cell" => id).absolute(t.disk_hits);
            }
        }
    }
    state.metrics.render()
}
