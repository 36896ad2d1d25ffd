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

/// Bits of a key that one histogram pass of the radix selection resolves.
const RADIX_BITS: u32 = 11;

/// Keys read to estimate the selection threshold of [`top_k_by_key`].
const SAMPLE: usize = 1024;

/// Returns the indices of the `k` largest keys, ties broken by the lower
/// index, in increasing index order.
///
/// A threshold is estimated from an evenly spaced sample of 1,024 keys,
/// set low enough that about 1.5 times `k` keys pass it. One pass collects
/// the indices whose key reaches it; if at least `k` do, every key of the
/// answer is among them, ties included, and a radix selection picks the
/// answer from them. Otherwise the radix selection runs on every index.
/// Both are O(n) with few mispredicted branches, where a comparison-based
/// partial selection runs several times slower.
pub fn top_k_by_key<F>(n: usize, k: usize, key: F) -> Vec<u32>
where
    F: Fn(usize) -> u64,
{
    top_k_filtered(n, k, &key, |threshold, candidates| {
        for i in 0..n {
            if key(i) >= threshold {
                candidates.push(i as u32);
            }
        }
    })
}

/// Runs [`top_k_by_key`] with `collect`, which pushes the increasing
/// indices whose key reaches a threshold, as the pass over all `n` keys.
fn top_k_filtered<F, C>(n: usize, k: usize, key: &F, collect: C) -> Vec<u32>
where
    F: Fn(usize) -> u64,
    C: FnOnce(u64, &mut Vec<u32>),
{
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u32).collect();
    }
    if let Some(threshold) = sampled_threshold(n, k, key) {
        let mut candidates = Vec::with_capacity(k + k / 2 + 64);
        collect(threshold, &mut candidates);
        if candidates.len() >= k {
            return radix_top_k(|| candidates.iter().copied(), k, key);
        }
    }
    radix_top_k(|| 0..n as u32, k, key)
}

/// A key that about 1.5 times `k` of the `n` keys reach, estimated from a
/// sample; `None` when the sample cannot tell (it would pass almost every
/// key).
fn sampled_threshold<F>(n: usize, k: usize, key: &F) -> Option<u64>
where
    F: Fn(usize) -> u64,
{
    if n < 4 * SAMPLE {
        return None;
    }
    let mut sample: Vec<u64> = (0..SAMPLE).map(|j| key(j * n / SAMPLE)).collect();
    sample.sort_unstable_by(|a, b| b.cmp(a));
    // The expected rank of the k-th key in the sample, raised by half and
    // by three standard deviations of a binomial count.
    let expected = k as f64 * SAMPLE as f64 / n as f64;
    let rank = (1.5 * expected + 3.0 * expected.sqrt() + 3.0).ceil() as usize;
    (rank < SAMPLE / 2).then(|| sample[rank])
}

/// Returns the `k` largest keys' indices among `indices()` (increasing
/// indices, at least `k` of them), ties broken by the lower index, in
/// increasing order.
///
/// One pass finds the largest key and a second counts the indices per
/// bucket of their keys' top 11 significant bits; a third keeps the indices
/// above the bucket where the k-th key falls and collects that bucket's
/// indices as candidates. Candidates are refined by the next 11 bits until
/// the remaining ones share one key; the lowest indices of those complete
/// the selection.
fn radix_top_k<I, It, F>(indices: I, k: usize, key: &F) -> Vec<u32>
where
    I: Fn() -> It,
    It: Iterator<Item = u32>,
    F: Fn(usize) -> u64,
{
    let key_of = |i: u32| key(i as usize);
    let largest = indices().map(key_of).max().unwrap_or(0);
    let significant_bits = u64::BITS - largest.leading_zeros();
    let mut shift = significant_bits.saturating_sub(RADIX_BITS);
    let mask = (1u64 << RADIX_BITS) - 1;

    let mut counts = vec![0usize; 1 << RADIX_BITS];
    for i in indices() {
        counts[(key_of(i) >> shift) as usize] += 1;
    }
    let (boundary, mut remaining) = boundary_bucket(&counts, k);
    let mut chosen = Vec::with_capacity(k);
    let mut candidates = Vec::new();
    for i in indices() {
        let bucket = (key_of(i) >> shift) as usize;
        if bucket > boundary {
            chosen.push(i);
        } else if bucket == boundary {
            candidates.push(i);
        }
    }

    while shift > 0 && candidates.len() > remaining {
        // Candidates agree on every bit from `shift` up, so the window of
        // the next 11 bits orders them; bits of the window above the old
        // shift are equal among them.
        shift = shift.saturating_sub(RADIX_BITS);
        counts.iter_mut().for_each(|count| *count = 0);
        for &i in &candidates {
            counts[((key_of(i) >> shift) & mask) as usize] += 1;
        }
        let (next_boundary, next_remaining) = boundary_bucket(&counts, remaining);
        let mut next_candidates = Vec::new();
        for &i in &candidates {
            let bucket = ((key_of(i) >> shift) & mask) as usize;
            if bucket > next_boundary {
                chosen.push(i);
            } else if bucket == next_boundary {
                next_candidates.push(i);
            }
        }
        candidates = next_candidates;
        remaining = next_remaining;
    }
    // The candidates left share one key, or all of them fit: the lowest
    // indices win the ties.
    chosen.extend_from_slice(&candidates[..remaining.min(candidates.len())]);
    chosen.sort_unstable();
    chosen
}

/// Returns the bucket, counted from the top, that contains the `k`-th largest
/// key, and how many of `k` that bucket must supply.
fn boundary_bucket(counts: &[usize], k: usize) -> (usize, usize) {
    let mut above = 0;
    for bucket in (0..counts.len()).rev() {
        if above + counts[bucket] >= k {
            return (bucket, k - above);
        }
        above += counts[bucket];
    }
    unreachable!("the counts add up to at least k")
}

/// Sort key of a change for the largest-values rule: larger magnitude,
/// larger key. NaN gets 0, below every number, and a number gets its
/// magnitude's bit pattern plus one, which orders non-negative floats.
fn magnitude_key(value: f32) -> u64 {
    if value.is_nan() {
        0
    } else {
        u64::from(value.abs().to_bits()) + 1
    }
}

/// Selects the `c` entries of `delta` with the largest absolute value (the
/// "largest values" rule), ties broken by the lower index, in increasing
/// index order. NaN entries rank below every number.
pub fn select_largest(delta: &[f32], c: usize) -> Vec<u32> {
    let key = |i: usize| magnitude_key(delta[i]);
    top_k_filtered(delta.len(), c, &key, |threshold, candidates| {
        collect_magnitudes(delta, threshold, candidates);
    })
}

/// Pushes the indices of `delta` whose [`magnitude_key`] reaches
/// `threshold`, in increasing order.
///
/// Few entries pass, so each block of 8 is first tested as a whole, on
/// the 32-bit magnitude patterns and without branches, which the compiler
/// can vectorise. For a number, `magnitude_key(v) >= threshold` is
/// `|v|.to_bits() >= threshold - 1`; NaN patterns lie above infinity's and
/// never pass.
fn collect_magnitudes(delta: &[f32], threshold: u64, candidates: &mut Vec<u32>) {
    const BLOCK: usize = 8;
    const INFINITY_BITS: u32 = 0x7f80_0000;
    let Ok(lowest) = u32::try_from(threshold.saturating_sub(1)) else {
        // Above every number's key: nothing passes.
        return;
    };
    let passes = |value: f32| {
        let bits = value.to_bits() & 0x7fff_ffff;
        bits >= lowest && bits <= INFINITY_BITS
    };
    let mut blocks = delta.chunks_exact(BLOCK);
    for (number, block) in blocks.by_ref().enumerate() {
        if block.iter().fold(false, |any, &value| any | passes(value)) {
            // Branch-free compaction: every index is written, and only
            // those that pass are kept.
            let mut passing = [0u32; BLOCK];
            let mut count = 0;
            for (offset, &value) in block.iter().enumerate() {
                passing[count] = (number * BLOCK + offset) as u32;
                count += usize::from(passes(value));
            }
            candidates.extend_from_slice(&passing[..count]);
        }
    }
    let start = delta.len() - blocks.remainder().len();
    for (offset, &value) in blocks.remainder().iter().enumerate() {
        if passes(value) {
            candidates.push((start + offset) as u32);
        }
    }
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
    use rand::{Rng, SeedableRng};
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
    fn top_k_refines_keys_that_share_their_top_bits() {
        // Keys that differ only in their lowest bits take several levels.
        let keys: Vec<u64> = (0..5000u64)
            .map(|i| (1 << 60) + (i * 7919) % 5000)
            .collect();
        let top = top_k_by_key(keys.len(), 10, |i| keys[i]);
        let mut expected: Vec<u32> = (0..5000u32)
            .filter(|&i| keys[i as usize] >= (1 << 60) + 4990)
            .collect();
        expected.sort_unstable();
        assert_eq!(top, expected);
    }

    #[test]
    fn top_k_of_equal_keys_takes_the_lowest_indices() {
        assert_eq!(top_k_by_key(1000, 3, |_| 7), vec![0, 1, 2]);
        assert_eq!(top_k_by_key(5, 5, |_| 0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn nan_ranks_last() {
        let delta = [f32::NAN, 0.1, 0.2];
        assert_eq!(select_largest(&delta, 2), vec![1, 2]);
        // Below zero too, whatever the indices.
        let delta = [f32::NAN, 0.0, -0.0, f32::NAN];
        assert_eq!(select_largest(&delta, 2), vec![1, 2]);
        assert_eq!(select_largest(&delta, 3), vec![0, 1, 2]);
    }

    #[test]
    fn infinities_rank_first() {
        let delta = [1.0, f32::NEG_INFINITY, 3.0, f32::INFINITY];
        assert_eq!(select_largest(&delta, 2), vec![1, 3]);
    }

    #[test]
    fn magnitude_filter_matches_the_key() {
        // 37 values: four whole blocks and a remainder, with every kind of
        // special value.
        let specials = [
            0.0,
            -0.0,
            f32::MIN_POSITIVE / 2.0,
            0.5,
            -0.5,
            1.0,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        let delta: Vec<f32> = (0..37).map(|i| specials[i % specials.len()]).collect();
        let thresholds = [
            0,
            1,
            2,
            magnitude_key(0.5),
            magnitude_key(0.5) + 1,
            magnitude_key(f32::INFINITY),
            magnitude_key(f32::INFINITY) + 1,
            u64::MAX,
        ];
        for threshold in thresholds {
            let mut fast = Vec::new();
            collect_magnitudes(&delta, threshold, &mut fast);
            let expected: Vec<u32> = (0..delta.len() as u32)
                .filter(|&i| {
                    magnitude_key(delta[i as usize]) >= threshold && !delta[i as usize].is_nan()
                })
                .collect();
            assert_eq!(fast, expected, "threshold {threshold}");
        }
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
        fn top_k_matches_a_full_sort(keys in proptest::collection::vec(
                                         prop_oneof![0u64..4, 0u64..5000, any::<u64>()], 1..400),
                                     k in 0usize..400) {
            let mut expected: Vec<u32> = (0..keys.len() as u32).collect();
            expected.sort_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
            expected.truncate(k.min(keys.len()));
            expected.sort_unstable();
            prop_assert_eq!(top_k_by_key(keys.len(), k, |i| keys[i]), expected);
        }

        #[test]
        fn top_k_of_many_keys_matches_a_full_sort(seed in any::<u64>(),
                                                  n in 4096usize..20_000,
                                                  k in 1usize..3000,
                                                  distinct in prop_oneof![Just(3u64), Just(1000u64), Just(u64::MAX)]) {
            // Large enough for the sampled threshold, with many or few ties.
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let keys: Vec<u64> = (0..n).map(|_| rng.random_range(0..distinct)).collect();
            let mut expected: Vec<u32> = (0..n as u32).collect();
            expected.sort_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
            expected.truncate(k);
            expected.sort_unstable();
            prop_assert_eq!(top_k_by_key(n, k, |i| keys[i]), expected);
        }

        #[test]
        fn largest_of_many_values_matches_a_full_sort(seed in any::<u64>(),
                                                      n in 4096usize..20_000,
                                                      k in 1usize..3000,
                                                      kind in 0u8..3) {
            // Large enough for the sampled threshold: spread values, few
            // distinct values with NaN and infinities, or any bit pattern.
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let few = [0.0, -0.0, 0.25, -0.25, 1.0, f32::INFINITY, f32::NAN];
            let delta: Vec<f32> = (0..n)
                .map(|_| match kind {
                    0 => rng.random_range(-1.0f32..1.0),
                    1 => few[rng.random_range(0..few.len())],
                    _ => f32::from_bits(rng.random()),
                })
                .collect();
            let mut expected: Vec<u32> = (0..n as u32).collect();
            expected.sort_by(|&a, &b| {
                magnitude_key(delta[b as usize])
                    .cmp(&magnitude_key(delta[a as usize]))
                    .then(a.cmp(&b))
            });
            expected.truncate(k);
            expected.sort_unstable();
            prop_assert_eq!(select_largest(&delta, k), expected);
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
