//! Selection and encoding of an upload against libtorch's top-k.
//!
//! Run: `DSSGD_DATA_DIR=path/to/mnist cargo bench -p dssgd-participant --bench
//! selection` (with `LIBTORCH` exported as for any cargo command).
//!
//! For n in {10^5, 10^6, 10^7} it draws a parameter change of n normal
//! values and times, on one thread, the participant's whole upload path at
//! k = 1% of n: the largest-|delta| selection, the clipping to gamma and the
//! Rice coding of indices and the f32 values. The reference is `abs().topk(k)` of
//! libtorch 2.13 on the same vector already in a tensor, the ATen kernel
//! that `torch.topk` calls in PyTorch 2.13; it selects only, so it does
//! less work than the upload path. The ratio is the median of ours over
//! the median of top-k. It also times a local MLP epoch on a 600-image
//! shard, the work an upload follows, and prints the upload path's share.

use std::time::Instant;

use dssgd_common::select::{gather_bounded, select_largest};
use dssgd_common::sparse::{encode_indices_rice, encode_values};
use dssgd_participant::data::load_mnist;
use dssgd_participant::model::{Model, ModelKind};
use dssgd_participant::train::{LocalTrainer, SgdConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

mod support;
use support::{data_dir, load_data, median};

/// The participant binary's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REPEATS: usize = 7;

/// Seconds of one local MLP epoch on 600 images, the median of five.
fn local_epoch() -> Option<f64> {
    // Without DSSGD_DATA_DIR the epoch is timed only when the default
    // folder has MNIST; a folder named there must load.
    let mnist = if std::env::var_os("DSSGD_DATA_DIR").is_some() {
        load_data()
    } else {
        match load_mnist(&data_dir()) {
            Ok(mnist) => mnist,
            Err(error) => {
                eprintln!(
                    "{error}\nset DSSGD_DATA_DIR to a folder with the MNIST files to time a local epoch"
                );
                return None;
            }
        }
    };
    let shard: Vec<usize> = (0..600).collect();
    let train = mnist.train.subset(&shard);
    let model = Model::new(ModelKind::Mlp, tch::Device::Cpu, 42);
    let mut trainer = LocalTrainer::new(
        &model,
        SgdConfig {
            learning_rate: 0.1,
            lr_decay: 0.0,
            batch_size: 32,
            momentum: 0.0,
        },
    )
    .expect("the optimizer builds");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            trainer
                .train_epoch(&model, &train, &mut rng)
                .expect("an epoch trains");
            started.elapsed().as_secs_f64()
        })
        .collect();
    Some(median(times))
}

fn main() {
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let epoch = local_epoch();
    println!("selection and encoding at k = 1% of n, one thread, median of {REPEATS}");
    println!();
    println!(
        "| n | k | ours: select, clip, encode (s) | libtorch abs().topk (s) | ratio | target | verdict |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut mlp_share = None;
    for n in [100_000usize, 1_000_000, 10_000_000] {
        let k = n / 100;
        let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
        let delta: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let tensor = tch::Tensor::from_slice(&delta);
        let mut ours = Vec::with_capacity(REPEATS);
        let mut reference = Vec::with_capacity(REPEATS);
        let mut bytes = 0;
        for _ in 0..REPEATS {
            let started = Instant::now();
            let indices = select_largest(&delta, k);
            let values = gather_bounded(&delta, &indices, 0.001);
            let encoded = (encode_indices_rice(&indices), encode_values(&values));
            ours.push(started.elapsed().as_secs_f64());
            bytes = encoded.0.len() + encoded.1.len();

            let started = Instant::now();
            let (top, _) = tensor.abs().topk(k as i64, 0, true, true);
            std::hint::black_box(&top);
            reference.push(started.elapsed().as_secs_f64());
        }
        let (ours, reference) = (median(ours), median(reference));
        if n == 100_000 {
            mlp_share = epoch.map(|e| ours / e);
        }
        println!(
            "| {n} | {k} | {ours:.5} | {reference:.5} | {:.3} | <= 1 | {} |",
            ours / reference,
            if ours <= reference { "met" } else { "missed" }
        );
        std::hint::black_box(bytes);
    }
    if let (Some(epoch), Some(share)) = (epoch, mlp_share) {
        println!();
        println!(
            "local MLP epoch on 600 images: {epoch:.5} s; the upload path at n = 10^5 is {:.1}% of it (target under 5%: {})",
            share * 100.0,
            if share < 0.05 { "met" } else { "missed" }
        );
    }
}
