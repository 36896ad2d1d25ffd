//! Deterministic split of a training set among participants.
//!
//! Participant `i` of `N`, each with a fraction `f` of `m` examples, gets
//! `round(f * m)` examples. When `N * f <= 1` the shards are disjoint slices
//! of one seeded permutation; otherwise each participant draws its shard
//! independently (without replacement within the shard), so shards overlap,
//! as they must when their sizes add up to more than the whole set.

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

/// How a training set is split among participants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardPlan {
    /// Number of examples in the whole training set.
    pub dataset_len: usize,
    /// Number of participants.
    pub participants: usize,
    /// Fraction of the training set each participant holds, in (0, 1].
    pub fraction: f64,
    /// Seed of the split; every process must use the same one.
    pub seed: u64,
}

impl ShardPlan {
    /// Number of examples in each shard.
    pub fn shard_len(&self) -> usize {
        ((self.fraction * self.dataset_len as f64).round() as usize).clamp(1, self.dataset_len)
    }

    /// Whether the shards are disjoint (true when they fit side by side).
    pub fn disjoint(&self) -> bool {
        self.shard_len() * self.participants <= self.dataset_len
    }

    /// Example indices of participant `index` (0-based), in increasing order.
    ///
    /// # Panics
    ///
    /// Panics if `index >= participants`.
    pub fn shard(&self, index: usize) -> Vec<usize> {
        assert!(
            index < self.participants,
            "participant {index} of {}",
            self.participants
        );
        let len = self.shard_len();
        let mut shard = if self.disjoint() {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            let permutation = sample(&mut rng, self.dataset_len, self.dataset_len).into_vec();
            permutation[index * len..(index + 1) * len].to_vec()
        } else {
            // Mixing the participant index into the seed gives each shard its
            // own stream; the multiplier spreads consecutive indices apart.
            let stream = self.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = ChaCha8Rng::seed_from_u64(stream);
            sample(&mut rng, self.dataset_len, len).into_vec()
        };
        shard.sort_unstable();
        shard
    }

    /// Sorted union of every participant's shard, without repeats: the
    /// training set of the centralized baseline.
    pub fn union(&self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.participants).flat_map(|i| self.shard(i)).collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn plan(participants: usize, fraction: f64) -> ShardPlan {
        ShardPlan {
            dataset_len: 60_000,
            participants,
            fraction,
            seed: 7,
        }
    }

    #[test]
    fn one_percent_gives_600_examples() {
        assert_eq!(plan(30, 0.01).shard_len(), 600);
    }

    #[test]
    fn small_federations_get_disjoint_shards() {
        let plan = plan(30, 0.01);
        assert!(plan.disjoint());
        let mut seen = HashSet::new();
        for i in 0..30 {
            let shard = plan.shard(i);
            assert_eq!(shard.len(), 600);
            for example in shard {
                assert!(seen.insert(example), "example {example} in two shards");
            }
        }
        assert_eq!(plan.union().len(), 18_000);
    }

    #[test]
    fn large_federations_overlap_but_shards_have_no_repeats() {
        let plan = plan(150, 0.01);
        assert!(!plan.disjoint());
        let shard = plan.shard(149);
        assert_eq!(shard.len(), 600);
        assert!(shard.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(plan.shard(0), plan.shard(1));
    }

    #[test]
    fn shards_are_reproducible_and_seeded() {
        assert_eq!(plan(30, 0.01).shard(3), plan(30, 0.01).shard(3));
        let other = ShardPlan {
            seed: 8,
            ..plan(30, 0.01)
        };
        assert_ne!(plan(30, 0.01).shard(3), other.shard(3));
    }
}
