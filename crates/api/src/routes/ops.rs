//! Operations: audit, cluster view, health, readiness, metrics, OpenAPI.

use axum::extract::RawQuery;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use cellpay_core::ErrorCode;
use cellpay_router::AuditReport;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// The OpenAPI 3.1 document, kept in the repository beside this crate.
pub const OPENAPI: &str = include_str!("../../openapi.json");

fn ledger_json(a: &AuditReport) -> Value {
    json!({
        "ok": a.ok(),
        "sum": a.sum(),
        "in_flight": a.in_flight(),
        "balances": a.balances(),
        "negative_accounts": a.negative_accounts(),
        "full": a.full,
        "attempts": a.attempts,
        "findings": a.findings.iter().map(|f| json!({"kind": f.kind(), "message": f.to_string()})).collect::<Vec<_>>(),
        "cells": a.cells.iter().map(|(cell, f)| json!({
            "cell": cell.0,
            "accounts": f.accounts,
            "balance_sum": f.balance_sum,
            "outbox_messages": f.open_messages(),
            "outbox_sum": f.open_sum(),
            "negative_accounts": f.negative_accounts,
        })).collect::<Vec<_>>(),
    })
}

/// `full=true` asks for the full audit (every cell walks its state): admin only.
fn audit_full(raw: Option<&str>, role: crate::Role) -> Result<bool, ApiError> {
    let mut full = false;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("full", "true") => full = true,
            ("full", "false") => full = false,
            ("full", _) => return Err(ApiError::invalid("full must be true or false")),
            (other, _) => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    if full && role != crate::Role::Admin {
        return Err(ApiError::new(ErrorCode::Forbidden, "the full audit walks every account: it needs the admin role"));
    }
    Ok(full)
}

/// I1 and I4 over the whole cluster, for the real and the shadow ledger:
/// every cell's own figures and the reconciliation of every ordered pair of
/// cells (it names any pair, sequences and amount that do not match). The
/// top-level `sum`, `in_flight`, `findings` and `cells` are the real ledger's;
/// `ok` holds only when both ledgers are sound.
pub async fn audit(
    State(state): State<AppState>,
    Extension(role): Extension<crate::Role>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let full = audit_full(raw.as_deref(), role)?;
    let cluster = state.cluster()?;
    let unavailable = |(cell, e): (cellpay_core::CellId, cellpay_cell::EngineError)| {
        ApiError::new(ErrorCode::CellUnavailable, format!("cell {cell} did not answer the audit: {e}"))
    };
    let real = cluster.audit(false, full).await.map_err(unavailable)?;
    let shadow = cluster.audit(true, full).await.map_err(unavailable)?;
    for finding in real.findings.iter().chain(&shadow.findings) {
        tracing::error!(kind = finding.kind(), "audit: {finding}");
    }
    let mut body = ledger_json(&real);
    body["ok"] = Value::from(real.ok() && shadow.ok());
    body["real"] = ledger_json(&real);
    body["shadow"] = ledger_json(&shadow);
    Ok(Json(body).into_response())
}

/// Per-shard digests of the real ledger (or the shadow one with
/// `X-Cellpay-Shadow: 1`), so a test or a stress run can prove that nothing
/// real changed. Admin only.
pub async fn digests(
    State(state): State<AppState>,
    axum::Extension(role): axum::Extension<crate::Role>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if role != crate::Role::Admin {
        return Err(ApiError::new(ErrorCode::Forbidden, "reading digests needs the admin role"));
    }
    let shadow = crate::headers::shadow(&headers)?;
    let (epoch, digests) =
        state.cluster()?.digests(shadow).await.map_err(|(cell, e)| {
            ApiError::new(ErrorCode::CellUnavailable, format!("cell {cell} did not answer: {e}"))
        })?;
    let hex: Vec<String> = digests.iter().map(|d| format!("{d:016x}")).collect();
    let ledger = if shadow { "shadow" } else { "real" };
    Ok(Json(json!({"epoch": epoch, "ledger": ledger, "digests": hex})).into_response())
}

pub async fn cluster(State(state): State<AppState>) -> Result<Response, ApiError> {
    let cluster = state.cluster()?;
    let map = cluster.map();
    let cells: Vec<Value> = cluster
        .cells()
        .iter()
        .map(|c| {
            let s = c.status();
            let shards = map.owners().iter().filter(|o| **o == s.cell).count();
            json!({
                "id": s.cell.0,
                "status": s.health.as_str(),
                "reason": s.health.reason(),
                "epoch": s.epoch,
                "queue_depth": s.queue_depth,
                "shards": shards,
            })
        })
        .collect();
    let owners: Vec<u32> = map.owners().iter().map(|c| c.0).collect();
    Ok(Json(json!({"epoch": map.epoch(), "shards": map.shards(), "cells": cells, "shard_map": owners})).into_response())
}

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready once every cell has recovered, and only while every cell serves: a
/// failed cell (store error, engine panic) or a stalled one (a hung disk)
/// turns it 503, with each such cell and its reason in the message.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let cluster = match state.cluster() {
        Ok(cluster) => cluster,
        Err(e) => return e.into_response(),
    };
    let down: Vec<String> = cluster
        .cells()
        .iter()
        .map(|cell| cell.status())
        .filter(|s| !s.health.is_serving())
        .map(|s| format!("cell {} {}", s.cell, s.health))
        .collect();
    if down.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::new(ErrorCode::CellUnavailable, format!("not every cell serves: {}", down.join("; "))).into_response()
    }
}

/// Prometheus text, from figures the cells publish (no work queued on them);
/// at most [`crate::METRICS_SCRAPES_PER_S_MAX`] a second, 429 beyond.
pub async fn metrics(State(state): State<AppState>) -> Response {
    if state.metrics_limiter.check().is_err() {
        let msg = format!("/metrics answers at most {} scrapes a second", crate::METRICS_SCRAPES_PER_S_MAX);
        return ApiError::new(ErrorCode::RateLimited, msg).into_response();
    }
    let text = crate::metrics::render(&state).await;
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn openapi() -> Response {
    ([(CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Any path the contract does not have.
pub async fn no_route() -> Response {
    let body = json!({"error": {"code": "invalid_request", "message": "no such route in the v1 contract"}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}
