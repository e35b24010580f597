//! One stress run: seed the shadow accounts, drive the profile open-loop,
//! check routing and the audit while it runs, and build the report.
//!
//! Open loop: every request has an intended send time from the profile's
//! rate curve; it is sent then whatever the server does, and its latency is
//! measured from that intended time, so a stalled server shows in every
//! request scheduled during the stall (no coordinated omission). In-flight
//! requests are bounded; when the bound holds a request back, the delay counts
//! in its latency and the generator reports how far behind schedule it fell.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellpay_core::{CellId, ShardMap};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution as _, Zipf};
use serde_json::json;

use crate::http::{Answer, Http};
use crate::profile::{Distribution, Operation, Profile};
use crate::report::*;

/// An engine thread busy this share of the run is called CPU-bound.
pub const ENGINE_CPU_SATURATED: f64 = 0.8;

/// A generator that falls this far behind its schedule is saturated.
pub const SEND_LAG_SATURATED_MS: f64 = 100.0;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub target: String,
    /// An admin token: the run opens a shadow overdraft account and reads digests.
    pub token: String,
    /// Shadow traffic (the default); `false` sends real traffic.
    pub shadow: bool,
    pub in_flight_max: usize,
    /// Prints a progress line every second to stderr.
    pub progress: bool,
    /// The CPUs the server runs on, for the report's placement; none when
    /// not known (a server started elsewhere).
    pub server_cpus: Option<Vec<usize>>,
    /// Follows the cluster's shard map during the run even when the
    /// profile moves no shard (someone else moves them: a drill, an operator),
    /// so each answer is judged by the owner at its epoch.
    pub follow_map: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Target(String),
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// One second of the run: latency and count per operation, errors, answers per cell.
#[derive(Default)]
struct SecondRecord {
    ops: BTreeMap<Operation, (Histogram<u64>, u64)>,
    errors: u64,
    cells: BTreeMap<u32, u64>,
    queue_depth: BTreeMap<u32, u64>,
    /// Per owning cell (the payer's or the account's): answers ok and failed.
    owners: BTreeMap<u32, (u64, u64)>,
}

/// Acknowledged transfer ids kept to check after the run that none was lost (I7).
pub const ACKED_SAMPLE_MAX: usize = 2000;

/// Shard maps a run keeps to judge answers by their epoch (I7).
pub const MAPS_KEPT: usize = 4096;

/// Everything the request tasks record.
struct Record {
    ops: BTreeMap<Operation, (Histogram<u64>, u64, u64)>,
    /// Latency of answers that succeeded (2xx), per operation.
    admitted: BTreeMap<Operation, Histogram<u64>>,
    codes: BTreeMap<Operation, BTreeMap<String, u64>>,
    cells: BTreeMap<u32, (Histogram<u64>, u64)>,
    errors: BTreeMap<String, u64>,
    seconds: Vec<SecondRecord>,
    wrong_cell: u64,
    /// Answers served at an epoch whose map the run did not see.
    owner_unverified: u64,
    payments: u64,
    /// Single transfers to a hot merchant: sent, admitted, refused `rate_limited`.
    hot: (u64, u64, u64),
    /// Latency of admitted single transfers to other payees.
    cold_payments: Histogram<u64>,
    /// The latest acknowledged transfers, as their status path (`id?from=payer`).
    acked: VecDeque<String>,
}

/// What one request was, for the record.
struct Sent {
    answer: Result<Answer, String>,
    /// The cell the shard map says owns it (payer or account) at the epoch
    /// it was served at; none for a batch.
    expected: Option<u32>,
    /// Served at an epoch whose map the run did not see: not judged.
    unverified: bool,
    payments: u64,
    /// For a single transfer: whether its payee is a hot merchant.
    hot: Option<bool>,
    /// An acknowledged transfer's status path: `id?from=payer` (ids are unique per payer).
    transfer_id: Option<String>,
}

impl Record {
    fn new(seconds: usize) -> Self {
        Self {
            ops: BTreeMap::new(),
            admitted: BTreeMap::new(),
            codes: BTreeMap::new(),
            cells: BTreeMap::new(),
            errors: BTreeMap::new(),
            seconds: (0..seconds).map(|_| SecondRecord::default()).collect(),
            wrong_cell: 0,
            owner_unverified: 0,
            payments: 0,
            hot: (0, 0, 0),
            cold_payments: histogram(),
            acked: VecDeque::new(),
        }
    }
}

/// The body of `POST /v1/transfers`, serialized straight from borrowed ids:
/// the generator builds one per payment, so it builds no JSON tree.
#[derive(serde::Serialize)]
struct TransferBody<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    amount: i64,
}

/// The body of `POST /v1/transfers/batch`.
#[derive(serde::Serialize)]
struct BatchBody<'a> {
    transfers: Vec<TransferBody<'a>>,
}

/// The seeded accounts and the chooser of keys.
struct Keys {
    ids: Vec<String>,
    /// The cells of the cluster.
    cells: usize,
    zipf_payer: Option<Zipf<f64>>,
    zipf_payee: Option<Zipf<f64>>,
}

/// The seeded accounts grouped by the cell that owns them under the newest
/// map the run has seen: a cross-cell share stays what the profile says
/// while shards move.
struct Owners {
    epoch: u64,
    by_cell: Vec<Vec<usize>>,
    cell_of: Vec<u32>,
}

impl Owners {
    fn of(map: &ShardMap, ids: &[String], cells: usize) -> Self {
        let mut by_cell = vec![Vec::new(); cells.max(1)];
        let cell_of: Vec<u32> = ids.iter().map(|id| map.owner_of(id).0).collect();
        for (i, c) in cell_of.iter().enumerate() {
            if let Some(pool) = by_cell.get_mut(*c as usize) {
                pool.push(i);
            }
        }
        Self { epoch: map.epoch(), by_cell, cell_of }
    }
}

impl Keys {
    fn pick(&self, rng: &mut SmallRng, d: &Option<Zipf<f64>>) -> usize {
        match d {
            Some(z) => (z.sample(rng) as usize - 1).min(self.ids.len() - 1),
            None => rng.random_range(0..self.ids.len()),
        }
    }
}

pub struct Runner {
    profile: Profile,
    options: RunOptions,
    http: Http,
    keys: Keys,
    owners: std::sync::RwLock<Arc<Owners>>,
    run_id: String,
    recent: Mutex<VecDeque<(String, usize)>>,
    /// The shard maps seen during the run, by epoch: each answer is checked
    /// against the owner at the epoch it was served at (shards may move).
    maps: Mutex<BTreeMap<u64, ShardMap>>,
    acked: Mutex<Vec<String>>,
}

/// The shard map in a `GET /v1/cluster` answer.
fn shard_map(view: &serde_json::Value) -> Result<ShardMap, cellpay_core::shard::ShardMapError> {
    let owners: Vec<CellId> = view["shard_map"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_u64())
        .map(|o| CellId(o as u32))
        .collect();
    ShardMap::new(view["epoch"].as_u64().unwrap_or(0), owners)
}

fn account_name(profile: &str, i: usize) -> String {
    format!("stress-{profile}-{i}")
}

impl Runner {
    /// Reads the cluster's shard map and seeds the accounts.
    pub async fn prepare(profile: Profile, options: RunOptions) -> Result<Self, RunError> {
        let http = Http::new(&options.target, &options.token, options.shadow);
        let cluster = http.send("GET", "/v1/cluster", None).await.map_err(RunError::Target)?;
        if cluster.status != 200 {
            return Err(RunError::Target(format!(
                "GET /v1/cluster answered {}: {}",
                cluster.status,
                cluster.error_code()
            )));
        }
        let c = cluster.json();
        let map = shard_map(&c).map_err(|e| RunError::Target(format!("the cluster's shard map: {e}")))?;
        let cells = c["cells"].as_array().map_or(0, |v| v.len());
        let ids: Vec<String> = (0..profile.accounts).map(|i| account_name(&profile.name, i)).collect();
        let owners = std::sync::RwLock::new(Arc::new(Owners::of(&map, &ids, cells)));
        let zipf = |d: &Distribution| match d {
            Distribution::Uniform => None,
            Distribution::Zipf { exponent } => Zipf::new(ids.len() as f64, *exponent).ok(),
        };
        let keys = Keys {
            zipf_payer: zipf(&profile.keys.payer),
            zipf_payee: zipf(&profile.keys.payee),
            ids,
            cells: cells.max(1),
        };
        let run_id: String = format!("{:08x}", rand::random::<u32>());
        let runner = Self {
            profile,
            options,
            http,
            keys,
            owners,
            run_id,
            recent: Mutex::new(VecDeque::new()),
            acked: Mutex::new(Vec::new()),
            maps: Mutex::new([(map.epoch(), map)].into()),
        };
        runner.seed().await?;
        Ok(runner)
    }

    /// The same run (its seeded accounts) with other stages: a drill seeds
    /// first and sets the rates once it has measured the capacity.
    pub fn with_stages(mut self, stages: Vec<crate::profile::Stage>) -> Result<Self, RunError> {
        let mut profile = self.profile.clone();
        profile.stages = stages;
        profile.check().map_err(RunError::Target)?;
        self.profile = profile;
        Ok(self)
    }

    async fn seed(&self) -> Result<(), RunError> {
        let bank = format!("stress-{}-bank", self.profile.name);
        let body = json!({"id": bank, "currency": "CNY", "overdraft": true}).to_string();
        let r = seed_send(&self.http, "/v1/accounts", body).await.map_err(RunError::Target)?;
        if r.status != 201 && r.status != 200 {
            return Err(RunError::Target(format!("opening the stress bank answered {}", r.error_code())));
        }
        let opening = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for id in &self.keys.ids {
            let (http, id, permit) = (self.http.clone(), id.clone(), opening.clone().acquire_owned().await);
            tasks.spawn(async move {
                let _permit = permit;
                let body = json!({"id": id, "currency": "CNY"}).to_string();
                seed_send(&http, "/v1/accounts", body).await.and_then(|r| {
                    (r.status == 201 || r.status == 200)
                        .then_some(())
                        .ok_or(format!("opening {id}: {}", r.error_code()))
                })
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| RunError::Target(e.to_string()))?.map_err(RunError::Target)?;
        }
        for (n, chunk) in self.keys.ids.chunks(8190).enumerate() {
            let transfers: Vec<_> = chunk
                .iter()
                .map(|id| json!({"id": format!("stress-fund-{}-{n}-{id}", self.profile.name), "from": bank, "to": id, "amount": 1_000_000_000i64}))
                .collect();
            let body = json!({"transfers": transfers}).to_string();
            let r = seed_send(&self.http, "/v1/transfers/batch", body).await.map_err(RunError::Target)?;
            if r.status != 200 {
                return Err(RunError::Target(format!("funding answered {}", r.error_code())));
            }
        }
        for _ in 0..600 {
            let audit = self.http.send("GET", "/v1/audit", None).await.map_err(RunError::Target)?.json();
            let ledger = if self.options.shadow { "shadow" } else { "real" };
            if audit[ledger]["in_flight"] == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(RunError::Target("the funding credits did not arrive within a minute".into()))
    }

    fn payer_payee(&self, rng: &mut SmallRng) -> (usize, usize) {
        let k = &self.keys;
        let at = self.owners.read().expect("owners lock").clone();
        let n = k.ids.len();
        let payer = k.pick(rng, &k.zipf_payer);
        let p = &self.profile.keys;
        let mut payee = if p.hot_share > 0.0 && rng.random_bool(p.hot_share) {
            rng.random_range(0..p.hot_merchants)
        } else if at.by_cell.len() > 1 && rng.random_bool(p.cross_cell_share) {
            let own = at.cell_of[payer] as usize;
            let other = (own + rng.random_range(1..at.by_cell.len())) % at.by_cell.len();
            let pool = &at.by_cell[other];
            if pool.is_empty() {
                k.pick(rng, &k.zipf_payee)
            } else {
                pool[rng.random_range(0..pool.len())]
            }
        } else {
            let pool = &at.by_cell[at.cell_of[payer] as usize];
            pool[rng.random_range(0..pool.len())]
        };
        if payee == payer {
            payee = (payer + 1) % n;
        }
        (payer, payee)
    }

    /// One request of operation `op`; answers what to record.
    async fn request(&self, op: Operation, rng: &mut SmallRng, n: u64) -> Sent {
        let (answer, account, payments, transfer) = self.request_inner(op, rng, n).await;
        let (hot, transfer_id) = transfer.unzip();
        // The owner at the epoch the answer was served at; an epoch the run
        // has not seen a map of is counted apart, not judged.
        // A refusal is attributed to the owner under the newest map the run
        // knows (a cell that is down answers at no epoch of its own).
        let served = answer.as_ref().ok().filter(|a| (200..300).contains(&a.status));
        let epoch = served.and_then(|a| a.epoch);
        let (expected, unverified) = match (account, epoch) {
            (None, _) => (None, false),
            (Some(i), None) => {
                let maps = self.maps.lock().expect("maps lock");
                let newest = maps.values().next_back().map(|m| m.owner_of(&self.keys.ids[i]).0);
                (newest.or(Some(self.owners.read().expect("owners lock").cell_of[i])), false)
            }
            (Some(i), Some(e)) => match self.maps.lock().expect("maps lock").get(&e) {
                Some(map) => (Some(map.owner_of(&self.keys.ids[i]).0), false),
                None => (None, true),
            },
        };
        Sent { answer, expected, payments, hot, transfer_id, unverified }
    }

    /// Follows the cluster's shard map while the run moves shards: every
    /// epoch it sees, kept (at most [`MAPS_KEPT`]).
    fn spawn_map_follower(
        self: &Arc<Self>,
        done: Arc<std::sync::atomic::AtomicBool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.options.follow_map && !self.profile.events.iter().any(crate::profile::Event::moves_shards) {
            return None;
        }
        let runner = self.clone();
        Some(tokio::spawn(async move {
            while !done.load(Relaxed) {
                if let Ok(c) = runner.http.send("GET", "/v1/cluster", None).await {
                    let v = c.json();
                    if let (Some(epoch), Ok(map)) = (v["epoch"].as_u64(), shard_map(&v)) {
                        let newer = runner.owners.read().expect("owners lock").epoch < epoch;
                        if newer {
                            let owners = Arc::new(Owners::of(&map, &runner.keys.ids, runner.keys.cells));
                            *runner.owners.write().expect("owners lock") = owners;
                        }
                        let mut maps = runner.maps.lock().expect("maps lock");
                        if maps.len() < MAPS_KEPT {
                            maps.entry(epoch).or_insert(map);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }))
    }

    async fn request_inner(
        &self,
        op: Operation,
        rng: &mut SmallRng,
        n: u64,
    ) -> (Result<Answer, String>, Option<usize>, u64, Option<(bool, String)>) {
        let ids = &self.keys.ids;
        // The account whose owner should answer (payer, or the account read).
        let expect = |i: usize| Some(i);
        match op {
            Operation::Transfer => {
                let (a, b) = self.payer_payee(rng);
                let hot = b < self.profile.keys.hot_merchants && self.profile.keys.hot_share > 0.0;
                let id = format!("s-{}-{n}", self.run_id);
                let body = TransferBody { id: &id, from: &ids[a], to: &ids[b], amount: rng.random_range(1..=100) };
                let body = serde_json::to_string(&body).expect("a transfer serializes");
                let answer = self.http.send("POST", "/v1/transfers", Some(body)).await;
                // A status read asks for a transfer the cluster accepted: one
                // it refused (shed above capacity) is rightly not found.
                if answer.as_ref().is_ok_and(|a| (200..300).contains(&a.status)) {
                    let mut recent = self.recent.lock().expect("recent lock");
                    recent.push_back((id.clone(), a));
                    if recent.len() > 4096 {
                        recent.pop_front();
                    }
                }
                (answer, expect(a), 1, Some((hot, format!("{id}?from={}", ids[a]))))
            }
            Operation::Batch => {
                let items: Vec<_> = (0..self.profile.batch_size)
                    .map(|k| {
                        let (a, b) = self.payer_payee(rng);
                        let id = format!("s-{}-{n}-{k}", self.run_id);
                        (id, a, b, rng.random_range(1..=100))
                    })
                    .collect();
                let transfers: Vec<TransferBody<'_>> = items
                    .iter()
                    .map(|(id, a, b, amount)| TransferBody { id, from: &ids[*a], to: &ids[*b], amount: *amount })
                    .collect();
                let body = serde_json::to_string(&BatchBody { transfers }).expect("a batch serializes");
                (
                    self.http.send("POST", "/v1/transfers/batch", Some(body)).await,
                    None,
                    self.profile.batch_size as u64,
                    None,
                )
            }
            Operation::Balance => {
                let a = self.keys.pick(rng, &self.keys.zipf_payer);
                (self.http.send("GET", &format!("/v1/accounts/{}", ids[a]), None).await, expect(a), 0, None)
            }
            Operation::History => {
                let a = self.keys.pick(rng, &self.keys.zipf_payer);
                (
                    self.http.send("GET", &format!("/v1/accounts/{}/entries?limit=20", ids[a]), None).await,
                    expect(a),
                    0,
                    None,
                )
            }
            Operation::Status => {
                let known = self.recent.lock().expect("recent lock").back().cloned();
                match known {
                    Some((id, payer)) => {
                        let path = format!("/v1/transfers/{id}?from={}", ids[payer]);
                        (self.http.send("GET", &path, None).await, expect(payer), 0, None)
                    }
                    None => {
                        let a = self.keys.pick(rng, &self.keys.zipf_payer);
                        (self.http.send("GET", &format!("/v1/accounts/{}", ids[a]), None).await, expect(a), 0, None)
                    }
                }
            }
        }
    }
}

/// Times a seeding request is sent again after the target shed it (I7).
const SEED_ATTEMPTS_MAX: u32 = 100;

/// POSTs a seeding request (an account, a funding batch: idempotent by id),
/// sending it again while the target sheds it as `overloaded` or
/// `rate_limited`: seeding is set-up, not the measurement, and a server on
/// one core (a split placement) sheds a burst of 64 account openings.
async fn seed_send(http: &Http, path: &str, body: String) -> Result<Answer, String> {
    let mut attempt = 1;
    loop {
        let answer = http.send("POST", path, Some(body.clone())).await?;
        let shed = matches!(answer.status, 429 | 503) && answer.error_code() != "degraded";
        if !shed || attempt == SEED_ATTEMPTS_MAX {
            return Ok(answer);
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long the check of acknowledged transfers waits for the cluster to
/// answer reads again (a degrade switch releasing after its hold) (I7).
const VERIFY_WAIT_S_MAX: u64 = 60;

/// Sums a metric's samples in Prometheus text (all label sets).
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

/// Reads the idempotency window the cells hold (the shortest, for `ledger`)
/// and promise from `/metrics`, folding the first into `held_min_ms`.
async fn sample_window(http: &Http, ledger: &str, held_min_ms: &AtomicU64, promised_ms: &AtomicU64) {
    let Ok(m) = http.send("GET", "/metrics", None).await else { return };
    let text = String::from_utf8_lossy(&m.body);
    if let Some(held) = metric_min(&text, "cellpay_idempotency_window_seconds", ledger) {
        held_min_ms.fetch_min((held * 1000.0) as u64, Relaxed);
    }
    if let Some(p) = metric_min(&text, "cellpay_idempotency_window_promised_seconds", "") {
        promised_ms.store((p * 1000.0) as u64, Relaxed);
    }
}

/// The smallest sample of a metric among the series whose labels contain
/// `ledger="LEDGER"` (any series when `ledger` is empty).
fn metric_min(text: &str, name: &str, ledger: &str) -> Option<f64> {
    let want = format!("ledger=\"{ledger}\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            (ledger.is_empty() || labels.split(',').any(|l| l == want)).then(|| value.trim().parse::<f64>().ok())?
        })
        .reduce(f64::min)
}

/// Each cell's sample of a per-cell metric, by the `cell` label.
fn metric_by_cell(text: &str, name: &str) -> BTreeMap<u32, f64> {
    let prefix = format!("{name}{{cell=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (cell, tail) = rest.split_once('"')?;
            Some((cell.parse().ok()?, tail.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// What a run gathered besides its requests' record: the report's inputs.
struct Gathered {
    checks: Checks,
    generator: Generator,
    placement: Placement,
    cost: Cost,
    idempotency: Idempotency,
}

/// Engine CPU seconds per cell, the whole server process's CPU seconds and
/// bytes written by all cells, as `/metrics` reports them.
#[derive(Default)]
struct ServerFigures {
    engine_cpu_s: BTreeMap<u32, f64>,
    process_cpu_s: Option<f64>,
    bytes: Option<f64>,
}

impl ServerFigures {
    fn cpu_s(&self) -> Option<f64> {
        (!self.engine_cpu_s.is_empty()).then(|| self.engine_cpu_s.values().sum())
    }
}

impl Runner {
    async fn real_digests(&self) -> Option<Vec<String>> {
        let r = self.http.with_shadow(false).send("GET", "/v1/digests", None).await.ok()?;
        let v = r.json();
        v["digests"].as_array().map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
    }

    /// The server's cost counters from one read of `/metrics`.
    async fn server_figures(&self) -> ServerFigures {
        let Ok(r) = self.http.send("GET", "/metrics", None).await else { return ServerFigures::default() };
        let text = String::from_utf8_lossy(&r.body);
        let bytes = match (
            metric_sum(&text, "cellpay_cell_log_bytes_total"),
            metric_sum(&text, "cellpay_cell_checkpoint_bytes_total"),
        ) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        ServerFigures {
            engine_cpu_s: metric_by_cell(&text, "cellpay_cell_cpu_seconds_total"),
            process_cpu_s: metric_sum(&text, "process_cpu_seconds_total"),
            bytes,
        }
    }

    fn choose(&self, rng: &mut SmallRng) -> Operation {
        let total: f64 = self.profile.mix.values().sum();
        let mut x = rng.random_range(0.0..total);
        for (op, w) in &self.profile.mix {
            if x < *w {
                return *op;
            }
            x -= w;
        }
        *self.profile.mix.keys().next_back().expect("a checked profile has a mix")
    }

    /// Drives the profile and builds the report.
    pub async fn run(self: Arc<Self>) -> Result<Report, RunError> {
        let digests_before = if self.options.shadow { self.real_digests().await } else { None };
        let before = self.server_figures().await;
        // The generator's own CPU over the same span as the server's.
        let (generator_cpu_before, measured_from) = (crate::cpu::process_cpu_s(), Instant::now());
        let arrivals = self.profile.arrivals();
        let seconds = self.profile.duration_s().ceil() as usize + 1;
        let record = Arc::new(Mutex::new(Record::new(seconds)));
        let permits = Arc::new(tokio::sync::Semaphore::new(self.options.in_flight_max));
        let done = Arc::new(AtomicBool::new(false));
        let (audit_polls, audit_failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let audit_unavailable = Arc::new(AtomicU64::new(0));
        // The shortest idempotency window held, in ms (u64::MAX: none reported yet).
        let window_held_min_ms = Arc::new(AtomicU64::new(u64::MAX));
        let window_promised_ms = Arc::new(AtomicU64::new(u64::MAX));
        let start = tokio::time::Instant::now();
        let poller = {
            let (window_held_min_ms, window_promised_ms) = (window_held_min_ms.clone(), window_promised_ms.clone());
            let ledger = if self.options.shadow { "shadow" } else { "real" };
            let (http, done, polls, failures, unavailable) = (
                self.http.clone(),
                done.clone(),
                audit_polls.clone(),
                audit_failures.clone(),
                audit_unavailable.clone(),
            );
            let record = record.clone();
            tokio::spawn(async move {
                let mut tick = 0u64;
                while !done.load(Relaxed) {
                    if let Ok(a) = http.send("GET", "/v1/audit", None).await {
                        let v = a.json();
                        polls.fetch_add(1, Relaxed);
                        // The audit reconciles every pair of cells: `ok` is false on any finding.
                        let sound =
                            |l: &serde_json::Value| l["ok"] == true && l["sum"] == 0 && l["negative_accounts"] == 0;
                        // A cell that cannot answer (a drill halted it) is not a broken invariant;
                        // it is counted apart and the next poll audits again.
                        if a.status != 200 {
                            unavailable.fetch_add(1, Relaxed);
                        } else if !sound(&v["real"]) || !sound(&v["shadow"]) {
                            failures.fetch_add(1, Relaxed);
                        }
                    }
                    if let Ok(c) = http.send("GET", "/v1/cluster", None).await {
                        let second = (start.elapsed().as_secs() as usize).min(seconds - 1);
                        let mut r = record.lock().expect("record lock");
                        for cell in c.json()["cells"].as_array().into_iter().flatten() {
                            if let (Some(id), Some(depth)) = (cell["id"].as_u64(), cell["queue_depth"].as_u64()) {
                                let slot = r.seconds[second].queue_depth.entry(id as u32).or_default();
                                *slot = (*slot).max(depth);
                            }
                        }
                    }
                    // The window moves slowly and /metrics is not free to render:
                    // every 5th second here, and once more when the run ends.
                    if tick.is_multiple_of(5) {
                        sample_window(&http, ledger, &window_held_min_ms, &window_promised_ms).await;
                    }
                    tick += 1;
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                }
            })
        };
        let events = self.spawn_events(start);
        let follower = self.spawn_map_follower(done.clone());
        let mut generator = Generator {
            intended_requests: arrivals.len() as u64,
            in_flight_max: self.options.in_flight_max,
            ..Generator::default()
        };
        let start = tokio::time::Instant::now();
        let mut next_progress = 1.0;
        // A progress bar on stderr: stage, intended rate, transfer p99 and errors.
        let bar = self.options.progress.then(|| {
            let bar = indicatif::ProgressBar::new(self.profile.duration_s().ceil() as u64);
            let style = indicatif::ProgressStyle::with_template("{bar:30} {pos:>4}/{len} s  {msg}")
                .expect("a valid progress template");
            bar.set_style(style);
            bar
        });
        for (n, t) in arrivals.iter().enumerate() {
            let intended = start + Duration::from_secs_f64(*t);
            tokio::time::sleep_until(intended).await;
            // The generator's own lateness: how far behind schedule it woke up.
            let lag_ms = intended.elapsed().as_secs_f64() * 1e3;
            generator.send_lag_max_ms = generator.send_lag_max_ms.max(lag_ms);
            // A full in-flight bound means the server is slow to answer: the wait
            // counts in the request's latency (timed from `intended`), not as lag.
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    generator.in_flight_waits += 1;
                    permits.clone().acquire_owned().await.expect("never closed")
                }
            };
            generator.sent_requests += 1;
            let second = (*t as usize).min(seconds - 1);
            let (runner, task_record) = (self.clone(), record.clone());
            let intended_std = Instant::now() - intended.elapsed();
            tokio::spawn(async move {
                let _permit = permit;
                let mut rng =
                    SmallRng::seed_from_u64(runner.profile.seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let op = runner.choose(&mut rng);
                let sent = runner.request(op, &mut rng, n as u64).await;
                let latency_us = intended_std.elapsed().as_micros() as u64;
                let mut r = task_record.lock().expect("record lock");
                r.record(op, second, latency_us, sent);
            });
            if *t >= next_progress {
                next_progress += 1.0;
                if let Some(bar) = &bar {
                    let r = record.lock().expect("record lock");
                    let (rate, stage) = self.profile.rate_at(*t).map_or((0.0, "end"), |(r, s)| (r, s.name.as_str()));
                    let p99 =
                        r.ops.get(&Operation::Transfer).map_or(0.0, |(h, _, _)| h.value_at_quantile(0.99) as f64 / 1e3);
                    let errors: u64 = r.ops.values().map(|(_, _, e)| e).sum();
                    bar.set_position(*t as u64);
                    bar.set_message(format!(
                        "{stage:<14} {rate:>7.0} req/s  transfer p99 {p99:>7.2} ms  errors {errors}"
                    ));
                }
            }
        }
        let _all_done = permits.acquire_many(self.options.in_flight_max as u32).await.expect("never closed");
        if let Some(bar) = bar {
            bar.finish();
        }
        done.store(true, Relaxed);
        let _ = poller.await;
        if let Some(follower) = follower {
            let _ = follower.await;
        }
        let ledger = if self.options.shadow { "shadow" } else { "real" };
        sample_window(&self.http, ledger, &window_held_min_ms, &window_promised_ms).await;
        let events = events.await.unwrap_or_default();
        let duration_s = start.elapsed().as_secs_f64();
        generator.saturated = generator.send_lag_max_ms > SEND_LAG_SATURATED_MS;

        let mut checks = Checks {
            audit_polls: audit_polls.load(Relaxed),
            audit_failures: audit_failures.load(Relaxed),
            audit_unavailable: audit_unavailable.load(Relaxed),
            real_traffic: !self.options.shadow,
            ..Checks::default()
        };
        if let (Some(before), Some(after)) = (digests_before, self.real_digests().await) {
            checks.real_digests_changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u64;
        }
        let after = self.server_figures().await;
        let (generator_cpu_s, measured_s) =
            (crate::cpu::process_cpu_s() - generator_cpu_before, measured_from.elapsed().as_secs_f64());
        let server_cpu_s = match (before.process_cpu_s, after.process_cpu_s) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let placement = Placement::measured(
            self.options.server_cpus.as_deref(),
            &crate::cpu::allowed_cpus(),
            server_cpu_s,
            generator_cpu_s,
            measured_s,
        );
        generator.requests_per_cpu_s =
            (generator_cpu_s > 0.0).then(|| generator.sent_requests as f64 / generator_cpu_s);
        let engine_cpu_share: BTreeMap<u32, f64> = after
            .engine_cpu_s
            .iter()
            .filter_map(|(cell, a)| Some((*cell, (a - before.engine_cpu_s.get(cell)?) / duration_s)))
            .collect();
        let record =
            Arc::try_unwrap(record).ok().expect("every request task is done").into_inner().expect("record lock");
        checks.wrong_cell_answers = record.wrong_cell;
        checks.owner_unverified = record.owner_unverified;
        let per = |a: Option<f64>, b: Option<f64>, scale: f64| match (a, b) {
            (Some(a), Some(b)) if record.payments > 0 => Some((b - a) * scale / record.payments as f64),
            _ => None,
        };
        let cost = Cost {
            payments: record.payments,
            cpu_us_per_payment: per(before.cpu_s(), after.cpu_s(), 1e6),
            server_cpu_us_per_payment: per(before.process_cpu_s, after.process_cpu_s, 1e6),
            bytes_per_payment: per(before.bytes, after.bytes, 1.0),
        };
        let ms = |a: &AtomicU64| Some(a.load(Relaxed)).filter(|&v| v != u64::MAX).map(|v| v as f64 / 1000.0);
        let idempotency = Idempotency {
            retry_horizon_s: self.profile.retry_horizon_s,
            window_promised_s: ms(&window_promised_ms),
            window_held_min_s: ms(&window_held_min_ms),
        };
        let gathered = Gathered { checks, generator, placement, cost, idempotency };
        let mut report = self.report(record, gathered, duration_s, &engine_cpu_share);
        report.events = events;
        Ok(report)
    }

    /// Acts on the profile's events at their times: `halt_cell` and
    /// `restart_cell` call the drill endpoints of the target (admin token,
    /// `serve --drills true`); `add_cell`, `drain_cell` and `move_shards`
    /// start shard moves (admin token).
    fn spawn_events(&self, start: tokio::time::Instant) -> tokio::task::JoinHandle<Vec<EventDone>> {
        let (http, events) = (self.http.with_shadow(false), self.profile.events.clone());
        let cells = self.keys.cells;
        tokio::spawn(async move {
            let mut done = Vec::new();
            for e in events {
                tokio::time::sleep_until(start + Duration::from_secs_f64(e.at_s)).await;
                let cell = e.cell.unwrap_or(0);
                let (path, body) = match (e.action.as_str(), e.shard) {
                    ("halt_cell", _) => (format!("/v1/admin/cells/{cell}/halt"), None),
                    ("restart_cell", _) => (format!("/v1/admin/cells/{cell}/restart"), None),
                    ("drain_cell", _) => (format!("/v1/admin/cells/{cell}/drain"), Some("{}".to_string())),
                    // A new cell owns nothing: a rebalance over every cell fills it.
                    ("add_cell", _) => {
                        let every: Vec<usize> = (0..cells).collect();
                        ("/v1/admin/rebalance".into(), Some(format!("{{\"cells\": {every:?}}}")))
                    }
                    ("move_shards", Some(shard)) => {
                        (format!("/v1/admin/shards/{shard}/move"), Some(format!("{{\"to\": {cell}}}")))
                    }
                    ("move_shards", None) => {
                        ("/v1/admin/rebalance".into(), Some(format!("{{\"moves_max\": {}}}", e.moves.unwrap_or(1))))
                    }
                    (other, _) => unreachable!("a checked profile has no event {other}"),
                };
                let answer = http.send("POST", &path, body).await;
                let (status, message) = match answer {
                    Ok(a) => (a.status, a.json()["message"].as_str().map_or_else(|| a.error_code(), str::to_string)),
                    Err(e) => (0, e),
                };
                let at_s = start.elapsed().as_secs_f64();
                done.push(EventDone { at_s, action: e.action.clone(), cell: e.cell, status, message });
            }
            done
        })
    }

    /// Asks the cluster for every sampled acknowledged transfer, at its
    /// payer's cell: each must be there (I2). Answers (checked, missing).
    pub async fn verify_acked(&self) -> (u64, u64) {
        let ids = self.acked.lock().expect("acked lock").clone();
        // A degrade switch the run turned on (shadow_off after an overload)
        // answers 503 until it releases after its hold: wait for it first, so
        // a transfer that cannot be read yet is not counted as missing.
        if let Some(first) = ids.first() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(VERIFY_WAIT_S_MAX);
            while tokio::time::Instant::now() < deadline {
                match self.http.send("GET", &format!("/v1/transfers/{first}"), None).await {
                    Ok(a) if a.status == 200 || a.status == 404 => break,
                    _ => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        }
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let (http, permit) = (self.http.clone(), gate.clone().acquire_owned().await.expect("never closed"));
            tasks.spawn(async move {
                let _permit = permit;
                for _ in 0..20 {
                    match http.send("GET", &format!("/v1/transfers/{id}"), None).await {
                        Ok(a) if a.status == 200 => return true,
                        Ok(a) if a.status == 404 => return false,
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                false
            });
        }
        let (mut checked, mut missing) = (0, 0);
        while let Some(found) = tasks.join_next().await {
            checked += 1;
            missing += u64::from(!found.unwrap_or(false));
        }
        (checked, missing)
    }

    fn report(
        &self,
        record: Record,
        gathered: Gathered,
        duration_s: f64,
        engine_cpu_share: &BTreeMap<u32, f64>,
    ) -> Report {
        let Gathered { checks, generator, placement, cost, idempotency } = gathered;
        let operations: BTreeMap<String, OperationReport> = record
            .ops
            .iter()
            .map(|(op, (h, requests, errors))| {
                let report = OperationReport {
                    requests: *requests,
                    errors: *errors,
                    error_rate: *errors as f64 / (*requests).max(1) as f64,
                    throughput_per_s: *requests as f64 / duration_s,
                    latency: Percentiles::of(h),
                    admitted_latency: record.admitted.get(op).map(Percentiles::of).unwrap_or_default(),
                    errors_by_code: record.codes.get(op).cloned().unwrap_or_default(),
                };
                (op.as_str().to_string(), report)
            })
            .collect();
        let cells: Vec<CellReport> = record
            .cells
            .iter()
            .map(|(cell, (h, n))| CellReport {
                cell: *cell,
                requests: *n,
                throughput_per_s: *n as f64 / duration_s,
                latency: Percentiles::of(h),
                engine_cpu_share: engine_cpu_share.get(cell).copied(),
            })
            .collect();
        let timeline: Vec<Second> = record
            .seconds
            .iter()
            .enumerate()
            .map(|(t, SecondRecord { ops, errors, cells, queue_depth, owners })| {
                let (rate, stage) =
                    self.profile.rate_at(t as f64).map_or((0.0, String::new()), |(r, s)| (r, s.name.clone()));
                Second {
                    t: t as u64,
                    stage,
                    intended_rate: rate,
                    requests: ops.iter().map(|(op, (_, n))| (op.as_str().to_string(), *n)).collect(),
                    errors: *errors,
                    p99_ms: ops
                        .iter()
                        .map(|(op, (h, _))| (op.as_str().to_string(), h.value_at_quantile(0.99) as f64 / 1e3))
                        .collect(),
                    cells: cells.clone(),
                    queue_depth: queue_depth.clone(),
                    owners: owners.clone(),
                }
            })
            .collect();
        let peak = timeline.iter().map(|s| s.requests.values().sum::<u64>()).max().unwrap_or(0) as f64;
        let shed = record.errors.get("overloaded").copied().unwrap_or(0);
        let degraded = record.errors.get("degraded").copied().unwrap_or(0);
        let slo = slo_verdicts(&self.profile.slo, &operations);
        let busiest = engine_cpu_share.iter().max_by(|a, b| a.1.total_cmp(b.1));
        let bottleneck = if generator.saturated {
            "the generator: it fell behind its schedule".to_string()
        } else if let Some((cell, share)) = busiest.filter(|(_, share)| **share >= ENGINE_CPU_SATURATED) {
            format!("cell {cell}: its engine thread used {:.0} % of a core (CPU-bound)", share * 100.0)
        } else if shed > 0 {
            format!("cell queues: {shed} requests shed as overloaded")
        } else if generator.in_flight_waits > 0 {
            let busiest = busiest.map_or("unknown".into(), |(c, share)| format!("{:.0} % (cell {c})", share * 100.0));
            format!(
                "the HTTP front, before the cells: {} requests waited for an in-flight slot while the busiest \
                 engine thread used {busiest} of a core",
                generator.in_flight_waits
            )
        } else {
            cells
                .iter()
                .max_by(|a, b| a.latency.p99_ms.total_cmp(&b.latency.p99_ms))
                .map_or("none measured".into(), |c| {
                    format!("cell {}: the highest p99 ({:.2} ms)", c.cell, c.latency.p99_ms)
                })
        };
        let (go, readiness) = readiness(&slo, &checks, &generator, &idempotency);
        let requests: u64 = operations.values().map(|o| o.requests).sum();
        let shape = crate::report::RunShape {
            payments_per_request: cost.payments as f64 / requests.max(1) as f64,
            cells: self.keys.cells,
            server_cpu_s: placement.server.cpu_s,
            duration_s,
        };
        let capacity = crate::report::CapacityPlan::of(
            &timeline,
            &self.profile.slo,
            shape,
            &bottleneck,
            &cost,
            self.profile.target_peak_per_s,
            self.profile.headroom,
        );
        *self.acked.lock().expect("acked lock") = record.acked.iter().cloned().collect();
        let hot_merchant = HotMerchant {
            requests: record.hot.0,
            admitted: record.hot.1,
            rate_limited: record.hot.2,
            admitted_per_s: record.hot.1 as f64 / duration_s,
            other_payments_latency: Percentiles::of(&record.cold_payments),
        };
        Report {
            hot_merchant,
            events: Vec::new(),
            profile: self.profile.name.clone(),
            target: self.options.target.clone(),
            shadow: self.options.shadow,
            duration_s,
            peak_throughput_per_s: peak,
            operations,
            cells,
            errors_by_code: record.errors,
            shed,
            degraded,
            timeline,
            slo,
            checks,
            generator,
            placement,
            cost,
            idempotency,
            bottleneck,
            capacity,
            go,
            readiness,
        }
    }
}

impl Record {
    fn record(&mut self, op: Operation, second: usize, latency_us: u64, sent: Sent) {
        let Sent { answer, expected, payments, hot, transfer_id, unverified } = sent;
        self.owner_unverified += u64::from(unverified);
        let answer = &answer;
        let latency_us = latency_us.max(1);
        let ok = matches!(answer, Ok(a) if (200..300).contains(&a.status));
        if let Some(owner) = expected {
            let slot = self.seconds[second].owners.entry(owner).or_default();
            if ok {
                slot.0 += 1;
            } else {
                slot.1 += 1;
            }
        }
        if let Some(hot) = hot {
            let limited = matches!(answer, Ok(a) if a.status == 429);
            if hot {
                self.hot.0 += 1;
                self.hot.1 += u64::from(ok);
                self.hot.2 += u64::from(limited);
            } else if ok {
                self.cold_payments.saturating_record(latency_us);
            }
        }
        if ok {
            self.admitted.entry(op).or_insert_with(histogram).saturating_record(latency_us);
            if let Some(id) = transfer_id {
                if self.acked.len() == ACKED_SAMPLE_MAX {
                    self.acked.pop_front();
                }
                self.acked.push_back(id);
            }
        }
        // A refusal's code, read from its body once.
        let code = (!ok).then(|| match answer {
            Ok(a) => a.error_code(),
            Err(e) if Http::is_timeout(e) => "timeout".into(),
            Err(_) => "transport".into(),
        });
        if let Some(code) = &code {
            *self.codes.entry(op).or_default().entry(code.clone()).or_default() += 1;
        }
        let entry = self.ops.entry(op).or_insert_with(|| (histogram(), 0, 0));
        entry.0.saturating_record(latency_us);
        entry.1 += 1;
        let slot = &mut self.seconds[second];
        let per_second = slot.ops.entry(op).or_insert_with(|| (histogram(), 0));
        per_second.0.saturating_record(latency_us);
        per_second.1 += 1;
        match answer {
            Ok(a) if ok => {
                self.payments += payments;
                if let Some(cell) = a.cell {
                    let c = self.cells.entry(cell).or_insert_with(|| (histogram(), 0));
                    c.0.saturating_record(latency_us);
                    c.1 += 1;
                    *slot.cells.entry(cell).or_default() += 1;
                    if expected.is_some_and(|e| e != cell) {
                        self.wrong_cell += 1;
                    }
                }
                if op == Operation::Batch {
                    for item in a.json()["results"].as_array().into_iter().flatten() {
                        if let Some(code) = item["error"]["code"].as_str() {
                            *self.errors.entry(code.to_string()).or_default() += 1;
                        }
                    }
                }
            }
            _ => {
                entry.2 += 1;
                slot.errors += 1;
                *self.errors.entry(code.expect("a failed answer has a code")).or_default() += 1;
            }
        }
    }
}
