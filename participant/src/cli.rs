//! Command-line interface of `dssgd-participant`.
//!
//! Every option can also be set through the environment variable named in
//! its help, so container and compose files configure participants without
//! flags.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use dssgd_common::config::{
    Ordering, check_non_negative, check_participant_id, check_positive, check_unit_closed,
    check_unit_open_closed,
};
use dssgd_common::shard::{LabelSkew, ShardPlan};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tracing::{info, warn};

use crate::client::{Client, RetryPolicy};
use crate::data::{Dataset, DatasetKind, Splits};
use crate::device::{DeviceChoice, resolve_device};
use crate::dssgd::{
    CollaborativeConfig, Epsilon, Participant, PrivacyConfig, Selection, UploadValues,
    run_collaborative, train_alone,
};
use crate::metrics::{RunMetrics, significant, write_json};
use crate::model::{Model, ModelKind};
use crate::train::{LocalTrainer, SgdConfig};

/// Largest accepted `--threads`.
const MAX_THREADS: usize = 1024;

/// DSSGD participant: trains on a private shard of MNIST or SVHN with libtorch
/// and shares selected, bounded parameter changes with a parameter server.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Write logs as JSON lines.
    #[arg(long, global = true, env = "DSSGD_LOG_JSON")]
    pub log_json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train as one participant of a federation against a running server.
    Collaborate(CollaborateArgs),
    /// Baseline: train each participant's shard alone, with no sharing.
    Standalone(BaselineArgs),
    /// Baseline: train one model on the union of all participants' shards.
    Centralized(BaselineArgs),
    /// Download the global parameters from a server and report their test
    /// accuracy.
    Evaluate(EvaluateArgs),
    /// Run a grid of simulations and baselines from a TOML file, resuming
    /// finished cells, and write tables, plots and a Markdown report.
    Experiment(crate::experiment::ExperimentArgs),
    /// Host several consecutive participants in this process, each with its
    /// own model, shard and connection (used by simulate and experiment).
    #[command(hide = true)]
    Host(crate::host::HostArgs),
    /// Run a whole federation on this machine: a server and N participant
    /// processes on loopback, plus both baselines, then print a comparison.
    Simulate(crate::simulate::SimulateArgs),
}

/// Data, model and local training settings shared by every subcommand.
#[derive(Clone, Debug, Args, Serialize)]
pub struct TrainingArgs {
    /// Network to train: mlp or cnn for mnist, svhn-cnn for svhn.
    #[arg(long, env = "DSSGD_MODEL", value_enum, default_value = "mlp")]
    pub model: ModelKind,

    /// Dataset to train on.
    #[arg(long, env = "DSSGD_DATASET", value_enum, default_value = "mnist")]
    pub dataset: DatasetKind,

    /// Folder with the dataset's files: the four MNIST IDX files (gzip or
    /// raw), or the SVHN files train_32x32.mat and test_32x32.mat.
    /// [default: data/mnist for mnist, data/svhn for svhn]
    #[arg(long, env = "DSSGD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Download the dataset into the data folder when files are missing,
    /// verifying the published checksum of each file (SHA-256 for MNIST,
    /// MD5 for SVHN).
    #[arg(long, env = "DSSGD_DOWNLOAD")]
    pub download: bool,

    /// Number of participants in the federation.
    #[arg(long, env = "DSSGD_PARTICIPANTS", default_value_t = 30)]
    pub participants: usize,

    /// Fraction of the training set each participant holds, in (0, 1].
    #[arg(
        long,
        env = "DSSGD_SHARD_FRACTION",
        default_value_t = 0.01,
        allow_negative_numbers = true
    )]
    pub shard_fraction: f64,

    /// Seed of the split of the training set among participants.
    #[arg(long, env = "DSSGD_DATA_SEED", default_value_t = 1)]
    pub data_seed: u64,

    /// Split the training set non-IID: draw each participant's label
    /// proportions from a symmetric Dirichlet distribution with this
    /// concentration (0.1 gives each participant one or two dominant
    /// classes; 100 is close to IID). Without it the split is IID.
    #[arg(long, env = "DSSGD_DIRICHLET_ALPHA", allow_negative_numbers = true)]
    pub dirichlet_alpha: Option<f64>,

    /// Seed of the initial parameters (the same in every process).
    #[arg(long, env = "DSSGD_INIT_SEED", default_value_t = 42)]
    pub init_seed: i64,

    /// Number of local epochs.
    #[arg(long, env = "DSSGD_EPOCHS", default_value_t = 60)]
    pub epochs: usize,

    /// SGD learning rate at step 0.
    #[arg(
        long = "lr",
        env = "DSSGD_LR",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    pub learning_rate: f64,

    /// Learning-rate decay per step: step t uses lr / (1 + t * decay).
    #[arg(
        long,
        env = "DSSGD_LR_DECAY",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub lr_decay: f64,

    /// Mini-batch size.
    #[arg(long, env = "DSSGD_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,

    /// SGD momentum in [0, 1).
    #[arg(
        long,
        env = "DSSGD_MOMENTUM",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub momentum: f64,

    /// Evaluate test accuracy every this many epochs (and after the last).
    #[arg(long, env = "DSSGD_EVAL_EVERY", default_value_t = 10)]
    pub eval_every: usize,

    /// Device to train on.
    #[arg(long, env = "DSSGD_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,

    /// libtorch intra-op threads for this process.
    #[arg(long, env = "DSSGD_THREADS", default_value_t = 1)]
    pub threads: usize,

    /// Write the run's metrics as JSON to this file.
    #[arg(long, env = "DSSGD_METRICS")]
    pub metrics: Option<PathBuf>,
}

/// Settings of one collaborating participant.
#[derive(Clone, Debug, Args, Serialize)]
pub struct CollaborateArgs {
    /// Data, model and training settings.
    #[command(flatten)]
    pub training: TrainingArgs,

    /// Sharing settings.
    #[command(flatten)]
    pub sharing: SharingArgs,

    /// Server address and transport security.
    #[command(flatten)]
    pub transport: TransportArgs,

    /// This participant's index in 0..participants; selects its shard.
    #[arg(long, env = "DSSGD_INDEX")]
    pub index: usize,

    /// Participant identifier (default: p followed by the index, three digits).
    #[arg(long, env = "DSSGD_PARTICIPANT_ID")]
    pub participant_id: Option<String>,

    /// Keep retrying an unreachable server for this many seconds per call.
    #[arg(
        long,
        env = "DSSGD_RETRY_SECONDS",
        default_value_t = 300.0,
        allow_negative_numbers = true
    )]
    pub retry_seconds: f64,

    /// After collaborating, also train a fresh model on the same shard alone
    /// with the same settings (the standalone baseline) and record its
    /// accuracy in the metrics.
    #[arg(long, env = "DSSGD_STANDALONE_BASELINE")]
    pub standalone_baseline: bool,
}

/// What is shared and how.
#[derive(Clone, Debug, Args, Serialize)]
pub struct SharingArgs {
    /// Upload fraction theta_u in (0, 1]: each upload carries at most
    /// ceil(theta_u * n) parameter changes.
    #[arg(
        long,
        env = "DSSGD_THETA_U",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    pub theta_u: f64,

    /// Download fraction theta_d in [0, 1]: each epoch starts by downloading
    /// the ceil(theta_d * n) most-updated global parameters.
    #[arg(
        long,
        env = "DSSGD_THETA_D",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub theta_d: f64,

    /// Bound gamma: uploaded changes are clipped to [-gamma, gamma]. The
    /// server adds every participant's changes, so the default suits about
    /// 30 participants; raise it for fewer.
    #[arg(
        long,
        env = "DSSGD_GAMMA",
        default_value_t = 0.0005,
        allow_negative_numbers = true
    )]
    pub gamma: f64,

    /// Threshold tau of the threshold selection rule.
    #[arg(
        long,
        env = "DSSGD_TAU",
        default_value_t = 0.0001,
        allow_negative_numbers = true
    )]
    pub tau: f64,

    /// Rule that picks the changes to upload without noise (default:
    /// largest). With --epsilon or --epsilon-per-parameter the sparse vector
    /// technique selects instead; it is the noisy form of `threshold`, and
    /// `largest` is refused there.
    #[arg(long, env = "DSSGD_SELECTION", value_enum)]
    pub selection: Option<Selection>,

    /// Make every upload differentially private with this epsilon per
    /// upload (per local epoch), by the sparse vector technique with exact
    /// discrete Laplace noise. The unit of privacy is this participant's
    /// whole shard; T uploads spend T times this much.
    #[arg(
        long,
        env = "DSSGD_EPSILON",
        conflicts_with = "epsilon_per_parameter",
        allow_negative_numbers = true
    )]
    pub epsilon: Option<f64>,

    /// Like --epsilon, given per released parameter as Shokri and Shmatikov
    /// report it: each upload spends this times c = ceil(theta_u * n).
    #[arg(
        long,
        env = "DSSGD_EPSILON_PER_PARAMETER",
        allow_negative_numbers = true
    )]
    pub epsilon_per_parameter: Option<f64>,

    /// Total epsilon this participant may spend, over every run recorded in
    /// its privacy ledger. Training stops before the upload that would pass
    /// it. Without it the spend is recorded but not limited.
    #[arg(long, env = "DSSGD_PRIVACY_BUDGET", allow_negative_numbers = true)]
    pub privacy_budget: Option<f64>,

    /// Privacy ledger file: one line per private upload, kept across runs
    /// (default: <participant id>.privacy.jsonl in the current folder).
    #[arg(long, env = "DSSGD_PRIVACY_LEDGER")]
    pub privacy_ledger: Option<PathBuf>,

    /// Code of uploaded values: f32, or f16 for half the bytes at about
    /// three significant decimal digits. f16 needs a gamma of at most 65504.
    #[arg(
        long,
        env = "DSSGD_UPLOAD_VALUES",
        value_enum,
        default_value_t = UploadValues::F32
    )]
    pub upload_values: UploadValues,
}

/// Settings of an evaluation of the global model.
#[derive(Clone, Debug, Args, Serialize)]
pub struct EvaluateArgs {
    /// Data, model and device settings (the training settings are unused).
    #[command(flatten)]
    pub training: TrainingArgs,

    /// Server address and transport security.
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// Participant identifier under which `evaluate` joins the server; with
/// mutual TLS its client certificate must carry this common name.
pub const EVALUATOR_ID: &str = "evaluator";

/// Server address and transport security settings.
#[derive(Clone, Debug, Default, Args, Serialize)]
pub struct TransportArgs {
    /// Address of the parameter server: https://HOST:PORT for TLS, or
    /// http://HOST:PORT for plaintext together with --insecure.
    #[arg(long, env = "DSSGD_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// PEM certificate of the federation's CA, which the server's
    /// certificate must chain to (required for https).
    #[arg(long, env = "DSSGD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate of this participant, for a server that
    /// requires mutual TLS; its common name must be the participant id.
    #[arg(long, env = "DSSGD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DSSGD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify the server's certificate against, when it differs
    /// from the host in --server.
    #[arg(long, env = "DSSGD_TLS_DOMAIN")]
    pub tls_domain: Option<String>,

    /// Allow a plaintext http:// server. The uploads and the global model
    /// then cross the network unencrypted and unauthenticated: use it only
    /// on a trusted network, such as loopback or a private container
    /// network.
    #[arg(long, env = "DSSGD_INSECURE")]
    pub insecure: bool,
}

impl TransportArgs {
    /// Checks the address against the TLS flags and builds the TLS settings
    /// for an https address (`None` for plaintext).
    pub fn client_tls(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        let files = dssgd_server::tls::ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            domain: self.tls_domain.clone(),
        };
        if self.server.starts_with("https://") {
            if self.insecure {
                bail!(
                    "--insecure conflicts with the https address {}: drop --insecure",
                    self.server
                );
            }
            if self.tls_ca.is_none() {
                bail!(
                    "the https address {} needs --tls-ca, the PEM certificate of the CA that signed the server's certificate",
                    self.server
                );
            }
            if self.tls_cert.is_none() {
                warn!(
                    server = %self.server,
                    "no --tls-cert and --tls-key: a server that requires client certificates (mutual TLS) will close the connection"
                );
            }
            return Ok(Some(dssgd_server::tls::client_config(&files)?));
        }
        if files.is_set() {
            bail!(
                "TLS files are given but the address {} is plaintext http; use https://",
                self.server
            );
        }
        if !self.insecure {
            bail!(
                "the address {} is plaintext http: use https:// with --tls-ca (and --tls-cert and --tls-key for mutual TLS), or pass --insecure on a trusted network",
                self.server
            );
        }
        warn!(
            server = %self.server,
            "connecting without TLS (--insecure): uploads and the global model cross the network unencrypted"
        );
        Ok(None)
    }

    /// Flags that reproduce these settings on a child process.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = vec!["--server".to_string(), self.server.clone()];
        let paths = [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ];
        for (flag, path) in paths {
            if let Some(path) = path {
                flags.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        if let Some(domain) = &self.tls_domain {
            flags.extend(["--tls-domain".to_string(), domain.clone()]);
        }
        if self.insecure {
            flags.push("--insecure".into());
        }
        flags
    }
}

/// Settings of a baseline run.
#[derive(Clone, Debug, Args, Serialize)]
pub struct BaselineArgs {
    /// Data, model and training settings.
    #[command(flatten)]
    pub training: TrainingArgs,

    /// Standalone only: train just this participant's shard (default: all,
    /// one after the other, reporting the mean).
    #[arg(long, env = "DSSGD_INDEX")]
    pub index: Option<usize>,
}

impl TrainingArgs {
    /// Checks every setting, returning a one-line error naming the value.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.participants == 0 {
            bail!("invalid participants 0: expected at least 1");
        }
        self.check_model_fits_dataset()?;
        check_unit_open_closed("shard-fraction", self.shard_fraction)?;
        if let Some(alpha) = self.dirichlet_alpha {
            check_positive("dirichlet-alpha", alpha)?;
        }
        if self.epochs == 0 {
            bail!("invalid epochs 0: expected at least 1");
        }
        check_positive("lr", self.learning_rate)?;
        check_non_negative("lr-decay", self.lr_decay)?;
        if self.batch_size == 0 {
            bail!("invalid batch-size 0: expected at least 1");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!(
                "invalid momentum {}: expected a number in [0, 1)",
                self.momentum
            );
        }
        // libtorch starts one worker per thread; tens of thousands overflow
        // the stack, so the count is capped well above any real core count.
        if self.threads == 0 || self.threads > MAX_THREADS {
            bail!(
                "invalid threads {}: expected 1 to {MAX_THREADS}",
                self.threads
            );
        }
        Ok(())
    }

    /// Fails unless the model takes the dataset's images as input.
    fn check_model_fits_dataset(&self) -> anyhow::Result<()> {
        let needed = self.model.dataset();
        if needed == self.dataset {
            return Ok(());
        }
        let models: Vec<&str> = <ModelKind as clap::ValueEnum>::value_variants()
            .iter()
            .filter(|model| model.dataset() == self.dataset)
            .map(|model| model.name())
            .collect();
        bail!(
            "invalid combination of --model {} and --dataset {}: {} trains on {}; pass --dataset {}, or --model {} for {}",
            self.model.name(),
            self.dataset.name(),
            self.model.name(),
            needed.name(),
            needed.name(),
            models.join(" or "),
            self.dataset.name()
        );
    }

    /// Returns the data folder: --data-dir, or the dataset's default.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(self.dataset.default_data_dir()))
    }

    /// Returns the SGD settings.
    pub fn sgd(&self) -> SgdConfig {
        SgdConfig {
            learning_rate: self.learning_rate,
            lr_decay: self.lr_decay,
            batch_size: self.batch_size,
            momentum: self.momentum,
        }
    }

    /// Returns the split of the training set among participants.
    pub fn shard_plan(&self, dataset_len: usize) -> ShardPlan {
        ShardPlan {
            dataset_len,
            participants: self.participants,
            fraction: self.shard_fraction,
            seed: self.data_seed,
        }
    }

    /// Example indices of the shards of participants `indices`, IID or
    /// label-skewed as the settings give, each in increasing order.
    pub fn shards(&self, train: &Dataset, indices: &[usize]) -> Vec<Vec<usize>> {
        let plan = self.shard_plan(train.len());
        match self.dirichlet_alpha {
            None => indices.iter().map(|&index| plan.shard(index)).collect(),
            Some(alpha) => {
                let labels = train.class_labels();
                let mut all = LabelSkew {
                    plan,
                    alpha,
                    labels: &labels,
                    classes: crate::data::CLASS_COUNT,
                }
                .shards();
                indices
                    .iter()
                    .map(|&index| std::mem::take(&mut all[index]))
                    .collect()
            }
        }
    }

    /// Sorted union of every participant's shard: the training set of the
    /// centralized baseline.
    pub fn union(&self, train: &Dataset) -> Vec<usize> {
        let all: Vec<usize> = (0..self.participants).collect();
        let mut union: Vec<usize> = self.shards(train, &all).into_iter().flatten().collect();
        union.sort_unstable();
        union.dedup();
        union
    }

    /// Sets libtorch's intra-op thread count to `threads` and, the first
    /// time, its inter-op thread count to 1.
    pub fn set_threads(threads: usize) {
        tch::set_num_threads(threads as i32);
        // libtorch accepts the inter-op thread count only once per process,
        // before any parallel work; a later call aborts.
        static INTEROP: std::sync::Once = std::sync::Once::new();
        INTEROP.call_once(|| tch::set_num_interop_threads(1));
    }

    /// Sets libtorch's thread count, finds the device and loads the dataset.
    pub(crate) fn prepare(&self) -> anyhow::Result<(tch::Device, Splits)> {
        self.validate()?;
        TrainingArgs::set_threads(self.threads);
        let device = resolve_device(self.device)?;
        let data_dir = self.data_dir();
        self.dataset.ensure(&data_dir, self.download)?;
        let splits = self.dataset.load(&data_dir)?;
        Ok((device, splits))
    }

    /// Builds a fresh model with the shared initial parameters, and its optimizer.
    pub(crate) fn fresh_model(&self, device: tch::Device) -> anyhow::Result<(Model, LocalTrainer)> {
        let model = Model::new(self.model, device, self.init_seed);
        let trainer = LocalTrainer::new(&model, self.sgd())?;
        Ok((model, trainer))
    }
}

impl SharingArgs {
    /// Checks every setting, returning a one-line error naming the value.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_unit_open_closed("theta-u", self.theta_u)?;
        check_unit_closed("theta-d", self.theta_d)?;
        check_positive("gamma", self.gamma)?;
        if self.upload_values == UploadValues::F16 && self.gamma > UploadValues::F16_MAX_GAMMA {
            bail!(
                "--gamma {} is beyond the f16 range of --upload-values f16 (at most {}); \
                 lower --gamma or upload f32 values",
                self.gamma,
                UploadValues::F16_MAX_GAMMA
            );
        }
        check_non_negative("tau", self.tau)?;
        if let Some(epsilon) = self.epsilon {
            check_positive("epsilon", epsilon)?;
        }
        if let Some(epsilon) = self.epsilon_per_parameter {
            check_positive("epsilon-per-parameter", epsilon)?;
        }
        if let (Some(epsilon), Some(per_parameter)) = (self.epsilon, self.epsilon_per_parameter) {
            bail!(
                "--epsilon {epsilon} and --epsilon-per-parameter {per_parameter} both set the \
                 spend of an upload: give only one"
            );
        }
        let private = self.epsilon.is_some() || self.epsilon_per_parameter.is_some();
        if let Some(budget) = self.privacy_budget {
            check_positive("privacy-budget", budget)?;
            if !private {
                bail!(
                    "--privacy-budget {budget} needs a private upload: add --epsilon or \
                     --epsilon-per-parameter"
                );
            }
        }
        if private && self.selection == Some(Selection::Largest) {
            bail!(
                "--selection largest cannot be made private: picking the largest changes reads \
                 them without noise; drop --selection (the private upload uses the sparse vector \
                 technique, a noisy threshold rule)"
            );
        }
        Ok(())
    }

    /// The selection rule of an upload without noise.
    pub fn selection(&self) -> Selection {
        self.selection.unwrap_or(Selection::Largest)
    }

    /// The private upload's settings, if the upload is private.
    pub fn privacy(&self, participant_id: &str) -> Option<PrivacyConfig> {
        let epsilon = match (self.epsilon, self.epsilon_per_parameter) {
            (Some(epsilon), _) => Epsilon::PerEpoch(epsilon),
            (None, Some(per_parameter)) => Epsilon::PerParameter(per_parameter),
            (None, None) => return None,
        };
        Some(PrivacyConfig {
            epsilon,
            budget: self.privacy_budget,
            ledger: self
                .privacy_ledger
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{participant_id}.privacy.jsonl"))),
        })
    }
}

/// Seed of participant `index`'s shuffles: distinct per participant.
pub(crate) fn participant_seed(data_seed: u64, index: usize) -> u64 {
    data_seed
        .wrapping_mul(1_000_003)
        .wrapping_add(index as u64 + 1)
}

/// Runs one collaborating participant.
pub fn collaborate(args: &CollaborateArgs) -> anyhow::Result<()> {
    let training = &args.training;
    args.sharing.validate()?;
    training.validate()?;
    if args.index >= training.participants {
        bail!(
            "invalid index {}: expected a number below participants ({})",
            args.index,
            training.participants
        );
    }
    let give_up_after = dssgd_common::config::check_seconds("retry-seconds", args.retry_seconds)?;
    let participant_id = args
        .participant_id
        .clone()
        .unwrap_or_else(|| format!("p{:03}", args.index));
    check_participant_id(&participant_id)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let retry = RetryPolicy {
        give_up_after,
        ..RetryPolicy::default()
    };
    let mut client = {
        let _guard = runtime.enter();
        Client::new(
            &args.transport.server,
            args.transport.client_tls()?,
            &participant_id,
            crate::client::DEFAULT_MAX_MESSAGE_BYTES,
            retry,
        )?
    };
    let (device, splits) = training.prepare()?;
    let shard = training.shards(&splits.train, &[args.index]).swap_remove(0);
    let train = splits.train.subset(&shard).to_device(device);
    let test = splits.test.to_device(device);
    drop(splits);
    let seat = Seat {
        training,
        sharing: &args.sharing,
        index: args.index,
        device,
        train: &train,
        test: &test,
        standalone_baseline: args.standalone_baseline,
    };
    let mut metrics = seat.run(&runtime, &mut client)?;
    metrics.config = serde_json::to_value(args)?;
    if let Some(path) = &training.metrics {
        metrics
            .write(path)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    println!(
        "{participant_id}: final accuracy {:.4}, global model accuracy {:.4}",
        metrics.final_accuracy,
        metrics.global_accuracy.unwrap_or(f64::NAN)
    );
    if let Some(privacy) = &metrics.privacy {
        println!(
            "{participant_id}: privacy spent: epsilon {} per upload (epsilon/c {} with c = {}), \
             {} this run over {} uploads, {} in total in {}",
            significant(privacy.epsilon_per_epoch, 6),
            significant(privacy.epsilon_per_parameter, 6),
            privacy.c,
            significant(privacy.run_epsilon, 6),
            privacy.private_uploads,
            significant(privacy.total_epsilon, 6),
            privacy.ledger
        );
    }
    if let Some(reason) = &metrics.stopped_early {
        println!("{participant_id}: stopped early: {reason}");
    }
    if let Some(accuracy) = metrics.standalone_accuracy {
        println!("{participant_id}: standalone accuracy {accuracy:.4}");
    }
    Ok(())
}

/// One participant's place in a process, which may host several: its
/// settings, shard and device.
pub(crate) struct Seat<'a> {
    /// Data, model and training settings.
    pub training: &'a TrainingArgs,
    /// Sharing settings, with this participant's privacy ledger.
    pub sharing: &'a SharingArgs,
    /// Index in 0..participants.
    pub index: usize,
    /// Device the shard and model live on.
    pub device: tch::Device,
    /// The participant's shard.
    pub train: &'a Dataset,
    /// The test set.
    pub test: &'a Dataset,
    /// Also train the standalone baseline on the same shard.
    pub standalone_baseline: bool,
}

impl Seat<'_> {
    /// Runs the collaborative loop through `client`, then the standalone
    /// baseline when asked, and returns the metrics.
    pub(crate) fn run(
        &self,
        runtime: &tokio::runtime::Runtime,
        client: &mut Client,
    ) -> anyhow::Result<RunMetrics> {
        let training = self.training;
        let participant_id = client.participant_id().to_string();
        let (model, trainer) = training.fresh_model(self.device)?;
        info!(participant = %participant_id, examples = self.train.len(), device = ?self.device, "shard loaded");
        let config = CollaborativeConfig {
            epochs: training.epochs,
            theta_u: self.sharing.theta_u,
            theta_d: self.sharing.theta_d,
            gamma: self.sharing.gamma,
            tau: self.sharing.tau,
            selection: self.sharing.selection(),
            eval_every: training.eval_every,
            privacy: self.sharing.privacy(&participant_id),
            upload_values: self.sharing.upload_values,
        };
        let seed = participant_seed(training.data_seed, self.index);
        let mut participant = Participant {
            model,
            trainer,
            train: self.train,
            test: self.test,
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        let mut metrics = run_collaborative(runtime, client, &mut participant, &config, |_| {})?;
        if self.standalone_baseline {
            // Same shard, initial parameters and shuffle seed as the
            // standalone subcommand, so both give the same result.
            let alone = train_baseline(
                training,
                self.device,
                participant_id,
                "standalone",
                self.train,
                self.test,
                seed,
            )?;
            metrics.standalone_accuracy = Some(alone.final_accuracy);
        }
        Ok(metrics)
    }
}

/// Downloads every global parameter from the server at `address` into a
/// model of `training.model` and returns its test accuracy and the version
/// it was read at.
pub fn evaluate_global(
    training: &TrainingArgs,
    transport: &TransportArgs,
) -> anyhow::Result<(f64, u64)> {
    GlobalEvaluator::connect(training, transport)?.evaluate()
}

/// A connection that evaluates the global model on the test set, as often
/// as asked, joined as [`EVALUATOR_ID`], a participant that never uploads.
pub struct GlobalEvaluator {
    runtime: tokio::runtime::Runtime,
    client: Client,
    model: Model,
    test: Dataset,
    address: String,
    /// Set once the evaluator has joined, which needs a server that already
    /// has a model.
    parameter_count: Option<u64>,
}

impl GlobalEvaluator {
    /// Loads the test set and prepares a connection to the server; the
    /// first download joins it.
    pub fn connect(training: &TrainingArgs, transport: &TransportArgs) -> anyhow::Result<Self> {
        let (device, splits) = training.prepare()?;
        let test = splits.test.to_device(device);
        drop(splits);
        let model = Model::new(training.model, device, training.init_seed);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let retry = RetryPolicy {
            give_up_after: std::time::Duration::from_secs(30),
            ..Default::default()
        };
        let client = {
            let _guard = runtime.enter();
            Client::new(
                &transport.server,
                transport.client_tls()?,
                EVALUATOR_ID,
                crate::client::DEFAULT_MAX_MESSAGE_BYTES,
                retry,
            )?
        };
        Ok(Self {
            runtime,
            client,
            model,
            test,
            address: transport.server.clone(),
            parameter_count: None,
        })
    }

    /// Joins the server once, after checking that it serves this model;
    /// returns the parameter count.
    fn join(&mut self) -> anyhow::Result<u64> {
        if let Some(count) = self.parameter_count {
            return Ok(count);
        }
        let address = &self.address;
        let status = self.runtime.block_on(self.client.status())?;
        let Some(served) = status.model else {
            bail!("the server at {address} has no model yet because no participant has joined it");
        };
        let local = crate::dssgd::model_info(&self.model);
        if served != local {
            bail!(
                "the server serves {} ({} parameters, layout {}), but --model {} has {} parameters, layout {}",
                served.name,
                served.parameter_count,
                served.layout_hash,
                local.name,
                local.parameter_count,
                local.layout_hash
            );
        }
        // The evaluator joins like a participant that never uploads. The
        // server already has parameters, so it ignores the initial ones.
        let initial = self.model.flat_parameters();
        self.runtime
            .block_on(self.client.join(local.clone(), &initial))?;
        self.parameter_count = Some(local.parameter_count);
        Ok(local.parameter_count)
    }

    /// Downloads every global parameter; returns them with the version they
    /// were read at.
    pub fn download(&mut self) -> anyhow::Result<(Vec<f32>, u64)> {
        let count = self.join()?;
        let parameters = self.runtime.block_on(self.client.download(1.0, count))?;
        Ok((parameters.values, parameters.version))
    }

    /// Returns the test accuracy of the model with `parameters`.
    pub fn accuracy_of(&mut self, parameters: &[f32]) -> anyhow::Result<f64> {
        self.model.set_flat_parameters(parameters)?;
        Ok(crate::train::evaluate(&self.model, &self.test, 100))
    }

    /// Downloads every global parameter and returns the test accuracy and
    /// the version they were read at.
    pub fn evaluate(&mut self) -> anyhow::Result<(f64, u64)> {
        let (parameters, version) = self.download()?;
        Ok((self.accuracy_of(&parameters)?, version))
    }

    /// Returns the server's status.
    pub fn status(&mut self) -> anyhow::Result<dssgd_proto::v1::StatusResponse> {
        Ok(self.runtime.block_on(self.client.status())?)
    }
}

/// Runs the evaluate subcommand.
pub fn evaluate(args: &EvaluateArgs) -> anyhow::Result<()> {
    let (accuracy, version) = evaluate_global(&args.training, &args.transport)?;
    if let Some(path) = &args.training.metrics {
        let record = serde_json::json!({ "accuracy": accuracy, "version": version });
        write_json(path, &record).with_context(|| format!("failed to write {}", path.display()))?;
    }
    println!("global model at version {version}: test accuracy {accuracy:.4}");
    Ok(())
}

/// Summary of a standalone run over several shards.
#[derive(Debug, Serialize)]
struct StandaloneSummary {
    method: &'static str,
    model: String,
    mean_accuracy: f64,
    min_accuracy: f64,
    max_accuracy: f64,
    runs: Vec<RunMetrics>,
    config: BaselineArgs,
}

pub(crate) fn train_baseline(
    training: &TrainingArgs,
    device: tch::Device,
    name: String,
    method: &str,
    train: &Dataset,
    test: &Dataset,
    seed: u64,
) -> anyhow::Result<RunMetrics> {
    let started = std::time::Instant::now();
    let (model, trainer) = training.fresh_model(device)?;
    let mut participant = Participant {
        model,
        trainer,
        train,
        test,
        rng: ChaCha8Rng::seed_from_u64(seed),
    };
    let epochs = train_alone(
        &mut participant,
        training.epochs,
        training.eval_every,
        |record| {
            info!(run = %name, epoch = record.epoch, loss = record.loss, "epoch done");
            std::ops::ControlFlow::Continue(())
        },
    )?;
    let final_accuracy = epochs.last().and_then(|r| r.accuracy).unwrap_or(f64::NAN);
    info!(run = %name, method, final_accuracy, "baseline finished");
    Ok(RunMetrics {
        participant: name,
        method: method.to_string(),
        model: training.model.name().to_string(),
        training_examples: train.len(),
        epochs,
        final_accuracy,
        global_accuracy: None,
        standalone_accuracy: None,
        bytes_sent: 0,
        bytes_received: 0,
        parameters_sent: 0,
        parameters_received: 0,
        wall_seconds: started.elapsed().as_secs_f64(),
        privacy: None,
        stopped_early: None,
        hosted_participants: None,
        process_peak_rss_bytes: None,
        config: serde_json::Value::Null,
    })
}

/// Runs the standalone baseline: each shard trained alone.
pub fn standalone(args: &BaselineArgs) -> anyhow::Result<()> {
    let training = &args.training;
    let (device, splits) = training.prepare()?;
    let indices: Vec<usize> = match args.index {
        Some(index) if index >= training.participants => bail!(
            "invalid index {index}: expected a number below participants ({})",
            training.participants
        ),
        Some(index) => vec![index],
        None => (0..training.participants).collect(),
    };
    let test = splits.test.to_device(device);
    let mut runs = Vec::with_capacity(indices.len());
    for &index in &indices {
        let shard = training.shards(&splits.train, &[index]).swap_remove(0);
        let train = splits.train.subset(&shard).to_device(device);
        let seed = participant_seed(training.data_seed, index);
        let name = format!("p{index:03}");
        runs.push(train_baseline(
            training,
            device,
            name,
            "standalone",
            &train,
            &test,
            seed,
        )?);
        eprintln!(
            "standalone: {} of {} shards trained",
            runs.len(),
            indices.len()
        );
    }
    let accuracies: Vec<f64> = runs.iter().map(|r| r.final_accuracy).collect();
    let summary = StandaloneSummary {
        method: "standalone",
        model: training.model.name().to_string(),
        mean_accuracy: accuracies.iter().sum::<f64>() / accuracies.len() as f64,
        min_accuracy: accuracies.iter().copied().fold(f64::INFINITY, f64::min),
        max_accuracy: accuracies.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        runs,
        config: args.clone(),
    };
    if let Some(path) = &training.metrics {
        write_json(path, &summary)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    println!(
        "standalone: mean accuracy {:.4} over {} shards (min {:.4}, max {:.4})",
        summary.mean_accuracy,
        accuracies.len(),
        summary.min_accuracy,
        summary.max_accuracy
    );
    Ok(())
}

/// Runs the centralized baseline: one model on the union of all shards.
pub fn centralized(args: &BaselineArgs) -> anyhow::Result<()> {
    let training = &args.training;
    let (device, splits) = training.prepare()?;
    let union = training.union(&splits.train);
    let train = splits.train.subset(&union).to_device(device);
    let test = splits.test.to_device(device);
    let mut metrics = train_baseline(
        training,
        device,
        "centralized".into(),
        "centralized",
        &train,
        &test,
        training.data_seed,
    )?;
    metrics.config = serde_json::to_value(args)?;
    if let Some(path) = &training.metrics {
        metrics
            .write(path)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    println!(
        "centralized: accuracy {:.4} on {} pooled examples",
        metrics.final_accuracy,
        train.len()
    );
    Ok(())
}

/// Parses an ordering name from the command line.
pub fn parse_ordering(text: &str) -> Result<Ordering, String> {
    text.parse()
        .map_err(|error: dssgd_common::config::ConfigError| error.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Parses `centralized` with `flags` and returns its training settings.
    fn training(flags: &[&str]) -> TrainingArgs {
        let mut argv = vec!["dssgd-participant", "centralized"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Centralized(args) => args.training,
            other => panic!("expected centralized, got {other:?}"),
        }
    }

    #[test]
    fn svhn_cnn_rejects_mnist() {
        let args = training(&["--model", "svhn-cnn", "--dataset", "mnist"]);
        let message = args.validate().unwrap_err().to_string();
        assert!(
            message.starts_with("invalid combination of --model svhn-cnn and --dataset mnist"),
            "{message}"
        );
        assert!(message.contains("pass --dataset svhn"), "{message}");
        assert!(
            message.contains("--model mlp or cnn for mnist"),
            "{message}"
        );
    }

    #[test]
    fn mnist_models_reject_svhn() {
        for model in ["mlp", "cnn"] {
            let args = training(&["--model", model, "--dataset", "svhn"]);
            let message = args.validate().unwrap_err().to_string();
            assert!(
                message.contains(&format!("--model {model} and --dataset svhn")),
                "{message}"
            );
            assert!(message.contains("pass --dataset mnist"), "{message}");
            assert!(message.contains("--model svhn-cnn for svhn"), "{message}");
        }
    }

    #[test]
    fn matching_model_and_dataset_validate() {
        for (model, dataset) in [("mlp", "mnist"), ("cnn", "mnist"), ("svhn-cnn", "svhn")] {
            let args = training(&["--model", model, "--dataset", dataset]);
            assert!(args.validate().is_ok(), "{model} on {dataset}");
        }
    }

    /// Parses `collaborate` with `flags` and returns its sharing settings.
    fn sharing(flags: &[&str]) -> SharingArgs {
        let mut argv = vec!["dssgd-participant", "collaborate", "--index", "0"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Collaborate(args) => args.sharing,
            other => panic!("expected collaborate, got {other:?}"),
        }
    }

    #[test]
    fn f16_uploads_need_small_gamma() {
        let default = sharing(&[]);
        assert_eq!(default.upload_values, UploadValues::F32);
        let f16 = sharing(&["--upload-values", "f16", "--gamma", "0.01"]);
        assert_eq!(f16.upload_values, UploadValues::F16);
        assert!(f16.validate().is_ok());
        assert!(
            sharing(&["--upload-values", "f16", "--gamma", "65504"])
                .validate()
                .is_ok()
        );
        let message = sharing(&["--upload-values", "f16", "--gamma", "70000"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--gamma 70000"), "{message}");
        assert!(message.contains("65504"), "{message}");
        assert!(
            sharing(&["--gamma", "70000"]).validate().is_ok(),
            "f32 uploads take any gamma"
        );
    }

    #[test]
    fn data_dir_defaults_per_dataset() {
        let mut args = training(&["--model", "svhn-cnn", "--dataset", "svhn"]);
        // Cleared in case DSSGD_DATA_DIR is set where the tests run.
        args.data_dir = None;
        assert_eq!(args.data_dir(), PathBuf::from("data/svhn"));
        args.dataset = DatasetKind::Mnist;
        assert_eq!(args.data_dir(), PathBuf::from("data/mnist"));
        args.data_dir = Some(PathBuf::from("/srv/digits"));
        assert_eq!(args.data_dir(), PathBuf::from("/srv/digits"));
    }
}
