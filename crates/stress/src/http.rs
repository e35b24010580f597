//! The HTTP client of a stress run: pooled HTTP/1.1 connections to the target,
//! the bearer token and the shadow header on every request.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The longest a request may take before it counts as a `timeout` error (I7):
/// a run always ends, whatever the server does.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    auth: String,
    shadow: bool,
}

/// One answer: status, the serving cell from `X-Cellpay-Cell`, and the body.
pub struct Answer {
    pub status: u16,
    pub cell: Option<u32>,
    pub body: Bytes,
}

impl Answer {
    /// The contract's error code, or the status when the body has none.
    pub fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("http_{}", self.status))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Http {
    pub fn new(base: &str, token: &str, shadow: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        Self { client, base: base.trim_end_matches('/').to_string(), auth: format!("Bearer {token}"), shadow }
    }

    /// The same client with the shadow header on or off.
    pub fn with_shadow(&self, shadow: bool) -> Self {
        Self { shadow, ..self.clone() }
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<String>) -> Result<Answer, String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", &self.auth)
            .header("content-type", "application/json");
        if self.shadow {
            req = req.header("x-cellpay-shadow", "1");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| format!("{method} {path}: {e}"))?;
            let status = resp.status().as_u16();
            let cell = resp.headers().get("x-cellpay-cell").and_then(|v| v.to_str().ok()?.parse().ok());
            let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok(Answer { status, cell, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| TIMEOUT.to_string())?
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
