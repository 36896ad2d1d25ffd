//! The two MNIST networks, the SVHN network and their parameters as one
//! flat vector.
//!
//! DSSGD exchanges parameters by their position in a flat vector, so every
//! participant must flatten in the same order: all variables sorted by their
//! var-store name (for example `fc1.bias` before `fc1.weight`), each variable
//! in row-major order.

use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::data::DatasetKind;

/// Network architecture that a run trains.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Multilayer perceptron: 784-128-64-10 with ReLU, 109,386 parameters.
    Mlp,
    /// Convolutional network: two 5x5 convolutions with tanh and max-pooling,
    /// then 256-200-10, 105,506 parameters.
    Cnn,
    /// Convolutional network for SVHN: two blocks of a 5x5 convolution with
    /// 64 maps, tanh, L2 pooling and subtractive normalisation, then
    /// 1600-128-10, 313,546 parameters.
    #[serde(rename = "svhn-cnn")]
    SvhnCnn,
}

impl ModelKind {
    /// Returns the lowercase name used on the command line and in layout hashes.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::SvhnCnn => "svhn-cnn",
        }
    }

    /// Returns the dataset whose images the network takes as input.
    pub fn dataset(self) -> DatasetKind {
        match self {
            ModelKind::Mlp | ModelKind::Cnn => DatasetKind::Mnist,
            ModelKind::SvhnCnn => DatasetKind::Svhn,
        }
    }
}

/// Errors from setting parameters through the flat vector.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A full parameter vector has the wrong length.
    #[error(
        "invalid parameter vector of length {actual}: the {model} model has {expected} parameters"
    )]
    LengthMismatch {
        /// Model name.
        model: &'static str,
        /// Parameter count of the model.
        expected: usize,
        /// Length supplied.
        actual: usize,
    },

    /// Index and value lists of a partial update differ in length.
    #[error("{indices} indices but {values} values: a parameter update needs one value per index")]
    IndexValueMismatch {
        /// Number of indices.
        indices: usize,
        /// Number of values.
        values: usize,
    },

    /// A parameter index is not below the parameter count.
    #[error("parameter index {index} is out of range: the {model} model has {count} parameters")]
    IndexOutOfRange {
        /// Model name.
        model: &'static str,
        /// Offending index.
        index: u32,
        /// Parameter count of the model.
        count: usize,
    },

    /// Parameter indices are not strictly ascending.
    #[error(
        "parameter index {index} at position {position} follows {previous}: indices must be strictly ascending"
    )]
    IndicesNotAscending {
        /// Position of the offending index in the list.
        position: usize,
        /// Index before it.
        previous: u32,
        /// Offending index.
        index: u32,
    },

    /// libtorch reported an error.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Builds the layers of `kind` under `root`, ending in log-softmax.
fn build_net(kind: ModelKind, root: &nn::Path<'_>) -> nn::Sequential {
    let net = match kind {
        ModelKind::Mlp => nn::seq()
            .add_fn(|xs| xs.flatten(1, -1))
            .add(nn::linear(root / "fc1", 784, 128, Default::default()))
            .add_fn(Tensor::relu)
            .add(nn::linear(root / "fc2", 128, 64, Default::default()))
            .add_fn(Tensor::relu)
            .add(nn::linear(root / "fc3", 64, 10, Default::default())),
        // 28x28 -> conv 24x24 -> pool 8x8 -> conv 4x4 -> pool 2x2, so 64 * 2 * 2 = 256 features.
        // tanh is increasing, so max-pooling before it gives the same values
        // and gradients as after it, while tanh runs on 9 (then 4) times
        // fewer elements: a local epoch takes about a quarter less time.
        ModelKind::Cnn => nn::seq()
            .add(nn::conv2d(root / "conv1", 1, 32, 5, Default::default()))
            .add_fn(|xs| xs.max_pool2d([3, 3], [3, 3], [0, 0], [1, 1], false))
            .add_fn(Tensor::tanh)
            .add(nn::conv2d(root / "conv2", 32, 64, 5, Default::default()))
            .add_fn(|xs| xs.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false))
            .add_fn(Tensor::tanh)
            .add_fn(|xs| xs.flatten(1, -1))
            .add(nn::linear(root / "fc1", 256, 200, Default::default()))
            .add_fn(Tensor::tanh)
            .add(nn::linear(root / "fc2", 200, 10, Default::default())),
        // 32x32 -> conv 28x28 -> pool 14x14 -> conv 10x10 -> pool 5x5, so 64 * 5 * 5 = 1600 features.
        ModelKind::SvhnCnn => {
            let window = gaussian_window(NORMALISATION_WINDOW, NORMALISATION_SIGMA);
            let second_window = window.clone();
            nn::seq()
                .add(nn::conv2d(root / "conv1", 3, 64, 5, Default::default()))
                .add_fn(Tensor::tanh)
                .add_fn(l2_pool)
                .add_fn(move |xs| subtractive_normalisation(xs, &window))
                .add(nn::conv2d(root / "conv2", 64, 64, 5, Default::default()))
                .add_fn(Tensor::tanh)
                .add_fn(l2_pool)
                .add_fn(move |xs| subtractive_normalisation(xs, &second_window))
                .add_fn(|xs| xs.flatten(1, -1))
                .add(nn::linear(root / "fc1", 1600, 128, Default::default()))
                .add_fn(Tensor::tanh)
                .add(nn::linear(root / "fc2", 128, 10, Default::default()))
        }
    };
    net.add_fn(|xs| xs.log_softmax(-1, Kind::Float))
}

/// Added to the mean of squares before the square root of [`l2_pool`]: the
/// square root has an infinite derivative at 0, so a window of zeros would
/// otherwise give NaN gradients.
const L2_POOL_EPSILON: f64 = 1e-6;

/// L2 pooling over non-overlapping 2x2 windows: the square root of the mean
/// of the four squares. The mean rather than the sum keeps the output in the
/// range of the input (tanh outputs in [-1, 1] pool to [0, 1]) whatever the
/// window size, as max pooling does.
fn l2_pool(xs: &Tensor) -> Tensor {
    (xs.square()
        .avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)
        + L2_POOL_EPSILON)
        .sqrt()
}

/// Side of the Gaussian window of the subtractive normalisation, in pixels.
/// NOTE: the side and [`NORMALISATION_SIGMA`] are a choice, not tuned on
/// SVHN. A 5x5 window spans the whole 5x5 map of the second block.
const NORMALISATION_WINDOW: i64 = 5;

/// Standard deviation of that window, in pixels.
const NORMALISATION_SIGMA: f64 = 1.0;

/// Returns a `side` x `side` Gaussian window of standard deviation `sigma`,
/// in row-major order, with weights that sum to 1.
fn gaussian_window(side: i64, sigma: f64) -> Vec<f32> {
    let centre = (side - 1) as f64 / 2.0;
    let weights: Vec<f64> = (0..side * side)
        .map(|index| {
            let row = (index / side) as f64 - centre;
            let column = (index % side) as f64 - centre;
            (-(row * row + column * column) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .map(|weight| (weight / total) as f32)
        .collect()
}

/// Subtractive normalisation, the subtractive step of the local contrast
/// normalisation in Jarrett et al., "What is the best multi-stage
/// architecture for object recognition?" (ICCV 2009). It subtracts from every
/// value the Gaussian-weighted mean of its neighbourhood, taken over all
/// feature maps at once.
///
/// The maps are averaged, then convolved with `window` under zero padding.
/// Near the border part of the window lies outside the image, so the result
/// is divided by the window weight that lies inside. The subtracted value is
/// then a weighted mean of real values everywhere. The layer has no
/// parameters, so the flat parameter vector contains only learned weights.
fn subtractive_normalisation(xs: &Tensor, window: &[f32]) -> Tensor {
    let side = NORMALISATION_WINDOW;
    let padding = side / 2;
    let kernel = Tensor::from_slice(window)
        .view([1, 1, side, side])
        .to_kind(xs.kind())
        .to_device(xs.device());
    let size = xs.size();
    let (height, width) = (size[2], size[3]);

    let maps_mean = xs.mean_dim([1i64].as_slice(), true, xs.kind());
    let weighted = maps_mean.conv2d(
        &kernel,
        None::<Tensor>,
        [1, 1],
        [padding, padding],
        [1, 1],
        1,
    );
    let inside = Tensor::ones([1, 1, height, width], (xs.kind(), xs.device())).conv2d(
        &kernel,
        None::<Tensor>,
        [1, 1],
        [padding, padding],
        [1, 1],
        1,
    );
    xs - weighted / inside
}

/// `tch::manual_seed` seeds one process-wide generator, so two models built
/// at once on different threads would interleave their draws.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// A network with its variables and a fixed flattening order.
///
/// The variables keep their identity for the model's whole life: the
/// parameter setters copy into them in place, so an optimizer built on
/// [`Model::vs`] keeps updating the same tensors.
#[derive(Debug)]
pub struct Model {
    /// Network architecture.
    pub kind: ModelKind,
    /// Store of the trainable variables, for building optimizers.
    pub vs: nn::VarStore,
    net: nn::Sequential,
    /// Variables sorted by name, sharing storage with `vs`.
    parameters: Vec<(String, Tensor)>,
    parameter_count: usize,
}

impl Model {
    /// Builds a network with PyTorch's default initialisation drawn after
    /// `tch::manual_seed(seed)`.
    ///
    /// The variables are drawn on the CPU and then moved to `device`, so the
    /// same kind and seed give identical initial parameters in every process
    /// and on every device.
    pub fn new(kind: ModelKind, device: Device, seed: i64) -> Model {
        let (mut vs, net) = {
            let _guard = INIT_LOCK
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = build_net(kind, &vs.root());
            (vs, net)
        };
        vs.set_device(device);

        let mut parameters: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        parameters.sort_by(|(a, _), (b, _)| a.cmp(b));
        let parameter_count = parameters.iter().map(|(_, tensor)| tensor.numel()).sum();
        Model {
            kind,
            vs,
            net,
            parameters,
            parameter_count,
        }
    }

    /// Returns the device where the variables are stored.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Runs the network on `xs` (`[B, 1, 28, 28]` f32 for the MNIST models,
    /// `[B, 3, 32, 32]` for `svhn-cnn`) and returns log-probabilities `[B, 10]`.
    ///
    /// `train` exists for the usual `forward_t` signature and changes nothing,
    /// because no network has dropout or batch normalisation.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let _ = train;
        self.net.forward(xs)
    }

    /// Returns the total number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameter_count
    }

    /// Returns the variable names and shapes in flattening order.
    pub fn layout(&self) -> Vec<(String, Vec<i64>)> {
        self.parameters
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.size()))
            .collect()
    }

    /// Returns a 16-hex-digit fingerprint of the flattening order.
    ///
    /// It is the first 8 bytes of SHA-256 over the model name and a newline,
    /// then one line `name:d0xd1x...\n` per variable in flattening order (for
    /// example `fc1.weight:128x784\n`). Two processes that agree on it agree
    /// on what every flat index means.
    pub fn layout_hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.kind.name().as_bytes());
        hasher.update(b"\n");
        for (name, shape) in self.layout() {
            let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
            hasher.update(format!("{name}:{}\n", dims.join("x")).as_bytes());
        }
        hasher.finalize()[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// Copies all parameters into one vector in flattening order.
    pub fn flat_parameters(&self) -> Vec<f32> {
        tch::no_grad(|| {
            let views: Vec<Tensor> = self
                .parameters
                .iter()
                .map(|(_, tensor)| tensor.view([-1]))
                .collect();
            let flat = Tensor::cat(&views, 0).to_device(Device::Cpu);
            Vec::<f32>::try_from(&flat).expect("parameters are f32 and the concatenation is 1-D")
        })
    }

    /// Sets every parameter from a vector in flattening order.
    ///
    /// The length must equal [`Model::parameter_count`].
    pub fn set_flat_parameters(&mut self, values: &[f32]) -> Result<(), ModelError> {
        if values.len() != self.parameter_count {
            return Err(ModelError::LengthMismatch {
                model: self.kind.name(),
                expected: self.parameter_count,
                actual: values.len(),
            });
        }
        let source = Tensor::f_from_slice(values)?.f_to_device(self.device())?;
        tch::no_grad(|| {
            let mut offset = 0;
            for (_, tensor) in &mut self.parameters {
                let numel = tensor.numel() as i64;
                let part = source
                    .f_narrow(0, offset, numel)?
                    .f_view(tensor.size().as_slice())?;
                tensor.f_copy_(&part)?;
                offset += numel;
            }
            Ok::<(), ModelError>(())
        })
    }

    /// Sets the parameters at the given flat indices and leaves all others unchanged.
    ///
    /// `indices` must be strictly ascending and below [`Model::parameter_count`],
    /// with one value per index.
    pub fn overwrite_parameters(
        &mut self,
        indices: &[u32],
        values: &[f32],
    ) -> Result<(), ModelError> {
        self.check_indices(indices, values.len())?;
        let device = self.device();
        tch::no_grad(|| {
            let mut start = 0;
            let mut offset = 0u64;
            for (_, tensor) in &mut self.parameters {
                let numel = tensor.numel() as u64;
                let end = offset + numel;
                // Indices are sorted, so this variable's indices are the next run below `end`.
                let run = indices[start..].partition_point(|&index| u64::from(index) < end);
                if run > 0 {
                    let local: Vec<i64> = indices[start..start + run]
                        .iter()
                        .map(|&index| (u64::from(index) - offset) as i64)
                        .collect();
                    let local = Tensor::f_from_slice(&local)?.f_to_device(device)?;
                    let part =
                        Tensor::f_from_slice(&values[start..start + run])?.f_to_device(device)?;
                    let mut flat = tensor.f_view([-1])?;
                    let _ = flat.f_index_copy_(0, &local, &part)?;
                    start += run;
                }
                offset = end;
            }
            Ok::<(), ModelError>(())
        })
    }

    fn check_indices(&self, indices: &[u32], value_count: usize) -> Result<(), ModelError> {
        if indices.len() != value_count {
            return Err(ModelError::IndexValueMismatch {
                indices: indices.len(),
                values: value_count,
            });
        }
        for (position, pair) in indices.windows(2).enumerate() {
            if pair[1] <= pair[0] {
                return Err(ModelError::IndicesNotAscending {
                    position: position + 1,
                    previous: pair[0],
                    index: pair[1],
                });
            }
        }
        if let Some(&last) = indices.last()
            && last as usize >= self.parameter_count
        {
            return Err(ModelError::IndexOutOfRange {
                model: self.kind.name(),
                index: last,
                count: self.parameter_count,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_has_109386_parameters() {
        let model = Model::new(ModelKind::Mlp, Device::Cpu, 1);
        assert_eq!(model.parameter_count(), 109_386);
        assert_eq!(model.flat_parameters().len(), 109_386);
    }

    #[test]
    fn cnn_has_105506_parameters() {
        let model = Model::new(ModelKind::Cnn, Device::Cpu, 1);
        assert_eq!(model.parameter_count(), 105_506);
        assert_eq!(model.flat_parameters().len(), 105_506);
    }

    #[test]
    fn svhn_cnn_has_313546_parameters() {
        let model = Model::new(ModelKind::SvhnCnn, Device::Cpu, 1);
        // conv1 3*64*25 + 64, conv2 64*64*25 + 64, fc1 1600*128 + 128, fc2 128*10 + 10.
        assert_eq!(model.parameter_count(), 313_546);
        assert_eq!(model.flat_parameters().len(), 313_546);
        let layout = model.layout();
        assert_eq!(layout[1], ("conv1.weight".to_string(), vec![64, 3, 5, 5]));
        assert_eq!(layout[3], ("conv2.weight".to_string(), vec![64, 64, 5, 5]));
        assert_eq!(layout[5], ("fc1.weight".to_string(), vec![128, 1600]));
        assert_eq!(layout[7], ("fc2.weight".to_string(), vec![10, 128]));
    }

    #[test]
    fn gaussian_window_sums_to_one() {
        let window = gaussian_window(NORMALISATION_WINDOW, NORMALISATION_SIGMA);
        assert_eq!(window.len(), 25);
        let total: f32 = window.iter().sum();
        assert!((total - 1.0).abs() < 1e-6, "sum {total}");
        // The centre weighs most, and the window is symmetric.
        let centre = window[12];
        assert!(window.iter().all(|&weight| weight <= centre));
        assert_eq!(window[0], window[24]);
        assert_eq!(window[2], window[10]);
    }

    #[test]
    fn subtractive_normalisation_removes_constant() {
        let window = gaussian_window(NORMALISATION_WINDOW, NORMALISATION_SIGMA);
        let xs = Tensor::full([2, 4, 6, 6], 0.7, (Kind::Float, Device::Cpu));
        let output = subtractive_normalisation(&xs, &window);
        assert_eq!(output.size(), [2, 4, 6, 6]);
        // Without the border correction the border would keep part of 0.7.
        let max_error = output.abs().max().double_value(&[]);
        assert!(max_error < 1e-6, "largest value {max_error}");
    }

    #[test]
    fn subtractive_normalisation_averages_maps() {
        let window = gaussian_window(NORMALISATION_WINDOW, NORMALISATION_SIGMA);
        // Maps of 1 and -1 have a mean of 0 everywhere, so nothing is subtracted.
        let xs = Tensor::cat(
            &[
                Tensor::ones([1, 1, 5, 5], (Kind::Float, Device::Cpu)),
                -Tensor::ones([1, 1, 5, 5], (Kind::Float, Device::Cpu)),
            ],
            1,
        );
        let output = subtractive_normalisation(&xs, &window);
        let max_error = (output - &xs).abs().max().double_value(&[]);
        assert!(max_error < 1e-6, "changed by {max_error}");
    }

    #[test]
    fn l2_pool_takes_root_mean_square() {
        let xs = Tensor::from_slice(&[3.0f32, -4.0, 0.0, 0.0]).view([1, 1, 2, 2]);
        let pooled = l2_pool(&xs);
        assert_eq!(pooled.size(), [1, 1, 1, 1]);
        // sqrt((9 + 16 + 0 + 0) / 4) = 2.5
        let value = pooled.double_value(&[0, 0, 0, 0]);
        assert!((value - 2.5).abs() < 1e-5, "pooled {value}");
        let zeros = l2_pool(&Tensor::zeros([1, 1, 2, 2], (Kind::Float, Device::Cpu)));
        assert!(zeros.double_value(&[0, 0, 0, 0]).is_finite());
    }

    #[test]
    fn layout_is_sorted_by_name() {
        let model = Model::new(ModelKind::Cnn, Device::Cpu, 1);
        let layout = model.layout();
        let names: Vec<&str> = layout.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1.bias",
                "conv1.weight",
                "conv2.bias",
                "conv2.weight",
                "fc1.bias",
                "fc1.weight",
                "fc2.bias",
                "fc2.weight"
            ]
        );
        assert_eq!(layout[1].1, [32, 1, 5, 5]);
        assert_eq!(layout[5].1, [200, 256]);
    }

    #[test]
    fn same_seed_gives_same_parameters() {
        for kind in [ModelKind::Mlp, ModelKind::Cnn, ModelKind::SvhnCnn] {
            let first = Model::new(kind, Device::Cpu, 42).flat_parameters();
            let second = Model::new(kind, Device::Cpu, 42).flat_parameters();
            assert_eq!(first, second, "{kind:?}");
        }
    }

    #[test]
    fn different_seed_gives_different_parameters() {
        let first = Model::new(ModelKind::Mlp, Device::Cpu, 1).flat_parameters();
        let second = Model::new(ModelKind::Mlp, Device::Cpu, 2).flat_parameters();
        assert_ne!(first, second);
    }

    #[test]
    fn flat_parameters_round_trip() {
        let mut model = Model::new(ModelKind::Cnn, Device::Cpu, 3);
        let values: Vec<f32> = (0..model.parameter_count())
            .map(|i| i as f32 * 1e-3)
            .collect();
        model.set_flat_parameters(&values).unwrap();
        assert_eq!(model.flat_parameters(), values);
        // conv1.bias comes first in flattening order, so its element 1 is values[1].
        let bias = model.vs.variables()["conv1.bias"].shallow_clone();
        assert_eq!(bias.double_value(&[1]) as f32, values[1]);
    }

    #[test]
    fn set_flat_parameters_rejects_wrong_length() {
        let mut model = Model::new(ModelKind::Mlp, Device::Cpu, 3);
        let error = model.set_flat_parameters(&[0.0; 10]).unwrap_err();
        assert!(
            matches!(
                error,
                ModelError::LengthMismatch {
                    expected: 109_386,
                    actual: 10,
                    ..
                }
            ),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains("109386"), "{message}");
        assert!(message.contains("10"), "{message}");
    }

    #[test]
    fn overwrite_changes_only_given_indices() {
        let mut model = Model::new(ModelKind::Mlp, Device::Cpu, 4);
        let before = model.flat_parameters();
        let count = model.parameter_count() as u32;
        // First, last and variable boundaries (fc1.bias has 128 elements).
        let indices = [0, 1, 127, 128, 129, 50_000, count - 1];
        let values = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0];
        model.overwrite_parameters(&indices, &values).unwrap();

        let after = model.flat_parameters();
        for (i, (old, new)) in before.iter().zip(&after).enumerate() {
            match indices.iter().position(|&index| index as usize == i) {
                Some(k) => assert_eq!(*new, values[k], "index {i}"),
                None => assert_eq!(new, old, "index {i} must be unchanged"),
            }
        }
    }

    #[test]
    fn overwrite_rejects_bad_indices() {
        let mut model = Model::new(ModelKind::Mlp, Device::Cpu, 4);
        let before = model.flat_parameters();

        let error = model
            .overwrite_parameters(&[5, 3], &[1.0, 2.0])
            .unwrap_err();
        assert!(
            matches!(
                error,
                ModelError::IndicesNotAscending {
                    position: 1,
                    previous: 5,
                    index: 3
                }
            ),
            "{error}"
        );
        let error = model
            .overwrite_parameters(&[2, 2], &[1.0, 2.0])
            .unwrap_err();
        assert!(
            matches!(error, ModelError::IndicesNotAscending { .. }),
            "{error}"
        );
        let error = model
            .overwrite_parameters(&[1, 109_386], &[1.0, 2.0])
            .unwrap_err();
        assert!(
            matches!(
                error,
                ModelError::IndexOutOfRange {
                    index: 109_386,
                    count: 109_386,
                    ..
                }
            ),
            "{error}"
        );
        let error = model.overwrite_parameters(&[1], &[1.0, 2.0]).unwrap_err();
        assert!(
            matches!(
                error,
                ModelError::IndexValueMismatch {
                    indices: 1,
                    values: 2
                }
            ),
            "{error}"
        );
        assert_eq!(
            model.flat_parameters(),
            before,
            "a rejected update must change nothing"
        );
    }

    #[test]
    fn overwrite_with_no_indices_is_noop() {
        let mut model = Model::new(ModelKind::Cnn, Device::Cpu, 4);
        let before = model.flat_parameters();
        model.overwrite_parameters(&[], &[]).unwrap();
        assert_eq!(model.flat_parameters(), before);
    }

    #[test]
    fn layout_hash_is_stable_per_kind() {
        let mlp = Model::new(ModelKind::Mlp, Device::Cpu, 1).layout_hash();
        let mlp_other_seed = Model::new(ModelKind::Mlp, Device::Cpu, 2).layout_hash();
        let cnn = Model::new(ModelKind::Cnn, Device::Cpu, 1).layout_hash();
        let svhn_cnn = Model::new(ModelKind::SvhnCnn, Device::Cpu, 1).layout_hash();
        assert_eq!(mlp.len(), 16);
        assert!(mlp.chars().all(|c| c.is_ascii_hexdigit()), "{mlp}");
        assert_eq!(mlp, mlp_other_seed);
        assert_ne!(mlp, cnn);
        assert_ne!(cnn, svhn_cnn);
    }

    #[test]
    fn cnn_pooling_before_tanh_matches_the_textbook_order() {
        let model = Model::new(ModelKind::Cnn, Device::Cpu, 5);
        let images = Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu));
        let weights = |name: &str| {
            model
                .parameters
                .iter()
                .find(|(variable, _)| variable == name)
                .map(|(_, tensor)| tensor.shallow_clone())
                .expect("the CNN has this variable")
        };
        // conv, tanh, then pool, as the network is usually written.
        let textbook = tch::no_grad(|| {
            let conv = |xs: &Tensor, layer: &str| {
                xs.conv2d(
                    &weights(&format!("{layer}.weight")),
                    Some(weights(&format!("{layer}.bias"))),
                    [1, 1],
                    [0, 0],
                    [1, 1],
                    1,
                )
            };
            let first =
                conv(&images, "conv1")
                    .tanh()
                    .max_pool2d([3, 3], [3, 3], [0, 0], [1, 1], false);
            let second = conv(&first, "conv2")
                .tanh()
                .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
                .flatten(1, -1);
            let hidden = second
                .linear(&weights("fc1.weight"), Some(weights("fc1.bias")))
                .tanh();
            hidden
                .linear(&weights("fc2.weight"), Some(weights("fc2.bias")))
                .log_softmax(-1, Kind::Float)
        });
        let ours = tch::no_grad(|| model.forward_t(&images, false));
        let difference = (ours - textbook).abs().max().double_value(&[]);
        assert!(difference < 1e-5, "largest difference {difference}");
    }

    #[test]
    fn forward_returns_log_probabilities() {
        for kind in [ModelKind::Mlp, ModelKind::Cnn, ModelKind::SvhnCnn] {
            let model = Model::new(kind, Device::Cpu, 5);
            let dataset = kind.dataset();
            let channels = dataset.channels() as i64;
            let side = dataset.image_side() as i64;
            let count = 7 * channels * side * side;
            let xs = Tensor::linspace(-2.0, 2.0, count, (Kind::Float, Device::Cpu))
                .view([7, channels, side, side]);
            let output = model.forward_t(&xs, false);
            assert_eq!(output.size(), [7, 10], "{kind:?}");
            let row_sums = output.exp().sum_dim_intlist(1, false, Kind::Float);
            let max_error = (row_sums - 1.0).abs().max().double_value(&[]);
            assert!(
                max_error < 1e-5,
                "{kind:?}: probabilities sum off by {max_error}"
            );
        }
    }

    #[test]
    fn model_and_trainer_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Model>();
        assert_send::<crate::train::LocalTrainer>();
    }

    #[test]
    fn model_kind_names() {
        assert_eq!(ModelKind::Mlp.name(), "mlp");
        assert_eq!(ModelKind::Cnn.name(), "cnn");
        assert_eq!(serde_json::to_string(&ModelKind::Cnn).unwrap(), "\"cnn\"");
        assert_eq!(ModelKind::SvhnCnn.name(), "svhn-cnn");
        assert_eq!(
            serde_json::to_string(&ModelKind::SvhnCnn).unwrap(),
            "\"svhn-cnn\""
        );
        for kind in <ModelKind as clap::ValueEnum>::value_variants() {
            let value = clap::ValueEnum::to_possible_value(kind).unwrap();
            assert_eq!(value.get_name(), kind.name(), "{kind:?}");
        }
    }

    #[test]
    fn models_name_their_dataset() {
        assert_eq!(ModelKind::Mlp.dataset(), DatasetKind::Mnist);
        assert_eq!(ModelKind::Cnn.dataset(), DatasetKind::Mnist);
        assert_eq!(ModelKind::SvhnCnn.dataset(), DatasetKind::Svhn);
    }
}
