//! The readiness report: what a run measured, the checks it made, the SLO
//! verdict per threshold, and one go / no-go line with its reason.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::profile::{Operation, Slo};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Self { p50_ms: ms(0.5), p95_ms: ms(0.95), p99_ms: ms(0.99), p999_ms: ms(0.999), max_ms: h.max() as f64 / 1e3 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OperationReport {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub throughput_per_s: f64,
    /// Every answer, refusals included, timed from its intended send time.
    pub latency: Percentiles,
    /// Answers that succeeded (2xx) only: what admitted work got.
    pub admitted_latency: Percentiles,
    /// Failed answers by error code (`rate_limited`, `overloaded`, `degraded`, ...).
    pub errors_by_code: BTreeMap<String, u64>,
}

/// An event of the profile, done: when, what, and what the target answered.
#[derive(Debug, Clone, Serialize)]
pub struct EventDone {
    pub at_s: f64,
    pub action: String,
    pub cell: Option<u32>,
    pub status: u16,
    pub message: String,
}

/// Single transfers to the profile's hot merchants, and everyone else's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HotMerchant {
    pub requests: u64,
    pub admitted: u64,
    pub rate_limited: u64,
    pub admitted_per_s: f64,
    /// Admitted single transfers to other payees.
    pub other_payments_latency: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct CellReport {
    pub cell: u32,
    pub requests: u64,
    pub throughput_per_s: f64,
    pub latency: Percentiles,
    /// The share of one core the cell's engine thread used during the run (from `/metrics`).
    pub engine_cpu_share: Option<f64>,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub t: u64,
    pub stage: String,
    pub intended_rate: f64,
    pub requests: BTreeMap<String, u64>,
    pub errors: u64,
    pub p99_ms: BTreeMap<String, f64>,
    pub cells: BTreeMap<u32, u64>,
    /// Commands queued per cell, polled from `/v1/cluster` during this second.
    pub queue_depth: BTreeMap<u32, u64>,
    /// Per owning cell (payer or account): answers (ok, failed).
    pub owners: BTreeMap<u32, (u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SloVerdict {
    pub operation: String,
    pub threshold: String,
    pub limit: f64,
    pub measured: f64,
    pub pass: bool,
}

/// Invariant and routing checks made while the run went on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Answers from another cell than the shard map names at the epoch they
    /// were served at (each fails the run).
    pub wrong_cell_answers: u64,
    /// Answers served at an epoch whose map the run did not see (shards moved
    /// faster than it followed): not judged either way.
    pub owner_unverified: u64,
    pub audit_polls: u64,
    /// Polls at which Σ ≠ 0 or a negative balance showed, real or shadow ledger.
    pub audit_failures: u64,
    /// Polls the cluster could not answer (a cell down): no verdict either way.
    pub audit_unavailable: u64,
    /// Shards whose real-ledger digest changed during the run.
    pub real_digests_changed: u64,
    pub real_traffic: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Generator {
    pub intended_requests: u64,
    pub sent_requests: u64,
    /// The most a request was sent behind its intended time.
    pub send_lag_max_ms: f64,
    /// True when the generator could not keep its schedule (its own limit, not the server's).
    pub saturated: bool,
    pub in_flight_max: usize,
    /// Requests that waited for an in-flight slot (the server answering slower than
    /// requests arrive); their wait is part of their measured latency.
    pub in_flight_waits: u64,
    /// Requests sent per CPU-second of the generator process: its own cost
    /// per request (every run in the process counts, as a drill runs several at once).
    pub requests_per_cpu_s: Option<f64>,
}

/// The idempotency window the run needed and the one the cells held.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Idempotency {
    /// The profile's promise to clients: a retry this late is still not paid twice.
    pub retry_horizon_s: u64,
    /// The window the cells are configured to promise (`idempotency_window_s`).
    pub window_promised_s: Option<f64>,
    /// The shortest window any cell held during the run (for the ledger the
    /// run used), sampled from `/metrics` each second: with records leaving
    /// memory at the peak's rate, this is what a client could really count on.
    pub window_held_min_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    pub payments: u64,
    /// Server CPU per payment, from `/metrics`: the cells' engine threads only.
    pub cpu_us_per_payment: Option<f64>,
    /// Server CPU per payment, from `/metrics` (`process_cpu_seconds_total`):
    /// the whole server process, every thread (HTTP front, router, relays,
    /// engines), kernel time included.
    pub server_cpu_us_per_payment: Option<f64>,
    /// Bytes the cells wrote (log and checkpoints) per payment, from `/metrics`.
    pub bytes_per_payment: Option<f64>,
}

/// Where the server and the generator ran, and the CPU each used during the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Placement {
    /// `split`: disjoint CPU sets; `shared`: the sets overlap, so each side
    /// took CPU the other could have used; `unknown`: the server's CPUs are not
    /// known (a server started elsewhere).
    pub mode: String,
    pub server: SideCpu,
    pub generator: SideCpu,
}

/// How many cells a target peak needs, from what this run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CapacityPlan {
    /// The busiest second whose answers all met the profile's SLOs (latency
    /// and error rate), in payments per second.
    pub payments_per_s_at_slo: f64,
    /// Seconds of the run that met the SLOs, of those that carried load.
    pub seconds_within_slo: u64,
    pub seconds_with_load: u64,
    pub cells: usize,
    pub per_cell_per_s: f64,
    /// The server's CPU use during the run, in cores (CPU seconds over the run's seconds).
    pub server_cores_used: Option<f64>,
    /// Payments per second per server core used, at the SLO.
    pub per_core_per_s: Option<f64>,
    pub bottleneck: String,
    /// The profile's target peak and headroom, and what they need.
    pub target_peak_per_s: Option<f64>,
    pub headroom: f64,
    pub cells_needed: Option<u64>,
    pub cores_needed: Option<f64>,
    /// The cost of a payment at that size: server CPU-µs and bytes the cells write.
    pub server_cpu_us_per_payment: Option<f64>,
    pub bytes_per_payment: Option<f64>,
    /// What the plan assumes.
    pub assumes: String,
}

/// What a capacity plan needs to know of the run besides its seconds.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub payments_per_request: f64,
    pub cells: usize,
    /// The server's CPU seconds during the run.
    pub server_cpu_s: Option<f64>,
    pub duration_s: f64,
}

impl CapacityPlan {
    /// The plan from the run's seconds, its cells, CPU and cost.
    pub fn of(
        timeline: &[Second],
        slo: &BTreeMap<Operation, Slo>,
        shape: RunShape,
        bottleneck: &str,
        cost: &Cost,
        target_peak_per_s: Option<f64>,
        headroom: f64,
    ) -> Self {
        let RunShape { payments_per_request, cells, server_cpu_s, duration_s } = shape;
        let loaded: Vec<&Second> = timeline.iter().filter(|s| s.requests.values().sum::<u64>() > 0).collect();
        let within = |s: &&Second| {
            let requests: u64 = s.requests.values().sum();
            slo.iter().all(|(op, limit)| {
                let p99 = s.p99_ms.get(op.as_str()).copied().unwrap_or(0.0);
                p99 <= limit.p99_ms
            }) && s.errors as f64
                <= slo.values().map(|l| l.error_rate).fold(f64::INFINITY, f64::min).min(1.0) * requests as f64
        };
        let good: Vec<&&Second> = loaded.iter().filter(|s| within(s)).collect();
        let best = good.iter().map(|s| s.requests.values().sum::<u64>()).max().unwrap_or(0) as f64;
        let at_slo = best * payments_per_request;
        let per_cell = at_slo / cells.max(1) as f64;
        let cores = server_cpu_s.filter(|_| duration_s > 0.0).map(|s| s / duration_s);
        let per_core = cores.filter(|c| *c > 0.0).map(|c| at_slo / c);
        let needed = |t: f64| t * (1.0 + headroom);
        let cells_needed =
            target_peak_per_s.filter(|_| per_cell > 0.0).map(|t| (needed(t) / per_cell).ceil().max(1.0) as u64);
        let cores_needed = target_peak_per_s.zip(cost.server_cpu_us_per_payment).map(|(t, us)| needed(t) * us / 1e6);
        Self {
            payments_per_s_at_slo: at_slo,
            seconds_within_slo: good.len() as u64,
            seconds_with_load: loaded.len() as u64,
            cells,
            per_cell_per_s: per_cell,
            server_cores_used: cores,
            per_core_per_s: per_core,
            bottleneck: bottleneck.to_string(),
            target_peak_per_s,
            headroom,
            cells_needed,
            cores_needed,
            server_cpu_us_per_payment: cost.server_cpu_us_per_payment,
            bytes_per_payment: cost.bytes_per_payment,
            assumes: "capacity grows with cells, each on cores of its own like the ones measured here (a cell's \
                      engine is one writer thread); the busiest second within the SLOs stands for what a cell \
                      holds, so a run that never pushed the cells to their limit understates it"
                .into(),
        }
    }
}

/// One side's CPUs and the CPU time its process used.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SideCpu {
    /// The CPUs it may run on, as the kernel lists them (`0`, `1-3`); none when unknown.
    pub cpus: Option<String>,
    /// CPU seconds the whole process used during the run: every thread, user and kernel.
    pub cpu_s: Option<f64>,
    /// `cpu_s` over the run's time on each of its CPUs: how busy its CPUs
    /// were (1.0: every one of them, all the time).
    pub cpu_share: Option<f64>,
}

impl SideCpu {
    fn of(cpus: Option<&[usize]>, cpu_s: Option<f64>, seconds: f64) -> Self {
        let share = match (cpus, cpu_s) {
            (Some(c), Some(s)) if !c.is_empty() && seconds > 0.0 => Some(s / (seconds * c.len() as f64)),
            _ => None,
        };
        Self { cpus: cpus.map(crate::cpu::list), cpu_s, cpu_share: share }
    }
}

impl Placement {
    /// The placement of a measurement of `seconds`, from each side's CPUs
    /// (the server's none when unknown) and the CPU seconds each used.
    pub fn measured(
        server_cpus: Option<&[usize]>,
        generator_cpus: &[usize],
        server_cpu_s: Option<f64>,
        generator_cpu_s: f64,
        seconds: f64,
    ) -> Self {
        let mode = match server_cpus {
            None => "unknown",
            Some(s) if s.iter().any(|c| generator_cpus.contains(c)) => "shared",
            Some(_) => "split",
        };
        Self {
            mode: mode.into(),
            server: SideCpu::of(server_cpus, server_cpu_s, seconds),
            generator: SideCpu::of(Some(generator_cpus), Some(generator_cpu_s), seconds),
        }
    }

    /// One line for people: `split: server on CPU 0 (93 % busy), generator on CPU 1 (41 % busy)`.
    pub fn summary(&self) -> String {
        let side = |name: &str, s: &SideCpu| {
            let busy = s.cpu_share.map_or(String::new(), |b| format!(" ({:.0} % busy)", b * 100.0));
            format!("{name} on CPU {}{busy}", s.cpus.as_deref().unwrap_or("?"))
        };
        format!("{}: {}, {}", self.mode, side("server", &self.server), side("generator", &self.generator))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub profile: String,
    pub target: String,
    pub shadow: bool,
    pub duration_s: f64,
    pub peak_throughput_per_s: f64,
    pub operations: BTreeMap<String, OperationReport>,
    pub cells: Vec<CellReport>,
    pub errors_by_code: BTreeMap<String, u64>,
    pub shed: u64,
    pub degraded: u64,
    pub timeline: Vec<Second>,
    pub hot_merchant: HotMerchant,
    /// The profile's events as they were carried out.
    pub events: Vec<EventDone>,
    pub slo: Vec<SloVerdict>,
    pub checks: Checks,
    pub generator: Generator,
    /// Where the server and the generator ran and the CPU each used.
    pub placement: Placement,
    pub cost: Cost,
    pub idempotency: Idempotency,
    pub bottleneck: String,
    /// How many cells the profile's target peak needs, from this run.
    pub capacity: CapacityPlan,
    pub go: bool,
    pub readiness: String,
}

/// The SLO verdicts of every operation the profile gives thresholds for.
pub fn slo_verdicts(slo: &BTreeMap<Operation, Slo>, ops: &BTreeMap<String, OperationReport>) -> Vec<SloVerdict> {
    let mut out = Vec::new();
    for (op, s) in slo {
        let Some(r) = ops.get(op.as_str()) else { continue };
        let mut push = |threshold: &str, limit: f64, measured: f64| {
            out.push(SloVerdict {
                operation: op.as_str().into(),
                threshold: threshold.into(),
                limit,
                measured,
                pass: measured <= limit,
            })
        };
        push("p99_ms", s.p99_ms, r.latency.p99_ms);
        push("p999_ms", s.p999_ms, r.latency.p999_ms);
        push("error_rate", s.error_rate, r.error_rate);
    }
    out
}

/// Go when every SLO and every check holds and the generator kept its schedule.
pub fn readiness(
    slo: &[SloVerdict],
    checks: &Checks,
    generator: &Generator,
    idempotency: &Idempotency,
) -> (bool, String) {
    let mut reasons = Vec::new();
    let horizon = idempotency.retry_horizon_s as f64;
    match idempotency.window_held_min_s {
        Some(held) if held < horizon => reasons.push(format!(
            "the idempotency window held fell to {held:.0} s, under the retry horizon of {horizon:.0} s: \
             a client retrying that late could be paid twice"
        )),
        Some(_) => {}
        None => reasons.push("the cells did not report their idempotency window".to_string()),
    }
    if generator.saturated {
        reasons.push(format!(
            "generator saturated (sent up to {:.0} ms behind schedule): the run did not measure the profile",
            generator.send_lag_max_ms
        ));
    }
    if checks.wrong_cell_answers > 0 {
        reasons.push(format!("{} answers came from the wrong cell", checks.wrong_cell_answers));
    }
    if checks.audit_failures > 0 {
        reasons.push(format!("the audit failed at {} of {} polls", checks.audit_failures, checks.audit_polls));
    }
    if checks.real_digests_changed > 0 {
        reasons.push(format!("{} real shard digests changed during a shadow run", checks.real_digests_changed));
    }
    for v in slo.iter().filter(|v| !v.pass) {
        reasons.push(format!("{} {} {:.3} over the SLO {:.3}", v.operation, v.threshold, v.measured, v.limit));
    }
    if reasons.is_empty() {
        (true, format!("GO: every SLO ({} thresholds) and every check held", slo.len()))
    } else {
        (false, format!("NO-GO: {}", reasons.join("; ")))
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    fn second(t: u64, requests: u64, p99_ms: f64, errors: u64) -> Second {
        Second {
            t,
            stage: "s".into(),
            intended_rate: 0.0,
            requests: [("transfer".to_string(), requests)].into(),
            errors,
            p99_ms: [("transfer".to_string(), p99_ms)].into(),
            cells: BTreeMap::new(),
            queue_depth: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }

    #[test]
    fn the_plan_takes_the_busiest_second_within_the_slo_and_sizes_the_target_with_headroom() {
        let timeline = vec![
            second(0, 0, 0.0, 0),
            second(1, 100, 10.0, 0),
            second(2, 200, 20.0, 1),
            second(3, 300, 90.0, 0),  // too slow
            second(4, 250, 20.0, 30), // too many errors
        ];
        let slo = [(Operation::Transfer, Slo { p99_ms: 50.0, p999_ms: 200.0, error_rate: 0.01 })].into();
        let cost = Cost {
            payments: 1,
            cpu_us_per_payment: None,
            server_cpu_us_per_payment: Some(50.0),
            bytes_per_payment: Some(300.0),
        };
        let shape = RunShape { payments_per_request: 1.0, cells: 2, server_cpu_s: Some(8.0), duration_s: 4.0 };
        let plan = CapacityPlan::of(&timeline, &slo, shape, "cell 0", &cost, Some(1000.0), 0.3);
        assert_eq!(plan.payments_per_s_at_slo, 200.0);
        assert_eq!((plan.seconds_within_slo, plan.seconds_with_load), (2, 4));
        assert_eq!(plan.per_cell_per_s, 100.0);
        assert_eq!(plan.server_cores_used, Some(2.0));
        assert_eq!(plan.per_core_per_s, Some(100.0));
        assert_eq!(plan.cells_needed, Some(13), "1,000/s × 1.3 over 100/s per cell");
        assert!((plan.cores_needed.unwrap() - 0.065).abs() < 1e-9, "1,300/s × 50 µs");
        // No second within the SLO: no plan, rather than a plan from nothing.
        let slow = vec![second(1, 100, 90.0, 0)];
        let shape = RunShape { payments_per_request: 1.0, cells: 2, server_cpu_s: None, duration_s: 1.0 };
        let none = CapacityPlan::of(&slow, &slo, shape, "x", &cost, Some(1000.0), 0.3);
        assert_eq!((none.payments_per_s_at_slo, none.cells_needed), (0.0, None));
    }
}
