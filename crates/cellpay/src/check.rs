//! `cellpay check`: recover stopped cell stores and check their invariants:
//! one cell's store (`--cell-dir`), or every cell of a `serve` data directory
//! (`--data-dir`), where every ordered pair of cells is also reconciled, so a
//! cell restored from an old copy is found (lost or created money, named by
//! pair, sequences and amount).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use cellpay_cell::{recover, RecoveryReport};
use cellpay_core::{audit_states, CellId, CellState, Limits, ShardMap, SHARDS_DEFAULT};
use cellpay_store::{EmbeddedStore, StoreOptions};

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Args {
    /// One cell's store directory.
    #[arg(long)]
    cell_dir: Option<PathBuf>,
    /// The cell's number (the store must belong to it), with `--cell-dir`.
    #[arg(long, default_value_t = 0, requires = "cell_dir")]
    cell: u32,
    /// A `cellpay serve` data directory: every `cell-<n>` under it, and every pair of them.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dirs: Vec<(CellId, PathBuf)> = match (&args.cell_dir, &args.data_dir) {
        (Some(dir), _) => vec![(CellId(args.cell), dir.clone())],
        (None, Some(data)) => cell_dirs(data)?,
        (None, None) => anyhow::bail!("name --cell-dir or --data-dir"),
    };
    let mut states = Vec::with_capacity(dirs.len());
    for (cell, dir) in &dirs {
        match recover_one(*cell, dir)? {
            Some(state) => states.push(state),
            None => return Ok(ExitCode::from(1)),
        }
    }
    let mut ok = true;
    for (name, shadow) in [("real", false), ("shadow", true)] {
        for state in &states {
            let f = state.ledger(shadow).figures();
            println!(
                "cell {} {name}: {} accounts, balance sum {}, outbox {} messages ({}), own term {}, negative non-overdraft accounts {}",
                state.cell(),
                f.accounts,
                f.balance_sum,
                f.open_messages(),
                f.open_sum(),
                f.cell_term(),
                f.negative_accounts
            );
        }
        let findings = audit_states(&states, shadow);
        for finding in &findings {
            println!("{name}: {} ({finding})", finding.kind());
        }
        ok &= findings.is_empty();
    }
    println!("{}", if ok { "ok" } else { "INVARIANT VIOLATED" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The `cell-<n>` directories of a data directory, in cell order.
fn cell_dirs(data: &Path) -> anyhow::Result<Vec<(CellId, PathBuf)>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(data).with_context(|| format!("reading {}", data.display()))? {
        let path = entry?.path();
        let Some(n) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("cell-")) else {
            continue;
        };
        if let Ok(n) = n.parse::<u32>() {
            dirs.push((CellId(n), path));
        }
    }
    dirs.sort();
    anyhow::ensure!(!dirs.is_empty(), "{} holds no cell-<n> directory", data.display());
    Ok(dirs)
}

/// Recovers one cell's store; `None` (after saying why) when it cannot.
fn recover_one(cell: CellId, dir: &Path) -> anyhow::Result<Option<CellState>> {
    if !dir.join("checkpoint").is_dir() {
        anyhow::bail!("{} is not a cell store (no checkpoint directory)", dir.display());
    }
    let mut store =
        EmbeddedStore::open(dir, StoreOptions::default()).with_context(|| format!("opening {}", dir.display()))?;
    // Used only for an empty store; a stored cell keeps its own map.
    let map = ShardMap::round_robin(SHARDS_DEFAULT, 1).expect("a valid default map");
    match recover(&mut store, cell, &map, Limits::default()) {
        Ok((state, report)) => {
            print_report(cell, &report);
            Ok(Some(state))
        }
        Err(e) => {
            eprintln!("cell {cell}: recovery failed: {e}");
            Ok(None)
        }
    }
}

fn print_report(cell: CellId, report: &RecoveryReport) {
    println!(
        "cell {cell}: checkpoint after batch {}, replayed {} batches ({} commands, {} bytes) in {:.1} ms; last batch {}",
        report.checkpoint_seq,
        report.batches_replayed,
        report.commands_replayed,
        report.bytes_replayed,
        report.duration.as_secs_f64() * 1e3,
        report.last_seq
    );
    for d in &report.fell_back_from {
        let aside = d.set_aside_as.as_ref().map_or("left in place".into(), |p| format!("set aside as {}", p.display()));
        println!(
            "fell back from the checkpoint after batch {}: {} is damaged ({}); {aside}",
            d.seq,
            d.file.display(),
            d.reason
        );
    }
    if let Some(t) = &report.torn_tail {
        println!(
            "cell {cell}: torn tail cut: {} bytes at offset {} of {} ({})",
            t.bytes_dropped,
            t.offset,
            t.file.display(),
            t.reason
        );
    }
}
