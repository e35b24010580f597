//! The simulator in the suite: 1,000 seeds with every fault on, derived from
//! the commit (so they change from commit to commit, and any failure names
//! the seed and the command that replays it exactly).

use cellpay_sim::{run, SimConfig, SimReport};

/// Seeds per CI run, split over [`SHARDS`] tests so both cores work.
const SEEDS: u64 = 1_000;
const SHARDS: u64 = 8;
const STEPS: u64 = 1_000;

/// The first seed: `CELLPAY_SIM_SEED_BASE` if set, else from the commit checked out.
fn seed_base() -> u64 {
    if let Some(base) = std::env::var("CELLPAY_SIM_SEED_BASE").ok().and_then(|s| s.parse().ok()) {
        return base;
    }
    let head = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().ok();
    let hex = head.and_then(|o| String::from_utf8(o.stdout).ok()).unwrap_or_default();
    u64::from_str_radix(hex.get(..15).unwrap_or("1"), 16).unwrap_or(1)
}

fn shard(k: u64) {
    let base = seed_base();
    let per = SEEDS / SHARDS;
    let mut failures = Vec::new();
    let mut acked = 0;
    for seed in base + k * per..base + (k + 1) * per {
        match run(SimConfig { seed, steps: STEPS, ..SimConfig::default() }) {
            Ok(r) => acked += r.payments_acked,
            Err(f) => failures.push(f.to_string()),
        }
    }
    assert!(failures.is_empty(), "{} of {per} seeds failed:\n{}", failures.len(), failures.join("\n"));
    assert!(acked > per * 10, "the seeds paid too little to prove anything: {acked} payments");
}

#[test]
fn seeds_0() {
    shard(0)
}
#[test]
fn seeds_1() {
    shard(1)
}
#[test]
fn seeds_2() {
    shard(2)
}
#[test]
fn seeds_3() {
    shard(3)
}
#[test]
fn seeds_4() {
    shard(4)
}
#[test]
fn seeds_5() {
    shard(5)
}
#[test]
fn seeds_6() {
    shard(6)
}
#[test]
fn seeds_7() {
    shard(7)
}

#[test]
fn the_same_seed_replays_bit_for_bit_and_every_fault_strikes() {
    let config = SimConfig { seed: 7, steps: 1_500, ..SimConfig::default() };
    let first = run(config).unwrap_or_else(|f| panic!("{f}"));
    let second = run(config).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(first, second);
    // Over a few seeds every kind of fault happened, or the run proves less than it says.
    let mut total = SimReport::default();
    for seed in 1..=10 {
        let r = run(SimConfig { seed, steps: 1_500, ..SimConfig::default() }).unwrap_or_else(|f| panic!("{f}"));
        total.crashes += r.crashes;
        total.fsync_errors += r.fsync_errors;
        total.torn_tails += r.torn_tails;
        total.fall_backs += r.fall_backs;
        total.refused_starts += r.refused_starts;
        total.partitions += r.partitions;
        total.lost_requests += r.lost_requests;
        total.lost_replies += r.lost_replies;
        total.duplicates += r.duplicates;
        total.retries += r.retries;
        total.late_deliveries += r.late_deliveries;
        total.shadow_payments += r.shadow_payments;
        total.misrouted += r.misrouted;
        total.outbox_full += r.outbox_full;
        total.map_changes += r.map_changes;
        total.misdelivered += r.misdelivered;
        total.behind_refusals += r.behind_refusals;
    }
    let kinds = [
        total.crashes,
        total.fsync_errors,
        total.torn_tails,
        total.fall_backs,
        total.refused_starts,
        total.partitions,
        total.lost_requests,
        total.lost_replies,
        total.duplicates,
        total.retries,
        total.late_deliveries,
        total.shadow_payments,
        total.misrouted,
        total.outbox_full,
        total.map_changes,
        total.misdelivered,
        total.behind_refusals,
    ];
    assert!(kinds.iter().all(|k| *k > 0), "{total:?}");
}
