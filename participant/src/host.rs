//! Several participants in one process.
//!
//! Each hosted participant has its own model, optimizer, shard, random
//! stream and gRPC connection, and runs the same loop as a lone
//! `collaborate` process, on its own thread. They share only the libtorch
//! runtime, the test set (read-only) and the async runtime that drives the
//! connections. This fits federations of a hundred and more participants
//! into one machine's memory: libtorch and the test set are loaded once per
//! process instead of once per participant.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use dssgd_common::config::{check_participant_id, check_seconds};
use serde::Serialize;
use tracing::error;

use crate::cli::{Seat, SharingArgs, TrainingArgs, TransportArgs};
use crate::client::{Client, RetryPolicy};
use crate::data::Dataset;
use crate::metrics::RunMetrics;

/// Settings of a process that hosts consecutive participants.
#[derive(Clone, Debug, Args, Serialize)]
pub struct HostArgs {
    /// Data, model and training settings.
    #[command(flatten)]
    pub training: TrainingArgs,

    /// Sharing settings (--privacy-ledger is replaced by --ledger-dir).
    #[command(flatten)]
    pub sharing: SharingArgs,

    /// Address of the parameter server.
    #[arg(long, env = "DSSGD_SERVER")]
    pub server: String,

    /// Folder with the federation's certificates: ca.pem, and ID.pem and
    /// ID.key for each hosted participant ID (mutual TLS).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,

    /// Allow a plaintext http:// server (trusted networks only).
    #[arg(long)]
    pub insecure: bool,

    /// Index of the first hosted participant.
    #[arg(long)]
    pub first_index: usize,

    /// Number of consecutive participants to host, from --first-index.
    #[arg(long)]
    pub count: usize,

    /// Folder for one metrics file per participant, ID.json.
    #[arg(long)]
    pub metrics_dir: PathBuf,

    /// Folder for one privacy ledger per participant, ID.jsonl (private
    /// uploads only; default: the current folder).
    #[arg(long)]
    pub ledger_dir: Option<PathBuf>,

    /// After collaborating, also train each shard alone (the standalone
    /// baseline) and record its accuracy.
    #[arg(long)]
    pub standalone_baseline: bool,

    /// Keep retrying an unreachable server for this many seconds per call.
    #[arg(long, default_value_t = 300.0, allow_negative_numbers = true)]
    pub retry_seconds: f64,
}

/// Identifier of participant `index`.
pub fn participant_id(index: usize) -> String {
    format!("p{index:03}")
}

impl HostArgs {
    /// Transport settings of participant `id`.
    fn transport(&self, id: &str) -> TransportArgs {
        let file = |name: String| self.tls_dir.as_ref().map(|dir| dir.join(name));
        TransportArgs {
            server: self.server.clone(),
            tls_ca: file("ca.pem".into()),
            tls_cert: file(format!("{id}.pem")),
            tls_key: file(format!("{id}.key")),
            tls_domain: None,
            insecure: self.insecure,
        }
    }
}

/// Peak resident memory of this process, in bytes (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs every hosted participant to the end and writes their metrics.
/// Fails, after the others have finished, if any of them failed.
pub fn host(args: &HostArgs) -> anyhow::Result<()> {
    let training = &args.training;
    args.sharing.validate()?;
    training.validate()?;
    if args.count == 0 {
        bail!("invalid count 0: expected at least 1 participant to host");
    }
    let end = args.first_index + args.count;
    if end > training.participants {
        bail!(
            "participants {} to {} do not exist: the federation has {} (indices 0 to {})",
            args.first_index,
            end - 1,
            training.participants,
            training.participants - 1
        );
    }
    let retry = RetryPolicy {
        give_up_after: check_seconds("retry-seconds", args.retry_seconds)?,
        ..RetryPolicy::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let indices: Vec<usize> = (args.first_index..end).collect();
    let mut clients = Vec::with_capacity(indices.len());
    for &index in &indices {
        let id = participant_id(index);
        check_participant_id(&id)?;
        let transport = args.transport(&id);
        let _guard = runtime.enter();
        clients.push(Client::new(
            &transport.server,
            transport.client_tls()?,
            &id,
            crate::client::DEFAULT_MAX_MESSAGE_BYTES,
            retry,
        )?);
    }
    let (device, data) = training.prepare()?;
    let trains: Vec<Dataset> = training
        .shards(&data.train, &indices)
        .iter()
        .map(|shard| data.train.subset(shard).to_device(device))
        .collect();
    let test = data.test.to_device(device);
    drop(data);

    let results: Vec<(usize, anyhow::Result<RunMetrics>)> = std::thread::scope(|scope| {
        let runtime = &runtime;
        let handles: Vec<_> = indices
            .iter()
            .zip(clients)
            .zip(trains)
            .map(|((&index, mut client), train)| {
                let test = test.shallow_clone();
                let sharing = SharingArgs {
                    privacy_ledger: args
                        .ledger_dir
                        .as_ref()
                        .map(|dir| dir.join(format!("{}.jsonl", participant_id(index)))),
                    ..args.sharing.clone()
                };
                let handle = scope.spawn(move || {
                    let seat = Seat {
                        training,
                        sharing: &sharing,
                        index,
                        device,
                        train: &train,
                        test: &test,
                        standalone_baseline: args.standalone_baseline,
                    };
                    let result = seat.run(runtime, &mut client);
                    if let Err(failure) = &result {
                        error!(participant = %participant_id(index), "failed: {failure:#}");
                    }
                    result
                });
                (index, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(index, handle)| {
                let result = handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("its training thread panicked")));
                (index, result)
            })
            .collect()
    });

    let peak = peak_rss_bytes();
    let mut failures = Vec::new();
    for (index, result) in results {
        let id = participant_id(index);
        match result {
            Ok(mut metrics) => {
                metrics.hosted_participants = Some(args.count);
                metrics.process_peak_rss_bytes = peak;
                let mut config = serde_json::to_value(args)?;
                config["index"] = index.into();
                metrics.config = config;
                let path = args.metrics_dir.join(format!("{id}.json"));
                metrics
                    .write(&path)
                    .with_context(|| format!("failed to write {}", path.display()))?;
                println!(
                    "{id}: final accuracy {:.4}, global model accuracy {:.4}",
                    metrics.final_accuracy,
                    metrics.global_accuracy.unwrap_or(f64::NAN)
                );
            }
            Err(failure) => failures.push(format!("{id}: {failure:#}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} hosted participants failed: {}",
            failures.len(),
            args.count,
            failures.join("; ")
        );
    }
    Ok(())
}
