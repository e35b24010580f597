//! The crash test: a real cell in a child process under concurrent transfers,
//! `kill -9`ed at a random moment, then recovered from its files. Every
//! transfer the child acknowledged must be there, with its amount and parties,
//! and the ledger must balance (I1, I2, I4). Twenty rounds on one data dir,
//! so later rounds also recover what earlier recoveries left behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cellpay_cell::recover;
use cellpay_core::{AccountId, CellId, CellState, Limits, ShardMap, TransferId, TransferStatus, SHARDS_DEFAULT};
use cellpay_store::{EmbeddedStore, StoreOptions};
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 20;

struct Ack {
    id: String,
    from: String,
    to: String,
    amount: i64,
}

fn spawn_child(dir: &Path, tag: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["debug", "crash-load", "--cell-dir"])
        .arg(dir)
        .args(["--tag", tag, "--accounts", "64", "--clients", "4", "--max-seconds", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the cellpay binary");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        // Only whole lines count: a line cut by the kill was never fully printed.
        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if line.ends_with('\n') && tx.send(line.trim_end().to_string()).is_err() {
                break;
            }
            line.clear();
        }
    });
    (child, rx)
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut parts = line.strip_prefix("ACK ")?.split(' ');
    Some(Ack {
        id: parts.next()?.to_string(),
        from: parts.next()?.to_string(),
        to: parts.next()?.to_string(),
        amount: parts.next()?.parse().ok()?,
    })
}

fn recover_cell(dir: &Path) -> (CellState, cellpay_cell::RecoveryReport) {
    let mut store = EmbeddedStore::open(dir, StoreOptions::default()).expect("the killed child's lock is gone");
    let map = ShardMap::round_robin(SHARDS_DEFAULT, 1).unwrap();
    recover(&mut store, CellId(0), &map, Limits::default()).expect("recovery after kill -9")
}

#[test]
fn every_acknowledged_transfer_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(std::process::id() as u64);
    let mut acked_total = 0usize;
    let mut torn_tails = 0usize;
    for round in 0..ROUNDS {
        let (mut child, lines) = spawn_child(dir.path(), &format!("r{round}"));
        let ready = lines.recv_timeout(Duration::from_secs(60)).expect("the child starts");
        assert_eq!(ready, "READY");
        // Let it run for a random moment, then kill -9 (SIGKILL) mid-flight.
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        child.kill().expect("kill -9");
        child.wait().unwrap();
        let mut acks = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            acks.extend(parse_ack(&line));
        }

        let (state, report) = recover_cell(dir.path());
        torn_tails += usize::from(report.torn_tail.is_some());
        let ledger = state.ledger(false);
        for ack in &acks {
            let id = TransferId::new(&ack.id).unwrap();
            let from = AccountId::new(&ack.from).unwrap();
            let found = ledger.transfers(&id, Some(&from), &cellpay_core::Authority::Admin);
            let t = found.first().unwrap_or_else(|| panic!("round {round}: acknowledged {} is lost", ack.id));
            assert_eq!((t.from.as_str(), t.to.as_str(), t.amount), (ack.from.as_str(), ack.to.as_str(), ack.amount));
            assert_eq!(t.status, TransferStatus::Settled);
        }
        let audit = ledger.audit(state.cell());
        assert!(audit.findings.is_empty(), "round {round}: {:?}", audit.findings);
        assert_eq!(audit.figures.balance_sum, 0, "round {round}: I1");
        assert_eq!(audit.figures.cell_term(), 0, "round {round}: I1");
        assert_eq!(audit.figures.negative_accounts, 0, "round {round}: I4");
        assert_eq!(audit.figures.accounts, 65);
        acked_total += acks.len();
    }
    eprintln!("{ROUNDS} rounds, {acked_total} acknowledged transfers checked, {torn_tails} torn tails cut");
    assert!(acked_total > ROUNDS * 10, "the child acknowledged too little for the test to mean anything");
}
