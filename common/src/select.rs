//! Choosing which parameters take part in an upload or a download, and
//! bounding uploaded values.
//!
//! All selections return indices in increasing order, ready for the delta
//! encoding of [`crate::sparse`].

use rand::Rng;
use rand::seq::SliceRandom;

/// Number of entries a fraction `theta` of `n` parameters selects:
/// `ceil(theta * n)`, clamped to `n`.
pub fn fraction_count(theta: f64, n: usize) -> usize {
    let count = (theta * n as f64).ceil();
    if count <= 0.0 {
        0
    } else {
        (count as usize).min(n)
    }
}

/// Returns the indices of the `k` largest keys, ties broken by the lower
/// index, in increasing index order.
///
/// Runs in O(n + k log k): a partial selection, then a sort of the `k` winners
/// by index. NaN keys rank below every number.
pub fn top_k_by_key<K, F>(n: usize, k: usize, key: F) -> Vec<u32>
where
    K: PartialOrd + Copy,
    F: Fn(usize) -> K,
{
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    if k < n {
        // "a before b" when a has the larger key, or the same key and a lower
        // index; this is a strict total order, so the first k are well defined.
        let rank = |a: &u32, b: &u32| {
            let (ka, kb) = (key(*a as usize), key(*b as usize));
            match kb.partial_cmp(&ka) {
                Some(std::cmp::Ordering::Equal) => a.cmp(b),
                Some(ordering) => ordering,
                // NaN on one side: the NaN one goes last.
                None if ka.partial_cmp(&ka).is_none() && kb.partial_cmp(&kb).is_none() => a.cmp(b),
                None if ka.partial_cmp(&ka).is_none() => std::cmp::Ordering::Greater,
                None => std::cmp::Ordering::Less,
            }
        };
        order.select_nth_unstable_by(k - 1, rank);
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// Selects the `c` entries of `delta` with the largest absolute value (the
/// "largest values" rule), in increasing index order.
pub fn select_largest(delta: &[f32], c: usize) -> Vec<u32> {
    top_k_by_key(delta.len(), c, |i| delta[i].abs())
}

/// Selects entries by the "random with threshold" rule: visit the indices in
/// a uniformly random order and take each one with `|delta| >= tau` until `c`
/// are taken or every index was visited. Returns increasing index order.
pub fn select_threshold(delta: &[f32], c: usize, tau: f32, rng: &mut impl Rng) -> Vec<u32> {
    let mut order: Vec<u32> = (0..delta.len() as u32).collect();
    let mut chosen = Vec::with_capacity(c.min(delta.len()));
    // A lazy Fisher-Yates shuffle: position i receives a uniform pick among
    // the not yet visited indices, so stopping early costs nothing extra.
    let mut visited = 0;
    while chosen.len() < c && visited < order.len() {
        let pick = rng.random_range(visited..order.len());
        order.swap(visited, pick);
        let index = order[visited];
        if delta[index as usize].abs() >= tau {
            chosen.push(index);
        }
        visited += 1;
    }
    chosen.sort_unstable();
    chosen
}

/// Clips `value` to `[-gamma, gamma]`.
pub fn bound(value: f32, gamma: f32) -> f32 {
    value.clamp(-gamma, gamma)
}

/// Gathers `delta` at `indices` and clips each value to `[-gamma, gamma]`.
pub fn gather_bounded(delta: &[f32], indices: &[u32], gamma: f32) -> Vec<f32> {
    indices
        .iter()
        .map(|&i| bound(delta[i as usize], gamma))
        .collect()
}

/// Draws a uniformly random permutation of `0..n` (used by tests and the
/// private selection, which must visit every index at most once).
pub fn random_permutation(n: usize, rng: &mut impl Rng) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn fraction_count_rounds_up() {
        assert_eq!(fraction_count(0.1, 109_386), 10_939);
        assert_eq!(fraction_count(1.0, 109_386), 109_386);
        assert_eq!(fraction_count(0.001, 10), 1);
        assert_eq!(fraction_count(0.0, 10), 0);
    }

    #[test]
    fn largest_picks_by_absolute_value() {
        let delta = [0.1, -0.9, 0.3, 0.0, 0.8];
        assert_eq!(select_largest(&delta, 2), vec![1, 4]);
        assert_eq!(select_largest(&delta, 3), vec![1, 2, 4]);
    }

    #[test]
    fn largest_breaks_ties_by_lower_index() {
        let delta = [0.5, -0.5, 0.5, 0.5];
        assert_eq!(select_largest(&delta, 2), vec![0, 1]);
        assert_eq!(select_largest(&delta, 3), vec![0, 1, 2]);
    }

    #[test]
    fn largest_with_c_above_n_takes_all() {
        assert_eq!(select_largest(&[1.0, 2.0], 5), vec![0, 1]);
    }

    #[test]
    fn nan_ranks_last() {
        let delta = [f32::NAN, 0.1, 0.2];
        assert_eq!(select_largest(&delta, 2), vec![1, 2]);
    }

    #[test]
    fn top_counters_prefix_property() {
        let counts = [3u64, 7, 7, 1, 7, 0, 3];
        let top3 = top_k_by_key(counts.len(), 3, |i| counts[i]);
        assert_eq!(top3, vec![1, 2, 4]);
        let top5 = top_k_by_key(counts.len(), 5, |i| counts[i]);
        assert_eq!(top5, vec![0, 1, 2, 4, 6]);
    }

    #[test]
    fn threshold_takes_only_large_entries() {
        let delta: Vec<f32> = (0..1000)
            .map(|i| if i % 10 == 0 { 0.5 } else { 0.01 })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let chosen = select_threshold(&delta, 1000, 0.1, &mut rng);
        assert_eq!(chosen.len(), 100);
        assert!(chosen.iter().all(|&i| i % 10 == 0));
    }

    #[test]
    fn threshold_stops_at_c() {
        let delta = vec![1.0f32; 1000];
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let chosen = select_threshold(&delta, 37, 0.5, &mut rng);
        assert_eq!(chosen.len(), 37);
    }

    #[test]
    fn threshold_choice_is_spread_uniformly() {
        // With every entry above tau and c = n/2, each index is taken about
        // half the time over many draws.
        let delta = vec![1.0f32; 20];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut hits = [0u32; 20];
        for _ in 0..4000 {
            for i in select_threshold(&delta, 10, 0.5, &mut rng) {
                hits[i as usize] += 1;
            }
        }
        for (index, &count) in hits.iter().enumerate() {
            assert!(
                (1800..2200).contains(&count),
                "index {index} taken {count} times of 4000"
            );
        }
    }

    #[test]
    fn bound_clips_both_sides() {
        assert_eq!(bound(0.5, 0.1), 0.1);
        assert_eq!(bound(-0.5, 0.1), -0.1);
        assert_eq!(bound(0.05, 0.1), 0.05);
        assert_eq!(
            gather_bounded(&[0.3, -0.2, 0.01], &[0, 1], 0.1),
            vec![0.1, -0.1]
        );
    }

    proptest! {
        #[test]
        fn largest_matches_a_full_sort(delta in proptest::collection::vec(-1.0f32..1.0, 1..300),
                                       c in 0usize..300) {
            let mut expected: Vec<u32> = (0..delta.len() as u32).collect();
            expected.sort_by(|&a, &b| {
                delta[b as usize].abs().partial_cmp(&delta[a as usize].abs()).unwrap().then(a.cmp(&b))
            });
            expected.truncate(c.min(delta.len()));
            expected.sort_unstable();
            prop_assert_eq!(select_largest(&delta, c), expected);
        }

        #[test]
        fn threshold_never_exceeds_c_nor_repeats(delta in proptest::collection::vec(-1.0f32..1.0, 0..300),
                                                 c in 0usize..300, seed in any::<u64>()) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let chosen = select_threshold(&delta, c, 0.3, &mut rng);
            prop_assert!(chosen.len() <= c);
            prop_assert!(chosen.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(chosen.iter().all(|&i| delta[i as usize].abs() >= 0.3));
        }
    }
}
