//! The HTTP client of a stress run: a pool of HTTP/1.1 connections to the
//! target, the bearer token and the shadow header on every request.
//!
//! The generator must cost little per request, or it decides the result
//! instead of measuring the server (BENCHMARKS.md, "The generator's own cost,
//! against wrk"). So the pool is hyper's connection-level client and a stack
//! of idle senders, nothing more: one request per connection at a time, and
//! the header values built once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;

/// The longest a request may take before it counts as a `timeout` error (I7):
/// a run always ends, whatever the server does.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections kept for reuse at most; more are closed when returned.
const IDLE_CONNECTIONS_MAX: usize = 4096;

/// One request as the load generators send it: a JSON body, the host and
/// bearer token headers built once by the caller, and the shadow header when
/// it acts on the shadow ledger.
pub fn request(
    method: hyper::Method,
    uri: hyper::Uri,
    host: &HeaderValue,
    auth: &HeaderValue,
    shadow: bool,
    body: Bytes,
) -> hyper::Request<Full<Bytes>> {
    let mut req = hyper::Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(HOST, host.clone());
    headers.insert(AUTHORIZATION, auth.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if shadow {
        headers.insert("x-cellpay-shadow", HeaderValue::from_static("1"));
    }
    req
}

#[derive(Clone)]
pub struct Http {
    /// `host:port`, to connect to.
    authority: Arc<str>,
    /// The base URL's path, put before every request's path (usually empty).
    prefix: Arc<str>,
    host: HeaderValue,
    auth: HeaderValue,
    shadow: bool,
    idle: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>>,
}

/// One answer: status, the serving cell from `X-Cellpay-Cell`, and the body.
pub struct Answer {
    pub status: u16,
    pub cell: Option<u32>,
    /// The shard map epoch the serving cell worked at (`X-Cellpay-Epoch`).
    pub epoch: Option<u64>,
    pub body: Bytes,
}

impl Answer {
    /// The contract's error code, or the status when the body has none.
    pub fn error_code(&self) -> String {
        #[derive(serde::Deserialize)]
        struct Refusal<'a> {
            #[serde(borrow)]
            error: Code<'a>,
        }
        #[derive(serde::Deserialize)]
        struct Code<'a> {
            #[serde(borrow)]
            code: std::borrow::Cow<'a, str>,
        }
        serde_json::from_slice::<Refusal<'_>>(&self.body)
            .map(|r| r.error.code.into_owned())
            .unwrap_or_else(|_| format!("http_{}", self.status))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Http {
    /// A client for `base` (`http://host:port`, optionally with a path prefix).
    pub fn new(base: &str, token: &str, shadow: bool) -> Self {
        let rest = base.trim_end_matches('/');
        let rest = rest.strip_prefix("http://").unwrap_or(rest);
        let (authority, prefix) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        // A token or host that is no header value fails every request with a clear error.
        let header = |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Self {
            authority: authority.into(),
            prefix: prefix.into(),
            host: header(authority),
            auth: header(&format!("Bearer {token}")),
            shadow,
            idle: Arc::default(),
        }
    }

    /// The same client (and pool) with the shadow header on or off.
    pub fn with_shadow(&self, shadow: bool) -> Self {
        Self { shadow, ..self.clone() }
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<String>) -> Result<Answer, String> {
        let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let body = Bytes::from(body.unwrap_or_default());
        let exchange = async {
            let (mut sender, reused) = self.checkout().await.map_err(|e| format!("{method} {path}: {e}"))?;
            let mut answer = self.exchange(&mut sender, &method, path, body.clone()).await;
            // A kept connection the server closed meanwhile (its idle timeout)
            // fails before any answer: once more on a fresh one (every
            // request of a run is idempotent: transfer ids, or reads).
            if reused && matches!(&answer, Err(e) if e.is_canceled() || e.is_incomplete_message() || e.is_closed()) {
                sender = self.connect().await.map_err(|e| format!("{method} {path}: {e}"))?;
                answer = self.exchange(&mut sender, &method, path, body).await;
            }
            let answer = answer.map_err(|e| format!("{method} {path}: {e}"))?;
            self.checkin(sender);
            Ok(answer)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| TIMEOUT.to_string())?
    }

    async fn exchange(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        method: &hyper::Method,
        path: &str,
        body: Bytes,
    ) -> hyper::Result<Answer> {
        let uri = if self.prefix.is_empty() { path.to_string() } else { format!("{}{path}", self.prefix) };
        let uri = uri.parse().unwrap_or_else(|_| hyper::Uri::from_static("/"));
        let req = request(method.clone(), uri, &self.host, &self.auth, self.shadow, body);
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let cell = resp.headers().get("x-cellpay-cell").and_then(|v| v.to_str().ok()?.parse().ok());
        let epoch = resp.headers().get("x-cellpay-epoch").and_then(|v| v.to_str().ok()?.parse().ok());
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer { status, cell, epoch, body })
    }

    /// An idle connection that is still open, or a new one; and whether it was kept.
    async fn checkout(&self) -> std::io::Result<(SendRequest<Full<Bytes>>, bool)> {
        loop {
            let kept = self.idle.lock().expect("idle lock").pop();
            match kept {
                Some(sender) if sender.is_ready() => return Ok((sender, true)),
                Some(_) => continue, // closed by the server, or broken: drop it
                None => return Ok((self.connect().await?, false)),
            }
        }
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().expect("idle lock");
        if idle.len() < IDLE_CONNECTIONS_MAX {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> std::io::Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(&*self.authority).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// The error text of a request that ran out of time.
pub const TIMEOUT: &str = "timeout";

impl Http {
    /// Whether an error from `send` was a timeout.
    pub fn is_timeout(error: &str) -> bool {
        error == TIMEOUT
    }
}
