//! Deterministic split of a training set among participants.
//!
//! Participant `i` of `N`, each with a fraction `f` of `m` examples, gets
//! `round(f * m)` examples. When `N * f <= 1` the shards are disjoint slices
//! of one seeded permutation; otherwise each participant draws its shard
//! independently (without replacement within the shard), so shards overlap,
//! as they must when their sizes add up to more than the whole set.
//!
//! [`LabelSkew`] gives the same shard sizes with non-IID label proportions:
//! each participant's class mix is drawn from a symmetric Dirichlet
//! distribution, so a small concentration gives each participant a few
//! dominant classes and a large one approaches the IID split.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

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

/// A non-IID split: shards of [`ShardPlan::shard_len`] examples whose label
/// proportions follow a symmetric Dirichlet distribution with concentration
/// `alpha`, one draw per participant.
///
/// When the shards fit side by side ([`ShardPlan::disjoint`]) no example is
/// in two shards: participants take examples of each class from one shuffled
/// pool per class, in index order, and a class that runs out is made up from
/// the participant's next most likely classes. Otherwise each participant
/// draws from the whole of every class pool, so shards overlap.
#[derive(Clone, Copy, Debug)]
pub struct LabelSkew<'a> {
    /// Sizes, participant count and seed.
    pub plan: ShardPlan,
    /// Dirichlet concentration, positive and finite.
    pub alpha: f64,
    /// Class of each training example, below `classes`.
    pub labels: &'a [u8],
    /// Number of classes.
    pub classes: usize,
}

impl LabelSkew<'_> {
    /// Example indices of every participant's shard, each in increasing
    /// order.
    ///
    /// # Panics
    ///
    /// Panics if `alpha` is not positive and finite, if `labels` is not as
    /// long as the plan's dataset, or if a label is not below `classes`.
    pub fn shards(&self) -> Vec<Vec<usize>> {
        assert!(
            self.alpha > 0.0 && self.alpha.is_finite(),
            "Dirichlet concentration {} must be positive and finite",
            self.alpha
        );
        assert_eq!(
            self.labels.len(),
            self.plan.dataset_len,
            "one label per example"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(self.plan.seed ^ 0xD1E1_C4E7_0000_0001);
        let mut pools: Vec<Vec<usize>> = vec![Vec::new(); self.classes];
        for (index, &label) in self.labels.iter().enumerate() {
            let class = usize::from(label);
            assert!(
                class < self.classes,
                "label {label} at {index} is not below {}",
                self.classes
            );
            pools[class].push(index);
        }
        for pool in &mut pools {
            pool.shuffle(&mut rng);
        }
        let gamma = Gamma::new(self.alpha, 1.0).expect("alpha is positive and finite");
        let len = self.plan.shard_len();
        let disjoint = self.plan.disjoint();
        let mut used = vec![0usize; self.classes];
        let mut shards = Vec::with_capacity(self.plan.participants);
        for _ in 0..self.plan.participants {
            let weights: Vec<f64> = (0..self.classes).map(|_| gamma.sample(&mut rng)).collect();
            let available: Vec<usize> = (0..self.classes)
                .map(|c| {
                    if disjoint {
                        pools[c].len() - used[c]
                    } else {
                        pools[c].len()
                    }
                })
                .collect();
            let counts = allocate(&weights, &available, len, &mut rng);
            let mut shard = Vec::with_capacity(len);
            for (class, &count) in counts.iter().enumerate() {
                if disjoint {
                    shard.extend_from_slice(&pools[class][used[class]..used[class] + count]);
                    used[class] += count;
                } else {
                    let picks = sample(&mut rng, pools[class].len(), count);
                    shard.extend(picks.iter().map(|k| pools[class][k]));
                }
            }
            shard.sort_unstable();
            shards.push(shard);
        }
        shards
    }

    /// Example indices of participant `index` (0-based), in increasing order.
    ///
    /// # Panics
    ///
    /// As [`LabelSkew::shards`], and if `index >= participants`.
    pub fn shard(&self, index: usize) -> Vec<usize> {
        assert!(
            index < self.plan.participants,
            "participant {index} of {}",
            self.plan.participants
        );
        self.shards().swap_remove(index)
    }

    /// Sorted union of every shard, without repeats.
    pub fn union(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.shards().into_iter().flatten().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Splits `total` examples among classes in proportion to `weights`, by
/// largest remainder, taking at most `available[c]` from class `c`; what a
/// class cannot supply goes to the classes with the largest weights that
/// still have examples. Weights that underflow to zero put the whole shard
/// on one class picked at random.
fn allocate(
    weights: &[f64],
    available: &[usize],
    total: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let shares: Vec<f64> = if sum > 0.0 && sum.is_finite() {
        weights.iter().map(|w| w / sum * total as f64).collect()
    } else {
        let mut shares = vec![0.0; weights.len()];
        shares[rand::Rng::random_range(rng, 0..weights.len())] = total as f64;
        shares
    };
    let mut counts: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = shares[a] - shares[a].floor();
        let fb = shares[b] - shares[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let assigned: usize = counts.iter().sum();
    for &class in order.iter().cycle().take(total - assigned) {
        counts[class] += 1;
    }
    let mut deficit = 0;
    for (count, &limit) in counts.iter_mut().zip(available) {
        if *count > limit {
            deficit += *count - limit;
            *count = limit;
        }
    }
    let mut by_weight: Vec<usize> = (0..weights.len()).collect();
    by_weight.sort_by(|&a, &b| shares[b].total_cmp(&shares[a]).then(a.cmp(&b)));
    for &class in &by_weight {
        let room = available[class] - counts[class];
        let extra = room.min(deficit);
        counts[class] += extra;
        deficit -= extra;
    }
    assert_eq!(deficit, 0, "the classes hold fewer than {total} examples");
    counts
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

    /// Ten classes of 6,000 examples each, interleaved.
    fn labels() -> Vec<u8> {
        (0..60_000).map(|i| (i % 10) as u8).collect()
    }

    fn largest_class_share(shard: &[usize], labels: &[u8]) -> f64 {
        let mut counts = [0usize; 10];
        for &i in shard {
            counts[usize::from(labels[i])] += 1;
        }
        *counts.iter().max().unwrap() as f64 / shard.len() as f64
    }

    #[test]
    fn label_skew_keeps_sizes_and_disjointness() {
        let labels = labels();
        let skew = LabelSkew {
            plan: plan(30, 0.01),
            alpha: 0.1,
            labels: &labels,
            classes: 10,
        };
        let shards = skew.shards();
        assert_eq!(shards.len(), 30);
        let mut seen = HashSet::new();
        for shard in &shards {
            assert_eq!(shard.len(), 600);
            assert!(shard.windows(2).all(|w| w[0] < w[1]));
            for &example in shard {
                assert!(seen.insert(example), "example {example} in two shards");
            }
        }
        assert_eq!(skew.union().len(), 18_000);
        assert_eq!(skew.shard(7), shards[7]);
    }

    #[test]
    fn label_skew_follows_concentration() {
        let labels = labels();
        let mean_share = |alpha: f64| {
            let skew = LabelSkew {
                plan: plan(30, 0.01),
                alpha,
                labels: &labels,
                classes: 10,
            };
            let shards = skew.shards();
            shards
                .iter()
                .map(|s| largest_class_share(s, &labels))
                .sum::<f64>()
                / 30.0
        };
        let skewed = mean_share(0.1);
        let near_iid = mean_share(1000.0);
        assert!(
            skewed > 0.5,
            "alpha 0.1 gave a mean largest-class share of {skewed}"
        );
        assert!(
            near_iid < 0.15,
            "alpha 1000 gave a mean largest-class share of {near_iid}"
        );
    }

    #[test]
    fn label_skew_overlaps_when_shards_do_not_fit() {
        let labels: Vec<u8> = (0..1_000).map(|i| (i % 10) as u8).collect();
        let plan = ShardPlan {
            dataset_len: 1_000,
            participants: 20,
            fraction: 0.1,
            seed: 3,
        };
        let skew = LabelSkew {
            plan,
            alpha: 0.5,
            labels: &labels,
            classes: 10,
        };
        assert!(!plan.disjoint());
        for shard in skew.shards() {
            assert_eq!(shard.len(), 100);
            assert!(
                shard.windows(2).all(|w| w[0] < w[1]),
                "no repeats within a shard"
            );
        }
    }

    #[test]
    fn label_skew_refills_exhausted_class() {
        // Class 0 has only 5 examples; the rest are class 1.
        let labels: Vec<u8> = (0..100).map(|i| u8::from(i >= 5)).collect();
        let plan = ShardPlan {
            dataset_len: 100,
            participants: 4,
            fraction: 0.25,
            seed: 9,
        };
        let skew = LabelSkew {
            plan,
            alpha: 0.01,
            labels: &labels,
            classes: 2,
        };
        let shards = skew.shards();
        assert!(shards.iter().all(|s| s.len() == 25));
        assert_eq!(skew.union().len(), 100);
    }

    #[test]
    fn label_skew_is_reproducible_and_seeded() {
        let labels = labels();
        let skew = LabelSkew {
            plan: plan(30, 0.01),
            alpha: 0.5,
            labels: &labels,
            classes: 10,
        };
        assert_eq!(skew.shards(), skew.shards());
        let other = LabelSkew {
            plan: ShardPlan {
                seed: 8,
                ..plan(30, 0.01)
            },
            ..skew
        };
        assert_ne!(skew.shard(0), other.shard(0));
    }
}
