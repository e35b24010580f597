//! `cellpay stress`: a full-link stress run against a cluster, shadow by
//! default. Writes `report.json` and `report.html` to `--report`; exit 0 go,
//! 1 no-go, 2 error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use cellpay_stress::{Profile, Report, RunOptions, Runner};

#[derive(clap::Args)]
pub struct Args {
    /// The cluster's base URL, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub target: String,
    /// The workload profile (TOML), e.g. profiles/double11.toml.
    #[arg(long)]
    pub profile: PathBuf,
    /// Where to write report.json and report.html.
    #[arg(long, default_value = "stress-report")]
    pub report: PathBuf,
    /// An admin token secret (the run opens a shadow overdraft account and reads digests).
    #[arg(long, env = "CELLPAY_STRESS_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Send real traffic instead of shadow traffic. Real money moves.
    #[arg(long)]
    pub real: bool,
    /// Requests in flight at most; beyond it the generator waits and says so.
    /// Keep it below the server's connection limit (serve's default is 4096).
    #[arg(long, default_value_t = 1024)]
    pub in_flight_max: usize,
    /// Follow the cluster's shard map during the run (shards moved by an
    /// operator meanwhile): each answer is judged by the owner at its epoch.
    /// On whenever the profile moves shards itself.
    #[arg(long)]
    pub follow_map: bool,
    /// Multiplies every stage's arrival rates (to find the rate at which a profile still passes).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub placement: crate::placement::GeneratorCpus,
}

/// Runs `profile` against `options.target` and writes the report files into `dir`.
pub fn execute(profile: Profile, options: RunOptions, dir: &Path) -> anyhow::Result<Report> {
    anyhow::ensure!(options.in_flight_max >= 1, "--in-flight-max must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // On a worker, not on the thread that blocks: the run spawns a task per
    // request, and from a worker that is a push onto its own queue, not a
    // wake-up of another thread (a context switch per request on one CPU).
    let report = runtime.block_on(async {
        let runner = Runner::prepare(profile, options).await?;
        tokio::spawn(Arc::new(runner).run()).await.expect("a run does not panic")
    })?;
    write_report(&report, dir)?;
    Ok(report)
}

/// Writes `report.json` and `report.html` into `dir`.
pub fn write_report(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let html = dir.join("report.html");
    std::fs::write(&html, cellpay_stress::html::render(report))
        .with_context(|| format!("writing {}", html.display()))?;
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profile = Profile::load(&args.profile)?.scaled(args.rate_scale).map_err(anyhow::Error::msg)?;
    let placement = args.placement.plan()?;
    placement.pin_generator()?;
    let options = RunOptions {
        target: args.target.clone(),
        token: args.token.clone(),
        shadow: !args.real,
        in_flight_max: args.in_flight_max,
        progress: !args.quiet,
        server_cpus: placement.server_cpus(),
        follow_map: args.follow_map,
    };
    let report = execute(profile, options, &args.report)?;
    Ok(verdict(&report, &args.report))
}

/// Prints the readiness line and the report's path; exit 0 for go, 1 for no-go.
pub fn verdict(report: &Report, dir: &Path) -> ExitCode {
    println!("{}", report.readiness);
    println!("placement {}", report.placement.summary());
    println!("report: {}", dir.join("report.html").display());
    if report.go {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
