//! The SQL projection of a cell on PostgreSQL, against the cell itself: a
//! cell on `PostgresStore` in a schema of its own (database `test` of the
//! machine's PostgreSQL), payments through its engine, and the projector's
//! tables read back with SQL.

mod common;

use common::{open_cmd, transfer_cmd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use cellpay_cell::{Cell, EngineConfig, Projector, ProjectorThread};
use cellpay_core::*;
use cellpay_store::{PostgresOptions, PostgresStore};

const POSTGRES_URL: &str = "postgres://root@127.0.0.1:5432/test";

/// A schema of its own, dropped when the test ends.
struct Schema(String);

impl Schema {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("projector_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Relaxed));
        let s = Self(name);
        s.sql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", s.0));
        s
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(POSTGRES_URL, postgres::NoTls).unwrap()
    }

    fn sql(&self, sql: &str) {
        self.client().batch_execute(sql).unwrap();
    }

    fn last_batch(&self) -> u64 {
        let row =
            self.client().query_one(&format!("SELECT coalesce(max(seq), 0) FROM {}.batches", self.0), &[]).unwrap();
        row.get::<_, i64>(0) as u64
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(POSTGRES_URL, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
        }
    }
}

fn map() -> ShardMap {
    ShardMap::round_robin(64, 2).unwrap()
}

/// `n` account ids owned by `cell`.
fn ids(cell: u32, n: usize, prefix: &str) -> Vec<String> {
    let m = map();
    (0..).map(|i| format!("{prefix}-{i}")).filter(|id| m.owner_of(id).0 == cell).take(n).collect()
}

fn open_cell(schema: &Schema, config: EngineConfig) -> Cell {
    let store = PostgresStore::open(POSTGRES_URL, &schema.0, PostgresOptions::default()).unwrap();
    Cell::start(Box::new(store), CellId(0), &map(), config).unwrap()
}

fn submit(cell: &Cell, commands: Vec<Command>) -> Vec<Outcome> {
    cell.handle().submit(commands).unwrap().wait_blocking().unwrap()
}

fn balance(cell: &Cell, id: &str) -> i64 {
    let q = Query::Account { shadow: false, id: AccountId::new(id).unwrap(), by: Authority::Admin };
    match cell.handle().query(q).unwrap().wait_blocking().unwrap() {
        QueryAnswer::Account(a) => a.balance,
        other => panic!("{other:?}"),
    }
}

fn start_projector(schema: &Schema) -> ProjectorThread {
    Projector::spawn(POSTGRES_URL, &schema.0, CellId(0)).unwrap()
}

/// Waits until the tables show batch `seq`.
fn wait_for(projector: &ProjectorThread, seq: u64) {
    let started = Instant::now();
    while projector.stats.batch_seq.load(Relaxed) < seq {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the projection stays at {} of {seq}: {:?}",
            projector.stats.batch_seq.load(Relaxed),
            projector.stats.last_error.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every account's balance in SQL equals the engine's; answers the SQL sum.
fn balances_match(schema: &Schema, cell: &Cell, ids: &[String]) -> i64 {
    let mut client = schema.client();
    for id in ids {
        let row = client.query_one(&format!("SELECT balance FROM {}.accounts WHERE id = $1", schema.0), &[id]).unwrap();
        assert_eq!(row.get::<_, i64>(0), balance(cell, id), "{id}");
    }
    client.query_one(&format!("SELECT sum(balance)::bigint FROM {}.accounts", schema.0), &[]).unwrap().get(0)
}

fn status(schema: &Schema, payer: &str, id: &str) -> String {
    let sql = format!("SELECT status FROM {}.transfers WHERE payer = $1 AND id = $2", schema.0);
    schema.client().query_one(&sql, &[&payer, &id]).unwrap().get(0)
}

#[test]
fn the_tables_are_the_ledger_as_of_their_watermark_and_a_restarted_projector_goes_on() {
    let schema = Schema::new();
    let cell = open_cell(&schema, EngineConfig::default());
    let mut accounts = ids(0, 20, "acct");
    let bank = ids(0, 1, "bank").remove(0);
    let remote = ids(1, 1, "far").remove(0);
    let idle = ids(0, 1, "idle").remove(0);
    let mut commands = vec![open_cmd(&bank, true), open_cmd(&idle, false)];
    commands.extend(accounts.iter().map(|a| open_cmd(a, false)));
    submit(&cell, commands);
    submit(
        &cell,
        accounts.iter().enumerate().map(|(i, a)| transfer_cmd(&format!("fund-{i}"), &bank, a, 1_000)).collect(),
    );
    // Local payments between the accounts, one batch each.
    for i in 0..30 {
        let (from, to) = (&accounts[i % 20], &accounts[(i * 7 + 3) % 20]);
        submit(&cell, vec![transfer_cmd(&format!("p-{i}"), from, to, 10 + i as i64)]);
    }
    // A payment to another cell's account: pending, its credit in the outbox.
    let out = submit(&cell, vec![transfer_cmd("to-far", &accounts[0], &remote, 77)]);
    let Outcome::Transferred { outbox: Some((dest, seq)), .. } = &out[0] else { panic!("{out:?}") };
    let (dest, seq) = (*dest, *seq);

    let projector = start_projector(&schema);
    wait_for(&projector, schema.last_batch());
    accounts.push(bank.clone());
    // An account opened and never paid is there too, at 0.
    accounts.push(idle.clone());
    // Money is conserved in SQL too: all that left is the pending 77.
    assert_eq!(balances_match(&schema, &cell, &accounts), -77);
    let transfers: i64 =
        schema.client().query_one(&format!("SELECT count(*) FROM {}.transfers", schema.0), &[]).unwrap().get(0);
    assert_eq!(transfers, 20 + 30 + 1);
    assert_eq!(status(&schema, &accounts[0], "to-far"), "pending");
    assert_eq!(status(&schema, &accounts[0], "p-0"), "settled");

    // The payee's cell applied the credit: settled, in SQL too.
    submit(&cell, vec![Command::real(Op::Settle { dest, seq })]);
    wait_for(&projector, schema.last_batch());
    assert_eq!(status(&schema, &accounts[0], "to-far"), "settled");

    // Stopped, payments go on; started again, it goes on from its watermark.
    let lags = projector.stats.lag_count();
    assert!(lags > 0);
    let (p50, p99, max) = projector.stats.lag_ms();
    assert!(p50 <= p99 && p99 <= max && max < 30_000.0, "{p50} {p99} {max}");
    projector.join();
    for i in 0..10 {
        submit(&cell, vec![transfer_cmd(&format!("later-{i}"), &accounts[i], &accounts[i + 1], 5)]);
    }
    let projector = start_projector(&schema);
    wait_for(&projector, schema.last_batch());
    assert_eq!(balances_match(&schema, &cell, &accounts), -77);
    assert_eq!(projector.stats.resyncs.load(Relaxed), 0, "its watermark was reachable");
    let metrics = projector.stats.render_prometheus(CellId(0));
    assert!(metrics.contains("cellpay_projection_lag_seconds_count{cell=\"0\"}"), "{metrics}");
    projector.join();
    cell.stop().unwrap();
}

#[test]
fn a_projector_behind_every_kept_checkpoint_writes_the_whole_ledger_once() {
    let schema = Schema::new();
    // Checkpoints every few batches: checkpoint 0 is soon gone.
    let config = EngineConfig { checkpoint_log_bytes: 512, ..EngineConfig::default() };
    let cell = open_cell(&schema, config);
    let mut accounts = ids(0, 10, "acct");
    let bank = ids(0, 1, "bank").remove(0);
    let mut commands = vec![open_cmd(&bank, true)];
    commands.extend(accounts.iter().map(|a| open_cmd(a, false)));
    submit(&cell, commands);
    for (i, a) in accounts.iter().enumerate() {
        submit(&cell, vec![transfer_cmd(&format!("fund-{i}"), &bank, a, 500)]);
    }
    for i in 0..40 {
        submit(&cell, vec![transfer_cmd(&format!("p-{i}"), &accounts[i % 10], &accounts[(i + 1) % 10], 3)]);
    }
    let kept: Vec<i64> = schema
        .client()
        .query(&format!("SELECT seq FROM {}.checkpoint_heads ORDER BY seq", schema.0), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(kept.first().is_some_and(|&oldest| oldest > 0), "checkpoint 0 is gone: {kept:?}");
    let projector = start_projector(&schema);
    wait_for(&projector, schema.last_batch());
    assert_eq!(projector.stats.resyncs.load(Relaxed), 1);
    accounts.push(bank);
    assert_eq!(balances_match(&schema, &cell, &accounts), 0);
    let resynced: Option<i64> = schema
        .client()
        .query_one(&format!("SELECT resynced_at_batch FROM {}.projection", schema.0), &[])
        .unwrap()
        .get(0);
    assert!(resynced.is_some(), "the table says where it resynced");
    projector.join();
    cell.stop().unwrap();
}
