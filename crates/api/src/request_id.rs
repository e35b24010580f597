//! Request ids, and the one log line per request.
//!
//! Every request gets an id: the client's `X-Request-Id` when it is sane (1 to
//! [`REQUEST_ID_BYTES_MAX`] characters of `[A-Za-z0-9._:-]`, so it can neither
//! forge a log line nor a header), else one made here. The id is echoed in
//! the response's `X-Request-Id` and is a field of the request's tracing
//! span, so every log line written while serving it (router, protection,
//! handlers) carries it and one payment can be followed through the logs.
//!
//! Logging costs CPU on the payment path, so the line that says how a request
//! was answered is written for every 5xx and abandoned request (WARN), and for
//! one in [`REQUEST_LOG_SAMPLE_EVERY`] of the rest (INFO). Under overload the
//! server answers thousands of 503s a second by design; past
//! [`REQUEST_WARN_LINES_PER_S_MAX`] WARN lines in a second the rest are only
//! counted, and the next line written says how many were left out.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header a client may send and every answer carries.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id taken from a client.
pub const REQUEST_ID_BYTES_MAX: usize = 64;

/// One answered request in this many gets an INFO line (5xx and abandoned ones always get a WARN line).
pub const REQUEST_LOG_SAMPLE_EVERY: u64 = 1024;

/// WARN request lines written per second at most; the rest are counted in `suppressed`.
pub const REQUEST_WARN_LINES_PER_S_MAX: u64 = 100;

/// May a WARN request line be written now? Answers how many were left out
/// before it, or `None` when this one is left out too.
pub(crate) fn warn_line_allowed() -> Option<u64> {
    static START: OnceLock<Instant> = OnceLock::new();
    static SECOND: AtomicU64 = AtomicU64::new(0);
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let second = START.get_or_init(Instant::now).elapsed().as_secs();
    // A racing reset at a second's turn lets a few more lines through: harmless.
    if SECOND.swap(second, Relaxed) != second {
        WRITTEN.store(0, Relaxed);
    }
    if WRITTEN.fetch_add(1, Relaxed) < REQUEST_WARN_LINES_PER_S_MAX {
        Some(SUPPRESSED.swap(0, Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Relaxed);
        None
    }
}

/// The id of the request being served, in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("a request id is ASCII by construction")
    }
}

/// A client's id, if it is one we take.
pub fn sane(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=REQUEST_ID_BYTES_MAX).contains(&bytes.len())
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A fresh id: 16 hex digits, unique in this process (a counter through a
/// bijective mix) and unlikely to repeat across processes (a per-process seed).
pub(crate) fn generate() -> HeaderValue {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
    });
    let id = mix(seed.wrapping_add(NEXT.fetch_add(1, Relaxed)));
    HeaderValue::from_str(&format!("{id:016x}")).expect("hex digits are a valid header value")
}

/// splitmix64's finalizer: a bijection, so distinct counters give distinct ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Middleware, outermost: gives the request its id and span, echoes the id,
/// and writes the request's log line (always on 5xx, sampled otherwise).
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = match request.headers().get(&X_REQUEST_ID) {
        Some(v) if sane(v) => v.clone(),
        _ => generate(),
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    // At WARN, so the span is there whenever a WARN line about the request is
    // written (an INFO span is off under RUST_LOG=warn, and its lines would lose the id).
    let span = tracing::warn_span!("request", id = %id.to_str().unwrap_or_default(), method = %request.method(), route = %route);
    let mut line = RequestLine { span: span.clone(), started: Instant::now(), status: None };
    let mut response = next.run(request).instrument(span).await;
    line.status = Some(response.status().as_u16());
    response.headers_mut().insert(X_REQUEST_ID.clone(), id);
    response
}

/// The log line of one request, written when it is answered or dropped.
struct RequestLine {
    span: tracing::Span,
    started: Instant,
    /// None until answered: a request dropped unanswered was abandoned by its client.
    status: Option<u16>,
}

impl Drop for RequestLine {
    fn drop(&mut self) {
        static ANSWERED: AtomicU64 = AtomicU64::new(0);
        let _entered = self.span.enter();
        let latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        match self.status {
            Some(status) if status >= 500 => {
                if let Some(suppressed) = warn_line_allowed() {
                    tracing::warn!(status, latency_ms, suppressed, "request answered with a server error");
                }
            }
            None => {
                if let Some(suppressed) = warn_line_allowed() {
                    tracing::warn!(latency_ms, suppressed, "request abandoned by its client before the answer");
                }
            }
            Some(status) => {
                if ANSWERED.fetch_add(1, Relaxed).is_multiple_of(REQUEST_LOG_SAMPLE_EVERY) {
                    tracing::info!(status, latency_ms, sampled_one_in = REQUEST_LOG_SAMPLE_EVERY, "request answered");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_ids_are_taken_from_clients() {
        for ok in ["a", "req-1", "0f8e:12.ab_C", &"x".repeat(REQUEST_ID_BYTES_MAX)] {
            assert!(sane(&HeaderValue::from_str(ok).unwrap()), "{ok}");
        }
        for bad in ["", "a b", "a\tb", "x\"y", "ü", "a/b", "{id}", &"x".repeat(REQUEST_ID_BYTES_MAX + 1)] {
            let Ok(v) = HeaderValue::from_bytes(bad.as_bytes()) else { continue };
            assert!(!sane(&v), "{bad:?}");
        }
    }

    #[test]
    fn warn_lines_are_capped_per_second_and_the_next_one_counts_the_rest() {
        let allowed = (0..REQUEST_WARN_LINES_PER_S_MAX * 3).filter(|_| warn_line_allowed().is_some()).count() as u64;
        // Unless the second turned meanwhile, exactly the cap got through.
        assert!((REQUEST_WARN_LINES_PER_S_MAX..=REQUEST_WARN_LINES_PER_S_MAX * 2).contains(&allowed), "{allowed}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let suppressed = warn_line_allowed().expect("a new second writes again");
        assert_eq!(
            suppressed,
            REQUEST_WARN_LINES_PER_S_MAX * 3 - allowed,
            "the first line of the second counts what was left out"
        );
    }

    #[test]
    fn generated_ids_are_distinct_and_sane() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| sane(id) && id.len() == 16));
    }
}
