//! `GET /dashboard`: a self-contained live page (no CDN: the machines have no
//! internet) that polls `GET /dashboard/data` every second: cells and their
//! health (ready, stalled or failed, with the reason), per-cell throughput and commit p99, queue depth, outbox backlog,
//! 503 counts, degrade switches, relays. The page keeps five minutes of these
//! figures and draws them (answers per second and p99 per priority class from
//! cumulative latency buckets, per-cell throughput, queue wait and outbox
//! backlog, refusals by class and layer, degrade changes on the time axis, the
//! shard map): the server only reads counters it keeps anyway.

use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cellpay_cell::CellClient;
use cellpay_core::Priority;
use cellpay_router::Layer;
use serde_json::{json, Value};

use crate::AppState;

const PAGE: &str = include_str!("../../dashboard.html");

pub async fn page() -> Response {
    ([(CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

pub async fn data(State(state): State<AppState>) -> Response {
    if state.dashboard_limiter.check().is_err() {
        let msg = format!("/dashboard/data answers at most {} reads a second", crate::METRICS_SCRAPES_PER_S_MAX);
        return crate::error::ApiError::new(cellpay_core::ErrorCode::RateLimited, msg).into_response();
    }
    let Ok(cluster) = state.cluster() else {
        return Json(json!({"epoch": 0, "cells": [], "relays": [], "shed": 0, "requests": 0, "degrade": []}))
            .into_response();
    };
    let map = cluster.map();
    let mut cells: Vec<Value> = Vec::new();
    for client in cluster.cells() {
        let s = client.status();
        let figures = client.figures();
        let backlog = figures.real.open_messages();
        // The shorter of the two ledgers' windows: what a client can count on in this cell.
        let window_held_s = figures.window_held_ms(false).min(figures.window_held_ms(true)) as f64 / 1000.0;
        let engine = state
            .local_cells
            .get()
            .and_then(|cells| cells.iter().find(|h| h.cell() == s.cell))
            .and_then(|h| h.handle());
        let (commands, p99_ms, queue_delay_ms) = engine.map_or((0, 0.0, 0.0), |h| {
            let snap = h.stats().snapshot();
            (snap.commands, snap.batch_us.p99 as f64 / 1e3, h.queue_delay_us() as f64 / 1e3)
        });
        cells.push(json!({
            "id": s.cell.0,
            "status": s.health.as_str(),
            "reason": s.health.reason(),
            "epoch": s.epoch,
            "shards": map.owners().iter().filter(|o| **o == s.cell).count(),
            "queue_depth": s.queue_depth,
            "commands_total": commands,
            "commit_p99_ms": p99_ms,
            "queue_delay_ms": queue_delay_ms,
            "outbox_backlog": backlog,
            "window_held_s": window_held_s,
            "window_promised_s": figures.window_promised_ms as f64 / 1000.0,
            "tier_bytes": figures.tier.map(|t| t.bytes),
        }));
    }
    let relays: Vec<Value> = state
        .relays
        .get()
        .into_iter()
        .flatten()
        .map(|r| {
            json!({
                "source": r.source.0,
                "dest": r.dest.0,
                "ledger": if r.shadow { "shadow" } else { "real" },
                "delivered": r.stats.delivered.load(Relaxed),
                "refused": r.stats.refused.load(Relaxed),
                "failed_rounds": r.stats.failed_rounds.load(Relaxed),
            })
        })
        .collect();
    let p = cluster.protection();
    let layers = p.layers();
    let guards: Vec<Value> = layers
        .cells
        .iter()
        .enumerate()
        .map(|(i, g)| {
            json!({"cell": i, "breaker": g.breaker.state().as_str(), "concurrency_limit": g.limit.limit(),
                   "in_flight": g.limit.in_flight()})
        })
        .collect();
    let mut refused = serde_json::Map::new();
    let mut cell_queue = 0;
    for class in Priority::ALL {
        let mut by_layer: u64 = Layer::ALL.iter().map(|l| p.counters.refused(*l, class)).sum();
        for slot in state.local_cells.get().into_iter().flatten() {
            let shed = slot.handle().map_or(0, |h| h.stats().shed[class.rank()].load(Relaxed));
            by_layer += shed;
            cell_queue += shed;
        }
        refused.insert(class.as_str().to_string(), Value::from(by_layer));
    }
    let mut refused_by_layer: serde_json::Map<String, Value> = Layer::ALL
        .iter()
        .map(|l| (l.as_str().to_string(), Priority::ALL.iter().map(|c| p.counters.refused(*l, *c)).sum::<u64>().into()))
        .collect();
    refused_by_layer.insert("cell_queue".to_string(), Value::from(cell_queue));
    // Cumulative figures per class; the page charts their changes second by second.
    let classes: Vec<Value> = Priority::ALL
        .iter()
        .map(|c| {
            let latency = state.classes.latency[c.rank()].read();
            json!({"class": c.as_str(), "answered": latency.count,
                   "errors": state.classes.errors[c.rank()].load(Relaxed), "buckets": latency.cumulative})
        })
        .collect();
    Json(json!({
        "epoch": map.epoch(),
        "cells": cells,
        "relays": relays,
        "shed": state.unavailable_answers.load(Relaxed),
        "requests": state.answered.load(Relaxed),
        "degrade": p.degrade.switches(),
        "degrade_changes": p.degrade.changes(),
        "signals": cluster.last_signals(),
        "guards": guards,
        "refused_by_class": refused,
        "refused_by_layer": refused_by_layer,
        "classes": classes,
        "latency_bounds_s": cellpay_cell::LATENCY_BOUNDS_S,
        "retries": p.counters.retries.load(Relaxed),
        "moves": state.mover.get().map(|mover| {
            let f = mover.figures();
            let q = f.pause_quantiles();
            let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
            json!({"moved": f.moved, "undone": f.undone, "failed": f.failed,
                   "pause_ms": [ms(q.p50), ms(q.p99), ms(q.max)], "moving": f.moving, "plan": f.plan})
        }),
    }))
    .into_response()
}
