//! `cellpay up`: a many-process cluster on this machine, supervised.
//!
//! It creates the control plane (its database too, when missing), writes a
//! cluster secret to `<data-dir>/cluster.secret` and the tokens to
//! `<data-dir>/tokens.toml` when none are given, then runs one `cellpay cell`
//! process per cell and `--routers` `cellpay router` processes, the first on
//! `--listen` and each next one on the next port (or each on a free port when
//! the port is 0). A member that exits is started again, and says so; one
//! that keeps dying is started with a growing pause. Every member's output
//! line is shown prefixed with its name. SIGTERM or SIGINT: every member is
//! stopped with SIGTERM and waited for.
//!
//! `up` also asks every cell process for its status over the cell protocol
//! (twice a second, each ask with a 1 s deadline). One that has not answered
//! as working for [`SILENCE_KILL`] while its process still exists (stopped,
//! hung, its engine failed) is killed with SIGKILL and so started again: its
//! store's lock dies with it, so the new process is the only writer. The
//! control plane plays no part in this: when PostgreSQL is down or comes
//! back, no cell is killed for having been unable to report there.
//!
//! Every other `serve` setting given to `up` (a flag, `--config`, or the
//! `CELLPAY_*` environment) reaches every member: flags are passed on, the
//! environment is inherited.

use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellpay_control::Control;
use rand::distr::{Alphanumeric, SampleString};
use tokio::io::{AsyncBufReadExt, BufReader};

use cellpay_cell::CellClient;
use cellpay_core::CellId;
use cellpay_wire::{ClusterSecret, RemoteCell, RemoteConfig};

use crate::config::{Config, ServeArgs};
use crate::serve::{tokens, write_private, ShutdownSignal};

/// The control plane `up` uses when none is given.
pub const CONTROL_DEFAULT: &str = "postgres://root@127.0.0.1:5432/cellpay";
/// A member that keeps exiting less than this after its start is restarted after a growing pause.
const QUICK_DEATH: Duration = Duration::from_secs(10);
const RESTART_PAUSE_MIN: Duration = Duration::from_millis(100);
const RESTART_PAUSE_MAX: Duration = Duration::from_secs(5);
/// A cell process that has not answered its status as working for this long is killed (and restarted).
pub const SILENCE_KILL: Duration = Duration::from_secs(5);
/// How `up` asks a cell process for its status.
const LIVENESS: RemoteConfig = RemoteConfig {
    connect_timeout: Duration::from_millis(500),
    call_timeout: Duration::from_secs(1),
    in_flight_max: 1,
    queries_in_flight_max: 1,
    control_in_flight_max: 1,
    coalesce_commands_max: 1,
    queued_commands_max: 1,
    status_poll: Duration::from_millis(500),
};
/// How long `up` waits for every router to be ready before saying so anyway.
const READY_WAIT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct Args {
    /// Router processes.
    #[arg(long, default_value_t = 2)]
    routers: u32,
    /// The control plane (created when missing).
    #[arg(long, env = "CELLPAY_CONTROL", default_value = CONTROL_DEFAULT)]
    control: String,
    /// `--cells`, `--shards`, `--listen` (the first router), `--data-dir`,
    /// `--token` and `--config`, as for `serve`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cell,
    Router,
}

struct Member {
    kind: Kind,
    index: u32,
    args: Vec<String>,
    /// The running process's pid (0 while none runs).
    pid: Mutex<u32>,
    /// The HTTP address a router printed.
    address: Mutex<Option<String>>,
}

impl Member {
    fn name(&self) -> String {
        match self.kind {
            Kind::Cell => format!("cell {}", self.index),
            Kind::Router => format!("router {}", self.index),
        }
    }
}

/// Creates the database the URL names when it does not exist (connecting to `postgres` to do so).
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = url.parse().context("--control is not a PostgreSQL URL")?;
    let Some(db) = config.get_dbname().map(str::to_string) else { return Ok(()) };
    let mut admin = config.clone();
    admin.dbname("postgres").connect_timeout(Duration::from_secs(3));
    let (client, connection) = admin.connect(tokio_postgres::NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db]).await?.is_some();
    if !exists {
        let quoted = format!("\"{}\"", db.replace('"', "\"\""));
        client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
            .with_context(|| format!("creating database {db}"))?;
        say!("cellpay up: created database {db}");
    }
    Ok(())
}

fn cluster_secret(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("cluster.secret");
    if !path.exists() {
        write_private(&path, &Alphanumeric.sample_string(&mut rand::rng(), 40), 0o600)?;
    }
    let secret = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(secret.trim().to_string())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args.serve)?;
    anyhow::ensure!((1..=16).contains(&args.routers), "--routers must be between 1 and 16");
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    // Written before any router starts, so that they all read the same tokens.
    tokens(&config)?;
    let secret = cluster_secret(&data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let mut shutdown = ShutdownSignal::install()?;
        ensure_database(&args.control).await?;
        let control = Control::connect(&args.control).await?;
        let map = control.init(config.cells, config.shards, config.spare_cells).await?;
        let _ = control
            .record("cellpay up", &format!("starting {} cells and {} routers", config.cells, args.routers))
            .await;
        drop(control);

        let mut common = vec!["--data-dir".to_string(), data_dir.display().to_string()];
        common.extend(passed_on(std::env::args().skip_while(|a| a != "up").skip(1)));
        let mut members = Vec::new();
        for c in 0..config.cells {
            let mut a =
                vec!["cell".to_string(), "--id".into(), c.to_string(), "--metrics-listen".into(), "127.0.0.1:0".into()];
            a.extend(common.clone());
            members.push(Arc::new(Member {
                kind: Kind::Cell,
                index: c,
                args: a,
                pid: Mutex::new(0),
                address: Mutex::new(None),
            }));
        }
        for r in 0..args.routers {
            let mut listen = config.listen;
            if listen.port() != 0 {
                listen.set_port(listen.port() + r as u16);
            }
            let mut a = vec![
                "router".to_string(),
                "--name".into(),
                format!("router-{r}"),
                "--listen".into(),
                listen.to_string(),
            ];
            a.extend(common.clone());
            members.push(Arc::new(Member {
                kind: Kind::Router,
                index: r,
                args: a,
                pid: Mutex::new(0),
                address: Mutex::new(None),
            }));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let env = vec![
            ("CELLPAY_CONTROL".to_string(), args.control.clone()),
            ("CELLPAY_CLUSTER_SECRET".to_string(), secret.clone()),
            ("CELLPAY_TOKENS".to_string(), config.tokens.join(",")),
        ];
        let liveness_secret = ClusterSecret::new(&secret)?;
        tokio::spawn(watch_liveness(members.clone(), liveness_secret, stopping.clone()));
        let mut supervisors = Vec::new();
        for m in &members {
            supervisors.push(tokio::spawn(supervise(m.clone(), env.clone(), stopping.clone())));
        }
        say!(
            "cellpay up: {} cells, {} routers, {} shards (epoch {}), control plane {}, data in {}",
            config.cells,
            args.routers,
            map.shards(),
            map.epoch(),
            redact(&args.control),
            data_dir.display()
        );
        let waiting = wait_ready(&members);
        tokio::pin!(waiting);
        let signalled = tokio::select! {
            ready = &mut waiting => {
                match ready {
                    Ok(addresses) => say!("cellpay up ready: routers at {}", addresses.join(" ")),
                    Err(e) => say!("cellpay up: not every router is ready: {e}"),
                }
                false
            }
            _ = shutdown.recv() => true,
        };
        if !signalled {
            shutdown.recv().await;
        }
        say!("cellpay up stopping: SIGTERM to every member");
        stopping.store(true, SeqCst);
        for m in &members {
            let pid = *m.pid.lock().expect("pid lock");
            if pid != 0 {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for s in supervisors {
            let _ = s.await;
        }
        say!("cellpay up stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// `up`'s own flags, which are not passed on to members (each with whether it takes a value).
const UP_FLAGS: [(&str, bool); 7] = [
    ("--routers", true),
    ("--control", true),
    ("--cells", true),
    ("--shards", true),
    ("--listen", true),
    ("--data-dir", true),
    ("--token", true),
];

/// The arguments after `up` that members take too: everything but `up`'s own flags.
fn passed_on(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        let name = a.split('=').next().unwrap_or("");
        match UP_FLAGS.iter().find(|(f, _)| *f == name) {
            Some((_, takes_value)) => {
                if *takes_value && !a.contains('=') {
                    args.next();
                }
            }
            None => out.push(a),
        }
    }
    out
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) if c.get_password().is_some() => {
            let host = c.get_hosts().first().map(|h| format!("{h:?}")).unwrap_or_default();
            format!("postgres://{}:***@{host}/{}", c.get_user().unwrap_or(""), c.get_dbname().unwrap_or(""))
        }
        _ => url.to_string(),
    }
}

/// Waits until every router has printed its address and answers `/readyz` 200.
async fn wait_ready(members: &[Arc<Member>]) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + READY_WAIT;
    let routers: Vec<_> = members.iter().filter(|m| m.kind == Kind::Router).cloned().collect();
    loop {
        let addresses: Vec<Option<String>> =
            routers.iter().map(|m| m.address.lock().expect("address lock").clone()).collect();
        if addresses.iter().all(Option::is_some) {
            let addresses: Vec<String> = addresses.into_iter().flatten().collect();
            let mut ready = true;
            for a in &addresses {
                ready &= matches!(tokio::time::timeout(Duration::from_secs(2), readyz(a)).await, Ok(Ok(true)));
            }
            if ready {
                return Ok(addresses);
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("waited {READY_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills a cell process that has not answered its status as working for
/// [`SILENCE_KILL`] while its process exists; its supervisor starts it again.
async fn watch_liveness(members: Vec<Arc<Member>>, secret: ClusterSecret, stopping: Arc<AtomicBool>) {
    let cells: Vec<Arc<Member>> = members.into_iter().filter(|m| m.kind == Kind::Cell).collect();
    // Per cell: the process watched, its client, and since when it has not answered as working.
    let mut watched: Vec<Option<(u32, RemoteCell, Option<Instant>)>> = vec![None; cells.len()];
    while !stopping.load(SeqCst) {
        tokio::time::sleep(LIVENESS.status_poll).await;
        for (m, w) in cells.iter().zip(watched.iter_mut()) {
            let pid = *m.pid.lock().expect("pid lock");
            let address = m.address.lock().expect("address lock").clone();
            let Some(address) = address.filter(|_| pid != 0) else {
                *w = None;
                continue;
            };
            if w.as_ref().is_none_or(|(watched_pid, client, _)| *watched_pid != pid || client.address() != address) {
                *w = Some((pid, RemoteCell::start(CellId(m.index), &address, secret.clone(), LIVENESS), None));
                continue;
            }
            let Some((_, client, down_since)) = w.as_mut() else { continue };
            let health = CellClient::status(client).health;
            if !matches!(health, cellpay_cell::Health::Failed { .. }) {
                *down_since = None;
                continue;
            }
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SILENCE_KILL && !stopping.load(SeqCst) {
                say!(
                    "cellpay up: {} (pid {pid}) has not answered as working for {:.1} s ({health}); killing it",
                    m.name(),
                    since.elapsed().as_secs_f64()
                );
                // SAFETY: kill(2) on our own child's pid; SIGKILL reaches a stopped process too.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                *w = None;
            }
        }
    }
}

/// Does the router at `http://host:port` answer `/readyz` 200?
async fn readyz(address: &str) -> std::io::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(host).await?;
    tcp.write_all(format!("GET /readyz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await?;
    Ok(&head[9..12] == b"200")
}

/// Runs one member until `stopping`, starting it again whenever it exits.
async fn supervise(member: Arc<Member>, env: Vec<(String, String)>, stopping: Arc<AtomicBool>) {
    let name = member.name();
    // Deaths in a row that each came soon after a start.
    let mut quick_deaths = 0u32;
    loop {
        let started = Instant::now();
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                say!("cellpay up: cannot find my own executable: {e}");
                return;
            }
        };
        let mut args = member.args.clone();
        // A restarted cell listens where it did (routers and peers find it
        // there even while the control plane, which they learn addresses
        // from, is down), unless that keeps failing: then anywhere.
        if member.kind == Kind::Cell && !args.iter().any(|a| a == "--cell-listen") && quick_deaths < 2 {
            if let Some(address) = member.address.lock().expect("address lock").clone() {
                args.extend(["--cell-listen".to_string(), address]);
            }
        }
        let mut command = tokio::process::Command::new(exe);
        command.args(&args).stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
        for (k, v) in &env {
            if !v.is_empty() {
                command.env(k, v);
            }
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                say!("cellpay up: cannot start {name}: {e}");
                return;
            }
        };
        let pid = child.id().unwrap_or(0);
        *member.pid.lock().expect("pid lock") = pid;
        say!("cellpay up: started {name} (pid {pid})");
        if let Some(out) = child.stdout.take() {
            let (member, name) = (member.clone(), name.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // A router's HTTP address, a cell's cell-protocol address.
                    let said = line
                        .split("listening on ")
                        .nth(1)
                        .or_else(|| line.split("serving the cell protocol on ").nth(1));
                    if let Some(rest) = said {
                        let address = rest.split_whitespace().next().unwrap_or("").to_string();
                        *member.address.lock().expect("address lock") = Some(address);
                    }
                    say!("[{name}] {line}");
                }
            });
        }
        let status = child.wait().await;
        *member.pid.lock().expect("pid lock") = 0;
        if stopping.load(SeqCst) {
            return;
        }
        let how = match status {
            Ok(s) => describe(s),
            Err(e) => format!("could not be waited for: {e}"),
        };
        quick_deaths = if started.elapsed() < QUICK_DEATH { quick_deaths + 1 } else { 1 };
        // The first restart is at once (a cell's outage is what it costs); a
        // member that keeps dying waits longer each time.
        let pause = match quick_deaths {
            0 | 1 => Duration::ZERO,
            n => (RESTART_PAUSE_MIN * 2u32.saturating_pow(n - 2)).min(RESTART_PAUSE_MAX),
        };
        say!("cellpay up: {name} {how}; restarting it in {} ms", pause.as_millis());
        tokio::time::sleep(pause).await;
        if stopping.load(SeqCst) {
            return;
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn up_passes_on_every_setting_but_its_own() {
        let args = [
            "--routers",
            "2",
            "--body-bytes-max=65536",
            "--cells=3",
            "--batch-items-max",
            "100",
            "--token",
            "x:y",
            "--drills",
        ];
        let out = super::passed_on(args.iter().map(|s| s.to_string()));
        assert_eq!(out, ["--body-bytes-max=65536", "--batch-items-max", "100", "--drills"]);
    }
}
