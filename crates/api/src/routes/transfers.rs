//! `POST /v1/transfers`, `POST /v1/transfers/batch`, `GET /v1/transfers/{id}`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cellpay_core::{AccountId, Authority, ErrorCode, Op, Outcome, QueryAnswer, Rejection};
use serde_json::{json, Value};

use crate::body::{self, TransferBody};
use crate::error::ApiError;
use crate::guard::{self, Admitted, Classified};
use crate::oplog::Action;
use crate::served::Served;
use crate::{views, AppState, Caller};

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(by): Extension<Authority>,
    headers: HeaderMap,
    Admitted { shadow, class }: Admitted,
    request: Body,
) -> Result<Response, ApiError> {
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let command = body::transfer(body::parse::<TransferBody>(&bytes)?, shadow, &by)?;
    if let Op::Transfer(t) = &command.op {
        guard::admit_payment(&state, class, shadow, &t.from, &t.to)?;
    }
    let served = Served::from(state.cluster()?.submit_one(command).await)?;
    match &served.answer {
        Outcome::Transferred { transfer, created, minted, .. } => {
            if *created && *minted {
                state.record(Action { caller, by: &by, action: "transfer", args: views::transfer(transfer) });
            }
            let status = if *created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(served.respond(status, views::transfer(transfer)))
        }
        Outcome::Rejected(r) => Err(served.reject(r)),
        other => unreachable!("a transfer answers Transferred or Rejected, not {other:?}"),
    }
}

pub async fn batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(by): Extension<Authority>,
    headers: HeaderMap,
    classified: Classified,
    request: Body,
) -> Result<Response, ApiError> {
    let shadow = classified.shadow;
    let bytes = body::read(&headers, request, state.limits.body_bytes_max).await?;
    let parsed = body::parse_batch(&bytes)?;
    let max = state.limits.batch_items_max;
    if parsed.transfers.len() > max {
        let msg = format!("a batch holds at most {max} transfers, got {}", parsed.transfers.len());
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, msg));
    }
    if parsed.transfers.is_empty() {
        return Err(ApiError::invalid("a batch holds at least one transfer"));
    }
    // Admitted here, not by an `Admitted` argument: a batch costs a unit per
    // transfer, known only now, and one refused as malformed costs nothing.
    let Admitted { class, .. } = classified.admit(&state, parsed.transfers.len() as u32)?;
    let cluster = state.cluster()?;
    let mut results: Vec<BatchResult> = Vec::with_capacity(parsed.transfers.len());
    let mut commands = Vec::with_capacity(parsed.transfers.len());
    let mut positions = Vec::with_capacity(parsed.transfers.len());
    for raw in &parsed.transfers {
        let item = body::batch_item(raw, shadow, &by).and_then(|(id, cmd)| match &cmd.op {
            Op::Transfer(t) => guard::admit_payment(&state, class, shadow, &t.from, &t.to).map(|()| (id, cmd)),
            _ => Ok((id, cmd)),
        });
        match item {
            Ok((id, cmd)) => {
                positions.push((results.len(), id));
                commands.push(cmd);
                results.push(BatchResult::Waiting);
            }
            Err(e) => results.push(BatchResult::Error { error: e, id: body::batch_item_id(raw) }),
        }
    }
    let answers = cluster.submit_transfers(commands).await;
    let mut minted_here = Vec::new();
    for ((position, id), routed) in positions.into_iter().zip(answers) {
        results[position] = match routed.result {
            Ok(Outcome::Transferred { transfer, created, minted, .. }) => {
                if created && minted {
                    minted_here.push(views::transfer(&transfer));
                }
                BatchResult::Done { id, status: transfer.status.as_str() }
            }
            Ok(Outcome::Rejected(r)) => BatchResult::Error { error: ApiError::from(r), id: id.into() },
            Ok(other) => unreachable!("a transfer answers Transferred or Rejected, not {other:?}"),
            Err(e) => BatchResult::Error { error: ApiError::from(e), id: id.into() },
        };
    }
    if !minted_here.is_empty() {
        state.record(Action { caller, by: &by, action: "transfer_batch", args: json!({"transfers": minted_here}) });
    }
    Ok(Json(BatchAnswer { results }).into_response())
}

/// A batch's answer, serialised straight from these types (no `Value` tree
/// per item): the same bytes as before, keys in the same (sorted) order.
#[derive(serde::Serialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum BatchResult {
    /// Sent to its cell; replaced by its answer before the batch answers.
    Waiting,
    Done {
        id: String,
        status: &'static str,
    },
    Error {
        #[serde(serialize_with = "error_body")]
        error: ApiError,
        id: Value,
    },
}

fn error_body<S: serde::Serializer>(e: &ApiError, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&e.typed_body(), s)
}

/// The payer named by `?from=` (a transfer id is unique per payer).
fn payer(raw: Option<&str>) -> Result<Option<AccountId>, ApiError> {
    let mut from = None;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("from", value) => from = Some(body::account_id("from", value)?),
            (other, _) => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok(from)
}

/// `GET /v1/transfers/{id}?from=PAYER`: with the payer, one cell answers;
/// without it every cell is asked, and several payers' transfers with this
/// id answer 409 naming how many.
pub async fn status(
    State(state): State<AppState>,
    Extension(by): Extension<Authority>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    Admitted { shadow, .. }: Admitted,
) -> Result<Response, ApiError> {
    let id = body::transfer_id(&id)?;
    let from = payer(raw.as_deref())?;
    let served = Served::from(state.cluster()?.transfer_status(shadow, &id, from.as_ref(), &by).await)?;
    match &served.answer {
        QueryAnswer::Transfers(found) => match found.as_slice() {
            [] => Err(served.reject(&Rejection::new(ErrorCode::TransferNotFound, format!("transfer {id} not found")))),
            [t] => Ok(served.respond(StatusCode::OK, views::transfer(t))),
            several => {
                let msg =
                    format!("{} transfers have id {id}, one per payer: name the payer with ?from=", several.len());
                Err(served.reject(&Rejection::new(ErrorCode::Conflict, msg)))
            }
        },
        QueryAnswer::Rejected(r) => Err(served.reject(r)),
        other => unreachable!("a transfer query answers Transfers or Rejected, not {other:?}"),
    }
}
