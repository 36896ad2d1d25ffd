//! End-to-end: the experiment runner runs `experiments/ci-small.toml` (real
//! server, real participant processes, real MNIST), survives an
//! interruption without losing finished cells, resumes, and writes a
//! report, tables and plots with every expected cell and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime};

use dssgd_tests::{CHILD_TIMEOUT, binary, mnist_dir, workspace_root};

/// Columns every row of `cells.csv` must have, in this order.
const COLUMNS: [&str; 38] = [
    "id",
    "method",
    "status",
    "dataset",
    "model",
    "participants",
    "shard_fraction",
    "partition",
    "ordering",
    "theta_u",
    "theta_d",
    "gamma",
    "tau",
    "selection",
    "epsilon",
    "epsilon_per_parameter",
    "upload_values",
    "epochs",
    "lr",
    "lr_decay",
    "batch_size",
    "momentum",
    "eval_every",
    "seed",
    "standalone_sample",
    "accuracy",
    "accuracy_min",
    "accuracy_max",
    "participant_mean",
    "standalone_accuracy",
    "centralized_accuracy",
    "bytes_sent",
    "bytes_received",
    "wall_seconds",
    "epsilon_spent",
    "participants_per_process",
    "peak_rss_per_participant_mib",
    "curve",
];

fn config() -> PathBuf {
    workspace_root().join("experiments/ci-small.toml")
}

fn experiment_args(config: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "experiment",
        &config.display().to_string(),
        "--output",
        &output.display().to_string(),
        "--data-dir",
        &mnist_dir().display().to_string(),
        "--no-download",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// What a finished runner printed, and whether it succeeded.
struct Output {
    success: bool,
    text: String,
}

/// Starts the runner with its output in files beside `output`.
fn start(config: &Path, output: &Path, extra: &[&str]) -> (Child, PathBuf) {
    let log = output.with_extension(format!(
        "{}.log",
        START.fetch_add(1, AtomicOrdering::Relaxed)
    ));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary("dssgd-participant"))
        .args(experiment_args(config, output, extra))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("the participant binary should start");
    (child, log)
}

static START: AtomicUsize = AtomicUsize::new(0);

/// Waits for the runner, failing the test if it runs past the children's
/// time limit.
fn finish(mut child: Child, log: &Path) -> Output {
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the runner ran longer than {CHILD_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        success: status.success(),
        text: std::fs::read_to_string(log).unwrap(),
    }
}

fn run(config: &Path, output: &Path, extra: &[&str]) -> Output {
    let (child, log) = start(config, output, extra);
    finish(child, &log)
}

fn text(output: &Output) -> &str {
    &output.text
}

/// Modification times of every finished cell's result file.
fn results(output: &Path) -> BTreeMap<String, SystemTime> {
    let mut found = BTreeMap::new();
    let Ok(cells) = std::fs::read_dir(output.join("cells")) else {
        return found;
    };
    for cell in cells.flatten() {
        let result = cell.path().join("result.json");
        if let Ok(meta) = std::fs::metadata(&result) {
            found.insert(
                cell.file_name().to_string_lossy().into_owned(),
                meta.modified().unwrap(),
            );
        }
    }
    found
}

/// Starts the runner and stops it with SIGTERM once `count` cells have
/// finished; returns the runner's exit status and output.
fn interrupt_after(config: &Path, output: &Path, count: usize) -> Output {
    let (child, log) = start(config, output, &[]);
    let started = Instant::now();
    while results(output).len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no {count} cells finished within 300 s; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill should run");
    assert!(status.success());
    finish(child, &log)
}

fn csv(path: &Path) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    // No field of this configuration needs quoting.
    let rows = lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), header.len(), "row {line}");
            header
                .iter()
                .cloned()
                .zip(fields.into_iter().map(String::from))
                .collect()
        })
        .collect();
    (header, rows)
}

#[test]
fn small_grid_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");

    // Stop the runner after its first cell: the finished cell stays, the
    // running one is abandoned, and the exit status reports the stop.
    let stopped = interrupt_after(&config(), &output, 1);
    assert!(!stopped.success, "{}", text(&stopped));
    let survivors = results(&output);
    assert!(!survivors.is_empty());

    // The same command resumes: finished cells are not run again.
    let resumed = run(&config(), &output, &[]);
    assert!(resumed.success, "{}", text(&resumed));
    assert!(
        text(&resumed).contains(&format!("{} already finished", survivors.len())),
        "{}",
        text(&resumed)
    );
    let finished = results(&output);
    assert_eq!(finished.len(), 7, "{finished:?}");
    for (id, modified) in &survivors {
        assert_eq!(finished[id], *modified, "{id} was run again");
    }

    // A third start has nothing left to run and changes no result.
    let again = run(&config(), &output, &[]);
    assert!(again.success, "{}", text(&again));
    assert!(text(&again).contains("7 already finished, 0 to run"));
    assert_eq!(results(&output), finished);

    let (header, rows) = csv(&output.join("cells.csv"));
    assert_eq!(header, COLUMNS);
    assert_eq!(rows.len(), 7);
    let count = |method: &str| rows.iter().filter(|r| r["method"] == method).count();
    assert_eq!(
        (
            count("collaborative"),
            count("standalone"),
            count("centralized")
        ),
        (3, 2, 2)
    );
    for row in &rows {
        assert_eq!(row["status"], "done", "{row:?}");
        let accuracy: f64 = row["accuracy"].parse().unwrap();
        assert!((0.3..=1.0).contains(&accuracy), "{row:?}");
        assert!(!row["curve"].is_empty(), "{row:?}");
        assert!(row["wall_seconds"].parse::<f64>().unwrap() > 0.0);
    }
    for row in rows.iter().filter(|r| r["method"] == "collaborative") {
        for column in [
            "standalone_accuracy",
            "centralized_accuracy",
            "participant_mean",
        ] {
            let value: f64 = row[column].parse().unwrap_or(f64::NAN);
            assert!((0.1..=1.0).contains(&value), "{column} in {row:?}");
        }
        assert!(row["bytes_sent"].parse::<u64>().unwrap() > 0);
        assert!(row["peak_rss_per_participant_mib"].parse::<f64>().unwrap() > 1.0);
    }
    // theta_u = 1 uploads every change, theta_u = 0.1 a tenth of them.
    let sent = |theta: &str, partition: &str| -> u64 {
        rows.iter()
            .find(|r| {
                r["method"] == "collaborative"
                    && r["theta_u"] == theta
                    && r["partition"] == partition
            })
            .map(|r| r["bytes_sent"].parse().unwrap())
            .unwrap()
    };
    assert!(sent("1", "iid") > 3 * sent("0.1", "iid"));
    assert!(rows.iter().any(|r| r["partition"] == "dirichlet(0.5)"));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("cells.json")).unwrap()).unwrap();
    let cells = json.as_array().unwrap();
    assert_eq!(cells.len(), 7);
    assert!(
        cells
            .iter()
            .all(|c| !c["result"]["curve"].as_array().unwrap().is_empty())
    );

    let report = std::fs::read_to_string(output.join("report.md")).unwrap();
    for section in [
        "# ci-small",
        "## Collaborative cells",
        "## Reference cells",
        "## Plots",
        "## Processes and memory",
    ] {
        assert!(
            report.contains(section),
            "report lacks {section}:\n{report}"
        );
    }
    assert_eq!(report.matches("| **0.").count(), 3, "{report}");
    assert!(!report.contains("Plot not drawn"), "{report}");
    for stem in [
        "accuracy-vs-epochs-mlp-grid1",
        "accuracy-vs-theta-u-mlp-grid1",
        "accuracy-vs-epochs-mlp-grid2",
        "plot1-accuracy-vs-epoch",
    ] {
        assert!(report.contains(&format!("plots/{stem}.png")), "{report}");
        let png = std::fs::read(output.join(format!("plots/{stem}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(output.join(format!("plots/{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"));
    }

    // Adding a value to the grid leaves one new cell to run.
    let wider = dir.path().join("wider.toml");
    let original = std::fs::read_to_string(config()).unwrap();
    std::fs::write(
        &wider,
        original.replace("theta_u = [1.0, 0.1]", "theta_u = [1.0, 0.1, 0.01]"),
    )
    .unwrap();
    let planned = run(&wider, &output, &["--dry-run"]);
    assert!(planned.success, "{}", text(&planned));
    assert!(
        text(&planned).contains("8 cells, 7 finished, 1 to run"),
        "{}",
        text(&planned)
    );
}

#[test]
fn bad_grid_value_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[experiment]\nname = \"bad\"\n[[grid]]\ntheta_u = [0.1, 2.0]\n",
    )
    .unwrap();
    let output = dir.path().join("out");
    let failed = run(&bad, &output, &[]);
    assert!(!failed.success);
    let message = text(&failed);
    assert!(message.contains("theta_u = 2.0"), "{message}");
    assert!(message.contains("invalid theta-u 2"), "{message}");
    assert!(results(&output).is_empty());
}

#[test]
fn shipped_configurations_expand() {
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("experiments"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(configs.len() >= 5, "{configs:?}");
    for config in configs {
        let output = dir.path().join(config.file_stem().unwrap());
        let planned = run(&config, &output, &["--dry-run"]);
        assert!(planned.success, "{}: {}", config.display(), text(&planned));
        assert!(
            text(&planned).contains(" to run; output in "),
            "{}",
            text(&planned)
        );
    }
}
