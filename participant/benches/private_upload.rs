//! What the differentially private upload costs, next to the local training
//! it follows.
//!
//! Run: `DSSGD_DATA_DIR=path/to/mnist cargo bench -p dssgd-participant --bench
//! private_upload` (with `LIBTORCH` exported as for any cargo command).
//!
//! For the MLP and the CNN it trains local epochs on a 600-image MNIST shard
//! with one libtorch thread, batch size 32 (the simulation's defaults), takes
//! the parameter change of the last epoch, and times the private upload
//! (sparse vector selection, exact discrete Laplace noise on every
//! comparison and release) at theta_u 0.1 and 1 and several budgets. It
//! prints the median of each and its ratio to the median local epoch. It
//! also times single noise draws and the ledger's synced append.

use std::time::Instant;

use dssgd_common::privacy::{DiscreteLaplace, PrivateUpload};
use dssgd_common::select::fraction_count;
use dssgd_participant::ledger::Ledger;
use dssgd_participant::model::{Model, ModelKind};
use dssgd_participant::train::{LocalTrainer, SgdConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod support;
use support::{load_data, median};

const SHARD: usize = 600;
const EPOCHS: usize = 5;
const RELEASES: usize = 5;

fn main() {
    // cargo bench passes --bench; nothing else is accepted.
    let mnist = load_data();
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let shard: Vec<usize> = (0..SHARD).collect();
    let train = mnist.train.subset(&shard);

    let mut noise = DiscreteLaplace::from_os_entropy().expect("the OS entropy source works");
    let draws = 1_000_000;
    let started = Instant::now();
    let mut sink = 0i64;
    for _ in 0..draws {
        sink = sink.wrapping_add(noise.sample(1_179_648).expect("a draw"));
    }
    let per_draw = started.elapsed().as_secs_f64() / draws as f64;
    println!(
        "noise: {:.0} ns per exact discrete Laplace draw (scale 1,179,648 steps; checksum {})",
        per_draw * 1e9,
        sink % 2
    );

    // Each private upload also appends one line to the privacy ledger and
    // syncs it to disk before sending.
    let folder = std::env::temp_dir().join(format!("dssgd-bench-{}", std::process::id()));
    let mut ledger = Ledger::open(&folder.join("ledger.jsonl"), "bench", None)
        .expect("the ledger opens in the temporary folder");
    let mut sync_seconds = Vec::new();
    for upload_id in 1..=20 {
        let started = Instant::now();
        ledger
            .record(upload_id, 1, 1.0, 1)
            .expect("recording works");
        sync_seconds.push(started.elapsed().as_secs_f64());
    }
    drop(ledger);
    let _ = std::fs::remove_dir_all(&folder);
    println!(
        "ledger: {:.2} ms per recorded upload (append and sync to disk, median of 20)",
        median(sync_seconds) * 1e3
    );

    println!("model  theta_u  eps/c   epoch (s)  upload (s)  examined   ratio");
    for kind in [ModelKind::Mlp, ModelKind::Cnn] {
        let model = Model::new(kind, tch::Device::Cpu, 42);
        let sgd = SgdConfig {
            learning_rate: 0.1,
            lr_decay: 0.0,
            batch_size: 32,
            momentum: 0.0,
        };
        let mut trainer = LocalTrainer::new(&model, sgd).expect("valid SGD settings");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut epoch_seconds = Vec::new();
        let mut delta = Vec::new();
        for _ in 0..EPOCHS {
            let before = model.flat_parameters();
            let started = Instant::now();
            trainer
                .train_epoch(&model, &train, &mut rng)
                .expect("training works");
            epoch_seconds.push(started.elapsed().as_secs_f64());
            let after = model.flat_parameters();
            delta = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        }
        let epoch = median(epoch_seconds);
        for theta_u in [0.1, 1.0] {
            let c = fraction_count(theta_u, delta.len());
            for per_parameter in [0.01, 1.0, 100.0] {
                let upload = PrivateUpload {
                    epsilon: per_parameter * c as f64,
                    c,
                    gamma: 0.0005,
                    tau: 0.0001,
                };
                let mut seconds = Vec::new();
                let mut examined = 0;
                for _ in 0..RELEASES {
                    let started = Instant::now();
                    let release = upload.release(&delta, &mut noise).expect("release works");
                    seconds.push(started.elapsed().as_secs_f64());
                    examined = release.examined;
                }
                let upload_seconds = median(seconds);
                println!(
                    "{:<6} {:>7} {:>6} {:>10.4} {:>11.4} {:>9} {:>7.3}",
                    kind.name(),
                    theta_u,
                    per_parameter,
                    epoch,
                    upload_seconds,
                    examined,
                    upload_seconds / epoch
                );
            }
        }
    }
}
