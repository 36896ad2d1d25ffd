//! The experiment runner: a whole evaluation from one TOML file.
//!
//! A configuration names a grid of cells. Each cell is one run: a
//! collaborative federation (the real server and real participant
//! processes over gRPC, as `simulate` runs them) or a reference (the
//! standalone or centralized baseline, trained in this process). The
//! runner adds the references each collaborative cell needs and runs every
//! cell that has no result yet. After each cell it rewrites the outputs:
//! the effective configuration, a CSV and a JSON of every cell, the plots
//! (PNG and SVG) and a Markdown report.
//!
//! A cell's identity is a hash of its settings, and a finished cell keeps
//! its result in `cells/ID/result.json`. Starting the same experiment again
//! skips finished cells, so a long grid can run across several sittings.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dssgd_common::config::Ordering;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cli::{SharingArgs, TrainingArgs, participant_seed};
use crate::data::{Dataset, DatasetKind, Splits};
use crate::device::DeviceChoice;
use crate::dssgd::{Participant, Selection, UploadValues, train_alone};
use crate::metrics::write_json;
use crate::model::ModelKind;
use crate::simulate::{Progress, SimulateArgs, stop_flag};

/// Settings of the `experiment` subcommand.
#[derive(Clone, Debug, Args, Serialize)]
pub struct ExperimentArgs {
    /// The experiment's TOML configuration.
    pub config: PathBuf,

    /// Folder for the cells, the tables, the plots and the report
    /// (default: runs/NAME, with NAME from the configuration).
    #[arg(long, env = "DSSGD_OUTPUT")]
    pub output: Option<PathBuf>,

    /// Folder with the MNIST files.
    #[arg(long, env = "DSSGD_DATA_DIR", default_value = "data/mnist")]
    pub data_dir: PathBuf,

    /// Folder with the SVHN files train_32x32.mat and test_32x32.mat.
    #[arg(long, env = "DSSGD_SVHN_DIR", default_value = "data/svhn")]
    pub svhn_dir: PathBuf,

    /// Do not download a dataset whose folder lacks it.
    #[arg(long)]
    pub no_download: bool,

    /// List the cells and whether each is finished, then stop.
    #[arg(long)]
    pub dry_run: bool,

    /// Rewrite the tables, plots and report from the finished cells without
    /// running any.
    #[arg(long, conflicts_with = "dry_run")]
    pub report_only: bool,

    /// Device to train on.
    #[arg(long, env = "DSSGD_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,

    /// Participants hosted by each participant process (0: as simulate
    /// chooses, at most 32 processes). Overrides the configuration.
    #[arg(long)]
    pub participants_per_process: Option<usize>,

    /// Path of the dssgd-server binary (default: next to this binary).
    #[arg(long, env = "DSSGD_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
}

impl ExperimentArgs {
    /// Returns the data folder of `cell`'s dataset.
    fn data_dir(&self, cell: &CellSettings) -> &Path {
        match cell.dataset_kind() {
            Ok(DatasetKind::Svhn) => &self.svhn_dir,
            _ => &self.data_dir,
        }
    }
}

/// Kind of run a cell makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The federation: a server and every participant over gRPC.
    Collaborative,
    /// Each participant's shard trained alone; the mean accuracy.
    Standalone,
    /// One model trained on the union of the shards.
    Centralized,
}

impl Method {
    /// Returns the lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Collaborative => "collaborative",
            Method::Standalone => "standalone",
            Method::Centralized => "centralized",
        }
    }
}

/// Every setting of one cell. The keys are those of the configuration's
/// `[base]` and `[[grid]]` tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSettings {
    /// Kind of run.
    pub method: Method,
    /// Dataset name.
    pub dataset: String,
    /// Network.
    pub model: ModelKind,
    /// Number of participants.
    pub participants: usize,
    /// Fraction of the training set each participant holds.
    pub shard_fraction: f64,
    /// Dirichlet concentration of a non-IID split; absent for IID.
    pub dirichlet_alpha: Option<f64>,
    /// Ordering of participants.
    pub ordering: Ordering,
    /// Upload fraction.
    pub theta_u: f64,
    /// Download fraction.
    pub theta_d: f64,
    /// Bound on uploaded values.
    pub gamma: f64,
    /// Threshold of the threshold selection.
    pub tau: f64,
    /// Selection rule; absent for the default.
    pub selection: Option<Selection>,
    /// Privacy spend per upload.
    pub epsilon: Option<f64>,
    /// Privacy spend per released parameter: the spend of an upload divided
    /// by the most parameters it may release.
    pub epsilon_per_parameter: Option<f64>,
    /// Code of uploaded values. Left out of the serialised settings when it
    /// is f32, so cells of configurations that predate it keep their ids.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub upload_values: UploadValues,
    /// Local epochs.
    pub epochs: usize,
    /// Learning rate.
    pub lr: f64,
    /// Learning-rate decay per step.
    pub lr_decay: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// Evaluate every this many epochs.
    pub eval_every: usize,
    /// Seed of the split and the shuffles.
    pub seed: u64,
    /// Seed of the initial parameters.
    pub init_seed: i64,
    /// Shards the standalone reference trains (the first ones); its mean
    /// estimates the mean over every participant.
    pub standalone_sample: usize,
}

fn is_f32(values: &UploadValues) -> bool {
    *values == UploadValues::F32
}

/// Settings every cell starts from, before `[base]` and the grid.
fn defaults() -> Map<String, Value> {
    let value = serde_json::json!({
        "method": "collaborative",
        "dataset": "mnist",
        "model": "mlp",
        "participants": 30,
        "shard_fraction": 0.01,
        "ordering": "asynchronous",
        "theta_u": 0.1,
        "theta_d": 1.0,
        "gamma": 0.0005,
        "tau": 0.0001,
        "upload_values": "f32",
        "epochs": 60,
        "lr": 0.1,
        "lr_decay": 0.0,
        "batch_size": 32,
        "momentum": 0.0,
        "eval_every": 10,
        "seed": 1,
        "init_seed": 42,
        "standalone_sample": 30,
    });
    match value {
        Value::Object(map) => map,
        _ => unreachable!("the defaults are an object"),
    }
}

/// Keys whose values do not change the training of a reference.
pub const SHARING_KEYS: [&str; 10] = [
    "ordering",
    "theta_u",
    "theta_d",
    "gamma",
    "tau",
    "selection",
    "epsilon",
    "epsilon_per_parameter",
    "upload_values",
    "standalone_sample",
];

impl CellSettings {
    /// Returns every setting by its configuration key.
    pub fn to_map(&self) -> Map<String, Value> {
        let mut map = match serde_json::to_value(self).expect("settings serialize") {
            Value::Object(map) => map,
            _ => unreachable!("settings are an object"),
        };
        map.entry("upload_values")
            .or_insert_with(|| serde_json::to_value(self.upload_values).expect("a name"));
        map
    }

    /// Returns the cell's identity: a hash of every setting.
    pub fn id(&self) -> String {
        let text = serde_json::to_string(self).expect("settings serialize");
        let digest = Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("{}-{}-{hex}", self.method.name(), self.model.name())
    }

    /// Returns whether uploads are differentially private.
    pub fn private(&self) -> bool {
        self.epsilon.is_some() || self.epsilon_per_parameter.is_some()
    }

    /// Returns the reference cell of `method` that this cell is compared
    /// with: the same training settings, with the sharing settings at their
    /// defaults.
    pub fn reference(&self, method: Method) -> CellSettings {
        let mut map = self.to_map();
        let defaults = defaults();
        for key in SHARING_KEYS {
            match defaults.get(key) {
                Some(value) => map.insert(key.into(), value.clone()),
                None => map.insert(key.into(), Value::Null),
            };
        }
        map.insert(
            "method".into(),
            serde_json::to_value(method).expect("method"),
        );
        let sample = if method == Method::Standalone {
            self.standalone_sample.min(self.participants)
        } else {
            0
        };
        map.insert("standalone_sample".into(), sample.into());
        serde_json::from_value(Value::Object(map)).expect("a reference is valid settings")
    }

    /// Returns the dataset named by `dataset`.
    pub fn dataset_kind(&self) -> anyhow::Result<DatasetKind> {
        match self.dataset.as_str() {
            "mnist" => Ok(DatasetKind::Mnist),
            "svhn" => Ok(DatasetKind::Svhn),
            other => bail!("invalid dataset {other:?}: expected \"mnist\" or \"svhn\""),
        }
    }

    /// Returns the participant's training settings, reading the dataset
    /// from `data_dir`.
    pub fn training(&self, data_dir: &Path, device: DeviceChoice) -> TrainingArgs {
        TrainingArgs {
            model: self.model,
            dataset: self.dataset_kind().unwrap_or(DatasetKind::Mnist),
            data_dir: Some(data_dir.to_path_buf()),
            download: false,
            participants: self.participants,
            shard_fraction: self.shard_fraction,
            data_seed: self.seed,
            dirichlet_alpha: self.dirichlet_alpha,
            init_seed: self.init_seed,
            epochs: self.epochs,
            learning_rate: self.lr,
            lr_decay: self.lr_decay,
            batch_size: self.batch_size,
            momentum: self.momentum,
            eval_every: self.eval_every,
            device,
            threads: 1,
            metrics: None,
        }
    }

    /// Returns the participant's sharing settings.
    pub fn sharing(&self) -> SharingArgs {
        SharingArgs {
            theta_u: self.theta_u,
            theta_d: self.theta_d,
            gamma: self.gamma,
            tau: self.tau,
            selection: self.selection,
            epsilon: self.epsilon,
            epsilon_per_parameter: self.epsilon_per_parameter,
            privacy_budget: None,
            privacy_ledger: None,
            upload_values: self.upload_values,
        }
    }

    /// Checks every setting as the participant's command line would.
    fn validate(&self) -> anyhow::Result<()> {
        self.dataset_kind()?;
        self.training(Path::new("."), DeviceChoice::Cpu)
            .validate()?;
        self.sharing().validate()?;
        if self.standalone_sample == 0 {
            bail!("invalid standalone_sample 0: expected at least 1 shard");
        }
        if self.eval_every == 0 {
            bail!("invalid eval_every 0: expected at least 1 epoch");
        }
        Ok(())
    }

    /// Relative cost of the cell, in example-epochs weighted by the model's
    /// cost per example, for the estimate of the time left.
    fn cost(&self) -> u64 {
        let dataset = match self.dataset_kind() {
            Ok(DatasetKind::Svhn) => 73_257.0,
            _ => 60_000.0,
        };
        let shard = (self.shard_fraction * dataset).round().max(1.0) as u64;
        let examples = match self.method {
            Method::Collaborative => shard * self.participants as u64,
            Method::Standalone => shard * self.standalone_sample as u64,
            Method::Centralized => (shard * self.participants as u64).min(dataset as u64),
        };
        let weight = match self.model {
            ModelKind::Mlp => 1,
            ModelKind::Cnn => 8,
            ModelKind::SvhnCnn => 40,
        };
        examples * self.epochs as u64 * weight
    }
}

/// The `[experiment]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// Short name: the default output folder is runs/NAME.
    pub name: String,
    /// Description of the experiment, for the report.
    #[serde(default)]
    pub description: String,
    /// Add the standalone and centralized references of every
    /// collaborative cell.
    #[serde(default = "yes")]
    pub references: bool,
    /// Participants hosted by each participant process (0: automatic).
    #[serde(default)]
    pub participants_per_process: usize,
}

fn yes() -> bool {
    true
}

/// A configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    experiment: ExperimentSection,
    #[serde(default)]
    base: toml::Table,
    #[serde(default)]
    grid: Vec<toml::Table>,
    #[serde(default)]
    plot: Vec<PlotSpec>,
}

/// Numeric settings a `[[plot]]` can take as its x axis.
const NUMERIC_KEYS: [&str; 16] = [
    "participants",
    "shard_fraction",
    "dirichlet_alpha",
    "theta_u",
    "theta_d",
    "gamma",
    "tau",
    "epsilon",
    "epsilon_per_parameter",
    "epochs",
    "lr",
    "lr_decay",
    "batch_size",
    "momentum",
    "seed",
    "standalone_sample",
];

/// A parsed experiment: its header and its cells, in running order.
#[derive(Clone, Debug)]
pub struct Experiment {
    /// The `[experiment]` table.
    pub section: ExperimentSection,
    /// Every cell, references first, without repeats.
    pub cells: Vec<CellSettings>,
    /// For each `[[grid]]` table, the positions in `cells` of its
    /// collaborative cells.
    pub grids: Vec<Vec<usize>>,
    /// The `[[plot]]` tables.
    pub plots: Vec<PlotSpec>,
}

/// A `[[plot]]` table: one more chart, over the finished collaborative
/// cells that match `where`, across grids.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlotSpec {
    /// The x axis: `epoch`, or a numeric setting such as `participants`.
    pub x: String,
    /// Settings a cell must have to be drawn.
    #[serde(default, rename = "where")]
    pub filter: Map<String, Value>,
    /// Settings whose combinations make the lines (default: every other
    /// setting that varies among the drawn cells).
    #[serde(default)]
    pub series: Option<Vec<String>>,
    /// Chart title.
    #[serde(default)]
    pub title: Option<String>,
}

/// Type a setting takes.
#[derive(Clone, Copy)]
enum Kind {
    /// A whole number at least 0.
    Count,
    /// A whole number, possibly negative.
    Integer,
    /// A finite number.
    Number,
    /// One of the names the function returns, in quotes.
    Name(fn() -> Vec<String>),
}

/// Returns the names the command line accepts for `T`, which experiment
/// files accept too.
fn value_names<T: clap::ValueEnum>() -> Vec<String> {
    T::value_variants()
        .iter()
        .filter_map(T::to_possible_value)
        .map(|value| value.get_name().to_string())
        .collect()
}

/// Returns the names of the kinds of run.
fn method_names() -> Vec<String> {
    [
        Method::Collaborative,
        Method::Standalone,
        Method::Centralized,
    ]
    .map(|method| method.name().to_string())
    .to_vec()
}

/// Returns the names of the orderings.
fn ordering_names() -> Vec<String> {
    [
        Ordering::Asynchronous,
        Ordering::RoundRobin,
        Ordering::RandomOrder,
    ]
    .map(|ordering| ordering.name().to_string())
    .to_vec()
}

/// The type of every setting, in the order the README lists them.
const SETTINGS: [(&str, Kind); 24] = [
    ("dataset", Kind::Name(value_names::<DatasetKind>)),
    ("model", Kind::Name(value_names::<ModelKind>)),
    ("participants", Kind::Count),
    ("shard_fraction", Kind::Number),
    ("dirichlet_alpha", Kind::Number),
    ("method", Kind::Name(method_names)),
    ("ordering", Kind::Name(ordering_names)),
    ("theta_u", Kind::Number),
    ("theta_d", Kind::Number),
    ("gamma", Kind::Number),
    ("tau", Kind::Number),
    ("selection", Kind::Name(value_names::<Selection>)),
    ("epsilon", Kind::Number),
    ("epsilon_per_parameter", Kind::Number),
    ("upload_values", Kind::Name(value_names::<UploadValues>)),
    ("epochs", Kind::Count),
    ("lr", Kind::Number),
    ("lr_decay", Kind::Number),
    ("batch_size", Kind::Count),
    ("momentum", Kind::Number),
    ("eval_every", Kind::Count),
    ("seed", Kind::Count),
    ("init_seed", Kind::Integer),
    ("standalone_sample", Kind::Count),
];

/// Checks that `key` is a setting and `value` has its type, naming both.
fn check_setting(key: &str, value: &toml::Value) -> anyhow::Result<()> {
    let Some(&(_, kind)) = SETTINGS.iter().find(|(name, _)| *name == key) else {
        let names: Vec<&str> = SETTINGS.iter().map(|(name, _)| *name).collect();
        bail!(
            "unknown setting {key:?}: expected one of {}",
            names.join(", ")
        );
    };
    match (kind, value) {
        (Kind::Count, toml::Value::Integer(n)) if *n >= 0 => Ok(()),
        (Kind::Count, other) => bail!("invalid {key} {other}: expected a whole number, at least 0"),
        (Kind::Integer, toml::Value::Integer(_)) => Ok(()),
        (Kind::Integer, other) => bail!("invalid {key} {other}: expected a whole number"),
        (Kind::Number, toml::Value::Integer(_)) => Ok(()),
        (Kind::Number, toml::Value::Float(x)) if x.is_finite() => Ok(()),
        (Kind::Number, other) => bail!("invalid {key} {other}: expected a finite number"),
        (Kind::Name(names), value) => {
            let names = names();
            if let toml::Value::String(name) = value
                && names.contains(name)
            {
                return Ok(());
            }
            let quoted: Vec<String> = names.iter().map(|name| format!("{name:?}")).collect();
            bail!(
                "invalid {key} {value}: expected one of {}, in quotes",
                quoted.join(", ")
            )
        }
    }
}

/// Checks that an experiment name can serve as a folder name under runs/.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        bail!(
            "invalid name {name:?}: expected 1 to 64 letters, digits, '-', '_' or '.', not \
             starting with '.', because the default output folder is runs/NAME"
        );
    }
    Ok(())
}

fn to_json(value: &toml::Value) -> Value {
    serde_json::to_value(value).expect("TOML values convert to JSON")
}

/// Parses and expands a configuration's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> anyhow::Result<Experiment> {
    let file: ConfigFile =
        toml::from_str(text).with_context(|| format!("invalid experiment file {origin}"))?;
    check_name(&file.experiment.name).with_context(|| format!("{origin}: [experiment]"))?;
    let mut base = defaults();
    for (key, value) in &file.base {
        if value.is_array() {
            bail!(
                "{origin}: [base] {key} is a list; lists are grid axes, so put {key} under a [[grid]] table"
            );
        }
        check_setting(key, value).with_context(|| format!("{origin}: [base]"))?;
        base.insert(key.clone(), to_json(value));
    }
    for (number, grid) in file.grid.iter().enumerate() {
        for (key, value) in grid {
            let values = match value {
                toml::Value::Array(values) => values.iter().collect(),
                other => vec![other],
            };
            for value in values {
                check_setting(key, value)
                    .with_context(|| format!("{origin}: grid {}", number + 1))?;
            }
        }
    }
    let grids = if file.grid.is_empty() {
        vec![toml::Table::new()]
    } else {
        file.grid.clone()
    };
    let known: BTreeSet<String> = defaults()
        .keys()
        .cloned()
        .chain(
            [
                "dirichlet_alpha",
                "selection",
                "epsilon",
                "epsilon_per_parameter",
            ]
            .map(String::from),
        )
        .collect();
    for (number, plot) in file.plot.iter().enumerate() {
        let place = format!("{origin}, plot {}", number + 1);
        if plot.x != "epoch" && !NUMERIC_KEYS.contains(&plot.x.as_str()) {
            bail!(
                "{place}: invalid x {:?}: expected \"epoch\" or one of {}",
                plot.x,
                NUMERIC_KEYS.join(", ")
            );
        }
        let keys = plot.filter.keys().chain(plot.series.iter().flatten());
        for key in keys {
            if !known.contains(key) {
                bail!("{place}: unknown setting {key:?}");
            }
        }
    }
    let mut cells: Vec<CellSettings> = Vec::new();
    let mut grid_cells: Vec<Vec<usize>> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut push = |cell: CellSettings, cells: &mut Vec<CellSettings>| -> usize {
        *seen.entry(cell.id()).or_insert_with(|| {
            cells.push(cell);
            cells.len() - 1
        })
    };
    for (number, grid) in grids.iter().enumerate() {
        let mut members = Vec::new();
        let mut fixed = base.clone();
        let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
        for (key, value) in grid {
            match value {
                toml::Value::Array(values) if values.is_empty() => {
                    bail!("{origin}: grid {} gives {key} an empty list", number + 1)
                }
                toml::Value::Array(values) => {
                    axes.push((key.clone(), values.iter().map(to_json).collect()))
                }
                other => {
                    fixed.insert(key.clone(), to_json(other));
                }
            }
        }
        let mut combinations: Vec<Vec<(String, Value)>> = vec![Vec::new()];
        for (key, values) in &axes {
            combinations = combinations
                .into_iter()
                .flat_map(|partial| {
                    values.iter().map(move |value| {
                        let mut next = partial.clone();
                        next.push((key.clone(), value.clone()));
                        next
                    })
                })
                .collect();
        }
        for combination in combinations {
            let mut map = fixed.clone();
            let label: Vec<String> = combination
                .iter()
                .map(|(key, value)| format!("{key} = {value}"))
                .collect();
            map.extend(combination);
            let place = if label.is_empty() {
                format!("{origin}, grid {}", number + 1)
            } else {
                format!("{origin}, grid {} cell {}", number + 1, label.join(", "))
            };
            let cell: CellSettings = serde_json::from_value(Value::Object(map))
                .with_context(|| format!("{place}: invalid setting"))?;
            cell.validate().with_context(|| place.clone())?;
            if file.experiment.references && cell.method == Method::Collaborative {
                push(cell.reference(Method::Standalone), &mut cells);
                push(cell.reference(Method::Centralized), &mut cells);
            }
            let collaborative = cell.method == Method::Collaborative;
            let position = push(cell, &mut cells);
            if collaborative && !members.contains(&position) {
                members.push(position);
            }
        }
        grid_cells.push(members);
    }
    Ok(Experiment {
        section: file.experiment,
        cells,
        grids: grid_cells,
        plots: file.plot,
    })
}

/// The record of one finished cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    /// The cell's identity.
    pub id: String,
    /// Its settings.
    pub settings: CellSettings,
    /// Test accuracy: of the final global model (collaborative), the mean
    /// over shards (standalone) or of the one model (centralized).
    pub accuracy: f64,
    /// Lowest accuracy of one participant or shard.
    pub accuracy_min: Option<f64>,
    /// Highest accuracy of one participant or shard.
    pub accuracy_max: Option<f64>,
    /// Mean accuracy of the participants' own final models (collaborative).
    pub participant_mean: Option<f64>,
    /// Mean test accuracy after each evaluated epoch: of the participants'
    /// local models (collaborative), of the shards' models (standalone) or
    /// of the one model (centralized).
    pub curve: Vec<(usize, f64)>,
    /// Bytes all participants sent.
    pub bytes_sent: u64,
    /// Bytes all participants received.
    pub bytes_received: u64,
    /// Wall time of the cell, in seconds.
    pub wall_seconds: f64,
    /// Privacy spent by one participant over the run, the largest.
    pub epsilon_spent: Option<f64>,
    /// Participants hosted per participant process.
    pub participants_per_process: Option<usize>,
    /// Peak resident memory per hosted participant, in bytes.
    pub peak_rss_per_participant_bytes: Option<u64>,
    /// Version of the global parameters evaluated.
    pub global_version: Option<u64>,
    /// Seconds since the Unix epoch when the cell finished.
    pub finished_at: u64,
}

/// Where the experiment keeps its files.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn cell(&self, id: &str) -> PathBuf {
        self.root.join("cells").join(id)
    }

    fn result(&self, id: &str) -> PathBuf {
        self.cell(id).join("result.json")
    }

    fn failure(&self, id: &str) -> PathBuf {
        self.cell(id).join("error.txt")
    }
}

/// Loads the finished result of `cell`, if there is one that matches.
fn load_result(layout: &Layout, cell: &CellSettings) -> anyhow::Result<Option<CellResult>> {
    let path = layout.result(&cell.id());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", path.display()));
        }
    };
    let result: CellResult = serde_json::from_str(&text).with_context(|| {
        format!(
            "invalid cell result {}; delete it to run the cell again",
            path.display()
        )
    })?;
    if result.settings != *cell {
        bail!(
            "{} holds the result of other settings; delete the folder {} to run the cell again",
            path.display(),
            layout.cell(&cell.id()).display()
        );
    }
    Ok(Some(result))
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reports a running cell's progress as a fraction in [0, 1] and a message.
type CellProgress<'a> = dyn FnMut(f64, &str) + 'a;

/// Runs a collaborative cell through the local simulation.
fn run_collaborative_cell(
    cell: &CellSettings,
    args: &ExperimentArgs,
    per_process: usize,
    dir: &Path,
    progress: &mut CellProgress<'_>,
) -> anyhow::Result<CellResult> {
    let started = Instant::now();
    let run_dir = dir.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("failed to clear {}", run_dir.display()))?;
    }
    let simulate = SimulateArgs {
        training: cell.training(args.data_dir(cell), args.device),
        sharing: cell.sharing(),
        ordering: cell.ordering,
        output: run_dir.clone(),
        server_bin: args.server_bin.clone(),
        lease_seconds: 30.0,
        skip_baselines: true,
        no_download: true,
        participants_per_process: per_process,
        global_curve: false,
    };
    let summary = crate::simulate::run(&simulate, &mut |p: &Progress| {
        let fraction = if p.total == 0 {
            0.0
        } else {
            p.uploads as f64 / p.total as f64
        };
        progress(fraction, &p.message);
    })?;
    // The cell's certificates were made for this one run; its private keys
    // are of no further use and should not linger on disk.
    if let Ok(entries) = std::fs::read_dir(run_dir.join("tls")) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "key") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let metrics = run_dir.join("metrics");
    let mut curves = Vec::new();
    for index in 0..cell.participants {
        let path = metrics.join(format!("{}.json", crate::host::participant_id(index)));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let record: Value = serde_json::from_str(&text)
            .with_context(|| format!("invalid JSON in {}", path.display()))?;
        curves.push(curve_of(&record["epochs"]));
    }
    Ok(CellResult {
        id: cell.id(),
        settings: cell.clone(),
        accuracy: summary.global_accuracy,
        accuracy_min: Some(summary.collaborative_min),
        accuracy_max: Some(summary.collaborative_max),
        participant_mean: Some(summary.collaborative_mean),
        curve: mean_curve(&curves),
        bytes_sent: summary.bytes_sent,
        bytes_received: summary.bytes_received,
        wall_seconds: started.elapsed().as_secs_f64(),
        epsilon_spent: summary.privacy.as_ref().map(|p| p.run_epsilon_max),
        participants_per_process: Some(summary.participants_per_process),
        peak_rss_per_participant_bytes: summary.peak_rss_per_participant_bytes,
        global_version: Some(summary.global_version),
        finished_at: now_seconds(),
    })
}

/// The evaluated epochs of a metrics file's `epochs` list.
fn curve_of(epochs: &Value) -> Vec<(usize, f64)> {
    epochs
        .as_array()
        .map(|records| {
            records
                .iter()
                .filter_map(|r| Some((r["epoch"].as_u64()? as usize, r["accuracy"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Mean accuracy per epoch over several curves, over the epochs every
/// curve evaluated.
fn mean_curve(curves: &[Vec<(usize, f64)>]) -> Vec<(usize, f64)> {
    let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
    for curve in curves {
        for &(epoch, accuracy) in curve {
            let entry = sums.entry(epoch).or_insert((0.0, 0));
            entry.0 += accuracy;
            entry.1 += 1;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, count))| *count == curves.len())
        .map(|(epoch, (sum, count))| (epoch, sum / count as f64))
        .collect()
}

/// Final accuracy and accuracy curve of one model trained alone.
type Trained = (f64, Vec<(usize, f64)>);

/// One model to train alone: a shard (standalone) or the union
/// (centralized).
struct Task {
    train: Dataset,
    seed: u64,
}

/// Runs a reference cell in this process, on every core.
fn run_reference_cell(
    cell: &CellSettings,
    args: &ExperimentArgs,
    data: &Splits,
    progress: &mut CellProgress<'_>,
) -> anyhow::Result<CellResult> {
    let started = Instant::now();
    let training = cell.training(args.data_dir(cell), args.device);
    let device = crate::device::resolve_device(args.device)?;
    let tasks: Vec<Task> = match cell.method {
        Method::Standalone => {
            let indices: Vec<usize> = (0..cell.standalone_sample.min(cell.participants)).collect();
            training
                .shards(&data.train, &indices)
                .iter()
                .zip(&indices)
                .map(|(shard, &index)| Task {
                    train: data.train.subset(shard).to_device(device),
                    seed: participant_seed(cell.seed, index),
                })
                .collect()
        }
        Method::Centralized => vec![Task {
            train: data
                .train
                .subset(&training.union(&data.train))
                .to_device(device),
            seed: cell.seed,
        }],
        Method::Collaborative => unreachable!("collaborative cells run through simulate"),
    };
    let total_epochs = (tasks.len() * cell.epochs) as u64;
    let task_count = tasks.len();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(task_count);
    tch::set_num_threads(1);
    let queue = Mutex::new(tasks);
    let done = AtomicU64::new(0);
    let stop = stop_flag()?;
    let results: Mutex<Vec<Trained>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let test = data.test.to_device(device).shallow_clone();
                let (queue, done, results, failure, training, stop) =
                    (&queue, &done, &results, &failure, &training, &stop);
                scope.spawn(move || {
                    loop {
                        if stop.load(AtomicOrdering::Relaxed) {
                            return;
                        }
                        let Some(task) = queue.lock().expect("queue lock").pop() else {
                            return;
                        };
                        let outcome = (|| -> anyhow::Result<Trained> {
                            let (model, trainer) = training.fresh_model(device)?;
                            let mut participant = Participant {
                                model,
                                trainer,
                                train: &task.train,
                                test: &test,
                                rng: ChaCha8Rng::seed_from_u64(task.seed),
                            };
                            let records = train_alone(
                                &mut participant,
                                training.epochs,
                                training.eval_every,
                                |_| {
                                    done.fetch_add(1, AtomicOrdering::Relaxed);
                                    if stop.load(AtomicOrdering::Relaxed) {
                                        std::ops::ControlFlow::Break(())
                                    } else {
                                        std::ops::ControlFlow::Continue(())
                                    }
                                },
                            )?;
                            let curve: Vec<(usize, f64)> = records
                                .iter()
                                .filter_map(|r| Some((r.epoch, r.accuracy?)))
                                .collect();
                            let last = curve.last().map_or(f64::NAN, |&(_, a)| a);
                            Ok((last, curve))
                        })();
                        match outcome {
                            Ok(result) => results.lock().expect("results lock").push(result),
                            Err(error) => {
                                failure.lock().expect("failure lock").get_or_insert(error);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            let count = done.load(AtomicOrdering::Relaxed);
            progress(
                count as f64 / total_epochs.max(1) as f64,
                &format!("{count}/{total_epochs} epochs of {task_count} models"),
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    if stop.load(AtomicOrdering::Relaxed) {
        bail!("interrupted");
    }
    if let Some(error) = failure.into_inner().expect("failure lock") {
        return Err(error);
    }
    let results = results.into_inner().expect("results lock");
    let accuracies: Vec<f64> = results.iter().map(|(a, _)| *a).collect();
    let curves: Vec<Vec<(usize, f64)>> = results.into_iter().map(|(_, c)| c).collect();
    let mean = accuracies.iter().sum::<f64>() / accuracies.len().max(1) as f64;
    Ok(CellResult {
        id: cell.id(),
        settings: cell.clone(),
        accuracy: mean,
        accuracy_min: accuracies.iter().copied().reduce(f64::min),
        accuracy_max: accuracies.iter().copied().reduce(f64::max),
        participant_mean: None,
        curve: mean_curve(&curves),
        bytes_sent: 0,
        bytes_received: 0,
        wall_seconds: started.elapsed().as_secs_f64(),
        epsilon_spent: None,
        participants_per_process: None,
        peak_rss_per_participant_bytes: None,
        global_version: None,
        finished_at: now_seconds(),
    })
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("the progress template is valid")
        .progress_chars("=> ")
}

/// Holds the output folder for this runner: a second runner on the same
/// folder would clear the cells this one is running.
fn lock_output(root: &Path) -> anyhow::Result<std::fs::File> {
    let path = root.join("runner.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    if file.try_lock().is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "the output folder {} is in use by another experiment runner (pid {}); wait for it to \
             finish or stop it, or pass another --output",
            root.display(),
            holder.trim()
        );
    }
    file.set_len(0)
        .with_context(|| format!("failed to write {}", path.display()))?;
    let mut writer = &file;
    std::io::Write::write_all(&mut writer, format!("{}\n", std::process::id()).as_bytes())
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(file)
}

/// Returns the settings of `cell` that differ from the defaults, in one
/// line.
fn describe(cell: &CellSettings) -> String {
    let defaults = defaults();
    let map = cell.to_map();
    map.iter()
        .filter(|(key, value)| {
            key.as_str() != "method"
                && !value.is_null()
                && defaults.get(key.as_str()) != Some(value)
        })
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// This process's command line, with the program named by its file name.
fn invocation() -> String {
    let mut words: Vec<String> = std::env::args().collect();
    if let Some(program) = words.first_mut() {
        let name = Path::new(program.as_str())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name {
            *program = name;
        }
    }
    words.join(" ")
}

/// Runs the `experiment` subcommand.
pub fn experiment(args: &ExperimentArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config).with_context(|| {
        format!(
            "failed to read the experiment file {}",
            args.config.display()
        )
    })?;
    let experiment = parse(&text, &args.config.display().to_string())?;
    let root = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&experiment.section.name));
    let layout = Layout { root: root.clone() };
    if args.report_only {
        let Ok(recorded) = std::fs::read_to_string(root.join("experiment.toml")) else {
            bail!(
                "{} holds no experiment: run it first without --report-only",
                root.display()
            );
        };
        let name = parse(&recorded, "the recorded file")
            .map(|e| e.section.name)
            .ok();
        if name.as_deref() != Some(experiment.section.name.as_str()) {
            bail!(
                "{} holds another experiment than {} (its experiment.toml names another): pass \
                 the configuration that ran there",
                root.display(),
                args.config.display()
            );
        }
    }
    if args.dry_run {
        let mut finished = 0;
        for cell in &experiment.cells {
            let state = if load_result(&layout, cell)?.is_some() {
                finished += 1;
                "done"
            } else if layout.failure(&cell.id()).exists() {
                "failed, to run again"
            } else {
                "to run"
            };
            println!("{:<32} {state:<8} {}", cell.id(), describe(cell));
        }
        println!(
            "{} cells, {finished} finished, {} to run; output in {}",
            experiment.cells.len(),
            experiment.cells.len() - finished,
            root.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(root.join("cells"))
        .with_context(|| format!("failed to create {}", root.display()))?;
    let _lock = lock_output(&root)?;
    if !args.report_only {
        std::fs::write(root.join("experiment.toml"), &text).with_context(|| {
            format!("failed to write {}", root.join("experiment.toml").display())
        })?;
    }
    let effective: Vec<Value> = experiment
        .cells
        .iter()
        .map(|cell| serde_json::json!({ "id": cell.id(), "settings": cell }))
        .collect();
    write_json(
        &root.join("effective.json"),
        &serde_json::json!({ "experiment": experiment.section, "cells": effective }),
    )?;

    let mut results: HashMap<String, CellResult> = HashMap::new();
    for cell in &experiment.cells {
        if let Some(result) = load_result(&layout, cell)? {
            results.insert(cell.id(), result);
        }
    }
    let pending: Vec<&CellSettings> = experiment
        .cells
        .iter()
        .filter(|cell| !results.contains_key(&cell.id()))
        .collect();
    // The report names the command that ran the cells; --report-only keeps
    // the one recorded by the last run.
    let recorded = root.join("command.txt");
    let command = if args.report_only {
        std::fs::read_to_string(&recorded)
            .map(|text| text.trim().to_string())
            .unwrap_or_else(|_| invocation())
    } else {
        let command = invocation();
        std::fs::write(&recorded, format!("{command}\n"))
            .with_context(|| format!("failed to write {}", recorded.display()))?;
        command
    };
    if args.report_only {
        let failures = BTreeMap::new();
        crate::report::write_outputs(&root, &experiment, &results, &failures, &command)?;
        println!("report written to {}", root.join("report.md").display());
        return Ok(());
    }

    let per_process = args
        .participants_per_process
        .unwrap_or(experiment.section.participants_per_process);
    // The inter-op thread count must be set before any training here.
    TrainingArgs::set_threads(1);
    let mut data: HashMap<DatasetKind, Splits> = HashMap::new();
    for cell in &pending {
        let kind = cell.dataset_kind()?;
        if data.contains_key(&kind) {
            continue;
        }
        let dir = args.data_dir(cell);
        kind.ensure(dir, !args.no_download).with_context(|| {
            format!(
                "the {} cells need the {} files in {}: the runner downloads them unless \
                 --no-download is given, or point --data-dir (MNIST) or --svhn-dir (SVHN) at them",
                kind.name(),
                kind.name(),
                dir.display()
            )
        })?;
        if pending
            .iter()
            .any(|c| c.method != Method::Collaborative && c.dataset == cell.dataset)
        {
            data.insert(kind, kind.load(dir)?);
        }
    }

    let multi = MultiProgress::new();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        multi.set_draw_target(ProgressDrawTarget::hidden());
    }
    let total_cost: u64 = pending.iter().map(|c| c.cost()).sum();
    let grid_bar = multi.add(ProgressBar::new(total_cost.max(1)));
    grid_bar.set_style(bar_style(
        "grid {elapsed_precise} [{bar:30}] {percent:>3}% ETA {eta_precise} {msg}",
    ));
    let cell_bar = multi.add(ProgressBar::new(1000));
    cell_bar.set_style(bar_style(
        "cell {elapsed_precise} [{bar:30}] {percent:>3}% {msg}",
    ));
    let hidden = multi.is_hidden();
    eprintln!(
        "experiment {}: {} cells, {} already finished, {} to run; output in {}",
        experiment.section.name,
        experiment.cells.len(),
        results.len(),
        pending.len(),
        root.display()
    );

    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    let mut finished_cost = 0u64;
    let grid_started = Instant::now();
    for (position, cell) in pending.iter().enumerate() {
        let id = cell.id();
        let dir = layout.cell(&id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let _ = std::fs::remove_file(layout.failure(&id));
        let cost = cell.cost();
        grid_bar.set_message(format!("cell {} of {}: {id}", position + 1, pending.len()));
        cell_bar.reset();
        let mut last_line = Instant::now();
        let mut progress = |fraction: f64, message: &str| {
            let fraction = fraction.clamp(0.0, 1.0);
            cell_bar.set_position((fraction * 1000.0) as u64);
            cell_bar.set_message(message.to_string());
            grid_bar.set_position(finished_cost + (fraction * cost as f64) as u64);
            if hidden && last_line.elapsed() >= Duration::from_secs(60) {
                let done = finished_cost as f64 + fraction * cost as f64;
                let elapsed = grid_started.elapsed().as_secs_f64();
                let left = if done > 0.0 {
                    elapsed * (total_cost as f64 - done) / done
                } else {
                    f64::NAN
                };
                eprintln!(
                    "progress: cell {} of {} ({id}) {:.0}%, grid {:.0}%, about {:.0} min left",
                    position + 1,
                    pending.len(),
                    fraction * 100.0,
                    done / total_cost.max(1) as f64 * 100.0,
                    left / 60.0
                );
                last_line = Instant::now();
            }
        };
        let outcome = match cell.method {
            Method::Collaborative => {
                run_collaborative_cell(cell, args, per_process, &dir, &mut progress)
            }
            _ => match cell.dataset_kind() {
                Ok(kind) => run_reference_cell(cell, args, &data[&kind], &mut progress),
                Err(error) => Err(error),
            },
        };
        finished_cost += cost;
        grid_bar.set_position(finished_cost);
        match outcome {
            Ok(result) => {
                write_json(&layout.result(&id), &result)?;
                multi.suspend(|| {
                    eprintln!(
                        "cell {} of {}: {id}: accuracy {:.4} in {:.0} s",
                        position + 1,
                        pending.len(),
                        result.accuracy,
                        result.wall_seconds
                    )
                });
                results.insert(id.clone(), result);
            }
            Err(error) => {
                let text = format!("{error:#}");
                std::fs::write(layout.failure(&id), format!("{text}\n"))?;
                multi.suspend(|| {
                    eprintln!(
                        "cell {} of {}: {id} failed: {text}",
                        position + 1,
                        pending.len()
                    )
                });
                failures.insert(id.clone(), text);
                if stop_flag()?.load(AtomicOrdering::Relaxed) {
                    break;
                }
            }
        }
        crate::report::write_outputs(&root, &experiment, &results, &failures, &command)?;
    }
    grid_bar.finish();
    cell_bar.finish_and_clear();
    crate::report::write_outputs(&root, &experiment, &results, &failures, &command)?;
    println!(
        "{} of {} cells finished; report in {}",
        results.len(),
        experiment.cells.len(),
        root.join("report.md").display()
    );
    if stop_flag()?.load(AtomicOrdering::Relaxed) {
        bail!("interrupted; finished cells are kept, and running the same command again resumes");
    }
    if !failures.is_empty() {
        bail!(
            "{} cell(s) failed (their errors are in {}/cells/ID/error.txt); running the same command again retries them",
            failures.len(),
            root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: &str = r#"
[experiment]
name = "t"

[base]
epochs = 5

[[grid]]
theta_u = [1.0, 0.1]
model = ["mlp", "cnn"]

[[grid]]
ordering = ["round-robin", "random-order"]
theta_u = 0.1
"#;

    #[test]
    fn a_grid_expands_to_its_product_with_shared_references() {
        let experiment = parse(GRID, "grid.toml").unwrap();
        let collaborative: Vec<_> = experiment
            .cells
            .iter()
            .filter(|c| c.method == Method::Collaborative)
            .collect();
        assert_eq!(collaborative.len(), 6);
        // One standalone and one centralized reference per model.
        assert_eq!(experiment.cells.len(), 6 + 4);
        assert!(experiment.cells.iter().all(|c| c.epochs == 5));
        let first = &collaborative[0];
        let standalone = first.reference(Method::Standalone);
        assert!(experiment.cells.contains(&standalone));
        assert_eq!(standalone.theta_u, 0.1);
        assert_eq!(standalone.standalone_sample, 30);
        // References come before the cells that use them.
        let position = |c: &CellSettings| experiment.cells.iter().position(|x| x == c).unwrap();
        assert!(position(&standalone) < position(first));
    }

    #[test]
    fn identities_are_stable_and_distinct() {
        let experiment = parse(GRID, "grid.toml").unwrap();
        let again = parse(GRID, "grid.toml").unwrap();
        let ids: Vec<String> = experiment.cells.iter().map(|c| c.id()).collect();
        let again: Vec<String> = again.cells.iter().map(|c| c.id()).collect();
        assert_eq!(ids, again);
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids[0].starts_with("standalone-mlp-"), "{}", ids[0]);
    }

    #[test]
    fn bad_settings_name_the_key_the_value_and_the_cell() {
        let unknown = "[experiment]\nname = \"t\"\n[base]\nthetau = 0.1\n";
        let error = format!("{:#}", parse(unknown, "x.toml").unwrap_err());
        assert!(error.contains("thetau"), "{error}");

        let range = "[experiment]\nname = \"t\"\n[[grid]]\ntheta_u = [0.1, 2.0]\n";
        let error = format!("{:#}", parse(range, "x.toml").unwrap_err());
        assert!(error.contains("theta_u = 2.0"), "{error}");
        assert!(error.contains("invalid theta-u 2"), "{error}");

        let list = "[experiment]\nname = \"t\"\n[base]\ntheta_u = [0.1]\n";
        let error = format!("{:#}", parse(list, "x.toml").unwrap_err());
        assert!(error.contains("[[grid]]"), "{error}");

        let empty = "[experiment]\nname = \"t\"\n[[grid]]\nseed = []\n";
        let error = format!("{:#}", parse(empty, "x.toml").unwrap_err());
        assert!(error.contains("empty list"), "{error}");

        let dataset = "[experiment]\nname = \"t\"\n[base]\ndataset = \"cifar\"\n";
        let error = format!("{:#}", parse(dataset, "x.toml").unwrap_err());
        assert!(error.contains("cifar"), "{error}");

        let model = "[experiment]\nname = \"t\"\n[base]\nmodel = \"resnet\"\n";
        let error = format!("{:#}", parse(model, "x.toml").unwrap_err());
        assert!(error.contains("resnet"), "{error}");
    }

    #[test]
    fn svhn_cells_need_the_svhn_network() {
        let good = "[experiment]\nname = \"t\"\n[base]\ndataset = \"svhn\"\nmodel = \"svhn-cnn\"\n";
        let experiment = parse(good, "x.toml").unwrap();
        assert!(
            experiment
                .cells
                .iter()
                .all(|c| c.dataset_kind().unwrap() == DatasetKind::Svhn)
        );
        let bad = "[experiment]\nname = \"t\"\n[base]\ndataset = \"svhn\"\nmodel = \"cnn\"\n";
        let error = format!("{:#}", parse(bad, "x.toml").unwrap_err());
        assert!(error.contains("svhn") && error.contains("cnn"), "{error}");
    }

    #[test]
    fn setting_types_are_checked_by_name() {
        let cases = [
            (
                "[base]\ntheta_u = \"0.1\"\n",
                "invalid theta_u \"0.1\": expected a finite number",
            ),
            (
                "[base]\nepochs = 2.5\n",
                "invalid epochs 2.5: expected a whole number",
            ),
            (
                "[base]\nseed = -5\n",
                "invalid seed -5: expected a whole number, at least 0",
            ),
            ("[base]\nlrate = 0.1\n", "[base]: unknown setting \"lrate\""),
            (
                "[[grid]]\ndirichlet_alpha = [nan]\n",
                "grid 1: invalid dirichlet_alpha nan",
            ),
            (
                "[[grid]]\ndirichlet_alpha = [inf]\n",
                "invalid dirichlet_alpha inf",
            ),
            (
                "[base]\nstandalone_sample = 0\n",
                "invalid standalone_sample 0",
            ),
            ("[base]\neval_every = 0\n", "invalid eval_every 0"),
            (
                "[base]\nepsilon = 1.0\nepsilon_per_parameter = 1.0\n",
                "both set the spend of an upload",
            ),
        ];
        for (body, expected) in cases {
            let text = format!("[experiment]\nname = \"t\"\n{body}");
            let error = format!("{:#}", parse(&text, "x.toml").unwrap_err());
            assert!(error.contains(expected), "{body}: {error}");
        }
    }

    #[test]
    fn experiment_names_are_folder_names() {
        for name in ["../../etc", "/tmp/abs", "a/b c", "", ".hidden"] {
            let text = format!("[experiment]\nname = {name:?}\n");
            let error = format!("{:#}", parse(&text, "x.toml").unwrap_err());
            assert!(error.contains("invalid name"), "{name}: {error}");
        }
        assert!(parse("[experiment]\nname = \"grid-1.v2_a\"\n", "x.toml").is_ok());
    }

    #[test]
    fn references_can_be_turned_off() {
        let text =
            "[experiment]\nname = \"t\"\nreferences = false\n[[grid]]\ntheta_u = [0.1, 0.01]\n";
        let experiment = parse(text, "x.toml").unwrap();
        assert_eq!(experiment.cells.len(), 2);
    }

    #[test]
    fn upload_values_cells_keep_f32_ids() {
        let text = "[experiment]\nname = \"t\"\n[[grid]]\nupload_values = [\"f32\", \"f16\"]\n";
        let experiment = parse(text, "x.toml").unwrap();
        let collaborative: Vec<&CellSettings> = experiment
            .cells
            .iter()
            .filter(|cell| cell.method == Method::Collaborative)
            .collect();
        assert_eq!(collaborative.len(), 2, "one cell per value encoding");
        assert_eq!(
            experiment.cells.len(),
            4,
            "plus one standalone and one centralized"
        );
        // A configuration without the key names the f32 cell the same way,
        // so results kept from before the key existed are found again.
        let plain = parse("[experiment]\nname = \"t\"\n", "x.toml").unwrap();
        let plain_collaborative = plain
            .cells
            .iter()
            .find(|cell| cell.method == Method::Collaborative)
            .unwrap();
        let f32_cell = collaborative
            .iter()
            .find(|cell| cell.upload_values == UploadValues::F32)
            .unwrap();
        assert_eq!(f32_cell.id(), plain_collaborative.id());
        let f16_cell = collaborative
            .iter()
            .find(|cell| cell.upload_values == UploadValues::F16)
            .unwrap();
        assert_ne!(f16_cell.id(), f32_cell.id());
        assert_eq!(f16_cell.to_map()["upload_values"], "f16");
        assert_eq!(f32_cell.to_map()["upload_values"], "f32");
        let error = format!(
            "{:#}",
            parse(
                "[experiment]\nname = \"t\"\n[base]\nupload_values = \"f8\"\n",
                "x.toml"
            )
            .unwrap_err()
        );
        assert!(error.contains("invalid upload_values \"f8\""), "{error}");
        assert!(error.contains("[base]"), "{error}");
        let error = format!(
            "{:#}",
            parse(
                "[experiment]\nname = \"t\"\n[base]\nupload_values = 16\n",
                "x.toml"
            )
            .unwrap_err()
        );
        assert!(error.contains("invalid upload_values 16"), "{error}");
        assert!(error.contains("\"f32\", \"f16\", in quotes"), "{error}");
    }

    #[test]
    fn name_settings_list_names_that_parse() {
        for (key, kind) in SETTINGS {
            let Kind::Name(names) = kind else {
                continue;
            };
            let names = names();
            assert!(!names.is_empty(), "{key} lists no names");
            for name in &names {
                let text = format!("[experiment]\nname = \"t\"\n[base]\n{key} = \"{name}\"\n");
                // Some names need other settings (svhn-cnn needs svhn), so
                // only the reading of the name itself is checked.
                if let Err(error) = parse(&text, "x.toml") {
                    let error = format!("{error:#}");
                    assert!(
                        !error.contains("unknown variant"),
                        "{key} = {name}: {error}"
                    );
                    assert!(!error.contains(&format!("invalid {key}")), "{error}");
                }
            }
            let text = format!("[experiment]\nname = \"t\"\n[base]\n{key} = 3\n");
            let error = format!("{:#}", parse(&text, "x.toml").unwrap_err());
            assert!(error.contains(&format!("invalid {key} 3")), "{error}");
            assert!(error.contains(&format!("{:?}", names[0])), "{error}");
        }
    }

    #[test]
    fn published_experiments_keep_their_cell_ids() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/experiments");
        for name in ["paper-mnist-mlp", "paper-private", "non-iid"] {
            let folder = root.join(name);
            let config = std::fs::read_to_string(folder.join("experiment.toml")).unwrap();
            let csv = std::fs::read_to_string(folder.join("cells.csv")).unwrap();
            let published: BTreeSet<&str> = csv
                .lines()
                .skip(1)
                .filter_map(|line| line.split(',').next())
                .collect();
            let experiment = parse(&config, name).unwrap();
            for cell in &experiment.cells {
                assert!(
                    published.contains(cell.id().as_str()),
                    "{name}: cell {} is not among the published ones",
                    cell.id()
                );
            }
        }
    }

    #[test]
    fn private_cells_share_the_non_private_references() {
        let text = "[experiment]\nname = \"t\"\n[[grid]]\nepsilon_per_parameter = [0.1, 1.0]\nselection = \"threshold\"\n";
        let experiment = parse(text, "x.toml").unwrap();
        assert_eq!(experiment.cells.len(), 4);
        assert!(experiment.cells.iter().filter(|c| c.private()).count() == 2);
    }

    #[test]
    fn the_mean_curve_keeps_epochs_every_run_evaluated() {
        let curves = vec![
            vec![(5, 0.5), (10, 0.7)],
            vec![(5, 0.7), (10, 0.9), (12, 1.0)],
        ];
        let mean = mean_curve(&curves);
        assert_eq!(mean.iter().map(|p| p.0).collect::<Vec<_>>(), vec![5, 10]);
        assert!((mean[0].1 - 0.6).abs() < 1e-12 && (mean[1].1 - 0.8).abs() < 1e-12);
    }
}
