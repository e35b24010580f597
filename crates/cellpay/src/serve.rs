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
use cellpay_api::{listener::LimitedListener, ApiLimits, AppState, Auth, Token};
use cellpay_cell::{Cell, CellClient, EngineConfig, RelayConfig};
use cellpay_core::{CellId, Limits, ShardMap};
use cellpay_router::Cluster;
use cellpay_store::StoreOptions;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::config::{Config, FileAuth, FileToken, ServeArgs};

/// Prints a line to stdout, ignoring a closed stdout: a server does not stop
/// because whoever started it stopped reading.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// What `<data-dir>/cluster.toml` records when the cluster is created.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    cells: u32,
    shards: u32,
}

fn cluster_file(config: &Config) -> anyhow::Result<ShardMap> {
    let path = config.data_dir.join("cluster.toml");
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let stored: ClusterFile = toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
        anyhow::ensure!(
            stored.cells == config.cells,
            "{} holds a cluster of {} cells, but {} were asked for; moving shards between cells is not supported yet",
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
    } else {
        let text = toml::to_string(&ClusterFile { cells: config.cells, shards: config.shards })?;
        write_private(&path, &text, 0o644)?;
    }
    Ok(ShardMap::round_robin(config.shards, config.cells)?)
}

/// Writes a file durably (temporary name, fsync, rename) with `mode`.
fn write_private(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(mode).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Configured tokens, or those in `<data-dir>/tokens.toml`, or fresh ones written there.
fn tokens(config: &Config) -> anyhow::Result<Vec<Token>> {
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
                .map(|role| FileToken { role: role.to_string(), secret: Alphanumeric.sample_string(&mut rng, 40) })
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
    let stored: FileAuth = toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    parse(&stored.tokens.iter().map(|t| format!("{}:{}", t.role, t.secret)).collect::<Vec<_>>())
}

fn engine_config(config: &Config) -> EngineConfig {
    EngineConfig {
        batch_commands_max: config.batch_commands_max,
        queue_commands_max: config.queue_commands_max,
        checkpoint_log_bytes: config.checkpoint_log_mib << 20,
        limits: Limits {
            transfers_retained_max: config.transfers_retained_max,
            history_entries_max: config.history_entries_max,
        },
        store: StoreOptions::default(),
    }
}

/// Opens every cell, each on its own thread, and waits for all.
fn open_cells(config: &Config, map: &ShardMap) -> anyhow::Result<Vec<Cell>> {
    let engine = engine_config(config);
    std::thread::scope(|scope| {
        let opening: Vec<_> = (0..config.cells)
            .map(|c| {
                let dir = config.data_dir.join(format!("cell-{c}"));
                scope.spawn(move || {
                    Cell::open_embedded(&dir, CellId(c), map, engine)
                        .with_context(|| format!("recovering cell {c} from {}", dir.display()))
                })
            })
            .collect();
        opening.into_iter().map(|t| t.join().expect("cell recovery does not panic")).collect()
    })
}

/// SIGTERM and SIGINT, registered once at start: a signal that arrives between
/// two waits is kept for the next wait, never lost.
struct ShutdownSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let map = cluster_file(&config)?;
    let auth = Auth::new(tokens(&config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config, map, auth))
}

async fn serve(config: Config, map: ShardMap, auth: Auth) -> anyhow::Result<ExitCode> {
    let mut shutdown = ShutdownSignal::install()?;
    let limits = ApiLimits { body_bytes_max: config.body_bytes_max, batch_items_max: config.batch_items_max };
    let state = AppState::new(auth, limits);
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
    let listener = LimitedListener::new(tcp, config.connections_max);
    let app = cellpay_api::router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            })
            .await
    });

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
    let handles: Vec<_> = cells.iter().map(|c| c.handle()).collect();
    let clients: Vec<Arc<dyn CellClient>> =
        handles.iter().map(|h| Arc::new(h.clone()) as Arc<dyn CellClient>).collect();
    let cluster = Arc::new(Cluster::new(map, clients));
    let relay_config =
        RelayConfig { messages_per_round_max: config.relay_messages_per_round_max, ..RelayConfig::default() };
    let relays = cluster.spawn_relays(relay_config, &stop_rx);
    let _ = state.0.local_cells.set(handles);
    let _ = state.0.relays.set(relays);
    let _ = state.0.cluster.set(cluster);
    say!("cellpay ready: every cell has recovered");

    shutdown.recv().await;
    say!("cellpay stopping: draining requests, then stopping cells");
    let _ = stop_tx.send(true);
    server.await.context("the HTTP server task")?.context("the HTTP server")?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for cell in cells {
            cell.stop().context("stopping a cell")?;
        }
        Ok(())
    })
    .await
    .expect("stopping cells does not panic")?;
    say!("cellpay stopped");
    Ok(ExitCode::SUCCESS)
}
