//! The epoch and the cell a call means to reach, on a live cell server:
//! a cell behind its caller's shard map refuses the call `wrong_cell` and
//! commits nothing, a caller at an older map is served by the map the cell
//! holds, the map call answers that map, and a call meant for another cell
//! (an address gone stale) reaches no engine.

mod common;

use std::time::Duration;

use cellpay_cell::{CellClient, EngineConfig, EngineError};
use cellpay_core::{AccountId, Authority, CellId, Command, ErrorCode, Op, Outcome, Query, QueryAnswer, ShardMap};
use cellpay_wire::{RemoteCell, RemoteConfig};
use common::{open, Served};

fn account(id: &str) -> Query {
    Query::Account { shadow: false, id: AccountId::new(id).unwrap(), by: Authority::Admin }
}

/// Cell 0 of a two-cell map at `epoch` (every shard its own), served on loopback.
async fn serve(epoch: u64) -> Served {
    common::serve(EngineConfig::default(), ShardMap::new(epoch, vec![CellId(0); 8]).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_behind_its_callers_map_refuses_wrong_cell_and_commits_nothing() {
    let s = serve(3).await;
    let client = RemoteCell::start(CellId(0), &s.addr, s.secret.clone(), RemoteConfig::default());

    // A caller at epoch 4: the cell, at 3, refuses and is told to catch up.
    client.set_sender_epoch(4);
    let woken = s.behind.notified();
    let answer = client.submit(vec![open("a1"), open("a2")]).await.unwrap();
    assert_eq!(answer.len(), 2);
    for outcome in &answer {
        assert!(
            matches!(outcome, Outcome::Rejected(r) if r.code == ErrorCode::WrongCell && r.message.contains("epoch 3")),
            "{outcome:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(1), woken).await.expect("the cell's catch-up is woken");
    let read = client.query(account("a1")).await.unwrap();
    assert!(matches!(&read, QueryAnswer::Rejected(r) if r.code == ErrorCode::WrongCell), "{read:?}");
    // Nothing was committed: asked in process, the account does not exist.
    let direct = s.slot.query(account("a1")).await.unwrap();
    assert!(matches!(&direct, QueryAnswer::Rejected(r) if r.code == ErrorCode::AccountNotFound), "{direct:?}");

    // Once the cell installs epoch 4 the same caller is served.
    let next = ShardMap::new(4, vec![CellId(0); 8]).unwrap();
    let installed = s.slot.submit(vec![Command::real(Op::InstallShardMap(next.clone()))]).await.unwrap();
    assert_eq!(installed, vec![Outcome::ShardMapInstalled { epoch: 4 }]);
    let answer = client.submit(vec![open("a1")]).await.unwrap();
    assert!(matches!(answer[..], [Outcome::AccountOpened { .. }]), "{answer:?}");
    // The map call answers the map the cell works at.
    assert_eq!(client.shard_map().await, Some(next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_at_an_older_map_is_served_by_the_map_the_cell_holds() {
    let s = serve(5).await;
    let client = RemoteCell::start(CellId(0), &s.addr, s.secret.clone(), RemoteConfig::default());
    client.set_sender_epoch(2);
    let answer = client.submit(vec![open("b1")]).await.unwrap();
    assert!(matches!(answer[..], [Outcome::AccountOpened { .. }]), "{answer:?}");
    // An older epoch never lowers what the client sends.
    client.set_sender_epoch(1);
    assert_eq!(client.shard_map().await.map(|m| m.epoch()), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_meant_for_another_cell_reaches_no_engine() {
    let s = serve(1).await;
    // A client of cell 1 whose address now leads to cell 0's process.
    let stale = RemoteCell::start(CellId(1), &s.addr, s.secret.clone(), RemoteConfig::default());
    let refused = stale.submit(vec![open("c1")]).await;
    match &refused {
        Err(EngineError::Unavailable { cell, reason }) => {
            assert_eq!(*cell, CellId(1));
            assert!(reason.contains("421") && reason.contains("not cell 1"), "{reason}");
        }
        other => panic!("expected cell_unavailable, got {other:?}"),
    }
    assert_eq!(stale.shard_map().await, None);
    let direct = s.slot.query(account("c1")).await.unwrap();
    assert!(matches!(&direct, QueryAnswer::Rejected(r) if r.code == ErrorCode::AccountNotFound), "{direct:?}");
}
