//! The front door: serving each accepted connection with hyper-util's server
//! builder, under timeouts, so that a client that sends nothing, or sends
//! slowly, cannot hold a connection (and so the door) for long.
//!
//! `axum::serve` sets no timeout at all: a socket that never finishes its
//! request head stays open forever, and 4,096 of them lock every payment
//! out. Here every phase of a connection has a clock:
//!
//! | phase | clock | who enforces it |
//! |---|---|---|
//! | nothing sent yet, or a half-sent first head | `header_read_timeout_ms` | the watchdog below (hyper-util's version detection has no timer) and hyper's HTTP/1 header timer |
//! | a later HTTP/1 head (also the wait for it on a kept-alive connection) | `header_read_timeout_ms` | hyper's HTTP/1 header timer |
//! | a body | `body_read_timeout_ms`, `body_rate_bytes_per_s_min` after `body_rate_grace_ms` | [`crate::intake`] (answers 408) |
//! | kept alive with no request in flight | `keep_alive_idle_timeout_ms` | the watchdog below (HTTP/1 and HTTP/2) |
//!
//! The connection cap, the per-address cap and who is closed to make room at
//! the cap live in [`crate::listener`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service;

use crate::listener::{AddressRange, Admit, ConnectionTable, Placed};

/// The front door's limits and timeouts; `Default` is the one place their
/// defaults are written (`cellpay serve` takes each from a flag, an
/// environment variable or its config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontLimits {
    /// Most open client connections; at the cap the longest-idle connection
    /// that has not completed an authenticated request is closed to make room.
    pub connections_max: usize,
    /// Most open connections from one client address (exempt ranges aside).
    pub connections_per_address_max: usize,
    /// Addresses the per-address cap does not apply to: loopback (load
    /// generators, drills, `bench http`) and trusted proxies.
    pub connections_per_address_exempt: Vec<AddressRange>,
    /// Time to send a whole request head; a fresh connection that sends
    /// nothing is closed after it too.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight is closed after this long.
    pub keep_alive_idle_timeout_ms: u64,
    /// Time to send a whole request body, whatever its pace.
    pub body_read_timeout_ms: u64,
    /// After this long, a body must keep up `body_rate_bytes_per_s_min`.
    pub body_rate_grace_ms: u64,
    /// The slowest average pace a body may arrive at once the grace is over.
    pub body_rate_bytes_per_s_min: u64,
    /// Request body bytes being read or held by requests in flight, across
    /// all connections; past it, 503 `overloaded`.
    pub body_bytes_in_flight_max: usize,
    /// Longest request target (path and query); beyond it, 414.
    pub uri_bytes_max: usize,
    /// Largest request head (request line and headers); beyond it, 431.
    pub header_bytes_max: usize,
}

impl Default for FrontLimits {
    fn default() -> Self {
        Self {
            connections_max: 4096,
            connections_per_address_max: 256,
            connections_per_address_exempt: AddressRange::loopback(),
            header_read_timeout_ms: 10_000,
            keep_alive_idle_timeout_ms: 60_000,
            body_read_timeout_ms: 30_000,
            body_rate_grace_ms: 2_000,
            body_rate_bytes_per_s_min: 8_192,
            body_bytes_in_flight_max: 256 << 20,
            uri_bytes_max: 8 << 10,
            header_bytes_max: 32 << 10,
        }
    }
}

impl FrontLimits {
    /// Whether the limits make sense together; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("connections_max", self.connections_max as u64),
            ("connections_per_address_max", self.connections_per_address_max as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("keep_alive_idle_timeout_ms", self.keep_alive_idle_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("body_rate_bytes_per_s_min", self.body_rate_bytes_per_s_min),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.uri_bytes_max < 256 || self.header_bytes_max < 1024 || self.uri_bytes_max > self.header_bytes_max {
            return Err("need 256 <= uri_bytes_max <= header_bytes_max and header_bytes_max >= 1024".into());
        }
        if self.header_bytes_max > HEAD_BYTES_HARD_MAX / 2 {
            return Err(format!("header_bytes_max must be at most {}", HEAD_BYTES_HARD_MAX / 2));
        }
        Ok(())
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn keep_alive_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.keep_alive_idle_timeout_ms)
    }

    /// hyper's own cap on a request head: twice ours, so that every head
    /// between the two gets our JSON 431 (see [`crate::contract`]).
    fn head_bytes_hard(&self) -> usize {
        (self.header_bytes_max * 2).max(HYPER_BUF_BYTES_MIN)
    }
}

/// The most a request head may ever be buffered; hyper's ceiling for ours.
pub const HEAD_BYTES_HARD_MAX: usize = 1 << 20;
/// hyper refuses an HTTP/1 read buffer smaller than this.
const HYPER_BUF_BYTES_MIN: usize = 8192;
/// Headers hyper parses at most in one HTTP/1 head; beyond it hyper answers a
/// bare 431 itself, so it is set far above what [`crate::contract`] allows.
pub const HEADERS_HARD_MAX: usize = 1024;

/// One HTTP/1 + HTTP/2 server builder with every timer and cap set.
fn builder(limits: &FrontLimits) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(limits.head_bytes_hard())
        .max_headers(HEADERS_HARD_MAX)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.head_bytes_hard() as u32)
        // Pings find peers that vanished; the idle watchdog closes quiet ones.
        .keep_alive_interval(limits.keep_alive_idle_timeout())
        .keep_alive_timeout(limits.header_read_timeout());
    b
}

/// Accepts and serves connections until `stop` turns true, then stops
/// accepting, lets every connection finish its requests in flight, and returns.
pub async fn serve(
    tcp: TcpListener,
    app: Router,
    state: crate::AppState,
    limits: FrontLimits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let table = Arc::new(ConnectionTable::new(&limits));
    let builder = Arc::new(builder(&limits));
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // Out of descriptors, or reset before accept: wait a little, go on.
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Some(placed) = admit(&table, peer, &mut stop).await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = (app.clone(), state.clone());
        tokio::spawn(connection(stream, placed, app, builder.clone(), limits.clone(), stop.clone()));
    }
    table.wait_empty().await;
    Ok(())
}

/// The pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A place in the table for a connection from `peer`: at the cap, closes one
/// connection that never authenticated and waits for its place. `None`: the
/// connection is refused (per-address cap) or the server is stopping.
async fn admit(table: &Arc<ConnectionTable>, peer: SocketAddr, stop: &mut watch::Receiver<bool>) -> Option<Placed> {
    loop {
        let freed = table.freed();
        match table.try_admit(peer.ip()) {
            Admit::Open(conn) => return Some(conn),
            Admit::AddressFull => {
                metrics::counter!("cellpay_connections_refused_total", "reason" => "per_address").increment(1);
                tracing::debug!(%peer, "refused: this address holds its share of connections");
                return None;
            }
            Admit::Full => {
                if !table.evict_one() && !table.evicting() {
                    // Every open connection has authenticated: wait for one to close,
                    // as the kernel's backlog would.
                    metrics::counter!("cellpay_connections_waited_total").increment(1);
                }
            }
        }
        tokio::select! {
            _ = freed => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// Serves one connection until it ends, is evicted, idles past its
/// timeouts, or the server stops (then gracefully: requests in flight finish).
async fn connection(
    stream: TcpStream,
    placed: Placed,
    (app, state): (Router, crate::AppState),
    builder: Arc<Builder<TokioExecutor>>,
    limits: FrontLimits,
    mut stop: watch::Receiver<bool>,
) {
    let conn = placed.conn().clone();
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (mut app, conn, state) = (app.clone(), conn.clone(), state.clone());
            async move {
                let _busy = conn.request_started();
                let arrived = std::time::Instant::now();
                if let Some(refused) = crate::gate::check(&state, &request, arrived) {
                    return Ok(refused);
                }
                let _passed = state.gate.pass();
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(conn.clone());
                request.extensions_mut().insert(crate::gate::Arrival(arrived));
                let response: Result<Response, Infallible> = app.call(request).await;
                response
            }
        })
    };
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let mut stopping = false;
    loop {
        let idle_check = conn.next_idle_check(limits.header_read_timeout(), limits.keep_alive_idle_timeout());
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                break;
            }
            _ = conn.evicted() => {
                metrics::counter!("cellpay_connections_closed_total", "reason" => "evicted").increment(1);
                break;
            }
            _ = tokio::time::sleep_until(idle_check.into()) => {
                if let Some(reason) = conn.idle_past(limits.header_read_timeout(), limits.keep_alive_idle_timeout()) {
                    metrics::counter!("cellpay_connections_closed_total", "reason" => reason).increment(1);
                    break;
                }
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                served.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}
