//! Stable shard hashing and the shard map.
//!
//! `shard = stable_hash(account_id) % shards`. The hash is part of the on-disk
//! and on-the-wire contract: changing it would move every account, so its
//! values are pinned by a test.

use crate::ids::CellId;

/// The default number of shards in a cluster, fixed when the cluster is created.
pub const SHARDS_DEFAULT: u32 = 1024;

/// The largest number of shards a cluster may have (I7).
pub const SHARDS_MAX: u32 = 1 << 16;

/// A shard's number, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u32);

/// FNV-1a 64 followed by the splitmix64 finalizer, so the low bits that the
/// modulus keeps are well mixed. Stable across versions and platforms.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The splitmix64 finalizer: a bijection on u64 with good avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shard an id belongs to.
pub fn shard_of(id: &str, shards: u32) -> ShardId {
    assert!(shards > 0 && shards <= SHARDS_MAX, "shard count is validated at cluster creation");
    ShardId((stable_hash(id.as_bytes()) % u64::from(shards)) as u32)
}

/// Why a shard map is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardMapError {
    #[error("a shard map needs between 1 and {SHARDS_MAX} shards, got {0}")]
    ShardCount(usize),
    #[error("a new shard map must have a higher epoch than {current}, got {proposed}")]
    StaleEpoch { current: u64, proposed: u64 },
    #[error("a new shard map must keep the shard count {current}, got {proposed}")]
    ShardCountChanged { current: usize, proposed: usize },
}

/// Shard → owning cell, at an epoch that only ever grows (I6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    epoch: u64,
    owners: Vec<CellId>,
}

impl ShardMap {
    pub fn new(epoch: u64, owners: Vec<CellId>) -> Result<Self, ShardMapError> {
        if owners.is_empty() || owners.len() > SHARDS_MAX as usize {
            return Err(ShardMapError::ShardCount(owners.len()));
        }
        Ok(Self { epoch, owners })
    }

    /// `shards` shards dealt round-robin over `cells` cells, at epoch 1.
    pub fn round_robin(shards: u32, cells: u32) -> Result<Self, ShardMapError> {
        assert!(cells > 0, "a cluster has at least one cell");
        let owners = (0..shards).map(|s| CellId(s % cells)).collect();
        Self::new(1, owners)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn shards(&self) -> u32 {
        self.owners.len() as u32
    }

    pub fn owners(&self) -> &[CellId] {
        &self.owners
    }

    pub fn owner(&self, shard: ShardId) -> CellId {
        self.owners[shard.0 as usize]
    }

    pub fn shard_of(&self, id: &str) -> ShardId {
        shard_of(id, self.shards())
    }

    pub fn owner_of(&self, id: &str) -> CellId {
        self.owner(self.shard_of(id))
    }

    /// Checks that `next` may replace `self`: a higher epoch, the same shard count.
    pub fn check_successor(&self, next: &ShardMap) -> Result<(), ShardMapError> {
        if next.epoch <= self.epoch {
            return Err(ShardMapError::StaleEpoch { current: self.epoch, proposed: next.epoch });
        }
        if next.owners.len() != self.owners.len() {
            return Err(ShardMapError::ShardCountChanged { current: self.owners.len(), proposed: next.owners.len() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These values are part of the contract: if this test fails, the hash changed
    /// and every existing cluster would route accounts to the wrong shard.
    #[test]
    fn the_shard_hash_is_pinned() {
        let got: Vec<u64> =
            ["", "alice", "bob", "merchant:taobao-001"].iter().map(|s| stable_hash(s.as_bytes())).collect();
        assert_eq!(got, PINNED);
        assert_eq!(shard_of("alice", 1024), ShardId((PINNED[1] % 1024) as u32));
        assert_eq!(
            PINNED_SHARDS,
            [shard_of("alice", 1024).0, shard_of("bob", 1024).0, shard_of("merchant:taobao-001", 1024).0,]
        );
    }

    const PINNED: [u64; 4] =
        [0xf52a_15e9_a9b5_e89b, 0xc5d1_556d_6677_4a5c, 0x6e85_72d0_8b26_8dec, 0x5028_1bca_579d_8dc8];
    const PINNED_SHARDS: [u32; 3] = [604, 492, 456];

    #[test]
    fn shards_spread_evenly() {
        let shards = 1024u32;
        let mut counts = vec![0u32; shards as usize];
        for i in 0..200_000 {
            counts[shard_of(&format!("acct-{i}"), shards).0 as usize] += 1;
        }
        let mean = 200_000.0 / f64::from(shards);
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        // A fair hash gives binomial counts: every shard within five standard deviations.
        let band = 5.0 * mean.sqrt();
        assert!(f64::from(min) > mean - band && f64::from(max) < mean + band, "{min}..{max}");
    }

    #[test]
    fn a_successor_map_needs_a_higher_epoch_and_the_same_shards() {
        let map = ShardMap::round_robin(8, 2).unwrap();
        assert_eq!(map.owner(ShardId(3)), CellId(1));
        let same_epoch = ShardMap::new(1, vec![CellId(0); 8]).unwrap();
        assert!(map.check_successor(&same_epoch).is_err());
        let fewer = ShardMap::new(2, vec![CellId(0); 4]).unwrap();
        assert!(map.check_successor(&fewer).is_err());
        let next = ShardMap::new(2, vec![CellId(0); 8]).unwrap();
        assert!(map.check_successor(&next).is_ok());
        assert!(ShardMap::new(1, vec![]).is_err());
    }
}
