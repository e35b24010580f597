//! `cellpay bench http`: payments over HTTP against a whole cluster.
//!
//! Starts `cellpay serve` as a separate process (or uses `--target`), opens
//! and funds the accounts, then drives `POST /v1/transfers` (or, with
//! `--batch N`, `POST /v1/transfers/batch` of N transfers) from `--connections`
//! HTTP/1.1 connections for `--seconds`. Each connection sends its next request
//! when the previous one is answered (closed loop: this measures capacity;
//! the open-loop generator with no coordinated omission is `cellpay stress`).
//! Latency is measured per request into HdrHistograms. `--cross-cell` is the
//! share of payments whose payee lives in another cell than the payer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellpay_core::{ShardMap, SHARDS_DEFAULT};
use cellpay_stress::report::Placement;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper_util::rt::TokioIo;
use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// A running cluster's base URL (http://host:port); without it a fresh `cellpay serve` is started.
    #[arg(long, requires = "token")]
    target: Option<String>,
    /// An admin token secret for `--target`.
    #[arg(long, env = "CELLPAY_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Cells of the started cluster (and of the target's shard map).
    #[arg(long, default_value_t = 4)]
    cells: u32,
    #[arg(long, default_value_t = 1_000_000)]
    accounts: usize,
    #[arg(long, default_value_t = 256)]
    connections: usize,
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Share of payments whose payee is in another cell than the payer.
    #[arg(long, default_value_t = 0.2)]
    cross_cell: f64,
    /// Transfers per request through the batch endpoint; 0 sends single transfers.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// During the second half of the run, GET this path (e.g. /metrics) in a
    /// tight loop on 4 more connections, and report payment latency of each half.
    #[arg(long)]
    scrape: Option<String>,
    /// Send the measured payments as shadow traffic (`X-Cellpay-Shadow: 1`);
    /// the accounts are opened and funded in the real ledger. With the
    /// `shadow_off` switch on, every one is answered 503 degraded: the
    /// cheapest request there is, for measuring the generator itself.
    #[arg(long)]
    shadow: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    placement: crate::placement::PlacementArgs,
}

#[derive(Serialize)]
struct Report {
    mode: String,
    connections: usize,
    accounts: usize,
    cross_cell: f64,
    seconds: f64,
    requests: u64,
    transfers: u64,
    transfers_per_s: f64,
    requests_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_p999_ms: f64,
    latency_max_ms: f64,
    errors: BTreeMap<String, u64>,
    setup_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scrape: Option<ScrapeReport>,
    /// Where the server and this generator ran and the CPU each used while measuring.
    placement: Placement,
    /// The whole server process's CPU per transfer: every thread, kernel included.
    server_cpu_us_per_payment: Option<f64>,
    /// The cells' engine threads' CPU per transfer.
    engine_cpu_us_per_payment: Option<f64>,
    /// The whole server process's CPU per request answered (refusals included).
    server_cpu_us_per_request: Option<f64>,
    /// Requests this generator sent per CPU-second of its own process.
    generator_requests_per_cpu_s: Option<f64>,
}

/// Payment latency without and with a scraper hammering one path (`--scrape`):
/// the first half of the run is the baseline, the second half is scraped.
#[derive(Serialize)]
struct ScrapeReport {
    path: String,
    scrapes: u64,
    baseline_p50_ms: f64,
    baseline_p99_ms: f64,
    scraped_p50_ms: f64,
    scraped_p99_ms: f64,
}

/// Connections that scrape `--scrape`'s path in a tight loop.
const SCRAPE_CONNECTIONS: usize = 4;

/// One HTTP/1.1 connection; opened again when the server closed it (an idle
/// keep-alive connection is closed after the server's idle timeout).
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    /// Header values built once: the generator's cost per request is measured.
    host: HeaderValue,
    auth: HeaderValue,
    /// Tags every request as shadow traffic.
    shadow: bool,
}

impl Conn {
    async fn open(addr: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let sender = Self::handshake(addr).await?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).context("the token is not a header value")?;
        let host = HeaderValue::from_str(&addr.to_string()).context("the address is not a header value")?;
        Ok(Self { sender, addr, host, auth, shadow: false })
    }

    async fn handshake(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends a request; a connection the server has closed is opened again
    /// first (every request sent here is idempotent: ids, or reads).
    async fn send(&mut self, method: &str, path: &str, body: String) -> anyhow::Result<(u16, Bytes)> {
        if self.sender.is_closed() || self.sender.ready().await.is_err() {
            self.sender = Self::handshake(self.addr).await?;
        }
        self.send_once(method, path, body).await
    }

    /// POSTs a set-up request (idempotent: ids), sending it again while the
    /// server sheds it (429, 503), at most 100 times 50 ms apart (I7): a server
    /// on one core sheds a burst of account openings, and set-up is not the measurement.
    async fn send_admitted(&mut self, path: &str, body: String) -> anyhow::Result<(u16, Bytes)> {
        for _ in 1..100 {
            let answer = self.send("POST", path, body.clone()).await?;
            if !matches!(answer.0, 429 | 503) {
                return Ok(answer);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.send("POST", path, body).await
    }

    async fn send_once(&mut self, method: &str, path: &str, body: String) -> anyhow::Result<(u16, Bytes)> {
        let method = hyper::Method::from_bytes(method.as_bytes())?;
        let uri = hyper::Uri::from_maybe_shared(Bytes::copy_from_slice(path.as_bytes()))?;
        let req = cellpay_stress::http::request(method, uri, &self.host, &self.auth, self.shadow, Bytes::from(body));
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

/// The body of one payment, serialized from borrowed names (no JSON tree per request).
#[derive(Serialize)]
struct TransferBody<'a> {
    id: String,
    from: &'a str,
    to: &'a str,
    amount: u64,
}

/// The body of a batch of payments.
#[derive(Serialize)]
struct BatchBody<'a> {
    transfers: Vec<TransferBody<'a>>,
}

/// The accounts, by name and grouped by the cell that owns them.
struct Accounts {
    names: Vec<String>,
    by_cell: Vec<Vec<usize>>,
}

fn account(i: usize) -> String {
    format!("u{i:07}")
}

async fn setup(addr: SocketAddr, token: &str, accounts: usize, connections: usize) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr, token).await?;
    let bank = json!({"id": "bench-bank", "currency": "CNY", "overdraft": true}).to_string();
    let (status, _) = conn.send_admitted("/v1/accounts", bank).await?;
    anyhow::ensure!(status == 201 || status == 200, "opening the bank answered {status}");
    let mut tasks = tokio::task::JoinSet::new();
    let per = accounts.div_ceil(connections.min(64));
    for start in (0..accounts).step_by(per) {
        let token = token.to_string();
        tasks.spawn(async move {
            let mut conn = Conn::open(addr, &token).await?;
            for i in start..(start + per).min(accounts) {
                let body = json!({"id": account(i), "currency": "CNY"}).to_string();
                let (status, _) = conn.send_admitted("/v1/accounts", body).await?;
                anyhow::ensure!(status == 201 || status == 200, "opening {} answered {status}", account(i));
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    for (n, chunk) in (0..accounts).collect::<Vec<_>>().chunks(8190).enumerate() {
        let transfers: Vec<_> = chunk
            .iter()
            .map(|&i| json!({"id": format!("bench-fund-{n}-{i}"), "from": "bench-bank", "to": account(i), "amount": 1_000_000_000}))
            .collect();
        let (status, body) =
            conn.send_admitted("/v1/transfers/batch", json!({"transfers": transfers}).to_string()).await?;
        anyhow::ensure!(status == 200, "funding answered {status}: {}", String::from_utf8_lossy(&body));
    }
    // Wait until every cross-cell funding credit has arrived.
    for _ in 0..600 {
        let (_, body) = conn.send("GET", "/v1/audit", String::new()).await?;
        let audit: serde_json::Value = serde_json::from_slice(&body)?;
        if audit["in_flight"] == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("funding credits did not arrive within a minute")
}

struct Outcome {
    latency_us: Histogram<u64>,
    /// Requests sent in the second half of the run (the scraped half with `--scrape`).
    second_half_us: Histogram<u64>,
    requests: u64,
    transfers: u64,
    errors: BTreeMap<String, u64>,
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    addr: SocketAddr,
    token: String,
    c: usize,
    accounts: std::sync::Arc<Accounts>,
    cross_cell: f64,
    batch: usize,
    shadow: bool,
    (halfway, deadline): (Instant, Instant),
) -> anyhow::Result<Outcome> {
    let mut conn = Conn::open(addr, &token).await?;
    conn.shadow = shadow;
    let mut rng = SmallRng::seed_from_u64(c as u64);
    let mut out = Outcome {
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        second_half_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        requests: 0,
        transfers: 0,
        errors: BTreeMap::new(),
    };
    let mut n = 0u64;
    let (by_cell, names) = (&accounts.by_cell, &accounts.names);
    let cells = by_cell.len();
    // Refusals by status, named once at the end.
    let mut refused: BTreeMap<u16, u64> = BTreeMap::new();
    let mut transfer = |rng: &mut SmallRng| {
        n += 1;
        let payer_cell = rng.random_range(0..cells);
        let payee_cell = if cells > 1 && rng.random_bool(cross_cell) {
            (payer_cell + rng.random_range(1..cells)) % cells
        } else {
            payer_cell
        };
        let from = by_cell[payer_cell][rng.random_range(0..by_cell[payer_cell].len())];
        let mut to = by_cell[payee_cell][rng.random_range(0..by_cell[payee_cell].len())];
        if to == from {
            to = by_cell[payee_cell]
                [(by_cell[payee_cell].iter().position(|&a| a == from).unwrap_or(0) + 1) % by_cell[payee_cell].len()];
        }
        TransferBody { id: format!("h{c}-{n}"), from: &names[from], to: &names[to], amount: rng.random_range(1..=100) }
    };
    while Instant::now() < deadline {
        let (path, body, count) = if batch == 0 {
            ("/v1/transfers", serde_json::to_string(&transfer(&mut rng))?, 1)
        } else {
            let transfers: Vec<_> = (0..batch).map(|_| transfer(&mut rng)).collect();
            ("/v1/transfers/batch", serde_json::to_string(&BatchBody { transfers })?, batch as u64)
        };
        let started = Instant::now();
        let (status, bytes) = conn.send("POST", path, body).await?;
        let us = started.elapsed().as_micros() as u64;
        out.latency_us.saturating_record(us);
        if started >= halfway {
            out.second_half_us.saturating_record(us);
        }
        out.requests += 1;
        if batch == 0 {
            if status == 201 || status == 200 {
                out.transfers += 1;
            } else {
                *refused.entry(status).or_default() += 1;
            }
        } else if status == 200 {
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            for r in v["results"].as_array().into_iter().flatten() {
                match r["error"]["code"].as_str() {
                    None => out.transfers += 1,
                    Some(code) => *out.errors.entry(code.to_string()).or_default() += 1,
                }
            }
        } else {
            *refused.entry(status).or_default() += count;
        }
    }
    for (status, count) in refused {
        *out.errors.entry(status.to_string()).or_default() += count;
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.accounts >= 2 * args.cells as usize, "--accounts must be at least twice --cells");
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!((0.0..=1.0).contains(&args.cross_cell), "--cross-cell is a share between 0 and 1");
    anyhow::ensure!(args.batch <= 8190, "--batch is at most 8190");
    let placement = args.placement.plan(args.target.is_none())?;
    let (_started, addr, token) = match &args.target {
        Some(url) => {
            let addr: SocketAddr = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .context("--target is http://IP:PORT")?;
            (None, addr, args.token.clone().expect("clap requires --token with --target"))
        }
        None => {
            let token = Alphanumeric.sample_string(&mut rand::rng(), 40);
            let (started, addr) = crate::child::start_server(args.cells, &token, &placement)?;
            (Some(started), addr, token)
        }
    };
    // After the server started (it would inherit the generator's CPUs), before the runtime's threads.
    placement.pin_generator()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(args, addr, token, placement.server_cpus()))
}

/// The server's CPU counters, from one read of `/metrics`: the whole process and the engine threads.
async fn server_cpu_s(addr: SocketAddr, token: &str) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let mut conn = Conn::open(addr, token).await?;
    let (status, body) = conn.send("GET", "/metrics", String::new()).await?;
    anyhow::ensure!(status == 200, "GET /metrics answered {status}");
    let text = String::from_utf8_lossy(&body);
    let sum = |name| cellpay_stress::run::metric_sum(&text, name);
    Ok((sum("process_cpu_seconds_total"), sum("cellpay_cell_cpu_seconds_total")))
}

async fn bench(
    args: Args,
    addr: SocketAddr,
    token: String,
    server_cpus: Option<Vec<usize>>,
) -> anyhow::Result<ExitCode> {
    let setup_started = Instant::now();
    setup(addr, &token, args.accounts, args.connections).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    tracing::info!(setup_s, seconds = args.seconds, "accounts ready; measuring");
    let map = ShardMap::round_robin(SHARDS_DEFAULT, args.cells)?;
    let names: Vec<String> = (0..args.accounts).map(account).collect();
    let mut by_cell = vec![Vec::new(); args.cells as usize];
    for (i, name) in names.iter().enumerate() {
        by_cell[map.owner_of(name).0 as usize].push(i);
    }
    let accounts = std::sync::Arc::new(Accounts { names, by_cell });
    let server_before = server_cpu_s(addr, &token).await?;
    let generator_before = cellpay_stress::cpu::process_cpu_s();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let halfway = started + Duration::from_secs_f64(args.seconds / 2.0);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..args.connections {
        let times = (halfway, deadline);
        tasks.spawn(drive(addr, token.clone(), c, accounts.clone(), args.cross_cell, args.batch, args.shadow, times));
    }
    let mut scrapers = tokio::task::JoinSet::new();
    let scrapers_n = if args.scrape.is_some() { SCRAPE_CONNECTIONS } else { 0 };
    for _ in 0..scrapers_n {
        let (path, token) = (args.scrape.clone().expect("scrapers run with --scrape"), token.clone());
        scrapers.spawn(async move {
            let mut conn = Conn::open(addr, &token).await?;
            tokio::time::sleep_until(halfway.into()).await;
            let mut scrapes = 0u64;
            while Instant::now() < deadline {
                let (status, _) = conn.send("GET", &path, String::new()).await?;
                // /metrics answers a flood with 429 (its own rate limit): still an answer.
                anyhow::ensure!(status == 200 || status == 429, "GET {path} answered {status}");
                scrapes += 1;
            }
            anyhow::Ok(scrapes)
        });
    }
    let mut total = Outcome {
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        second_half_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        requests: 0,
        transfers: 0,
        errors: BTreeMap::new(),
    };
    while let Some(r) = tasks.join_next().await {
        let o = r??;
        total.latency_us.add(&o.latency_us)?;
        total.second_half_us.add(&o.second_half_us)?;
        total.requests += o.requests;
        total.transfers += o.transfers;
        for (k, v) in o.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let mut scrapes = 0;
    while let Some(r) = scrapers.join_next().await {
        scrapes += r??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let generator_cpu_s = cellpay_stress::cpu::process_cpu_s() - generator_before;
    let server_after = server_cpu_s(addr, &token).await?;
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let (server_cpu, engine_cpu) = (delta(server_before.0, server_after.0), delta(server_before.1, server_after.1));
    let per = |cpu: Option<f64>, n: u64| cpu.filter(|_| n > 0).map(|s| s * 1e6 / n as f64);
    let placement = Placement::measured(
        server_cpus.as_deref(),
        &cellpay_stress::cpu::allowed_cpus(),
        server_cpu,
        generator_cpu_s,
        elapsed,
    );
    let ms = |q: f64| total.latency_us.value_at_quantile(q) as f64 / 1e3;
    let scrape = args.scrape.as_ref().map(|path| {
        // The whole run minus its second half is the first half, the baseline.
        let mut first = total.latency_us.clone();
        first.subtract(&total.second_half_us).expect("the second half is part of the whole");
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
        ScrapeReport {
            path: path.clone(),
            scrapes,
            baseline_p50_ms: q(&first, 0.5),
            baseline_p99_ms: q(&first, 0.99),
            scraped_p50_ms: q(&total.second_half_us, 0.5),
            scraped_p99_ms: q(&total.second_half_us, 0.99),
        }
    });
    let report = Report {
        mode: if args.batch == 0 { "single".into() } else { format!("batch-{}", args.batch) },
        connections: args.connections,
        accounts: args.accounts,
        cross_cell: args.cross_cell,
        seconds: elapsed,
        requests: total.requests,
        transfers: total.transfers,
        transfers_per_s: total.transfers as f64 / elapsed,
        requests_per_s: total.requests as f64 / elapsed,
        latency_p50_ms: ms(0.5),
        latency_p99_ms: ms(0.99),
        latency_p999_ms: ms(0.999),
        latency_max_ms: total.latency_us.max() as f64 / 1e3,
        errors: total.errors,
        setup_s,
        scrape,
        placement,
        server_cpu_us_per_payment: per(server_cpu, total.transfers),
        engine_cpu_us_per_payment: per(engine_cpu, total.transfers),
        server_cpu_us_per_request: per(server_cpu, total.requests),
        generator_requests_per_cpu_s: (generator_cpu_s > 0.0).then(|| total.requests as f64 / generator_cpu_s),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "cellpay bench http ({}): {} connections, {} accounts, {:.0} % cross-cell",
            report.mode,
            report.connections,
            report.accounts,
            report.cross_cell * 100.0
        );
        println!(
            "  {:.0} transfers/s ({:.0} requests/s) over {:.1} s",
            report.transfers_per_s, report.requests_per_s, report.seconds
        );
        println!(
            "  latency p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
            report.latency_p50_ms, report.latency_p99_ms, report.latency_p999_ms, report.latency_max_ms
        );
        if !report.errors.is_empty() {
            println!("  errors {:?}", report.errors);
        }
        println!("  setup (open + fund accounts) {:.1} s", report.setup_s);
        println!("  placement {}", report.placement.summary());
        let us = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1}"));
        println!(
            "  server CPU per payment {} µs (whole process; engine threads {} µs); generator {} requests per CPU-second",
            us(report.server_cpu_us_per_payment),
            us(report.engine_cpu_us_per_payment),
            report.generator_requests_per_cpu_s.map_or("n/a".into(), |v| format!("{v:.0}"))
        );
        if let Some(s) = &report.scrape {
            println!(
                "  payments p50/p99: {:.2}/{:.2} ms in the first half, {:.2}/{:.2} ms while GET {} ran {} times in the second",
                s.baseline_p50_ms, s.baseline_p99_ms, s.scraped_p50_ms, s.scraped_p99_ms, s.path, s.scrapes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
