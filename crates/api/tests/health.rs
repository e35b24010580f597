//! Over HTTP: a cell that stops serving shows on `/readyz`, the dashboard,
//! `/v1/cluster` and `/metrics`, and its requests answer 503
//! `cell_unavailable` instead of hanging. The whole API router on a loopback
//! port, in front of a real engine on a real embedded store whose appends can
//! be made to panic or hang (a real `cellpay serve` has no way to inject either).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cellpay_api::{ApiLimits, AppState, Auth, Token};
use cellpay_cell::{Cell, CellClient, CellSlot, EngineConfig};
use cellpay_core::{CellId, ShardMap};
use cellpay_router::{Cluster, FlowRules, Plan, Protection};
use cellpay_store::{
    Checkpoint, EmbeddedStore, ReplayReport, Store, StoreError, StoreOptions, StoreStats, StoredCheckpoint, Visitor,
};
use serde_json::{json, Value};

const CLIENT: &str = "client-secret-for-tests-0001";
/// How long a test waits for something that must happen; generous, for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// The metrics recorder is one per process: the tests take turns.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    /// Appends block until the mode changes: a hung disk.
    Hold,
    /// Appends panic.
    Panic,
}

#[derive(Clone)]
struct Faults(Arc<(Mutex<Mode>, Condvar)>);

impl Faults {
    fn set(&self, mode: Mode) {
        *self.0 .0.lock().unwrap() = mode;
        self.0 .1.notify_all();
    }
}

/// The real embedded store, with faults injected at its append.
struct FaultyStore {
    inner: EmbeddedStore,
    faults: Faults,
}

impl Store for FaultyStore {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.inner.checkpoints()
    }
    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        self.inner.read_checkpoint(seq)
    }
    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<std::path::PathBuf, StoreError> {
        self.inner.set_aside_checkpoint(seq)
    }
    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.inner.sync_checkpoint()
    }
    fn replay(&mut self, after: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        self.inner.replay(after, visit)
    }
    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        let mode = {
            let (lock, changed) = &*self.faults.0;
            let mut mode = lock.lock().unwrap();
            while *mode == Mode::Hold {
                mode = changed.wait(mode).unwrap();
            }
            *mode
        };
        if mode == Mode::Panic {
            panic!("injected panic in the append of batch {seq}");
        }
        self.inner.append(seq, batch)
    }
    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.inner.checkpoint(seq, snapshot)
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

/// One cell behind the API on a loopback port. Fields drop in order: the
/// disk is released before the cell is stopped (which joins its engine).
struct Server {
    faults: Faults,
    base: String,
    agent: ureq::Agent,
    _cell: Cell,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.faults.set(Mode::Pass);
    }
}

struct Reply {
    status: u16,
    body: Value,
}

impl Server {
    fn start(engine: EngineConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults(Arc::new((Mutex::new(Mode::Pass), Condvar::new())));
        let store = FaultyStore {
            inner: EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap(),
            faults: faults.clone(),
        };
        let map = ShardMap::round_robin(64, 1).unwrap();
        let cell = Cell::start(Box::new(store), CellId(0), &map, engine).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let auth = Auth::new(vec![Token::parse(&format!("client:{CLIENT}")).unwrap()]);
        let plan = Plan::from_toml(cellpay_router::degrade::PLAN_BUNDLED).unwrap();
        let protection = Arc::new(Protection::new(FlowRules::default(), plan, auth.token_roles(), 1));
        let state = AppState::new(auth, ApiLimits::default(), cellpay_api::FrontLimits::default());
        let slot = Arc::new(CellSlot::new(CellId(0)));
        let listener = runtime.block_on(async {
            slot.install(cell.handle());
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
        });
        let base = format!("http://{}", listener.local_addr().unwrap());
        let clients: Vec<Arc<dyn CellClient>> = vec![slot.clone()];
        let _ = state.0.cluster.set(Arc::new(Cluster::new(map, clients, protection)));
        let _ = state.0.local_cells.set(vec![slot]);
        let app = cellpay_api::router(state);
        runtime.spawn(async move { axum::serve(listener, app).await });
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Server { faults, base, agent: config.into(), _cell: cell, _runtime: runtime, _dir: dir }
    }

    /// A request; the server must answer it (a hang fails at the client's timeout).
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        request(&self.agent, &self.base, method, path, body)
    }

    fn open_account(&self, id: &str) -> Reply {
        self.request("POST", "/v1/accounts", Some(&json!({"id": id, "currency": "CNY"})))
    }

    fn metric(&self, line_start: &str) -> String {
        let text = self.request("GET", "/metrics", None).body;
        let text = text.as_str().expect("metrics are text");
        let line = text.lines().find(|l| l.starts_with(line_start));
        line.unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}")).to_string()
    }
}

fn request(agent: &ureq::Agent, base: &str, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("Authorization", format!("Bearer {CLIENT}"))
        .body(body.map_or(String::new(), Value::to_string))
        .unwrap();
    let mut resp = agent.run(req).expect("the server answers");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    Reply { status, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < PATIENCE, "{what}: not reached in {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_cell_unavailable(r: &Reply) {
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (503, Some("cell_unavailable")), "{}", r.body);
}

#[test]
fn a_panicked_engine_turns_readyz_dashboard_cluster_and_metrics_to_failed_and_requests_to_503() {
    let _turn = one_at_a_time();
    let s = Server::start(EngineConfig::default());
    assert_eq!(s.request("GET", "/readyz", None).status, 200);
    assert_eq!(s.open_account("alice").status, 201);

    s.faults.set(Mode::Panic);
    assert_cell_unavailable(&s.open_account("bob"));

    let ready = s.request("GET", "/readyz", None);
    assert_cell_unavailable(&ready);
    let message = ready.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cell 0 failed") && message.contains("panicked"), "{message}");
    let dashboard = s.request("GET", "/dashboard/data", None).body;
    assert_eq!(dashboard["cells"][0]["status"], "failed", "{dashboard}");
    assert!(dashboard["cells"][0]["reason"].as_str().unwrap().contains("injected panic"), "{dashboard}");
    let cluster = s.request("GET", "/v1/cluster", None).body;
    assert_eq!(cluster["cells"][0]["status"], "failed", "{cluster}");
    assert_eq!(s.metric("cellpay_cell_failed{cell=\"0\"}"), "cellpay_cell_failed{cell=\"0\"} 1");
    assert_eq!(s.metric("cellpay_cell_stalled{cell=\"0\"}"), "cellpay_cell_stalled{cell=\"0\"} 0");

    // Later commands and reads: 503 at once.
    assert_cell_unavailable(&s.open_account("carol"));
    assert_cell_unavailable(&s.request("GET", "/v1/accounts/alice", None));
}

#[test]
fn a_hung_disk_turns_readyz_dashboard_and_metrics_to_stalled_until_the_disk_returns() {
    let _turn = one_at_a_time();
    let stall_after = Duration::from_millis(300);
    let s = Server::start(EngineConfig { stall_after, ..EngineConfig::default() });
    assert_eq!(s.open_account("alice").status, 201);

    s.faults.set(Mode::Hold);
    let held = std::thread::spawn({
        let (agent, base) = (s.agent.clone(), s.base.clone());
        move || request(&agent, &base, "POST", "/v1/accounts", Some(&json!({"id": "bob", "currency": "CNY"}))).status
    });
    wait_until("readyz reports the stall", || s.request("GET", "/readyz", None).status == 503);
    let ready = s.request("GET", "/readyz", None);
    assert_cell_unavailable(&ready);
    let message = ready.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cell 0 stalled"), "{message}");
    let dashboard = s.request("GET", "/dashboard/data", None).body;
    assert_eq!(dashboard["cells"][0]["status"], "stalled", "{dashboard}");
    assert!(dashboard["cells"][0]["reason"].as_str().unwrap().contains("300 ms"), "{dashboard}");
    assert_eq!(s.metric("cellpay_cell_failed{cell=\"0\"}"), "cellpay_cell_failed{cell=\"0\"} 1");
    assert_eq!(s.metric("cellpay_cell_stalled{cell=\"0\"}"), "cellpay_cell_stalled{cell=\"0\"} 1");
    assert_cell_unavailable(&s.open_account("carol"));
    assert_cell_unavailable(&s.request("GET", "/v1/accounts/alice", None));

    // The disk returns: the held request is answered and the cell serves again.
    s.faults.set(Mode::Pass);
    assert_eq!(held.join().unwrap(), 201);
    wait_until("readyz turns ready again", || s.request("GET", "/readyz", None).status == 200);
    assert_eq!(s.metric("cellpay_cell_stalled{cell=\"0\"}"), "cellpay_cell_stalled{cell=\"0\"} 0");
    assert_eq!(s.metric("cellpay_cell_failed{cell=\"0\"}"), "cellpay_cell_failed{cell=\"0\"} 0");
    // The router's breaker may still hold the cell off for a moment after the refusals.
    wait_until("the cell takes new work", || s.open_account("dave").status == 201);
    assert_eq!(s.request("GET", "/v1/accounts/bob", None).status, 200);
}
