//! A real `cellpay serve` on a loopback port with a temporary data dir, and a
//! small HTTP client for the tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub const CLIENT: &str = "client-secret-for-tests-0001";
pub const ADMIN: &str = "admin-secret-for-tests-00001";

pub struct Server {
    pub child: Child,
    pub base: String,
    pub dir: PathBuf,
    agent: ureq::Agent,
    /// A many-process cluster (`cellpay up`): every router's base URL (the first is `base`).
    pub routers: Vec<String>,
    /// A many-process cluster's control plane database, dropped with the server.
    pub database: Option<String>,
    /// Every line `cellpay up` printed (members started, restarted, and their own lines).
    pub history: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The PostgreSQL every machine runs (trust auth).
pub const POSTGRES: &str = "postgres://root@127.0.0.1:5432";

/// Runs SQL against the `postgres` database.
pub fn postgres_admin(sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&format!("{POSTGRES}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL runs on 127.0.0.1:5432");
        tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    });
}

/// Opens an account in CNY and asserts it was created.
pub fn open(s: &Server, token: &str, id: &str, overdraft: bool) {
    let r = s.post("/v1/accounts", token, &serde_json::json!({"id": id, "currency": "CNY", "overdraft": overdraft}));
    assert_eq!(r.status, 201, "{}", r.body);
}

/// An account's balance, read with the client token.
pub fn balance(s: &Server, id: &str) -> i64 {
    let r = s.get(&format!("/v1/accounts/{id}"), CLIENT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["balance"].as_i64().unwrap()
}

/// A database name no other test (or test run) uses.
pub fn fresh_database(what: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("cellpay_t_{what}_{}_{n}_{nanos}", std::process::id())
}

/// A database of its own for a test, dropped with it.
pub struct TempDatabase(pub String);

impl TempDatabase {
    pub fn create(what: &str) -> TempDatabase {
        let name = fresh_database(what);
        postgres_admin(&format!("CREATE DATABASE {name}"));
        TempDatabase(name)
    }

    pub fn url(&self) -> String {
        format!("{POSTGRES}/{}", self.0)
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        postgres_admin(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0));
    }
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub cell: Option<u32>,
    pub epoch: Option<u64>,
    pub retry_after: Option<String>,
    /// `X-Cellpay-Stale-Ms`: a balance served from the stale cache.
    pub stale_ms: Option<String>,
    /// `X-Request-Id`: the request's id, the client's or the server's.
    pub request_id: Option<String>,
}

impl Server {
    /// Starts `cellpay serve` on a free port with the test tokens and waits until it is ready.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(dir, extra, &[])
    }

    /// As `start`, with extra environment variables for the server.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_with_stderr(dir, extra, env, Stdio::inherit())
    }

    /// As `start_with_env`, with the server's log (stderr) sent to `stderr`.
    pub fn start_with_stderr(dir: &Path, extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--token", &format!("client:{CLIENT}"), "--token", &format!("admin:{ADMIN}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn cellpay serve");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, even after the test stops listening, so the
            // server never writes into a closed pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut base = None;
        loop {
            let line = rx.recv_timeout(Duration::from_secs(60)).expect("serve prints its address and readiness");
            if let Some(rest) = line.strip_prefix("cellpay listening on ") {
                base = Some(rest.split(' ').next().unwrap().to_string());
            }
            if line.starts_with("cellpay ready") {
                break;
            }
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Server {
            child,
            base: base.expect("address printed before ready"),
            dir: dir.to_path_buf(),
            agent: config.into(),
            routers: Vec::new(),
            database: None,
            history: Default::default(),
        }
    }

    /// Starts `cellpay up`: `cells` cell processes and `routers` router
    /// processes with the test tokens, the control plane in a fresh database
    /// (dropped with the server); waits until every router is ready.
    pub fn up(dir: &Path, cells: u32, routers: u32, extra: &[&str]) -> Server {
        Self::up_via(dir, cells, routers, extra, "127.0.0.1:5432")
    }

    /// As `up`, every process reaching PostgreSQL at `postgres` (host:port: a proxy, say).
    pub fn up_via(dir: &Path, cells: u32, routers: u32, extra: &[&str], postgres: &str) -> Server {
        let database = fresh_database("up");
        postgres_admin(&format!("CREATE DATABASE {database}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args(["up", "--listen", "127.0.0.1:0", "--cells", &cells.to_string(), "--routers", &routers.to_string()])
            .args(["--control", &format!("postgres://root@{postgres}/{database}"), "--data-dir"])
            .arg(dir)
            .args(["--token", &format!("client:{CLIENT}"), "--token", &format!("admin:{ADMIN}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cellpay up");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let history: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let kept = history.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let routers = loop {
            let line = rx.recv_timeout(Duration::from_secs(120)).expect("cellpay up prints when it is ready");
            if let Some(rest) = line.strip_prefix("cellpay up ready: routers at ") {
                break rest.split(' ').map(str::to_string).collect::<Vec<_>>();
            }
            assert!(!line.starts_with("cellpay up: not every router"), "{line}");
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Server {
            child,
            base: routers[0].clone(),
            dir: dir.to_path_buf(),
            agent: config.into(),
            routers,
            database: Some(database),
            history,
        }
    }

    /// The pid `cellpay up` last started `member` ("cell 2", "router 0") with.
    pub fn pid_of(&self, member: &str) -> u32 {
        let prefix = format!("cellpay up: started {member} (pid ");
        let history = self.history.lock().unwrap();
        let line = history
            .iter()
            .rev()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{member} was never started"));
        line[prefix.len()..].trim_end_matches(')').parse().unwrap()
    }

    /// Has `cellpay up` printed a line containing `text`?
    pub fn printed(&self, text: &str) -> bool {
        self.history.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// The same server through another of its routers.
    pub fn via(&self, router: usize) -> Via<'_> {
        Via { server: self, base: self.routers[router].clone() }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let url = format!("{}{}", self.base, path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(body.unwrap_or("").to_string()).unwrap();
        let mut resp = self.agent.run(req).expect("the server answers");
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let cell = header("x-cellpay-cell").map(|v| v.parse().unwrap());
        let epoch = header("x-cellpay-epoch").map(|v| v.parse().unwrap());
        let retry_after = header("retry-after");
        let stale_ms = header("x-cellpay-stale-ms");
        let request_id = header("x-request-id");
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body, cell, epoch, retry_after, stale_ms, request_id }
    }

    /// A request that may fail at the transport (the server was killed): `None` then.
    pub fn try_request(&self, method: &str, path: &str, token: &str, body: &str) -> Option<Reply> {
        let url = format!("{}{}", self.base, path);
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {token}"))
            .body(body.to_string())
            .unwrap();
        let mut resp = self.agent.run(req).ok()?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().ok()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Some(Reply { status, body, cell: None, epoch: None, retry_after: None, stale_ms: None, request_id: None })
    }

    pub fn post(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.request("POST", path, Some(token), &[], Some(&body.to_string()))
    }

    pub fn post_shadow(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.request("POST", path, Some(token), &[("X-Cellpay-Shadow", "1")], Some(&body.to_string()))
    }

    pub fn put(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.request("PUT", path, Some(token), &[], Some(&body.to_string()))
    }

    pub fn get(&self, path: &str, token: &str) -> Reply {
        self.request("GET", path, Some(token), &[], None)
    }

    /// SIGTERM and wait (at most 30 s); answers the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..3000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the server did not stop within 30 s of SIGTERM");
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Polls until `f` holds (cross-cell settlement is asynchronous).
    pub fn eventually(&self, what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{what}: not reached in 10 s");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.database.is_some() {
            // `up` stops its members on SIGTERM; SIGKILL would leave them running.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..3000 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(db) = self.database.take() {
            postgres_admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
        }
    }
}

/// Requests through one router of a many-process cluster.
pub struct Via<'a> {
    server: &'a Server,
    base: String,
}

impl Via<'_> {
    pub fn post(&self, path: &str, token: &str, body: &Value) -> Option<Reply> {
        self.call("POST", path, token, body.to_string())
    }

    pub fn get(&self, path: &str, token: &str) -> Option<Reply> {
        self.call("GET", path, token, String::new())
    }

    fn call(&self, method: &str, path: &str, token: &str, body: String) -> Option<Reply> {
        let url = format!("{}{}", self.base, path);
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {token}"))
            .body(body)
            .unwrap();
        let mut resp = self.server.agent.run(req).ok()?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().ok()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Some(Reply { status, body, cell: None, epoch: None, retry_after: None, stale_ms: None, request_id: None })
    }
}

/// Two account ids owned by different cells and two owned by the same cell, per the default map.
pub fn ids_in_cells(cells: u32) -> Vec<Vec<String>> {
    let map = cellpay_core::ShardMap::round_robin(cellpay_core::SHARDS_DEFAULT, cells).unwrap();
    let mut out = vec![Vec::new(); cells as usize];
    for i in 0.. {
        let id = format!("acct-{i}");
        let c = map.owner_of(&id).0 as usize;
        if out[c].len() < 8 {
            out[c].push(id);
        }
        if out.iter().all(|v| v.len() == 8) {
            return out;
        }
    }
    unreachable!()
}

/// Validates a body against `#/components/schemas/<name>` of the OpenAPI document.
pub fn conforms(body: &Value, name: &str) {
    let doc: Value = serde_json::from_str(include_str!("../../../api/openapi.json")).unwrap();
    let schema = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&schema).expect("the OpenAPI schemas compile");
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{name} does not match its schema: {errors:?}\n{body}");
}

/// The CPUs this test process may run on, from `/proc/self/status`.
pub fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

/// A many-process cluster started piece by piece (no supervisor), with a
/// fault-injecting proxy in front of every cell (what routers and peers dial)
/// and one in front of the control plane: a test can cut any of them.
pub struct Pieces {
    /// The cells' processes, by cell.
    pub cells: Vec<Child>,
    /// The proxy in front of each cell.
    pub cell_proxies: Vec<cellpay_wire::faults::FaultProxy>,
    /// The proxy every process reaches the control plane through.
    pub control_proxy: cellpay_wire::faults::FaultProxy,
    /// And one more between it and the router only: cut, the router alone keeps a stale copy.
    pub router_control_proxy: cellpay_wire::faults::FaultProxy,
    /// And one between it and each cell.
    pub cell_control_proxies: Vec<cellpay_wire::faults::FaultProxy>,
    /// The control plane's URL, as the test (an operator) reaches it: not through the proxies.
    pub control_direct: String,
    /// The router, as a server the usual helpers talk to (it owns the database).
    pub server: Server,
    _runtime: tokio::runtime::Runtime,
}

pub const CLUSTER_SECRET: &str = "cluster-secret-for-tests-0001";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Reads a child's stdout until a line starts with `prefix`; answers the rest of that line.
fn wait_line(child: &mut Child, prefix: &str) -> String {
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no line starting {prefix:?}"));
        if let Some(rest) = line.strip_prefix(prefix) {
            // The reader thread goes on draining the pipe (sends to a dropped channel fail, unheard).
            return rest.to_string();
        }
    }
}

impl Pieces {
    /// `cells` cell processes and one router, the control plane in a fresh database.
    pub fn start(dir: &Path, cells: u32) -> Pieces {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let database = fresh_database("pieces");
        postgres_admin(&format!("CREATE DATABASE {database}"));
        let control_proxy =
            runtime.block_on(cellpay_wire::faults::FaultProxy::start("127.0.0.1:5432".parse().unwrap())).unwrap();
        let control = format!("postgres://root@{}/{database}", control_proxy.addr());
        let bin = env!("CARGO_BIN_EXE_cellpay");
        let init = Command::new(bin)
            .args(["cluster", "init", "--control", &control, "--cells", &cells.to_string()])
            .output()
            .unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        let mut cell_children = Vec::new();
        let mut cell_proxies = Vec::new();
        let mut cell_control_proxies = Vec::new();
        for c in 0..cells {
            let own = runtime.block_on(cellpay_wire::faults::FaultProxy::start(control_proxy.addr())).unwrap();
            let cell_control = format!("postgres://root@{}/{database}", own.addr());
            cell_control_proxies.push(own);
            let port = free_port();
            let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let proxy = runtime.block_on(cellpay_wire::faults::FaultProxy::start(listen)).unwrap();
            let mut child = Command::new(bin)
                .args(["cell", "--id", &c.to_string(), "--control", &cell_control, "--data-dir"])
                .arg(dir)
                .args(["--cell-listen", &listen.to_string(), "--advertise", &proxy.addr().to_string()])
                .env("CELLPAY_CLUSTER_SECRET", CLUSTER_SECRET)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            wait_line(&mut child, &format!("cellpay cell {c} serving"));
            cell_children.push(child);
            cell_proxies.push(proxy);
        }
        let control_direct = format!("{POSTGRES}/{database}");
        let router_control_proxy =
            runtime.block_on(cellpay_wire::faults::FaultProxy::start(control_proxy.addr())).unwrap();
        let router_control = format!("postgres://root@{}/{database}", router_control_proxy.addr());
        let mut router = Command::new(bin)
            .args(["router", "--listen", "127.0.0.1:0", "--control", &router_control, "--data-dir"])
            .arg(dir)
            .args(["--token", &format!("client:{CLIENT}"), "--token", &format!("admin:{ADMIN}")])
            .env("CELLPAY_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let rest = wait_line(&mut router, "cellpay router ");
        let base = rest.split("listening on ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        let server = Server {
            child: router,
            base: base.clone(),
            dir: dir.to_path_buf(),
            agent: config.into(),
            routers: vec![base],
            database: Some(database),
            history: Default::default(),
        };
        server.eventually("the router is ready", || server.request("GET", "/readyz", None, &[], None).status == 200);
        Pieces {
            cells: cell_children,
            cell_proxies,
            control_proxy,
            router_control_proxy,
            cell_control_proxies,
            control_direct,
            server,
            _runtime: runtime,
        }
    }
}

impl Drop for Pieces {
    fn drop(&mut self) {
        for c in &mut self.cells {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
