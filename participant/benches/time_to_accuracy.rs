//! Time and bytes to a test accuracy: the federation against a plain
//! PyTorch script of the same algorithm and against dense federated
//! averaging, on the same partition.
//!
//! Run: `DSSGD_DATA_DIR=path/to/mnist cargo bench -p dssgd-participant
//! --bench time_to_accuracy` after `scripts/setup.sh` (which builds
//! `dssgd-server`), with `LIBTORCH` exported as for any cargo command. The
//! references run `scripts/pytorch/federated.py` with the Python that
//! `DSSGD_PYTHON` names (default: what `scripts/pytorch-env.sh` prints).
//!
//! The workload is the main job's: the MLP, 30 participants with 600 MNIST
//! images each (the partition of `--data-seed 1`), learning rate 0.1, batch
//! size 32, theta_u 0.1, theta_d 1, gamma 0.0005, up to 60 local epochs
//! each. The federation runs `dssgd-participant simulate --global-curve`
//! with 15 participants in each of 2 processes, in the asynchronous and the
//! round-robin orderings, over gRPC with mutual TLS on loopback. Its time
//! counts from the start of the command, so process start-up and data
//! loading are included. The references run in one process on one thread (two
//! threads ran slower for this small model), and their time counts training
//! only (not loading the data and not the test evaluations). Bytes are payload bytes: what the server counted
//! for ours (Rice-coded indices, f32 values, dense f32 downloads), and raw
//! tensors for the references (int32 index and f32 value per uploaded
//! change, 4 bytes a parameter per dense transfer). Set
//! `DSSGD_TARGET_ACCURACY` to change the target (default 0.96). The runs'
//! outputs and logs stay in `target/time_to_accuracy`.

use std::path::Path;
use std::process::Command;

use dssgd_common::shard::ShardPlan;
use serde_json::Value;

mod support;
use support::{data_dir, env_setting, load_data, python, script_output, workspace_root};

const PARTICIPANTS: usize = 30;
const EPOCHS: usize = 60;
const DATA_SEED: u64 = 1;

/// When a run first reached the target.
struct Reached {
    seconds: f64,
    uploads: u64,
    bytes: u64,
}

/// A run's outcome: when it reached the target, if it did, and its best
/// accuracy.
struct Outcome {
    name: String,
    reached: Option<Reached>,
    best: f64,
    wall_seconds: f64,
}

/// Reads an accuracy curve (a JSON array of points with an `accuracy`):
/// its best accuracy, and the first point at or above `target`, read by
/// `reached`.
fn read_curve(
    curve: &Value,
    target: f64,
    reached: impl Fn(&Value) -> Reached,
) -> (f64, Option<Reached>) {
    let points = curve.as_array().map(Vec::as_slice).unwrap_or_default();
    let best = points
        .iter()
        .filter_map(|point| point["accuracy"].as_f64())
        .fold(0.0, f64::max);
    let first = points
        .iter()
        .find(|point| point["accuracy"].as_f64().unwrap_or(0.0) >= target)
        .map(reached);
    (best, first)
}

/// Runs the federation in `ordering` and reads its global curve.
fn federation(data_dir: &Path, ordering: &str, output: &Path, target: f64) -> Outcome {
    let binary = env!("CARGO_BIN_EXE_dssgd-participant");
    let status = Command::new(binary)
        .args(["simulate", "--data-dir"])
        .arg(data_dir)
        .args(["--no-download", "--skip-baselines", "--global-curve"])
        .args(["--participants", &PARTICIPANTS.to_string()])
        .args(["--epochs", &EPOCHS.to_string()])
        .args(["--data-seed", &DATA_SEED.to_string()])
        .args(["--eval-every", &EPOCHS.to_string()])
        .args(["--participants-per-process", "15"])
        .args(["--ordering", ordering])
        .arg("--output")
        .arg(output)
        .status()
        .unwrap_or_else(|error| panic!("failed to run {binary}: {error}"));
    if !status.success() {
        let logs = output.join("logs");
        if logs.is_dir() {
            eprintln!(
                "simulate failed ({status}); its output is above and its logs are in {}",
                logs.display()
            );
        } else {
            eprintln!("simulate failed ({status}); its output is above");
        }
        std::process::exit(1);
    }
    let text =
        std::fs::read_to_string(output.join("summary.json")).expect("simulate writes summary.json");
    let summary: Value = serde_json::from_str(&text).expect("summary.json is JSON");
    let (best, reached) = read_curve(&summary["global_curve"], target, |point| Reached {
        seconds: point["seconds"].as_f64().unwrap_or(f64::NAN),
        uploads: point["uploads"].as_u64().unwrap_or(0),
        bytes: point["uploaded_bytes"].as_u64().unwrap_or(0)
            + point["downloaded_bytes"].as_u64().unwrap_or(0),
    });
    Outcome {
        name: format!("ours, {ordering}"),
        reached,
        best,
        wall_seconds: summary["wall_seconds"].as_f64().unwrap_or(f64::NAN),
    }
}

/// Runs a reference of `scripts/pytorch/federated.py`.
fn reference(
    python: &Path,
    algorithm: &str,
    data_dir: &Path,
    shards: &Path,
    target: f64,
) -> Result<Outcome, String> {
    let script = workspace_root().join("scripts/pytorch/federated.py");
    let started = std::time::Instant::now();
    let mut command = Command::new(python);
    command
        .arg(&script)
        .args(["--algorithm", algorithm, "--data-dir"])
        .arg(data_dir)
        .arg("--shards")
        .arg(shards)
        .args(["--rounds", &EPOCHS.to_string()])
        .args(["--target", &target.to_string()])
        .args(["--threads", "1"]);
    let stdout = script_output(&mut command, &script)?;
    let report: Value = serde_json::from_slice(&stdout)
        .map_err(|error| format!("invalid output of {}: {error}", script.display()))?;
    let version = report["torch"].as_str().unwrap_or_default();
    if !version.starts_with("2.13.") {
        return Err(format!(
            "the reference runs torch {version}, not 2.13; set DSSGD_PYTHON to a Python with torch 2.13"
        ));
    }
    let (best, reached) = read_curve(&report["curve"], target, |point| Reached {
        seconds: point["seconds"].as_f64().unwrap_or(f64::NAN),
        uploads: point["round"].as_u64().unwrap_or(0) * PARTICIPANTS as u64,
        bytes: point["bytes"].as_u64().unwrap_or(0),
    });
    Ok(Outcome {
        name: format!("PyTorch script, {algorithm}"),
        reached,
        best,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

fn main() {
    let target: f64 = env_setting(
        "DSSGD_TARGET_ACCURACY",
        0.96,
        "an accuracy above 0 and at most 1",
        |&accuracy| accuracy > 0.0 && accuracy <= 1.0,
    );
    if std::env::var_os("DSSGD_DATA_DIR").is_none() {
        eprintln!("set DSSGD_DATA_DIR to a folder with the MNIST files");
        std::process::exit(2);
    }
    // Loading it once here fails fast, before any run starts.
    load_data();
    let data_dir = data_dir();
    // Kept after the run, so that the federation's logs can be read when
    // it fails.
    let scratch = workspace_root().join("target/time_to_accuracy");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .unwrap_or_else(|error| panic!("failed to clear {}: {error}", scratch.display()));
    }
    std::fs::create_dir_all(&scratch)
        .unwrap_or_else(|error| panic!("failed to create {}: {error}", scratch.display()));
    let plan = ShardPlan {
        dataset_len: 60_000,
        participants: PARTICIPANTS,
        fraction: 0.01,
        seed: DATA_SEED,
    };
    let shards: Vec<Vec<usize>> = (0..PARTICIPANTS).map(|i| plan.shard(i)).collect();
    let shards_path = scratch.join("shards.json");
    std::fs::write(
        &shards_path,
        serde_json::to_string(&shards).expect("shards serialize"),
    )
    .expect("the shards file is written");

    let mut outcomes = Vec::new();
    for ordering in ["asynchronous", "round-robin"] {
        let output = scratch.join(ordering);
        eprintln!("running the federation, {ordering} ordering");
        outcomes.push(federation(&data_dir, ordering, &output, target));
    }
    match python() {
        Ok(python) => {
            for algorithm in ["dssgd", "fedavg"] {
                eprintln!("running the PyTorch script, {algorithm}");
                match reference(&python, algorithm, &data_dir, &shards_path, target) {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(reason) => eprintln!("no {algorithm} reference: {reason}"),
                }
            }
        }
        Err(reason) => eprintln!("no PyTorch references: {reason}"),
    }

    println!(
        "time and payload bytes to test accuracy {target}: MLP, {PARTICIPANTS} participants of 600 MNIST images, up to {EPOCHS} epochs each"
    );
    println!();
    println!(
        "| run | seconds to {target} | uploads | MB to {target} | time / ours asynchronous | bytes / ours asynchronous | best accuracy | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let baseline = outcomes
        .first()
        .and_then(|outcome| outcome.reached.as_ref())
        .map(|reached| (reached.seconds, reached.bytes as f64));
    for outcome in &outcomes {
        match &outcome.reached {
            Some(reached) => {
                let (time_ratio, bytes_ratio) =
                    baseline.map_or(("-".to_string(), "-".to_string()), |(seconds, bytes)| {
                        (
                            format!("{:.2}", reached.seconds / seconds),
                            format!("{:.2}", reached.bytes as f64 / bytes),
                        )
                    });
                println!(
                    "| {} | {:.1} | {} | {:.1} | {time_ratio} | {bytes_ratio} | {:.4} | {:.1} |",
                    outcome.name,
                    reached.seconds,
                    reached.uploads,
                    reached.bytes as f64 / 1e6,
                    outcome.best,
                    outcome.wall_seconds
                );
            }
            None => println!(
                "| {} | not reached | - | - | - | - | {:.4} | {:.1} |",
                outcome.name, outcome.best, outcome.wall_seconds
            ),
        }
    }
}
