//! Which runs to merge next: size-tiered compaction over adjacent runs.
//!
//! Runs are kept in generation order, and only adjacent runs merge, so a
//! merged run's generation range never spans a run it did not absorb (that is
//! what lets `open` tell inputs left behind by a crash from live runs). A run's
//! level is its size on a scale of `fan_in`: below [`LEVEL0_BYTES`] it is level
//! 0, and each level up holds runs `fan_in` times larger. More than `fan_in`
//! adjacent runs on one level merge, the oldest `fan_in` of them, so each
//! byte is rewritten about once per level (log_fan_in of the tier's size).
//!
//! Two bounds shape it. No merge builds a run larger than `run_bytes_max`:
//! expiry and the disk bound delete whole runs, so one huge run would hold
//! expired records for long and, dropped under the disk bound, would take a
//! large slice of the window at once. And when sizes alternate so that no
//! level fills, more than `runs_max` runs still merge (the adjacent window of
//! the fewest bytes), so the count of runs (open files, filters) stays bounded.

use std::ops::Range;

/// Runs smaller than this are all level 0.
pub(crate) const LEVEL0_BYTES: u64 = 1 << 20;

/// The level of a run of `bytes` bytes.
fn level(bytes: u64, fan_in: u64) -> u32 {
    let mut level = 0;
    let mut cap = LEVEL0_BYTES;
    while bytes >= cap && cap != u64::MAX {
        level += 1;
        cap = cap.saturating_mul(fan_in);
    }
    level
}

/// How to pick merges.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MergePolicy {
    pub fan_in: usize,
    pub runs_max: usize,
    pub run_bytes_max: u64,
}

impl MergePolicy {
    /// The adjacent runs to merge next, given the runs' sizes in generation order.
    pub fn pick(&self, sizes: &[u64]) -> Option<Range<usize>> {
        let fits = |r: &Range<usize>| sizes[r.clone()].iter().sum::<u64>() <= self.run_bytes_max;
        let levels: Vec<u32> = sizes.iter().map(|&b| level(b, self.fan_in as u64)).collect();
        // The lowest level holding more than fan_in adjacent runs; the oldest such streak.
        let mut best: Option<(u32, Range<usize>)> = None;
        let mut start = 0;
        for end in 1..=levels.len() {
            if end < levels.len() && levels[end] == levels[start] {
                continue;
            }
            let window = start..start + self.fan_in;
            if end - start > self.fan_in && fits(&window) && best.as_ref().is_none_or(|(l, _)| levels[start] < *l) {
                best = Some((levels[start], window));
            }
            start = end;
        }
        if let Some((_, window)) = best {
            return Some(window);
        }
        if sizes.len() <= self.runs_max {
            return None;
        }
        (0..=sizes.len() - self.fan_in)
            .map(|s| s..s + self.fan_in)
            .filter(fits)
            .min_by_key(|r| sizes[r.clone()].iter().sum::<u64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KB: u64 = 1 << 10;
    const MB: u64 = 1 << 20;

    fn policy() -> MergePolicy {
        MergePolicy { fan_in: 4, runs_max: 8, run_bytes_max: 64 * MB }
    }

    #[test]
    fn levels_grow_by_the_fan_in() {
        assert_eq!(level(0, 4), 0);
        assert_eq!(level(MB - 1, 4), 0);
        assert_eq!(level(MB, 4), 1);
        assert_eq!(level(4 * MB - 1, 4), 1);
        assert_eq!(level(4 * MB, 4), 2);
        assert_eq!(level(u64::MAX, 4), 22);
    }

    #[test]
    fn more_than_fan_in_runs_of_a_level_merge_the_oldest_fan_in() {
        assert_eq!(policy().pick(&[100 * KB; 4]), None);
        assert_eq!(policy().pick(&[100 * KB; 5]), Some(0..4));
        // The lowest level goes first, even when a higher one is also full.
        let sizes = [2 * MB, 2 * MB, 2 * MB, 2 * MB, 2 * MB, 10 * KB, 10 * KB, 10 * KB, 10 * KB, 10 * KB];
        assert_eq!(policy().pick(&sizes), Some(5..9));
    }

    #[test]
    fn no_merge_builds_a_run_past_the_bound() {
        let sizes = [20 * MB; 5];
        assert_eq!(policy().pick(&sizes), None);
        assert_eq!(MergePolicy { run_bytes_max: 80 * MB, ..policy() }.pick(&sizes), Some(0..4));
    }

    #[test]
    fn too_many_runs_merge_even_when_no_level_fills() {
        let alternating = [100 * KB, 2 * MB, 100 * KB, 2 * MB, 100 * KB, 2 * MB, 100 * KB, 2 * MB];
        assert_eq!(policy().pick(&alternating), None);
        let mut more = alternating.to_vec();
        more.push(100 * KB);
        assert_eq!(policy().pick(&more), Some(0..4));
    }
}
