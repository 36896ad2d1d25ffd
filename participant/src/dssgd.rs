//! The participant side of Distributed Selective SGD: per local epoch,
//! download the most-updated global parameters, train one epoch, select and
//! bound part of the parameter change, and upload it.

use std::time::{Duration, Instant};

use std::path::PathBuf;

use dssgd_common::config::Ordering;
use dssgd_common::privacy::{DiscreteLaplace, PrivacyError, PrivateUpload};
use dssgd_common::select::{fraction_count, gather_bounded, select_largest, select_threshold};
use dssgd_common::sparse::{self, IndexEncoding, SliceEncoding, ValueEncoding};
use dssgd_proto::v1 as pb;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client::{Client, ClientError};
use crate::data::Dataset;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{EpochRecord, PrivacySummary, RunMetrics};
use crate::model::Model;
use crate::train::{LocalTrainer, TrainError, evaluate};

/// Mini-batch size of test evaluation. The CNN evaluates about twice as fast
/// in batches of 100 as in batches of 1,000 on a CPU core; the MLP does not
/// care.
const EVAL_BATCH: usize = 100;

/// Rule that picks which parameter changes to upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// The `c` changes with the largest absolute value.
    Largest,
    /// Changes at least `tau` in absolute value, visited in random order,
    /// until `c` are taken.
    Threshold,
}

/// Code of uploaded values on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UploadValues {
    /// IEEE 754 binary32, four bytes a value.
    #[default]
    F32,
    /// IEEE 754 binary16, two bytes a value: about three significant
    /// decimal digits, and magnitudes up to 65504, so gamma must not exceed
    /// that.
    F16,
}

impl UploadValues {
    /// Largest gamma whose bound binary16 can represent.
    pub const F16_MAX_GAMMA: f64 = 65504.0;

    /// Returns the wire code.
    pub fn encoding(self) -> ValueEncoding {
        match self {
            UploadValues::F32 => ValueEncoding::F32,
            UploadValues::F16 => ValueEncoding::F16,
        }
    }
}

/// Settings of the collaborative loop.
#[derive(Clone, Debug, Serialize)]
pub struct CollaborativeConfig {
    /// Number of local epochs (one upload each).
    pub epochs: usize,
    /// Upload fraction theta_u in (0, 1].
    pub theta_u: f64,
    /// Download fraction theta_d in [0, 1].
    pub theta_d: f64,
    /// Bound gamma: uploaded values are clipped to [-gamma, gamma].
    pub gamma: f64,
    /// Threshold tau of the threshold selection.
    pub tau: f64,
    /// Selection rule.
    pub selection: Selection,
    /// Evaluate test accuracy every this many epochs (and after the last).
    pub eval_every: usize,
    /// Differentially private upload; `None` uploads without noise.
    pub privacy: Option<PrivacyConfig>,
    /// Code of uploaded values.
    pub upload_values: UploadValues,
}

/// How much privacy each upload spends.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Epsilon {
    /// `epsilon` per upload (per local epoch).
    PerEpoch(f64),
    /// `epsilon / c` per upload, the per-parameter unit of Shokri and
    /// Shmatikov: each upload spends this times `c`.
    PerParameter(f64),
}

impl Epsilon {
    /// The spend of one upload releasing at most `c` parameters.
    pub fn per_epoch(self, c: usize) -> f64 {
        match self {
            Epsilon::PerEpoch(epsilon) => epsilon,
            Epsilon::PerParameter(per_parameter) => per_parameter * c as f64,
        }
    }
}

/// Settings of the differentially private upload.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyConfig {
    /// Spend of each upload.
    pub epsilon: Epsilon,
    /// Total spend allowed over every run recorded in the ledger.
    pub budget: Option<f64>,
    /// The ledger file.
    pub ledger: PathBuf,
}

/// Errors that end a collaborative run.
#[derive(Debug, thiserror::Error)]
pub enum DssgdError {
    /// A call to the server failed for good.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The server serves a different model.
    #[error("the server serves {server}, but this participant has {local}")]
    ModelMismatch {
        /// The server's model, described.
        server: String,
        /// The local model, described.
        local: String,
    },
    /// A downloaded slice does not fit the local model.
    #[error("downloaded parameters do not fit the local model: {0}")]
    Download(String),
    /// The privacy ledger failed or refused the spend.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The private upload's settings are invalid or its noise failed.
    #[error("private upload: {0}")]
    Privacy(#[from] PrivacyError),
    /// The parameter change contains NaN or infinity.
    #[error(
        "local training produced a non-finite change at parameter {index}; lower the learning rate"
    )]
    NonFiniteChange {
        /// First offending parameter.
        index: usize,
    },
    /// The bound gamma is above the largest one the server accepts.
    #[error(
        "invalid gamma {gamma}: the server accepts at most {max_gamma} (its --max-gamma or DSSGD_MAX_GAMMA); pass --gamma {max_gamma} or less"
    )]
    GammaTooLarge {
        /// This participant's gamma.
        gamma: f64,
        /// The server's limit.
        max_gamma: f64,
    },
}

/// Identity of `model` as the protocol describes it.
pub fn model_info(model: &Model) -> pb::ModelInfo {
    pb::ModelInfo {
        name: model.kind.name().to_string(),
        parameter_count: model.parameter_count() as u64,
        layout_hash: model.layout_hash(),
    }
}

fn describe(info: &pb::ModelInfo) -> String {
    format!(
        "{} ({} parameters, layout {})",
        info.name, info.parameter_count, info.layout_hash
    )
}

/// Everything one participant trains with.
pub struct Participant<'a, R: Rng> {
    /// The local model.
    pub model: Model,
    /// Its optimizer and schedule.
    pub trainer: LocalTrainer,
    /// The participant's shard of the training set.
    pub train: &'a Dataset,
    /// The test set.
    pub test: &'a Dataset,
    /// Source of shuffles and threshold selection.
    pub rng: R,
}

/// A held turn whose lease a background task renews until it is dropped.
struct HeldTurn {
    token: String,
    stop: watch::Sender<bool>,
}

impl Drop for HeldTurn {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn hold_turn(runtime: &Runtime, client: &mut Client) -> Result<HeldTurn, ClientError> {
    let (token, lease) = runtime.block_on(client.acquire_turn())?;
    let (stop, mut stopped) = watch::channel(false);
    let mut renewer = client.clone();
    let renew_token = token.clone();
    // Renewing at a third of the lease leaves two chances before it expires.
    let period = (lease / 3).max(Duration::from_millis(100));
    runtime.spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(period) => {}
            }
            if let Err(error) = renewer.renew_turn(&renew_token).await {
                warn!(participant = %renewer.participant_id(), %error, "renewing the turn failed");
                return;
            }
        }
    });
    Ok(HeldTurn { token, stop })
}

/// Runs the collaborative loop against the server behind `client` and
/// returns the participant's metrics. `on_epoch` is called with each finished epoch.
pub fn run_collaborative<R: Rng>(
    runtime: &Runtime,
    client: &mut Client,
    participant: &mut Participant<'_, R>,
    config: &CollaborativeConfig,
    mut on_epoch: impl FnMut(&EpochRecord),
) -> Result<RunMetrics, DssgdError> {
    let started = Instant::now();
    let local = model_info(&participant.model);
    let initial = participant.model.flat_parameters();
    let joined = runtime.block_on(client.join(local.clone(), &initial))?;
    let served = joined.model.clone().unwrap_or_default();
    if served != local {
        return Err(DssgdError::ModelMismatch {
            server: describe(&served),
            local: describe(&local),
        });
    }
    // A server without the limit, or one older than the field, sends 0.
    if joined.max_gamma > 0.0 && config.gamma > joined.max_gamma {
        return Err(DssgdError::GammaTooLarge {
            gamma: config.gamma,
            max_gamma: joined.max_gamma,
        });
    }
    let ordering = match pb::Ordering::try_from(joined.ordering) {
        Ok(pb::Ordering::RoundRobin) => Ordering::RoundRobin,
        Ok(pb::Ordering::RandomOrder) => Ordering::RandomOrder,
        _ => Ordering::Asynchronous,
    };
    info!(
        participant = %client.participant_id(),
        version = joined.version,
        ordering = ordering.name(),
        initialized = joined.initialized_parameters,
        "joined the federation"
    );

    let n = participant.model.parameter_count();
    let c = fraction_count(config.theta_u, n);
    // Upload ids continue above the last one the server applied, so a
    // restarted participant never reuses an id.
    let first_upload_id = joined.last_upload_id + 1;
    let mut epochs = Vec::with_capacity(config.epochs);
    let (mut parameters_sent, mut parameters_received) = (0u64, 0u64);
    let mut private = match &config.privacy {
        Some(privacy) => Some(PrivateState::start(
            privacy,
            client.participant_id(),
            config,
            c,
        )?),
        None => None,
    };
    let mut stopped_early = None;

    for epoch in 1..=config.epochs {
        if let Some(state) = &private
            && let Err(refused) = state.ledger.check(state.upload.epsilon)
        {
            warn!(participant = %client.participant_id(), epoch, "{refused}; stopping");
            stopped_early = Some(refused.to_string());
            break;
        }
        let epoch_started = Instant::now();
        let turn = if ordering.uses_turns() {
            Some(hold_turn(runtime, client)?)
        } else {
            None
        };

        let downloaded = runtime.block_on(client.download(config.theta_d, n as u64))?;
        let received = apply_download(&mut participant.model, &downloaded)?;
        parameters_received += received as u64;

        let before = participant.model.flat_parameters();
        let loss = participant.trainer.train_epoch(
            &participant.model,
            participant.train,
            &mut participant.rng,
        )?;
        let after = participant.model.flat_parameters();
        let delta: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        if let Some(index) = delta.iter().position(|d| !d.is_finite()) {
            return Err(DssgdError::NonFiniteChange { index });
        }

        let upload_id = first_upload_id + (epoch as u64 - 1);
        let (indices, values, spent) = match &mut private {
            Some(state) => {
                let privacy_started = Instant::now();
                let release = state.upload.release(&delta, &mut state.noise)?;
                // The spend is on disk before the release leaves the process.
                let total = state
                    .ledger
                    .record(upload_id, epoch, state.upload.epsilon, c)?;
                state.run_epsilon += state.upload.epsilon;
                state.uploads += 1;
                let seconds = privacy_started.elapsed().as_secs_f64();
                (release.indices, release.values, Some((total, seconds)))
            }
            None => {
                let indices = match config.selection {
                    Selection::Largest => select_largest(&delta, c),
                    Selection::Threshold => {
                        select_threshold(&delta, c, config.tau as f32, &mut participant.rng)
                    }
                };
                let values = gather_bounded(&delta, &indices, config.gamma as f32);
                (indices, values, None)
            }
        };
        let request = pb::UploadRequest {
            participant_id: client.participant_id().to_string(),
            upload_id,
            base_version: downloaded.version,
            layout_hash: local.layout_hash.clone(),
            gamma: config.gamma,
            theta_u: config.theta_u,
            changes: Some(encode_changes(&indices, &values, config.upload_values)),
            turn_token: turn.as_ref().map(|t| t.token.clone()).unwrap_or_default(),
            epsilon: private.as_ref().map_or(0.0, |state| state.upload.epsilon),
        };
        // An upload rejected as stale is dropped; the next epoch trains on a
        // fresh download. Its privacy spend stays in the ledger, because its
        // noisy values were computed (and sent) all the same.
        let uploaded = match runtime.block_on(client.upload(request)) {
            Ok(uploaded) => Some(uploaded),
            Err(error) if error.is_stale() => {
                warn!(
                    participant = %client.participant_id(),
                    epoch,
                    upload_id,
                    error = %error,
                    "upload dropped as stale; the next epoch downloads again"
                );
                None
            }
            Err(error) => return Err(error.into()),
        };
        let applied = if uploaded.is_some() { indices.len() } else { 0 };
        parameters_sent += applied as u64;
        if let Some(turn) = turn {
            let token = turn.token.clone();
            drop(turn);
            runtime.block_on(client.release_turn(&token))?;
        }

        let evaluate_now = epoch % config.eval_every.max(1) == 0 || epoch == config.epochs;
        let accuracy =
            evaluate_now.then(|| evaluate(&participant.model, participant.test, EVAL_BATCH));
        let record = EpochRecord {
            epoch,
            loss,
            accuracy,
            version: Some(downloaded.version),
            parameters_downloaded: received,
            parameters_uploaded: applied,
            seconds: epoch_started.elapsed().as_secs_f64(),
            epsilon: private.as_ref().map(|state| state.upload.epsilon),
            epsilon_total: spent.map(|(total, _)| total),
            privacy_seconds: spent.map(|(_, seconds)| seconds),
        };
        info!(
            participant = %client.participant_id(),
            epoch,
            version = uploaded.as_ref().map(|uploaded| uploaded.version),
            loss,
            accuracy,
            uploaded = applied,
            epsilon = record.epsilon.unwrap_or(0.0),
            epsilon_total = record.epsilon_total.unwrap_or(0.0),
            "epoch done"
        );
        on_epoch(&record);
        epochs.push(record);
    }

    // The participant's final model: its local model with one last download
    // of theta_d, as at the start of every epoch.
    let last = runtime.block_on(client.download(config.theta_d, n as u64))?;
    parameters_received += apply_download(&mut participant.model, &last)? as u64;
    let final_accuracy = evaluate(&participant.model, participant.test, EVAL_BATCH);
    let global_accuracy = if last.indices.is_none() {
        final_accuracy
    } else {
        let full = runtime.block_on(client.download(1.0, n as u64))?;
        apply_download(&mut participant.model, &full)?;
        evaluate(&participant.model, participant.test, EVAL_BATCH)
    };
    info!(
        participant = %client.participant_id(),
        final_accuracy,
        global_accuracy,
        "collaborative training finished"
    );
    let traffic = client.traffic();
    Ok(RunMetrics {
        participant: client.participant_id().to_string(),
        method: "collaborative".into(),
        model: local.name,
        training_examples: participant.train.len(),
        epochs,
        final_accuracy,
        global_accuracy: Some(global_accuracy),
        standalone_accuracy: None,
        bytes_sent: traffic.bytes_sent,
        bytes_received: traffic.bytes_received,
        parameters_sent,
        parameters_received,
        wall_seconds: started.elapsed().as_secs_f64(),
        privacy: private.map(|state| state.summary()),
        stopped_early,
        hosted_participants: None,
        process_peak_rss_bytes: None,
        config: serde_json::to_value(config).unwrap_or_default(),
    })
}

/// The private upload's state during a run.
struct PrivateState {
    upload: PrivateUpload,
    noise: DiscreteLaplace,
    ledger: Ledger,
    run_epsilon: f64,
    uploads: usize,
}

impl PrivateState {
    /// Opens the ledger, checks the settings and seeds the noise.
    fn start(
        privacy: &PrivacyConfig,
        participant: &str,
        config: &CollaborativeConfig,
        c: usize,
    ) -> Result<Self, DssgdError> {
        let upload = PrivateUpload {
            epsilon: privacy.epsilon.per_epoch(c),
            c,
            gamma: config.gamma,
            tau: config.tau,
        };
        let scales = upload.scales()?;
        let noise = DiscreteLaplace::from_os_entropy().map_err(PrivacyError::from)?;
        let ledger = Ledger::open(&privacy.ledger, participant, privacy.budget)?;
        info!(
            participant,
            epsilon_per_epoch = upload.epsilon,
            epsilon_per_parameter = upload.epsilon / c as f64,
            c,
            epsilon_for_this_run = upload.epsilon * config.epochs as f64,
            already_spent = ledger.total(),
            budget = privacy.budget.unwrap_or(f64::INFINITY),
            ledger = %ledger.path().display(),
            threshold_noise_steps = scales.threshold,
            release_noise_steps = scales.release,
            "differentially private upload"
        );
        Ok(Self {
            upload,
            noise,
            ledger,
            run_epsilon: 0.0,
            uploads: 0,
        })
    }

    fn summary(&self) -> PrivacySummary {
        PrivacySummary {
            epsilon_per_epoch: self.upload.epsilon,
            c: self.upload.c,
            epsilon_per_parameter: self.upload.epsilon / self.upload.c as f64,
            run_epsilon: self.run_epsilon,
            total_epsilon: self.ledger.total(),
            budget: self.ledger.budget(),
            private_uploads: self.uploads,
            ledger: self.ledger.path().display().to_string(),
        }
    }
}

/// Packs an upload's changes: Rice-coded indices, which cost about
/// `log2(1/theta_u) + 1.6` bits each, and values in `values_encoding`.
fn encode_changes(
    indices: &[u32],
    values: &[f32],
    values_encoding: UploadValues,
) -> pb::SparseSlice {
    let encoding = SliceEncoding {
        indices: IndexEncoding::Rice,
        values: values_encoding.encoding(),
    };
    pb::SparseSlice::from_payloads(
        sparse::encode_indices_rice(indices),
        sparse::encode_values_with(values, encoding.values),
        encoding,
    )
}

/// Writes downloaded values into the local model; returns how many.
fn apply_download(
    model: &mut Model,
    downloaded: &crate::client::Downloaded,
) -> Result<usize, DssgdError> {
    let result = match &downloaded.indices {
        None => model.set_flat_parameters(&downloaded.values),
        Some(indices) => model.overwrite_parameters(indices, &downloaded.values),
    };
    result.map_err(|error| DssgdError::Download(error.to_string()))?;
    Ok(downloaded.values.len())
}

/// Trains `model` alone on `train` for `epochs` epochs (the standalone and
/// centralized baselines), evaluating every `eval_every` epochs. Stops
/// early, returning the epochs so far, when `on_epoch` breaks.
pub fn train_alone<R: Rng>(
    participant: &mut Participant<'_, R>,
    epochs: usize,
    eval_every: usize,
    mut on_epoch: impl FnMut(&EpochRecord) -> std::ops::ControlFlow<()>,
) -> Result<Vec<EpochRecord>, TrainError> {
    let mut records = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let started = Instant::now();
        let loss = participant.trainer.train_epoch(
            &participant.model,
            participant.train,
            &mut participant.rng,
        )?;
        let evaluate_now = epoch % eval_every.max(1) == 0 || epoch == epochs;
        let accuracy =
            evaluate_now.then(|| evaluate(&participant.model, participant.test, EVAL_BATCH));
        let record = EpochRecord {
            epoch,
            loss,
            accuracy,
            version: None,
            parameters_downloaded: 0,
            parameters_uploaded: 0,
            seconds: started.elapsed().as_secs_f64(),
            epsilon: None,
            epsilon_total: None,
            privacy_seconds: None,
        };
        let flow = on_epoch(&record);
        records.push(record);
        if flow.is_break() {
            break;
        }
    }
    Ok(records)
}
