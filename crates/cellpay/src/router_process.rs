//! `cellpay router`: one stateless HTTP v1 front for cells in other processes.
//!
//! It serves the same contract as `serve` (the protection stack lives here),
//! with a [`RemoteCell`] per cell instead of a cell in the process. It keeps
//! a copy of the control plane (cells' addresses, the shard map), refreshed
//! by notification and polling; it never reads it on a payment's path, and a
//! control plane that is down leaves the last copy in place. Several routers
//! can front the same cells: they share nothing but the cells and the
//! control plane.
//!
//! SIGTERM or SIGINT: stop accepting, finish the requests in flight, leave
//! the control plane's list of routers, exit 0.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cellpay_api::{ApiLimits, AppState, Auth};
use cellpay_cell::CellClient;
use cellpay_control::Control;
use cellpay_router::{Cluster, Protection};
use cellpay_wire::{RemoteCell, RemoteConfig};

use crate::cell_process::{first_view, saved_view_path, stopped, ControlArgs, ViewSaver};
use crate::config::{Config, ServeArgs};
use crate::serve::{protection_files, tokens, ShutdownSignal};

#[derive(clap::Args)]
pub struct Args {
    /// This router's name in the control plane [default: router-<pid>].
    #[arg(long, env = "CELLPAY_ROUTER_NAME")]
    name: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// HTTP settings, as for `serve` (`--listen`, tokens, limits, flow rules, degrade plan).
    #[command(flatten)]
    serve: ServeArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args.serve)?;
    let secret = args.control.secret()?;
    if let Some(cpus) = &config.cpus {
        cpus.pin_process("--cpus")?;
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let auth = Auth::new(tokens(&config)?);
    let name = args.name.unwrap_or_else(|| format!("router-{}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut shutdown = ShutdownSignal::install()?;
        let saved = saved_view_path(&config.data_dir);
        let view = first_view(&args.control.control, Duration::from_secs(30), &saved).await?;
        let mut saver = ViewSaver::new(saved);
        saver.save(&view);
        let (rules, plan) = protection_files(&config)?;
        let cells = view.cells.len();
        let protection = Arc::new(Protection::new(rules, plan, auth.token_roles(), cells));
        // A client of every cell, started on the runtime this is called on.
        let start_remotes = || -> Vec<RemoteCell> {
            let start = |c: &cellpay_control::CellEntry| {
                RemoteCell::start(c.id, c.address.as_deref().unwrap_or(""), secret.clone(), RemoteConfig::default())
            };
            view.cells.iter().map(start).collect()
        };
        let remotes = start_remotes();
        let clients: Vec<Arc<dyn CellClient>> =
            remotes.iter().map(|r| Arc::new(r.clone()) as Arc<dyn CellClient>).collect();
        let cluster = Arc::new(Cluster::new(view.map.clone(), clients, protection));

        let limits = ApiLimits { body_bytes_max: config.body_bytes_max, batch_items_max: config.batch_items_max };
        let state = AppState::new(auth, limits, config.front.clone());
        let tcp = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let addr = tcp.local_addr()?;
        let app = cellpay_api::router(state.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server =
            tokio::spawn(cellpay_api::front::serve(tcp, app, state.clone(), config.front.clone(), stop_rx.clone()));
        let signals = cluster.spawn_signals(stop_rx.clone());
        let oplog_path = config.data_dir.join(format!("operator-{name}.log"));
        let oplog = cellpay_api::oplog::OperatorLog::open(&oplog_path)
            .with_context(|| format!("opening the operator log {}", oplog_path.display()))?;
        let _ = state.0.oplog.set(Arc::new(oplog));
        let _ =
            state.0.shared.set(Arc::new(ControlSettings { url: args.control.control.clone(), router: name.clone() }));
        apply_settings(&cluster, &view, &mut None);
        // Shard moves run on a lane of their own, with their own connections
        // to the cells and to the control plane (see `Mover::on_lane`).
        let lane = cellpay_router::moves::start_lane().context("starting the shard mover's thread")?;
        let mover_remotes = {
            let _on_lane = lane.enter();
            start_remotes()
        };
        let authority = Arc::new(ControlAuthority {
            url: args.control.control.clone(),
            who: name.clone(),
            held: Default::default(),
            lane: lane.clone(),
        });
        let mover_cells = mover_remotes.iter().map(|r| Arc::new(r.clone()) as Arc<dyn CellClient>).collect();
        let mover =
            cellpay_router::Mover::new(mover_cells, authority, cellpay_router::MoveLimits::default()).on_lane(lane);
        let _ = state.0.mover.set(Arc::new(mover));
        let _ = state.0.cluster.set(cluster.clone());

        // Keep the cells' addresses current, and report this router every second.
        let follower = {
            let mut views = cellpay_control::follow(args.control.control.clone());
            let cluster = cluster.clone();
            let (url, name, address, mut stop) =
                (args.control.control.clone(), name.clone(), addr.to_string(), stop_rx.clone());
            tokio::spawn(async move {
                let mut control: Option<Control> = None;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut rules_applied = view.rules_json.clone();
                loop {
                    tokio::select! {
                        changed = views.changed() => {
                            if changed.is_err() { return }
                            let Some(view) = views.borrow_and_update().clone() else { continue };
                            saver.save(&view);
                            let clients = remotes.iter().zip(&view.cells).chain(mover_remotes.iter().zip(&view.cells));
                            for (remote, entry) in clients {
                                if let Some(a) = entry.address.as_deref() {
                                    remote.set_address(a);
                                }
                            }
                            apply_settings(&cluster, &view, &mut rules_applied);
                        }
                        _ = tick.tick() => {
                            if control.is_none() {
                                control = Control::connect(&url).await.ok();
                            }
                            if let Some(c) = &control {
                                if let Err(e) = c.report_router(&name, &address).await {
                                    tracing::debug!("could not report to the control plane: {e}");
                                    control = None;
                                }
                            }
                        }
                        _ = stopped(&mut stop) => {
                            if let Some(c) = &control {
                                let _ = c.forget_router(&name).await;
                            }
                            return;
                        }
                    }
                }
            })
        };
        say!("cellpay router {name} listening on http://{addr} ({cells} cells, epoch {})", view.map.epoch());

        shutdown.recv().await;
        say!("cellpay router {name} stopping: draining requests");
        let _ = stop_tx.send(true);
        server.await.context("the HTTP server task")?.context("the HTTP server")?;
        let _ = signals.await;
        let _ = follower.await;
        say!("cellpay router {name} stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Applies what the control plane holds for every router: the degrade
/// switches operators set, their flow rules (when changed since
/// `rules_applied`), and this router's share of the rate limits.
fn apply_settings(cluster: &Cluster, view: &cellpay_control::ControlView, rules_applied: &mut Option<String>) {
    let protection = cluster.protection();
    let local: std::collections::HashMap<String, cellpay_router::Mode> =
        protection.degrade.switches().into_iter().map(|s| (s.plan.name.as_str().to_string(), s.mode)).collect();
    for (name, mode) in &view.switches {
        let Ok(mode) = serde_json::from_value::<cellpay_router::Mode>(serde_json::Value::String(mode.clone())) else {
            tracing::warn!(switch = %name, "the control plane holds a switch mode this router does not know: {mode}");
            continue;
        };
        if local.get(name).is_some_and(|m| *m != mode) {
            match protection.degrade.set(name, mode) {
                Ok(_) => tracing::warn!(switch = %name, ?mode, "degrade switch set from the control plane"),
                Err(e) => tracing::warn!("the control plane names a switch this router's plan lacks: {e}"),
            }
        }
    }
    if view.rules_json.is_some() && view.rules_json != *rules_applied {
        let json = view.rules_json.as_deref().unwrap_or_default();
        match cellpay_router::FlowRules::from_json(json.as_bytes()) {
            Ok(rules) => {
                cluster.replace_rules(rules);
                *rules_applied = view.rules_json.clone();
            }
            Err(e) => tracing::warn!("the control plane's flow rules are refused, the old ones stay: {e}"),
        }
    }
    protection.set_routers(view.live_routers() as u32);
    if view.map.epoch() > cluster.map().epoch() && cluster.set_map(view.map.clone()) {
        tracing::warn!(epoch = view.map.epoch(), "shard map taken from the control plane");
    }
}

/// The control plane as the keeper of switches and rules for every router.
struct ControlSettings {
    url: String,
    router: String,
}

impl cellpay_api::SharedSettings for ControlSettings {
    fn set_switch<'a>(
        &'a self,
        name: &'a str,
        mode: cellpay_router::Mode,
    ) -> cellpay_cell::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mode = serde_json::to_value(mode).map_err(|e| e.to_string())?;
            let mode = mode.as_str().unwrap_or_default().to_string();
            let control = Control::connect(&self.url).await.map_err(|e| e.to_string())?;
            control.set_switch(name, &mode, &self.router).await.map_err(|e| e.to_string())
        })
    }

    fn set_rules<'a>(
        &'a self,
        rules: &'a cellpay_router::FlowRules,
    ) -> cellpay_cell::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let json = serde_json::to_string(rules).map_err(|e| e.to_string())?;
            let control = Control::connect(&self.url).await.map_err(|e| e.to_string())?;
            control.set_rules(&json, &self.router).await.map_err(|e| e.to_string())
        })
    }
}

/// The shard map's authority for processes: the control plane, whose
/// `set_map` is a compare-and-set on the epoch. It keeps one connection
/// open (a new one costs a PostgreSQL backend's start, on a move's pause).
struct ControlAuthority {
    url: String,
    who: String,
    held: tokio::sync::Mutex<Option<Arc<Control>>>,
    /// The mover's runtime, which drives the held connection.
    lane: tokio::runtime::Handle,
}

impl ControlAuthority {
    /// The open connection, or a new one.
    async fn control(&self) -> Result<Arc<Control>, cellpay_control::ControlError> {
        let mut held = self.held.lock().await;
        if let Some(control) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok(control.clone());
        }
        let url = self.url.clone();
        let connected = self.lane.spawn(async move { Control::connect(&url).await }).await;
        let control = Arc::new(connected.map_err(|_| cellpay_control::ControlError::Lost)??);
        *held = Some(control.clone());
        Ok(control)
    }

    /// Drops `failed`, the held connection a call failed on: the next call
    /// opens a new one (a connection stuck past the statement timeout is not
    /// closed). One another caller opened since stays.
    async fn forget(&self, failed: &Arc<Control>) {
        let mut held = self.held.lock().await;
        if held.as_ref().is_some_and(|h| Arc::ptr_eq(h, failed)) {
            *held = None;
        }
    }
}

impl cellpay_router::MapAuthority for ControlAuthority {
    fn current(&self) -> cellpay_cell::BoxFuture<'_, Result<cellpay_core::ShardMap, cellpay_router::SwapError>> {
        Box::pin(async move {
            let unavailable = |e: cellpay_control::ControlError| cellpay_router::SwapError::Unavailable(e.to_string());
            let control = self.control().await.map_err(unavailable)?;
            match control.view().await {
                Ok(view) => Ok(view.map),
                Err(e) => {
                    self.forget(&control).await;
                    Err(unavailable(e))
                }
            }
        })
    }

    fn swap(&self, next: cellpay_core::ShardMap) -> cellpay_cell::BoxFuture<'_, Result<(), cellpay_router::SwapError>> {
        Box::pin(async move {
            use cellpay_router::SwapError;
            let control = self.control().await.map_err(|e| SwapError::Unavailable(e.to_string()))?;
            match control.set_map(&next, &format!("router {} (shard move)", self.who)).await {
                Ok(()) => Ok(()),
                Err(cellpay_control::ControlError::Mismatch(why)) => Err(SwapError::Lost(why)),
                Err(e) => {
                    self.forget(&control).await;
                    Err(SwapError::Unavailable(e.to_string()))
                }
            }
        })
    }
}
