//! Compose integration tests: the server and the participants run in
//! separate containers from the images `scripts/docker-images.sh` builds,
//! on the network `docker-compose.yml` creates, and train on real MNIST.
//!
//! Each scenario brings up its own compose project, prints what it does and
//! what it measured straight to the terminal (also without `--nocapture`),
//! and takes the project down with its volumes at the end, also on failure.
//! When Docker, docker-compose or the images are missing, a scenario prints
//! why it is skipped and passes. `scripts/test.sh` builds the images
//! whenever a Docker engine is present.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_tests::{mnist_dir, read_json, workspace_root};

/// Scenarios run one at a time: each starts four or five containers, and
/// together they would overload a small machine and blur the timings.
static SERIAL: Mutex<()> = Mutex::new(());

/// Parameters the MLP uploads per epoch: ceil(theta_u * n) with theta_u 0.1
/// and n = 109,386.
const UPLOADED_PER_EPOCH: u64 = 10_939;

/// Writes a line to the terminal directly. libtest captures `println!` and
/// `eprintln!` of passing tests, but not writes to the stderr handle.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Finds the Compose command of this machine, or returns why the scenarios
/// are skipped.
fn compose_program() -> Result<Vec<String>, String> {
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match docker {
        Err(error) => return Err(format!("the docker command is missing ({error})")),
        Ok(output) if !output.status.success() => {
            return Err(format!(
                "no Docker engine answers `docker info`: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(_) => {}
    }
    let candidates: [&[&str]; 2] = [&["docker-compose"], &["docker", "compose"]];
    let program = candidates
        .iter()
        .find(|program| {
            Command::new(program[0])
                .args(&program[1..])
                .arg("version")
                .output()
                .is_ok_and(|output| output.status.success())
        })
        .ok_or("neither docker-compose nor `docker compose` is installed")?;
    for image in [server_image(), participant_image()] {
        let found = Command::new("docker")
            .args(["image", "inspect", &image])
            .output()
            .is_ok_and(|output| output.status.success());
        if !found {
            return Err(format!(
                "the image {image} is missing; build it with scripts/docker-images.sh"
            ));
        }
    }
    Ok(program.iter().map(|part| part.to_string()).collect())
}

fn image_tag() -> String {
    std::env::var("DSSGD_IMAGE_TAG").unwrap_or_else(|_| "latest".into())
}

fn server_image() -> String {
    format!("dssgd-server:{}", image_tag())
}

fn participant_image() -> String {
    format!("dssgd-participant:{}", image_tag())
}

/// Runs `program` with `args` and returns its output, panicking with the
/// command and its stderr when it fails.
fn run_checked(program: &str, args: &[&str], env: &[(String, String)]) -> Output {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .output()
        .unwrap_or_else(|error| panic!("failed to run {program}: {error}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed with {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

fn docker(args: &[&str]) -> String {
    let output = run_checked("docker", args, &[]);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// One compose project of one scenario, taken down with its volumes when
/// dropped.
struct Project {
    program: Vec<String>,
    name: String,
    compose_file: PathBuf,
    env: Vec<(String, String)>,
}

impl Project {
    /// Starts `services` of `docker-compose.yml` (with their dependencies)
    /// as a new project with the settings `env`.
    fn up(program: Vec<String>, scenario: &str, env: &[(&str, String)], services: &[&str]) -> Self {
        let mnist = mnist_dir().canonicalize().unwrap_or_else(|error| {
            panic!("MNIST not found in {}: {error}", mnist_dir().display())
        });
        let mut settings = vec![
            ("DSSGD_MNIST_DIR".to_string(), mnist.display().to_string()),
            ("DSSGD_IMAGE_TAG".to_string(), image_tag()),
        ];
        settings.extend(
            env.iter()
                .map(|(key, value)| (key.to_string(), value.clone())),
        );
        let project = Self {
            program,
            name: format!("dssgd-compose-{scenario}-{}", std::process::id()),
            compose_file: workspace_root()
                .join("docker-compose.yml")
                .canonicalize()
                .expect("docker-compose.yml should exist at the workspace root"),
            env: settings,
        };
        let mut args = vec!["up", "-d", "--no-build"];
        args.extend(services);
        project.compose(&args);
        project
    }

    /// Arguments of a Compose command on this project, after the program.
    fn compose_args<'a>(&'a self, file: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut full: Vec<&str> = self.program[1..].iter().map(String::as_str).collect();
        full.extend(["-f", file, "-p", &self.name]);
        full.extend(args);
        full
    }

    fn compose(&self, args: &[&str]) -> String {
        let file = self.compose_file.display().to_string();
        let output = run_checked(&self.program[0], &self.compose_args(&file, args), &self.env);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Runs a Compose command whose failure must not panic (in `drop`).
    fn compose_quietly(&self, args: &[&str]) -> Option<Output> {
        let file = self.compose_file.display().to_string();
        Command::new(&self.program[0])
            .args(self.compose_args(&file, args))
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .output()
            .ok()
    }

    /// Containers of `service`, ordered by replica number.
    fn containers(&self, service: &str) -> Vec<String> {
        let ids = self.compose(&["ps", "-q", service]);
        let mut numbered: Vec<(u32, String)> = ids
            .lines()
            .map(|id| {
                let number = docker(&[
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"com.docker.compose.container-number\"}}",
                    id,
                ]);
                (number.parse().unwrap_or(u32::MAX), id.to_string())
            })
            .collect();
        numbered.sort();
        numbered.into_iter().map(|(_, id)| id).collect()
    }

    fn network(&self) -> String {
        format!("{}_federation", self.name)
    }

    /// Address of `container` on the project network.
    fn address_of(&self, container: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network()
        );
        docker(&["inspect", "-f", &format, container])
    }

    /// Returns the `http://` address of the server, which this host reaches
    /// over the project's bridge network.
    fn server_address(&self) -> String {
        let server = self.containers("server").remove(0);
        format!("http://{}:50051", self.address_of(&server))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(output) = self.compose_quietly(&["logs", "--no-color", "--tail", "30"])
        {
            say(&format!(
                "last log lines of {}:\n{}",
                self.name,
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        let down = self.compose_quietly(&["down", "-v", "--remove-orphans", "-t", "2"]);
        if !down.is_some_and(|output| output.status.success()) {
            say(&format!(
                "failed to take down the compose project {}; remove it with \
                 `docker-compose -p {} down -v`",
                self.name, self.name
            ));
        }
    }
}

fn state(container: &str) -> (String, i64) {
    let text = docker(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.ExitCode}}",
        container,
    ]);
    let (status, code) = text.split_once(' ').expect("status and exit code");
    (status.to_string(), code.parse().expect("numeric exit code"))
}

fn logs(container: &str) -> String {
    let output = run_checked("docker", &["logs", container], &[]);
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Returns the last epoch `participant` logged as done, or 0.
fn last_epoch(log: &str, participant: &str) -> usize {
    let marker = format!("participant={participant} epoch=");
    log.match_indices(&marker)
        .filter_map(|(at, _)| {
            let digits: String = log[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Polls `done` every 200 ms until it returns true; panics naming `what`
/// after `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for_exit(container: &str, name: &str, limit: Duration) -> i64 {
    let mut code = 0;
    wait_for(&format!("{name} to exit"), limit, || {
        let (status, exit_code) = state(container);
        code = exit_code;
        status == "exited"
    });
    code
}

/// Calls GetStatus on the server at `address`.
fn server_status(address: &str) -> pb::StatusResponse {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime should start");
    runtime.block_on(async {
        let mut client = ParameterServerClient::connect(address.to_string())
            .await
            .unwrap_or_else(|error| {
                panic!("failed to connect to the server at {address}: {error}")
            });
        client
            .get_status(pb::StatusRequest {})
            .await
            .unwrap_or_else(|error| panic!("GetStatus at {address} failed: {error}"))
            .into_inner()
    })
}

/// Returns the server's status, or `None` while it does not respond.
fn try_server_status(address: &str) -> Option<pb::StatusResponse> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime should start");
    runtime.block_on(async {
        let mut client = ParameterServerClient::connect(address.to_string())
            .await
            .ok()?;
        let status = client.get_status(pb::StatusRequest {}).await.ok()?;
        Some(status.into_inner())
    })
}

/// Uploads per participant identifier, with the last upload id.
fn uploads_by_participant(status: &pb::StatusResponse) -> BTreeMap<String, (u64, u64)> {
    status
        .participants
        .iter()
        .map(|record| {
            (
                record.participant_id.clone(),
                (record.uploads, record.last_upload_id),
            )
        })
        .collect()
}

/// Settings of the long scenarios: 5% of MNIST and 200 epochs per
/// participant, so that each participant trains for several seconds and a
/// container can be stopped or cut off in the middle of its run.
fn long_run_settings(epochs: usize) -> Vec<(&'static str, String)> {
    vec![
        ("DSSGD_PARTICIPANTS", "3".into()),
        ("DSSGD_SHARD_FRACTION", "0.05".into()),
        ("DSSGD_EPOCHS", epochs.to_string()),
        ("DSSGD_EVAL_EVERY", "1000".into()),
        ("DSSGD_STANDALONE_BASELINE", "false".into()),
        ("DSSGD_REPORT_CENTRALIZED", "false".into()),
    ]
}

fn copy_from(container: &str, path: &str, dir: &Path) -> PathBuf {
    let target = dir.join(Path::new(path).file_name().expect("a file path"));
    docker(&[
        "cp",
        &format!("{container}:{path}"),
        &target.display().to_string(),
    ]);
    target
}

/// Takes the scenario lock (a failed scenario poisons it harmlessly) and
/// finds Compose, or prints why the scenario is skipped.
fn prepare(scenario: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Vec<String>)> {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match compose_program() {
        Ok(program) => {
            say(&format!("compose scenario: {scenario}"));
            Some((guard, program))
        }
        Err(reason) => {
            say(&format!("compose scenario skipped ({scenario}): {reason}"));
            None
        }
    }
}

#[test]
fn compose_federation_beats_standalone() {
    let scenario = "server, 3 participants and the reporter train on 1% shards for 30 epochs";
    let Some((_guard, program)) = prepare(scenario) else {
        return;
    };
    let started = Instant::now();
    let epochs = 30;
    let env = [
        ("DSSGD_PARTICIPANTS", "3".to_string()),
        ("DSSGD_SHARD_FRACTION", "0.01".into()),
        ("DSSGD_EPOCHS", epochs.to_string()),
        ("DSSGD_EVAL_EVERY", "10".into()),
        ("DSSGD_STANDALONE_BASELINE", "true".into()),
        ("DSSGD_REPORT_CENTRALIZED", "true".into()),
        ("DSSGD_REPORT_TIMEOUT_SECONDS", "240".into()),
    ];
    let project = Project::up(program, "federation", &env, &[]);
    let reporter = project.containers("reporter").remove(0);
    let code = wait_for_exit(&reporter, "the reporter", Duration::from_secs(300));
    assert_eq!(code, 0, "the reporter failed; see its log above");

    let participants = project.containers("participant");
    assert_eq!(participants.len(), 3, "participant containers");
    for (index, container) in participants.iter().enumerate() {
        assert_eq!(
            state(container),
            ("exited".into(), 0),
            "participant {index}"
        );
    }
    let server = project.containers("server").remove(0);
    let health = docker(&["inspect", "-f", "{{.State.Health.Status}}", &server]);
    assert_eq!(health, "healthy", "server health");

    let dir = tempfile::tempdir().unwrap();
    let summary = read_json(&copy_from(
        &reporter,
        "/runs/report/summary.json",
        dir.path(),
    ));
    assert_eq!(summary["participants"], 3, "participants in the summary");
    assert_eq!(summary["global_version"], 3 * epochs, "global version");
    for record in summary["participant_metrics"].as_array().unwrap() {
        assert_eq!(
            record["epochs"], epochs,
            "epochs of {}",
            record["participant"]
        );
    }
    let status = server_status(&project.server_address());
    for (id, (uploads, _)) in uploads_by_participant(&status) {
        if id != "evaluator" {
            assert_eq!(uploads, epochs as u64, "uploads of {id}");
        }
    }
    let collaborative = summary["global_accuracy"].as_f64().unwrap();
    let standalone = summary["standalone_mean"].as_f64().unwrap();
    let centralized = summary["centralized"].as_f64().unwrap();
    say(&format!(
        "  result: collaborative {collaborative:.4}, standalone mean {standalone:.4}, \
         centralized {centralized:.4}, version {}, {:.0} s",
        summary["global_version"],
        started.elapsed().as_secs_f64()
    ));
    assert!(
        collaborative > standalone,
        "collaborative accuracy {collaborative} is not above the standalone mean {standalone}"
    );
}

#[test]
fn compose_killed_participant_rejoins() {
    let scenario = "participant p002 is killed mid-run, the others carry on, and it restarts";
    let Some((_guard, program)) = prepare(scenario) else {
        return;
    };
    let started = Instant::now();
    let epochs = 200;
    let project = Project::up(
        program,
        "kill",
        &long_run_settings(epochs),
        &["server", "participant"],
    );
    let participants = project.containers("participant");
    assert_eq!(participants.len(), 3, "participant containers");
    let victim = participants[2].clone();
    let address = project.server_address();

    wait_for("p002 to finish epoch 5", Duration::from_secs(120), || {
        last_epoch(&logs(&victim), "p002") >= 5
    });
    docker(&["kill", &victim]);
    let killed_at = last_epoch(&logs(&victim), "p002");
    assert!(
        killed_at < epochs,
        "p002 finished all {epochs} epochs before it was killed; the run is too short"
    );
    let version_at_kill = server_status(&address).version;
    wait_for(
        "the others to upload 20 times while p002 is down",
        Duration::from_secs(120),
        || server_status(&address).version >= version_at_kill + 20,
    );
    let before_restart = uploads_by_participant(&server_status(&address));
    let (uploads_before, last_id_before) = before_restart["p002"];
    assert_eq!(state(&victim).0, "exited", "p002 after the kill");

    docker(&["start", &victim]);
    for (index, container) in participants.iter().enumerate() {
        let code = wait_for_exit(container, &format!("p00{index}"), Duration::from_secs(300));
        assert_eq!(code, 0, "exit code of p00{index}");
    }
    let log = logs(&victim);
    assert_eq!(
        log.matches("joined the federation").count(),
        2,
        "p002 should join twice: at the start and after the restart"
    );
    let status = server_status(&address);
    let uploads = uploads_by_participant(&status);
    for id in ["p000", "p001"] {
        assert_eq!(
            uploads[id],
            (epochs as u64, epochs as u64),
            "uploads of {id}"
        );
    }
    let expected = uploads_before + epochs as u64;
    assert_eq!(uploads["p002"].0, expected, "uploads of p002");
    assert_eq!(
        uploads["p002"].1,
        last_id_before + epochs as u64,
        "last upload id of p002"
    );
    assert_eq!(
        status.version,
        2 * epochs as u64 + expected,
        "global version"
    );
    say(&format!(
        "  result: p002 killed after epoch {killed_at} with {uploads_before} uploads applied; \
         the others went on from version {version_at_kill}; restarted, p002 finished \
         {epochs} more epochs; version {}, {:.0} s",
        status.version,
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn compose_partitioned_participant_resumes() {
    let scenario = "participant p002 is disconnected from the network for 8 s, then reconnected";
    let Some((_guard, program)) = prepare(scenario) else {
        return;
    };
    let started = Instant::now();
    let epochs = 200;
    let partition = Duration::from_secs(8);
    let project = Project::up(
        program,
        "partition",
        &long_run_settings(epochs),
        &["server", "participant"],
    );
    let participants = project.containers("participant");
    assert_eq!(participants.len(), 3, "participant containers");
    let victim = participants[2].clone();
    let network = project.network();
    let address = project.server_address();
    let victim_address = project.address_of(&victim);

    wait_for("p002 to finish epoch 5", Duration::from_secs(120), || {
        last_epoch(&logs(&victim), "p002") >= 5
    });
    docker(&["network", "disconnect", &network, &victim]);
    let cut_at = last_epoch(&logs(&victim), "p002");
    let version_at_cut = server_status(&address).version;
    std::thread::sleep(partition);
    let during = server_status(&address);
    let p002_during = uploads_by_participant(&during)["p002"].0;
    docker(&["network", "connect", &network, &victim]);
    // The engine may hand p002 another address. Its open connection then
    // cannot resume, and the client's HTTP/2 keepalive (a ping every 10 s,
    // 20 s for the reply) detects that and reconnects.
    let reconnected_address = project.address_of(&victim);
    let same_address = if reconnected_address == victim_address {
        "the same address".to_string()
    } else {
        format!("a new address ({victim_address} before, {reconnected_address} after)")
    };

    for (index, container) in participants.iter().enumerate() {
        let code = wait_for_exit(container, &format!("p00{index}"), Duration::from_secs(300));
        assert_eq!(code, 0, "exit code of p00{index}");
    }
    let status = server_status(&address);
    let uploads = uploads_by_participant(&status);
    for (id, record) in &uploads {
        assert_eq!(*record, (epochs as u64, epochs as u64), "uploads of {id}");
    }
    assert_eq!(status.version, 3 * epochs as u64, "global version");
    assert_eq!(
        status.total_updates,
        3 * epochs as u64 * UPLOADED_PER_EPOCH,
        "applied parameter changes"
    );
    assert!(
        during.version > version_at_cut,
        "the others made no progress while p002 was cut off"
    );
    let log = logs(&victim);
    let retried = log.matches("call failed; retrying").count();
    say(&format!(
        "  result: p002 cut off after epoch {cut_at} with {p002_during} uploads applied; the \
         others went from version {version_at_cut} to {} meanwhile; p002 resumed at \
         {same_address} and finished {epochs} epochs, each applied once (gRPC-level retries: \
         {retried}); version {}, {:.0} s",
        during.version,
        status.version,
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn compose_server_restart_resumes_from_saved_state() {
    let scenario = "the server container is killed mid-run and started again on its state volume";
    let Some((_guard, program)) = prepare(scenario) else {
        return;
    };
    let started = Instant::now();
    let epochs = 200;
    let project = Project::up(
        program,
        "restart",
        &long_run_settings(epochs),
        &["server", "participant"],
    );
    let participants = project.containers("participant");
    assert_eq!(participants.len(), 3, "participant containers");
    let server = project.containers("server").remove(0);
    let address = project.server_address();

    wait_for(
        "the federation to reach version 30",
        Duration::from_secs(120),
        || server_status(&address).version >= 30,
    );
    let before = server_status(&address);
    docker(&["kill", &server]);
    let killed_at = Instant::now();
    assert_eq!(state(&server).0, "exited", "server after the kill");
    std::thread::sleep(Duration::from_secs(3));
    docker(&["start", &server]);
    // The container may come back under another address.
    let address = project.server_address();
    wait_for(
        "the restarted server to answer",
        Duration::from_secs(60),
        || try_server_status(&address).is_some(),
    );
    let downtime = killed_at.elapsed().as_secs_f64();
    let restored = server_status(&address);
    assert!(
        restored.version >= before.version,
        "the restarted server is at version {}, below the {} acknowledged before the kill",
        restored.version,
        before.version
    );
    let log = logs(&server);
    assert!(
        log.contains("restored the state"),
        "the server did not report restoring its state:\n{log}"
    );

    for (index, container) in participants.iter().enumerate() {
        let code = wait_for_exit(container, &format!("p00{index}"), Duration::from_secs(300));
        assert_eq!(code, 0, "exit code of p00{index}");
    }
    let status = server_status(&address);
    for (id, record) in &uploads_by_participant(&status) {
        assert_eq!(*record, (epochs as u64, epochs as u64), "uploads of {id}");
    }
    assert_eq!(status.version, 3 * epochs as u64, "global version");
    assert_eq!(
        status.total_updates,
        3 * epochs as u64 * UPLOADED_PER_EPOCH,
        "applied parameter changes"
    );
    say(&format!(
        "  result: server killed at version {} (restored at version {}), down {downtime:.0} s; \
         every participant finished {epochs} epochs with each upload applied once; version {}, \
         {:.0} s",
        before.version,
        restored.version,
        status.version,
        started.elapsed().as_secs_f64()
    ));
}
