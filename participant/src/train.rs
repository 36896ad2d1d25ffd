//! Local mini-batch SGD on a participant's shard, and accuracy evaluation.

use rand::Rng;
use rand::seq::SliceRandom;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::data::Dataset;
use crate::model::Model;

/// Settings of a participant's local SGD.
///
/// The learning rate decays with the step count: step `t` (counting from 0)
/// uses `learning_rate / (1 + t * lr_decay)`. Steps count mini-batches over
/// the participant's whole life, so the schedule carries on across epochs
/// and across parameter downloads.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    /// Learning rate at step 0, finite and positive.
    pub learning_rate: f64,
    /// Decay factor of the schedule per step, finite and at least 0. With 0 the rate stays constant.
    pub lr_decay: f64,
    /// Examples per mini-batch. The last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Momentum coefficient in [0, 1), where 0 gives plain SGD.
    pub momentum: f64,
}

impl SgdConfig {
    /// Returns the learning rate that step `step` uses.
    pub fn learning_rate_at(&self, step: u64) -> f64 {
        self.learning_rate / (1.0 + step as f64 * self.lr_decay)
    }

    fn validate(&self) -> Result<(), TrainError> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(TrainError::InvalidLearningRate(self.learning_rate));
        }
        if !(self.lr_decay.is_finite() && self.lr_decay >= 0.0) {
            return Err(TrainError::InvalidLrDecay(self.lr_decay));
        }
        if self.batch_size == 0 {
            return Err(TrainError::InvalidBatchSize);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(TrainError::InvalidMomentum(self.momentum));
        }
        Ok(())
    }
}

/// Errors from local training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The learning rate is not finite and positive.
    #[error("invalid learning rate {0}: it must be finite and greater than 0")]
    InvalidLearningRate(f64),
    /// The decay is negative or not finite.
    #[error("invalid learning-rate decay {0}: it must be finite and at least 0")]
    InvalidLrDecay(f64),
    /// The batch size is 0.
    #[error("invalid batch size 0: a mini-batch needs at least one example")]
    InvalidBatchSize,
    /// The momentum is outside [0, 1).
    #[error("invalid momentum {0}: it must be at least 0 and less than 1")]
    InvalidMomentum(f64),
    /// The shard has no examples.
    #[error("the training data is empty: an epoch needs at least one example")]
    EmptyDataset,
    /// A mini-batch loss became NaN or infinite.
    #[error(
        "training diverged at step {step}: loss is {loss} at learning rate {learning_rate}; lower the learning rate"
    )]
    Diverged {
        /// Step count at the failing mini-batch.
        step: u64,
        /// The non-finite loss.
        loss: f64,
        /// Learning rate of that step.
        learning_rate: f64,
    },
    /// libtorch reported an error.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// A participant's optimizer state: SGD with momentum over one model's
/// variables, plus the step count of the learning-rate schedule.
///
/// The optimizer keeps references to the model's variables, so the model
/// passed to [`LocalTrainer::train_epoch`] must be the one the trainer was
/// built from. Momentum buffers persist across epochs and across
/// [`Model::set_flat_parameters`] and [`Model::overwrite_parameters`], which
/// update the variables in place.
pub struct LocalTrainer {
    config: SgdConfig,
    step: u64,
    optimizer: nn::Optimizer,
}

impl std::fmt::Debug for LocalTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTrainer")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl LocalTrainer {
    /// Builds an SGD optimizer (no weight decay, no dampening, no Nesterov)
    /// over the variables of `model`.
    pub fn new(model: &Model, config: SgdConfig) -> Result<LocalTrainer, TrainError> {
        config.validate()?;
        let optimizer = nn::Sgd {
            momentum: config.momentum,
            ..Default::default()
        }
        .build(&model.vs, config.learning_rate)?;
        Ok(LocalTrainer {
            config,
            step: 0,
            optimizer,
        })
    }

    /// Returns the settings this trainer was built with.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// Returns the number of optimisation steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Runs one epoch over `data` and returns the mean loss per example.
    ///
    /// The example order is a shuffle drawn from `rng`, so runs are
    /// reproducible from the caller's seed. Every example is used once,
    /// including those in a last, smaller mini-batch. Stops with
    /// [`TrainError::Diverged`] before applying a step whose loss is not
    /// finite.
    pub fn train_epoch(
        &mut self,
        model: &Model,
        data: &Dataset,
        rng: &mut impl Rng,
    ) -> Result<f64, TrainError> {
        if data.is_empty() {
            return Err(TrainError::EmptyDataset);
        }
        let mut order: Vec<i64> = (0..data.len() as i64).collect();
        order.shuffle(rng);

        let data_device = data.labels.device();
        let model_device = model.device();
        let mut loss_sum = 0.0;
        for batch in order.chunks(self.config.batch_size) {
            let positions = Tensor::f_from_slice(batch)?.f_to_device(data_device)?;
            let images = data
                .images
                .f_index_select(0, &positions)?
                .f_to_device(model_device)?;
            let labels = data
                .labels
                .f_index_select(0, &positions)?
                .f_to_device(model_device)?;

            let learning_rate = self.config.learning_rate_at(self.step);
            self.optimizer.set_lr(learning_rate);
            let loss = model.forward_t(&images, true).f_nll_loss::<Tensor>(
                &labels,
                None,
                tch::Reduction::Mean,
                -100,
            )?;
            let loss_value = loss.f_double_value(&[])?;
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    step: self.step,
                    loss: loss_value,
                    learning_rate,
                });
            }
            self.optimizer.backward_step(&loss);
            loss_sum += loss_value * batch.len() as f64;
            self.step += 1;
        }
        Ok(loss_sum / data.len() as f64)
    }
}

/// Returns the fraction of `data` that `model` classifies correctly, in [0, 1].
///
/// Runs without gradients in batches of `batch_size` examples. An empty
/// dataset gives 0.
///
/// # Panics
///
/// Panics if `batch_size` is 0.
pub fn evaluate(model: &Model, data: &Dataset, batch_size: usize) -> f64 {
    assert!(batch_size > 0, "evaluation batch size must be at least 1");
    let total = data.len() as i64;
    if total == 0 {
        return 0.0;
    }
    let device = model.device();
    tch::no_grad(|| {
        let mut correct = 0;
        let mut start = 0;
        while start < total {
            let len = (batch_size as i64).min(total - start);
            let images = data.images.narrow(0, start, len).to_device(device);
            let labels = data.labels.narrow(0, start, len).to_device(device);
            let predictions = model.forward_t(&images, false).argmax(-1, false);
            correct += predictions
                .eq_tensor(&labels)
                .sum(Kind::Int64)
                .int64_value(&[]);
            start += len;
        }
        correct as f64 / total as f64
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use tch::Device;

    use super::*;
    use crate::data::{load_mnist, test_mnist_dir};
    use crate::model::ModelKind;

    fn config(learning_rate: f64) -> SgdConfig {
        SgdConfig {
            learning_rate,
            lr_decay: 0.0,
            batch_size: 32,
            momentum: 0.0,
        }
    }

    /// Random images with random labels, for tests that need no real data.
    ///
    /// Drawn from ChaCha rather than libtorch's global generator, which
    /// `Model::new` on other test threads reseeds.
    fn noise(count: usize) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(count as u64);
        let pixels: Vec<f32> = (0..count * 784)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let labels: Vec<i64> = (0..count).map(|_| rng.random_range(0..10)).collect();
        Dataset {
            images: Tensor::from_slice(&pixels).view([count as i64, 1, 28, 28]),
            labels: Tensor::from_slice(&labels),
        }
    }

    #[test]
    fn mlp_learns_mnist_subset() {
        let mnist = load_mnist(&test_mnist_dir()).unwrap();
        let indices: Vec<usize> = (0..2000).collect();
        let shard = mnist.train.subset(&indices);
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 7);
        let mut trainer = LocalTrainer::new(&model, config(0.05)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);

        let first_loss = trainer.train_epoch(&model, &shard, &mut rng).unwrap();
        trainer.train_epoch(&model, &shard, &mut rng).unwrap();
        let last_loss = trainer.train_epoch(&model, &shard, &mut rng).unwrap();

        let accuracy = evaluate(&model, &mnist.test, 1000);
        assert!(accuracy > 0.80, "test accuracy {accuracy}");
        assert!(
            last_loss < first_loss,
            "loss went from {first_loss} to {last_loss}"
        );
    }

    #[test]
    fn untrained_model_is_near_chance() {
        let mnist = load_mnist(&test_mnist_dir()).unwrap();
        for kind in [ModelKind::Mlp, ModelKind::Cnn] {
            let model = Model::new(kind, Device::Cpu, 11);
            let accuracy = evaluate(&model, &mnist.test, 1000);
            assert!(accuracy < 0.3, "{kind:?} accuracy {accuracy}");
        }
    }

    #[test]
    fn huge_learning_rate_diverges() {
        let data = noise(256);
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        let mut trainer = LocalTrainer::new(&model, config(1e6)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);

        let mut outcome = Ok(0.0);
        for _ in 0..5 {
            outcome = trainer.train_epoch(&model, &data, &mut rng);
            if outcome.is_err() {
                break;
            }
        }
        let error = outcome.unwrap_err();
        assert!(matches!(error, TrainError::Diverged { .. }), "{error}");
        assert!(
            error.to_string().contains("lower the learning rate"),
            "{error}"
        );
    }

    #[test]
    fn steps_count_across_epochs() {
        let data = noise(100);
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        let mut trainer = LocalTrainer::new(&model, config(0.01)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        trainer.train_epoch(&model, &data, &mut rng).unwrap();
        // 100 examples in batches of 32 is 4 batches, the last one of 4 examples.
        assert_eq!(trainer.step(), 4);
        trainer.train_epoch(&model, &data, &mut rng).unwrap();
        assert_eq!(trainer.step(), 8);
    }

    #[test]
    fn learning_rate_decays_per_step() {
        let schedule = SgdConfig {
            lr_decay: 0.5,
            ..config(0.1)
        };
        assert_eq!(schedule.learning_rate_at(0), 0.1);
        assert!((schedule.learning_rate_at(2) - 0.05).abs() < 1e-12);
        assert!((schedule.learning_rate_at(8) - 0.02).abs() < 1e-12);
    }

    #[test]
    fn same_seeds_train_identically() {
        let data = noise(64);
        let mut results = Vec::new();
        for _ in 0..2 {
            let model = Model::new(ModelKind::Cnn, Device::Cpu, 3);
            let mut trainer = LocalTrainer::new(&model, config(0.01)).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            trainer.train_epoch(&model, &data, &mut rng).unwrap();
            results.push(model.flat_parameters());
        }
        assert_eq!(results[0], results[1]);
    }

    #[test]
    fn training_continues_after_parameter_set() {
        let data = noise(64);
        let mut model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        let momentum = SgdConfig {
            momentum: 0.9,
            ..config(0.01)
        };
        let mut trainer = LocalTrainer::new(&model, momentum).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        trainer.train_epoch(&model, &data, &mut rng).unwrap();

        let downloaded = Model::new(ModelKind::Mlp, Device::Cpu, 2).flat_parameters();
        model.set_flat_parameters(&downloaded).unwrap();
        model.overwrite_parameters(&[0, 5], &[0.25, -0.25]).unwrap();
        let before = model.flat_parameters();
        trainer.train_epoch(&model, &data, &mut rng).unwrap();
        let after = model.flat_parameters();

        // A trainer left holding replaced tensors would move none of these.
        let changed = before
            .iter()
            .zip(&after)
            .filter(|(old, new)| old != new)
            .count();
        assert!(
            changed > before.len() / 2,
            "only {changed} parameters moved"
        );
    }

    #[test]
    fn invalid_config_is_rejected() {
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        let cases = [
            (
                SgdConfig {
                    learning_rate: 0.0,
                    ..config(0.1)
                },
                "learning rate",
            ),
            (
                SgdConfig {
                    learning_rate: f64::NAN,
                    ..config(0.1)
                },
                "learning rate",
            ),
            (
                SgdConfig {
                    lr_decay: -1.0,
                    ..config(0.1)
                },
                "decay",
            ),
            (
                SgdConfig {
                    batch_size: 0,
                    ..config(0.1)
                },
                "batch size",
            ),
            (
                SgdConfig {
                    momentum: 1.0,
                    ..config(0.1)
                },
                "momentum",
            ),
        ];
        for (bad, expected) in cases {
            let error = LocalTrainer::new(&model, bad).unwrap_err();
            assert!(error.to_string().contains(expected), "{bad:?}: {error}");
        }
    }

    #[test]
    fn empty_shard_is_rejected() {
        let data = noise(0);
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        let mut trainer = LocalTrainer::new(&model, config(0.01)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let error = trainer.train_epoch(&model, &data, &mut rng).unwrap_err();
        assert!(matches!(error, TrainError::EmptyDataset), "{error}");
        assert_eq!(evaluate(&model, &data, 10), 0.0);
    }

    #[test]
    fn evaluate_counts_partial_batches() {
        let data = noise(25);
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        let whole = evaluate(&model, &data, 1000);
        let batched = evaluate(&model, &data, 7);
        assert_eq!(whole, batched);
    }
}
