//! `cellpay cluster …`: the operator's CLI for the control plane.

use std::process::ExitCode;

use cellpay_control::{Control, ControlView};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Creates the control plane's tables and the cluster (round-robin shard
    /// map, epoch 1). Run again with the same shape it changes nothing.
    Init {
        #[arg(long, env = "CELLPAY_CONTROL")]
        control: String,
        #[arg(long, default_value_t = 3)]
        cells: u32,
        #[arg(long, default_value_t = 1024)]
        shards: u32,
        /// Of the cells, how many stand by owning no shard, for `cluster
        /// add-cell` to fill while payments flow (start their processes first).
        #[arg(long, default_value_t = 0)]
        spare_cells: u32,
    },
    /// Shows cells (address, process, last report), the shard map's epoch and
    /// each cell's shards, the routers, and the latest operator actions.
    Status {
        #[arg(long, env = "CELLPAY_CONTROL")]
        control: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Moves one shard to another cell while payments flow (through a
    /// router's admin API, or `serve`'s); prints the move's report, its
    /// write pause among it.
    MoveShard {
        shard: u32,
        #[arg(long)]
        to: u32,
        #[command(flatten)]
        api: AdminApi,
    },
    /// Fills a cell that owns nothing yet (a cell just added: `serve --cells
    /// N+1`, or a new `cellpay cell` process) with a fair share of the
    /// measured load, a few shards at a time.
    AddCell {
        #[arg(long)]
        cell: u32,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Moves every shard of a cell to the others; once done it owns nothing
    /// and can be stopped.
    DrainCell {
        #[arg(long)]
        cell: u32,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Evens out the measured load over the cells (every cell not drained).
    Rebalance {
        /// The most moves.
        #[arg(long, default_value_t = 64)]
        moves_max: usize,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// The shard moves the server ran and the plan under way.
    Moves {
        #[command(flatten)]
        api: AdminApi,
    },
}

/// A router's (or `serve`'s) admin API.
#[derive(clap::Args)]
pub struct AdminApi {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    server: String,
    /// An admin token.
    #[arg(long, env = "CELLPAY_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    api: AdminApi,
    /// Milliseconds between two moves, so payments keep their latency.
    #[arg(long, default_value_t = 50)]
    pace_ms: u64,
    /// Return once the plan has started, not when it is done.
    #[arg(long)]
    no_wait: bool,
}

/// Calls the admin API; answers the JSON body, or the server's refusal as an error.
async fn admin(
    api: &AdminApi,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let http = cellpay_stress::http::Http::new(&api.server, &api.token, false);
    let answer = http
        .send(method, path, body.map(|b| b.to_string()))
        .await
        .map_err(|e| anyhow::anyhow!("{} {path}: {e}", api.server))?;
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null);
    anyhow::ensure!(answer.status < 300, "{method} {path} answered {}: {json}", answer.status);
    Ok(json)
}

/// Starts a plan and, unless asked not to, follows it to its end.
async fn run_plan(plan: &PlanArgs, path: &str, mut body: serde_json::Value) -> anyhow::Result<ExitCode> {
    body["pace_ms"] = plan.pace_ms.into();
    let started = admin(&plan.api, "POST", path, Some(body)).await?;
    let total = started["moves"].as_array().map_or(0, Vec::len);
    say!("{total} shard moves planned: {}", started["moves"]);
    if plan.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let moves = admin(&plan.api, "GET", "/v1/admin/moves", None).await?;
        let p = &moves["plan"];
        say!("moved {} of {total}, {} failed; pause p99 {} µs", p["done"], p["failed"], moves["pause_us"]["p99"]);
        if p["running"] == false {
            let failed = p["failed"].as_u64().unwrap_or(0);
            if failed > 0 {
                say!("last error: {}", p["last_error"]);
                return Ok(ExitCode::FAILURE);
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match command {
            Command::Init { control, cells, shards, spare_cells } => {
                let map = Control::connect(&control).await?.init(cells, shards, spare_cells).await?;
                say!(
                    "control plane ready: {cells} cells ({spare_cells} standing by), {} shards, epoch {}",
                    map.shards(),
                    map.epoch()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { control, json } => {
                let c = Control::connect(&control).await?;
                let view = c.view().await?;
                let actions = c.actions(10).await?;
                if json {
                    say!("{}", status_json(&view, &actions));
                } else {
                    print_status(&view, &actions);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::MoveShard { shard, to, api } => {
                let report =
                    admin(&api, "POST", &format!("/v1/admin/shards/{shard}/move"), Some(serde_json::json!({"to": to})))
                        .await?;
                say!("{report}");
                Ok(ExitCode::SUCCESS)
            }
            Command::AddCell { cell, plan } => {
                let cluster = admin(&plan.api, "GET", "/v1/cluster", None).await?;
                let cells = cluster["cells"].as_array().map_or(0, Vec::len) as u32;
                anyhow::ensure!(cell < cells, "the cluster has {cells} cells: start cell {cell} first");
                let every: Vec<u32> = (0..cells).collect();
                run_plan(&plan, "/v1/admin/rebalance", serde_json::json!({"cells": every})).await
            }
            Command::DrainCell { cell, plan } => {
                run_plan(&plan, &format!("/v1/admin/cells/{cell}/drain"), serde_json::json!({})).await
            }
            Command::Rebalance { moves_max, plan } => {
                run_plan(&plan, "/v1/admin/rebalance", serde_json::json!({"moves_max": moves_max})).await
            }
            Command::Moves { api } => {
                say!("{}", admin(&api, "GET", "/v1/admin/moves", None).await?);
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

fn shards_of(view: &ControlView, cell: u32) -> usize {
    view.map.owners().iter().filter(|o| o.0 == cell).count()
}

fn status_json(view: &ControlView, actions: &[(f64, String, String)]) -> serde_json::Value {
    serde_json::json!({
        "epoch": view.map.epoch(),
        "shards": view.map.shards(),
        "cells": view.cells.iter().map(|c| serde_json::json!({
            "id": c.id.0,
            "address": c.address,
            "zone": c.zone,
            "state": c.state,
            "process": c.process,
            "seen_ms_ago": c.seen_ms_ago,
            "reporting": c.reporting(),
            "shards": shards_of(view, c.id.0),
        })).collect::<Vec<_>>(),
        "routers": view.routers.iter().map(|r| serde_json::json!({
            "name": r.name, "address": r.address, "seen_ms_ago": r.seen_ms_ago,
        })).collect::<Vec<_>>(),
        "actions": actions.iter().map(|(ago, who, what)| serde_json::json!({
            "seconds_ago": ago, "who": who, "what": what,
        })).collect::<Vec<_>>(),
    })
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 10_000 => format!("{:.1} s ago", ms as f64 / 1e3),
        Some(ms) => format!("{} s ago", ms / 1000),
    }
}

fn print_status(view: &ControlView, actions: &[(f64, String, String)]) {
    say!("cluster: {} shards, map epoch {}", view.map.shards(), view.map.epoch());
    say!("{:<5} {:<8} {:<7} {:<22} {:<24} {:>6}  last report", "cell", "state", "zone", "address", "process", "shards");
    for c in &view.cells {
        let state = if c.reporting() { c.state.clone() } else { format!("{} (silent)", c.state) };
        say!(
            "{:<5} {:<8} {:<7} {:<22} {:<24} {:>6}  {}",
            c.id.0,
            state,
            c.zone,
            c.address.as_deref().unwrap_or("-"),
            c.process.as_deref().unwrap_or("-"),
            shards_of(view, c.id.0),
            ago(c.seen_ms_ago)
        );
    }
    say!("routers: {}", view.routers.len());
    for r in &view.routers {
        say!("  {:<20} {:<22} {}", r.name, r.address.as_deref().unwrap_or("-"), ago(r.seen_ms_ago));
    }
    if !actions.is_empty() {
        say!("latest operator actions:");
        for (secs, who, what) in actions {
            say!("  {:>8.0} s ago  {who}: {what}", secs);
        }
    }
}
