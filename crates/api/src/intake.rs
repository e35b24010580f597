//! Request bodies are read before a request takes an edge permit, at a
//! minimum pace, and within one budget of body bytes for the whole process.
//!
//! The edge concurrency limit (layer 0) measures how long admitted work
//! takes, and learns from it. When the permit was taken before the body was
//! read, 512 half-sent `POST /v1/transfers` bodies held every permit (every
//! payment answered 503), and each slow body that finished taught the limit
//! that the server was slow: it fell from 512 to its floor and stayed there.
//! Reading first means a permit is held only for our own work, so the time a
//! client spends sending never reaches the limit. Bodies being read are
//! bounded instead by their pace ([`crate::body::Pace`], 408 when too slow)
//! and by `body_bytes_in_flight_max` (503 `overloaded` when spent): 4,096
//! connections each sending 4 MiB would otherwise hold 16 GiB.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cellpay_core::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::{self, Pace};
use crate::error::ApiError;
use crate::AppState;

/// The budget is counted in grains of this many bytes (a semaphore permit each).
pub const BUDGET_GRAIN_BYTES: u64 = 4096;

/// Body bytes being read or held by requests in flight, across connections.
pub struct BodyBudget {
    grains: Arc<Semaphore>,
    bytes_max: u64,
}

impl BodyBudget {
    pub fn new(bytes_max: usize) -> Self {
        let grains = (bytes_max as u64).div_ceil(BUDGET_GRAIN_BYTES).min(Semaphore::MAX_PERMITS as u64);
        Self { grains: Arc::new(Semaphore::new(grains as usize)), bytes_max: bytes_max as u64 }
    }

    /// Bytes of the budget in use now.
    pub fn bytes_in_use(&self) -> u64 {
        let total = self.bytes_max.div_ceil(BUDGET_GRAIN_BYTES);
        (total - self.grains.available_permits() as u64) * BUDGET_GRAIN_BYTES
    }
}

/// The part of the budget one request holds; given back when dropped.
struct Held<'a> {
    budget: &'a BodyBudget,
    permit: Option<OwnedSemaphorePermit>,
}

impl Held<'_> {
    /// Holds at least `bytes`, or refuses with 503 `overloaded`.
    fn grow_to(&mut self, bytes: u64) -> Result<(), ApiError> {
        let want = bytes.div_ceil(BUDGET_GRAIN_BYTES) as usize;
        let have = self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if want <= have {
            return Ok(());
        }
        let more = (want - have) as u32;
        let Ok(more) = self.budget.grains.clone().try_acquire_many_owned(more) else {
            metrics::counter!("cellpay_body_budget_refused_total").increment(1);
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "the server is reading {} bytes of request bodies, its limit (body_bytes_in_flight_max); retry later",
                    self.budget.bytes_in_use()
                ),
            ));
        };
        match &mut self.permit {
            Some(permit) => permit.merge(more),
            None => self.permit = Some(more),
        }
        Ok(())
    }
}

/// Middleware for `/v1`, after auth and before the edge permit: reads the
/// whole body at its pace within the budget, and hands the handler a body
/// already in memory. The budget is held until the response is ready.
pub async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (mut parts, incoming) = request.into_parts();
    let mut held = Held { budget: &state.intake.budget, permit: None };
    let pace = state.intake.pace;
    let reading = std::time::Instant::now();
    let read =
        body::read_paced(&parts.headers, incoming, state.limits.body_bytes_max, &pace, |n| held.grow_to(n)).await;
    parts.extensions.insert(BodyRead(reading.elapsed()));
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) => {
            if e.status == Some(axum::http::StatusCode::REQUEST_TIMEOUT) {
                metrics::counter!("cellpay_body_timeouts_total").increment(1);
            }
            return e.into_response();
        }
    };
    let response = next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await;
    drop(held);
    response
}

/// How long the intake waited for a request's body: its client's time, which
/// the front's signals leave out.
#[derive(Debug, Clone, Copy)]
pub struct BodyRead(pub std::time::Duration);

/// What the intake needs: the pace bodies must keep and the shared budget.
pub struct Intake {
    pub pace: Pace,
    pub budget: BodyBudget,
}

impl Intake {
    pub fn new(limits: &crate::front::FrontLimits) -> Self {
        use std::time::Duration;
        Self {
            pace: Pace {
                read_timeout: Duration::from_millis(limits.body_read_timeout_ms),
                rate_grace: Duration::from_millis(limits.body_rate_grace_ms),
                rate_bytes_per_s_min: limits.body_rate_bytes_per_s_min,
            },
            budget: BodyBudget::new(limits.body_bytes_in_flight_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_limit_and_comes_back() {
        let budget = BodyBudget::new(64 << 10);
        let mut a = Held { budget: &budget, permit: None };
        a.grow_to(1).unwrap();
        a.grow_to(40 << 10).unwrap();
        let mut b = Held { budget: &budget, permit: None };
        let e = b.grow_to(30 << 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::Overloaded);
        b.grow_to(24 << 10).unwrap();
        assert_eq!(budget.bytes_in_use(), 64 << 10);
        drop(a);
        assert_eq!(budget.bytes_in_use(), 24 << 10);
        drop(b);
        assert_eq!(budget.bytes_in_use(), 0);
    }
}
