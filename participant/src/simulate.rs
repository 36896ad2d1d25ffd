//! The main job: a whole federation on this machine. Starts the parameter
//! server and N participant processes on loopback, runs both baselines on
//! the same shards at the same time, shows progress, and prints collaborative
//! accuracy next to the standalone mean and the centralized accuracy.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dssgd_common::config::{Ordering, check_positive};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cli::{SharingArgs, TrainingArgs, TransportArgs, parse_ordering};
use crate::host::participant_id;
use crate::metrics::significant;

/// Settings of a local simulation.
#[derive(Clone, Debug, Args, Serialize)]
pub struct SimulateArgs {
    /// Data, model and training settings.
    #[command(flatten)]
    pub training: TrainingArgs,

    /// Sharing settings.
    #[command(flatten)]
    pub sharing: SharingArgs,

    /// Ordering of participants: asynchronous, round-robin or random-order.
    #[arg(long, env = "DSSGD_ORDERING", default_value = "asynchronous", value_parser = parse_ordering)]
    pub ordering: Ordering,

    /// Folder for the metrics, logs and summary of this run.
    #[arg(long, env = "DSSGD_OUTPUT", default_value = "runs/latest")]
    pub output: PathBuf,

    /// Path of the dssgd-server binary (default: next to this binary).
    #[arg(long, env = "DSSGD_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,

    /// Lease of a turn in the ordered modes, in seconds.
    #[arg(
        long,
        env = "DSSGD_LEASE_SECONDS",
        default_value_t = 30.0,
        allow_negative_numbers = true
    )]
    pub lease_seconds: f64,

    /// Skip the standalone and centralized baselines.
    #[arg(long)]
    pub skip_baselines: bool,

    /// Do not download the dataset when the data folder lacks its files.
    #[arg(long)]
    pub no_download: bool,

    /// Participants hosted by each participant process, each with its own
    /// model, shard and connection (0: one per process up to 32
    /// participants, then as few as keep 32 processes). Hosting several
    /// saves the memory of one libtorch and test set per participant.
    #[arg(long, env = "DSSGD_PARTICIPANTS_PER_PROCESS", default_value_t = 0)]
    pub participants_per_process: usize,

    /// About once per round of uploads (one per participant; the server is
    /// polled every 50 ms), download the global model and record its test
    /// accuracy with the time and the payload bytes so far in summary.json
    /// (`global_curve`). The snapshots are kept in memory (4 bytes a
    /// parameter each) and evaluated after the run, so the participants
    /// lose no time to them.
    #[arg(long, env = "DSSGD_GLOBAL_CURVE")]
    pub global_curve: bool,
}

/// Most participant processes `simulate` starts when it chooses how many
/// participants each process hosts.
const MAX_AUTO_PROCESSES: usize = 32;

impl SimulateArgs {
    /// Participants per process, resolved from the setting.
    pub fn per_process(&self) -> usize {
        match self.participants_per_process {
            0 => self
                .training
                .participants
                .div_ceil(MAX_AUTO_PROCESSES)
                .max(1),
            count => count,
        }
    }
}

/// Progress of a running simulation, for a caller that draws it.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Uploads the server has applied.
    pub uploads: u64,
    /// Uploads the whole run makes (participants times epochs).
    pub total: u64,
    /// Global version and the processes still running.
    pub message: String,
}

/// The comparison printed and written at the end of a simulation.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Model name.
    pub model: String,
    /// Number of participants.
    pub participants: usize,
    /// Ordering used.
    pub ordering: String,
    /// Mean over participants of the test accuracy of their own final model
    /// (their local model after one last download, when they finished).
    pub collaborative_mean: f64,
    /// Lowest participant accuracy.
    pub collaborative_min: f64,
    /// Highest participant accuracy.
    pub collaborative_max: f64,
    /// Test accuracy of the global parameters once every participant has
    /// finished: the collaborative result.
    pub global_accuracy: f64,
    /// Version of the global parameters evaluated.
    pub global_version: u64,
    /// Mean standalone accuracy over the same shards.
    pub standalone_mean: Option<f64>,
    /// Centralized accuracy on the union of the shards.
    pub centralized: Option<f64>,
    /// Bytes sent by all participants.
    pub bytes_sent: u64,
    /// Bytes received by all participants.
    pub bytes_received: u64,
    /// Wall time of the whole simulation, in seconds.
    pub wall_seconds: f64,
    /// Privacy spend of a private run.
    pub privacy: Option<PrivacyTotals>,
    /// Participants that stopped before their last epoch, with the reason.
    pub stopped_early: Vec<String>,
    /// Participants hosted by each participant process.
    pub participants_per_process: usize,
    /// Peak resident memory of one participant process divided by the
    /// participants it hosted, the largest over processes, in bytes.
    pub peak_rss_per_participant_bytes: Option<u64>,
    /// The global model's accuracy after each round of uploads, with
    /// `--global-curve`; empty otherwise.
    pub global_curve: Vec<GlobalPoint>,
    /// Every setting of the run.
    pub config: SimulateArgs,
}

/// The global model at one moment of a simulation.
#[derive(Clone, Debug, Serialize)]
pub struct GlobalPoint {
    /// Seconds since the server started.
    pub seconds: f64,
    /// Uploads counted in the byte counters. Equal to `version` unless
    /// uploads kept arriving between the reads of parameters and counters.
    pub uploads: u64,
    /// Version of the evaluated parameters: the uploads applied to them.
    pub version: u64,
    /// Test accuracy of the global parameters.
    pub accuracy: f64,
    /// Payload bytes (indices and values) of the participants' applied
    /// uploads so far.
    pub uploaded_bytes: u64,
    /// Payload bytes of the participants' downloads so far, their final
    /// downloads included; the curve's own downloads are left out.
    pub downloaded_bytes: u64,
}

/// Privacy spend over the simulated federation.
#[derive(Debug, Default, Serialize)]
pub struct PrivacyTotals {
    /// Spend of one upload.
    pub epsilon_per_epoch: f64,
    /// Most parameters released per upload.
    pub c: usize,
    /// `epsilon / c`, the per-parameter figure Shokri and Shmatikov report.
    pub epsilon_per_parameter: f64,
    /// Largest spend of one participant in this run (basic composition).
    pub run_epsilon_max: f64,
    /// Largest total in a participant's ledger (earlier runs included).
    pub ledger_epsilon_max: f64,
    /// Largest total the server recorded for one participant.
    pub server_epsilon_max: f64,
    /// Private uploads the participants made.
    pub private_uploads: u64,
    /// Private uploads the server applied.
    pub server_private_uploads: u64,
}

/// A child process killed when dropped, so an early error leaves no
/// orphans behind.
struct Managed {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to locate this binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}; build it with `cargo build --release -p dssgd-server` or pass --server-bin",
            name,
            exe.display()
        );
    }
    Ok(path)
}

/// Command-line flags that reproduce `training` in a child process.
fn training_flags(training: &TrainingArgs) -> Vec<String> {
    let model = training.model.name().to_string();
    let device = format!("{:?}", training.device).to_lowercase();
    let pairs = [
        ("--model", model),
        ("--dataset", training.dataset.name().to_string()),
        ("--data-dir", training.data_dir().display().to_string()),
        ("--participants", training.participants.to_string()),
        ("--shard-fraction", training.shard_fraction.to_string()),
        ("--data-seed", training.data_seed.to_string()),
        ("--init-seed", training.init_seed.to_string()),
        ("--epochs", training.epochs.to_string()),
        ("--lr", training.learning_rate.to_string()),
        ("--lr-decay", training.lr_decay.to_string()),
        ("--batch-size", training.batch_size.to_string()),
        ("--momentum", training.momentum.to_string()),
        ("--eval-every", training.eval_every.to_string()),
        ("--device", device),
        ("--threads", training.threads.to_string()),
    ];
    let mut flags: Vec<String> = pairs
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
    if let Some(alpha) = training.dirichlet_alpha {
        flags.extend(["--dirichlet-alpha".to_string(), alpha.to_string()]);
    }
    flags
}

fn sharing_flags(sharing: &SharingArgs) -> Vec<String> {
    let mut pairs = vec![
        ("--theta-u", sharing.theta_u.to_string()),
        ("--theta-d", sharing.theta_d.to_string()),
        ("--gamma", sharing.gamma.to_string()),
        ("--tau", sharing.tau.to_string()),
    ];
    if let Some(selection) = sharing.selection {
        pairs.push(("--selection", format!("{selection:?}").to_lowercase()));
    }
    if let Some(epsilon) = sharing.epsilon {
        pairs.push(("--epsilon", epsilon.to_string()));
    }
    if let Some(epsilon) = sharing.epsilon_per_parameter {
        pairs.push(("--epsilon-per-parameter", epsilon.to_string()));
    }
    if let Some(budget) = sharing.privacy_budget {
        pairs.push(("--privacy-budget", budget.to_string()));
    }
    pairs.push((
        "--upload-values",
        sharing.upload_values.encoding().name().to_string(),
    ));
    pairs
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
}

fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> anyhow::Result<Managed> {
    let log = logs.join(format!("{name}.log"));
    let stderr =
        File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .spawn()
        .with_context(|| format!("failed to start {}", program.display()))?;
    Ok(Managed {
        name: name.to_string(),
        child,
        log,
    })
}

/// Identifier of the client certificate that the simulation itself uses to
/// watch the server's progress and to evaluate the global model. The
/// evaluation joins under this identifier, as `evaluate` always does.
const OBSERVER_ID: &str = crate::cli::EVALUATOR_ID;

/// Generates the federation's certificates in `dir`: a CA, the server's
/// certificate for 127.0.0.1, one client certificate per participant and
/// one for the evaluator.
fn generate_certificates(dir: &Path, participants: usize) -> anyhow::Result<()> {
    let mut ids: Vec<String> = (0..participants)
        .map(|index| format!("p{index:03}"))
        .collect();
    ids.push(OBSERVER_ID.into());
    let names = ["127.0.0.1".to_string()];
    dssgd_server::tls::generate_federation(dir, Some(&names), &ids, 30)?;
    Ok(())
}

/// Transport settings of the client `id`: mutual TLS with the certificates
/// in `tls_dir`.
fn client_transport(address: &str, tls_dir: &Path, id: &str) -> TransportArgs {
    TransportArgs {
        server: address.to_string(),
        tls_ca: Some(tls_dir.join("ca.pem")),
        tls_cert: Some(tls_dir.join(format!("{id}.pem"))),
        tls_key: Some(tls_dir.join(format!("{id}.key"))),
        tls_domain: None,
        insecure: false,
    }
}

/// Starts the server with mutual TLS on an ephemeral loopback port and
/// returns its `https://` address, read from the first line it prints.
fn start_server(
    args: &SimulateArgs,
    logs: &Path,
    tls_dir: &Path,
) -> anyhow::Result<(Managed, String)> {
    let server_bin = match &args.server_bin {
        Some(path) => path.clone(),
        None => sibling_binary("dssgd-server")?,
    };
    let flags = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--ordering".into(),
        args.ordering.name().into(),
        "--lease-seconds".into(),
        args.lease_seconds.to_string(),
        "--model".into(),
        args.training.model.name().into(),
        "--tls-cert".into(),
        tls_dir.join("server.pem").display().to_string(),
        "--tls-key".into(),
        tls_dir.join("server.key").display().to_string(),
        "--client-ca".into(),
        tls_dir.join("ca.pem").display().to_string(),
    ];
    let mut server = spawn("server", &server_bin, &flags, logs)?;
    let stdout = server.child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(address) = line.trim().strip_prefix("listening on ") else {
        bail!(
            "the server did not start{}; its log is {}",
            logged_error(&server.log),
            server.log.display()
        );
    };
    Ok((server, format!("https://{address}")))
}

/// Runs the simulation, showing a progress bar, and prints the comparison.
pub fn simulate(args: &SimulateArgs) -> anyhow::Result<Summary> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} uploads, ETA {eta} {msg}",
        )
        .expect("the progress template is valid")
        .progress_chars("=> "),
    );
    let mut last_report = Instant::now();
    let result = run(args, &mut |progress: &Progress| {
        bar.set_length(progress.total);
        bar.set_position(progress.uploads);
        bar.set_message(progress.message.clone());
        // Without a terminal the bar is hidden, so a line is printed every
        // 30 seconds.
        if bar.is_hidden() && last_report.elapsed() >= Duration::from_secs(30) {
            eprintln!(
                "progress: {}/{} uploads, {}",
                progress.uploads, progress.total, progress.message
            );
            last_report = Instant::now();
        }
    });
    match &result {
        Ok(summary) => {
            bar.finish();
            print_summary(summary);
        }
        Err(_) => bar.abandon(),
    }
    result
}

/// Runs the simulation, calling `on_progress` about twice a second, and
/// writes its summary to `output/summary.json`.
pub fn run(args: &SimulateArgs, on_progress: &mut dyn FnMut(&Progress)) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let training = &args.training;
    training.validate()?;
    args.sharing.validate()?;
    check_positive("lease-seconds", args.lease_seconds)?;
    training
        .dataset
        .ensure(&training.data_dir(), !args.no_download)?;

    let logs = args.output.join("logs");
    let results = args.output.join("metrics");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    std::fs::create_dir_all(&results)?;
    crate::metrics::write_json(&args.output.join("config.json"), args)?;
    let participant_bin = std::env::current_exe()?;

    let private = args.sharing.epsilon.is_some() || args.sharing.epsilon_per_parameter.is_some();
    if let Some(path) = &args.sharing.privacy_ledger {
        bail!(
            "--privacy-ledger {} cannot be shared by simulated participants: simulate keeps one \
             ledger per participant in {}; drop the option",
            path.display(),
            args.output.join("privacy").display()
        );
    }
    let ledgers = args.output.join("privacy");
    if private {
        std::fs::create_dir_all(&ledgers)
            .with_context(|| format!("failed to create {}", ledgers.display()))?;
    }

    let tls_dir = args.output.join("tls");
    generate_certificates(&tls_dir, training.participants)?;
    let (server, address) = start_server(args, &logs, &tls_dir)?;
    tracing::debug!(%address, logs = %logs.display(), "parameter server started");

    let per_process = args.per_process();
    let mut participants = Vec::new();
    for first in (0..training.participants).step_by(per_process) {
        let count = per_process.min(training.participants - first);
        let mut flags = vec!["host".to_string()];
        flags.extend(training_flags(training));
        flags.extend(sharing_flags(&args.sharing));
        flags.extend([
            "--server".into(),
            address.clone(),
            "--tls-dir".into(),
            tls_dir.display().to_string(),
            "--first-index".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--metrics-dir".into(),
            results.display().to_string(),
        ]);
        if private {
            flags.extend(["--ledger-dir".into(), ledgers.display().to_string()]);
        }
        if !args.skip_baselines {
            flags.push("--standalone-baseline".into());
        }
        let name = if count == 1 {
            participant_id(first)
        } else {
            format!(
                "{}-{}",
                participant_id(first),
                participant_id(first + count - 1)
            )
        };
        participants.push(spawn(&name, &participant_bin, &flags, &logs)?);
    }
    let mut baselines = Vec::new();
    if !args.skip_baselines {
        // The standalone baseline runs inside each participant process
        // (--standalone-baseline), so its 30 trainings share the cores
        // fairly instead of queueing in one process. The centralized model
        // gets two threads for the time it runs alone at the end.
        let central = TrainingArgs {
            threads: training.threads.max(2),
            ..training.clone()
        };
        let mut flags = vec!["centralized".to_string()];
        flags.extend(training_flags(&central));
        flags.extend([
            "--metrics".into(),
            results.join("centralized.json").display().to_string(),
        ]);
        baselines.push(spawn("centralized", &participant_bin, &flags, &logs)?);
    }

    let observer = client_transport(&address, &tls_dir, OBSERVER_ID);
    let mut curve = if args.global_curve {
        Some(GlobalCurve::start(training, &observer, started)?)
    } else {
        None
    };
    let status = wait_with_progress(
        args,
        &observer,
        &mut participants,
        &mut baselines,
        curve.as_mut(),
        on_progress,
    )?;
    let (global_accuracy, version) = crate::cli::evaluate_global(training, &observer)?;
    drop(server);

    let mut summary = summarise(args, &results, started.elapsed())?;
    summary.global_accuracy = global_accuracy;
    summary.global_version = version;
    if let Some(curve) = curve {
        summary.global_curve = curve.finish()?;
    }
    if let (Some(privacy), Some(status)) = (&mut summary.privacy, status) {
        privacy.server_epsilon_max = status
            .participants
            .iter()
            .map(|p| p.epsilon_spent)
            .fold(0.0, f64::max);
        privacy.server_private_uploads =
            status.participants.iter().map(|p| p.private_uploads).sum();
    }
    crate::metrics::write_json(&args.output.join("summary.json"), &summary)?;
    Ok(summary)
}

/// Maximum reads of the parameters and the status for one curve point.
/// After the last, the counters may be a few uploads ahead of the parameters.
const CONSISTENT_READ_TRIES: u32 = 20;

/// The global model after each round of uploads. During the run only the
/// parameters are downloaded and kept, which takes a millisecond or two.
/// The test set is evaluated once the federation has finished, so the
/// evaluations take no time from the participants.
struct GlobalCurve {
    evaluator: crate::cli::GlobalEvaluator,
    started: Instant,
    /// Uploads after which the next snapshot is taken.
    next: u64,
    /// Downloads the curve itself has made, which the server counts.
    own_downloads: u64,
    snapshots: Vec<(GlobalPoint, Vec<f32>)>,
}

impl GlobalCurve {
    /// Loads the test set and prepares the connection to the server.
    fn start(
        training: &TrainingArgs,
        observer: &TransportArgs,
        started: Instant,
    ) -> anyhow::Result<Self> {
        let evaluator = crate::cli::GlobalEvaluator::connect(training, observer)
            .context("failed to start the global curve's evaluator")?;
        Ok(Self {
            evaluator,
            started,
            next: training.participants as u64,
            own_downloads: 0,
            snapshots: Vec::new(),
        })
    }

    /// Keeps a snapshot of the global parameters if a round of
    /// `participants` uploads has passed since the last one.
    fn observe(&mut self, uploads: u64, participants: u64) -> anyhow::Result<()> {
        if uploads < self.next {
            return Ok(());
        }
        let seconds = self.started.elapsed().as_secs_f64();
        // The parameters and the byte counters come from two calls, so an
        // upload applied between them is counted in the bytes only. Both are
        // read again until they show the same version.
        let mut tries = 0;
        let (parameters, version, status) = loop {
            tries += 1;
            let (parameters, version) = self.evaluator.download()?;
            self.own_downloads += 1;
            let status = self.evaluator.status()?;
            if status.version == version || tries == CONSISTENT_READ_TRIES {
                break (parameters, version, status);
            }
        };
        // The server counts the curve's own downloads, each the whole model
        // as f32, with the participants'.
        let own_bytes = self.own_downloads * 4 * parameters.len() as u64;
        // After the last try, the uploads may include a few that the
        // parameters lack.
        let point = GlobalPoint {
            seconds,
            uploads: status.version,
            version,
            accuracy: f64::NAN,
            uploaded_bytes: status.uploaded_bytes,
            downloaded_bytes: status.downloaded_bytes.saturating_sub(own_bytes),
        };
        self.snapshots.push((point, parameters));
        self.next = (status.version / participants + 1) * participants;
        Ok(())
    }

    /// Evaluates every snapshot on the test set.
    fn finish(mut self) -> anyhow::Result<Vec<GlobalPoint>> {
        let mut points = Vec::with_capacity(self.snapshots.len());
        for (mut point, parameters) in std::mem::take(&mut self.snapshots) {
            point.accuracy = self.evaluator.accuracy_of(&parameters)?;
            points.push(point);
        }
        Ok(points)
    }
}

/// Waits for every child, showing the federation's progress from the
/// server's upload count, and records the global curve when asked. Fails
/// with the log path of the first child that exits with an error.
fn wait_with_progress(
    args: &SimulateArgs,
    observer: &TransportArgs,
    participants: &mut [Managed],
    baselines: &mut [Managed],
    mut curve: Option<&mut GlobalCurve>,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<Option<dssgd_proto::v1::StatusResponse>> {
    let total = (args.training.participants * args.training.epochs) as u64;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut status_client = {
        let _guard = runtime.enter();
        crate::client::Client::new(
            &observer.server,
            observer.client_tls()?,
            "simulate",
            crate::client::DEFAULT_MAX_MESSAGE_BYTES,
            crate::client::RetryPolicy {
                give_up_after: Duration::from_secs(5),
                ..Default::default()
            },
        )?
    };
    let stop = stop_flag()?;
    let mut last_status = None;
    loop {
        if stop.load(AtomicOrdering::Relaxed) {
            bail!("interrupted; stopped the server and every participant");
        }
        let mut running = Vec::new();
        let children = participants
            .iter_mut()
            .map(|child| (child, false))
            .chain(baselines.iter_mut().map(|child| (child, true)));
        for (child, baseline) in children {
            match child.child.try_wait()? {
                None => {
                    // A baseline's log has only its own epochs, so the last
                    // one shows how far it is.
                    let epoch = if baseline {
                        last_epoch(&child.log)
                    } else {
                        None
                    };
                    running.push(match epoch {
                        Some(epoch) => {
                            format!("{} (epoch {epoch}/{})", child.name, args.training.epochs)
                        }
                        None => child.name.clone(),
                    });
                }
                Some(status) if status.success() => {}
                Some(status) => {
                    bail!(
                        "{} exited with {status}{}; its log is {}",
                        child.name,
                        logged_error(&child.log),
                        child.log.display()
                    );
                }
            }
        }
        if let Ok(status) = runtime.block_on(status_client.status()) {
            let uploads: u64 = status.participants.iter().map(|p| p.uploads).sum();
            // Once the uploads are done, the rest is evaluation and baselines.
            let waiting = if running.len() <= 3 {
                format!(", running: {}", running.join(", "))
            } else {
                format!(", {} processes running", running.len())
            };
            on_progress(&Progress {
                uploads,
                total,
                message: format!("version {}{waiting}", status.version),
            });
            if let Some(curve) = curve.as_deref_mut() {
                curve.observe(uploads, args.training.participants as u64)?;
            }
            last_status = Some(status);
        }
        if running.is_empty() {
            return Ok(last_status);
        }
        // A round of uploads can take well under a second, so the curve
        // looks more often.
        let pause = if curve.is_some() { 50 } else { 500 };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// Returns the number of the last epoch that the log at `path` reports
/// done, or `None` before the first one or when the log cannot be read.
fn last_epoch(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|line| line.contains("epoch done"))?;
    let start = line.find("epoch=")? + "epoch=".len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Returns ": " and the error that ended a child, from the last
/// "error: " line of its log, or nothing when the log has none.
fn logged_error(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    text.lines()
        .rev()
        .find_map(|line| line.split_once(": error: "))
        .map(|(_, error)| format!(": {error}"))
        .unwrap_or_default()
}

/// Returns the flag that SIGINT and SIGTERM set, installed once per process. A
/// caller that sees it set returns an error, and dropping the process
/// guards stops every child, the server included.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(Arc::clone(flag));
    }
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&flag))
            .context("failed to install the signal handler")?;
    }
    Ok(Arc::clone(FLAG.get_or_init(|| flag)))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

fn summarise(args: &SimulateArgs, results: &Path, elapsed: Duration) -> anyhow::Result<Summary> {
    let mut accuracies = Vec::new();
    let mut standalone = Vec::new();
    let (mut bytes_sent, mut bytes_received) = (0, 0);
    let mut privacy: Option<PrivacyTotals> = None;
    let mut stopped_early = Vec::new();
    let mut peak_per_participant = None;
    for index in 0..args.training.participants {
        let metrics = read_json(&results.join(format!("p{index:03}.json")))?;
        accuracies.push(metrics["final_accuracy"].as_f64().unwrap_or(f64::NAN));
        standalone.extend(metrics["standalone_accuracy"].as_f64());
        bytes_sent += metrics["bytes_sent"].as_u64().unwrap_or(0);
        bytes_received += metrics["bytes_received"].as_u64().unwrap_or(0);
        if let Some(peak) = metrics["process_peak_rss_bytes"].as_u64() {
            let hosted = metrics["hosted_participants"].as_u64().unwrap_or(1).max(1);
            peak_per_participant = peak_per_participant.max(Some(peak / hosted));
        }
        if let Some(reason) = metrics["stopped_early"].as_str() {
            stopped_early.push(format!("p{index:03}: {reason}"));
        }
        let spend = &metrics["privacy"];
        if spend.is_object() {
            let totals = privacy.get_or_insert_with(PrivacyTotals::default);
            totals.epsilon_per_epoch = spend["epsilon_per_epoch"].as_f64().unwrap_or(f64::NAN);
            totals.c = spend["c"].as_u64().unwrap_or(0) as usize;
            totals.epsilon_per_parameter =
                spend["epsilon_per_parameter"].as_f64().unwrap_or(f64::NAN);
            let run = spend["run_epsilon"].as_f64().unwrap_or(f64::NAN);
            totals.run_epsilon_max = totals.run_epsilon_max.max(run);
            let ledger = spend["total_epsilon"].as_f64().unwrap_or(f64::NAN);
            totals.ledger_epsilon_max = totals.ledger_epsilon_max.max(ledger);
            totals.private_uploads += spend["private_uploads"].as_u64().unwrap_or(0);
        }
    }
    let centralized = if args.skip_baselines {
        None
    } else {
        read_json(&results.join("centralized.json"))?["final_accuracy"].as_f64()
    };
    let standalone_mean =
        (!standalone.is_empty()).then(|| standalone.iter().sum::<f64>() / standalone.len() as f64);
    Ok(Summary {
        model: args.training.model.name().to_string(),
        participants: args.training.participants,
        ordering: args.ordering.name().to_string(),
        collaborative_mean: accuracies.iter().sum::<f64>() / accuracies.len() as f64,
        collaborative_min: accuracies.iter().copied().fold(f64::INFINITY, f64::min),
        collaborative_max: accuracies.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        global_accuracy: f64::NAN,
        global_version: 0,
        standalone_mean,
        centralized,
        bytes_sent,
        bytes_received,
        wall_seconds: elapsed.as_secs_f64(),
        privacy,
        stopped_early,
        participants_per_process: args.per_process().min(args.training.participants),
        peak_rss_per_participant_bytes: peak_per_participant,
        global_curve: Vec::new(),
        config: args.clone(),
    })
}

fn print_summary(summary: &Summary) {
    let show = |value: Option<f64>| value.map_or("skipped".to_string(), |v| format!("{v:.4}"));
    println!();
    println!(
        "{} participants, {}, {} ordering, theta_u {}, theta_d {}, {} epochs ({:.0} s)",
        summary.participants,
        summary.model,
        summary.ordering,
        summary.config.sharing.theta_u,
        summary.config.sharing.theta_d,
        summary.config.training.epochs,
        summary.wall_seconds
    );
    println!(
        "  collaborative (final global model)   {:.4}  (version {})",
        summary.global_accuracy, summary.global_version
    );
    println!(
        "  participants at their finish (mean)  {:.4}  [min {:.4}, max {:.4}]",
        summary.collaborative_mean, summary.collaborative_min, summary.collaborative_max
    );
    println!(
        "  standalone (mean of participants)    {}",
        show(summary.standalone_mean)
    );
    println!(
        "  centralized (union of the shards)    {}",
        show(summary.centralized)
    );
    println!(
        "  traffic: {:.1} MB sent, {:.1} MB received by all participants",
        summary.bytes_sent as f64 / 1e6,
        summary.bytes_received as f64 / 1e6
    );
    if let Some(privacy) = &summary.privacy {
        println!(
            "  privacy: epsilon {} per upload (epsilon/c {} with c = {}); composed over this \
             run {} per participant at most",
            significant(privacy.epsilon_per_epoch, 6),
            significant(privacy.epsilon_per_parameter, 6),
            privacy.c,
            significant(privacy.run_epsilon_max, 6)
        );
        println!(
            "  privacy ledgers: {} at most per participant; server records {} at most, {} of {} \
             private uploads applied",
            significant(privacy.ledger_epsilon_max, 6),
            significant(privacy.server_epsilon_max, 6),
            privacy.server_private_uploads,
            privacy.private_uploads
        );
    }
    if let Some(bytes) = summary.peak_rss_per_participant_bytes {
        println!(
            "  memory: {:.0} MiB peak per participant ({} per process)",
            bytes as f64 / (1 << 20) as f64,
            summary.participants_per_process
        );
    }
    if let Some(best) = summary
        .global_curve
        .iter()
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
    {
        println!(
            "  global curve: {} points in summary.json; best {:.4} at {:.1} s ({} uploads)",
            summary.global_curve.len(),
            best.accuracy,
            best.seconds,
            best.uploads
        );
    }
    for line in &summary.stopped_early {
        println!("  stopped early: {line}");
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::data::DatasetKind;
    use crate::model::ModelKind;

    fn parse<T: Into<OsString> + Clone>(argv: impl IntoIterator<Item = T>) -> Command {
        Cli::try_parse_from(argv).unwrap().command
    }

    #[test]
    fn last_epoch_reads_the_latest_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("centralized.log");
        assert_eq!(last_epoch(&log), None, "a missing log has no epoch");
        std::fs::write(
            &log,
            "INFO epoch done run=centralized epoch=1 loss=0.3\n\
             INFO epoch done run=centralized epoch=12 loss=0.1\n\
             INFO other line\n",
        )
        .unwrap();
        assert_eq!(last_epoch(&log), Some(12));
        std::fs::write(&log, "INFO starting\n").unwrap();
        assert_eq!(last_epoch(&log), None, "no epoch is done yet");
    }

    #[test]
    fn logged_error_reads_the_last_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("p000-p001.log");
        assert_eq!(logged_error(&log), "", "a missing log has no error");
        std::fs::write(&log, "INFO shard loaded participant=p000\n").unwrap();
        assert_eq!(logged_error(&log), "", "a log without an error line");
        std::fs::write(
            &log,
            "INFO shard loaded participant=p000\n\
             dssgd-participant: error: invalid gamma 0.002: the server accepts at most 0.001\n",
        )
        .unwrap();
        assert_eq!(
            logged_error(&log),
            ": invalid gamma 0.002: the server accepts at most 0.001"
        );
    }

    #[test]
    fn training_flags_carry_dataset() {
        let argv = [
            "dssgd-participant",
            "simulate",
            "--dataset",
            "svhn",
            "--model",
            "svhn-cnn",
        ];
        let Command::Simulate(mut args) = parse(argv) else {
            panic!("expected simulate");
        };
        // Cleared in case DSSGD_DATA_DIR is set where the tests run.
        args.training.data_dir = None;
        let flags = training_flags(&args.training);

        // A child parses the flags back into the same settings, with the
        // default data folder made explicit.
        let mut child = vec!["dssgd-participant".to_string(), "centralized".to_string()];
        child.extend(flags);
        let Command::Centralized(parsed) = parse(child) else {
            panic!("expected centralized");
        };
        assert_eq!(parsed.training.dataset, DatasetKind::Svhn);
        assert_eq!(parsed.training.model, ModelKind::SvhnCnn);
        assert_eq!(parsed.training.data_dir, Some(PathBuf::from("data/svhn")));
    }
}
