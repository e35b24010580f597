//! `cellpay bench engine`: transfers through one cell engine with real fsync.
//!
//! Setup opens the accounts and funds each from an overdraft account. The
//! measured phase then sends requests of `--batch` random transfers each,
//! keeping `--pipeline` requests in flight so the engine never waits for the
//! generator. The engine's own thread CPU time gives the CPU cost per
//! transfer; the store's byte counters give the bytes written per transfer.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellpay_cell::{Cell, CellHandle, EngineConfig, Submission, TierConfig};
use cellpay_core::{
    AccountId, Authority, CellId, Command, Currency, Limits, Op, OpenAccount, Outcome, ShardMap, TenantId, Transfer,
    TransferId,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Accounts to open (and fund) before the measured phase.
    #[arg(long, default_value_t = 1_000_000)]
    accounts: usize,
    /// Commands per engine batch (the engine's batch limit and the request size).
    #[arg(long, default_value_t = 8190)]
    batch: usize,
    /// Length of the measured phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Zipf exponent of the payee distribution; uniform when absent.
    #[arg(long)]
    zipf: Option<f64>,
    /// Requests kept in flight by the generator.
    #[arg(long, default_value_t = 4)]
    pipeline: usize,
    /// Log bytes between checkpoints, in MiB.
    #[arg(long, default_value_t = EngineConfig::default().checkpoint_log_bytes >> 20)]
    checkpoint_mib: u64,
    /// Transfer records kept for idempotency.
    #[arg(long, default_value_t = Limits::default().transfers_retained_max)]
    transfers_retained: usize,
    /// Keep records that leave memory in the disk tier (`DIR/idempotency`), as `serve` does.
    #[arg(long)]
    tier: bool,
    /// Share of transfers that are retries of an earlier transfer old enough
    /// to have left memory (0.05: 5 %); each must answer the original and pay
    /// nothing (counted in `retries_paid_again`, which must stay 0 with --tier).
    #[arg(long, default_value_t = 0.0)]
    retries: f64,
    /// After the run, keep writing until the next checkpoint is due (the most
    /// log to replay), halt the cell without a final checkpoint, and time its recovery.
    #[arg(long)]
    recovery: bool,
    /// Directory for the cell's store (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the cell's log and checkpoints go: `embedded` (files in the
    /// directory) or a PostgreSQL URL, where schema `bench_engine` is dropped
    /// and created afresh (and dropped after); the tier stays in the directory.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// With --store postgres://…: run the SQL projector beside the engine (as
    /// a cell process does) and report its lag and whether it kept up.
    #[arg(long)]
    project: bool,
    /// Transfers per second to offer in the measured phase (requests of
    /// --batch paced evenly); 0: as fast as the engine takes them.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    accounts: usize,
    batch: usize,
    zipf: Option<f64>,
    seconds: f64,
    transfers: u64,
    rejected: BTreeMap<String, u64>,
    transfers_per_s: f64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    commit_max_ms: f64,
    fsync_p50_ms: f64,
    fsync_p99_ms: f64,
    batch_size_mean: f64,
    cpu_us_per_transfer: f64,
    process_cpu_us_per_transfer: f64,
    bytes_per_transfer: f64,
    log_bytes_per_transfer: f64,
    checkpoints: u64,
    checkpoint_max_ms: f64,
    setup_s: f64,
    /// Retries sent, those answered with the original, and those paid again.
    retries: u64,
    retries_answered: u64,
    retries_paid_again: u64,
    tier: Option<TierReport>,
    recovery: Option<RecoveryFigures>,
    projection: Option<ProjectionFigures>,
}

#[derive(Serialize)]
struct ProjectionFigures {
    /// Lag from a batch's commit to its rows in the SQL tables, over the measured phase.
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    /// Batches the log held at the end of the measured phase, and those the tables showed then.
    log_batches: u64,
    projected_batches: u64,
    /// After the load stopped: how long the tables took to show the last batch.
    caught_up_after_ms: f64,
    accounts_written: u64,
    transfers_written: u64,
}

#[derive(Serialize)]
struct TierReport {
    records: u64,
    runs: u64,
    bytes: u64,
    memory_bytes: u64,
    /// Lookups that went past a filter to the disk (one block read each), and the records found.
    disk_reads: u64,
    disk_hits: u64,
    /// Mean time of a lookup that read the disk, on the prefetch thread.
    disk_read_us_mean: f64,
}

#[derive(Serialize)]
struct RecoveryFigures {
    recovery_ms: f64,
    accounts: usize,
    transfers_total: u64,
    checkpoint_seq: u64,
    batches_replayed: u64,
    commands_replayed: u64,
}

fn process_cpu_ns() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn account_id(i: usize) -> AccountId {
    AccountId::new(&format!("acct-{i:08}")).expect("generated ids are valid")
}

/// Sends requests with at most `pipeline` in flight, folding each answer into `tally`.
struct Pipeline {
    handle: CellHandle,
    /// Each request and which of its items are retries.
    in_flight: VecDeque<(Submission<Vec<Outcome>>, Vec<bool>)>,
    retries: u64,
    retries_answered: u64,
    retries_paid_again: u64,
    depth: usize,
    transfers: u64,
    rejected: BTreeMap<String, u64>,
}

impl Pipeline {
    fn send(&mut self, commands: Vec<Command>) -> anyhow::Result<()> {
        let n = commands.len();
        self.send_marked(commands, vec![false; n])
    }

    fn send_marked(&mut self, commands: Vec<Command>, retry: Vec<bool>) -> anyhow::Result<()> {
        if self.in_flight.len() >= self.depth {
            self.wait_oldest()?;
        }
        self.in_flight.push_back((self.handle.submit(commands)?, retry));
        Ok(())
    }

    fn wait_oldest(&mut self) -> anyhow::Result<()> {
        let Some((s, retry)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        for (outcome, retry) in s.wait_blocking()?.into_iter().zip(retry) {
            self.retries += u64::from(retry);
            match outcome {
                Outcome::Transferred { created: true, .. } if retry => self.retries_paid_again += 1,
                Outcome::Transferred { created: true, .. } => self.transfers += 1,
                Outcome::Transferred { created: false, .. } if retry => self.retries_answered += 1,
                Outcome::Rejected(r) => *self.rejected.entry(r.code.to_string()).or_default() += 1,
                _ => {}
            }
        }
        Ok(())
    }

    fn drain(&mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }
}

fn setup(p: &mut Pipeline, ids: &[AccountId], bank: &AccountId, batch: usize) -> anyhow::Result<()> {
    let cny = Currency::new("CNY").expect("CNY is ISO 4217");
    let open = |id: &AccountId, overdraft| {
        Command::real(Op::OpenAccount(OpenAccount {
            id: id.clone(),
            currency: cny,
            overdraft,
            tenant: TenantId::default_tenant(),
        }))
    };
    p.send(vec![open(bank, true)])?;
    for chunk in ids.chunks(batch) {
        p.send(chunk.iter().map(|id| open(id, false)).collect())?;
    }
    for (n, chunk) in ids.chunks(batch).enumerate() {
        let cmds = chunk
            .iter()
            .enumerate()
            .map(|(k, id)| {
                Command::real(Op::Transfer(Transfer {
                    id: TransferId::new(&format!("fund-{n}-{k}")).expect("valid id"),
                    from: bank.clone(),
                    to: id.clone(),
                    amount: 1_000_000_000,
                    currency: None,
                    memo: None,
                    by: Authority::Admin,
                }))
            })
            .collect();
        p.send(cmds)?;
    }
    p.drain()
}

/// Random transfers between funded accounts; payees uniform or zipf.
struct Generator<'a> {
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
    ids: &'a [AccountId],
    /// Transfers generated so far; also their ids.
    n: u64,
    /// As a client token of the accounts' tenant would send them.
    by: Authority,
    /// Share of transfers that retry one old enough to have left memory.
    retries: f64,
    /// Transfers younger than this many are still in memory.
    retained: u64,
}

impl Generator<'_> {
    /// Transfer `n`: its fields follow from `n` alone (a hash of it, cheap:
    /// the generator shares the machine with the engine), so a retry can send
    /// it again.
    fn transfer(&self, n: u64) -> Command {
        use cellpay_core::shard::mix64;
        let accounts = self.ids.len() as u64;
        let from = (mix64(n ^ 0x00c0_ffee) % accounts) as usize;
        let mut to = match &self.zipf {
            Some(z) => z.sample(&mut SmallRng::seed_from_u64(n)) as usize - 1,
            None => (mix64(n ^ 0x0bad_cafe) % accounts) as usize,
        };
        if to == from {
            to = (to + 1) % self.ids.len();
        }
        Command::real(Op::Transfer(Transfer {
            id: TransferId::new(&format!("b{n}")).expect("valid id"),
            from: self.ids[from].clone(),
            to: self.ids[to].clone(),
            amount: (mix64(n ^ 0x5eed) % 100 + 1) as i64,
            currency: None,
            memo: None,
            by: self.by.clone(),
        }))
    }

    /// A request of `size` transfers and which of them are retries.
    fn request(&mut self, size: usize) -> (Vec<Command>, Vec<bool>) {
        let mut commands = Vec::with_capacity(size);
        let mut retry = Vec::with_capacity(size);
        // Old enough to have left memory, with a batch's margin.
        let oldest_gone = self.n.saturating_sub(self.retained + 2 * size as u64);
        for _ in 0..size {
            if oldest_gone > 0 && self.retries > 0.0 && self.rng.random_bool(self.retries) {
                let old = self.rng.random_range(1..=oldest_gone);
                commands.push(self.transfer(old));
                retry.push(true);
            } else {
                self.n += 1;
                commands.push(self.transfer(self.n));
                retry.push(false);
            }
        }
        (commands, retry)
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    anyhow::ensure!((1..=65_536).contains(&args.batch), "--batch must be between 1 and 65536");
    anyhow::ensure!(args.pipeline >= 1, "--pipeline must be at least 1");
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let config = EngineConfig {
        batch_commands_max: args.batch,
        queue_commands_max: (args.batch * (args.pipeline + 1)).max(65_536),
        checkpoint_log_bytes: args.checkpoint_mib << 20,
        limits: Limits { transfers_retained_max: args.transfers_retained, ..Limits::default() },
        tier: TierConfig { enabled: args.tier, ..TierConfig::default() },
        ..EngineConfig::default()
    };
    let map = ShardMap::round_robin(cellpay_core::SHARDS_DEFAULT, 1).expect("valid map");
    let postgres = match args.store.as_str() {
        "embedded" => None,
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            drop_schema(url)?;
            Some(url.to_string())
        }
        _ => anyhow::bail!("--store is `embedded` or a PostgreSQL URL starting with postgres://"),
    };
    let open = || -> anyhow::Result<Cell> {
        match &postgres {
            None => Cell::open_embedded(&dir, CellId(0), &map, config).context("opening the cell"),
            Some(url) => {
                let store =
                    cellpay_store::PostgresStore::open(url, PG_SCHEMA, cellpay_store::PostgresOptions::default())
                        .context("opening the PostgreSQL store")?;
                let tier = config.tier.enabled.then(|| dir.join("idempotency"));
                Cell::start_with_tier(Box::new(store), tier.as_deref(), CellId(0), &map, config)
                    .context("opening the cell")
            }
        }
    };
    let cell = open()?;
    let handle = cell.handle();
    anyhow::ensure!(!args.project || postgres.is_some(), "--project needs --store postgres://…");
    let projection = match postgres.as_deref().filter(|_| args.project) {
        Some(url) => Some(cellpay_cell::Projector::spawn(url, PG_SCHEMA, CellId(0)).context("starting the projector")?),
        None => None,
    };
    let ids: Vec<AccountId> = (0..args.accounts).map(account_id).collect();
    let bank = AccountId::new("bank").expect("valid id");
    let mut p = Pipeline {
        handle: handle.clone(),
        in_flight: VecDeque::new(),
        retries: 0,
        retries_answered: 0,
        retries_paid_again: 0,
        depth: args.pipeline,
        transfers: 0,
        rejected: BTreeMap::new(),
    };

    let setup_started = Instant::now();
    setup(&mut p, &ids, &bank, args.batch)?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    p.transfers = 0;
    p.rejected.clear();

    handle.stats().reset_histograms();
    // The projection's lag is measured over the measured phase: wait for the
    // setup's batches to be projected, then start counting afresh.
    if let Some(projector) = &projection {
        let target = postgres.as_deref().map_or(Ok(0), last_batch).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(600);
        while projector.stats.batch_seq.load(Relaxed) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        projector.stats.reset_lag();
    }
    let before = handle.stats().snapshot();
    let cpu_before = process_cpu_ns();
    let zipf = match args.zipf {
        Some(s) => Some(Zipf::new(args.accounts as f64, s).context("bad --zipf exponent")?),
        None => None,
    };
    let mut gen = Generator {
        rng: SmallRng::seed_from_u64(0x00c0_ffee),
        zipf,
        ids: &ids,
        n: 0,
        by: Authority::Tenant(TenantId::default_tenant()),
        retries: args.retries,
        retained: args.transfers_retained as u64,
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let gap = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.batch as f64 / args.rate));
    let mut sent = 0u32;
    while Instant::now() < deadline {
        if let Some(gap) = gap {
            let due = started + gap * sent;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let (commands, retry) = gen.request(args.batch);
        p.send_marked(commands, retry)?;
        sent += 1;
    }
    p.drain()?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = handle.stats().snapshot();
    let projection_figures = match &projection {
        Some(projector) => {
            let stats = &projector.stats;
            let log_batches = last_batch(postgres.as_deref().expect("projection runs on PostgreSQL"))?;
            let projected_batches = stats.batch_seq.load(Relaxed);
            let waited = Instant::now();
            while stats.batch_seq.load(Relaxed) < log_batches && waited.elapsed() < Duration::from_secs(600) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let (lag_p50_ms, lag_p99_ms, lag_max_ms) = stats.lag_ms();
            Some(ProjectionFigures {
                lag_p50_ms,
                lag_p99_ms,
                lag_max_ms,
                log_batches,
                projected_batches,
                caught_up_after_ms: waited.elapsed().as_secs_f64() * 1e3,
                accounts_written: stats.accounts_written.load(Relaxed),
                transfers_written: stats.transfers_written.load(Relaxed),
            })
        }
        None => None,
    };
    if let Some(projector) = projection {
        projector.join();
    }
    let process_cpu = process_cpu_ns() - cpu_before;
    let transfers = p.transfers.max(1) as f64;
    let bytes = (after.log_bytes - before.log_bytes) + (after.checkpoint_bytes - before.checkpoint_bytes);
    let ms = |us: u64| us as f64 / 1e3;

    let mut report = Report {
        accounts: args.accounts,
        batch: args.batch,
        zipf: args.zipf,
        seconds: elapsed,
        transfers: p.transfers,
        rejected: std::mem::take(&mut p.rejected),
        transfers_per_s: transfers / elapsed,
        commit_p50_ms: ms(after.batch_us.p50),
        commit_p99_ms: ms(after.batch_us.p99),
        commit_max_ms: ms(after.batch_us.max),
        fsync_p50_ms: ms(after.append_us.p50),
        fsync_p99_ms: ms(after.append_us.p99),
        batch_size_mean: after.batch_size.mean,
        cpu_us_per_transfer: (after.cpu_ns - before.cpu_ns) as f64 / 1e3 / transfers,
        process_cpu_us_per_transfer: process_cpu as f64 / 1e3 / transfers,
        bytes_per_transfer: bytes as f64 / transfers,
        log_bytes_per_transfer: (after.log_bytes - before.log_bytes) as f64 / transfers,
        checkpoints: after.checkpoints - before.checkpoints,
        checkpoint_max_ms: ms(after.checkpoint_us.max),
        setup_s,
        retries: p.retries,
        retries_answered: p.retries_answered,
        retries_paid_again: p.retries_paid_again,
        tier: handle.figures().tier.map(|t| TierReport {
            records: t.entries,
            runs: t.runs,
            bytes: t.bytes,
            memory_bytes: t.memory_bytes,
            disk_reads: t.disk_reads,
            disk_hits: t.disk_hits,
            disk_read_us_mean: t.disk_read_ns as f64 / 1e3 / t.disk_reads.max(1) as f64,
        }),
        recovery: None,
        projection: projection_figures,
    };
    if args.recovery {
        // Measure recovery at its worst: just before the next checkpoint, when
        // a restart has the most log to replay.
        let worst = config.checkpoint_log_bytes / 20 * 19;
        while handle.stats().log_bytes_since_checkpoint.load(Relaxed) < worst {
            let (commands, retry) = gen.request(args.batch);
            p.send_marked(commands, retry)?;
            p.drain()?;
        }
    }
    drop((handle, p));
    if args.recovery {
        cell.halt().context("halting the cell")?;
        let reopened = open().context("reopening the cell")?;
        let r = reopened.recovery();
        report.recovery = Some(RecoveryFigures {
            recovery_ms: r.duration.as_secs_f64() * 1e3,
            accounts: args.accounts + 1,
            // Funding transfers plus the generated ones (some may have been rejected).
            transfers_total: args.accounts as u64 + gen.n,
            checkpoint_seq: r.checkpoint_seq,
            batches_replayed: r.batches_replayed,
            commands_replayed: r.commands_replayed,
        });
    }
    print_report(&report, args.json)?;
    if let Some(url) = &postgres {
        drop_schema(url)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The newest batch in the bench's log.
fn last_batch(url: &str) -> anyhow::Result<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let row = client.query_one(&format!("SELECT coalesce(max(seq), 0) FROM {PG_SCHEMA}.batches"), &[]).await?;
        anyhow::Ok(row.get::<_, i64>(0) as u64)
    })
}

/// The schema `bench engine --store postgres://…` writes its cell to.
const PG_SCHEMA: &str = "bench_engine";

fn drop_schema(url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")).await?;
        anyhow::Ok(())
    })
}

fn print_report(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "cellpay bench engine: {} accounts, batch {}, payees {}",
        r.accounts,
        r.batch,
        r.zipf.map_or("uniform".into(), |s| format!("zipf({s})"))
    );
    println!("  transfers      {} in {:.2} s = {:.0} transfers/s", r.transfers, r.seconds, r.transfers_per_s);
    println!(
        "  batch commit   p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (mean batch {:.0})",
        r.commit_p50_ms, r.commit_p99_ms, r.commit_max_ms, r.batch_size_mean
    );
    println!("  fsync          p50 {:.3} ms, p99 {:.3} ms", r.fsync_p50_ms, r.fsync_p99_ms);
    println!(
        "  cpu            {:.2} µs/transfer in the engine, {:.2} µs/transfer in the process",
        r.cpu_us_per_transfer, r.process_cpu_us_per_transfer
    );
    println!(
        "  bytes written  {:.1} B/transfer ({:.1} B log), {} checkpoints (max {:.0} ms)",
        r.bytes_per_transfer, r.log_bytes_per_transfer, r.checkpoints, r.checkpoint_max_ms
    );
    if !r.rejected.is_empty() {
        println!("  rejected       {:?}", r.rejected);
    }
    if r.retries > 0 {
        println!(
            "  retries        {} of old transfers: {} answered with the original, {} paid again",
            r.retries, r.retries_answered, r.retries_paid_again
        );
    }
    if let Some(t) = &r.tier {
        println!(
            "  disk tier      {} records in {} runs, {:.1} MiB on disk, {:.1} MiB of filters and indexes in memory",
            t.records,
            t.runs,
            t.bytes as f64 / 1048576.0,
            t.memory_bytes as f64 / 1048576.0
        );
        println!(
            "  disk lookups   {} reads ({} found a record), {:.1} µs each on the prefetch thread",
            t.disk_reads, t.disk_hits, t.disk_read_us_mean
        );
    }
    if let Some(rec) = &r.recovery {
        println!(
            "  recovery       {:.0} ms for {} accounts, {} transfers ever (checkpoint at batch {}, {} batches / {} commands replayed)",
            rec.recovery_ms, rec.accounts, rec.transfers_total, rec.checkpoint_seq, rec.batches_replayed, rec.commands_replayed
        );
    }
    if let Some(p) = &r.projection {
        println!(
            "  SQL projection lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; at the end it showed batch {} of {}, all {:.0} ms later ({} account and {} transfer rows written)",
            p.lag_p50_ms, p.lag_p99_ms, p.lag_max_ms, p.projected_batches, p.log_batches, p.caught_up_after_ms, p.accounts_written, p.transfers_written
        );
    }
    Ok(())
}
