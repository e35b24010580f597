//! The JSON shapes of the contract's answers.

use cellpay_core::{AccountView, EntryView, TransferView};
use serde_json::{json, Value};

pub fn account(a: &AccountView) -> Value {
    json!({
        "id": a.id.as_str(),
        "currency": a.currency.as_str(),
        "balance": a.balance,
        "overdraft": a.overdraft,
        "tenant": a.tenant.as_str(),
    })
}

pub fn transfer(t: &TransferView) -> Value {
    json!({
        "id": t.id.as_str(),
        "from": t.from.as_str(),
        "to": t.to.as_str(),
        "amount": t.amount,
        "currency": t.currency.as_str(),
        "status": t.status.as_str(),
    })
}

pub fn entry(e: &EntryView) -> Value {
    json!({
        "seq": e.seq,
        "transfer_id": e.transfer.as_str(),
        "kind": e.kind.as_str(),
        "amount": e.amount,
        "balance_after": e.balance_after,
        "counterparty": e.counterparty.as_str(),
    })
}
