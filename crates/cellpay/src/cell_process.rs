//! `cellpay cell`: one cell in its own process.
//!
//! It recovers the cell's embedded store (whose file lock is what keeps a
//! second process for the same cell from writing), serves the cell protocol
//! on `--cell-listen`, reports its address to the control plane every
//! second, and pushes its cross-cell credits to the payee's cell process
//! through one relay per peer and ledger. It follows the control plane for
//! its peers' addresses; when the control plane is down it keeps the last
//! copy, and payments go on.
//!
//! SIGTERM or SIGINT: stop serving, stop the relays, stop the engine (which
//! answers what is queued and writes a final checkpoint), exit 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cellpay_cell::{CellClient, CellSlot, Relay, RelayConfig, RelayGate, RelayStats};
use cellpay_control::{Control, ControlView};
use cellpay_core::CellId;
use cellpay_wire::{ClusterSecret, RemoteCell, RemoteConfig};

use crate::config::{Config, ServeArgs};
use crate::serve::{engine_config, pg_schema, protection_files, ShutdownSignal};

#[derive(clap::Args)]
pub struct Args {
    /// The cell this process runs.
    #[arg(long)]
    id: u32,
    #[command(flatten)]
    control: ControlArgs,
    /// Where to serve the cell protocol; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0", env = "CELLPAY_CELL_LISTEN")]
    cell_listen: SocketAddr,
    /// The address routers and peers should use, when not the one listened on (NAT, containers).
    #[arg(long, env = "CELLPAY_CELL_ADVERTISE")]
    advertise: Option<String>,
    /// Where to serve `GET /metrics` (Prometheus text: this cell's engine, its
    /// relays, the process) and `GET /healthz` over HTTP/1.1; none: not served.
    #[arg(long, env = "CELLPAY_CELL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Engine settings, as for `serve` (the data dir holds `cell-<id>`).
    #[command(flatten)]
    serve: ServeArgs,
}

/// How a process reaches the control plane and proves it belongs to the cluster.
#[derive(clap::Args, Clone)]
pub struct ControlArgs {
    /// The control plane: a PostgreSQL URL (postgres://user@host:port/database).
    #[arg(long, env = "CELLPAY_CONTROL")]
    pub control: String,
    /// The cluster secret that routers and cells show each other (at least
    /// 16 printable characters). Never a client token.
    #[arg(long, env = "CELLPAY_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: String,
}

impl ControlArgs {
    pub fn secret(&self) -> anyhow::Result<ClusterSecret> {
        ClusterSecret::new(&self.cluster_secret).context("--cluster-secret")
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// This process, as the control plane records it.
pub fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}@{}", std::process::id(), host.trim())
}

/// Where the processes of a data dir keep their copy of the control plane.
pub fn saved_view_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("control-view.json")
}

/// How long a process with a saved copy of the control plane waits for the
/// control plane before it starts from the copy.
pub const SAVED_VIEW_PATIENCE: Duration = Duration::from_secs(3);

/// Reads the control plane until it answers, for at most `patience`; when
/// `saved` holds a copy, for at most [`SAVED_VIEW_PATIENCE`], then from the
/// copy (a process restarted during an outage of the control plane serves).
pub async fn first_view(url: &str, patience: Duration, saved: &std::path::Path) -> anyhow::Result<ControlView> {
    let has_copy = saved.exists();
    let patience = if has_copy { patience.min(SAVED_VIEW_PATIENCE) } else { patience };
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let attempt = async { Control::connect(url).await?.view().await };
        match attempt.await {
            Ok(view) => return Ok(view),
            Err(e @ cellpay_control::ControlError::NotInitialised) => return Err(e.into()),
            Err(e) if tokio::time::Instant::now() >= deadline && has_copy => {
                let view = cellpay_control::load_view(saved)
                    .with_context(|| format!("the control plane did not answer within {patience:?} ({e})"))?;
                say!(
                    "the control plane did not answer within {patience:?}; starting from its copy in {} (epoch {})",
                    saved.display(),
                    view.map.epoch()
                );
                tracing::warn!("started from the saved copy of the control plane: {e}");
                return Ok(view);
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(anyhow::anyhow!("the control plane did not answer within {patience:?}: {e}"))
            }
            Err(e) => {
                tracing::warn!("waiting for the control plane: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args.serve)?;
    let secret = args.control.secret()?;
    if let Some(cpus) = &config.cpus {
        cpus.pin_process("--cpus")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let listen = Listen { cell: args.cell_listen, advertise: args.advertise, metrics: args.metrics_listen };
    runtime.block_on(serve_cell(config, CellId(args.id), args.control.control, secret, listen))
}

/// Where a cell process listens.
struct Listen {
    cell: SocketAddr,
    advertise: Option<String>,
    metrics: Option<SocketAddr>,
}

async fn serve_cell(
    config: Config,
    id: CellId,
    control_url: String,
    secret: ClusterSecret,
    listen: Listen,
) -> anyhow::Result<ExitCode> {
    let mut shutdown = ShutdownSignal::install()?;
    let saved = saved_view_path(&config.data_dir);
    let view = first_view(&control_url, Duration::from_secs(30), &saved).await?;
    anyhow::ensure!(
        (id.0 as usize) < view.cells.len(),
        "the control plane records {} cells; there is no cell {id}",
        view.cells.len()
    );
    let map = view.map.clone();
    let dir = config.data_dir.join(format!("cell-{}", id.0));
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let mut saver = ViewSaver::new(saved);
    saver.save(&view);
    let (cell, token) = open_store_patiently(&config, id, &map).await?;
    let r = cell.recovery();
    tracing::info!(cell = %id, checkpoint = r.checkpoint_seq, batches = r.batches_replayed, ms = r.duration.as_millis() as u64, "recovered");
    let slot = Arc::new(CellSlot::new(id));
    slot.install(cell.handle());
    // A map the control plane moved on to while this cell was down.
    adopt_map(&slot, &view.map).await;

    let tcp =
        tokio::net::TcpListener::bind(listen.cell).await.with_context(|| format!("listening on {}", listen.cell))?;
    let address =
        listen.advertise.unwrap_or_else(|| tcp.local_addr().expect("a bound listener has an address").to_string());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Notified when a caller works at a newer map than this cell (see `catch_up`).
    let (behind, kick) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let app = cellpay_wire::app(slot.clone(), secret.clone(), behind.clone());
    let server = tokio::spawn(cellpay_wire::serve(tcp, app, stop_rx.clone()));

    // Report where this cell serves, now and every second (the heartbeat the
    // status shows); on PostgreSQL, first check that no newer process took
    // the cell over (a stopped process resumed must not point routers at itself).
    let reporter = {
        let (url, address, mut stop) = (control_url.clone(), address.clone(), stop_rx.clone());
        let process = process_name();
        let fence = token.map(|mine| (config.store.clone(), pg_schema(id), mine));
        let slot = slot.clone();
        tokio::spawn(async move {
            let mut control: Option<Control> = None;
            let mut store_client = None;
            loop {
                if let Some((store, schema, mine)) = &fence {
                    let current = fence_token(&mut store_client, store, schema).await;
                    if let Some(current) = current.filter(|current| current > mine) {
                        say!(
                            "cellpay cell {id}: a newer process took this cell over (fence token {current}, this \
                             process holds {mine}); it commits nothing more and exits"
                        );
                        slot.clear();
                        std::process::exit(FENCED_EXIT);
                    }
                }
                if control.is_none() {
                    control = Control::connect(&url).await.ok();
                }
                if let Some(c) = &control {
                    if let Err(e) = c.report_cell(id, &address, &process).await {
                        tracing::debug!("could not report to the control plane: {e}");
                        control = None;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
        })
    };

    // A client per peer, its address kept current from the control plane; a relay per peer and ledger.
    let (rules, _) = protection_files(&config)?;
    let peers: Vec<RemoteCell> = view
        .cells
        .iter()
        .filter(|c| c.id != id)
        .map(|c| RemoteCell::start(c.id, c.address.as_deref().unwrap_or(""), secret.clone(), RemoteConfig::default()))
        .collect();
    // Credits carry the epoch of the map this cell works at.
    let epoch = slot.status().epoch;
    peers.iter().for_each(|p| p.set_sender_epoch(epoch));
    let relay_config =
        RelayConfig { messages_per_round_max: config.relay_messages_per_round_max, ..RelayConfig::default() };
    let mut relays = Vec::new();
    let mut relay_handles = Vec::new();
    // The `cross_cell_defer` switch as an operator set it in the control plane.
    let deferred = Arc::new(AtomicBool::new(switch_on(&view, "cross_cell_defer")));
    for peer in &peers {
        for shadow in [false, true] {
            let stats = Arc::new(RelayStats::default());
            let gate = Arc::new(RelayGate::new(rules.breaker, deferred.clone()));
            relay_handles.push(cellpay_router::RelayHandle {
                source: id,
                dest: peer.cell(),
                shadow,
                stats: stats.clone(),
                gate: gate.clone(),
            });
            let relay = Relay {
                source: slot.clone() as Arc<dyn CellClient>,
                dest: Arc::new(peer.clone()) as Arc<dyn CellClient>,
                shadow,
                config: relay_config,
                stats: stats.clone(),
                gate,
            };
            relays.push(tokio::spawn(relay.run(stop_rx.clone())));
        }
    }
    let follower = {
        let mut views = cellpay_control::follow_kicked(control_url.clone(), kick.clone());
        let (peers, slot) = (peers.clone(), slot.clone());
        let deferred = deferred.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { return },
                    _ = stopped(&mut stop) => return,
                }
                let view = views.borrow_and_update().clone();
                let Some(view) = view else { continue };
                saver.save(&view);
                if view.map.epoch() > slot.status().epoch && adopt_map(&slot, &view.map).await {
                    let epoch = slot.status().epoch;
                    peers.iter().for_each(|p| p.set_sender_epoch(epoch));
                }
                let defer = switch_on(&view, "cross_cell_defer");
                if deferred.swap(defer, std::sync::atomic::Ordering::Relaxed) != defer {
                    tracing::warn!(deferred = defer, "cross-cell delivery set from the control plane");
                }
                for peer in &peers {
                    if let Some(address) = view.cells.get(peer.cell().0 as usize).and_then(|c| c.address.as_deref()) {
                        peer.set_address(address);
                    }
                }
            }
        })
    };
    // A caller showed a newer map: read the control plane at once, and ask
    // the peers (a cell cut off from the control plane catches up from them).
    let catch_up = {
        let (peers, slot, mut stop) = (peers.clone(), slot.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = behind.notified() => {}
                    _ = stopped(&mut stop) => return,
                }
                kick.notify_one();
                let mut asking = tokio::task::JoinSet::new();
                for peer in &peers {
                    let peer = peer.clone();
                    asking.spawn(async move { peer.shard_map().await });
                }
                let mut newest: Option<cellpay_core::ShardMap> = None;
                // Every peer that answers counts; one that is down or unknown does not stop the others.
                while let Some(asked) = asking.join_next().await {
                    let Ok(Some(map)) = asked else { continue };
                    if newest.as_ref().is_none_or(|n| map.epoch() > n.epoch()) {
                        newest = Some(map);
                    }
                }
                if let Some(map) = newest {
                    if adopt_map(&slot, &map).await {
                        let epoch = slot.status().epoch;
                        peers.iter().for_each(|p| p.set_sender_epoch(epoch));
                    }
                }
                tokio::time::sleep(CATCH_UP_GAP).await;
            }
        })
    };
    // On PostgreSQL a failed engine is a lost database connection (a
    // primary that died, a restart): this process exits, and the next one
    // recovers from whatever database then accepts writes (the promoted
    // standby) and reads the highest committed batch before it answers.
    if token.is_some() {
        let slot = slot.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FAILED_POLL).await;
                let Some(handle) = slot.handle() else { continue };
                if handle.is_failed() {
                    say!(
                        "cellpay cell {id}: the engine stopped ({}); exiting so that a new process recovers the \
                         cell from the database",
                        handle.health()
                    );
                    slot.clear();
                    std::process::exit(STORE_LOST_EXIT);
                }
            }
        });
    }
    // The ledger as SQL tables, filled from the log by a projector of its own.
    let projection = match token.is_some() && config.sql_tables {
        true => Some(
            cellpay_cell::Projector::spawn(&config.store, &pg_schema(id), id)
                .context("starting the SQL projector's thread")?,
        ),
        false => None,
    };
    let metrics = match listen.metrics {
        Some(at) => {
            let stats = projection.as_ref().map(|p| p.stats.clone());
            Some(serve_metrics(at, slot.clone(), relay_handles, stats, stop_rx.clone()).await?)
        }
        None => None,
    };
    let data_in = match config.store.as_str() {
        "embedded" => dir.display().to_string(),
        _ => format!("PostgreSQL, schema {}", pg_schema(id)),
    };
    say!("cellpay cell {id} serving the cell protocol on {address} (data in {data_in})");

    shutdown.recv().await;
    say!("cellpay cell {id} stopping");
    let _ = stop_tx.send(true);
    let _ = server.await;
    for r in relays {
        let _ = r.await;
    }
    let _ = reporter.await;
    let _ = follower.await;
    let _ = catch_up.await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some(projector) = projection {
        // The projector stops between two of its transactions; one stuck on
        // a dead connection is left behind (the process exits), never waited for.
        projector.stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !projector.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    slot.clear();
    tokio::task::spawn_blocking(move || cell.stop())
        .await
        .expect("stopping does not panic")
        .context("stopping the cell")?;
    say!("cellpay cell {id} stopped");
    Ok(ExitCode::SUCCESS)
}

/// The exit code of a cell process fenced out by a newer one.
pub const FENCED_EXIT: i32 = 3;
/// The exit code of a cell process whose PostgreSQL store failed under it.
pub const STORE_LOST_EXIT: i32 = 4;
/// How often a cell process on PostgreSQL looks whether its engine failed.
const FAILED_POLL: Duration = Duration::from_millis(20);
/// How long a cell process keeps trying to open its PostgreSQL store (the
/// database restarting, a standby being promoted) before it gives up.
pub const STORE_OPEN_PATIENCE: Duration = Duration::from_secs(60);
/// The pause between two tries.
const STORE_OPEN_RETRY: Duration = Duration::from_millis(100);

/// Opens and recovers the cell's store. On PostgreSQL, a database that does
/// not answer or does not accept writes yet (a primary restarting, a standby
/// not yet promoted) is tried again for up to [`STORE_OPEN_PATIENCE`]; a
/// corrupt or fenced store is not.
async fn open_store_patiently(
    config: &Config,
    id: CellId,
    map: &cellpay_core::ShardMap,
) -> anyhow::Result<(cellpay_cell::Cell, Option<i64>)> {
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        let opening = {
            let (config, map, engine) = (config.clone(), map.clone(), engine_config(config));
            tokio::task::spawn_blocking(move || crate::serve::open_fenced_cell(&config, id, &map, engine))
        };
        let error = match opening.await.expect("recovery does not panic") {
            Ok(opened) => {
                if said {
                    say!(
                        "cellpay cell {id}: the database answers again after {:.2} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(opened);
            }
            Err(e) => e,
        };
        // A PostgreSQL error anywhere in the chain: at open, or during the
        // replay (recovery's errors wrap the store's transparently).
        let unreachable = error.chain().any(|c| {
            c.downcast_ref::<tokio_postgres::Error>().is_some()
                || matches!(
                    c.downcast_ref::<cellpay_store::StoreError>(),
                    Some(cellpay_store::StoreError::Postgres { .. })
                )
        });
        if !unreachable || started.elapsed() >= STORE_OPEN_PATIENCE {
            return Err(error);
        }
        if !said {
            say!("cellpay cell {id}: waiting for a database that accepts writes ({error:#})");
            said = true;
        }
        tokio::time::sleep(STORE_OPEN_RETRY).await;
    }
}

/// The fence token the cell's PostgreSQL store holds now, if it can be read
/// (through `client`, connected when missing and dropped after a failure).
async fn fence_token(client: &mut Option<tokio_postgres::Client>, store: &str, schema: &str) -> Option<i64> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let connect = tokio_postgres::connect(store, tokio_postgres::NoTls);
        let (c, connection) = tokio::time::timeout(Duration::from_secs(2), connect).await.ok()?.ok()?;
        tokio::spawn(connection);
        *client = Some(c);
    }
    let sql = format!("SELECT token FROM \"{schema}\".fence");
    let read = tokio::time::timeout(Duration::from_secs(2), client.as_ref()?.query_one(&sql, &[])).await;
    match read {
        Ok(Ok(row)) => Some(row.get(0)),
        _ => {
            *client = None;
            None
        }
    }
}

/// The least time between two catch-ups a caller's newer epoch asks for.
const CATCH_UP_GAP: Duration = Duration::from_millis(200);

/// Keeps the data dir's copy of the control plane: writes a view that differs
/// from the last one written (rarely: a view changes when the map, an
/// address, a switch or the rules do).
pub struct ViewSaver {
    path: std::path::PathBuf,
    last: String,
}

impl ViewSaver {
    pub fn new(path: std::path::PathBuf) -> Self {
        Self { path, last: String::new() }
    }

    pub fn save(&mut self, view: &ControlView) {
        let text = view.to_saved();
        if text == self.last {
            return;
        }
        // Processes of one data dir share the copy: one whose follow lags
        // must not put an older map back.
        if let Ok(saved) = cellpay_control::load_view(&self.path) {
            if saved.map.epoch() > view.map.epoch() {
                return;
            }
        }
        // A small synced write; off the runtime's reactor.
        match tokio::task::block_in_place(|| cellpay_control::save_text(&self.path, &text)) {
            Ok(()) => self.last = text,
            Err(e) => tracing::warn!("could not save the copy of the control plane to {}: {e}", self.path.display()),
        }
    }
}

/// Installs `map` in the cell's engine (durably, as a logged command) when
/// it is newer than the one the cell works at; answers whether it did.
async fn adopt_map(slot: &CellSlot, map: &cellpay_core::ShardMap) -> bool {
    let from = slot.status().epoch;
    if map.epoch() <= from {
        return false;
    }
    let install = cellpay_core::Command::real(cellpay_core::Op::InstallShardMap(map.clone()));
    match slot.submit(vec![install]).await.as_deref() {
        Ok([cellpay_core::Outcome::ShardMapInstalled { epoch }]) => {
            say!("cellpay cell {}: shard map epoch {from} -> {epoch}", slot.cell());
            true
        }
        other => {
            tracing::warn!(cell = %slot.cell(), epoch = map.epoch(), "the shard map was not installed: {other:?}");
            false
        }
    }
}

/// Is the operator's switch `name` on in the control plane? (A cell runs no
/// triggers: `auto` is off here.)
fn switch_on(view: &ControlView, name: &str) -> bool {
    view.switches.iter().any(|(n, mode)| n == name && mode == "on")
}

/// Serves this cell's `/metrics` and `/healthz` over HTTP/1.1 on `at` until `stop`.
async fn serve_metrics(
    at: SocketAddr,
    slot: Arc<CellSlot>,
    relays: Vec<cellpay_router::RelayHandle>,
    projection: Option<Arc<cellpay_cell::ProjectorStats>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let cell = slot.cell();
    use axum::routing::get;
    // No route here takes a token; the state wants one, so it gets one nobody knows.
    use rand::distr::{Alphanumeric, SampleString};
    let unknown = format!("admin:{}", Alphanumeric.sample_string(&mut rand::rng(), 40));
    let state = cellpay_api::AppState::new(
        cellpay_api::Auth::new(vec![cellpay_api::Token::parse(&unknown)?]),
        cellpay_api::ApiLimits::default(),
        cellpay_api::FrontLimits::default(),
    );
    let _ = state.0.local_cells.set(vec![slot]);
    let _ = state.0.relays.set(relays);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move |axum::extract::State(state): axum::extract::State<cellpay_api::AppState>| async move {
                let mut text = cellpay_api::metrics::render(&state).await;
                if let Some(p) = &projection {
                    text.push_str(&p.render_prometheus(cell));
                }
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state.clone());
    let tcp = tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening on {at}"))?;
    say!("cellpay cell metrics on http://{}/metrics", tcp.local_addr()?);
    // The front door's timeouts and connection caps hold here too.
    let front = cellpay_api::FrontLimits::default();
    Ok(tokio::spawn(async move {
        if let Err(e) = cellpay_api::front::serve(tcp, app, state, front, stop).await {
            tracing::warn!("the metrics listener stopped: {e}");
        }
    }))
}
