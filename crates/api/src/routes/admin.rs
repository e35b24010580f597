//! `/v1/admin/*` (admin role): the degrade plan and its switches, the flow
//! rules, and the drill controls. A bad plan or rule set is refused with 400
//! `invalid_request` and the message of the first mistake; the old one stays.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cellpay_core::{Authority, ErrorCode};
use cellpay_router::{FlowRules, Plan};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::oplog::{Action, ACTIONS_PAGE_MAX};
use crate::{body, AppState, Caller, Role};

fn admin_only(role: Role, what: &str) -> Result<(), ApiError> {
    if role != Role::Admin {
        return Err(ApiError::new(ErrorCode::Forbidden, format!("{what} needs the admin role")));
    }
    Ok(())
}

fn degrade_view(state: &AppState) -> Result<Value, ApiError> {
    let cluster = state.cluster()?;
    let d = &cluster.protection().degrade;
    Ok(json!({
        "switches": d.switches(),
        "changes": d.changes(),
        "changes_total": d.changes_total.load(std::sync::atomic::Ordering::Relaxed),
        "signals": cluster.last_signals(),
    }))
}

/// `GET /v1/admin/degrade`: the declared switches, their state, recent changes, the signals.
pub async fn degrade(State(state): State<AppState>, Extension(role): Extension<Role>) -> Result<Response, ApiError> {
    admin_only(role, "reading the degrade plan")?;
    Ok(Json(degrade_view(&state)?).into_response())
}

/// `PUT /v1/admin/degrade`: a new plan (JSON, the TOML file's shape).
pub async fn replace_plan(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    admin_only(role, "replacing the degrade plan")?;
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let plan = Plan::from_json(&bytes).map_err(|e| ApiError::invalid(format!("degrade plan refused: {e}")))?;
    let args = serde_json::to_value(&plan).unwrap_or(Value::Null);
    state.cluster()?.protection().degrade.replace(plan);
    state.record(Action { caller, by: &Authority::Admin, action: "degrade_plan", args });
    Ok(Json(degrade_view(&state)?).into_response())
}

/// `PUT /v1/admin/degrade/{switch}` with `{"mode": "on" | "off" | "auto"}`.
pub async fn set_switch(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
    Extension(caller): Extension<Caller>,
    Path(switch): Path<String>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    admin_only(role, "turning a degrade switch")?;
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let order: body::SwitchBody = body::parse(&bytes)?;
    let cluster = state.cluster()?;
    let view = cluster.protection().degrade.set(&switch, order.mode).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !cluster.protection().degrade.is_on(cellpay_router::Action::BalanceReadsStale) {
        state.stale.clear();
    }
    let args = json!({"switch": switch, "mode": order.mode});
    state.record(Action { caller, by: &Authority::Admin, action: "degrade_switch", args });
    let scope = share(&state, |shared| shared.set_switch(&switch, order.mode)).await;
    Ok(([(SCOPE_HEADER, scope)], Json(view)).into_response())
}

/// Says whether an operator's order holds on every router (`cluster`) or,
/// with the control plane unreachable, on this one only (`router`).
pub const SCOPE_HEADER: &str = "x-cellpay-scope";

/// Stores an order in the shared settings, if there are any; answers its scope.
/// The order holds on this router either way: an operator must be able to
/// degrade during an incident even when the control plane is down.
async fn share<'a, F>(state: &'a AppState, store: F) -> &'static str
where
    F: FnOnce(&'a dyn crate::SharedSettings) -> crate::BoxFuture<'a, Result<(), String>>,
{
    let Some(shared) = state.shared.get() else { return "cluster" };
    match store(shared.as_ref()).await {
        Ok(()) => "cluster",
        Err(e) => {
            tracing::warn!("an operator's order holds on this router only: the control plane did not take it: {e}");
            "router"
        }
    }
}

/// `GET /v1/admin/rules`: the flow rules in force.
pub async fn rules(State(state): State<AppState>, Extension(role): Extension<Role>) -> Result<Response, ApiError> {
    admin_only(role, "reading the flow rules")?;
    Ok(Json(state.cluster()?.protection().rules()).into_response())
}

/// `PUT /v1/admin/rules`: a whole new rule set, checked before it replaces the old one.
pub async fn replace_rules(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    admin_only(role, "changing the flow rules")?;
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let rules = FlowRules::from_json(&bytes).map_err(|e| ApiError::invalid(format!("flow rules refused: {e}")))?;
    let cluster = state.cluster()?;
    let args = serde_json::to_value(&rules).unwrap_or(Value::Null);
    cluster.replace_rules(rules.clone());
    state.record(Action { caller, by: &Authority::Admin, action: "flow_rules", args });
    let scope = share(&state, |shared| shared.set_rules(&rules)).await;
    Ok(([(SCOPE_HEADER, scope)], Json(cluster.protection().rules())).into_response())
}

async fn control(state: &AppState, caller: Caller, id: &str, halt: bool) -> Result<Response, ApiError> {
    let role = caller.role;
    admin_only(role, "halting or restarting a cell")?;
    let Some(control) = state.control.get() else {
        return Err(ApiError::new(ErrorCode::Forbidden, "drills are not enabled on this server (serve --drills true)"));
    };
    let cells = state.cluster()?.cells().len();
    let cell = id.parse::<u32>().ok().filter(|c| (*c as usize) < cells);
    let cell = cell.ok_or_else(|| ApiError::invalid(format!("no cell {id:?} in this cluster of {cells}")))?;
    let done = if halt { control.halt(cell).await } else { control.restart(cell).await };
    let message = done.map_err(|e| ApiError::new(ErrorCode::Conflict, e))?;
    let action = if halt { "cell_halt" } else { "cell_restart" };
    state.record(Action { caller, by: &Authority::Admin, action, args: json!({"cell": cell}) });
    Ok(Json(json!({"cell": cell, "message": message})).into_response())
}

/// `POST /v1/admin/cells/{id}/halt`: stops the cell's engine as a crash would (drills only).
pub async fn halt(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    control(&state, caller, &id, true).await
}

/// `POST /v1/admin/cells/{id}/restart`: recovers the cell and starts it again (drills only).
pub async fn restart(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    control(&state, caller, &id, false).await
}

/// `GET /v1/admin/actions?limit=N`: the newest operator actions, oldest first
/// (`limit` 1..=1000, default 100).
pub async fn actions(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    admin_only(role, "reading the operator log")?;
    let mut limit = 100;
    for pair in raw.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("limit", v) => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=ACTIONS_PAGE_MAX).contains(n))
                    .ok_or_else(|| ApiError::invalid(format!("limit must be between 1 and {ACTIONS_PAGE_MAX}")))?;
            }
            (other, _) => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    let Some(log) = state.oplog.get() else {
        return Ok(Json(json!({"actions": []})).into_response());
    };
    let actions = log
        .newest(limit)
        .map_err(|e| ApiError::new(ErrorCode::CellUnavailable, format!("the operator log cannot be read: {e}")))?;
    Ok(Json(json!({"actions": actions})).into_response())
}

/// The body of `POST /v1/admin/shards/{id}/move`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    to: u32,
}

fn mover(state: &AppState) -> Result<&std::sync::Arc<cellpay_router::Mover>, ApiError> {
    state.mover.get().ok_or_else(|| ApiError::new(ErrorCode::CellUnavailable, "this server cannot move shards yet"))
}

/// `POST /v1/admin/shards/{id}/move` with `{"to": cell}`: moves the shard
/// while payments flow and answers the move's report (its write pause among it).
pub async fn move_shard(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    admin_only(caller.role, "moving a shard")?;
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let body: MoveBody =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("a move needs {{\"to\": cell}}: {e}")))?;
    let shard = id.parse::<u32>().map_err(|_| ApiError::invalid(format!("{id:?} is not a shard number")))?;
    let mover = mover(&state)?;
    let report = mover.move_shard(shard, cellpay_core::CellId(body.to)).await.map_err(|e| {
        use cellpay_router::MoveError as E;
        let code = match &e {
            E::Invalid(_) => ErrorCode::InvalidRequest,
            E::Drain(_) | E::Lost(_) => ErrorCode::Conflict,
            E::Cell { .. } | E::Undecided { .. } | E::Interrupted(_) => ErrorCode::CellUnavailable,
        };
        ApiError::new(code, e.to_string())
    })?;
    let args = serde_json::to_value(&report).unwrap_or(Value::Null);
    state.record(Action { caller, by: &Authority::Admin, action: "shard_move", args: args.clone() });
    Ok(Json(args).into_response())
}

/// `POST /v1/admin/moves/resume`: finishes the moves a stop left half done, the way the map says.
pub async fn resume_moves(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    admin_only(caller.role, "resuming shard moves")?;
    let resumed =
        mover(&state)?.resume().await.map_err(|e| ApiError::new(ErrorCode::CellUnavailable, e.to_string()))?;
    let args = json!({"resumed": resumed});
    state.record(Action { caller, by: &Authority::Admin, action: "shard_moves_resumed", args: args.clone() });
    Ok(Json(args).into_response())
}

/// The body of `POST /v1/admin/cells/{id}/drain` and `POST /v1/admin/rebalance`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    /// The cells a rebalance spreads the load over (default: every cell not drained).
    #[serde(default)]
    cells: Vec<u32>,
    /// The most moves of a rebalance (default 64).
    #[serde(default)]
    moves_max: Option<usize>,
    /// Milliseconds between two moves (default 50), so payments keep their latency.
    #[serde(default)]
    pace_ms: Option<u64>,
}

/// The pause between two moves of a plan, unless the body says otherwise.
const PLAN_PACE_DEFAULT_MS: u64 = 50;
/// The longest pause between two moves a body may ask for (I7).
const PLAN_PACE_MAX_MS: u64 = 60_000;
/// The most moves of a rebalance, unless the body says otherwise.
const REBALANCE_MOVES_DEFAULT: usize = 64;

async fn plan_body(state: &AppState, headers: &HeaderMap, request: Body) -> Result<PlanBody, ApiError> {
    let bytes = body::read(headers, request, state.limits.body_bytes_max).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(PlanBody::default());
    }
    let body: PlanBody = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("a plan body: {e}")))?;
    if body.pace_ms.is_some_and(|p| p > PLAN_PACE_MAX_MS) {
        return Err(ApiError::invalid(format!("pace_ms is at most {PLAN_PACE_MAX_MS}")));
    }
    if body.moves_max == Some(0) || body.moves_max.is_some_and(|m| m > cellpay_router::moves::PLAN_MOVES_MAX) {
        return Err(ApiError::invalid(format!("moves_max is between 1 and {}", cellpay_router::moves::PLAN_MOVES_MAX)));
    }
    Ok(body)
}

fn plan_error(e: cellpay_router::MoveError) -> ApiError {
    match e {
        cellpay_router::MoveError::Invalid(m) => ApiError::new(ErrorCode::Conflict, m),
        other => ApiError::new(ErrorCode::CellUnavailable, other.to_string()),
    }
}

/// `POST /v1/admin/cells/{id}/drain`: moves every shard of the cell to the
/// others, least loaded first, in the background; answers the plan (202).
/// Progress: `GET /v1/admin/moves`. Once done the cell owns nothing and can be stopped.
pub async fn drain_cell(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    admin_only(caller.role, "draining a cell")?;
    let body = plan_body(&state, &headers, request).await?;
    let mover = mover(&state)?;
    let cell = id
        .parse::<u32>()
        .ok()
        .filter(|c| (*c as usize) < mover.cells().len())
        .ok_or_else(|| ApiError::invalid(format!("no cell {id:?} in this cluster of {}", mover.cells().len())))?;
    let plan = mover.plan_drain(cellpay_core::CellId(cell)).await.map_err(plan_error)?;
    let pace = std::time::Duration::from_millis(body.pace_ms.unwrap_or(PLAN_PACE_DEFAULT_MS));
    let progress = mover.start_plan("drain", plan, pace).map_err(plan_error)?;
    mover.mark_drained(cellpay_core::CellId(cell));
    let args = json!({"cell": cell, "moves": progress.moves.len()});
    state.record(Action { caller, by: &Authority::Admin, action: "cell_drain", args });
    Ok((axum::http::StatusCode::ACCEPTED, Json(progress)).into_response())
}

/// `POST /v1/admin/rebalance`: moves shards from the busiest cells to the
/// idlest by measured load (a new, empty cell fills up), in the background;
/// answers the plan (202).
pub async fn rebalance(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    admin_only(caller.role, "rebalancing the shards")?;
    let body = plan_body(&state, &headers, request).await?;
    let mover = mover(&state)?;
    if let Some(c) = body.cells.iter().find(|c| **c as usize >= mover.cells().len()) {
        return Err(ApiError::invalid(format!("no cell {c} in this cluster of {}", mover.cells().len())));
    }
    let cells: Vec<cellpay_core::CellId> = body.cells.iter().map(|c| cellpay_core::CellId(*c)).collect();
    let plan =
        mover.plan_rebalance(&cells, body.moves_max.unwrap_or(REBALANCE_MOVES_DEFAULT)).await.map_err(plan_error)?;
    let pace = std::time::Duration::from_millis(body.pace_ms.unwrap_or(PLAN_PACE_DEFAULT_MS));
    let progress = mover.start_plan("rebalance", plan, pace).map_err(plan_error)?;
    let args = json!({"cells": body.cells, "moves": progress.moves.len()});
    state.record(Action { caller, by: &Authority::Admin, action: "rebalance", args });
    Ok((axum::http::StatusCode::ACCEPTED, Json(progress)).into_response())
}

/// `GET /v1/admin/moves`: the moves this server ran (counts, each move's
/// write pause, the last report) and the plan under way.
pub async fn moves(State(state): State<AppState>, Extension(role): Extension<Role>) -> Result<Response, ApiError> {
    admin_only(role, "reading the shard moves")?;
    let f = mover(&state)?.figures();
    Ok(Json(json!({
        "moved": f.moved,
        "undone": f.undone,
        "failed": f.failed,
        "pause_us": f.pause_quantiles(),
        "steps_us": f.step_quantiles(),
        "moving": f.moving.map(|(shard, from, to)| json!({"shard": shard, "from": from, "to": to})),
        "last": f.last,
        "plan": f.plan,
    }))
    .into_response())
}
