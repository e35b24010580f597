//! A blocked Bloom filter: each key sets its `k` bits inside one 512-bit
//! block (one cache line), so a lookup touches one line of memory.
//!
//! The filter is written into run files, so its hash is ours and fixed
//! ([`key_hash`]): a hasher whose output may change between library versions
//! would turn a filter written today into false negatives tomorrow, and a false
//! negative here is a payment made twice. Changing the hash needs a new run
//! format version.
//!
//! Encoded as `k u32 | block count u32 | blocks` (each block 8 words, little-endian).

/// Bits in one block.
const BLOCK_BITS: u64 = 512;
const BLOCK_WORDS: usize = 8;
const BLOCK_BYTES: usize = 64;

/// Bytes before the blocks in the encoded filter.
pub(crate) const FILTER_HEADER_BYTES: usize = 8;

/// The most bits a key may set.
const K_MAX: u32 = 16;

/// murmur3's 64-bit finalizer: a bijection that spreads every input bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The filter's hash of a key. Part of the run format: never change it
/// without a new format version.
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    let mut h = mix(0x9e37_79b9_7f4a_7c15 ^ key.len() as u64);
    let mut words = key.chunks_exact(8);
    for word in &mut words {
        h = mix(h ^ u64::from_le_bytes(word.try_into().expect("chunks_exact yields 8 bytes")));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = mix(h ^ u64::from_le_bytes(word));
    }
    h
}

/// A blocked Bloom filter over [`key_hash`] values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bloom {
    k: u32,
    blocks: Vec<[u64; BLOCK_WORDS]>,
}

impl Bloom {
    /// A filter sized for `keys` keys at `bits_per_key` bits each.
    pub fn with_capacity(keys: u64, bits_per_key: u32) -> Bloom {
        // k = bits per key × ln 2 minimises false positives.
        let k = ((f64::from(bits_per_key) * std::f64::consts::LN_2).round() as u32).clamp(1, K_MAX);
        let bits = keys.saturating_mul(u64::from(bits_per_key));
        let block_count = bits.div_ceil(BLOCK_BITS).max(u64::from(keys > 0));
        Bloom { k, blocks: vec![[0; BLOCK_WORDS]; block_count as usize] }
    }

    /// The block and the `k` bit positions (0..512) of hash `h`.
    fn probe(&self, h: u64) -> (usize, impl Iterator<Item = usize>) {
        // The block comes from the high half of h, the bits from a remix of h.
        let block = (((h >> 32) * self.blocks.len() as u64) >> 32) as usize;
        let g = mix(h ^ 0x5851_f42d_4c95_7f2d);
        let a = g as u32;
        // Odd, so the k positions a + i·b (mod 512) are distinct.
        let b = (g >> 32) as u32 | 1;
        let bits = (0..self.k).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) as u64 % BLOCK_BITS) as usize);
        (block, bits)
    }

    pub fn insert(&mut self, h: u64) {
        if self.blocks.is_empty() {
            return;
        }
        let (block, bits) = self.probe(h);
        let words = &mut self.blocks[block];
        for bit in bits {
            words[bit / 64] |= 1 << (bit % 64);
        }
    }

    /// False means the key was never inserted; true means it may have been.
    pub fn may_contain(&self, h: u64) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let (block, mut bits) = self.probe(h);
        let words = &self.blocks[block];
        bits.all(|bit| words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Bytes of memory the bits take.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.k.to_le_bytes());
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for block in &self.blocks {
            for word in block {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
    }

    /// Parses an encoded filter; the caller has verified its checksum.
    pub fn decode(buf: &[u8]) -> Result<Bloom, String> {
        let header = buf.get(..FILTER_HEADER_BYTES).ok_or("filter is cut short")?;
        let k = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let block_count = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if !(1..=K_MAX).contains(&k) {
            return Err(format!("filter declares {k} bits per key, outside 1..={K_MAX}"));
        }
        let body = &buf[FILTER_HEADER_BYTES..];
        if body.len() != block_count * BLOCK_BYTES {
            return Err(format!("filter declares {block_count} blocks but holds {} bytes", body.len()));
        }
        let blocks = body
            .chunks_exact(BLOCK_BYTES)
            .map(|block| {
                let mut words = [0u64; BLOCK_WORDS];
                for (word, bytes) in words.iter_mut().zip(block.chunks_exact(8)) {
                    *word = u64::from_le_bytes(bytes.try_into().expect("chunks_exact yields 8 bytes"));
                }
                words
            })
            .collect();
        Ok(Bloom { k, blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_keys_are_always_found_and_the_filter_round_trips() {
        let mut bloom = Bloom::with_capacity(1000, 10);
        for i in 0u64..1000 {
            bloom.insert(key_hash(&i.to_be_bytes()));
        }
        for i in 0u64..1000 {
            assert!(bloom.may_contain(key_hash(&i.to_be_bytes())), "false negative for {i}");
        }
        let mut buf = Vec::new();
        bloom.encode(&mut buf);
        assert_eq!(buf.len(), FILTER_HEADER_BYTES + bloom.bytes());
        assert_eq!(Bloom::decode(&buf), Ok(bloom));
    }

    #[test]
    fn an_empty_filter_contains_nothing() {
        let bloom = Bloom::with_capacity(0, 10);
        assert_eq!(bloom.bytes(), 0);
        assert!(!bloom.may_contain(key_hash(b"anything")));
    }

    #[test]
    fn the_hash_is_fixed_because_it_is_part_of_the_file_format() {
        // Pinned values: if these change, filters already on disk give false negatives.
        let pinned = [key_hash(b""), key_hash(b"a"), key_hash(b"transfer-00000001")];
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [u64; 3] = [11286133854226296554, 4577915242369641651, 9834162720268648146];
}
