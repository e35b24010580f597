//! `POST /v1/accounts`, `GET /v1/accounts/{id}`, `GET /v1/accounts/{id}/entries`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderValue;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cellpay_core::{Authority, ErrorCode, Op, Outcome, Query, QueryAnswer, ENTRIES_PAGE_MAX};
use cellpay_router::Action;
use serde_json::json;

use crate::auth::{Caller, Role};
use crate::body::{self, OpenAccountBody};
use crate::error::ApiError;
use crate::guard::Admitted;
use crate::headers::cell_headers;
use crate::oplog::Action as OperatorAction;
use crate::served::Served;
use crate::{views, AppState};

/// Set on a balance served from the cache while `balance_reads_stale` is on: its age in ms.
pub const STALE_MS: &str = "x-cellpay-stale-ms";

/// Entries returned when the request names no `limit`.
pub const ENTRIES_PAGE_DEFAULT: usize = 50;

pub async fn open(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
    Extension(caller): Extension<Caller>,
    Extension(by): Extension<Authority>,
    headers: HeaderMap,
    Admitted { shadow, .. }: Admitted,
    request: Body,
) -> Result<Response, ApiError> {
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let command = body::open_account(body::parse::<OpenAccountBody>(&bytes)?, shadow, &by)?;
    if matches!(&command.op, Op::OpenAccount(o) if o.overdraft) && role != Role::Admin {
        return Err(ApiError::new(ErrorCode::Forbidden, "opening an overdraft account needs the admin role"));
    }
    let cluster = state.cluster()?;
    let served = Served::from(cluster.submit_one(command).await)?;
    match &served.answer {
        Outcome::AccountOpened { account, created } => {
            if *created && role == Role::Admin {
                state.record(OperatorAction { caller, by: &by, action: "open_account", args: views::account(account) });
            }
            let status = if *created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(served.respond(status, views::account(account)))
        }
        Outcome::Rejected(r) => Err(served.reject(r)),
        other => unreachable!("opening an account answers AccountOpened or Rejected, not {other:?}"),
    }
}

pub async fn get(
    State(state): State<AppState>,
    Extension(by): Extension<Authority>,
    Path(id): Path<String>,
    Admitted { shadow, .. }: Admitted,
) -> Result<Response, ApiError> {
    let id = body::account_id("id", &id)?;
    let degrade = &state.cluster()?.protection().degrade;
    let stale = degrade.is_on(Action::BalanceReadsStale);
    if stale {
        // A cached view is served only to whom may read the account.
        let cached = state.stale.get(shadow, &id, degrade.stale_max()).filter(|(view, ..)| match &by {
            Authority::Admin => true,
            Authority::Tenant(t) => view["tenant"].as_str() == Some(t.as_str()),
        });
        if let Some((view, cell, epoch, age)) = cached {
            let mut response = (StatusCode::OK, axum::Json(view)).into_response();
            cell_headers(response.headers_mut(), cell, epoch);
            response.headers_mut().insert(STALE_MS, HeaderValue::from(age.as_millis() as u64));
            return Ok(response);
        }
    }
    let query = Query::Account { shadow, id: id.clone(), by };
    let served = Served::from(state.cluster()?.query_account(&id, query).await)?;
    match &served.answer {
        QueryAnswer::Account(a) => {
            if stale {
                state.stale.put(shadow, id.clone(), views::account(a), served.cell(), served.epoch());
            }
            Ok(served.respond(StatusCode::OK, views::account(a)))
        }
        QueryAnswer::Rejected(r) => Err(served.reject(r)),
        other => unreachable!("an account query answers Account or Rejected, not {other:?}"),
    }
}

/// `limit` (1..=1000, default 50) and `before` (an entry `seq`) from the query string.
fn page(raw: Option<&str>) -> Result<(usize, Option<u64>), ApiError> {
    let mut limit = ENTRIES_PAGE_DEFAULT;
    let mut before = None;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=ENTRIES_PAGE_MAX).contains(n))
                    .ok_or_else(|| ApiError::invalid(format!("limit must be between 1 and {ENTRIES_PAGE_MAX}")))?
            }
            "before" => before = Some(value.parse().map_err(|_| ApiError::invalid("before must be an entry seq"))?),
            other => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok((limit, before))
}

pub async fn entries(
    State(state): State<AppState>,
    Extension(by): Extension<Authority>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    Admitted { shadow, .. }: Admitted,
) -> Result<Response, ApiError> {
    let account = body::account_id("id", &id)?;
    let (limit, before) = page(raw.as_deref())?;
    let query = Query::Entries { shadow, account: account.clone(), limit, before, by };
    let served = Served::from(state.cluster()?.query_account(&account, query).await)?;
    match &served.answer {
        QueryAnswer::Entries(entries) => {
            let next_before = (entries.len() == limit).then(|| entries.last().map(|e| e.seq)).flatten();
            let body = json!({
                "entries": entries.iter().map(views::entry).collect::<Vec<_>>(),
                "next_before": next_before,
            });
            Ok(served.respond(StatusCode::OK, body))
        }
        QueryAnswer::Rejected(r) => Err(served.reject(r)),
        other => unreachable!("an entries query answers Entries or Rejected, not {other:?}"),
    }
}
