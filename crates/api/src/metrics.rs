//! Prometheus metrics, as Prometheus users expect them: every family has
//! HELP and TYPE, values are in base units (seconds, bytes), counters end in
//! `_total` and nothing else does, and latencies are histograms Prometheus can
//! aggregate across cells and processes (`promtool check metrics` is clean on
//! a live server: see `crates/cellpay/tests/observability.rs`).
//!
//! Two sources, one exposition. The `metrics` exporter holds what the front
//! door, the router and this module count as they go (HTTP requests by route,
//! class, status class and tenant; refusals; breakers; degrade switches). The
//! engines and relays publish their own figures as they work (atomic counters
//! and bucket histograms); a scrape reads those and queues no work on a cell.
//! [`FAMILIES`] is the one list of names, types and help texts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use cellpay_cell::{Buckets, CellClient, EngineStats, LATENCY_BOUNDS_S};
use cellpay_core::Priority;
use cellpay_router::Layer;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::exposition::{Exposition, Family, Kind};
use crate::AppState;

/// Every metric family cellpay exposes: name, type, help. The exporter's
/// families get their HELP from here; the published ones are written with it.
pub const FAMILIES: &[Family] = &[
    // HTTP, counted by the outermost middleware.
    fam("cellpay_http_requests_total", Kind::Counter, "HTTP requests answered, by route template and status code."),
    fam("cellpay_http_request_duration_seconds", Kind::Histogram, "Time to answer an HTTP request, by route template."),
    fam("cellpay_http_request_class_duration_seconds", Kind::Histogram, "Time to answer an HTTP request, by route template, priority class (critical, reads, history, shadow; none for operator routes) and status class (2xx..5xx; abandoned when the client went away before the answer)."),
    fam("cellpay_critical_request_duration_seconds", Kind::Histogram, "Time to answer a critical-class request (payments, account opening, payment status), by tenant and status class: the payment SLIs."),
    // The front door.
    fam("cellpay_connections_open", Kind::Gauge, "Client connections open now."),
    fam("cellpay_connections_closed_total", Kind::Counter, "Connections the server closed, by reason (evicted, header_timeout, keep_alive_idle)."),
    fam("cellpay_connections_refused_total", Kind::Counter, "Connections refused at once, by reason (per_address)."),
    fam("cellpay_connections_waited_total", Kind::Counter, "Connections left in the kernel backlog because every open connection had authenticated."),
    fam("cellpay_body_timeouts_total", Kind::Counter, "Request bodies that were not received in time (408)."),
    fam("cellpay_body_budget_refused_total", Kind::Counter, "Requests refused because the request-body byte budget was spent (503)."),
    fam("cellpay_body_bytes_in_flight", Kind::Gauge, "Request body bytes being read or held now, all connections together."),
    fam("cellpay_edge_concurrency_limit", Kind::Gauge, "The adaptive concurrency limit of the HTTP front (layer 0)."),
    // The protection stack.
    fam("cellpay_shed_total", Kind::Counter, "Requests refused by a protection layer, by layer, priority class and cell (router for the router's layers)."),
    fam("cellpay_router_requests_total", Kind::Counter, "Calls the router made to cells."),
    fam("cellpay_retries_total", Kind::Counter, "Calls the router retried."),
    fam("cellpay_retries_refused_by_budget_total", Kind::Counter, "Retries the retry budget refused."),
    fam("cellpay_hot_keys_tracked", Kind::Gauge, "Accounts the hot-key table tracks now."),
    fam("cellpay_hot_keys_untracked_total", Kind::Counter, "Accounts the full hot-key table could not track."),
    fam("cellpay_cell_protocol_calls_total", Kind::Counter, "Submit calls made over the cell protocol to a cell in another process, by cell: with cellpay_cell_protocol_commands_total, the coalescing."),
    fam("cellpay_cell_protocol_commands_total", Kind::Counter, "Commands those calls carried, by cell."),
    fam("cellpay_breaker_state", Kind::Gauge, "The router's circuit breaker to each cell: 0 closed, 1 half-open, 2 open."),
    fam("cellpay_concurrency_limit", Kind::Gauge, "The adaptive concurrency limit towards each cell (layer 6)."),
    fam("cellpay_signal_critical_p99_seconds", Kind::Gauge, "The p99 of critical requests at the HTTP front, arrival to answer, over the last signal window, as the degrade plan reads it."),
    fam("cellpay_signal_critical_shed_ratio", Kind::Gauge, "Share of critical requests the HTTP front refused at its concurrency limit over the last signal window, as the degrade plan reads it."),
    fam("cellpay_signal_front_delay_seconds", Kind::Gauge, "The shortest wait from arrival to admission of any request at the HTTP front over the last signal window, as the degrade plan reads it."),
    fam("cellpay_front_in_flight", Kind::Gauge, "Requests past the front gate and not yet answered."),
    fam("cellpay_signal_queue_delay_seconds", Kind::Gauge, "The longest queue wait of any cell's latest batch, as the degrade plan reads it."),
    fam("cellpay_signal_error_ratio", Kind::Gauge, "Share of calls to cells answered overloaded or unavailable over the last signal window."),
    fam("cellpay_degrade_active", Kind::Gauge, "1 while a degrade switch is on."),
    fam("cellpay_degrade_changes_total", Kind::Counter, "Degrade switch changes, by switch and the state it went to."),
    fam("cellpay_rules_changes_total", Kind::Counter, "Times the flow rules were replaced."),
    // Shard moves run by this server.
    fam("cellpay_shard_moves_total", Kind::Counter, "Shard moves this server ran, by outcome (moved; undone: messages in flight at the bound or another map won the epoch; failed)."),
    fam("cellpay_shard_move_pause_seconds", Kind::Gauge, "The write pause of this server's recent shard moves (freeze to the new owner serving), by quantile (0.5, 0.99, 1)."),
    fam("cellpay_shard_moves_planned", Kind::Gauge, "Moves of the plan under way (a drain or a rebalance), by state (planned, done, failed); 0 with none."),
    fam("cellpay_shard_map_epoch", Kind::Gauge, "The epoch of the shard map the router works at."),
    // Cells, read from what each engine publishes.
    fam("cellpay_cell_failed", Kind::Gauge, "1 while a cell does not serve (failed or stalled); the reason is in /readyz."),
    fam("cellpay_cell_stalled", Kind::Gauge, "1 while a cell is stalled (one batch ran longer than stall_after_ms)."),
    fam("cellpay_cell_shed_level", Kind::Gauge, "Priority classes the cell's queue-delay controller sheds now (0: none)."),
    fam("cellpay_cell_queue_depth", Kind::Gauge, "Commands waiting in the cell's queue."),
    fam("cellpay_cell_queue_delay_seconds", Kind::Gauge, "The longest queue wait of a request in the cell's latest batch."),
    fam("cellpay_cell_batches_total", Kind::Counter, "Batches the cell's engine ran."),
    fam("cellpay_cell_commands_total", Kind::Counter, "Commands the cell's engine applied or refused."),
    fam("cellpay_cell_queries_total", Kind::Counter, "Queries the cell's engine answered."),
    fam("cellpay_cell_log_bytes_total", Kind::Counter, "Bytes the cell appended to its log."),
    fam("cellpay_cell_checkpoint_bytes_total", Kind::Counter, "Bytes the cell wrote in checkpoints."),
    fam("cellpay_cell_fsyncs_total", Kind::Counter, "fsync calls of the cell's store."),
    fam("cellpay_cell_checkpoints_total", Kind::Counter, "Checkpoints the cell took."),
    fam("cellpay_cell_cpu_seconds_total", Kind::Counter, "CPU time the cell's engine thread used."),
    fam("cellpay_cell_commit_duration_seconds", Kind::Histogram, "One engine batch cycle (take, apply, append and fsync, answer): the commit latency of the cell."),
    fam("cellpay_cell_batch_size_commands", Kind::Histogram, "Commands and queries per engine batch."),
    fam("cellpay_cell_queue_wait_seconds", Kind::Histogram, "How long a request waited in the cell's queue before its batch."),
    fam("cellpay_ledger_accounts", Kind::Gauge, "Accounts in a cell, by ledger (real, shadow)."),
    fam("cellpay_ledger_negative_accounts", Kind::Gauge, "Accounts without overdraft whose balance is negative (must stay 0)."),
    // The idempotency window and its disk tier (published by the engine; the
    // alert CellpayIdempotencyWindowShort reads the first two).
    fam("cellpay_idempotency_window_seconds", Kind::Gauge, "How far back the cell still recognises a transfer id (a retry older than this is a new transfer), by ledger."),
    fam("cellpay_idempotency_window_promised_seconds", Kind::Gauge, "The idempotency window the cell is configured to hold: what clients were promised."),
    fam("cellpay_idempotency_records_in_memory", Kind::Gauge, "Idempotency records the cell holds in memory, by ledger."),
    fam("cellpay_idempotency_tier_bytes", Kind::Gauge, "Bytes of idempotency records in the cell's disk tier."),
    fam("cellpay_idempotency_tier_records", Kind::Gauge, "Idempotency records in the cell's disk tier."),
    fam("cellpay_idempotency_tier_runs", Kind::Gauge, "Sorted runs in the cell's disk tier."),
    fam(
        "cellpay_idempotency_tier_imported_runs",
        Kind::Gauge,
        "Runs of the cell's disk tier copied from another cell's with a shard that moved here.",
    ),
    fam("cellpay_idempotency_tier_memory_bytes", Kind::Gauge, "Memory the cell's disk tier uses (indexes and filters)."),
    fam("cellpay_idempotency_disk_reads_total", Kind::Counter, "Idempotency lookups that read the disk tier."),
    fam("cellpay_idempotency_disk_hits_total", Kind::Counter, "Idempotency lookups the disk tier answered with a record."),
    // Between cells.
    fam("cellpay_outbox_backlog_messages", Kind::Gauge, "Cross-cell credits debited at the source and not yet settled, by source, destination and ledger."),
    fam("cellpay_outbox_backlog_amount", Kind::Gauge, "Money (minor units) debited at the source and not yet settled, by source, destination and ledger."),
    fam("cellpay_relay_delivered_total", Kind::Counter, "Credits the relay delivered and settled."),
    fam("cellpay_relay_refused_total", Kind::Counter, "Credits the payee's cell refused for good (the payer was credited back)."),
    fam("cellpay_relay_failed_rounds_total", Kind::Counter, "Relay rounds that failed (a cell unavailable or overloaded)."),
    fam("cellpay_relay_held_rounds_total", Kind::Counter, "Relay rounds skipped because the pair's breaker was open or cross-cell delivery was deferred."),
    fam("cellpay_relay_breaker_state", Kind::Gauge, "The circuit breaker of a relay pair: 0 closed, 1 half-open, 2 open."),
    fam("cellpay_relay_settle_duration_seconds", Kind::Histogram, "Time from a cross-cell debit at the payer's cell to its settlement there, by source, destination and ledger."),
    // The whole process, under the standard name Prometheus client libraries use.
    fam("process_cpu_seconds_total", Kind::Counter, "Total user and system CPU time spent in seconds."),
];

const fn fam(name: &'static str, kind: Kind, help: &'static str) -> Family {
    Family { name, kind, help }
}

fn family(name: &str) -> &'static Family {
    FAMILIES.iter().find(|f| f.name == name).expect("every family written is listed in FAMILIES")
}

/// The process-wide recorder (installed once, every family described) and its handle.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BOUNDS_S)
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once per process");
            for f in FAMILIES {
                match f.kind {
                    Kind::Counter => metrics::describe_counter!(f.name, f.help),
                    Kind::Gauge => metrics::describe_gauge!(f.name, f.help),
                    Kind::Histogram => metrics::describe_histogram!(f.name, f.help),
                }
            }
            handle
        })
        .clone()
}

/// Answers per priority class, kept for the live dashboard's charts (the
/// exporter's histograms cannot be read back): latency buckets (their count
/// is the answers) and the 5xx among them, by class rank, highest first.
pub struct ClassFigures {
    pub latency: [Buckets; 4],
    pub errors: [AtomicU64; 4],
}

impl Default for ClassFigures {
    fn default() -> Self {
        Self { latency: std::array::from_fn(|_| Buckets::latency()), errors: Default::default() }
    }
}

impl ClassFigures {
    pub(crate) fn record(&self, class: Priority, seconds: f64, server_error: bool) {
        self.latency[class.rank()].observe(seconds);
        if server_error {
            self.errors[class.rank()].fetch_add(1, Relaxed);
        }
    }
}

/// Which tenant a request acted for, set on the response by auth: the SLIs are
/// kept per tenant. `(admin)` for admin tokens and `(unknown)` before auth: the
/// parentheses are no tenant id's characters, so they never name a tenant.
#[derive(Debug, Clone)]
pub struct TenantLabel(pub String);

/// Middleware: counts and times every request by route, class, status class
/// and (for the critical class) tenant. A request whose client goes away
/// before the answer is recorded as `abandoned` when its future is dropped.
pub async fn track(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let class = class_of(&request);
    let mut timing = Timing { state: state.clone(), route, class, started: Instant::now(), finished: false };
    let response = next.run(request).await;
    let tenant = response.extensions().get::<TenantLabel>().map(|t| t.0.as_str());
    timing.finish(Some(response.status()), tenant);
    response
}

/// The priority class of a request, as the protection stack sees it; `None` for operator routes.
fn class_of(request: &Request) -> Option<Priority> {
    let matched = request.extensions().get::<MatchedPath>().map_or("", |p| p.as_str());
    let route = crate::guard::classify(request.method(), matched)?;
    let shadow = crate::headers::shadow(request.headers()).unwrap_or(false);
    Some(Priority::of(shadow, route.priority()))
}

/// One request being timed; records itself when answered or dropped.
struct Timing {
    state: AppState,
    route: String,
    class: Option<Priority>,
    started: Instant,
    finished: bool,
}

impl Timing {
    fn finish(&mut self, status: Option<StatusCode>, tenant: Option<&str>) {
        self.finished = true;
        let seconds = self.started.elapsed().as_secs_f64();
        let route = std::mem::take(&mut self.route);
        AnswerSeries::new(route, status, self.class, tenant).record(seconds);
        answered(&self.state, self.class, status, seconds);
    }
}

/// The dashboard's counts of one answer (`None`: abandoned by its client).
pub(crate) fn answered(state: &AppState, class: Option<Priority>, status: Option<StatusCode>, seconds: f64) {
    if let Some(status) = status {
        state.answered.fetch_add(1, Relaxed);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            state.unavailable_answers.fetch_add(1, Relaxed);
        }
    }
    if let Some(c) = class {
        state.classes.record(c, seconds, status.is_none_or(|s| s.as_u16() >= 500));
    }
}

/// The series one answer is recorded in, by route, status, class and (for
/// the critical class) tenant: resolved per answer by [`track`], and once
/// per kind of refusal by the front gate, which keeps them.
pub(crate) struct AnswerSeries {
    requests: Option<metrics::Counter>,
    duration: metrics::Histogram,
    class_duration: metrics::Histogram,
    critical: Option<metrics::Histogram>,
}

impl AnswerSeries {
    pub(crate) fn new(
        route: impl Into<metrics::SharedString>,
        status: Option<StatusCode>,
        class: Option<Priority>,
        tenant: Option<&str>,
    ) -> Self {
        let route: metrics::SharedString = route.into();
        let status_class = match status.map(|s| s.as_u16() / 100) {
            Some(1) => "1xx",
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(_) => "5xx",
            None => "abandoned",
        };
        let requests = status.map(|code| {
            counter!("cellpay_http_requests_total", "route" => route.clone(), "code" => code.as_str().to_string())
        });
        let critical = (class == Some(Priority::Critical)).then(|| {
            let tenant = tenant.unwrap_or("(unknown)").to_string();
            histogram!("cellpay_critical_request_duration_seconds", "tenant" => tenant, "status_class" => status_class)
        });
        let class = class.map_or("none", Priority::as_str);
        Self {
            requests,
            duration: histogram!("cellpay_http_request_duration_seconds", "route" => route.clone()),
            class_duration: histogram!("cellpay_http_request_class_duration_seconds", "route" => route, "class" => class, "status_class" => status_class),
            critical,
        }
    }

    pub(crate) fn record(&self, seconds: f64) {
        if let Some(requests) = &self.requests {
            requests.increment(1);
        }
        self.duration.record(seconds);
        self.class_duration.record(seconds);
        if let Some(critical) = &self.critical {
            critical.record(seconds);
        }
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(None, None);
        }
    }
}

/// Refreshes the per-cell and per-relay figures, then renders everything.
pub async fn render(state: &AppState) -> String {
    let mut published = Exposition::default();
    cells(state, &mut published);
    relays(state, &mut published);
    if let Ok(cluster) = state.cluster() {
        let p = cluster.protection();
        for layer in Layer::ALL {
            for class in Priority::ALL {
                counter!("cellpay_shed_total", "layer" => layer.as_str(), "class" => class.as_str(), "cell" => "router")
                    .absolute(p.counters.refused(layer, class));
            }
        }
        gauge!("cellpay_edge_concurrency_limit").set(f64::from(p.layers().edge.limit()));
        gauge!("cellpay_front_in_flight").set(state.gate.in_flight() as f64);
        gauge!("cellpay_body_bytes_in_flight").set(state.intake.budget.bytes_in_use() as f64);
        counter!("cellpay_router_requests_total").absolute(p.counters.requests.load(Relaxed));
        counter!("cellpay_retries_total").absolute(p.counters.retries.load(Relaxed));
        counter!("cellpay_retries_refused_by_budget_total").absolute(p.counters.retries_refused.load(Relaxed));
        counter!("cellpay_hot_keys_untracked_total").absolute(p.layers().hot_keys.untracked.load(Relaxed));
        gauge!("cellpay_shard_map_epoch").set(cluster.map().epoch() as f64);
        if let Some(mover) = state.mover.get() {
            let f = mover.figures();
            for (outcome, n) in [("moved", f.moved), ("undone", f.undone), ("failed", f.failed)] {
                counter!("cellpay_shard_moves_total", "outcome" => outcome).absolute(n);
            }
            let q = f.pause_quantiles();
            for (label, at) in [("0.5", q.p50), ("0.99", q.p99), ("1", q.max)] {
                if let Some(us) = at {
                    gauge!("cellpay_shard_move_pause_seconds", "quantile" => label).set(us as f64 / 1e6);
                }
            }
            let (planned, done, failed) =
                f.plan.as_ref().filter(|p| p.running).map_or((0, 0, 0), |p| (p.moves.len() as u64, p.done, p.failed));
            for (state, n) in [("planned", planned), ("done", done), ("failed", failed)] {
                gauge!("cellpay_shard_moves_planned", "state" => state).set(n as f64);
            }
        }
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
                gauge!("cellpay_idempotency_tier_imported_runs", "cell" => id.clone()).set(t.imported_runs as f64);
                gauge!("cellpay_idempotency_tier_memory_bytes", "cell" => id.clone()).set(t.memory_bytes as f64);
                counter!("cellpay_idempotency_disk_reads_total", "cell" => id.clone()).absolute(t.disk_reads);
                counter!("cellpay_idempotency_disk_hits_total", "cell" => id).absolute(t.disk_hits);
            }
        }
    }
    published.family(family("process_cpu_seconds_total"));
    published.sample("process_cpu_seconds_total", &[], process_cpu_s());
    let mut text = state.metrics.render();
    text.push_str(&published.into_text());
    text
}

/// CPU seconds the whole process has used: every thread (engines, relays,
/// the HTTP front, those that ended too), user and kernel time.
fn process_cpu_s() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Each local cell's health and engine figures: counters and gauges into the
/// exporter, the engine's own histograms and CPU counter into `published`.
fn cells(state: &AppState, published: &mut Exposition) {
    let Some(slots) = state.local_cells.get() else { return };
    let mut engines = Vec::with_capacity(slots.len());
    for slot in slots {
        let cell = slot.cell().to_string();
        let Some(h) = slot.handle() else {
            gauge!("cellpay_cell_failed", "cell" => cell.clone()).set(1.0);
            gauge!("cellpay_cell_stalled", "cell" => cell).set(0.0);
            continue;
        };
        let health = h.health();
        let stats = h.stats();
        for class in Priority::ALL {
            counter!("cellpay_shed_total", "layer" => "cell_queue", "class" => class.as_str(), "cell" => cell.clone())
                .absolute(stats.shed[class.rank()].load(Relaxed));
        }
        gauge!("cellpay_cell_shed_level", "cell" => cell.clone()).set(h.shed_level() as f64);
        gauge!("cellpay_cell_queue_depth", "cell" => cell.clone()).set(h.queue_depth() as f64);
        gauge!("cellpay_cell_queue_delay_seconds", "cell" => cell.clone()).set(h.queue_delay_us() as f64 / 1e6);
        gauge!("cellpay_cell_failed", "cell" => cell.clone()).set(f64::from(u8::from(!health.is_serving())));
        let stalled = matches!(health, cellpay_cell::Health::Stalled { .. });
        gauge!("cellpay_cell_stalled", "cell" => cell.clone()).set(f64::from(u8::from(stalled)));
        for (name, value) in [
            ("cellpay_cell_batches_total", &stats.batches),
            ("cellpay_cell_commands_total", &stats.commands),
            ("cellpay_cell_queries_total", &stats.queries),
            ("cellpay_cell_log_bytes_total", &stats.log_bytes),
            ("cellpay_cell_checkpoint_bytes_total", &stats.checkpoint_bytes),
            ("cellpay_cell_fsyncs_total", &stats.fsyncs),
            ("cellpay_cell_checkpoints_total", &stats.checkpoints),
        ] {
            counter!(name, "cell" => cell.clone()).absolute(value.load(Relaxed));
        }
        engines.push((cell, h));
    }
    published.family(family("cellpay_cell_cpu_seconds_total"));
    for (cell, h) in &engines {
        published.sample(
            "cellpay_cell_cpu_seconds_total",
            &[("cell", cell)],
            h.stats().cpu_ns.load(Relaxed) as f64 / 1e9,
        );
    }
    type Pick = fn(&EngineStats) -> &Buckets;
    let histograms: [(&str, Pick); 3] = [
        ("cellpay_cell_commit_duration_seconds", |s| &s.commit_seconds),
        ("cellpay_cell_batch_size_commands", |s| &s.batch_size_commands),
        ("cellpay_cell_queue_wait_seconds", |s| &s.queue_wait_seconds),
    ];
    for (name, pick) in histograms {
        published.family(family(name));
        for (cell, h) in &engines {
            // A histogram nothing has fed yet is left out: no data, not a false zero.
            let counts = pick(h.stats()).read();
            if counts.count > 0 || name != "cellpay_cell_queue_wait_seconds" {
                published.histogram(name, &[("cell", cell)], &counts);
            }
        }
    }
}

/// Each relay's counters into the exporter, its settle-time histogram into `published`.
fn relays(state: &AppState, published: &mut Exposition) {
    let Some(relays) = state.relays.get() else { return };
    published.family(family("cellpay_relay_settle_duration_seconds"));
    for r in relays {
        let (source, dest) = (r.source.to_string(), r.dest.to_string());
        let ledger = if r.shadow { "shadow" } else { "real" };
        let labels = [("source", source.clone()), ("dest", dest.clone()), ("ledger", ledger.to_string())];
        counter!("cellpay_relay_delivered_total", &labels).absolute(r.stats.delivered.load(Relaxed));
        counter!("cellpay_relay_refused_total", &labels).absolute(r.stats.refused.load(Relaxed));
        counter!("cellpay_relay_failed_rounds_total", &labels).absolute(r.stats.failed_rounds.load(Relaxed));
        counter!("cellpay_relay_held_rounds_total", &labels).absolute(r.gate.held_rounds.load(Relaxed));
        gauge!("cellpay_relay_breaker_state", &labels).set(f64::from(r.gate.breaker.state().level()));
        let labels = [("source", source.as_str()), ("dest", dest.as_str()), ("ledger", ledger)];
        published.histogram("cellpay_relay_settle_duration_seconds", &labels, &r.stats.settle_seconds.read());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_list_follows_the_naming_rules() {
        let mut names = std::collections::HashSet::new();
        for f in FAMILIES {
            assert!(names.insert(f.name), "{} listed twice", f.name);
            // Ours, or the standard process family every Prometheus client exports.
            assert!(f.name.starts_with("cellpay_") || f.name == "process_cpu_seconds_total", "{}", f.name);
            assert_eq!(
                f.name.ends_with("_total"),
                f.kind == Kind::Counter,
                "{}: counters and only counters end in _total",
                f.name
            );
            assert!(!f.name.contains("_ms") && !f.name.contains("_us"), "{}: base units", f.name);
            assert!(f.help.ends_with('.') && !f.help.is_empty(), "{}: help is a sentence", f.name);
        }
    }
}
