//! Workload profiles: what a stress run drives, read from TOML.
//!
//! A profile names the shadow accounts to seed, the stages of arrival rates
//! (warm-up, ramp, the midnight spike, sustain, decay), the operation mix, the
//! key distributions with hot merchants, the cross-cell share, the SLOs per
//! operation, and timed events for drills. A bad profile is refused with the
//! line and column of the mistake.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The largest arrival rate a stage may ask for, requests per second (I7).
pub const RATE_MAX: f64 = 1_000_000.0;
/// The most accounts a profile may seed (I7).
pub const ACCOUNTS_MAX: usize = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// The operations a run can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Transfer,
    Batch,
    Balance,
    History,
    Status,
}

impl Operation {
    pub const ALL: [Operation; 5] =
        [Operation::Transfer, Operation::Batch, Operation::Balance, Operation::History, Operation::Status];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Transfer => "transfer",
            Operation::Batch => "batch",
            Operation::Balance => "balance",
            Operation::History => "history",
            Operation::Status => "status",
        }
    }

    /// Payments: what cost per payment divides by.
    pub fn is_payment(self) -> bool {
        matches!(self, Operation::Transfer | Operation::Batch)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub duration_s: f64,
    /// Requests per second at the stage's start and end; the rate moves linearly between.
    pub rate_from: f64,
    pub rate_to: f64,
}

/// How a key (payer or payee) is drawn from the seeded accounts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Distribution {
    Uniform,
    Zipf { exponent: f64 },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    #[serde(default = "uniform")]
    pub payer: Distribution,
    #[serde(default = "uniform")]
    pub payee: Distribution,
    /// Hot merchants: accounts that receive `hot_share` of all payments between them.
    #[serde(default)]
    pub hot_merchants: usize,
    #[serde(default)]
    pub hot_share: f64,
    /// Share of payments whose payee lives in another cell than the payer.
    #[serde(default)]
    pub cross_cell_share: f64,
}

fn uniform() -> Distribution {
    Distribution::Uniform
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Largest share of requests that may fail (errors over requests).
    pub error_rate: f64,
}

/// Something that happens at a moment of the run (drills use these).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at_s: f64,
    pub action: String,
    #[serde(default)]
    pub cell: Option<u32>,
    /// `move_shards`: the shard to move to `cell`; without it, a rebalance of `moves` moves.
    #[serde(default)]
    pub shard: Option<u32>,
    #[serde(default)]
    pub moves: Option<usize>,
}

/// The events a profile may hold.
pub const EVENT_ACTIONS: [&str; 5] = ["halt_cell", "restart_cell", "add_cell", "drain_cell", "move_shards"];

impl Event {
    /// Whether the event moves shards (the run then follows the map's epochs).
    pub fn moves_shards(&self) -> bool {
        matches!(self.action.as_str(), "add_cell" | "drain_cell" | "move_shards")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// Shadow accounts the run opens and funds before it starts.
    pub accounts: usize,
    pub stages: Vec<Stage>,
    /// Relative weights of the operations.
    pub mix: BTreeMap<Operation, f64>,
    /// Transfers per batch request.
    #[serde(default = "batch_size")]
    pub batch_size: usize,
    pub keys: Keys,
    #[serde(default)]
    pub slo: BTreeMap<Operation, Slo>,
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub seed: u64,
    /// How long after a payment its client may still retry it and be sure
    /// it is not paid twice, in seconds: the readiness report is no-go when
    /// the idempotency window the cells held during the run was shorter.
    #[serde(default = "retry_horizon_s")]
    pub retry_horizon_s: u64,
    /// The peak the day must hold, in payments per second: the readiness
    /// report's capacity plan says how many cells it needs.
    #[serde(default)]
    pub target_peak_per_s: Option<f64>,
    /// The spare capacity the plan keeps above the target (0.3: 30 %).
    #[serde(default = "headroom")]
    pub headroom: f64,
}

fn headroom() -> f64 {
    0.3
}

fn batch_size() -> usize {
    50
}

/// A day, the window payment APIs promise.
fn retry_horizon_s() -> u64 {
    86_400
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    /// Parses and checks a profile; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, ProfileError> {
        let profile: Profile =
            toml::from_str(text).map_err(|e| ProfileError::Parse { path: path.to_string(), message: e.to_string() })?;
        profile.check().map_err(|message| ProfileError::Invalid { path: path.to_string(), message })?;
        Ok(profile)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if !(2..=ACCOUNTS_MAX).contains(&self.accounts) {
            return Err(format!("accounts must be between 2 and {ACCOUNTS_MAX}"));
        }
        if self.stages.is_empty() {
            return Err("a profile needs at least one stage".into());
        }
        if self.target_peak_per_s.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
            return Err("target_peak_per_s must be a positive number of payments per second".into());
        }
        if !(0.0..=10.0).contains(&self.headroom) {
            return Err("headroom must be between 0 (none) and 10 (eleven times the target)".into());
        }
        if !(1..=366 * 86_400).contains(&self.retry_horizon_s) {
            return Err("retry_horizon_s must be between 1 and 31622400 (a year)".into());
        }
        for s in &self.stages {
            let ok = |r: f64| r.is_finite() && (0.0..=RATE_MAX).contains(&r);
            if !(s.duration_s.is_finite() && s.duration_s > 0.0 && ok(s.rate_from) && ok(s.rate_to)) {
                return Err(format!(
                    "stage {:?}: duration_s must be positive and rates between 0 and {RATE_MAX}",
                    s.name
                ));
            }
        }
        let total: f64 = self.mix.values().sum();
        if self.mix.values().any(|w| !w.is_finite() || *w < 0.0) || total <= 0.0 {
            return Err("mix weights must be non-negative and not all zero".into());
        }
        if !(1..=8190).contains(&self.batch_size) {
            return Err("batch_size must be between 1 and 8190".into());
        }
        let k = &self.keys;
        let share = |x: f64| (0.0..=1.0).contains(&x);
        if !share(k.hot_share) || !share(k.cross_cell_share) {
            return Err("keys.hot_share and keys.cross_cell_share are shares between 0 and 1".into());
        }
        if k.hot_share > 0.0 && (k.hot_merchants == 0 || k.hot_merchants >= self.accounts) {
            return Err("keys.hot_merchants must be between 1 and accounts - 1 when hot_share > 0".into());
        }
        for d in [&k.payer, &k.payee] {
            if let Distribution::Zipf { exponent } = d {
                if !(exponent.is_finite() && *exponent > 0.0) {
                    return Err("a zipf exponent must be positive".into());
                }
            }
        }
        for e in &self.events {
            let needs_cell = e.action != "move_shards" || e.shard.is_some();
            if !EVENT_ACTIONS.contains(&e.action.as_str()) || (needs_cell && e.cell.is_none()) {
                return Err(format!(
                    "event at {} s: action is one of {} with a cell (move_shards: a shard and a cell, or a number of moves)",
                    e.at_s,
                    EVENT_ACTIONS.join(", ")
                ));
            }
            if e.moves.is_some_and(|m| !(1..=4096).contains(&m)) {
                return Err(format!("event at {} s: moves is between 1 and 4096", e.at_s));
            }
            if !(e.at_s.is_finite() && (0.0..=self.duration_s()).contains(&e.at_s)) {
                return Err(format!("event at {} s: at_s must fall within the run", e.at_s));
            }
        }
        for (op, slo) in &self.slo {
            let valid = slo.p99_ms > 0.0 && slo.p999_ms >= slo.p99_ms && share(slo.error_rate);
            if !valid {
                return Err(format!("slo.{}: need 0 < p99_ms <= p999_ms and an error_rate share", op.as_str()));
            }
        }
        Ok(())
    }

    /// Multiplies every stage's rates by `factor` (a capacity search runs one
    /// profile at several scales); the result is checked like a loaded profile.
    pub fn scaled(mut self, factor: f64) -> Result<Self, String> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err("a rate scale must be positive".into());
        }
        for s in &mut self.stages {
            s.rate_from *= factor;
            s.rate_to *= factor;
        }
        self.check()?;
        Ok(self)
    }

    /// The whole run's length in seconds.
    pub fn duration_s(&self) -> f64 {
        self.stages.iter().map(|s| s.duration_s).sum()
    }

    /// The intended arrival rate at `t` seconds into the run, with its stage.
    pub fn rate_at(&self, t: f64) -> Option<(f64, &Stage)> {
        let mut start = 0.0;
        for s in &self.stages {
            if t < start + s.duration_s {
                let f = (t - start) / s.duration_s;
                return Some((s.rate_from + (s.rate_to - s.rate_from) * f, s));
            }
            start += s.duration_s;
        }
        None
    }

    /// The intended send times of the whole run, in seconds from its start:
    /// the arrivals of a time-varying rate, by integrating it.
    pub fn arrivals(&self) -> Vec<f64> {
        let mut out = Vec::new();
        let mut start = 0.0;
        for s in &self.stages {
            // Requests due by time u within the stage: the rate's integral.
            let due = |u: f64| s.rate_from * u + (s.rate_to - s.rate_from) * u * u / (2.0 * s.duration_s);
            let total = due(s.duration_s);
            let mut k = 1.0;
            while k <= total {
                // Solve due(u) = k for u (a quadratic when the rate changes).
                let a = (s.rate_to - s.rate_from) / (2.0 * s.duration_s);
                let u = if a.abs() < 1e-12 {
                    k / s.rate_from
                } else {
                    (-s.rate_from + (s.rate_from * s.rate_from + 4.0 * a * k).sqrt()) / (2.0 * a)
                };
                out.push(start + u);
                k += 1.0;
            }
            start += s.duration_s;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
name = "t"
accounts = 100
[[stages]]
name = "flat"
duration_s = 2
rate_from = 100
rate_to = 100
[[stages]]
name = "ramp"
duration_s = 2
rate_from = 100
rate_to = 300
[mix]
transfer = 1
[keys]
"#;

    #[test]
    fn arrivals_follow_the_rate_curve() {
        let p = Profile::parse(SMALL, "small.toml").unwrap();
        let a = p.arrivals();
        // 200 in the flat stage, the ramp's integral (100 + 300) / 2 * 2 = 400 after it.
        assert_eq!(a.len(), 600);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!((a[199] - 2.0).abs() < 1e-9);
        assert!(a.iter().all(|t| *t <= 4.0 + 1e-9));
        assert_eq!(p.rate_at(3.0).unwrap().0, 200.0);
        assert!(p.rate_at(4.0).is_none());
    }

    #[test]
    fn bad_profiles_name_the_line() {
        let err = Profile::parse("name = \"x\"\naccounts = \"many\"\n", "bad.toml").unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
        let err = Profile::parse(&SMALL.replace("transfer = 1", "transfer = 1\nrefund = 2"), "p.toml").unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
        let err = Profile::parse(&SMALL.replace("rate_to = 300", "rate_to = -3"), "p.toml").unwrap_err();
        assert!(err.to_string().contains("rates between"), "{err}");
    }
}
