//! `cellpay rehearse`: the one-command Double-11 rehearsal. Starts a fresh
//! `cellpay serve` on a temporary dir and a free port (or uses `--target`),
//! runs the bundled profile on shadow traffic, audits, writes the report and
//! prints the verdict and the report's path. Exit 0 go, 1 no-go, 2 error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cellpay_stress::{Profile, RunOptions};
use rand::distr::{Alphanumeric, SampleString};

const DOUBLE11: &str = include_str!("../../../profiles/double11.toml");
const QUICK: &str = include_str!("../../../profiles/quick.toml");

#[derive(clap::Args)]
pub struct Args {
    /// The short profile (under 2 minutes) instead of the full Double 11 (under 10).
    #[arg(long)]
    quick: bool,
    /// Where to write report.json and report.html.
    #[arg(long, default_value = "rehearsal-report")]
    report: PathBuf,
    /// A running cluster to rehearse against instead of a fresh one (needs --token).
    #[arg(long, requires = "token")]
    target: Option<String>,
    /// An admin token secret for --target.
    #[arg(long, env = "CELLPAY_STRESS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Multiplies every stage's arrival rates of the bundled profile.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// No progress bar on stderr.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    placement: crate::placement::PlacementArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (text, name) = if args.quick { (QUICK, "profiles/quick.toml") } else { (DOUBLE11, "profiles/double11.toml") };
    let profile = Profile::parse(text, name)?.scaled(args.rate_scale).map_err(anyhow::Error::msg)?;
    let placement = args.placement.plan(args.target.is_none())?;
    let (_started, target, token) = match &args.target {
        Some(t) => (None, t.clone(), args.token.clone().expect("clap requires --token with --target")),
        None => {
            let token = Alphanumeric.sample_string(&mut rand::rng(), 40);
            let (started, addr) =
                crate::child::start_server(4, &token, &placement).context("starting a fresh cluster")?;
            eprintln!("rehearsing {} on a fresh 4-cell cluster at http://{addr}", profile.name);
            (Some(started), format!("http://{addr}"), token)
        }
    };
    placement.pin_generator()?;
    let options = RunOptions {
        target,
        token,
        shadow: true,
        in_flight_max: 1024,
        progress: !args.quiet,
        server_cpus: placement.server_cpus(),
        follow_map: false,
    };
    let report = crate::stress::execute(profile, options, &args.report)?;
    Ok(crate::stress::verdict(&report, &args.report))
}
