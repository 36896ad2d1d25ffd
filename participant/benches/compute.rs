//! Local training against PyTorch eager on the same libtorch.
//!
//! Run: `DSSGD_DATA_DIR=path/to/mnist cargo bench -p dssgd-participant
//! --bench compute` (with `LIBTORCH` exported as for any cargo command).
//! The reference is `scripts/pytorch/epoch_time.py`, run by the Python
//! that `DSSGD_PYTHON` names (default: what `scripts/pytorch-env.sh`
//! prints, which installs PyTorch 2.13.0 from PyPI once).
//!
//! Both sides train on the first 600 MNIST training images (a
//! participant's shard), normalised the same way and held in memory, with
//! the same network, batch size, learning rate and thread count. Each
//! round times 20 epochs of ours, then 20 of PyTorch's in a fresh process,
//! after one warm-up epoch each. The ratio is the median over the rounds
//! of the ratio of the epoch medians. Set `DSSGD_BENCH_THREADS` to change
//! the thread count (default 1, as each simulated participant uses).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dssgd_participant::data::Dataset;
use dssgd_participant::model::{Model, ModelKind};
use dssgd_participant::train::{LocalTrainer, SgdConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod support;
use support::{data_dir, env_setting, load_data, median, python, script_output, workspace_root};

/// The participant binary's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLES: usize = 600;
const EPOCHS: usize = 20;
const ROUNDS: usize = 3;
const LEARNING_RATE: f64 = 0.1;

/// Median seconds of an epoch of ours.
fn ours(kind: ModelKind, batch_size: usize, train: &Dataset) -> f64 {
    let model = Model::new(kind, tch::Device::Cpu, 42);
    let config = SgdConfig {
        learning_rate: LEARNING_RATE,
        lr_decay: 0.0,
        batch_size,
        momentum: 0.0,
    };
    let mut trainer = LocalTrainer::new(&model, config).expect("the optimizer builds");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    trainer
        .train_epoch(&model, train, &mut rng)
        .expect("the warm-up epoch trains");
    let seconds = (0..EPOCHS)
        .map(|_| {
            let started = Instant::now();
            trainer
                .train_epoch(&model, train, &mut rng)
                .expect("an epoch trains");
            started.elapsed().as_secs_f64()
        })
        .collect();
    median(seconds)
}

/// Median seconds of an epoch of PyTorch eager, from a fresh process.
fn pytorch(
    python: &Path,
    data_dir: &Path,
    kind: ModelKind,
    batch_size: usize,
    threads: usize,
) -> Result<f64, String> {
    let script = workspace_root().join("scripts/pytorch/epoch_time.py");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .args(["--data-dir".as_ref(), data_dir.as_os_str()])
        .args(["--model", kind.name()])
        .args(["--batch-size", &batch_size.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--examples", &EXAMPLES.to_string()])
        .args(["--epochs", &EPOCHS.to_string()])
        .args(["--lr", &LEARNING_RATE.to_string()]);
    let stdout = script_output(&mut command, &script)?;
    let report: serde_json::Value = serde_json::from_slice(&stdout)
        .map_err(|error| format!("invalid output of {}: {error}", script.display()))?;
    let version = report["torch"].as_str().unwrap_or_default();
    if !version.starts_with("2.13.") {
        return Err(format!(
            "the reference runs torch {version}, not 2.13 as tch 0.26 links; set DSSGD_PYTHON to a Python with torch 2.13"
        ));
    }
    let seconds: Vec<f64> = report["seconds"]
        .as_array()
        .map(|values| {
            values
                .iter()
                .filter_map(serde_json::Value::as_f64)
                .collect()
        })
        .unwrap_or_default();
    if seconds.is_empty() {
        return Err(format!("{} printed no epoch times", script.display()));
    }
    Ok(median(seconds))
}

fn main() {
    let threads: usize = env_setting("DSSGD_BENCH_THREADS", 1, "a whole number from 1", |&n| {
        n > 0
    });
    tch::set_num_threads(threads as i32);
    tch::set_num_interop_threads(1);
    let data_dir = data_dir();
    let mnist = load_data();
    let first: Vec<usize> = (0..EXAMPLES).collect();
    let train = mnist.train.subset(&first);
    let mut python = python();
    if let Err(reason) = &python {
        eprintln!("no PyTorch reference: {reason}");
    }
    println!(
        "local epochs of {EXAMPLES} MNIST images, {threads} thread(s), median of {EPOCHS} epochs, median ratio of {ROUNDS} rounds"
    );
    println!();
    println!("| model | batch | ours (s) | PyTorch eager (s) | ratio | target | verdict |");
    println!("|---|---|---|---|---|---|---|");
    let cases = [
        (ModelKind::Mlp, 32, 0.8),
        (ModelKind::Mlp, 64, 0.8),
        (ModelKind::Mlp, 128, 1.0),
        (ModelKind::Cnn, 64, 1.0),
    ];
    for (kind, batch_size, target) in cases {
        let mut ours_seconds = Vec::new();
        let mut reference_seconds = Vec::new();
        let mut ratios = Vec::new();
        for _ in 0..ROUNDS {
            let mine = ours(kind, batch_size, &train);
            ours_seconds.push(mine);
            if let Ok(interpreter) = &python {
                match pytorch(interpreter, &data_dir, kind, batch_size, threads) {
                    Ok(theirs) => {
                        reference_seconds.push(theirs);
                        ratios.push(mine / theirs);
                    }
                    Err(reason) => {
                        // One failure is reported, and the reference is not
                        // tried again.
                        eprintln!(
                            "no PyTorch reference: {reason}; set DSSGD_PYTHON to a Python with torch 2.13"
                        );
                        python = Err(reason);
                    }
                }
            }
        }
        let mine = median(ours_seconds);
        if ratios.is_empty() {
            println!(
                "| {} | {batch_size} | {mine:.5} | - | - | <= {target} | - |",
                kind.name()
            );
            continue;
        }
        let ratio = median(ratios);
        println!(
            "| {} | {batch_size} | {mine:.5} | {:.5} | {ratio:.3} | <= {target} | {} |",
            kind.name(),
            median(reference_seconds),
            if ratio <= target { "met" } else { "missed" }
        );
    }
}
