//! `cellpay`: one binary whose subcommands wire the crates together.
//!
//! `cellpay --help` and `cellpay <sub> --help` are the first page of the docs.

/// mimalloc, not glibc's malloc: a request allocates and frees many small
/// objects across threads, and glibc's arenas (with `malloc_consolidate`)
/// were about a sixth of the server's samples (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints a line to stdout, ignoring a closed stdout: a server does not stop
/// because whoever started it stopped reading.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod bench_engine;
mod bench_http;
mod cell_process;
mod check;
mod child;
mod cluster_cli;
mod config;
mod crash_load;
mod drill;
mod failover;
mod flood;
mod pg_pair;
mod placement;
mod rehearse;
mod router_process;
mod scale_out;
mod serve;
mod sim;
mod stress;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cellpay", version, about = "A cell-based payment ledger built for flash-sale peaks")]
struct Cli {
    /// Log lines as text for people, or as one JSON object per line for a log
    /// store (each with the request's span: its id, method and route).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CELLPAY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a whole cluster in one process: N cells, the router, the relays
    /// and the HTTP API (DESIGN.md section 4).
    Serve(Box<config::ServeArgs>),
    /// Runs one cell in its own process: its store, the cell protocol, its
    /// relays to the other cells (DESIGN.md section 10).
    Cell(Box<cell_process::Args>),
    /// Runs one stateless HTTP v1 front for cells in other processes.
    Router(Box<router_process::Args>),
    /// The operator's CLI for the control plane.
    #[command(subcommand)]
    Cluster(cluster_cli::Command),
    /// Starts a many-process cluster on this machine (cells and routers as
    /// processes, the control plane in PostgreSQL) and supervises it.
    Up(Box<up::Args>),
    /// A full-link stress run on shadow traffic; writes the readiness report.
    /// Exit 0 go, 1 no-go, 2 error.
    Stress(stress::Args),
    /// The one-command Double-11 rehearsal on a fresh cluster (or --target):
    /// shadow traffic, audit, readiness report. Exit 0 go, 1 no-go, 2 error.
    Rehearse(rehearse::Args),
    /// A drill of the protection stack and degrade plan on a fresh cluster:
    /// overload (3x capacity), hot-merchant, kill-cell. Exit 0 pass, 1 fail, 2 error.
    Drill(drill::Args),
    /// Benchmarks; `--json` prints one JSON object.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Recovers one cell's store, checks its invariants and prints what it found.
    /// Exit 1 when the store is corrupt or an invariant fails.
    Check(check::Args),
    /// Deterministic simulation of a whole cluster under crashes, disk and
    /// network faults; a seed replays exactly. Exit 1 when an invariant fails.
    Sim(sim::Args),
    /// Tools for cellpay's own tests.
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Drives transfers through one cell engine with real fsync.
    Engine(bench_engine::Args),
    /// Payments over HTTP against a whole cluster (a fresh `cellpay serve` unless --target).
    Http(bench_http::Args),
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Runs one cell under concurrent transfers and prints each acknowledged
    /// transfer, until killed or its time bound runs out (the crash test's child).
    CrashLoad(crash_load::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Cell(args) => cell_process::run(*args),
        Command::Router(args) => router_process::run(*args),
        Command::Cluster(command) => cluster_cli::run(command),
        Command::Up(args) => up::run(*args),
        Command::Stress(args) => stress::run(args),
        Command::Rehearse(args) => rehearse::run(args),
        Command::Drill(args) => drill::run(args),
        Command::Bench(BenchCommand::Engine(args)) => bench_engine::run(args),
        Command::Bench(BenchCommand::Http(args)) => bench_http::run(args),
        Command::Check(args) => check::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Debug(DebugCommand::CrashLoad(args)) => crash_load::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
