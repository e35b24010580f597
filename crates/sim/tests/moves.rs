//! Shard moves in the simulator: with every fault on, seeds that move shards
//! (and undo moves whose coordinator died or whose epoch another map took)
//! keep every invariant; and each wrong way to move a shard is caught.

use cellpay_sim::{run, Mutation, SimConfig};

const STEPS: u64 = 1_500;

#[test]
fn seeds_that_move_shards_keep_every_invariant() {
    let (mut moves, mut undone) = (0, 0);
    for seed in 1..=40 {
        let r = run(SimConfig { seed, steps: STEPS, ..SimConfig::default() }).unwrap_or_else(|f| panic!("{f}"));
        moves += r.moves;
        undone += r.moves_undone;
    }
    assert!(moves >= 20 && undone >= 2, "the seeds moved too little to prove anything: {moves} moves, {undone} undone");
}

#[test]
fn each_wrong_way_to_move_a_shard_is_caught() {
    for mutation in [Mutation::LiftFreezeEarly, Mutation::RerouteByOldSeq, Mutation::SkipMoveRecord] {
        let mut caught = Vec::new();
        for seed in 1..=60 {
            match run(SimConfig { seed, steps: STEPS, mutation: Some(mutation), ..SimConfig::default() }) {
                // A run where the mutation struck and nothing noticed proves the checks blind.
                Ok(r) => {
                    assert!(r.mutations == 0, "{mutation:?} struck in seed {seed} and no check caught it: {r:?}");
                }
                Err(f) => caught.push(f.to_string()),
            }
        }
        assert!(!caught.is_empty(), "{mutation:?} never struck in 60 seeds");
        eprintln!("{mutation:?} caught in {} of 60 seeds, first: {}", caught.len(), caught[0]);
    }
}
