//! A cell served on loopback, as a cell process serves it, for the tests
//! that call it through `RemoteCell`.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::sync::Arc;

use cellpay_cell::{Cell, CellClient, CellSlot, EngineConfig};
use cellpay_core::{AccountId, CellId, Command, Currency, Op, OpenAccount, ShardMap, TenantId};
use cellpay_wire::ClusterSecret;

/// Opens account `id` (tenant `t`, CNY, no overdraft).
pub fn open(id: &str) -> Command {
    Command::real(Op::OpenAccount(OpenAccount {
        id: AccountId::new(id).unwrap(),
        tenant: TenantId::new("t").unwrap(),
        currency: Currency::new("CNY").unwrap(),
        overdraft: false,
    }))
}

pub struct Served {
    _dir: tempfile::TempDir,
    /// The cell in this process, to ask it directly.
    pub slot: Arc<CellSlot>,
    pub addr: String,
    /// Notified when the cell learns it is behind a caller's map.
    pub behind: Arc<tokio::sync::Notify>,
    pub secret: ClusterSecret,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// Cell 0 of `map`, on real files, served on loopback.
pub async fn serve(config: EngineConfig, map: ShardMap) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let cell = Cell::open_embedded(dir.path(), CellId(0), &map, config).unwrap();
    let slot = Arc::new(CellSlot::new(CellId(0)));
    slot.install(cell.handle());
    std::mem::forget(cell);
    let secret = ClusterSecret::new("wire-test-cluster-secret").unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let behind = Arc::new(tokio::sync::Notify::new());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let app = cellpay_wire::app(slot.clone() as Arc<dyn CellClient>, secret.clone(), behind.clone());
    tokio::spawn(cellpay_wire::serve(tcp, app, stop));
    Served { _dir: dir, slot, addr, behind, secret, _stop: stop_tx }
}
