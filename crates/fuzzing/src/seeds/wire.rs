//! Seeds of the `wire` target: a kind byte (the index in `WIRE_KINDS`), then
//! a body the cell protocol's encoders wrote from what a real cell state
//! answers (outcomes of a batch, answers to every query) and from each
//! engine error and health.

use std::sync::Arc;

use cellpay_cell::{CellFigures, CellStatus, EngineError, Health, TierFigures};
use cellpay_core::{
    Authority, CellId, CellState, Command, Credit, Finding, Limits, Op, OpenAccount, Priority, Query, QueryAnswer,
    ShardMap, TenantId,
};
use cellpay_wire::codec::{encode_answer, encode_commands, encode_outcomes, encode_query, encode_status, StatusReport};

use super::{account, cny, commands, open, pay, transfer_id};
use crate::WIRE_KINDS;

/// The kind byte of body kind `name`.
fn kind(name: &str) -> u8 {
    WIRE_KINDS.iter().position(|k| *k == name).expect("a kind of WIRE_KINDS") as u8
}

fn acme() -> TenantId {
    TenantId::new("acme").expect("a valid tenant")
}

/// A batch a cell applies: accounts (one of tenant `acme`), local and
/// cross-cell payments, a credit in, a settle, a refusal, and `acme`'s transfer.
fn batch(local: &[&str], remote: &[&str]) -> Vec<Command> {
    let mut tenant_pay = pay("t-acme", local[1], local[0], 5, None);
    if let Op::Transfer(t) = &mut tenant_pay.op {
        t.by = Authority::Tenant(acme());
    }
    let open_acme = OpenAccount { id: account(local[1]), currency: cny(), overdraft: false, tenant: acme() };
    vec![
        open(local[0], true),
        Command::real(Op::OpenAccount(open_acme)),
        pay("p1", local[0], local[1], 100, Some("rent")),
        pay("x1", local[0], remote[0], 30, None),
        pay("p2", local[1], local[0], 1_000_000, None),
        tenant_pay,
        Command::real(Op::Credit(Credit {
            source: CellId(1),
            dest: None,
            seq: 1,
            transfer: transfer_id("in1"),
            from: account(remote[0]),
            to: account(local[1]),
            amount: 9,
            currency: cny(),
        })),
        Command::real(Op::Settle { dest: CellId(1), seq: 1 }),
        pay("x2", local[0], remote[0], 20, Some("still in the outbox")),
    ]
}

fn queries(local: &[&str], remote: &[&str]) -> Vec<Query> {
    let acme = Authority::Tenant(acme());
    vec![
        Query::Account { shadow: false, id: account(local[0]), by: Authority::Admin },
        Query::Account { shadow: false, id: account(remote[0]), by: acme.clone() },
        Query::Transfer { shadow: false, id: transfer_id("p1"), from: None, by: Authority::Admin },
        Query::Transfer { shadow: false, id: transfer_id("x1"), from: Some(account(local[0])), by: acme.clone() },
        Query::Entries { shadow: false, account: account(local[1]), limit: 10, before: None, by: acme },
        Query::Digests { shadow: false },
        Query::Audit { shadow: false },
        Query::Figures { shadow: false },
        Query::InboxAt { shadow: false, asked: vec![(CellId(1), 1)] },
        Query::OutboxAt { shadow: false, asked: vec![(CellId(1), 1), (CellId(1), 0)] },
        Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit: 16 },
    ]
}

fn engine_errors() -> Vec<EngineError> {
    vec![
        EngineError::Overloaded { cell: CellId(0), queued: 9000, max: 8192 },
        EngineError::TooLarge { commands: 70_000, max: 65_536 },
        EngineError::Shed { cell: CellId(0), class: Priority::History.as_str(), waited_ms: 40, target_ms: 5 },
        EngineError::Unavailable { cell: CellId(0), reason: "fail-stop".into() },
    ]
}

fn status(state: &CellState, health: Health, tier: Option<TierFigures>) -> StatusReport {
    let figures = CellFigures {
        real: state.ledger(false).figures(),
        shadow: state.ledger(true).figures(),
        clock_ms: state.clock_ms(),
        reach_real: state.ledger(false).idempotency_reach(),
        reach_shadow: state.ledger(true).idempotency_reach(),
        window_promised_ms: 86_400_000,
        tier,
    };
    let status = CellStatus {
        cell: state.cell(),
        epoch: state.shard_map().epoch(),
        queue_depth: 3,
        queue_delay_us: 250,
        health,
    };
    StatusReport { status, figures, outbox_generation: 7 }
}

/// Every seed of the `wire` target: (name, kind byte + body).
pub(super) fn bodies() -> Vec<(String, Vec<u8>)> {
    let map = ShardMap::round_robin(8, 2).expect("a valid map");
    let names = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"];
    let (local, remote): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| map.owner_of(n) == CellId(0));
    assert!(local.len() >= 2 && !remote.is_empty(), "ten names fill both cells of eight shards");
    let mut state = CellState::new(CellId(0), map, Limits::default());
    let batch = batch(&local, &remote);
    let outcomes = state.apply_batch(&batch);

    let mut out = Vec::new();
    let mut add = |kind_name: &str, name: String, body: Vec<u8>| {
        out.push((format!("{kind_name}-{name}"), [&[kind(kind_name)][..], &body].concat()));
    };
    add("commands", "batch".into(), encode_commands(&batch));
    add("commands", "every-kind".into(), encode_commands(&commands()));
    add("commands", "none".into(), encode_commands(&[]));
    add("outcomes", "batch".into(), encode_outcomes(&Ok(outcomes)));
    for (i, e) in engine_errors().into_iter().enumerate() {
        add("outcomes", format!("error-{i}"), encode_outcomes(&Err(e.clone())));
        add("answer", format!("error-{i}"), encode_answer(&Err(e)));
    }
    for (i, query) in queries(&local, &remote).into_iter().enumerate() {
        let answer = state.query(&query);
        add("query", format!("{i:02}"), encode_query(&query));
        add("answer", format!("{i:02}"), encode_answer(&Ok(answer)));
    }
    let mut audit = state.ledger(false).audit(CellId(0));
    audit.findings.push(Finding::Walk { cell: CellId(0), figure: "balance_sum", kept: 1, walked: 2 });
    audit.findings.push(Finding::Lost { source: CellId(0), dest: CellId(1), first_seq: 1, last_seq: 2, amount: 3 });
    add("answer", "audit-findings".into(), encode_answer(&Ok(QueryAnswer::Audit(audit))));
    let tier = TierFigures { runs: 2, entries: 300, oldest_at_ms: Some(5), ..TierFigures::default() };
    add("status", "serving".into(), encode_status(&status(&state, Health::Serving, Some(tier))));
    let stalled = Health::Stalled { busy_ms: 1500, stall_after_ms: 1000 };
    add("status", "stalled".into(), encode_status(&status(&state, stalled, None)));
    let failed = Health::Failed { reason: Arc::from("fsync failed") };
    add("status", "failed".into(), encode_status(&status(&state, failed, None)));
    out
}
