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
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match command {
            Command::Init { control, cells, shards } => {
                let map = Control::connect(&control).await?.init(cells, shards).await?;
                say!("control plane ready: {cells} cells, {} shards, epoch {}", map.shards(), map.epoch());
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
