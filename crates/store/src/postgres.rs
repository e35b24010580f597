//! The PostgreSQL store: the same log and checkpoints as the embedded store,
//! kept in one schema per cell, with a fence row instead of a file lock.
//!
//! ```text
//! <schema>.batches          (seq, bytes, crc)          one row per batch, one transaction each;
//!                                                       partitioned by seq range (batches_<k>)
//! <schema>.checkpoints      (seq, chunk, bytes)        a snapshot in chunks of CHECKPOINT_CHUNK_BYTES_MAX at most
//! <schema>.checkpoint_heads (seq, chunks, len, crc, set_aside)
//! <schema>.fence            (one, token)               the writer's token; open increments it
//! <schema>.layout           (one, batches_per_partition) fixed when the schema is created
//! ```
//!
//! Why a fence and not a lease: `open` takes the cell over by incrementing the
//! token, and every write first reads it `FOR SHARE` in its own transaction and
//! refuses to commit unless it is still this store's token. The share lock
//! conflicts with the takeover's update, so a write either commits before a
//! newer `open` (whose replay then reads it) or sees the new token and commits
//! nothing. An old process that wakes up after a pause can never commit behind
//! a newer writer's back, whatever its clock says.
//!
//! A batch's `crc` is the record checksum of the embedded log (crc32c over
//! length, seq and bytes), so a row whose bytes or seq were changed behind the
//! store's back is [`StoreError::Corrupt`] on replay. A transaction commits
//! whole, so there is no torn tail. A checkpoint's chunks may span several
//! transactions; its head row is written in the same transaction as the last
//! chunk, so a checkpoint without a head was never finished and never counts.
//! Checkpoints are written in the background on a connection of their own
//! (at most one in flight; its failure is answered by the next call).
//!
//! Old log goes whole partitions at a time: `batches` is partitioned by
//! seq range, `batches_per_partition` batches each (partition `batches_<k>`
//! holds seqs `k·W ..< (k+1)·W`), and once a checkpoint is durable every
//! partition the oldest kept checkpoint covers is dropped. No `DELETE`, so
//! no dead rows for VACUUM to find; the covered rows of the partition still
//! in use stay until it goes (replay starts after the checkpoint, so they are
//! never read). The writer makes the partition a batch needs if it is not
//! there, and the next one ahead of time, each as a table of its own then
//! `ATTACH PARTITION` (a lock reads and inserts do not conflict with); DDL
//! off the commit's own need waits at most `DDL_LOCK_TIMEOUT` for its lock.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::{Client, IsolationLevel, NoTls, Row, Statement, Transaction};

use crate::embedded::CHECKPOINTS_KEPT;
use crate::frame::{self, RECORD_BYTES_MAX};
use crate::{Checkpoint, CheckpointReady, ReplayReport, Store, StoreError, StoreStats, StoredCheckpoint, Visitor};

/// The largest piece of a checkpoint one row (and one transaction) carries.
pub const CHECKPOINT_CHUNK_BYTES_MAX: usize = 16 << 20;

/// PostgreSQL limits identifiers to 63 bytes.
const SCHEMA_NAME_BYTES_MAX: usize = 63;
/// Time to connect to PostgreSQL when the URL sets none.
pub const CONNECT_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tuning of the PostgreSQL store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// A checkpoint is written in rows (and transactions) of at most this many
    /// bytes; at most [`CHECKPOINT_CHUNK_BYTES_MAX`].
    pub checkpoint_chunk_bytes: usize,
    /// Batches per partition of `batches`, for a schema created now (an
    /// existing schema keeps the width it was created with).
    pub batches_per_partition: u64,
}

/// Batches per partition of the log: at 1,000 batches a second (a busy
/// cell's group commits) a partition a quarter of an hour.
pub const BATCHES_PER_PARTITION_DEFAULT: u64 = 1 << 20;

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            checkpoint_chunk_bytes: CHECKPOINT_CHUNK_BYTES_MAX,
            batches_per_partition: BATCHES_PER_PARTITION_DEFAULT,
        }
    }
}

/// The statements of the write path, prepared once at `open`.
struct Statements {
    fence_share: Statement,
    insert_batch: Statement,
}

/// The PostgreSQL backend of [`Store`].
pub struct PostgresStore {
    client: Client,
    schema: String,
    options: PostgresOptions,
    statements: Statements,
    /// The fence token this store took the cell over with.
    token: i64,
    /// The schema's partition width, from its `layout` row.
    batches_per_partition: u64,
    /// The highest partition this store made sure exists.
    partition_made: Option<u64>,
    /// The batch from which to try again to make the next partition ahead.
    ahead_from: u64,
    /// A reader (`open_reader`): it writes nothing.
    read_only: bool,
    /// The next batch sequence number; `None` until `replay` has run.
    next_seq: Option<u64>,
    stats: StoreStats,
    poisoned: bool,
    /// The URL, for the checkpoint writer's own connection.
    url: String,
    /// The background writer of the latest checkpoint, until it is joined.
    checkpoint_in_flight: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    /// What background checkpoint writers wrote.
    checkpoint_counters: Arc<CheckpointCounters>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // A checkpoint in flight (a stopping cell's final one) finishes, or
        // fails, before the store goes: never a writer left behind.
        if let Err(e) = self.finish_checkpoint() {
            eprintln!("postgres:{}: the last checkpoint was not written: {e}", self.schema);
        }
    }
}

/// Counters the background checkpoint writers add to.
#[derive(Debug, Default)]
struct CheckpointCounters {
    bytes: AtomicU64,
    commits: AtomicU64,
}

/// A schema name we can put in SQL unquoted-safe: `[a-z_][a-z0-9_]*`, 63 bytes at most.
fn is_plain_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    first_ok
        && name.len() <= SCHEMA_NAME_BYTES_MAX
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn pg_error(place: &str) -> impl FnOnce(::postgres::Error) -> StoreError + '_ {
    move |source| StoreError::Postgres { place: place.to_string(), source }
}

/// Sequence numbers are `bigint` in SQL.
fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).expect("a batch sequence number stays below 2^63 (one batch per microsecond for 290 000 years)")
}

fn not_found(path: PathBuf, what: String) -> StoreError {
    StoreError::Io { path, source: io::Error::new(io::ErrorKind::NotFound, what) }
}

/// TCP keepalive on the store's connections: idle this long, then a probe
/// every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] unanswered ones and the
/// connection is closed. A database that vanished from the network (its
/// machine gone, a cut cable) then fails the write in flight after about
/// 10 s instead of never; the cell's process exits and its replacement finds
/// whichever server accepts writes.
pub const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
pub const KEEPALIVE_RETRIES: u32 = 5;
/// Data sent and not acknowledged by the server's machine for this long closes the connection.
pub const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Connects to `url` with the store's bounds: a connect timeout (the URL's
/// own wins), TCP keepalive and a user timeout, and never a statement timeout.
fn connect(url: &str, place: &str) -> Result<Client, StoreError> {
    let mut config: ::postgres::Config = url.parse().map_err(pg_error(place))?;
    // A database that does not answer is an error, not a wait without end (I7).
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT_DEFAULT);
    }
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    let mut client = config.connect(NoTls).map_err(pg_error(place))?;
    // Never a statement timeout on the store's session, whatever the role,
    // database or server sets: PostgreSQL answers a commit whose wait for a
    // synchronous standby was cancelled (which a statement timeout does) as
    // committed, with only a WARNING. The cell would then acknowledge a batch
    // the standby may not have, and a failover would lose it (I2).
    client.batch_execute("SET statement_timeout = 0").map_err(pg_error(place))?;
    Ok(client)
}

/// One batch of the log as a reader gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRow {
    pub seq: u64,
    pub bytes: Vec<u8>,
    /// When it committed, Unix seconds on the database's clock.
    pub committed_at_s: f64,
}

/// How long DDL off the write path waits for its lock before it gives up
/// until later: a partition made ahead (its attach conflicts with other DDL
/// only) and an old one dropped (`DROP` takes the log table's exclusive lock,
/// which inserts would queue behind for as long as it waited).
const DDL_LOCK_TIMEOUT: &str = "100ms";
/// Batches between two tries to make the next partition ahead of time.
const AHEAD_RETRY_BATCHES: u64 = 64;

/// Reads the fence inside `tx`, holding it `FOR SHARE` until the commit, and
/// refuses unless it still carries `mine`.
fn check_fence(tx: &mut Transaction<'_>, fence_share: &Statement, mine: i64, place: &str) -> Result<(), StoreError> {
    let row = tx.query_one(fence_share, &[]).map_err(pg_error(place))?;
    let current: i64 = row.try_get(0).map_err(pg_error(place))?;
    if current != mine {
        return Err(StoreError::Fenced { mine, current });
    }
    Ok(())
}

/// The advisory lock that serializes DDL on a cell's schema (two first
/// opens, two writers making one partition), which would otherwise race on
/// `CREATE … IF NOT EXISTS`.
fn ddl_lock_sql(schema: &str) -> String {
    format!("SELECT pg_advisory_xact_lock(hashtext('cellpay-store:{schema}'));")
}

/// Creates the schema of a cell and its tables, if missing.
fn create_tables_sql(schema: &str, batches_per_partition: u64) -> String {
    let s = format!("\"{schema}\"");
    format!(
        "{}
         CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.batches (
             seq bigint PRIMARY KEY, bytes bytea NOT NULL, crc integer NOT NULL,
             committed_at timestamptz NOT NULL DEFAULT clock_timestamp()) PARTITION BY RANGE (seq);
         CREATE TABLE IF NOT EXISTS {s}.layout (
             one boolean PRIMARY KEY DEFAULT true CHECK (one), batches_per_partition bigint NOT NULL);
         INSERT INTO {s}.layout (batches_per_partition) VALUES ({batches_per_partition}) ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS {s}.checkpoints (
             seq bigint, chunk integer, bytes bytea NOT NULL, PRIMARY KEY (seq, chunk));
         CREATE TABLE IF NOT EXISTS {s}.checkpoint_heads (
             seq bigint PRIMARY KEY, chunks integer NOT NULL, len bigint NOT NULL, crc integer NOT NULL,
             set_aside boolean NOT NULL DEFAULT false);
         CREATE TABLE IF NOT EXISTS {s}.fence (
             one boolean PRIMARY KEY DEFAULT true CHECK (one), token bigint NOT NULL);
         INSERT INTO {s}.fence (token) VALUES (0) ON CONFLICT DO NOTHING;",
        ddl_lock_sql(schema)
    )
}

/// The partition of `batches` that holds `seq`.
fn partition_of(seq: u64, width: u64) -> u64 {
    seq / width
}

impl PostgresStore {
    /// Connects to `url`, creates schema `schema` and its tables if missing,
    /// and takes the cell over: the fence token is incremented, so every
    /// earlier store of this cell is refused its next write.
    pub fn open(url: &str, schema: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        if !is_plain_identifier(schema) {
            return Err(StoreError::SchemaName { name: schema.to_string() });
        }
        assert!(
            options.checkpoint_chunk_bytes > 0 && options.checkpoint_chunk_bytes <= CHECKPOINT_CHUNK_BYTES_MAX,
            "checkpoint_chunk_bytes must be in 1..={CHECKPOINT_CHUNK_BYTES_MAX}"
        );
        assert!(options.batches_per_partition > 0, "batches_per_partition must be at least 1");
        let place = format!("postgres:{schema}");
        let mut client = connect(url, &place)?;
        let s = format!("\"{schema}\"");
        let ddl = create_tables_sql(schema, options.batches_per_partition);
        let mut tx = client.transaction().map_err(pg_error(&place))?;
        tx.batch_execute(&ddl).map_err(pg_error(&place))?;
        // A schema made by a cellpay before the log was partitioned.
        let partitioned = format!(
            "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = '{schema}' AND c.relname = 'batches'"
        );
        let partitioned: bool = tx.query_one(&partitioned, &[]).and_then(|r| r.try_get(0)).map_err(pg_error(&place))?;
        if !partitioned {
            return Err(StoreError::Io {
                path: PathBuf::from(format!("{place}.batches")),
                source: io::Error::other(
                    "the log table is not partitioned (made by an older cellpay): move the cell to a new schema",
                ),
            });
        }
        let width = tx.query_one(&format!("SELECT batches_per_partition FROM {s}.layout"), &[]);
        let width: i64 = width.and_then(|r| r.try_get(0)).map_err(pg_error(&place))?;
        let row = tx.query_one(&format!("UPDATE {s}.fence SET token = token + 1 RETURNING token"), &[]);
        let token: i64 = row.and_then(|r| r.try_get(0)).map_err(pg_error(&place))?;
        tx.commit().map_err(pg_error(&place))?;
        Self::with_client(client, url, schema, options, token, width as u64, false)
    }

    /// The store around a connected client: prepares the write path's statements.
    fn with_client(
        mut client: Client,
        url: &str,
        schema: &str,
        options: PostgresOptions,
        token: i64,
        batches_per_partition: u64,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        let (s, place) = (format!("\"{schema}\""), format!("postgres:{schema}"));
        let statements = Statements {
            fence_share: client.prepare(&fence_share_sql(schema)).map_err(pg_error(&place))?,
            // One statement, so one round trip and its own transaction: the row
            // goes in only while the fence still holds this store's token (the
            // share lock orders it against a newer writer's increment, after
            // which the re-checked condition finds no row and nothing goes in).
            insert_batch: client
                .prepare(&format!(
                    "INSERT INTO {s}.batches (seq, bytes, crc) SELECT $1, $2, $3 FROM {s}.fence WHERE token = $4 FOR SHARE"
                ))
                .map_err(pg_error(&place))?,
        };
        Ok(Self {
            client,
            schema: schema.to_string(),
            options,
            statements,
            token,
            batches_per_partition,
            partition_made: None,
            ahead_from: 0,
            read_only,
            next_seq: None,
            stats: StoreStats::default(),
            poisoned: false,
            url: url.to_string(),
            checkpoint_in_flight: None,
            checkpoint_counters: Arc::default(),
        })
    }

    /// Opens the cell's store to read it only (a projection, an inspection):
    /// it takes nothing over (the fence stays as it is), creates nothing, and
    /// every write it tries is refused. Errors when the cell's schema does not
    /// exist yet.
    pub fn open_reader(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !is_plain_identifier(schema) {
            return Err(StoreError::SchemaName { name: schema.to_string() });
        }
        let place = format!("postgres:{schema}");
        let mut client = connect(url, &place)?;
        let s = format!("\"{schema}\"");
        let width = client.query_one(&format!("SELECT batches_per_partition FROM {s}.layout"), &[]);
        let width: i64 = width.and_then(|r| r.try_get(0)).map_err(pg_error(&place))?;
        // No token is ever below 0: every write finds the fence elsewhere.
        Self::with_client(client, url, schema, PostgresOptions::default(), -1, width as u64, true)
    }

    /// The connection, for a reader's own queries (a projection writes its tables through it).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The fence token this store took the cell over with.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// `"<schema>".<table>`, for SQL.
    fn table(&self, name: &str) -> String {
        table_of(&self.schema, name)
    }

    /// `postgres:<schema>.<table>`, for messages.
    fn place(&self, table: &str) -> String {
        format!("postgres:{}.{table}", self.schema)
    }

    fn checkpoint_path(&self, seq: u64) -> PathBuf {
        PathBuf::from(format!("{}/{seq}", self.place("checkpoints")))
    }

    /// Waits for the checkpoint in flight, if any, and answers its failure.
    fn finish_checkpoint(&mut self) -> Result<(), StoreError> {
        match self.checkpoint_in_flight.take() {
            None => Ok(()),
            Some(writer) => writer.join().unwrap_or(Err(StoreError::Poisoned)),
        }
    }

    /// What a background writer needs to write a checkpoint of this cell.
    fn checkpoint_job(&self) -> CheckpointJob {
        CheckpointJob {
            url: self.url.clone(),
            schema: self.schema.clone(),
            token: self.token,
            chunk_bytes: self.options.checkpoint_chunk_bytes,
            width: self.batches_per_partition,
            counters: self.checkpoint_counters.clone(),
        }
    }

    /// Makes sure the partition that holds `seq` exists (one round trip,
    /// once per partition, when it was not made ahead), and from halfway
    /// through a partition tries to make the next one ahead of time.
    fn make_partition(&mut self, seq: u64) -> Result<(), StoreError> {
        let width = self.batches_per_partition;
        let k = partition_of(seq, width);
        if self.partition_made.is_none_or(|made| made < k) {
            // Needed now: wait for the lock as long as that takes.
            self.create_partition(k, None)?;
            self.partition_made = Some(k);
        }
        // Ahead of time, off the critical moment, and without queueing on the
        // lock (a long read of the log holds it): a try that would wait gives
        // up and comes back [`AHEAD_RETRY_BATCHES`] later.
        if seq % width >= width / 2 && self.partition_made == Some(k) && seq >= self.ahead_from {
            match self.create_partition(k + 1, Some(DDL_LOCK_TIMEOUT)) {
                Ok(()) => self.partition_made = Some(k + 1),
                Err(_) => self.ahead_from = seq + AHEAD_RETRY_BATCHES,
            }
        }
        Ok(())
    }

    /// Makes partition `k`: a table of its own, then `ATTACH PARTITION`,
    /// whose lock on the log table (SHARE UPDATE EXCLUSIVE) lets reads and
    /// inserts go on, where `CREATE TABLE … PARTITION OF` would take an
    /// exclusive one. Nothing to do when it is attached already.
    fn create_partition(&mut self, k: u64, lock_timeout: Option<&str>) -> Result<(), StoreError> {
        let place = self.place("batches");
        let (from, to) = (k * self.batches_per_partition, (k + 1) * self.batches_per_partition);
        let (name, parent) = (self.table(&format!("batches_{k}")), self.table("batches"));
        let mut tx = self.client.transaction().map_err(pg_error(&place))?;
        let wait = lock_timeout.map(|t| format!("SET LOCAL lock_timeout = '{t}';")).unwrap_or_default();
        tx.batch_execute(&format!("{wait} {}", ddl_lock_sql(&self.schema))).map_err(pg_error(&place))?;
        let attached = format!("SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass('{name}')");
        if tx.query_opt(&attached, &[]).map_err(pg_error(&place))?.is_none() {
            // The range as a CHECK first, so the attach need not scan to prove it.
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} (LIKE {parent} INCLUDING DEFAULTS, \
                     CHECK (seq >= {f} AND seq < {t}));
                 ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ({f}) TO ({t});",
                f = sql_seq(from),
                t = sql_seq(to)
            );
            tx.batch_execute(&sql).map_err(pg_error(&place))?;
        }
        tx.commit().map_err(pg_error(&place))
    }

    /// Reads at most `limit` batches after `after`, in order, each checked
    /// like a replay's (checksum, no gap), with its commit time: a bounded
    /// query, so a reader following the log never holds a long read.
    pub fn read_after(&mut self, after: u64, limit: usize) -> Result<Vec<LoggedRow>, StoreError> {
        let place = self.place("batches");
        let sql = format!(
            "SELECT seq, bytes, crc, EXTRACT(EPOCH FROM committed_at)::float8 FROM {} \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
            self.table("batches")
        );
        let rows = self.client.query(&sql, &[&sql_seq(after), &(limit as i64)]).map_err(pg_error(&place))?;
        let mut out = Vec::with_capacity(rows.len());
        for (expected, row) in (after + 1..).zip(rows) {
            let seq: i64 = row.try_get(0).map_err(pg_error(&place))?;
            let bytes: Vec<u8> = row.try_get(1).map_err(pg_error(&place))?;
            let crc: i32 = row.try_get(2).map_err(pg_error(&place))?;
            let committed_at_s: f64 = row.try_get(3).map_err(pg_error(&place))?;
            let seq = seq as u64;
            if seq != expected {
                return Err(StoreError::Gap { file: PathBuf::from(&place), expected, found: seq });
            }
            if frame::checksum(seq, &bytes) != crc as u32 {
                return Err(StoreError::Corrupt {
                    file: PathBuf::from(format!("{place}/{seq}")),
                    offset: 0,
                    reason: format!("batch {seq}: checksum mismatch"),
                });
            }
            out.push(LoggedRow { seq, bytes, committed_at_s });
        }
        Ok(out)
    }

    /// A reader writes nothing.
    fn refuse_if_reader(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::Io {
                path: PathBuf::from(format!("postgres:{}", self.schema)),
                source: io::Error::other("this store was opened to read only"),
            });
        }
        Ok(())
    }

    /// One statement, one round trip: insert the batch where the fence holds
    /// this store's token. No row inserted: a newer writer took the cell over.
    fn commit_batch(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        self.make_partition(seq)?;
        let place = self.place("batches");
        let crc = frame::checksum(seq, batch) as i32;
        // Commit point. If the answer is lost (the connection broke) the batch
        // may or may not have committed: the store stays poisoned and the
        // cell must reopen, whose replay reads what did commit.
        let inserted = self
            .client
            .execute(&self.statements.insert_batch, &[&sql_seq(seq), &batch, &crc, &self.token])
            .map_err(pg_error(&place))?;
        if inserted == 1 {
            return Ok(());
        }
        let mut tx = self.client.transaction().map_err(pg_error(&place))?;
        check_fence(&mut tx, &self.statements.fence_share, self.token, &place)?;
        Err(StoreError::Io {
            path: PathBuf::from(&place),
            source: std::io::Error::other(format!(
                "batch {seq} was not inserted, yet the fence holds this store's token"
            )),
        })
    }
}

/// `"<schema>".<table>`, for SQL.
fn table_of(schema: &str, name: &str) -> String {
    format!("\"{schema}\".{name}")
}

/// Reads the fence row `FOR SHARE` (held until the transaction ends).
fn fence_share_sql(schema: &str) -> String {
    format!("SELECT token FROM {} FOR SHARE", table_of(schema, "fence"))
}

/// The seqs of the checkpoints kept, newest first.
fn kept_sql(schema: &str) -> String {
    format!(
        "SELECT seq FROM {} WHERE NOT set_aside ORDER BY seq DESC LIMIT {CHECKPOINTS_KEPT}",
        table_of(schema, "checkpoint_heads")
    )
}

/// Inside the transaction that completes a checkpoint: drops checkpoints
/// beyond the newest [`CHECKPOINTS_KEPT`] (set-aside ones stay) and chunks
/// without a head (an unfinished write of an earlier writer or of ours: the
/// fence says no one else is writing).
fn drop_covered_sql(schema: &str) -> String {
    let (heads, chunks) = (table_of(schema, "checkpoint_heads"), table_of(schema, "checkpoints"));
    format!(
        "DELETE FROM {heads} WHERE NOT set_aside AND seq NOT IN ({});
         DELETE FROM {chunks} c WHERE NOT EXISTS (SELECT 1 FROM {heads} h WHERE h.seq = c.seq);",
        kept_sql(schema)
    )
}

/// A checkpoint to write on a connection of its own, off the engine's thread.
struct CheckpointJob {
    url: String,
    schema: String,
    token: i64,
    chunk_bytes: usize,
    width: u64,
    counters: Arc<CheckpointCounters>,
}

impl CheckpointJob {
    /// Writes checkpoint `seq` once `ready` says it may: chunk by chunk, one
    /// transaction each, each checking the fence; the head goes with the last
    /// chunk, and with it the checkpoints no longer kept; then the log
    /// partitions the kept ones cover.
    fn run(self, seq: u64, snapshot: Vec<u8>, ready: CheckpointReady) -> Result<(), StoreError> {
        ready().map_err(|reason| StoreError::CheckpointNotReady { seq, reason })?;
        let schema = self.schema.as_str();
        let place = format!("postgres:{schema}.checkpoints");
        let place = place.as_str();
        let mut client = connect(&self.url, place)?;
        let fence_share = client.prepare(&fence_share_sql(schema)).map_err(pg_error(place))?;
        let (heads, chunks_table) = (table_of(schema, "checkpoint_heads"), table_of(schema, "checkpoints"));
        let chunk_count = snapshot.len().div_ceil(self.chunk_bytes).max(1);
        let chunks = i32::try_from(chunk_count).expect("a snapshot below 2^31 chunks: RECORD_BYTES_MAX-sized state");
        let insert_chunk = format!("INSERT INTO {chunks_table} (seq, chunk, bytes) VALUES ($1, $2, $3)");
        for i in 0..chunk_count {
            let chunk = &snapshot[i * self.chunk_bytes..((i + 1) * self.chunk_bytes).min(snapshot.len())];
            let mut tx = client.transaction().map_err(pg_error(place))?;
            check_fence(&mut tx, &fence_share, self.token, place)?;
            if i == 0 {
                let live = format!("SELECT 1 FROM {heads} WHERE seq = $1 AND NOT set_aside");
                if tx.query_opt(&live, &[&sql_seq(seq)]).map_err(pg_error(place))?.is_some() {
                    // Already durable (a seq names one state): nothing to write.
                    return Ok(());
                }
                // Leftovers at this seq: an unfinished write, or one set aside.
                tx.execute(&format!("DELETE FROM {heads} WHERE seq = $1"), &[&sql_seq(seq)])
                    .and_then(|_| tx.execute(&format!("DELETE FROM {chunks_table} WHERE seq = $1"), &[&sql_seq(seq)]))
                    .map_err(pg_error(place))?;
            }
            tx.execute(&insert_chunk, &[&sql_seq(seq), &(i as i32), &chunk]).map_err(pg_error(place))?;
            if i + 1 == chunk_count {
                let head = format!("INSERT INTO {heads} (seq, chunks, len, crc) VALUES ($1, $2, $3, $4)");
                let (len, crc) = (snapshot.len() as i64, crc32c::crc32c(&snapshot) as i32);
                tx.execute(&head, &[&sql_seq(seq), &chunks, &len, &crc]).map_err(pg_error(place))?;
                tx.batch_execute(&drop_covered_sql(schema)).map_err(pg_error(place))?;
            }
            tx.commit().map_err(pg_error(place))?;
            self.counters.commits.fetch_add(1, Relaxed);
        }
        self.counters.bytes.fetch_add(snapshot.len() as u64, Relaxed);
        // The log the kept checkpoints cover goes once they are durable, a
        // partition at a time, each in a transaction of its own that does not
        // queue on the table's lock; what cannot go now goes at a later checkpoint.
        let _ = drop_covered_partitions(&mut client, place, schema, self.width);
        Ok(())
    }
}

/// After a checkpoint: drops every partition of the log whose batches the
/// oldest kept checkpoint covers (recovery can start from any kept one),
/// each in its own transaction with a short lock timeout. Answers how many went.
fn drop_covered_partitions(client: &mut Client, place: &str, schema: &str, width: u64) -> Result<u64, StoreError> {
    let oldest_kept = format!("SELECT min(seq) FROM ({}) k", kept_sql(schema));
    let oldest: Option<i64> =
        client.query_one(&oldest_kept, &[]).and_then(|r| r.try_get(0)).map_err(pg_error(place))?;
    let Some(oldest) = oldest else { return Ok(0) };
    let partitions = format!(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '{}'::regclass",
        table_of(schema, "batches")
    );
    let mut dropped = 0;
    for row in client.query(&partitions, &[]).map_err(pg_error(place))? {
        let name: String = row.try_get(0).map_err(pg_error(place))?;
        let Some(k) = name.strip_prefix("batches_").and_then(|k| k.parse::<u64>().ok()) else { continue };
        // Its last seq, (k+1)·W − 1, is covered.
        if (k + 1) * width <= oldest as u64 + 1 {
            let sql = format!("SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'; DROP TABLE {};", table_of(schema, &name));
            let mut tx = client.transaction().map_err(pg_error(place))?;
            tx.batch_execute(&sql).map_err(pg_error(place))?;
            tx.commit().map_err(pg_error(place))?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Joins the chunks of checkpoint `seq` (read in `tx` from `chunks_table`)
/// into one snapshot, checking that they are all there, in order, and match
/// the head. `path` names the checkpoint in messages.
fn read_chunks(
    tx: &mut Transaction<'_>,
    chunks_table: &str,
    seq: u64,
    head: &Row,
    path: PathBuf,
) -> Result<Checkpoint, StoreError> {
    let place = path.display().to_string();
    let corrupt = |offset: u64, reason: String| StoreError::Corrupt { file: path.clone(), offset, reason };
    let chunks: i32 = head.try_get(0).map_err(pg_error(&place))?;
    let len: i64 = head.try_get(1).map_err(pg_error(&place))?;
    let crc: i32 = head.try_get(2).map_err(pg_error(&place))?;
    let len = u64::try_from(len).map_err(|_| corrupt(0, format!("checkpoint length {len} is negative")))?;
    if chunks < 1 || len > chunks as u64 * CHECKPOINT_CHUNK_BYTES_MAX as u64 {
        return Err(corrupt(0, format!("checkpoint head says {len} bytes in {chunks} chunks")));
    }
    let sql = format!("SELECT chunk, bytes FROM {chunks_table} WHERE seq = $1 ORDER BY chunk");
    let mut rows = tx.query_raw(sql.as_str(), [sql_seq(seq)]).map_err(pg_error(&place))?;
    let mut snapshot = Vec::with_capacity(len as usize);
    let mut expected = 0i32;
    while let Some(row) = rows.next().map_err(pg_error(&place))? {
        let chunk: i32 = row.try_get(0).map_err(pg_error(&place))?;
        let bytes: &[u8] = row.try_get(1).map_err(pg_error(&place))?;
        if chunk != expected {
            return Err(corrupt(snapshot.len() as u64, format!("checkpoint chunk {expected} is missing")));
        }
        snapshot.extend_from_slice(bytes);
        expected += 1;
    }
    if expected != chunks {
        return Err(corrupt(
            snapshot.len() as u64,
            format!("checkpoint has {expected} chunks, its head says {chunks}"),
        ));
    }
    if snapshot.len() as u64 != len {
        return Err(corrupt(0, format!("checkpoint length {} does not match its head's {len}", snapshot.len())));
    }
    if crc32c::crc32c(&snapshot) != crc as u32 {
        return Err(corrupt(0, "checkpoint checksum mismatch".into()));
    }
    Ok(Checkpoint { seq, snapshot })
}

impl Store for PostgresStore {
    fn checkpoints(&mut self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let sql = format!("SELECT seq FROM {} WHERE NOT set_aside ORDER BY seq DESC", self.table("checkpoint_heads"));
        let place = self.place("checkpoint_heads");
        let rows = self.client.query(&sql, &[]).map_err(pg_error(&place))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(pg_error(&place))?;
            let seq = seq as u64;
            out.push(StoredCheckpoint { seq, file: self.checkpoint_path(seq) });
        }
        Ok(out)
    }

    fn read_checkpoint(&mut self, seq: u64) -> Result<Checkpoint, StoreError> {
        let path = self.checkpoint_path(seq);
        let place = path.display().to_string();
        let head_sql =
            format!("SELECT chunks, len, crc FROM {} WHERE seq = $1 AND NOT set_aside", self.table("checkpoint_heads"));
        let chunks_table = self.table("checkpoints");
        // One snapshot of the database for the head and its chunks.
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(pg_error(&place))?;
        let Some(head) = tx.query_opt(&head_sql, &[&sql_seq(seq)]).map_err(pg_error(&place))? else {
            return Err(not_found(path, format!("no checkpoint {seq}")));
        };
        let checkpoint = read_chunks(&mut tx, &chunks_table, seq, &head, path)?;
        tx.commit().map_err(pg_error(&place))?;
        Ok(checkpoint)
    }

    fn set_aside_checkpoint(&mut self, seq: u64) -> Result<PathBuf, StoreError> {
        self.refuse_if_reader()?;
        // A checkpoint in flight may be deleting old ones: let it finish.
        self.finish_checkpoint()?;
        let path = self.checkpoint_path(seq);
        let place = path.display().to_string();
        let sql =
            format!("UPDATE {} SET set_aside = true WHERE seq = $1 AND NOT set_aside", self.table("checkpoint_heads"));
        let mut tx = self.client.transaction().map_err(pg_error(&place))?;
        check_fence(&mut tx, &self.statements.fence_share, self.token, &place)?;
        if tx.execute(&sql, &[&sql_seq(seq)]).map_err(pg_error(&place))? == 0 {
            return Err(not_found(path, format!("no checkpoint {seq} to set aside")));
        }
        tx.commit().map_err(pg_error(&place))?;
        self.stats.fsyncs += 1;
        Ok(PathBuf::from(format!("{}.set_aside", path.display())))
    }

    fn replay(&mut self, after_seq: u64, visit: Visitor<'_>) -> Result<ReplayReport, StoreError> {
        let place = self.place("batches");
        let sql = format!("SELECT seq, bytes, crc FROM {} WHERE seq > $1 ORDER BY seq", self.table("batches"));
        let mut report = ReplayReport { last_seq: after_seq, ..ReplayReport::default() };
        let mut rows = self.client.query_raw(sql.as_str(), [sql_seq(after_seq)]).map_err(pg_error(&place))?;
        while let Some(row) = rows.next().map_err(pg_error(&place))? {
            let seq: i64 = row.try_get(0).map_err(pg_error(&place))?;
            let bytes: &[u8] = row.try_get(1).map_err(pg_error(&place))?;
            let crc: i32 = row.try_get(2).map_err(pg_error(&place))?;
            let seq = seq as u64;
            let expected = report.last_seq + 1;
            if seq != expected {
                return Err(StoreError::Gap { file: PathBuf::from(&place), expected, found: seq });
            }
            let actual = frame::checksum(seq, bytes);
            if actual != crc as u32 {
                return Err(StoreError::Corrupt {
                    file: PathBuf::from(format!("{place}/{seq}")),
                    offset: 0,
                    reason: format!(
                        "batch {seq}: checksum mismatch (stored {:08x}, bytes give {actual:08x})",
                        crc as u32
                    ),
                });
            }
            visit(seq, bytes).map_err(|source| StoreError::Visit { seq, source })?;
            report.batches += 1;
            report.bytes += bytes.len() as u64;
            report.last_seq = seq;
        }
        // A transaction commits whole: there is no torn tail to cut.
        self.next_seq = Some(report.last_seq + 1);
        Ok(report)
    }

    fn append(&mut self, seq: u64, batch: &[u8]) -> Result<(), StoreError> {
        self.refuse_if_reader()?;
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        // A background checkpoint that ended is answered now, not a checkpoint later.
        if self.checkpoint_in_flight.as_ref().is_some_and(|w| w.is_finished()) {
            self.finish_checkpoint()?;
        }
        let expected = self.next_seq.ok_or(StoreError::NotReplayed)?;
        if seq != expected {
            return Err(StoreError::OutOfOrder { seq, expected });
        }
        if batch.len() > RECORD_BYTES_MAX {
            return Err(StoreError::TooLarge { bytes: batch.len(), max: RECORD_BYTES_MAX });
        }
        self.poisoned = true; // cleared below once the batch is durable, or surely not written
        match self.commit_batch(seq, batch) {
            Ok(()) => {}
            Err(fenced @ StoreError::Fenced { .. }) => {
                // Rolled back before anything was written: the outcome is known.
                self.poisoned = false;
                return Err(fenced);
            }
            Err(unknown) => return Err(unknown),
        }
        self.stats.log_bytes_written += batch.len() as u64;
        self.stats.fsyncs += 1;
        self.next_seq = Some(seq + 1);
        self.poisoned = false;
        Ok(())
    }

    fn checkpoint(&mut self, seq: u64, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.checkpoint_when(seq, snapshot, Box::new(|| Ok(())))
    }

    /// Written in the background, on a connection of its own, so the engine
    /// does not wait for it (a checkpoint of a million accounts is tens of
    /// megabytes: seconds on PostgreSQL). At most one is in flight; its
    /// failure, or its precondition's, is answered by the next call.
    fn checkpoint_when(&mut self, seq: u64, snapshot: Vec<u8>, ready: CheckpointReady) -> Result<(), StoreError> {
        self.refuse_if_reader()?;
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let next = self.next_seq.ok_or(StoreError::NotReplayed)?;
        assert!(seq < next, "a checkpoint covers only batches already appended");
        self.finish_checkpoint()?;
        // A checkpoint that fails midway leaves no head, so it never counts;
        // the log is untouched until the head commits. No need to poison.
        let job = self.checkpoint_job();
        let writer = std::thread::Builder::new()
            .name("pg-checkpoint".into())
            .spawn(move || job.run(seq, snapshot, ready))
            .map_err(StoreError::io(self.checkpoint_path(seq)))?;
        self.checkpoint_in_flight = Some(writer);
        Ok(())
    }

    fn sync_checkpoint(&mut self) -> Result<(), StoreError> {
        self.finish_checkpoint()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            checkpoint_bytes_written: self.stats.checkpoint_bytes_written
                + self.checkpoint_counters.bytes.load(Relaxed),
            fsyncs: self.stats.fsyncs + self.checkpoint_counters.commits.load(Relaxed),
            ..self.stats
        }
    }
}
