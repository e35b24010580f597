//! The cluster's control calls on a live cell server, as a router in
//! another process sends them: a shard move's steps overtake the payments
//! queued for a busy cell (a call of their own, then the cell's control
//! lane); an export sent together with its freeze is answered once the
//! freeze is applied, even when it reaches the cell first; and the outbox
//! limit the flow rules set reaches the cell.

mod common;

use std::time::{Duration, Instant};

use cellpay_cell::{CellClient, EngineConfig, EXPORT_WAIT_MAX};
use cellpay_core::{
    shard_of, AccountId, CellId, Command, Currency, ErrorCode, Op, OpenAccount, Outcome, Query, QueryAnswer, ShardMap,
    TenantId,
};
use cellpay_wire::{RemoteCell, RemoteConfig};
use common::{open, Served};

const SHARDS: u32 = 8;

/// Cell 0 of a two-cell map at epoch 3 (it owns every shard), served on loopback.
async fn serve(config: EngineConfig) -> Served {
    common::serve(config, ShardMap::new(3, vec![CellId(0); SHARDS as usize]).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moves_steps_overtake_the_payments_queued_for_a_busy_cell() {
    // A cell held to 20 commands a second, and a client with one submit slot.
    let s = serve(EngineConfig { commands_per_s_max: 20, ..EngineConfig::default() }).await;
    let config = RemoteConfig { in_flight_max: 1, call_timeout: Duration::from_secs(60), ..RemoteConfig::default() };
    let client = RemoteCell::start(CellId(0), &s.addr, s.secret.clone(), config);
    let openings = |k: usize| (0..100).map(|i| open(&format!("acct-{k}-{i}"))).collect::<Vec<_>>();
    // 100 openings are answered at once; the cell then rests 5 s for them.
    let first = client.submit(openings(0)).await.unwrap();
    assert!(first.iter().all(|o| matches!(o, Outcome::AccountOpened { .. })), "{first:?}");
    // 100 more wait at the cell for that rest, holding the client's one slot.
    let payments = {
        let client = client.clone();
        tokio::spawn(async move { client.submit(openings(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A map install (a move's last step) goes past them, and so does a
    // freeze: in the client's queue they would wait about 5 s.
    let started = Instant::now();
    let next = ShardMap::new(4, vec![CellId(0); SHARDS as usize]).unwrap();
    let installed = client.submit(vec![Command::real(Op::InstallShardMap(next))]).await.unwrap();
    assert!(matches!(installed[0], Outcome::ShardMapInstalled { .. }), "{installed:?}");
    let frozen = client.submit(vec![Command::real(Op::FreezeShard { shard: 1, move_id: 5, to: CellId(1) })]).await;
    assert!(matches!(frozen.as_deref(), Ok([Outcome::MoveStep { .. }])), "{frozen:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "the move's steps waited {took:?} behind the payments (about 5 s)");
    let outcomes = payments.await.unwrap().unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::AccountOpened { .. })), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_sent_before_its_freeze_is_answered_once_the_freeze_is_applied() {
    let s = serve(EngineConfig::default()).await;
    let client = RemoteCell::start(CellId(0), &s.addr, s.secret.clone(), RemoteConfig::default());
    let opened = client.submit(vec![open("payer-1")]).await.unwrap();
    assert!(matches!(opened[0], Outcome::AccountOpened { .. }), "{opened:?}");
    let shard = shard_of("payer-1", SHARDS).0;

    // The export first: it is held while the shard is not frozen.
    let export = {
        let client = client.clone();
        tokio::spawn(async move { client.query(Query::ExportShard { shard, older_after: 0 }).await })
    };
    tokio::time::sleep(EXPORT_WAIT_MAX / 4).await;
    let frozen = client.submit(vec![Command::real(Op::FreezeShard { shard, move_id: 4, to: CellId(1) })]).await;
    assert!(matches!(frozen.as_deref(), Ok([Outcome::MoveStep { .. }])), "{frozen:?}");
    match export.await.unwrap() {
        Ok(QueryAnswer::ShardExport(export)) => {
            assert_eq!((export.shard, export.move_id, export.to), (shard, 4, CellId(1)));
            assert_eq!(export.real.accounts.len(), 1);
        }
        other => panic!("the export sent before its freeze: {other:?}"),
    }

    // An export of a shard that is never frozen is held only for the bound.
    let other = (shard + 1) % SHARDS;
    let started = Instant::now();
    let answer = client.query(Query::ExportShard { shard: other, older_after: 0 }).await;
    let took = started.elapsed();
    assert!(
        matches!(&answer, Ok(QueryAnswer::Rejected(r)) if r.code == ErrorCode::InvalidRequest && r.message.contains("not frozen")),
        "{answer:?}"
    );
    assert!(took >= EXPORT_WAIT_MAX && took < EXPORT_WAIT_MAX + Duration::from_secs(2), "held {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_limit_the_router_sets_reaches_the_cell() {
    // Cell 0 owns the even shards; credits for the odd ones wait in its
    // outbox (no cell 1 runs to take them).
    let owners = (0..SHARDS).map(|s| CellId(s % 2)).collect();
    let s = common::serve(EngineConfig::default(), ShardMap::new(3, owners).unwrap()).await;
    let config = RemoteConfig { status_poll: Duration::from_millis(20), ..RemoteConfig::default() };
    let client = RemoteCell::start(CellId(0), &s.addr, s.secret.clone(), config);
    let named = |prefix: &str, odd: u32| {
        (0..).map(|i| format!("{prefix}-{i}")).find(|n| shard_of(n, SHARDS).0 % 2 == odd).unwrap()
    };
    let (payer, payee) = (named("payer", 0), named("payee", 1));
    let opened = client
        .submit(vec![Command::real(Op::OpenAccount(OpenAccount {
            id: AccountId::new(&payer).unwrap(),
            tenant: TenantId::new("t").unwrap(),
            currency: Currency::new("CNY").unwrap(),
            overdraft: true,
        }))])
        .await
        .unwrap();
    assert!(matches!(opened[0], Outcome::AccountOpened { .. }), "{opened:?}");

    // 256 is sent as the bytes 00 01 00 …: a body that starts with 0.
    const LIMIT: usize = 256;
    client.set_outbox_messages_max(LIMIT as u64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let transfers: Vec<Command> = (0..LIMIT + 1)
        .map(|i| {
            Command::real(Op::Transfer(cellpay_core::Transfer {
                id: cellpay_core::TransferId::new(&format!("t-{i}")).unwrap(),
                from: AccountId::new(&payer).unwrap(),
                to: AccountId::new(&payee).unwrap(),
                amount: 1,
                currency: None,
                memo: None,
                by: cellpay_core::Authority::Admin,
            }))
        })
        .collect();
    let outcomes = client.submit(transfers).await.unwrap();
    let accepted = outcomes.iter().take_while(|o| matches!(o, Outcome::Transferred { .. })).count();
    assert_eq!(accepted, LIMIT, "the credits the outbox took before refusing: {:?}", outcomes.last());
    assert!(
        matches!(&outcomes[LIMIT], Outcome::Rejected(r) if r.code == ErrorCode::OutboxFull),
        "{:?}",
        outcomes[LIMIT]
    );
}
