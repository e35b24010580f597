//! A property test: whatever the runs written, merged and reopened, every key
//! answers exactly what a map of "highest seq per key" answers.

mod common;

use std::collections::BTreeMap;

use cellpay_tier::{Tier, TierOptions};
use common::{entry, key, value};
use proptest::prelude::*;

const KEYS: u64 = 64;

#[derive(Debug, Clone)]
enum Op {
    /// A run of (record, seq) pairs; a record may repeat.
    Write(Vec<(u64, u64)>),
    Compact,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..KEYS, 0..1000u64), 0..40).prop_map(Op::Write),
        2 => Just(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_key_answers_its_highest_seq(ops in prop::collection::vec(op(), 1..30), fan_in in 2usize..=4) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = TierOptions { bytes_max: u64::MAX, merge_fan_in: fan_in, runs_max: 6, ..TierOptions::default() };
        let mut tier = Tier::open(dir.path(), opts).expect("open");
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut generation = 0;
        for op in ops {
            match op {
                Op::Write(pairs) => {
                    generation += 1;
                    for &(n, seq) in &pairs {
                        let best = model.entry(n).or_insert(seq);
                        *best = (*best).max(seq);
                    }
                    let entries = pairs.iter().map(|&(n, seq)| entry(n, seq, seq)).collect();
                    tier.write_run(generation, generation, entries).expect("write");
                }
                Op::Compact => while tier.compact().expect("compact") {},
                Op::Reopen => {
                    drop(tier);
                    tier = Tier::open(dir.path(), opts).expect("reopen");
                }
            }
            prop_assert_eq!(tier.durable_through(), generation);
            let view = tier.view();
            for n in 0..KEYS {
                let found = view.get(&key(n)).expect("get").map(|e| (e.seq, e.value));
                prop_assert_eq!(found, model.get(&n).map(|&seq| (seq, value(n, seq))), "record {}", n);
            }
        }
    }
}
