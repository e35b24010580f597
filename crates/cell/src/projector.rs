//! The projector: a cell's ledger as SQL tables a user can query, filled
//! from the cell's log in PostgreSQL.
//!
//! The cell's commit writes its compact log (`batches`) and nothing else, so
//! the write path stays one statement per batch. The projector, on its own
//! connection and thread, reads the log after its watermark, applies each
//! batch to a replica of the cell's state with the same deterministic state
//! machine recovery uses, and writes what each stretch of batches changed:
//!
//! ```text
//! <schema>.accounts   (id, tenant, currency, overdraft, balance, batch_seq)                 one row per account
//! <schema>.transfers  (payer, id, payee, amount, currency, status, accepted_at, batch_seq)  one row per transfer
//! <schema>.projection (one, batch_seq, projected_at, resynced_at_batch)                     the watermark
//! ```
//!
//! Rows and the watermark move in one transaction, and the watermark moves
//! by compare-and-set, so the tables are always the ledger as of batch
//! `projection.batch_seq` exactly (two projectors of one cell cannot
//! interleave: the one that lost the race starts over from the tables'
//! watermark). Only the real ledger is projected; shadow traffic is not.
//!
//! Lag: each batch's `committed_at` (the database's clock at its insert)
//! against the projection transaction's clock, both PostgreSQL's, into
//! [`ProjectorStats`]. A projector that starts behind the log's oldest
//! checkpoint it can reach (its watermark older than every kept checkpoint)
//! resyncs: it writes every account and every transfer the newest checkpoint
//! holds in memory, and records the batch it resynced at.
//!
//! Cost: the replica holds the cell's state a second time (memory), and
//! applying a batch costs the projector what it cost the engine (CPU).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellpay_core::codec::decode_batch;
use cellpay_core::{snapshot, AccountId, AccountView, CellId, CellState, TransferId, TransferRow};
use cellpay_store::{PostgresStore, Store, StoreError};
use hdrhistogram::Histogram;

use crate::buckets::Buckets;

/// How often the projector looks for new batches when it has caught up.
pub const PROJECTION_POLL: Duration = Duration::from_millis(20);
/// Log batches folded into one projection transaction at most (I7): a
/// projector far behind catches up in steps of this many.
pub const PROJECTION_BATCHES_MAX: usize = 512;
/// Rows (accounts and transfers changed) one projection transaction writes
/// at most (I7): a stretch of big batches is cut after the batch that passes it.
pub const PROJECTION_ROWS_MAX: usize = 65_536;
/// The pause before a projector that failed (the database gone, the cell's
/// schema not there yet) tries again; it doubles with each failure in a row,
/// up to [`PROJECTION_RETRY_MAX`] (a replica is rebuilt from a checkpoint at
/// each try, which costs the cell's database).
pub const PROJECTION_RETRY: Duration = Duration::from_secs(1);
pub const PROJECTION_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the projector did, for `/metrics` and tests.
#[derive(Debug)]
pub struct ProjectorStats {
    /// The batch the tables show.
    pub batch_seq: AtomicU64,
    /// The newest batch the projector has read from the log.
    pub log_seq: AtomicU64,
    /// Commit of a batch to its projection, seconds (Prometheus buckets).
    pub lag_seconds: Buckets,
    /// The same, in microseconds, for percentiles.
    lag_us: Mutex<Histogram<u64>>,
    pub transactions: AtomicU64,
    pub accounts_written: AtomicU64,
    pub transfers_written: AtomicU64,
    pub resyncs: AtomicU64,
    /// Runs that ended in an error (the projector starts again after [`PROJECTION_RETRY`]).
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl Default for ProjectorStats {
    fn default() -> Self {
        Self {
            batch_seq: AtomicU64::new(0),
            log_seq: AtomicU64::new(0),
            lag_seconds: Buckets::latency(),
            lag_us: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")),
            transactions: AtomicU64::new(0),
            accounts_written: AtomicU64::new(0),
            transfers_written: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl ProjectorStats {
    /// (p50, p99, max) of the projection lag so far, in milliseconds.
    pub fn lag_ms(&self) -> (f64, f64, f64) {
        let h = self.lag_us.lock().expect("lag lock");
        let ms = |us: u64| us as f64 / 1e3;
        (ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.max()))
    }

    /// Forgets the lag measured so far (a benchmark's measured phase starts).
    pub fn reset_lag(&self) {
        self.lag_seconds.reset();
        self.lag_us.lock().expect("lag lock").reset();
    }

    /// Batches the projector has read from the log and committed to the tables.
    pub fn lag_count(&self) -> u64 {
        self.lag_us.lock().expect("lag lock").len()
    }

    fn observe_lag(&self, seconds: f64) {
        self.lag_seconds.observe(seconds);
        let us = (seconds.max(0.0) * 1e6) as u64;
        let _ = self.lag_us.lock().expect("lag lock").record(us.clamp(1, 3_600_000_000));
    }

    /// The projector's lines of Prometheus text for cell `cell`.
    pub fn render_prometheus(&self, cell: CellId) -> String {
        let mut out = String::new();
        let c = format!("cell=\"{}\"", cell.0);
        out.push_str("# HELP cellpay_projection_lag_seconds From a batch's commit to its rows in the SQL tables.\n");
        out.push_str("# TYPE cellpay_projection_lag_seconds histogram\n");
        let b = self.lag_seconds.read();
        for (bound, n) in b.bounds.iter().zip(&b.cumulative) {
            out.push_str(&format!("cellpay_projection_lag_seconds_bucket{{{c},le=\"{bound}\"}} {n}\n"));
        }
        out.push_str(&format!("cellpay_projection_lag_seconds_bucket{{{c},le=\"+Inf\"}} {}\n", b.count));
        out.push_str(&format!("cellpay_projection_lag_seconds_sum{{{c}}} {}\n", b.sum));
        out.push_str(&format!("cellpay_projection_lag_seconds_count{{{c}}} {}\n", b.count));
        for (name, help, value) in [
            ("cellpay_projection_batch", "The log batch the SQL tables show.", self.batch_seq.load(Relaxed)),
            (
                "cellpay_projection_log_batch",
                "The newest log batch the projector has read.",
                self.log_seq.load(Relaxed),
            ),
            (
                "cellpay_projection_resyncs_total",
                "Resyncs from a checkpoint (the projector was behind every kept one).",
                self.resyncs.load(Relaxed),
            ),
            (
                "cellpay_projection_failures_total",
                "Projector runs that ended in an error.",
                self.failures.load(Relaxed),
            ),
        ] {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{c}}} {value}\n"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("postgres:{place}: {source}")]
    Sql { place: String, source: postgres::Error },
    #[error("the cell has no checkpoint yet (not started on this database?)")]
    NoCheckpoint,
    #[error("another projector moved the watermark of {schema} (expected batch {expected})")]
    Raced { schema: String, expected: u64 },
    #[error("replaying batch {seq} for the projection: {reason}")]
    Replay { seq: u64, reason: String },
}

fn sql(place: &str) -> impl FnOnce(postgres::Error) -> ProjectorError + '_ {
    move |source| ProjectorError::Sql { place: place.to_string(), source }
}

/// The projection's tables, created if missing (under the cell's DDL lock).
fn create_tables(client: &mut postgres::Client, schema: &str) -> Result<(), ProjectorError> {
    let s = format!("\"{schema}\"");
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('cellpay-store:{schema}'));
             CREATE TABLE IF NOT EXISTS {s}.accounts (
                 id text PRIMARY KEY, tenant text NOT NULL, currency text NOT NULL, overdraft boolean NOT NULL,
                 balance bigint NOT NULL, batch_seq bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS {s}.transfers (
                 payer text NOT NULL, id text NOT NULL, payee text NOT NULL, amount bigint NOT NULL,
                 currency text NOT NULL, status text NOT NULL, accepted_at timestamptz NOT NULL,
                 batch_seq bigint NOT NULL, PRIMARY KEY (payer, id));
             CREATE TABLE IF NOT EXISTS {s}.projection (
                 one boolean PRIMARY KEY DEFAULT true CHECK (one), batch_seq bigint NOT NULL,
                 projected_at timestamptz, resynced_at_batch bigint);
             INSERT INTO {s}.projection (batch_seq) VALUES (0) ON CONFLICT DO NOTHING;
             COMMIT;"
        ))
        .map_err(sql(schema))
}

/// Changes waiting for the next projection transaction, each account and
/// transfer once (the latest wins).
#[derive(Default)]
struct Pending {
    accounts: HashMap<AccountId, AccountView>,
    transfers: HashMap<(AccountId, TransferId), TransferRow>,
    /// Log batches folded in: the first and last seq.
    from: u64,
    through: u64,
    /// When each committed, Unix seconds on the database's clock.
    committed_at_s: Vec<f64>,
}

impl Pending {
    fn rows(&self) -> usize {
        self.accounts.len() + self.transfers.len()
    }

    fn add(&mut self, touched: cellpay_core::Touched) {
        for a in touched.accounts {
            self.accounts.insert(a.id.clone(), a);
        }
        for t in touched.transfers {
            self.transfers.insert((t.transfer.from.clone(), t.transfer.id.clone()), t);
        }
    }
}

/// A projector of one cell (see the module's comment).
pub struct Projector {
    url: String,
    schema: String,
    cell: CellId,
    stats: Arc<ProjectorStats>,
}

/// A projector running on a thread of its own (see [`Projector::spawn`]);
/// dropped, it is asked to stop and not waited for.
pub struct ProjectorThread {
    pub stats: Arc<ProjectorStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProjectorThread {
    /// Asks it to stop after the transaction it is in.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Has its thread ended?
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops it and waits for its thread.
    pub fn join(mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProjectorThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A replica of the cell's state, at log batch `at`.
struct Replica {
    state: CellState,
    at: u64,
}

impl Projector {
    pub fn new(url: &str, schema: &str, cell: CellId, stats: Arc<ProjectorStats>) -> Self {
        Self { url: url.to_string(), schema: schema.to_string(), cell, stats }
    }

    /// Starts a projector of cell `cell` (its log in `schema` at `url`) on a
    /// thread named `projector-<cell>`, running until stopped.
    pub fn spawn(url: &str, schema: &str, cell: CellId) -> std::io::Result<ProjectorThread> {
        let stats = Arc::new(ProjectorStats::default());
        let projector = Self::new(url, schema, cell, stats.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread =
            std::thread::Builder::new().name(format!("projector-{cell}")).spawn(move || projector.run(&flag))?;
        Ok(ProjectorThread { stats, stop, thread: Some(thread) })
    }

    /// Runs until `stop`, starting over after each failure.
    pub fn run(&self, stop: &AtomicBool) {
        let mut pause = PROJECTION_RETRY;
        while !stop.load(Relaxed) {
            let written_before = self.stats.transactions.load(Relaxed);
            if let Err(e) = self.run_once(stop) {
                self.stats.failures.fetch_add(1, Relaxed);
                // A run that wrote something was a good run: the backoff starts over.
                if self.stats.transactions.load(Relaxed) > written_before {
                    pause = PROJECTION_RETRY;
                }
                tracing::warn!(cell = %self.cell, "the SQL projection stopped and starts over in {pause:?}: {e}");
                *self.stats.last_error.lock().expect("error lock") = Some(e.to_string());
                let mut waited = Duration::ZERO;
                while waited < pause && !stop.load(Relaxed) {
                    std::thread::sleep(PROJECTION_POLL);
                    waited += PROJECTION_POLL;
                }
                pause = (pause * 2).min(PROJECTION_RETRY_MAX);
            }
        }
    }

    /// One run: bootstrap the replica at or before the tables' watermark,
    /// then follow the log until `stop` or an error.
    pub fn run_once(&self, stop: &AtomicBool) -> Result<(), ProjectorError> {
        let mut reader = PostgresStore::open_reader(&self.url, &self.schema)?;
        create_tables(reader.client(), &self.schema)?;
        let watermark = self.watermark(reader.client())?;
        let mut replica = self.bootstrap(&mut reader, watermark)?;
        let mut watermark = if replica.at > watermark {
            // Behind every checkpoint kept: write the whole state once.
            self.resync(&mut reader, &replica, watermark)?;
            replica.at
        } else {
            watermark
        };
        while !stop.load(Relaxed) {
            let pending = self.read_log(&mut reader, &mut replica, watermark, u64::MAX)?;
            if pending.through == 0 {
                std::thread::sleep(PROJECTION_POLL);
                continue;
            }
            self.write(reader.client(), &pending, watermark)?;
            watermark = pending.through;
        }
        Ok(())
    }

    fn watermark(&self, client: &mut postgres::Client) -> Result<u64, ProjectorError> {
        let row = client
            .query_one(&format!("SELECT batch_seq FROM \"{}\".projection", self.schema), &[])
            .map_err(sql(&self.schema))?;
        let seq: i64 = row.get(0);
        self.stats.batch_seq.store(seq as u64, Relaxed);
        Ok(seq as u64)
    }

    /// The replica from the newest checkpoint at or before `watermark`
    /// (then the log up to it, unprojected); none there: the newest one.
    fn bootstrap(&self, reader: &mut PostgresStore, watermark: u64) -> Result<Replica, ProjectorError> {
        let checkpoints = reader.checkpoints()?;
        let chosen = checkpoints
            .iter()
            .find(|c| c.seq <= watermark)
            .or_else(|| checkpoints.first())
            .ok_or(ProjectorError::NoCheckpoint)?;
        let checkpoint = reader.read_checkpoint(chosen.seq)?;
        let state = snapshot::decode(&checkpoint.snapshot)
            .map_err(|e| ProjectorError::Replay { seq: checkpoint.seq, reason: format!("snapshot: {e}") })?;
        let mut replica = Replica { state, at: checkpoint.seq };
        replica.state.set_touched(true);
        // Up to the watermark: applied, not written (the tables hold it).
        while replica.at < watermark {
            let before = replica.at;
            self.read_log(reader, &mut replica, watermark, watermark)?;
            if replica.at == before {
                return Err(ProjectorError::Replay {
                    seq: before,
                    reason: format!("the log ends at {before}, before the projection's watermark {watermark}"),
                });
            }
        }
        Ok(replica)
    }

    /// Applies up to [`PROJECTION_BATCHES_MAX`] log batches after the
    /// replica's (none past `until`, and none more once
    /// [`PROJECTION_ROWS_MAX`] rows wait), collecting what those after
    /// `watermark` changed. One bounded query: no long read holds the log.
    fn read_log(
        &self,
        reader: &mut PostgresStore,
        replica: &mut Replica,
        watermark: u64,
        until: u64,
    ) -> Result<Pending, ProjectorError> {
        let mut pending = Pending::default();
        let left = usize::try_from(until.saturating_sub(replica.at)).unwrap_or(usize::MAX);
        for row in reader.read_after(replica.at, PROJECTION_BATCHES_MAX.min(left))? {
            let seq = row.seq;
            let batch = decode_batch(&row.bytes).map_err(|e| ProjectorError::Replay { seq, reason: e.to_string() })?;
            replica.state.advance_clock(batch.clock_ms);
            for cmd in &batch.commands {
                let outcome = replica.state.replay(cmd);
                if !outcome.changed_state() {
                    let reason = format!("a logged command did not apply: {outcome:?}");
                    return Err(ProjectorError::Replay { seq, reason });
                }
            }
            let touched = replica.state.take_touched();
            replica.state.end_batch();
            replica.at = seq;
            self.stats.log_seq.fetch_max(seq, Relaxed);
            if seq > watermark {
                if pending.from == 0 {
                    pending.from = seq;
                }
                pending.through = seq;
                pending.committed_at_s.push(row.committed_at_s);
                pending.add(touched);
                if pending.rows() >= PROJECTION_ROWS_MAX {
                    break;
                }
            }
        }
        Ok(pending)
    }

    /// Writes `pending` and moves the watermark from `watermark` to
    /// `pending.through`, in one transaction.
    fn write(&self, client: &mut postgres::Client, pending: &Pending, watermark: u64) -> Result<(), ProjectorError> {
        let place = self.schema.as_str();
        let s = format!("\"{}\"", self.schema);
        let mut tx = client.transaction().map_err(sql(place))?;
        upsert(&mut tx, &s, pending.accounts.values(), pending.transfers.values(), pending.through, place)?;
        let moved = tx
            .query_opt(
                &format!(
                    "UPDATE {s}.projection SET batch_seq = $1, projected_at = clock_timestamp() WHERE batch_seq = $2 \
                     RETURNING EXTRACT(EPOCH FROM clock_timestamp())::float8"
                ),
                &[&(pending.through as i64), &(watermark as i64)],
            )
            .map_err(sql(place))?;
        let Some(now) = moved else {
            return Err(ProjectorError::Raced { schema: self.schema.clone(), expected: watermark });
        };
        tx.commit().map_err(sql(place))?;
        let now: f64 = now.get(0);
        for committed in &pending.committed_at_s {
            self.stats.observe_lag(now - committed);
        }
        self.stats.transactions.fetch_add(1, Relaxed);
        self.stats.accounts_written.fetch_add(pending.accounts.len() as u64, Relaxed);
        self.stats.transfers_written.fetch_add(pending.transfers.len() as u64, Relaxed);
        self.stats.batch_seq.store(pending.through, Relaxed);
        Ok(())
    }

    /// Writes every account and in-memory transfer of the replica and moves
    /// the watermark to the replica's batch.
    fn resync(&self, reader: &mut PostgresStore, replica: &Replica, watermark: u64) -> Result<(), ProjectorError> {
        let place = self.schema.as_str();
        let s = format!("\"{}\"", self.schema);
        let all = replica.state.everything();
        tracing::warn!(
            cell = %self.cell, from = watermark, to = replica.at,
            "the SQL projection is behind every kept checkpoint: writing the whole ledger as of batch {}", replica.at
        );
        let client = reader.client();
        let mut tx = client.transaction().map_err(sql(place))?;
        upsert(&mut tx, &s, all.accounts.iter(), all.transfers.iter(), replica.at, place)?;
        let moved = tx
            .execute(
                &format!(
                    "UPDATE {s}.projection SET batch_seq = $1, projected_at = clock_timestamp(), \
                     resynced_at_batch = $1 WHERE batch_seq = $2"
                ),
                &[&(replica.at as i64), &(watermark as i64)],
            )
            .map_err(sql(place))?;
        if moved != 1 {
            return Err(ProjectorError::Raced { schema: self.schema.clone(), expected: watermark });
        }
        tx.commit().map_err(sql(place))?;
        self.stats.resyncs.fetch_add(1, Relaxed);
        self.stats.batch_seq.store(replica.at, Relaxed);
        Ok(())
    }
}

/// Upserts accounts and transfers, one statement each (arrays unnested).
fn upsert<'a>(
    tx: &mut postgres::Transaction<'_>,
    s: &str,
    accounts: impl Iterator<Item = &'a AccountView>,
    transfers: impl Iterator<Item = &'a TransferRow>,
    batch: u64,
    place: &str,
) -> Result<(), ProjectorError> {
    let batch = batch as i64;
    let (mut ids, mut tenants, mut currencies, mut overdrafts, mut balances) = (vec![], vec![], vec![], vec![], vec![]);
    for a in accounts {
        ids.push(a.id.as_str().to_string());
        tenants.push(a.tenant.as_str().to_string());
        currencies.push(a.currency.as_str().to_string());
        overdrafts.push(a.overdraft);
        balances.push(a.balance);
    }
    if !ids.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO {s}.accounts (id, tenant, currency, overdraft, balance, batch_seq) \
                 SELECT id, tenant, currency, overdraft, balance, $6 \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bigint[]) \
                     AS u(id, tenant, currency, overdraft, balance) \
                 ON CONFLICT (id) DO UPDATE SET balance = EXCLUDED.balance, batch_seq = EXCLUDED.batch_seq"
            ),
            &[&ids, &tenants, &currencies, &overdrafts, &balances, &batch],
        )
        .map_err(sql(place))?;
    }
    let (mut payers, mut tids, mut payees, mut amounts, mut tcurrencies, mut statuses, mut accepted) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    // One row per key (a payer may reuse an id once the first left the
    // idempotency window: the newer wins), or the upsert would touch a row twice.
    let mut newest: HashMap<(&str, &str), &TransferRow> = HashMap::new();
    for t in transfers {
        let key = (t.transfer.from.as_str(), t.transfer.id.as_str());
        if newest.get(&key).is_none_or(|had| had.accepted_at_ms <= t.accepted_at_ms) {
            newest.insert(key, t);
        }
    }
    for t in newest.into_values() {
        payers.push(t.transfer.from.as_str().to_string());
        tids.push(t.transfer.id.as_str().to_string());
        payees.push(t.transfer.to.as_str().to_string());
        amounts.push(t.transfer.amount);
        tcurrencies.push(t.transfer.currency.as_str().to_string());
        statuses.push(t.transfer.status.as_str().to_string());
        accepted.push(t.accepted_at_ms as i64);
    }
    if !payers.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO {s}.transfers (payer, id, payee, amount, currency, status, accepted_at, batch_seq) \
                 SELECT payer, id, payee, amount, currency, status, to_timestamp(accepted_ms / 1000.0), $8 \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::bigint[]) \
                     AS u(payer, id, payee, amount, currency, status, accepted_ms) \
                 ON CONFLICT (payer, id) DO UPDATE SET payee = EXCLUDED.payee, amount = EXCLUDED.amount, \
                     currency = EXCLUDED.currency, status = EXCLUDED.status, accepted_at = EXCLUDED.accepted_at, \
                     batch_seq = EXCLUDED.batch_seq"
            ),
            &[&payers, &tids, &payees, &amounts, &tcurrencies, &statuses, &accepted, &batch],
        )
        .map_err(sql(place))?;
    }
    Ok(())
}
