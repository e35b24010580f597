//! `RemoteCell` never leaves a caller hanging: a peer that does not answer
//! costs a call its deadline, and a caller of a lower class starved of call
//! slots by a higher one is answered `cell_unavailable` within two deadlines.

use std::time::{Duration, Instant};

use cellpay_cell::{CellClient, EngineError};
use cellpay_core::{AccountId, Authority, CellId, Command, Op, Transfer, TransferId};
use cellpay_wire::faults::{Fault, FaultProxy};
use cellpay_wire::{ClusterSecret, RemoteCell, RemoteConfig};

fn transfer(id: &str, shadow: bool) -> Command {
    let op = Op::Transfer(Transfer {
        id: TransferId::new(id).unwrap(),
        from: AccountId::new("a").unwrap(),
        to: AccountId::new("b").unwrap(),
        amount: 1,
        currency: None,
        memo: None,
        by: Authority::Admin,
    });
    if shadow {
        Command::shadow(op)
    } else {
        Command::real(op)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_lower_class_is_answered_within_two_deadlines() {
    // A peer that takes calls and never answers them.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = sink.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = sink.accept().await {
            held.push(socket);
        }
    });
    let proxy = FaultProxy::start(target).await.unwrap();
    proxy.set(Fault::StallRequests);
    let config = RemoteConfig { call_timeout: Duration::from_millis(300), in_flight_max: 1, ..RemoteConfig::default() };
    let secret = ClusterSecret::new("client-test-cluster-secret").unwrap();
    let cell = RemoteCell::start(CellId(0), &proxy.addr().to_string(), secret, config);

    // Critical payments keep the one call slot busy, each call costing its deadline.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for l in 0..3 {
        let (cell, stop) = (cell.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = cell.submit(vec![transfer(&format!("c{l}-{n}"), false)]).await;
                assert!(matches!(r, Err(EngineError::Unavailable { .. })), "{r:?}");
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let shadow = cell.submit(vec![transfer("s-1", true)]).await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    match shadow {
        Err(EngineError::Unavailable { reason, .. }) => assert!(reason.contains("ms"), "{reason}"),
        other => panic!("the starved shadow payment: {other:?}"),
    }
    assert!(took < Duration::from_millis(1_500), "answered after {took:?}: two deadlines are 600 ms");
}
