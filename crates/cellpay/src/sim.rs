//! `cellpay sim`: the deterministic simulation of a whole cluster (the real
//! engine, recovery and relays under a seeded scheduler, with crashes, disk
//! and network faults). One seed replays exactly; `--seeds N` runs N seeds
//! from `--seed` on and reports the rate and the first failure.

use std::process::ExitCode;
use std::time::Instant;

use cellpay_sim::{run as run_seed, Mutation, SimConfig};

#[derive(clap::Args)]
pub struct Args {
    /// The seed (with --seeds, the first of them).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seeds to run, from --seed on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Ticks of the random phase of each seed (the drain after it is extra).
    #[arg(long, default_value_t = SimConfig::default().steps)]
    steps: u64,
    #[arg(long, default_value_t = SimConfig::default().cells, value_parser = clap::value_parser!(u32).range(1..=16))]
    cells: u32,
    #[arg(long, default_value_t = SimConfig::default().accounts, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    accounts: u32,
    /// No crashes, disk or network faults.
    #[arg(long)]
    no_faults: bool,
    /// Show the cells' own log lines (recovery's errors about damaged files are expected).
    #[arg(long)]
    verbose: bool,
    /// Put in a wrong way to move a shard, which the run must catch (it fails).
    #[arg(long, value_enum)]
    mutation: Option<MutationArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MutationArg {
    /// The source serves the shard again before the new map is durable.
    LiftFreezeEarly,
    /// A relay sends a credit stuck for the old owner to the new one under its old number.
    RerouteByOldSeq,
    /// The audit leaves the move records out.
    SkipMoveRecord,
}

impl From<MutationArg> for Mutation {
    fn from(m: MutationArg) -> Self {
        match m {
            MutationArg::LiftFreezeEarly => Mutation::LiftFreezeEarly,
            MutationArg::RerouteByOldSeq => Mutation::RerouteByOldSeq,
            MutationArg::SkipMoveRecord => Mutation::SkipMoveRecord,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.seeds >= 1 && args.steps >= 1, "--seeds and --steps must be at least 1");
    let started = Instant::now();
    let mut simulated_ms = 0u64;
    let mut ran = 0u64;
    let mut failure = None;
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let config = SimConfig {
            seed,
            steps: args.steps,
            cells: args.cells,
            accounts: args.accounts,
            faults: !args.no_faults,
            mutation: args.mutation.map(Mutation::from),
        };
        let outcome = if args.verbose {
            run_seed(config)
        } else {
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || run_seed(config))
        };
        ran += 1;
        match outcome {
            Ok(report) => {
                simulated_ms += report.simulated_ms;
                if args.seeds == 1 {
                    println!("{report:#?}");
                }
            }
            Err(f) => {
                failure = Some(f);
                break;
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{ran} seeds in {wall:.2} s: {:.0} seeds/s, {:.0}x real time ({:.1} simulated s)",
        ran as f64 / wall,
        simulated_ms as f64 / 1e3 / wall,
        simulated_ms as f64 / 1e3
    );
    Ok(match failure {
        None => ExitCode::SUCCESS,
        Some(f) => {
            println!("FAIL {f}");
            ExitCode::from(1)
        }
    })
}
