//! A cell process's side of the protocol: HTTP/2 (cleartext, prior
//! knowledge) on its own port, every call authenticated by the cluster
//! secret, bodies in the binary codec.
//!
//! | call | request body | answer body |
//! |---|---|---|
//! | `POST /cell/v1/submit` | commands | outcomes, or the engine's refusal |
//! | `POST /cell/v1/query` | a query | its answer, or the engine's refusal |
//! | `GET /cell/v1/status` | none | status, figures, outbox generation |
//! | `PUT /cell/v1/outbox-limit` | a little-endian u64 | none |
//! | `GET /cell/v1/map` | none | the shard map the cell works at |
//!
//! Every request carries `x-cellpay-protocol` (the version its body is
//! written in) and may carry `x-request-id`, which the cell's logs show,
//! `x-cellpay-cell`, the cell the caller means to reach (a process that runs
//! another cell answers 421: an address gone stale reaches nobody's money),
//! and `x-cellpay-epoch`, the epoch of the shard map its sender works at. A
//! cell behind that epoch refuses the submit or query `wrong_cell` (it acts
//! on no older map than its sender's) and wakes its catch-up.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use cellpay_cell::CellClient;
use cellpay_core::{Outcome, QueryAnswer, Rejection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tower_service::Service;

use crate::codec::{self, StatusReport};
use crate::secret::ClusterSecret;

/// The largest request body a cell accepts (I7): a submit of the engine's
/// largest batch with the longest ids and memos fits well inside.
pub const BODY_BYTES_MAX: usize = 16 << 20;
const _: () = assert!(cellpay_cell::EXPORT_BYTES_MAX < BODY_BYTES_MAX, "an export must fit in one install's body");
/// Most open connections to one cell process (I7). Routers and relays keep
/// one each; the rest is room for restarts.
pub const CONNECTIONS_MAX: usize = 1024;
/// Pings on an idle connection every this long; a peer that does not answer
/// one within [`KEEP_ALIVE_TIMEOUT`] is dropped, so a vanished router holds
/// nothing.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a new connection has to complete its first request before it is
/// closed: an idle or unauthenticated socket cannot hold a slot for long.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub const PROTOCOL_HEADER: &str = "x-cellpay-protocol";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const CELL_HEADER: &str = "x-cellpay-cell";
pub const EPOCH_HEADER: &str = "x-cellpay-epoch";

#[derive(Clone)]
struct Served {
    cell: Arc<dyn CellClient>,
    secret: ClusterSecret,
    /// Notified when a caller works at a newer map than the cell's.
    behind: Arc<Notify>,
}

/// The routes of the protocol for `cell`; `behind` is notified whenever a
/// caller shows a newer shard map epoch than the cell works at.
pub fn app(cell: Arc<dyn CellClient>, secret: ClusterSecret, behind: Arc<Notify>) -> Router {
    Router::new()
        .route("/cell/v1/submit", post(submit))
        .route("/cell/v1/query", post(query))
        .route("/cell/v1/status", get(status))
        .route("/cell/v1/outbox-limit", put(outbox_limit))
        .route("/cell/v1/map", get(map))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(Served { cell, secret, behind })
}

/// Why a call was refused before it reached the cell.
fn refuse(status: StatusCode, why: &str) -> Response {
    (status, why.to_string()).into_response()
}

/// Checks the secret and the protocol version; `Some` is the refusal to send.
fn refusal(served: &Served, headers: &HeaderMap) -> Option<Response> {
    let offered = headers.get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
    if !offered.is_some_and(|o| served.secret.matches_header(o)) {
        return Some(refuse(StatusCode::UNAUTHORIZED, "the cluster secret is missing or wrong"));
    }
    let meant = headers.get(CELL_HEADER).and_then(|v| v.to_str().ok());
    if let Some(meant) = meant.filter(|m| *m != served.cell.cell().0.to_string()) {
        return Some(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            &format!("this process runs cell {}, not cell {meant}", served.cell.cell()),
        ));
    }
    let version = headers.get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u8>().ok());
    match version {
        Some(v) if (codec::PROTOCOL_VERSION_MIN..=codec::PROTOCOL_VERSION).contains(&v) => None,
        other => Some(refuse(
            StatusCode::BAD_REQUEST,
            &format!(
                "protocol version {other:?} is not spoken here (this cell reads {} to {})",
                codec::PROTOCOL_VERSION_MIN,
                codec::PROTOCOL_VERSION
            ),
        )),
    }
}

fn request_id(headers: &HeaderMap) -> &str {
    headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// The refusal of a caller whose shard map is newer than the cell's, if it is.
fn behind(served: &Served, headers: &HeaderMap) -> Option<Rejection> {
    let sender = headers.get(EPOCH_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())?;
    // Epoch 0: no engine runs (maps start at 1); the call is answered `cell_unavailable` as it is.
    let mine = served.cell.status().epoch;
    if mine == 0 {
        return None;
    }
    let refused = cellpay_cell::behind_refusal(served.cell.cell(), mine, sender)?;
    served.behind.notify_one();
    Some(refused)
}

fn binary(body: Vec<u8>) -> Response {
    let version = body.first().copied().unwrap_or(1).to_string();
    ([(PROTOCOL_HEADER, version)], body).into_response()
}

async fn submit(State(served): State<Served>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&served, &headers) {
        return refused;
    }
    let commands = match codec::decode_commands(&body) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(request_id = request_id(&headers), "refused a submit: {e}");
            return refuse(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let n = commands.len();
    if let Some(refused) = behind(&served, &headers) {
        tracing::info!(request_id = request_id(&headers), commands = n, "submit refused: {}", refused.message);
        return binary(codec::encode_outcomes(&Ok(vec![Outcome::Rejected(refused); n])));
    }
    let result = served.cell.submit(commands).await;
    if let Err(e) = &result {
        tracing::debug!(request_id = request_id(&headers), commands = n, "submit refused: {e}");
    }
    binary(codec::encode_outcomes(&result))
}

async fn query(State(served): State<Served>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&served, &headers) {
        return refused;
    }
    let query = match codec::decode_query(&body) {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(request_id = request_id(&headers), "refused a query: {e}");
            return refuse(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    if let Some(refused) = behind(&served, &headers) {
        return binary(codec::encode_answer(&Ok(QueryAnswer::Rejected(refused))));
    }
    binary(codec::encode_answer(&served.cell.query(query).await))
}

async fn map(State(served): State<Served>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&served, &headers) {
        return refused;
    }
    match served.cell.shard_map().await {
        Some(map) => binary(codec::encode_map(&map)),
        None => refuse(StatusCode::SERVICE_UNAVAILABLE, "the cell's engine is not running"),
    }
}

async fn status(State(served): State<Served>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&served, &headers) {
        return refused;
    }
    let report = StatusReport {
        status: served.cell.status(),
        figures: (*served.cell.figures()).clone(),
        outbox_generation: *served.cell.outbox_signal().borrow(),
    };
    binary(codec::encode_status(&report))
}

async fn outbox_limit(State(served): State<Served>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&served, &headers) {
        return refused;
    }
    let Ok(bytes) = <[u8; 8]>::try_from(&body[..]) else {
        return refuse(StatusCode::BAD_REQUEST, "the outbox limit is 8 bytes, little-endian");
    };
    let max = u64::from_le_bytes(bytes);
    if max == 0 {
        return refuse(StatusCode::BAD_REQUEST, "the outbox limit must be at least 1");
    }
    served.cell.set_outbox_messages_max(max);
    StatusCode::NO_CONTENT.into_response()
}

/// Serves `app` on `tcp` over HTTP/2 only, until `stop` turns true: at most
/// [`CONNECTIONS_MAX`] connections, each pinged while idle and dropped when
/// its peer is gone.
pub async fn serve(tcp: TcpListener, app: Router, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .adaptive_window(true)
        .max_concurrent_streams(1024);
    let builder = Arc::new(builder);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("cell protocol accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "cell protocol connection refused: {CONNECTIONS_MAX} connections open");
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (builder, app, mut stop) = (builder.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let first = Arc::new(tokio::sync::Notify::new());
            let service = {
                let first = first.clone();
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    first.notify_one();
                    let mut app = app.clone();
                    async move { app.call(Request::from(req.map(axum::body::Body::new))).await }
                })
            };
            let conn = builder.serve_connection(TokioIo::new(socket), service);
            tokio::pin!(conn);
            let deadline = tokio::time::sleep(FIRST_REQUEST_TIMEOUT);
            tokio::pin!(deadline);
            let mut waiting_first = true;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = first.notified(), if waiting_first => waiting_first = false,
                    _ = &mut deadline, if waiting_first => return,
                    _ = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                        return;
                    }
                }
            }
        });
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
