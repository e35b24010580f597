//! What holds for any [`Store`], run against both backends: the embedded store
//! in a temporary directory and PostgreSQL in a fresh schema of database
//! `test` (dropped at the end, also when a test fails). Each behaviour is a
//! function over a [`Backend`]; the macro at the bottom makes one `#[test]`
//! per behaviour and backend. The PostgreSQL-only tests follow at the end.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use cellpay_store::{
    EmbeddedStore, PostgresOptions, PostgresStore, ReplayReport, Store, StoreError, StoreOptions, CHECKPOINTS_KEPT,
    RECORD_BYTES_MAX,
};

const POSTGRES_URL: &str = "postgres://root@127.0.0.1:5432/test";

/// Where a behaviour runs: how to open the cell's store, and how to damage
/// its stored checkpoints behind the store's back.
trait Backend {
    type S: Store;
    fn open(&self) -> Self::S;
    /// Changes one byte of checkpoint `seq`'s snapshot.
    fn damage_checkpoint(&self, seq: u64);
}

struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }
}

impl Backend for Embedded {
    type S = EmbeddedStore;
    fn open(&self) -> EmbeddedStore {
        EmbeddedStore::open(self.dir.path(), StoreOptions { segment_bytes_max: 4096 }).unwrap()
    }
    fn damage_checkpoint(&self, seq: u64) {
        let path = self.dir.path().join("checkpoint").join(format!("{seq:020}.ckpt"));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
}

/// A schema of its own in database `test`, dropped when the test ends.
struct Postgres {
    schema: String,
    options: PostgresOptions,
}

impl Postgres {
    fn new() -> Self {
        // Small chunks and partitions, so that checkpoints in these tests span
        // several rows and the log several partitions.
        Self::with_options(PostgresOptions { checkpoint_chunk_bytes: 7, batches_per_partition: 4 })
    }

    fn with_options(options: PostgresOptions) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let schema = format!("store_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Relaxed));
        let fresh = Self { schema, options };
        fresh.sql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", fresh.schema));
        fresh
    }

    /// Runs `sql` on a connection of its own, as another client would.
    fn sql(&self, sql: &str) -> u64 {
        let mut client = postgres::Client::connect(POSTGRES_URL, postgres::NoTls).unwrap();
        client.execute(sql, &[]).unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(POSTGRES_URL, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

impl Backend for Postgres {
    type S = PostgresStore;
    fn open(&self) -> PostgresStore {
        // Named after the schema, so that a test can cut this store's connections.
        let url = format!("{POSTGRES_URL}?application_name={}", self.schema);
        PostgresStore::open(&url, &self.schema, self.options).unwrap()
    }
    fn damage_checkpoint(&self, seq: u64) {
        let n = self.sql(&format!(
            "UPDATE {}.checkpoints SET bytes = set_byte(bytes, 0, get_byte(bytes, 0) # 64) WHERE seq = {seq} AND chunk = 0",
            self.schema
        ));
        assert_eq!(n, 1, "checkpoint {seq} has a first chunk");
    }
}

fn payload(seq: u64) -> Vec<u8> {
    let len = 20 + (seq * 37 % 300) as usize;
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

/// A recovered store, the batches it replayed, and its report.
struct Recovered<S> {
    store: S,
    seen: Vec<(u64, Vec<u8>)>,
    report: ReplayReport,
}

impl<S> Recovered<S> {
    fn seqs(&self) -> Vec<u64> {
        self.seen.iter().map(|(s, _)| *s).collect()
    }
}

/// What the engine does on start: load the newest checkpoint, replay after it.
fn recover<B: Backend>(backend: &B) -> Result<Recovered<B::S>, StoreError> {
    let mut store = backend.open();
    let after = store.load_checkpoint()?.map_or(0, |c| c.seq);
    replay_from(store, after)
}

fn replay_from<S: Store>(mut store: S, after: u64) -> Result<Recovered<S>, StoreError> {
    let mut seen = Vec::new();
    let report = store.replay(after, &mut |seq, bytes| {
        seen.push((seq, bytes.to_vec()));
        Ok(())
    })?;
    Ok(Recovered { store, seen, report })
}

/// Appends batches `from..=to` to a recovered store.
fn append_all<S: Store>(store: &mut S, from: u64, to: u64) {
    for seq in from..=to {
        store.append(seq, &payload(seq)).unwrap();
    }
}

fn write_batches<B: Backend>(backend: &B, n: u64) {
    let mut r = recover(backend).unwrap();
    let start = r.report.last_seq + 1;
    append_all(&mut r.store, start, start + n - 1);
}

fn checkpoint_seqs<S: Store>(store: &mut S) -> Vec<u64> {
    store.checkpoints().unwrap().iter().map(|c| c.seq).collect()
}

fn batches_survive_reopen_in_order<B: Backend>(backend: &B) {
    write_batches(backend, 30);
    write_batches(backend, 20);
    let r = recover(backend).unwrap();
    assert_eq!(r.seqs(), (1..=50).collect::<Vec<_>>());
    for (seq, bytes) in &r.seen {
        assert_eq!(bytes, &payload(*seq));
    }
    assert_eq!(r.report.last_seq, 50);
    assert_eq!(r.report.batches, 50);
    assert!(r.report.torn_tail.is_none());
}

fn appends_must_follow_replay_and_be_in_order<B: Backend>(backend: &B) {
    let mut store = backend.open();
    assert!(matches!(store.append(1, b"x"), Err(StoreError::NotReplayed)));
    store.replay(0, &mut |_, _| Ok(())).unwrap();
    assert!(matches!(store.append(2, b"x"), Err(StoreError::OutOfOrder { seq: 2, expected: 1 })));
    store.append(1, b"x").unwrap();
    assert!(matches!(store.append(1, b"x"), Err(StoreError::OutOfOrder { seq: 1, expected: 2 })));
    store.append(2, b"y").unwrap();
    let too_large = vec![0u8; RECORD_BYTES_MAX + 1];
    assert!(matches!(store.append(3, &too_large), Err(StoreError::TooLarge { .. })));
    let stats = store.stats();
    assert!(stats.log_bytes_written >= 2 && stats.fsyncs >= 2, "{stats:?}");
    drop(store);
    let r = recover(backend).unwrap();
    assert_eq!(r.seen, vec![(1, b"x".to_vec()), (2, b"y".to_vec())]);
}

fn replay_after_a_checkpoint_starts_after_it<B: Backend>(backend: &B) {
    write_batches(backend, 100);
    {
        let mut r = recover(backend).unwrap();
        r.store.checkpoint(100, b"state after 100".to_vec()).unwrap();
        append_all(&mut r.store, 101, 120);
        r.store.checkpoint(120, b"state after 120".to_vec()).unwrap();
        append_all(&mut r.store, 121, 130);
        r.store.sync_checkpoint().unwrap();
    }
    let mut r = recover(backend).unwrap();
    assert_eq!(r.seqs(), (121..=130).collect::<Vec<_>>());
    assert_eq!(r.report.last_seq, 130);
    assert_eq!(r.store.load_checkpoint().unwrap().unwrap().snapshot, b"state after 120");
    assert_eq!(checkpoint_seqs(&mut r.store), [120, 100], "newest first");
    // The log since the older kept checkpoint stays, so recovery can start there.
    let store = r.store;
    let from_older = replay_from(store, 100).unwrap();
    assert_eq!(from_older.seqs(), (101..=130).collect::<Vec<_>>());
}

fn only_the_newest_checkpoints_are_kept<B: Backend>(backend: &B) {
    write_batches(backend, 10);
    let mut r = recover(backend).unwrap();
    for seq in 1..=4 {
        r.store.checkpoint(seq * 2, format!("state after {}", seq * 2).into_bytes()).unwrap();
        r.store.sync_checkpoint().unwrap();
    }
    let kept = checkpoint_seqs(&mut r.store);
    assert_eq!(kept.len(), CHECKPOINTS_KEPT);
    assert_eq!(kept, [8, 6][..CHECKPOINTS_KEPT]);
    assert!(r.store.stats().checkpoint_bytes_written > 0);
}

fn a_checkpoint_with_no_later_batches_recovers_to_its_seq<B: Backend>(backend: &B) {
    write_batches(backend, 10);
    {
        let mut r = recover(backend).unwrap();
        r.store.checkpoint(10, b"ten".to_vec()).unwrap();
        r.store.sync_checkpoint().unwrap();
        r.store.sync_checkpoint().unwrap();
    }
    let mut r = recover(backend).unwrap();
    assert!(r.seen.is_empty());
    assert_eq!(r.report.last_seq, 10);
    r.store.append(11, b"eleven").unwrap();
    drop(r);
    assert_eq!(recover(backend).unwrap().seqs(), [11]);
}

fn a_checkpoint_whose_precondition_fails_is_not_written_and_the_next_call_says_so<B: Backend>(backend: &B) {
    write_batches(backend, 10);
    let mut r = recover(backend).unwrap();
    r.store.checkpoint(10, b"ten".to_vec()).unwrap();
    r.store.sync_checkpoint().unwrap();
    r.store.append(11, &payload(11)).unwrap();
    let failed = r.store.checkpoint_when(11, b"eleven".to_vec(), Box::new(|| Err("the tier failed".into())));
    // A store answers the failure from this call or, if it writes in the background, the next.
    let err = failed.and_then(|()| r.store.sync_checkpoint()).unwrap_err();
    assert!(matches!(&err, StoreError::CheckpointNotReady { seq: 11, reason } if reason == "the tier failed"), "{err}");
    r.store.sync_checkpoint().unwrap();
    assert_eq!(checkpoint_seqs(&mut r.store), [10], "nothing was written");
    drop(r);
    let r = recover(backend).unwrap();
    assert_eq!(r.seqs(), [11], "the log after checkpoint 10 is kept");
}

fn a_damaged_newest_checkpoint_is_corrupt_and_set_aside_falls_back<B: Backend>(backend: &B) {
    write_batches(backend, 20);
    {
        let mut r = recover(backend).unwrap();
        r.store.checkpoint(10, b"state after 10".to_vec()).unwrap();
        r.store.sync_checkpoint().unwrap();
        r.store.checkpoint(20, b"state after 20".to_vec()).unwrap();
        r.store.sync_checkpoint().unwrap();
        append_all(&mut r.store, 21, 25);
    }
    backend.damage_checkpoint(20);
    let err = recover(backend).err().expect("a damaged newest checkpoint stops recovery");
    let mut store = backend.open();
    let newest = store.checkpoints().unwrap()[0].clone();
    assert_eq!(newest.seq, 20);
    match &err {
        StoreError::Corrupt { file, .. } => assert_eq!(file, &newest.file, "{err}"),
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(err.to_string().contains(&newest.file.display().to_string()), "{err}");
    let aside = store.set_aside_checkpoint(20).unwrap();
    assert!(aside.display().to_string().contains("20"), "{}", aside.display());
    assert_eq!(checkpoint_seqs(&mut store), [10]);
    drop(store);
    let mut r = recover(backend).unwrap();
    assert_eq!(r.seqs(), (11..=25).collect::<Vec<_>>());
    r.store.append(26, b"after the fall back").unwrap();
}

macro_rules! conformance {
    ($($behaviour:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $behaviour() { super::$behaviour(&super::Embedded::new()); } )*
        }
        mod postgresql {
            $( #[test] fn $behaviour() { super::$behaviour(&super::Postgres::new()); } )*
        }
    };
}

conformance!(
    batches_survive_reopen_in_order,
    appends_must_follow_replay_and_be_in_order,
    replay_after_a_checkpoint_starts_after_it,
    only_the_newest_checkpoints_are_kept,
    a_checkpoint_with_no_later_batches_recovers_to_its_seq,
    a_checkpoint_whose_precondition_fails_is_not_written_and_the_next_call_says_so,
    a_damaged_newest_checkpoint_is_corrupt_and_set_aside_falls_back,
);

// A second writer: the embedded store refuses to open; PostgreSQL lets it open
// and fences out the first.

#[test]
fn embedded_a_second_writer_is_locked_out() {
    let backend = Embedded::new();
    write_batches(&backend, 3);
    let _first = recover(&backend).unwrap();
    let second = EmbeddedStore::open(backend.dir.path(), StoreOptions::default());
    assert!(matches!(second, Err(StoreError::Locked { .. })));
}

#[test]
fn postgresql_a_second_writer_fences_out_the_first() {
    let backend = Postgres::new();
    write_batches(&backend, 3);
    let mut first = recover(&backend).unwrap();
    first.store.append(4, &payload(4)).unwrap();
    let mut second = recover(&backend).unwrap();
    assert_eq!(second.report.last_seq, 4);
    assert!(second.store.token() > first.store.token());
    let err = first.store.append(5, b"from the old writer").unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { mine, current } if mine == first.store.token() && current == second.store.token()),
        "{err}"
    );
    assert!(err.to_string().contains("fenced"), "{err}");
    // It stays fenced, for checkpoints too.
    assert!(matches!(first.store.append(5, b"again"), Err(StoreError::Fenced { .. })));
    // (Written in the background: its failure is answered by the next call.)
    let checkpoint = first.store.checkpoint(4, b"old".to_vec()).and_then(|()| first.store.sync_checkpoint());
    assert!(matches!(checkpoint, Err(StoreError::Fenced { .. })), "{checkpoint:?}");
    assert!(second.store.checkpoints().unwrap().is_empty(), "the fenced checkpoint wrote nothing");
    // The first committed nothing: the second continues from 4.
    second.store.append(5, b"from the new writer").unwrap();
    drop((first, second));
    let r = recover(&backend).unwrap();
    assert_eq!(r.seen.last().unwrap(), &(5, b"from the new writer".to_vec()));
    assert_eq!(r.seqs(), (1..=5).collect::<Vec<_>>());
}

// PostgreSQL only: damage done in SQL behind the store's back.

#[test]
fn postgresql_a_batch_changed_in_sql_is_corrupt_naming_its_seq() {
    let backend = Postgres::new();
    write_batches(&backend, 10);
    let n = backend.sql(&format!(
        "UPDATE {}.batches SET bytes = set_byte(bytes, 3, get_byte(bytes, 3) # 1) WHERE seq = 7",
        backend.schema
    ));
    assert_eq!(n, 1);
    let err = recover(&backend).err().expect("replay must stop");
    match &err {
        StoreError::Corrupt { file, reason, .. } => {
            assert_eq!(file, Path::new(&format!("postgres:{}.batches/7", backend.schema)));
            assert!(reason.contains("batch 7"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn postgresql_a_batch_moved_to_another_seq_is_corrupt() {
    let backend = Postgres::new();
    write_batches(&backend, 10);
    backend.sql(&format!("DELETE FROM {}.batches WHERE seq = 7", backend.schema));
    backend.sql(&format!("UPDATE {}.batches SET seq = 7 WHERE seq = 8", backend.schema));
    assert!(matches!(recover(&backend), Err(StoreError::Corrupt { .. })), "the checksum covers the seq");
}

#[test]
fn postgresql_a_missing_batch_in_the_middle_is_a_gap() {
    let backend = Postgres::new();
    write_batches(&backend, 10);
    assert_eq!(backend.sql(&format!("DELETE FROM {}.batches WHERE seq = 5", backend.schema)), 1);
    let err = recover(&backend).err().expect("replay must stop");
    assert!(matches!(err, StoreError::Gap { expected: 5, found: 6, .. }), "{err}");
}

#[test]
fn postgresql_a_missing_checkpoint_chunk_is_corrupt() {
    let backend = Postgres::new();
    write_batches(&backend, 3);
    {
        let mut r = recover(&backend).unwrap();
        r.store.checkpoint(3, b"a snapshot of several chunks".to_vec()).unwrap();
        r.store.sync_checkpoint().unwrap();
        assert_eq!(r.store.read_checkpoint(3).unwrap().snapshot, b"a snapshot of several chunks");
    }
    assert_eq!(backend.sql(&format!("DELETE FROM {}.checkpoints WHERE seq = 3 AND chunk = 1", backend.schema)), 1);
    let err = recover(&backend).err().expect("recovery must stop");
    assert!(matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("chunk 1")), "{err}");
}

#[test]
fn postgresql_an_unfinished_checkpoint_never_counts() {
    let backend = Postgres::new();
    write_batches(&backend, 3);
    // Chunks without a head: a write that stopped before its last chunk.
    backend.sql(&format!("INSERT INTO {}.checkpoints VALUES (3, 0, 'partial')", backend.schema));
    let mut r = recover(&backend).unwrap();
    assert_eq!(r.seqs(), [1, 2, 3]);
    r.store.checkpoint(3, b"whole".to_vec()).unwrap();
    r.store.sync_checkpoint().unwrap();
    assert_eq!(r.store.load_checkpoint().unwrap().unwrap().snapshot, b"whole");
}

#[test]
fn postgresql_a_lost_connection_poisons_the_store_and_a_reopen_reads_what_committed() {
    let backend = Postgres::new();
    write_batches(&backend, 3);
    let mut r = recover(&backend).unwrap();
    r.store.append(4, &payload(4)).unwrap();
    let cut = backend.sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{}'",
        backend.schema
    ));
    assert_eq!(cut, 1, "one connection of this store to cut");
    let err = r.store.append(5, &payload(5)).unwrap_err();
    assert!(matches!(err, StoreError::Postgres { .. }), "{err}");
    assert!(matches!(r.store.append(5, &payload(5)), Err(StoreError::Poisoned)));
    assert!(matches!(r.store.checkpoint(4, b"four".to_vec()), Err(StoreError::Poisoned)));
    drop(r);
    let mut r = recover(&backend).unwrap();
    assert_eq!(r.seqs(), [1, 2, 3, 4]);
    r.store.append(5, &payload(5)).unwrap();
}

/// The partitions of the log, by their first seq.
fn partitions(backend: &Postgres) -> Vec<u64> {
    let mut client = postgres::Client::connect(POSTGRES_URL, postgres::NoTls).unwrap();
    let sql = format!(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = '{}.batches'::regclass",
        backend.schema
    );
    let mut firsts: Vec<u64> = client
        .query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0).strip_prefix("batches_").unwrap().parse::<u64>().unwrap() * 4)
        .collect();
    firsts.sort();
    firsts
}

#[test]
fn postgresql_old_log_goes_a_whole_partition_at_a_time() {
    let backend = Postgres::new();
    write_batches(&backend, 30);
    // Seqs 1..=30 in partitions of 4: [0,4) [4,8) … [28,32), and [32,36)
    // made ahead of time (from halfway through the one in use).
    assert_eq!(partitions(&backend), (0..9).map(|k| k * 4).collect::<Vec<_>>());
    let mut r = recover(&backend).unwrap();
    r.store.checkpoint(10, b"ten".to_vec()).unwrap();
    r.store.sync_checkpoint().unwrap();
    // The oldest kept checkpoint (10) covers [0,4) and [4,8), not [8,12).
    assert_eq!(partitions(&backend), [8, 12, 16, 20, 24, 28, 32]);
    r.store.checkpoint(21, b"twenty-one".to_vec()).unwrap();
    r.store.sync_checkpoint().unwrap();
    assert_eq!(partitions(&backend), [8, 12, 16, 20, 24, 28, 32], "checkpoint 10 is still kept");
    r.store.checkpoint(25, b"twenty-five".to_vec()).unwrap();
    r.store.sync_checkpoint().unwrap();
    // Kept: 25 and 21; 21 covers [8,12) [12,16) [16,20) but not [20,24).
    assert_eq!(partitions(&backend), [20, 24, 28, 32]);
    append_all(&mut r.store, 31, 33);
    drop(r);
    // Recovery from either kept checkpoint still finds every batch after it.
    let r = recover(&backend).unwrap();
    assert_eq!(r.seqs(), (26..=33).collect::<Vec<_>>());
    let from_older = replay_from(r.store, 21).unwrap();
    assert_eq!(from_older.seqs(), (22..=33).collect::<Vec<_>>());
    assert_eq!(partitions(&backend), [20, 24, 28, 32]);
    // No row was deleted from the partition still in use (no dead rows for
    // VACUUM): 20 and 21, which checkpoint 21 covers, stay until it goes.
    let covered = backend.sql(&format!("SELECT seq FROM {}.batches WHERE seq <= 21", backend.schema));
    assert_eq!(covered, 2, "no DELETE ran on the log");
}

/// A long read of the log (an open transaction that read it: a report, a
/// dump) does not stop the writer when it needs a new partition: attaching
/// one takes a lock that reads and inserts do not conflict with.
#[test]
fn postgresql_a_long_read_of_the_log_does_not_block_the_writer_at_a_partition_boundary() {
    let backend = Postgres::new();
    write_batches(&backend, 3);
    let mut reader = postgres::Client::connect(POSTGRES_URL, postgres::NoTls).unwrap();
    let mut long_read = reader.transaction().unwrap();
    let n: i64 = long_read.query_one(&format!("SELECT count(*) FROM {}.batches", backend.schema), &[]).unwrap().get(0);
    assert_eq!(n, 3);
    let mut r = recover(&backend).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        // Seqs 4..=20 cross four partition boundaries (width 4).
        append_all(&mut r.store, 4, 20);
        tx.send(()).unwrap();
        r
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(20));
    long_read.rollback().unwrap();
    assert!(done.is_ok(), "the writer waited on the reader's lock");
    drop(writer.join().unwrap());
    assert_eq!(recover(&backend).unwrap().seqs(), (1..=20).collect::<Vec<_>>());
}

#[test]
fn postgresql_a_reader_reads_bounded_stretches_and_takes_nothing_over() {
    let backend = Postgres::new();
    write_batches(&backend, 10);
    let mut writer = recover(&backend).unwrap().store;
    let mut reader = PostgresStore::open_reader(POSTGRES_URL, &backend.schema).unwrap();
    let rows = reader.read_after(3, 4).unwrap();
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
    assert_eq!(rows[0].bytes, payload(4));
    assert!(rows[0].committed_at_s > 1.7e9, "Unix seconds on the database's clock");
    assert!(reader.read_after(10, 4).unwrap().is_empty());
    assert!(reader.append(11, &payload(11)).is_err(), "a reader writes nothing");
    assert!(reader.checkpoint(10, b"no".to_vec()).is_err());
    // The writer still holds the cell: opening a reader took nothing over.
    append_all(&mut writer, 11, 12);
    assert_eq!(reader.read_after(10, 100).unwrap().len(), 2);
    // A hole in the log is a gap, not a shorter answer.
    backend.sql(&format!("DELETE FROM {}.batches WHERE seq = 6", backend.schema));
    assert!(matches!(reader.read_after(3, 10), Err(StoreError::Gap { expected: 6, found: 7, .. })));
}

#[test]
fn postgresql_a_schema_whose_log_is_not_partitioned_is_a_clear_error() {
    let backend = Postgres::new();
    backend.sql(&format!("CREATE SCHEMA {}", backend.schema));
    backend.sql(&format!(
        "CREATE TABLE {}.batches (seq bigint PRIMARY KEY, bytes bytea NOT NULL, crc integer NOT NULL)",
        backend.schema
    ));
    let err = PostgresStore::open(POSTGRES_URL, &backend.schema, PostgresOptions::default()).err().unwrap();
    assert!(err.to_string().contains("not partitioned"), "{err}");
}

#[test]
fn postgresql_rejects_a_schema_name_that_is_not_a_plain_identifier() {
    for name in ["", "Cell", "1cell", "cell; DROP TABLE x", "cell\"", &"c".repeat(64)] {
        let err = PostgresStore::open(POSTGRES_URL, name, PostgresOptions::default()).err();
        assert!(matches!(err, Some(StoreError::SchemaName { .. })), "{name:?}: {err:?}");
    }
}
