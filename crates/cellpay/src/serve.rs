//! `cellpay serve`: a whole cluster in one process.
//!
//! N cells with their embedded stores under `<data-dir>/cell-<n>`, the shard
//! map in `<data-dir>/cluster.toml`, the router, the relays between every pair
//! of cells, and the HTTP API. The listener opens first; `/readyz` turns ready
//! once every cell has recovered. SIGTERM or SIGINT: stop accepting, finish the
//! requests in flight, stop the relays, stop every cell (answering what is
//! queued, writing a final checkpoint), exit 0.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use cellpay_api::{ApiLimits, AppState, Auth, Token};
use cellpay_cell::{BoxFuture, Cell, CellClient, CellSlot, EngineConfig, RelayConfig, TierConfig};
use cellpay_core::{CellId, Limits, ShardMap};
use cellpay_router::{Cluster, FlowRules, Plan, Protection};
use cellpay_store::StoreOptions;
use cellpay_tier::TierOptions;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::config::{Config, FileAuth, FileToken, ServeArgs};

/// What `<data-dir>/cluster.toml` records when the cluster is created.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    cells: u32,
    shards: u32,
    /// The shard map, once a shard has moved (until then: round-robin at epoch 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owners: Option<Vec<u32>>,
}

impl ClusterFile {
    fn map(&self) -> anyhow::Result<ShardMap> {
        match (self.epoch, &self.owners) {
            (Some(epoch), Some(owners)) => {
                anyhow::ensure!(owners.len() == self.shards as usize, "the map names {} shards", owners.len());
                anyhow::ensure!(owners.iter().all(|o| *o < self.cells), "the map names a cell the cluster lacks");
                Ok(ShardMap::new(epoch, owners.iter().copied().map(CellId).collect())?)
            }
            _ => Ok(ShardMap::round_robin(self.shards, self.cells)?),
        }
    }
}

/// The shard map's authority in one process: `cluster.toml`, written
/// durably, and the router's copy. A swap is a compare-and-set on the epoch.
pub(crate) struct FileAuthority {
    path: std::path::PathBuf,
    cells: u32,
    map: tokio::sync::Mutex<ShardMap>,
    cluster: Arc<Cluster>,
}

impl cellpay_router::MapAuthority for FileAuthority {
    fn current(&self) -> BoxFuture<'_, Result<ShardMap, cellpay_router::SwapError>> {
        Box::pin(async move { Ok(self.map.lock().await.clone()) })
    }

    fn swap(&self, next: ShardMap) -> BoxFuture<'_, Result<(), cellpay_router::SwapError>> {
        Box::pin(async move {
            let mut map = self.map.lock().await;
            if map.epoch() + 1 != next.epoch() || map.check_successor(&next).is_err() {
                return Err(cellpay_router::SwapError::Lost(format!("the map is at epoch {}", map.epoch())));
            }
            let file = ClusterFile {
                cells: self.cells,
                shards: next.shards(),
                epoch: Some(next.epoch()),
                owners: Some(next.owners().iter().map(|c| c.0).collect()),
            };
            let text = toml::to_string(&file).map_err(|e| cellpay_router::SwapError::Unavailable(e.to_string()))?;
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || write_private(&path, &text, 0o644))
                .await
                .expect("writing does not panic")
                .map_err(|e| cellpay_router::SwapError::Unavailable(format!("{e:#}")))?;
            *map = next.clone();
            self.cluster.set_map(next);
            Ok(())
        })
    }
}

fn cluster_file(config: &Config) -> anyhow::Result<ShardMap> {
    let path = config.data_dir.join("cluster.toml");
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let stored: ClusterFile = toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
        let map = stored.map().with_context(|| format!("{} is damaged", path.display()))?;
        if config.spare_cells > 0 {
            say!("cellpay: spare_cells applies when a cluster is created; this one exists and its shard map stands");
        }
        anyhow::ensure!(
            stored.cells <= config.cells,
            "{} holds a cluster of {} cells, but {} were asked for; a cluster grows, and a drained cell stays \
             in it owning no shard",
            config.data_dir.display(),
            stored.cells,
            config.cells
        );
        anyhow::ensure!(
            stored.shards == config.shards,
            "{} holds a cluster of {} shards, but {} were asked for; the shard count is fixed at creation",
            config.data_dir.display(),
            stored.shards,
            config.shards
        );
        if stored.cells < config.cells {
            // New cells start empty: the map keeps every shard where it is,
            // and a rebalance fills them (`POST /v1/admin/rebalance`).
            let grown = ClusterFile {
                cells: config.cells,
                shards: config.shards,
                epoch: Some(map.epoch()),
                owners: Some(map.owners().iter().map(|c| c.0).collect()),
            };
            write_private(&path, &toml::to_string(&grown)?, 0o644)?;
            say!(
                "cellpay: the cluster grows from {} to {} cells; the new cells own no shard until a rebalance",
                stored.cells,
                config.cells
            );
        }
        Ok(map)
    } else if config.spare_cells > 0 {
        // The spare cells own nothing: the shards go round-robin over the others.
        let map = ShardMap::round_robin(config.shards, config.cells - config.spare_cells)?;
        let file = ClusterFile {
            cells: config.cells,
            shards: config.shards,
            epoch: Some(map.epoch()),
            owners: Some(map.owners().iter().map(|c| c.0).collect()),
        };
        write_private(&path, &toml::to_string(&file)?, 0o644)?;
        Ok(map)
    } else {
        let text =
            toml::to_string(&ClusterFile { cells: config.cells, shards: config.shards, epoch: None, owners: None })?;
        write_private(&path, &text, 0o644)?;
        Ok(ShardMap::round_robin(config.shards, config.cells)?)
    }
}

/// Writes a file durably (temporary name, fsync, rename) with `mode`.
pub(crate) fn write_private(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(mode).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Configured tokens, or those in `<data-dir>/tokens.toml`, or fresh ones written there.
pub(crate) fn tokens(config: &Config) -> anyhow::Result<Vec<Token>> {
    let parse = |specs: &[String]| -> anyhow::Result<Vec<Token>> {
        specs.iter().map(|s| Token::parse(s).map_err(anyhow::Error::from)).collect()
    };
    if !config.tokens.is_empty() {
        return parse(&config.tokens);
    }
    let path = config.data_dir.join("tokens.toml");
    if !path.exists() {
        let mut rng = rand::rng();
        let fresh = FileAuth {
            tokens: ["client", "admin"]
                .iter()
                .map(|role| FileToken {
                    role: role.to_string(),
                    tenant: None,
                    secret: Alphanumeric.sample_string(&mut rng, 40),
                })
                .collect(),
        };
        #[derive(Serialize)]
        struct Out<'a> {
            tokens: Vec<OutToken<'a>>,
        }
        #[derive(Serialize)]
        struct OutToken<'a> {
            role: &'a str,
            secret: &'a str,
        }
        let out = Out { tokens: fresh.tokens.iter().map(|t| OutToken { role: &t.role, secret: &t.secret }).collect() };
        write_private(&path, &toml::to_string(&out)?, 0o600)?;
        say!("no tokens configured: wrote a client and an admin token to {}", path.display());
    } else {
        say!("using the tokens in {}", path.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let stored: FileAuth = crate::config::parse_toml(&text, &path)?;
    parse(&stored.tokens.iter().map(FileToken::spec).collect::<Vec<_>>())
}

pub(crate) fn engine_config(config: &Config) -> EngineConfig {
    EngineConfig {
        batch_commands_max: config.batch_commands_max,
        batch_linger: std::time::Duration::from_micros(config.batch_linger_us),
        queue_commands_max: config.queue_commands_max,
        checkpoint_log_bytes: config.checkpoint_log_mib << 20,
        limits: Limits {
            transfers_retained_max: config.transfers_retained_max,
            history_entries_max: config.history_entries_max,
        },
        store: StoreOptions::default(),
        queue_delay_target: std::time::Duration::from_millis(config.queue_delay_target_ms),
        stall_after: std::time::Duration::from_millis(config.stall_after_ms),
        idempotency_window: std::time::Duration::from_secs(config.idempotency_window_s),
        tier: TierConfig {
            enabled: config.idempotency_tier,
            options: TierOptions { bytes_max: config.idempotency_disk_bytes_max, ..TierOptions::default() },
            ..TierConfig::default()
        },
        commands_per_s_max: config.cell_commands_per_s_max,
        ..EngineConfig::default()
    }
}

/// Opens (recovers) cell `id` from the store `config.store` names: files
/// under `<data-dir>/cell-<id>`, or the schema `cell_<id>` of a PostgreSQL
/// database (the idempotency tier, derived from the log, stays on local disk).
pub fn open_cell(config: &Config, id: CellId, map: &ShardMap, engine: EngineConfig) -> anyhow::Result<Cell> {
    open_fenced_cell(config, id, map, engine).map(|(cell, _)| cell)
}

/// As [`open_cell`], with the fence token the cell's store took it over with
/// (PostgreSQL; `None` for the embedded store, whose file lock fences).
pub fn open_fenced_cell(
    config: &Config,
    id: CellId,
    map: &ShardMap,
    engine: EngineConfig,
) -> anyhow::Result<(Cell, Option<i64>)> {
    let dir = config.data_dir.join(format!("cell-{}", id.0));
    match config.store.as_str() {
        "embedded" => Cell::open_embedded(&dir, id, map, engine)
            .map(|cell| (cell, None))
            .with_context(|| format!("recovering cell {id} from {}", dir.display())),
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let schema = pg_schema(id);
            let store = cellpay_store::PostgresStore::open(url, &schema, cellpay_store::PostgresOptions::default())
                .with_context(|| format!("opening cell {id}'s store in PostgreSQL (schema {schema})"))?;
            let tier = engine.tier.enabled.then(|| dir.join("idempotency"));
            if tier.is_some() {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let token = store.token();
            Cell::start_with_tier(Box::new(store), tier.as_deref(), id, map, engine)
                .map(|cell| (cell, Some(token)))
                .with_context(|| format!("recovering cell {id} from PostgreSQL (schema {schema})"))
        }
        _ => anyhow::bail!("--store is `embedded` or a PostgreSQL URL starting with postgres://"),
    }
}

/// The PostgreSQL schema cell `id` keeps its data in (`--store postgres://…`).
pub(crate) fn pg_schema(id: CellId) -> String {
    format!("cell_{}", id.0)
}

/// Opens every cell, each on its own thread, and waits for all.
fn open_cells(config: &Config, map: &ShardMap) -> anyhow::Result<Vec<Cell>> {
    let engine = engine_config(config);
    std::thread::scope(|scope| {
        let opening: Vec<_> =
            (0..config.cells).map(|c| scope.spawn(move || open_cell(config, CellId(c), map, engine))).collect();
        opening.into_iter().map(|t| t.join().expect("cell recovery does not panic")).collect()
    })
}

/// SIGTERM and SIGINT, registered once at start: a signal that arrives between
/// two waits is kept for the next wait, never lost.
pub(crate) struct ShutdownSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    pub(crate) fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The flow rules and degrade plan: from their files, or the defaults.
pub(crate) fn protection_files(config: &Config) -> anyhow::Result<(FlowRules, Plan)> {
    let read = |path: &Path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    let rules = match &config.rules {
        Some(path) => FlowRules::from_toml(&read(path)?)
            .map_err(|e| anyhow::anyhow!("{} is not valid flow rules: {e}", path.display()))?,
        None => FlowRules::default(),
    };
    let plan = match &config.degrade_plan {
        Some(path) => Plan::from_toml(&read(path)?)
            .map_err(|e| anyhow::anyhow!("{} is not a valid degrade plan: {e}", path.display()))?,
        None => Plan::from_toml(cellpay_router::degrade::PLAN_BUNDLED).expect("the bundled plan is valid"),
    };
    Ok((rules, plan))
}

/// The cells of this process, by slot: the drills halt and restart them.
struct LocalCells {
    config: Config,
    map: ShardMap,
    slots: Vec<Arc<CellSlot>>,
    running: Vec<std::sync::Mutex<Option<Cell>>>,
}

impl LocalCells {
    fn stop_all(&self) -> anyhow::Result<()> {
        for (slot, running) in self.slots.iter().zip(&self.running) {
            slot.clear();
            if let Some(cell) = running.lock().expect("cell lock").take() {
                cell.stop().context("stopping a cell")?;
            }
        }
        Ok(())
    }

    fn halt_blocking(&self, cell: u32) -> Result<String, String> {
        let i = cell as usize;
        self.slots[i].clear();
        let running = self.running[i].lock().expect("cell lock").take();
        let Some(running) = running else { return Err(format!("cell {cell} is not running")) };
        running.halt().map_err(|e| format!("halting cell {cell}: {e}"))?;
        tracing::warn!(cell, "cell halted for a drill");
        Ok(format!("cell {cell} halted"))
    }

    fn restart_blocking(&self, cell: u32) -> Result<(String, cellpay_cell::CellHandle), String> {
        let i = cell as usize;
        let mut running = self.running[i].lock().expect("cell lock");
        if running.is_some() {
            return Err(format!("cell {cell} is already running"));
        }
        let opened = open_cell(&self.config, CellId(cell), &self.map, engine_config(&self.config))
            .map_err(|e| format!("{e:#}"))?;
        let ms = opened.recovery().duration.as_millis();
        let handle = opened.handle();
        *running = Some(opened);
        tracing::warn!(cell, ms = ms as u64, "cell restarted for a drill");
        Ok((format!("cell {cell} recovered in {ms} ms and serves again"), handle))
    }
}

/// The drill endpoints' view of the local cells.
struct Drills(Arc<LocalCells>, Arc<Cluster>);

impl cellpay_api::CellControl for Drills {
    fn halt(&self, cell: u32) -> BoxFuture<'_, Result<String, String>> {
        let cells = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || cells.halt_blocking(cell)).await.map_err(|e| e.to_string())?
        })
    }

    fn restart(&self, cell: u32) -> BoxFuture<'_, Result<String, String>> {
        let cells = self.0.clone();
        Box::pin(async move {
            let (message, handle) = tokio::task::spawn_blocking({
                let cells = cells.clone();
                move || cells.restart_blocking(cell)
            })
            .await
            .map_err(|e| e.to_string())??;
            cells.slots[cell as usize].install(handle);
            // A move may have changed the map while the cell was down.
            let map = self.1.map().as_ref().clone();
            let slot = &cells.slots[cell as usize];
            if slot.status().epoch < map.epoch() {
                let _ = slot.submit(vec![cellpay_core::Command::real(cellpay_core::Op::InstallShardMap(map))]).await;
            }
            Ok(message)
        })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    // Before the runtime and the engines start a thread: each inherits the set.
    if let Some(cpus) = &config.cpus {
        cpus.pin_process("--cpus")?;
        tracing::info!(cpus = %cpus, "pinned: every thread of this process runs on these CPUs");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let map = cluster_file(&config)?;
    let auth = Auth::new(tokens(&config)?);
    let (rules, plan) = protection_files(&config)?;
    let protection = Arc::new(Protection::new(rules, plan, auth.token_roles(), config.cells as usize));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config, map, auth, protection))
}

async fn serve(config: Config, map: ShardMap, auth: Auth, protection: Arc<Protection>) -> anyhow::Result<ExitCode> {
    let mut shutdown = ShutdownSignal::install()?;
    let limits = ApiLimits { body_bytes_max: config.body_bytes_max, batch_items_max: config.batch_items_max };
    let state = AppState::new(auth, limits, config.front.clone());
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = tcp.local_addr()?;
    say!(
        "cellpay listening on http://{addr} ({} cells, {} shards, data in {})",
        config.cells,
        map.shards(),
        config.data_dir.display()
    );
    let app = cellpay_api::router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server =
        tokio::spawn(cellpay_api::front::serve(tcp, app, state.clone(), config.front.clone(), stop_rx.clone()));

    let recovering = {
        let (config, map) = (config.clone(), map.clone());
        tokio::task::spawn_blocking(move || open_cells(&config, &map))
    };
    let cells = tokio::select! {
        opened = recovering => opened.expect("recovery does not panic")?,
        _ = shutdown.recv() => {
            let _ = stop_tx.send(true);
            return Ok(ExitCode::SUCCESS);
        }
    };
    for cell in &cells {
        let r = cell.recovery();
        tracing::info!(
            cell = %cell.handle().cell(),
            checkpoint = r.checkpoint_seq,
            batches = r.batches_replayed,
            ms = r.duration.as_millis() as u64,
            "recovered"
        );
        if let Some(t) = &r.torn_tail {
            tracing::warn!(file = %t.file.display(), offset = t.offset, bytes = t.bytes_dropped, "cut a torn log tail: {}", t.reason);
        }
    }
    let slots: Vec<Arc<CellSlot>> = cells
        .iter()
        .map(|c| {
            let slot = Arc::new(CellSlot::new(c.handle().cell()));
            slot.install(c.handle());
            slot
        })
        .collect();
    let clients: Vec<Arc<dyn CellClient>> = slots.iter().map(|s| s.clone() as Arc<dyn CellClient>).collect();
    let cluster = Arc::new(Cluster::new(map.clone(), clients, protection));
    let relay_config =
        RelayConfig { messages_per_round_max: config.relay_messages_per_round_max, ..RelayConfig::default() };
    let relays = cluster.spawn_relays(relay_config, &stop_rx);
    let signals = cluster.spawn_signals(stop_rx.clone());
    let local = Arc::new(LocalCells {
        config: config.clone(),
        map,
        slots: slots.clone(),
        running: cells.into_iter().map(|c| std::sync::Mutex::new(Some(c))).collect(),
    });
    if config.drills {
        let _ = state.0.control.set(Arc::new(Drills(local.clone(), cluster.clone())));
        say!("drills enabled: POST /v1/admin/cells/{{id}}/halt and /restart are open to admin tokens");
    }
    let oplog_path = config.data_dir.join("operator.log");
    let oplog = cellpay_api::oplog::OperatorLog::open(&oplog_path)
        .with_context(|| format!("opening the operator log {}", oplog_path.display()))?;
    let _ = state.0.oplog.set(Arc::new(oplog));
    let _ = state.0.local_cells.set(slots);
    let _ = state.0.relays.set(relays);
    let authority = Arc::new(FileAuthority {
        path: config.data_dir.join("cluster.toml"),
        cells: config.cells,
        map: tokio::sync::Mutex::new(cluster.map().as_ref().clone()),
        cluster: cluster.clone(),
    });
    // Every cell works at the authority's map (one may have stopped before a move reached it).
    let current = cluster.map().as_ref().clone();
    for cell in cluster.cells() {
        let install = cellpay_core::Command::real(cellpay_core::Op::InstallShardMap(current.clone()));
        if cell.status().epoch < current.epoch() {
            let _ = cell.submit(vec![install]).await;
        }
    }
    let lane = cellpay_router::moves::start_lane().context("starting the shard mover's thread")?;
    let mover = Arc::new(
        cellpay_router::Mover::new(cluster.cells().to_vec(), authority, cellpay_router::MoveLimits::default())
            .on_lane(lane),
    );
    // A move a crash left half done goes the way the map says before anything is served.
    match mover.resume().await {
        Ok(resumed) if resumed.is_empty() => {}
        Ok(resumed) => say!("finished {} shard moves a stop left half done: {resumed:?}", resumed.len()),
        Err(e) => tracing::warn!("could not finish the shard moves a stop left half done: {e}"),
    }
    let _ = state.0.mover.set(mover);
    let _ = state.0.cluster.set(cluster);
    say!("cellpay ready: every cell has recovered");

    shutdown.recv().await;
    say!("cellpay stopping: draining requests, then stopping cells");
    let _ = stop_tx.send(true);
    server.await.context("the HTTP server task")?.context("the HTTP server")?;
    let _ = signals.await;
    tokio::task::spawn_blocking(move || local.stop_all()).await.expect("stopping cells does not panic")?;
    say!("cellpay stopped");
    Ok(ExitCode::SUCCESS)
}
