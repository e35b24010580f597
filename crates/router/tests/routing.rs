//! Routing against real cells: a cell that has not installed the router's
//! newer shard map yet (a cell process catching up with the control plane)
//! is waited for, not answered `cell_unavailable`.

use std::sync::Arc;
use std::time::Duration;

use cellpay_cell::{Cell, CellClient, EngineConfig};
use cellpay_core::*;
use cellpay_router::{Cluster, Plan, Protection, RouteError};

/// Two real cells at epoch 1 and a router at epoch 2, where shard 0 (cell
/// 0's, empty) belongs to cell 1, which does not know it yet; cell 1 takes
/// the map 100 ms after this returns (the task answers its install).
struct Behind {
    _dirs: [tempfile::TempDir; 2],
    _cells: [Cell; 2],
    cluster: Cluster,
    /// An account id in shard 0 (opened nowhere).
    account: AccountId,
    installer: tokio::task::JoinHandle<Vec<Outcome>>,
}

fn behind() -> Behind {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let map = ShardMap::round_robin(4, 2).unwrap();
    let open = |c: u32| Cell::open_embedded(dirs[c as usize].path(), CellId(c), &map, EngineConfig::default()).unwrap();
    let cells = [open(0), open(1)];
    let clients: Vec<Arc<dyn CellClient>> =
        cells.iter().map(|c| Arc::new(c.handle().clone()) as Arc<dyn CellClient>).collect();
    let protection = Arc::new(Protection::new(Default::default(), Plan { switches: vec![] }, vec![], 2));
    let cluster = Cluster::new(map.clone(), clients.clone(), protection);
    let mut owners = map.owners().to_vec();
    owners[0] = CellId(1);
    let next = ShardMap::new(2, owners).unwrap();
    assert!(cluster.set_map(next.clone()));
    let account = (0..).map(|i| format!("acct{i}")).find(|n| next.shard_of(n).0 == 0).unwrap();
    let late = clients[1].clone();
    let installer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        late.submit(vec![Command::real(Op::InstallShardMap(next))]).await.unwrap()
    });
    Behind { _dirs: dirs, _cells: cells, cluster, account: AccountId::new(&account).unwrap(), installer }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_for_an_owner_behind_the_routers_map() {
    let b = behind();
    let read = Query::Account { shadow: false, id: b.account.clone(), by: Authority::Admin };
    let routed = b.cluster.query_account(&b.account, read).await;
    let installed = b.installer.await.unwrap();
    assert!(matches!(installed[0], Outcome::ShardMapInstalled { .. }), "{installed:?}");
    // Answered by cell 1 at the new map: the account is not there (nobody opened it).
    assert_eq!(routed.cell, CellId(1));
    match routed.result {
        Ok(QueryAnswer::Rejected(r)) => assert_eq!(r.code, ErrorCode::AccountNotFound, "{r:?}"),
        Err(RouteError::WrongCell { .. }) => panic!("the read gave up on a cell catching up with the map"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_item_waits_for_an_owner_behind_the_routers_map() {
    let b = behind();
    let transfer = Command::real(Op::Transfer(Transfer {
        id: TransferId::new("t1").unwrap(),
        from: b.account.clone(),
        to: AccountId::new("shop").unwrap(),
        amount: 1,
        currency: None,
        memo: None,
        by: Authority::Admin,
    }));
    let routed = b.cluster.submit_transfers(vec![transfer]).await.remove(0);
    b.installer.await.unwrap();
    // Answered by cell 1 at the new map: the payer is not there (nobody opened it).
    assert_eq!(routed.cell, CellId(1));
    match routed.result {
        Ok(Outcome::Rejected(r)) => assert_eq!(r.code, ErrorCode::AccountNotFound, "{r:?}"),
        other => panic!("the batch item gave up on a cell catching up with the map: {other:?}"),
    }
}
