//! End-to-end: the real server binary and real participant processes train
//! the MLP on a subset of real MNIST over gRPC on loopback.

use std::path::{Path, PathBuf};

use dssgd_tests::{ChildGuard, binary, mnist_dir, read_json, start_server, start_server_at};

/// Three participants with 1% of MNIST each; gamma is larger than the
/// 30-participant default because the global model then gets a tenth of
/// the updates per round.
const PARTICIPANTS: usize = 3;
const EPOCHS: usize = 30;

fn training_flags(epochs: usize) -> Vec<String> {
    [
        ("--data-dir", mnist_dir().display().to_string()),
        ("--model", "mlp".into()),
        ("--participants", PARTICIPANTS.to_string()),
        ("--shard-fraction", "0.01".into()),
        ("--epochs", epochs.to_string()),
        ("--lr", "0.1".into()),
        ("--eval-every", "10".into()),
        ("--device", "cpu".into()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

fn participant(index: usize, server: &str, dir: &Path, epochs: usize) -> ChildGuard {
    let mut args = vec!["collaborate".to_string()];
    args.extend(training_flags(epochs));
    args.extend(
        [
            "--gamma",
            "0.002",
            "--insecure",
            "--server",
            server,
            "--index",
            &index.to_string(),
            "--metrics",
            &dir.join(format!("p{index}.json")).display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let log = dir.join(format!("p{index}.log"));
    ChildGuard::spawn(
        &format!("p{index}"),
        &binary("dssgd-participant"),
        &args,
        &log,
    )
}

fn run_tool(command: &str, dir: &Path, extra: &[String]) -> serde_json::Value {
    let metrics = dir.join(format!("{command}.json"));
    let mut args = vec![command.to_string()];
    args.extend(training_flags(EPOCHS));
    args.extend(extra.iter().cloned());
    args.extend(["--metrics".to_string(), metrics.display().to_string()]);
    let log: PathBuf = dir.join(format!("{command}.log"));
    let mut child = ChildGuard::spawn(command, &binary("dssgd-participant"), &args, &log);
    assert!(child.wait(), "{command} failed; see {}", log.display());
    read_json(&metrics)
}

#[test]
fn collaboration_beats_standalone_mean() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address) = start_server(&["--model", "mlp"], &dir.path().join("server.log"));

    let mut participants: Vec<ChildGuard> = (0..PARTICIPANTS)
        .map(|i| participant(i, &address, dir.path(), EPOCHS))
        .collect();
    for child in &mut participants {
        let name = child.name.clone();
        assert!(
            child.wait(),
            "{name} failed; see {}/{name}.log",
            dir.path().display()
        );
    }
    for index in 0..PARTICIPANTS {
        let metrics = read_json(&dir.path().join(format!("p{index}.json")));
        assert_eq!(
            metrics["epochs"].as_array().unwrap().len(),
            EPOCHS,
            "p{index} epochs"
        );
        assert!(
            metrics["bytes_sent"].as_u64().unwrap() > 0,
            "p{index} sent nothing"
        );
        // theta_u = 0.1 of 109,386 parameters, every epoch.
        assert_eq!(
            metrics["parameters_sent"].as_u64().unwrap(),
            10_939 * EPOCHS as u64
        );
    }

    let global = run_tool(
        "evaluate",
        dir.path(),
        &["--insecure".into(), "--server".into(), address.clone()],
    );
    let standalone = run_tool("standalone", dir.path(), &[]);
    let collaborative = global["accuracy"].as_f64().unwrap();
    let standalone_mean = standalone["mean_accuracy"].as_f64().unwrap();
    assert_eq!(
        global["version"].as_u64().unwrap(),
        (PARTICIPANTS * EPOCHS) as u64
    );
    assert!(
        collaborative > standalone_mean,
        "collaborative accuracy {collaborative} is not above the standalone mean {standalone_mean}"
    );
}

#[test]
fn dead_participant_does_not_stall_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address) = start_server(
        &[
            "--model",
            "mlp",
            "--ordering",
            "round-robin",
            "--lease-seconds",
            "2",
        ],
        &dir.path().join("server.log"),
    );
    let mut participants: Vec<ChildGuard> = (0..PARTICIPANTS)
        .map(|i| participant(i, &address, dir.path(), EPOCHS))
        .collect();

    // Kill one participant once the federation has made progress; it may
    // hold the turn at that moment, which only its lease can end.
    let status = dir.path().join("p2.log");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&status)
        .unwrap_or_default()
        .contains("epoch=3")
    {
        assert!(
            started.elapsed().as_secs() < 300,
            "p2 never reached epoch 3"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    participants[2].kill();

    for child in participants.iter_mut().take(2) {
        let name = child.name.clone();
        assert!(
            child.wait(),
            "{name} failed; see {}/{name}.log",
            dir.path().display()
        );
    }
    for index in 0..2 {
        let metrics = read_json(&dir.path().join(format!("p{index}.json")));
        assert_eq!(
            metrics["epochs"].as_array().unwrap().len(),
            EPOCHS,
            "p{index} epochs"
        );
    }
}

#[test]
fn participant_waits_for_late_server() {
    let dir = tempfile::tempdir().unwrap();
    // Reserve a free port, then release it for the server started later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("http://127.0.0.1:{port}");
    let mut early = participant(0, &address, dir.path(), 3);

    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        early.child.try_wait().unwrap().is_none(),
        "participant gave up before the server started"
    );
    let listen = format!("127.0.0.1:{port}");
    let (_server, _) = start_server_at(&listen, &dir.path().join("server.log"));

    assert!(
        early.wait(),
        "participant failed; see {}/p0.log",
        dir.path().display()
    );
    let log = std::fs::read_to_string(dir.path().join("p0.log")).unwrap();
    assert!(
        log.contains("retrying"),
        "the participant log shows no retry"
    );
    let metrics = read_json(&dir.path().join("p0.json"));
    assert_eq!(metrics["epochs"].as_array().unwrap().len(), 3);
}

#[test]
fn stale_uploads_are_dropped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address) = start_server(
        &["--model", "mlp", "--max-staleness", "1"],
        &dir.path().join("server.log"),
    );
    let epochs = 10;
    let mut children: Vec<ChildGuard> = (0..PARTICIPANTS)
        .map(|index| participant(index, &address, dir.path(), epochs))
        .collect();
    for child in &mut children {
        let name = child.name.clone();
        assert!(
            child.wait(),
            "{name} failed under --max-staleness 1; see {}",
            dir.path().join(format!("{name}.log")).display()
        );
    }
    let mut applied = 0;
    let mut dropped = 0;
    for index in 0..PARTICIPANTS {
        let metrics = read_json(&dir.path().join(format!("p{index}.json")));
        for epoch in metrics["epochs"].as_array().expect("epochs are listed") {
            match epoch["parameters_uploaded"].as_u64() {
                Some(0) => dropped += 1,
                Some(_) => applied += 1,
                None => panic!("epoch without parameters_uploaded: {epoch}"),
            }
        }
    }
    assert_eq!(
        applied + dropped,
        PARTICIPANTS * epochs,
        "epochs recorded by the participants"
    );
    assert!(applied > 0, "no upload was applied");
    eprintln!("--max-staleness 1: {applied} uploads applied, {dropped} dropped as stale");
}

#[test]
fn gamma_above_server_limit_stops_at_join() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address) = start_server(
        &["--model", "mlp", "--max-gamma", "0.001"],
        &dir.path().join("server.log"),
    );
    // The participant's gamma is 0.002.
    let mut child = participant(0, &address, dir.path(), 3);
    assert!(!child.wait(), "a participant above --max-gamma finished");
    let log = std::fs::read_to_string(dir.path().join("p0.log")).unwrap();
    assert!(log.contains("invalid gamma 0.002"), "{log}");
    assert!(log.contains("at most 0.001"), "{log}");
    assert!(log.contains("--gamma 0.001 or less"), "{log}");
    assert!(
        !log.contains("epoch done"),
        "the participant trained before it checked gamma: {log}"
    );
}
