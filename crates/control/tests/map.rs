//! The shard map's compare-and-set in a real PostgreSQL: one map wins each
//! epoch, a map the cluster cannot take is refused with its reason and
//! changes nothing, and a map taken is in the action log.

use cellpay_control::{Control, ControlError};
use cellpay_core::{CellId, ShardMap};

const POSTGRES: &str = "postgres://root@127.0.0.1:5432";

async fn admin(sql: &str) {
    let (client, connection) = tokio_postgres::connect(&format!("{POSTGRES}/postgres"), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL runs on 127.0.0.1:5432");
    tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A database of its own, dropped at the end of the test.
struct Database(String);

impl Database {
    async fn create() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("cellpay_t_control_{}_{nanos}", std::process::id());
        admin(&format!("CREATE DATABASE {name}")).await;
        Database(name)
    }

    fn url(&self) -> String {
        format!("{POSTGRES}/{}", self.0)
    }

    async fn drop(self) {
        admin(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0)).await;
    }
}

fn mismatch(r: Result<(), ControlError>, says: &str) {
    match r {
        Err(ControlError::Mismatch(why)) => assert!(why.contains(says), "{why:?} should say {says:?}"),
        other => panic!("a map to refuse ({says}): {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_map_wins_each_epoch_and_a_map_the_cluster_cannot_take_changes_nothing() {
    let db = Database::create().await;
    let control = Control::connect(&db.url()).await.unwrap();
    let start = control.init(3, 8, 0).await.expect("the cluster is created");
    assert_eq!(start.epoch(), 1);
    let with = |epoch: u64, owners: &[u32]| ShardMap::new(epoch, owners.iter().map(|c| CellId(*c)).collect()).unwrap();

    // Refused, each with its reason, and nothing changes.
    mismatch(control.set_map(&with(2, &[0, 1, 2, 0, 1, 2, 0, 7]), "test").await, "cell 7");
    mismatch(control.set_map(&with(2, &[0, 1, 2, 0, 1, 2, 0, 1 << 31]), "test").await, "beyond");
    mismatch(control.set_map(&with(2, &[0; 9]), "test").await, "9");
    mismatch(control.set_map(&with(1, &[0; 8]), "test").await, "epoch");
    assert_eq!(control.view().await.unwrap().map, start);

    // A follower, as a router keeps one: it hears of the new map at once.
    let mut follower = cellpay_control::follow(db.url());
    follower.wait_for(|v| v.is_some()).await.unwrap();

    // Two maps for epoch 2 at once, from two connections: exactly one wins.
    let other = Control::connect(&db.url()).await.unwrap();
    let (a, b) = (with(2, &[1; 8]), with(2, &[2; 8]));
    let (ra, rb) = tokio::join!(control.set_map(&a, "test a"), other.set_map(&b, "test b"));
    assert!(ra.is_ok() != rb.is_ok(), "one of two maps wins epoch 2: {ra:?} {rb:?}");
    let won = if ra.is_ok() { a } else { b };
    assert_eq!(control.view().await.unwrap().map, won);
    let heard = tokio::time::timeout(
        cellpay_control::POLL_PERIOD / 2,
        follower.wait_for(|v| v.as_ref().is_some_and(|v| v.map.epoch() == 2)),
    )
    .await
    .is_ok();
    assert!(heard, "the follower was not notified of epoch 2");
    let logged = control.actions(10).await.unwrap();
    assert_eq!(logged.iter().filter(|(_, _, what)| what == "shard map epoch 2 installed").count(), 1, "{logged:?}");
    drop((control, other, follower));
    db.drop().await;
}
