//! `cellpay check`: recover one cell's store and check its invariants.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cellpay_cell::recover;
use cellpay_core::{CellId, Limits, ShardMap, SHARDS_DEFAULT};
use cellpay_store::{EmbeddedStore, StoreOptions};

#[derive(clap::Args)]
pub struct Args {
    /// The cell's store directory.
    #[arg(long)]
    cell_dir: PathBuf,
    /// The cell's number (the store must belong to it).
    #[arg(long, default_value_t = 0)]
    cell: u32,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !args.cell_dir.join("checkpoint").is_dir() {
        anyhow::bail!("{} is not a cell store (no checkpoint directory)", args.cell_dir.display());
    }
    let mut store = EmbeddedStore::open(&args.cell_dir, StoreOptions::default())
        .with_context(|| format!("opening {}", args.cell_dir.display()))?;
    let map = ShardMap::round_robin(SHARDS_DEFAULT, 1).expect("a valid default map");
    let recovered = recover(&mut store, CellId(args.cell), &map, Limits::default());
    let (state, report) = match recovered {
        Ok(ok) => ok,
        Err(e) => {
            eprintln!("recovery failed: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "cell {}: checkpoint after batch {}, replayed {} batches ({} commands, {} bytes) in {:.1} ms; last batch {}",
        args.cell,
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
            "torn tail cut: {} bytes at offset {} of {} ({})",
            t.bytes_dropped,
            t.offset,
            t.file.display(),
            t.reason
        );
    }
    let mut ok = true;
    for (name, shadow) in [("real", false), ("shadow", true)] {
        let audit = state.ledger(shadow).audit();
        println!(
            "{name}: {} accounts, balance sum {}, outbox {} messages ({}), conservation term {}, negative non-overdraft accounts {}",
            audit.accounts,
            audit.balance_sum,
            audit.outbox_messages,
            audit.outbox_sum,
            audit.conservation_term(),
            audit.negative_accounts
        );
        // In a one-cell cluster the term must be zero; in a larger one it is
        // only zero summed over all cells, which `cellpay audit` checks.
        let single_cell = audit.sent.is_empty() && audit.received.is_empty();
        if audit.negative_accounts > 0 || (single_cell && audit.conservation_term() != 0) {
            ok = false;
        }
    }
    println!("{}", if ok { "ok" } else { "INVARIANT VIOLATED" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
