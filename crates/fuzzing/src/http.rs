//! The HTTP bodies: the input is a request body, parsed as each route that
//! takes a JSON body parses it, and validated into commands where the route
//! does that without a cell. Every body is answered: a value or an `ApiError`
//! that maps to a 4xx, never a panic.

use cellpay_api::body::{self, OpenAccountBody, SwitchBody, TransferBody};
use cellpay_api::ApiLimits;
use cellpay_core::{Authority, TenantId};
use cellpay_router::{FlowRules, Plan};

fn authorities() -> [Authority; 2] {
    [Authority::Admin, Authority::Tenant(TenantId::new("acme").expect("a valid tenant"))]
}

fn refused_as_client_error(e: &cellpay_api::ApiError) {
    let status = e.status.map_or_else(|| e.public_code().http_status(), |s| s.as_u16());
    assert!((400..500).contains(&status), "a body is refused with a 4xx, not {status}");
}

/// Target `http_bodies`: every body parser of the API on the input.
pub fn http_bodies(data: &[u8]) {
    if data.len() > ApiLimits::default().body_bytes_max {
        return; // refused with 413 before any parser sees it
    }
    for by in authorities() {
        match body::parse::<OpenAccountBody>(data) {
            Ok(b) => {
                let _ = body::open_account(b, false, &by).map_err(|e| refused_as_client_error(&e));
            }
            Err(e) => refused_as_client_error(&e),
        }
        match body::parse::<TransferBody>(data) {
            Ok(b) => {
                let _ = body::transfer(b, true, &by).map_err(|e| refused_as_client_error(&e));
            }
            Err(e) => refused_as_client_error(&e),
        }
        match body::parse_batch(data) {
            Ok(batch) => {
                for raw in batch.transfers.iter().take(ApiLimits::default().batch_items_max) {
                    if let Err(e) = body::batch_item(raw, false, &by) {
                        refused_as_client_error(&e);
                        let _ = body::batch_item_id(raw);
                    }
                }
            }
            Err(e) => refused_as_client_error(&e),
        }
    }
    if let Err(e) = body::parse::<SwitchBody>(data) {
        refused_as_client_error(&e);
    }
    let _ = Plan::from_json(data);
    let _ = FlowRules::from_json(data);
}
