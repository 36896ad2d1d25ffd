//! The differentially private upload: selection by the sparse vector
//! technique and noisy release of the selected changes.
//!
//! Privacy unit: one participant's whole training set. One call spends
//! `epsilon`, split as `eps1 = 8/9 * epsilon` for the selection and
//! `eps2 = 2/9 * epsilon` for the release. With `c = ceil(theta_u * n)`
//! selections at most, sensitivity `2 * gamma` per value after bounding, and
//! `sigma(x) = 2 * c * (2 * gamma) / x`:
//!
//! - the threshold noise `rho` has scale `sigma(eps1)` and is drawn again
//!   after every selection;
//! - each examined index gets fresh comparison noise `nu` of scale
//!   `2 * sigma(eps1)`; the index is selected when
//!   `|bounded change| + nu >= tau + rho`;
//! - each selected change is released as `bounded change + Lap(sigma(eps2))`
//!   with noise drawn for the release alone, then clipped to
//!   `[-gamma, gamma]` (post-processing);
//! - indices are visited in a uniformly random order, each at most once,
//!   and the loop stops after `c` selections.
//!
//! The selection costs `eps1` by the sparse vector argument for `c` positive
//! answers, and the `c` releases `c * eps2 / (2 * c) = eps2 / 2`, so the
//! upload costs `eps1 + eps2 / 2 = epsilon`.
//!
//! # Fixed grid
//!
//! All arithmetic is on integers: a bounded change `x` in `[-gamma, gamma]`
//! becomes `round(x / step)` with `step = gamma / 2^16`, so `gamma` itself is
//! exactly 2^16 steps and a bounded value moves by at most 2^17 steps when
//! the data changes. Noise is the exact discrete Laplace of
//! [`super::noise`], with every scale rounded up to a whole number of steps;
//! rounding up only adds noise, so the spend stays at most `epsilon`. The
//! sparse vector argument carries over to the integer grid unchanged: it
//! only uses that shifting a Laplace draw by `d` changes its probability by
//! at most a factor `exp(|d| / scale)`, which holds for the discrete Laplace
//! distribution at integer shifts, and every shift here is a whole number of
//! steps.
//!
//! The scales in steps do not depend on `gamma`:
//! `sigma(x) / step = 2^18 * c / x`.

use super::noise::{DiscreteLaplace, MAX_SCALE, NoiseError};
use rand::RngCore;

/// Grid steps per `gamma`.
pub const STEPS_PER_GAMMA: i64 = 1 << 16;

/// Settings of one private upload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrivateUpload {
    /// Privacy spent by this upload (per local epoch).
    pub epsilon: f64,
    /// Most changes released: `ceil(theta_u * n)`.
    pub c: usize,
    /// Bound: changes are clipped to `[-gamma, gamma]` before any noise.
    pub gamma: f64,
    /// Threshold of the selection.
    pub tau: f64,
}

/// Noise scales of one private upload, in grid steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scales {
    /// Threshold noise `rho`: `sigma(eps1)`.
    pub threshold: u64,
    /// Comparison noise `nu`: `2 * sigma(eps1)`.
    pub comparison: u64,
    /// Release noise: `sigma(eps2)`.
    pub release: u64,
}

/// Invalid settings of a private upload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// `epsilon` is not a positive finite number.
    #[error("invalid epsilon {0}: expected a positive finite number")]
    Epsilon(f64),
    /// `gamma` is not a positive finite number.
    #[error("invalid gamma {0}: expected a positive finite number")]
    Gamma(f64),
    /// `tau` is negative or not finite.
    #[error("invalid tau {0}: expected a finite number of at least 0")]
    Tau(f64),
    /// Nothing to select.
    #[error("invalid upload count c = 0: expected at least one parameter to upload")]
    EmptyUpload,
    /// The noise would be too large to sample exactly.
    #[error(
        "epsilon {epsilon} is too small for {c} uploaded parameters: the noise scale would exceed \
         2^62 grid steps; raise epsilon or lower theta-u"
    )]
    ScaleOverflow {
        /// The per-epoch epsilon.
        epsilon: f64,
        /// The upload count.
        c: usize,
    },
    /// The noise source failed.
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// Result of one private upload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Release {
    /// Selected indices in increasing order.
    pub indices: Vec<u32>,
    /// Noisy bounded changes, in the order of `indices`.
    pub values: Vec<f32>,
    /// Indices examined before the loop stopped.
    pub examined: usize,
}

impl PrivateUpload {
    /// Checks the settings and returns the noise scales in grid steps.
    pub fn scales(&self) -> Result<Scales, PrivacyError> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(PrivacyError::Epsilon(self.epsilon));
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            return Err(PrivacyError::Gamma(self.gamma));
        }
        if !(self.tau.is_finite() && self.tau >= 0.0) {
            return Err(PrivacyError::Tau(self.tau));
        }
        if self.c == 0 {
            return Err(PrivacyError::EmptyUpload);
        }
        let eps1 = self.epsilon * 8.0 / 9.0;
        let eps2 = self.epsilon * 2.0 / 9.0;
        let steps = |x: f64| -> Result<u64, PrivacyError> {
            // 2^18 * c / x, rounded up to a whole step. The product and
            // quotient may each round down by half a unit in the last place,
            // so a relative margin of 1e-12 keeps the scale at or above the
            // exact value.
            let exact = (1u64 << 18) as f64 * self.c as f64 / x;
            let scale = (exact * (1.0 + 1e-12)).ceil().max(1.0);
            if scale > (MAX_SCALE / 2) as f64 {
                return Err(PrivacyError::ScaleOverflow {
                    epsilon: self.epsilon,
                    c: self.c,
                });
            }
            Ok(scale as u64)
        };
        let threshold = steps(eps1)?;
        Ok(Scales {
            threshold,
            comparison: 2 * threshold,
            release: steps(eps2)?,
        })
    }

    /// Grid step of this upload: `gamma / 2^16`.
    pub fn step(&self) -> f64 {
        self.gamma / STEPS_PER_GAMMA as f64
    }

    /// Bounds `change` to `[-gamma, gamma]` and rounds it to the grid. A NaN
    /// change counts as 0 (the caller rejects NaN before this point).
    pub fn to_grid(&self, change: f32) -> i64 {
        let bounded = (change as f64).clamp(-self.gamma, self.gamma);
        if bounded.is_nan() {
            return 0;
        }
        // The product with a power of two is exact, and a value of at most
        // gamma divided by gamma is at most 1. The result therefore stays
        // within the grid, and the clamp only makes that explicit.
        let steps = (bounded * STEPS_PER_GAMMA as f64 / self.gamma).round() as i64;
        steps.clamp(-STEPS_PER_GAMMA, STEPS_PER_GAMMA)
    }

    /// Selects and releases at most `c` noisy bounded changes of `delta`.
    pub fn release<R: RngCore>(
        &self,
        delta: &[f32],
        noise: &mut DiscreteLaplace<R>,
    ) -> Result<Release, PrivacyError> {
        let scales = self.scales()?;
        let step = self.step();
        let tau = (self.tau / step).round().min(i64::MAX as f64 / 4.0) as i64;
        let mut order: Vec<u32> = (0..delta.len() as u32).collect();
        let mut selected: Vec<(u32, f32)> = Vec::with_capacity(self.c.min(delta.len()));
        let mut rho = noise.sample(scales.threshold)?;
        let mut examined = 0;
        while examined < delta.len() && selected.len() < self.c {
            let index = noise.next_in_permutation(&mut order, examined)?;
            examined += 1;
            let value = self.to_grid(delta[index as usize]);
            let nu = noise.sample(scales.comparison)?;
            // Sums of at most three values below 2^62 each: no overflow in i128.
            if value.abs() as i128 + nu as i128 >= tau as i128 + rho as i128 {
                let noisy = value as i128 + noise.sample(scales.release)? as i128;
                let released = (noisy as f64 * step).clamp(-self.gamma, self.gamma);
                selected.push((index, released as f32));
                rho = noise.sample(scales.threshold)?;
            }
        }
        selected.sort_unstable_by_key(|&(index, _)| index);
        Ok(Release {
            indices: selected.iter().map(|&(index, _)| index).collect(),
            values: selected.iter().map(|&(_, value)| value).collect(),
            examined,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::select_threshold;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashSet;

    fn upload(epsilon: f64, c: usize) -> PrivateUpload {
        PrivateUpload {
            epsilon,
            c,
            gamma: 0.001,
            tau: 0.0001,
        }
    }

    /// Changes with a range of magnitudes: a tenth of them at 2 gamma, the
    /// rest tiny.
    fn changes(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                if i % 10 == 0 {
                    sign * 0.002
                } else {
                    sign * 1e-6
                }
            })
            .collect()
    }

    #[test]
    fn scales_follow_the_budget_split() {
        let scales = upload(1.0, 10).scales().unwrap();
        // 2^18 * 10 * 9 / 8 = 2,949,120 and 2^18 * 10 * 9 / 2 = 11,796,480.
        // The margin against float rounding adds one step to an exact
        // integer.
        assert_eq!(scales.threshold, 2_949_121);
        assert_eq!(scales.comparison, 5_898_242);
        assert_eq!(scales.release, 11_796_481);
        // Scales are rounded up, never down.
        let odd = upload(7.0, 3).scales().unwrap();
        assert!(odd.threshold as f64 >= (1u64 << 18) as f64 * 3.0 * 9.0 / 56.0);
    }

    #[test]
    fn invalid_settings_name_the_value() {
        assert_eq!(upload(0.0, 1).scales(), Err(PrivacyError::Epsilon(0.0)));
        assert!(matches!(
            upload(f64::NAN, 1).scales(),
            Err(PrivacyError::Epsilon(_))
        ));
        assert_eq!(upload(1.0, 0).scales(), Err(PrivacyError::EmptyUpload));
        let mut bad = upload(1.0, 1);
        bad.gamma = -1.0;
        assert_eq!(bad.scales(), Err(PrivacyError::Gamma(-1.0)));
        bad.gamma = 0.001;
        bad.tau = f64::INFINITY;
        assert!(matches!(bad.scales(), Err(PrivacyError::Tau(_))));
        let error = upload(1e-12, 1_000_000).scales().unwrap_err();
        assert!(error.to_string().contains("too small"), "{error}");
    }

    #[test]
    fn grid_keeps_bounded_values_within_gamma() {
        let u = upload(1.0, 1);
        assert_eq!(u.to_grid(0.001), STEPS_PER_GAMMA);
        assert_eq!(u.to_grid(5.0), STEPS_PER_GAMMA);
        assert_eq!(u.to_grid(-5.0), -STEPS_PER_GAMMA);
        assert_eq!(u.to_grid(0.0), 0);
        assert_eq!(u.to_grid(f32::INFINITY), STEPS_PER_GAMMA);
        assert_eq!(u.to_grid(f32::NAN), 0);
        assert_eq!(u.to_grid(0.0005), STEPS_PER_GAMMA / 2);
    }

    #[test]
    fn never_more_than_c_and_no_index_twice() {
        let delta = changes(5_000);
        let mut noise = DiscreteLaplace::seeded_for_tests(1);
        for (epsilon, c) in [(0.01, 50), (1.0, 50), (1e4, 50), (1.0, 5_000), (1e6, 1)] {
            let release = upload(epsilon, c).release(&delta, &mut noise).unwrap();
            assert!(release.indices.len() <= c, "eps {epsilon}, c {c}");
            let distinct: HashSet<u32> = release.indices.iter().copied().collect();
            assert_eq!(distinct.len(), release.indices.len());
            assert!(release.indices.windows(2).all(|w| w[0] < w[1]));
            assert!(release.examined <= delta.len());
            assert!(release.values.iter().all(|v| v.abs() <= 0.001));
        }
    }

    #[test]
    fn released_values_are_noisy() {
        let delta: Vec<f32> = (0..20_000).map(|i| (i as f32 - 10_000.0) * 1e-7).collect();
        let u = upload(10.0, 2_000);
        let mut noise = DiscreteLaplace::seeded_for_tests(2);
        let release = u.release(&delta, &mut noise).unwrap();
        assert_eq!(release.indices.len(), 2_000);
        let unchanged = release
            .indices
            .iter()
            .zip(&release.values)
            .filter(|&(&i, &v)| {
                let bounded = delta[i as usize].clamp(-0.001, 0.001);
                (v - bounded).abs() < 1e-9
            })
            .count();
        // The release noise has a scale of millions of steps; a draw of 0
        // has probability below 10^-6.
        assert_eq!(unchanged, 0);
    }

    #[test]
    fn a_huge_epsilon_approaches_the_noiseless_threshold_rule() {
        let delta = changes(20_000);
        let u = upload(1e12, 1_000);
        let mut noise = DiscreteLaplace::seeded_for_tests(3);
        let private = u.release(&delta, &mut noise).unwrap();
        let plain = select_threshold(&delta, 1_000, 0.0001, &mut ChaCha8Rng::seed_from_u64(3));
        // Both take only the large changes, which are the multiples of 10.
        assert!(private.indices.iter().all(|i| i % 10 == 0));
        assert!(plain.iter().all(|i| i % 10 == 0));
        assert_eq!(private.indices.len(), plain.len());
        // And release them almost exactly: clipped to gamma.
        for (&i, &v) in private.indices.iter().zip(&private.values) {
            let expected = if i % 2 == 0 { 0.001 } else { -0.001 };
            assert!((v - expected).abs() < 1e-6, "index {i}: {v}");
        }
    }

    #[test]
    fn a_tiny_epsilon_approaches_uniform_selection() {
        let delta = changes(20_000);
        let u = upload(1e-3, 2_000);
        let mut noise = DiscreteLaplace::seeded_for_tests(4);
        let release = u.release(&delta, &mut noise).unwrap();
        let large = release.indices.iter().filter(|&&i| i % 10 == 0).count();
        let share = large as f64 / release.indices.len() as f64;
        // Uniform selection takes a large change one time in ten.
        assert!((share - 0.1).abs() < 0.03, "share of large changes {share}");
        // The released values carry no visible sign of the true ones.
        let agreeing = release
            .indices
            .iter()
            .zip(&release.values)
            .filter(|&(&i, &v)| (v > 0.0) == (i % 2 == 0))
            .count() as f64
            / release.indices.len() as f64;
        assert!((agreeing - 0.5).abs() < 0.05, "sign agreement {agreeing}");
    }

    #[test]
    fn selection_is_monotone_in_epsilon() {
        // A larger budget takes more of the large changes.
        let delta = changes(20_000);
        let share = |epsilon: f64, seed: u64| {
            let u = upload(epsilon, 500);
            let release = u
                .release(&delta, &mut DiscreteLaplace::seeded_for_tests(seed))
                .unwrap();
            release.indices.iter().filter(|&&i| i % 10 == 0).count() as f64
                / release.indices.len().max(1) as f64
        };
        let low = share(500.0 * 0.01, 5);
        let high = share(500.0 * 1000.0, 6);
        assert!(low < 0.2, "share of large changes at eps/c 0.01: {low}");
        assert!(high > 0.9, "share of large changes at eps/c 1000: {high}");
    }

    #[test]
    fn works_with_the_operating_system_source() {
        let delta = changes(1_000);
        let mut noise = DiscreteLaplace::from_os_entropy().unwrap();
        let release = upload(100.0, 10).release(&delta, &mut noise).unwrap();
        assert!(release.indices.len() <= 10);
    }
}
