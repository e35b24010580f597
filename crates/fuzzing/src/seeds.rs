//! Seed inputs for every target, made by the real encoders: frames the store
//! wrote, batches the codec wrote, a snapshot of a cell with accounts,
//! records, history, an outbox and an inbox, a run file the tier wrote, the
//! JSON bodies of the HTTP contract, and the cell protocol's bodies.
//! `cellpay-fuzz-seeds DIR` writes them to `DIR/<target>/`; the committed
//! corpus starts from them.

use cellpay_core::codec::{encode_batch, Writer};
use cellpay_core::{
    snapshot, AccountId, Authority, CellId, CellState, Command, Credit, Currency, ErrorCode, Limits, OldRecord, Op,
    OpenAccount, ShardMap, TenantId, Transfer, TransferId, TransferStatus,
};
use cellpay_store::{EmbeddedStore, Store, StoreOptions};
use cellpay_tier::{Entry, Tier, TierOptions};

mod wire;

/// One seed: its target, a file name, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn account(s: &str) -> AccountId {
    AccountId::new(s).expect("seed ids are valid")
}

fn transfer_id(s: &str) -> TransferId {
    TransferId::new(s).expect("seed ids are valid")
}

fn cny() -> Currency {
    Currency::new("CNY").expect("CNY is a currency")
}

fn open(id: &str, overdraft: bool) -> Command {
    let op = OpenAccount { id: account(id), currency: cny(), overdraft, tenant: TenantId::default_tenant() };
    Command::real(Op::OpenAccount(op))
}

fn pay(id: &str, from: &str, to: &str, amount: i64, memo: Option<&str>) -> Command {
    Command::real(Op::Transfer(Transfer {
        id: transfer_id(id),
        from: account(from),
        to: account(to),
        amount,
        currency: Some(cny()),
        memo: memo.map(Box::from),
        by: Authority::Admin,
    }))
}

/// One command of every kind.
fn commands() -> Vec<Command> {
    vec![
        open("bank", true),
        pay("t1", "bank", "alice", 500, Some("lunch")),
        Command::shadow(Op::Transfer(Transfer {
            id: transfer_id("t2"),
            from: account("alice"),
            to: account("bob"),
            amount: 7,
            currency: None,
            memo: None,
            by: Authority::Admin,
        })),
        Command::real(Op::Credit(Credit {
            source: CellId(1),
            dest: None,
            seq: 1,
            transfer: transfer_id("t3"),
            from: account("carol"),
            to: account("alice"),
            amount: 5,
            currency: cny(),
        })),
        Command::real(Op::Settle { dest: CellId(1), seq: 2 }),
        Command::shadow(Op::Compensate { dest: CellId(2), seq: 4, reason: ErrorCode::AccountNotFound }),
        Command::real(Op::InstallShardMap(ShardMap::round_robin(8, 2).expect("a valid map"))),
    ]
}

fn encoded_batch(clock_ms: u64, cmds: &[Command]) -> Vec<u8> {
    let mut w = Writer::default();
    encode_batch(&mut w, clock_ms, cmds.iter());
    w.buf
}

fn batches() -> Vec<Vec<u8>> {
    let cmds = commands();
    let mut out = vec![encoded_batch(0, &[]), encoded_batch(1_800_000_000_000, &cmds)];
    out.extend(cmds.iter().map(|c| encoded_batch(42, std::slice::from_ref(c))));
    out
}

/// A segment the store wrote: three batches.
fn segment() -> Vec<u8> {
    let dir = crate::scratch_dir();
    let mut store = EmbeddedStore::open(dir.path(), StoreOptions::default()).expect("open");
    store.replay(0, &mut |_, _| Ok(())).expect("replay of an empty store");
    for (seq, batch) in batches().iter().take(3).enumerate() {
        store.append(seq as u64 + 1, batch).expect("append");
    }
    drop(store);
    std::fs::read(dir.path().join("log").join(crate::log::SEGMENT_NAME)).expect("the segment")
}

/// A cell with local and remote accounts, transfers both ways, and history.
fn cell_state() -> CellState {
    let map = ShardMap::round_robin(8, 2).expect("a valid map");
    let limits = Limits { transfers_retained_max: 4, history_entries_max: 8 };
    let mut state = CellState::new(CellId(0), map.clone(), limits);
    let names = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"];
    let (local, remote): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| map.owner_of(n) == CellId(0));
    let remote = &remote[..remote.len().min(2)];
    assert!(local.len() >= 3 && remote.len() == 2, "ten names fill both cells of eight shards");
    state.apply(&open(local[0], true));
    state.apply(&open(local[1], false));
    state.apply(&open(local[2], false));
    for i in 0..6 {
        state.apply(&pay(&format!("p{i}"), local[0], local[1 + i % 2], 100 + i as i64, None));
    }
    state.apply(&pay("x1", local[0], remote[0], 30, Some("cross")));
    state.apply(&pay("x2", local[1], remote[1], 20, None));
    state.apply(&Command::real(Op::Credit(Credit {
        source: CellId(1),
        dest: None,
        seq: 1,
        transfer: transfer_id("in1"),
        from: account(remote[0]),
        to: account(local[2]),
        amount: 9,
        currency: cny(),
    })));
    state.apply(&Command::real(Op::Settle { dest: CellId(1), seq: 1 }));
    state.end_batch();
    state
}

fn old_record(i: u32, status: TransferStatus) -> OldRecord {
    OldRecord {
        id: transfer_id(&format!("t-{i:05}")),
        from: account("payer"),
        to: account("payee"),
        amount: 100 + i64::from(i),
        currency: cny(),
        currency_given: i.is_multiple_of(2).then(cny),
        memo_hash: u64::from(i) * 7919,
        status,
        at_ms: 1_800_000_000_000 + u64::from(i),
    }
}

/// A run file the tier wrote, of `n` idempotency records.
fn run_file(n: u32) -> Vec<u8> {
    let dir = crate::scratch_dir();
    let mut tier = Tier::open(dir.path(), TierOptions::default()).expect("open");
    let entries = (0..n)
        .map(|i| {
            let r = old_record(i, if i % 3 == 0 { TransferStatus::Reversed } else { TransferStatus::Settled });
            Entry { key: r.key(false, 8), seq: u64::from(i), at_ms: r.at_ms, value: r.encode_value() }
        })
        .collect();
    let info = tier.write_run(1, 2, entries).expect("write a run");
    std::fs::read(info.path).expect("the run file")
}

fn http_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let plan = cellpay_router::Plan::from_toml(cellpay_router::degrade::PLAN_BUNDLED).expect("the bundled plan");
    let rules = cellpay_router::FlowRules::default();
    vec![
        ("open_account", br#"{"id":"alice","currency":"CNY","overdraft":false,"tenant":"acme"}"#.to_vec()),
        ("transfer", br#"{"id":"pay-1","from":"alice","to":"bob","amount":2500,"currency":"CNY","memo":"x"}"#.to_vec()),
        (
            "batch",
            br#"{"transfers":[{"id":"b1","from":"alice","to":"bob","amount":1},{"id":"b2","from":"bob","to":"bob","amount":0},{"id":7}]}"#
                .to_vec(),
        ),
        ("switch", br#"{"mode":"auto"}"#.to_vec()),
        ("plan", serde_json::to_vec(&plan).expect("a plan serializes")),
        ("rules", serde_json::to_vec(&rules).expect("rules serialize")),
    ]
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: String, bytes: Vec<u8>| out.push(Seed { target, name, bytes });
    for (i, b) in batches().into_iter().enumerate() {
        add("batch", format!("seed-{i:02}"), b);
    }
    let segment = segment();
    for (flags, tag) in [(0u8, "as-written"), (crate::log::FLAG_RESEAL, "resealed")] {
        add("log_segment", format!("seed-{tag}"), [&[flags][..], &segment].concat());
        let torn = &segment[..segment.len() - 3];
        add("log_segment", format!("seed-{tag}-torn"), [&[flags][..], torn].concat());
    }
    let state = cell_state();
    add("snapshot", "seed-cell".into(), snapshot::encode(&state));
    let empty = CellState::new(CellId(3), ShardMap::round_robin(4, 4).expect("a valid map"), Limits::default());
    add("snapshot", "seed-empty".into(), snapshot::encode(&empty));
    for (n, tag) in [(0, "empty"), (3, "small"), (150, "blocks")] {
        let file = run_file(n);
        add("tier_run", format!("seed-{tag}"), [&[0u8][..], &file].concat());
        add("tier_run", format!("seed-{tag}-resealed"), [&[crate::tier::FLAG_RESEAL][..], &file].concat());
    }
    for (i, status) in
        [TransferStatus::Settled, TransferStatus::Reversed, TransferStatus::Pending].into_iter().enumerate()
    {
        add("idempotency_record", format!("seed-{i}"), old_record(i as u32, status).encode_value());
    }
    for (name, body) in http_bodies() {
        add("http_bodies", format!("seed-{name}"), body);
    }
    for (name, body) in wire::bodies() {
        add("wire", format!("seed-{name}"), body);
    }
    out
}
