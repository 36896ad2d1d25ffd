//! How the parameter server's cost grows with the model and the
//! federation.
//!
//! Run: `cargo bench -p dssgd-server --bench scale`. Everything runs on
//! the in-memory store, without gRPC, so the figures are the store's own
//! limits; `transport` measures what gRPC adds.
//!
//! - Model size n from 10^5 to 10^8 parameters (one participant): resident
//!   memory that the model adds once uploads have touched it, uploads per second at theta_u 0.01 (and
//!   parameters applied per second), and the time of a dense download and
//!   of a theta_d 0.1 download, encoded for the wire as the server sends
//!   them.
//! - Participants from 10 to 1,000 on the MLP's 109,386 parameters:
//!   memory per joined participant and uploads per second at theta_u 0.1,
//!   the uploads coming from the participants in turn.

use std::time::Instant;

use dssgd_common::select::fraction_count;
use dssgd_common::sparse::{IndexEncoding, SparseSlice};
use dssgd_server::Store;
use dssgd_server::store::{Changes, ModelInfo, Upload};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod support;
use support::random_changes;

const GAMMA: f32 = 0.001;

/// Resident memory of this process, in bytes (Linux only).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn model(n: usize) -> ModelInfo {
    ModelInfo {
        name: "mlp".into(),
        parameter_count: n as u64,
        layout_hash: "bench".into(),
    }
}

fn by_model_size() {
    println!(
        "| parameters | memory added | uploads/s at theta_u 0.01 | parameters applied/s | dense download | theta_d 0.1 download |"
    );
    println!("|---|---|---|---|---|---|");
    for n in [100_000usize, 1_000_000, 10_000_000, 100_000_000] {
        let before = rss_bytes();
        let store = Store::new();
        store
            .join("p0", &model(n), Some(vec![0.0; n]))
            .expect("joining succeeds");
        let count = fraction_count(0.01, n);
        let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
        let uploads = (20_000_000 / count).clamp(5, 2_000);
        // Each upload is drawn just before it is applied, so that the
        // memory figure counts the store alone; only the applies are timed.
        let mut applying = std::time::Duration::ZERO;
        for id in 0..uploads {
            let upload = Upload {
                participant: "p0".into(),
                upload_id: id as u64 + 1,
                base_version: 0,
                changes: Changes::Sparse(random_changes(&mut rng, n, count, GAMMA)),
                epsilon: 0.0,
                encoded_bytes: 0,
            };
            let started = Instant::now();
            store.apply(&upload).expect("the upload is applied");
            applying += started.elapsed();
        }
        let rate = uploads as f64 / applying.as_secs_f64();
        // Measured after the uploads, which touch the update counters too.
        let memory = rss_bytes().saturating_sub(before);
        let started = Instant::now();
        let dense = store
            .download_encoded(1.0, IndexEncoding::Rice)
            .expect("a dense download");
        let dense_seconds = started.elapsed().as_secs_f64();
        drop(dense);
        let started = Instant::now();
        let partial = store
            .download_encoded(0.1, IndexEncoding::Rice)
            .expect("a partial download");
        let partial_seconds = started.elapsed().as_secs_f64();
        drop(partial);
        println!(
            "| {n} | {:.0} MiB ({:.1} B per parameter) | {rate:.0} | {:.3e} | {dense_seconds:.4} s | {partial_seconds:.4} s |",
            memory as f64 / (1 << 20) as f64,
            memory as f64 / n as f64,
            rate * count as f64
        );
    }
}

fn by_participants() {
    const N: usize = 109_386;
    println!("| participants | memory per participant | uploads/s at theta_u 0.1 |");
    println!("|---|---|---|");
    for participants in [10usize, 100, 1_000] {
        let store = Store::new();
        store
            .join("p0", &model(N), Some(vec![0.0; N]))
            .expect("joining succeeds");
        let before = rss_bytes();
        for p in 1..participants {
            store
                .join(&format!("p{p}"), &model(N), Some(vec![0.0; N]))
                .expect("joining succeeds");
        }
        let per_participant = if participants > 1 {
            rss_bytes().saturating_sub(before) as f64 / (participants - 1) as f64
        } else {
            0.0
        };
        let count = fraction_count(0.1, N);
        let mut rng = ChaCha8Rng::seed_from_u64(participants as u64);
        let uploads = 2_000;
        let batch: Vec<SparseSlice> = (0..uploads)
            .map(|_| random_changes(&mut rng, N, count, GAMMA))
            .collect();
        let started = Instant::now();
        for (k, changes) in batch.into_iter().enumerate() {
            let upload = Upload {
                participant: format!("p{}", k % participants),
                upload_id: (k / participants) as u64 + 1,
                base_version: 0,
                changes: Changes::Sparse(changes),
                epsilon: 0.0,
                encoded_bytes: 0,
            };
            store.apply(&upload).expect("the upload is applied");
        }
        let rate = uploads as f64 / started.elapsed().as_secs_f64();
        println!("| {participants} | {:.0} B | {rate:.0} |", per_participant);
    }
}

fn main() {
    println!("scale of the in-memory store, one thread");
    println!();
    by_model_size();
    println!();
    by_participants();
}
