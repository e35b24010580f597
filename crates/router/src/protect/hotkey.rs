//! Per-account limits for hot keys (a hot merchant, a hot payer), with
//! bounded memory.
//!
//! `governor`'s keyed limiters grow with every key they see; a flash sale
//! sees millions of accounts, so this table is ours: GCRA state (the
//! theoretical arrival time) per key in a fixed number of shards, each capped
//! at `keys_tracked_max / SHARDS` entries. A key whose bucket is full again
//! carries no information, so a full shard first forgets those; if every
//! remembered key is still active, the new key is admitted untracked and
//! counted (fail open for a cold key: the hot ones are already tracked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellpay_core::AccountId;

use super::rules::{HotKeyRules, Rate};

/// Shards of the table, each with its own lock.
pub const HOT_KEY_SHARDS: usize = 16;
/// A shard that could free nothing waits this long before trying again, so
/// a flood of new keys costs O(1) each, not a sweep each.
const SWEEP_PAUSE: Duration = Duration::from_millis(10);

/// Which side of a payment a key is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Payer,
    Payee,
}

struct Shard {
    /// Key → theoretical arrival time, in ns since `epoch`.
    tat: HashMap<(bool, AccountId), u64>,
    next_sweep: Instant,
}

pub struct HotKeys {
    rules: HotKeyRules,
    epoch: Instant,
    per_shard_max: usize,
    shards: Vec<Mutex<Shard>>,
    pub untracked: AtomicU64,
}

fn interval_ns(r: &Rate) -> u64 {
    1_000_000_000 / u64::from(r.rate_per_s).max(1)
}

impl HotKeys {
    pub fn new(rules: HotKeyRules) -> Self {
        let per_shard_max = rules.keys_tracked_max.div_ceil(HOT_KEY_SHARDS);
        let shards = (0..HOT_KEY_SHARDS)
            .map(|_| Mutex::new(Shard { tat: HashMap::new(), next_sweep: Instant::now() }))
            .collect();
        Self { rules, epoch: Instant::now(), per_shard_max, shards, untracked: AtomicU64::new(0) }
    }

    /// The rule for `account` on `side`, if any.
    fn rule(&self, account: &AccountId, side: Side) -> Option<&Rate> {
        self.rules.accounts.get(account.as_str()).or(match side {
            Side::Payer => self.rules.payer.as_ref(),
            Side::Payee => self.rules.payee.as_ref(),
        })
    }

    /// Keys remembered now (all shards).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expect("hot-key shard lock").tat.len()).sum()
    }

    /// The hash-table slots allocated now: what the memory cap bounds.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expect("hot-key shard lock").tat.capacity()).sum()
    }

    pub fn keys_max(&self) -> usize {
        self.per_shard_max * HOT_KEY_SHARDS
    }

    /// One request touching `account`: admitted, or `Err` with the limit it is over.
    pub fn admit(&self, shadow: bool, account: &AccountId, side: Side) -> Result<(), Rate> {
        let Some(rule) = self.rule(account, side) else { return Ok(()) };
        let now = self.epoch.elapsed().as_nanos() as u64;
        let t = interval_ns(rule);
        let tolerance = t.saturating_mul(u64::from(rule.burst).saturating_sub(1));
        let index = (cellpay_core::stable_hash(account.as_str().as_bytes()) as usize) % HOT_KEY_SHARDS;
        let mut shard = self.shards[index].lock().expect("hot-key shard lock");
        let key = (shadow, account.clone());
        let tat = match shard.tat.get(&key) {
            Some(tat) => (*tat).max(now),
            None => {
                if shard.tat.len() >= self.per_shard_max && !self.make_room(&mut shard, now) {
                    self.untracked.fetch_add(1, Relaxed);
                    return Ok(());
                }
                now
            }
        };
        // GCRA: admitted when the bucket's next free slot is within the burst tolerance.
        if tat > now + tolerance {
            return Err(*rule);
        }
        shard.tat.insert(key, tat + t);
        Ok(())
    }

    /// Forgets every key whose bucket is full again; answers whether room was made.
    fn make_room(&self, shard: &mut Shard, now: u64) -> bool {
        let wall = Instant::now();
        if wall < shard.next_sweep {
            return false;
        }
        shard.tat.retain(|_, tat| *tat > now);
        if shard.tat.len() >= self.per_shard_max {
            shard.next_sweep = wall + SWEEP_PAUSE;
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rules(keys_tracked_max: usize) -> HotKeyRules {
        HotKeyRules {
            payee: Some(Rate { rate_per_s: 100, burst: 10 }),
            payer: None,
            accounts: BTreeMap::from([("merchant".to_string(), Rate { rate_per_s: 1000, burst: 1 })]),
            keys_tracked_max,
        }
    }

    #[test]
    fn a_burst_is_admitted_then_the_key_is_limited_and_others_are_not() {
        let h = HotKeys::new(rules(1024));
        let a = AccountId::new("a").unwrap();
        for _ in 0..10 {
            h.admit(false, &a, Side::Payee).unwrap();
        }
        assert_eq!(h.admit(false, &a, Side::Payee), Err(Rate { rate_per_s: 100, burst: 10 }));
        // The same account as payer has no rule; the shadow ledger has its own bucket.
        h.admit(false, &a, Side::Payer).unwrap();
        h.admit(true, &a, Side::Payee).unwrap();
        let m = AccountId::new("merchant").unwrap();
        h.admit(false, &m, Side::Payer).unwrap();
        assert!(h.admit(false, &m, Side::Payer).is_err(), "the named rule applies on either side");
    }
}
