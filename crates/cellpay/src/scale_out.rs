//! `cellpay drill scale-out`: cells added while a sustain runs above the
//! current cells' capacity, then drained away again after the peak.
//!
//! The cluster starts with four cells of which one owns every shard; the
//! other three stand by, owning nothing (`serve --spare-cells 3`). Each cell's
//! writer applies at most [`CELL_COMMANDS_PER_S`] commands and reads a second
//! (`--cell-commands-per-s-max`), as if each cell had a machine of its own:
//! on one host a cell's capacity is then its own, and adding cells adds
//! capacity, which the drill measures. Phases:
//! 1. a ramp of constant-rate steps finds the one owning cell's capacity;
//! 2. a sustain at [`OVER_CAPACITY`] times that, during which the three spare
//!    cells are added (`add_cell`: a rebalance by measured load over every
//!    cell); throughput at the SLO before and after is compared;
//! 3. after the peak, at half the one cell's capacity, the added cells are
//!    drained one by one until cell 0 owns every shard again.
//!
//! The verdict: throughput at the SLO rose, payments kept their p99, nothing
//! failed but what was shed above capacity, every move finished, nothing
//! acknowledged was lost, and the audit is exact after the drain. It reports
//! each phase's write pause per moved shard.

use std::time::Duration;

use anyhow::Context;
use cellpay_stress::http::Http;
use cellpay_stress::profile::Stage;
use cellpay_stress::{Report, RunOptions, Runner};
use serde_json::{json, Value};

use crate::drill::{
    capacity_of, check, errors_by_code, nothing_lost_check, profile, run_all, run_prepared, shards_per_cell, stage,
    Check, Cluster, PAYMENT_P99_SLO_MS,
};

/// The drill's cells: one owns every shard at the start, the rest stand by.
pub const CELLS: u32 = 4;
/// The drill's shards: few, so that filling three cells takes 48 moves.
pub const SHARDS: u32 = 64;
/// The most commands and reads each cell's writer applies a second in the
/// drill: four cells then carry less than what the server's HTTP front can on
/// its core, so the cells are the bound, as when each cell has its own machine.
pub const CELL_COMMANDS_PER_S: u32 = 1_500;
/// The same in the short form, which the test suite runs on a debug build
/// (whose HTTP front carries a few thousand requests a second).
pub const CELL_COMMANDS_PER_S_SHORT: u32 = 400;

/// The pace of each cell's writer in the drill.
pub fn cell_pace(short: bool) -> u32 {
    if short {
        CELL_COMMANDS_PER_S_SHORT
    } else {
        CELL_COMMANDS_PER_S
    }
}
/// The sustain's offered load, in multiples of the one cell's capacity.
pub const OVER_CAPACITY: f64 = 3.0;
/// The least rise of throughput at the SLO the three added cells must bring
/// (the owning cells grow from one to four).
pub const RISE_MIN: f64 = 1.5;
/// The codes of requests shed while the offered load is above capacity: the
/// drill expects them during the sustain; any other error is a failure.
const SHED_CODES: [&str; 3] = ["overloaded", "degraded", "rate_limited"];
/// Milliseconds between two moves of the drill's plans.
const PACE_MS: u64 = 20;
/// How long a drain plan may take before the drill gives up on it.
const DRAIN_WAIT_MAX: Duration = Duration::from_secs(180);

/// The serve flags of the drill's cluster (beside `--cells`).
pub fn serve_args(short: bool) -> Vec<String> {
    let spare = (CELLS - 1).to_string();
    let pace = cell_pace(short).to_string();
    ["--spare-cells", &spare, "--shards", &SHARDS.to_string(), "--cell-commands-per-s-max", &pace]
        .map(String::from)
        .to_vec()
}

/// Successful answers per second over the whole seconds in [from, to).
fn goodput_between(report: &Report, from: f64, to: f64) -> f64 {
    let seconds: Vec<_> = report.timeline.iter().filter(|s| s.t as f64 >= from && (s.t + 1) as f64 <= to).collect();
    let ok: u64 = seconds.iter().map(|s| s.requests.values().sum::<u64>() - s.errors).sum();
    ok as f64 / seconds.len().max(1) as f64
}

/// Errors of a run other than load shedding, by operation and code.
fn failures(report: &Report) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut named = Vec::new();
    for (op, codes) in errors_by_code(report) {
        for (code, n) in codes.iter().filter(|(code, _)| !SHED_CODES.contains(&code.as_str())) {
            total += n;
            named.push(format!("{op} {code} {n}"));
        }
    }
    (total, named)
}

/// The mover's figures (`GET /v1/admin/moves`).
async fn moves(http: &Http) -> anyhow::Result<Value> {
    let answer = http.send("GET", "/v1/admin/moves", None).await.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(answer.status == 200, "GET /v1/admin/moves answered {}", answer.status);
    Ok(answer.json())
}

/// Waits for the plan under way to finish; answers the mover's figures then.
async fn plan_finished(http: &Http, wait: Duration) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let m = moves(http).await?;
        if m["plan"]["running"] != true {
            return Ok(m);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "a plan of moves still ran after {wait:?}: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drains cells CELLS-1 down to 1, one plan at a time; answers each plan's (cell, moves, failed).
async fn drain_added(http: Http) -> anyhow::Result<Vec<(u32, u64, u64)>> {
    let mut done = Vec::new();
    for cell in (1..CELLS).rev() {
        let body = json!({"pace_ms": PACE_MS}).to_string();
        let answer = http
            .send("POST", &format!("/v1/admin/cells/{cell}/drain"), Some(body))
            .await
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(answer.status == 202, "draining cell {cell} answered {}: {}", answer.status, answer.json());
        let m = plan_finished(&http, DRAIN_WAIT_MAX).await?;
        done.push((cell, m["plan"]["done"].as_u64().unwrap_or(0), m["plan"]["failed"].as_u64().unwrap_or(0)));
    }
    Ok(done)
}

pub(crate) async fn scale_out(
    c: &Cluster,
    short: bool,
    progress: bool,
) -> anyhow::Result<(Vec<Check>, Value, Vec<Report>)> {
    let http = Http::new(&c.target, &c.token, false);
    let mix = "[mix]\ntransfer = 70\nbalance = 20\nstatus = 10\n";
    let keys = "[keys]\ncross_cell_share = 0.2\n";
    let (steps, step_s, sustain_s, add_at, after_s): (Vec<f64>, f64, f64, f64, f64) = if short {
        (vec![50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 700.0, 1_000.0], 2.0, 20.0, 5.0, 12.0)
    } else {
        ((1..=16).map(|k| 250.0 * f64::from(k)).collect(), 4.0, 60.0, 15.0, 30.0)
    };
    let before = shards_per_cell(&http, CELLS as usize).await?;
    anyhow::ensure!(
        before[0] as u32 == SHARDS,
        "the drill's cluster starts with cell 0 owning every shard: {before:?}"
    );

    // 1. The one owning cell's capacity.
    let stages: String = steps.iter().map(|r| stage(&format!("step-{r:.0}"), step_s, *r, *r)).collect();
    let find = profile(&format!("name = \"drill-one-cell\"\naccounts = 4000\nseed = 11\n{stages}{mix}{keys}"))?;
    let sustain = profile(&format!(
        "name = \"drill-scale-out\"\naccounts = 4000\nseed = 12\n{}{mix}{keys}\
         [[events]]\nat_s = {add_at}\naction = \"add_cell\"\ncell = 1\n",
        stage("seed", sustain_s, 1.0, 1.0)
    ))?;
    let after = profile(&format!(
        "name = \"drill-scale-in\"\naccounts = 4000\nseed = 13\n{}{mix}{keys}",
        stage("seed", 1.0, 1.0, 1.0)
    ))?;
    // Both runs follow the shard map: the sustain's own event moves shards,
    // and the drill drains cells during the second.
    let options = RunOptions { follow_map: true, ..c.options(false, progress) };
    let sustain = Runner::prepare(sustain, options.clone()).await?;
    let after = Runner::prepare(after, options).await?;
    let found = run_all(vec![(find, c.options(false, progress))]).await?;
    let capacity = capacity_of(&found[0].0, &steps);
    anyhow::ensure!(capacity > 0.0, "the capacity ramp of one cell served nothing within the SLO");
    let top = steps.last().copied().unwrap_or_default();
    anyhow::ensure!(
        capacity < 0.95 * top,
        "one cell carried the ramp's top step ({top:.0}/s): its capacity is above what the drill can offer"
    );

    // 2. The sustain above it; the spare cells join at `add_at`.
    let rate = OVER_CAPACITY * capacity;
    let at = |name: &str, seconds: f64, rate: f64| {
        vec![Stage { name: name.into(), duration_s: seconds, rate_from: rate, rate_to: rate }]
    };
    let sustain = sustain.with_stages(at("sustain", sustain_s, rate))?;
    let runs = run_prepared(vec![sustain]).await?;
    let (report, checked, missing) = &runs[0];
    let added = report.events.iter().find(|e| e.action == "add_cell");
    let added_at = match added {
        Some(e) if e.status == 202 => e.at_s,
        other => anyhow::bail!("the drill could not add the spare cells: {other:?}"),
    };
    let out_moves = plan_finished(&http, DRAIN_WAIT_MAX).await?;
    let grown = shards_per_cell(&http, CELLS as usize).await?;
    let (good_before, good_after) =
        (goodput_between(report, 1.0, added_at.floor()), goodput_between(report, sustain_s * 2.0 / 3.0, sustain_s));
    let p99 = report.operations.get("transfer").map_or(0.0, |o| o.admitted_latency.p99_ms);
    let (failed, failed_by) = failures(report);

    // 3. After the peak: the added cells drained away, one at a time.
    let after = after.with_stages(at("scale-in", after_s, 0.5 * capacity))?;
    let drain = tokio::spawn(drain_added(http.clone()));
    let after_runs = run_prepared(vec![after]).await?;
    let drained = drain.await.context("the drain task")??;
    let in_moves = moves(&http).await?;
    let shrunk = shards_per_cell(&http, CELLS as usize).await?;
    let (after_report, after_checked, after_missing) = &after_runs[0];
    let (after_failed, after_failed_by) = failures(after_report);

    let plan_out = &out_moves["plan"];
    let out_done = plan_out["done"].as_u64().unwrap_or(0);
    let out_planned = plan_out["moves"].as_array().map_or(0, Vec::len) as u64;
    let drain_failed: u64 = drained.iter().map(|d| d.2).sum();
    let pause = |m: &Value, q: &str| m["pause_us"][q].as_f64().map_or(f64::NAN, |us| us / 1e3);
    let checks = vec![
        check(
            "throughput_rises",
            good_after >= RISE_MIN * good_before,
            format!(
                "answered within the SLO: {good_before:.0}/s on 1 cell, {good_after:.0}/s on {} cells (x{:.2}, at \
                 least x{RISE_MIN}); offered {rate:.0}/s, {OVER_CAPACITY}x the one cell's capacity {capacity:.0}/s",
                grown.iter().filter(|n| **n > 0).count(),
                good_after / good_before.max(1.0)
            ),
        ),
        check(
            "payments_p99",
            p99 <= PAYMENT_P99_SLO_MS,
            format!("admitted payments p99 {p99:.1} ms during the sustain and the moves (SLO {PAYMENT_P99_SLO_MS} ms)"),
        ),
        check(
            "no_failures",
            failed + after_failed == 0,
            format!(
                "{} requests failed other than shed above capacity ({}); shed and other errors: {:?}",
                failed + after_failed,
                [failed_by, after_failed_by].concat().join(", "),
                errors_by_code(report)
            ),
        ),
        check(
            "cells_added",
            out_planned > 0 && out_done == out_planned && grown.iter().all(|n| *n > 0),
            format!(
                "{out_done} of {out_planned} moves done at {PACE_MS} ms apart; shards per cell {before:?} -> {grown:?}; \
                 write pause per moved shard p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                pause(&out_moves, "p50"),
                pause(&out_moves, "p99"),
                pause(&out_moves, "max")
            ),
        ),
        check(
            "cells_drained",
            drain_failed == 0 && shrunk[0] as u32 == SHARDS,
            format!(
                "drained cells {:?} (moves done, failed): {:?}; shards per cell now {shrunk:?}",
                drained.iter().map(|d| d.0).collect::<Vec<_>>(),
                drained.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>()
            ),
        ),
        nothing_lost_check(checked + after_checked, missing + after_missing),
    ];
    let figures = json!({
        "cells": CELLS,
        "shards": SHARDS,
        "cell_commands_per_s_max": cell_pace(short),
        "one_cell_capacity_per_s": capacity,
        "offered_per_s": rate,
        "added_at_s": added_at,
        "goodput_before_per_s": good_before,
        "goodput_after_per_s": good_after,
        "rise": good_after / good_before.max(1.0),
        "goodput_per_owning_cell_after_per_s": good_after / grown.iter().filter(|n| **n > 0).count().max(1) as f64,
        "payments_admitted_p99_ms": p99,
        "shards_per_cell": {"start": before, "grown": grown, "drained": shrunk},
        "scale_out_moves": {"planned": out_planned, "done": out_done, "pause_us": out_moves["pause_us"], "steps_us": out_moves["steps_us"]},
        "all_moves": {
            "moved": in_moves["moved"], "undone": in_moves["undone"], "failed": in_moves["failed"],
            "pause_us": in_moves["pause_us"], "steps_us": in_moves["steps_us"],
        },
        "drains": drained.iter().map(|(cell, done, failed)| json!({"cell": cell, "done": done, "failed": failed})).collect::<Vec<_>>(),
    });
    let mut reports = vec![found.into_iter().next().expect("one run").0];
    reports.extend(runs.into_iter().map(|r| r.0));
    reports.extend(after_runs.into_iter().map(|r| r.0));
    Ok((checks, figures, reports))
}
