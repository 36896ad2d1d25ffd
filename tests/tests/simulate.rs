//! The main job end to end: `dssgd-participant simulate` starts the real
//! server and participant processes over mutual TLS on loopback, here with
//! f16 uploads and the global curve, and writes its summary.

use std::process::Command;

use dssgd_tests::{ChildGuard, binary, mnist_dir, read_json};

const PARTICIPANTS: u64 = 4;
const EPOCHS: u64 = 6;
/// Changes in one upload: ceil(0.1 * 109,386).
const CHANGES_PER_UPLOAD: u64 = 10_939;

#[test]
fn simulate_records_global_curve_with_f16_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("run");
    let log = dir.path().join("simulate.log");
    let child = Command::new(binary("dssgd-participant"))
        .args([
            "simulate",
            "--no-download",
            "--skip-baselines",
            "--global-curve",
        ])
        .args(["--data-dir".as_ref(), mnist_dir().as_os_str()])
        .args(["--participants", &PARTICIPANTS.to_string()])
        .args(["--epochs", &EPOCHS.to_string()])
        .args(["--participants-per-process", "2", "--gamma", "0.005"])
        .args(["--upload-values", "f16", "--device", "cpu"])
        .args(["--output".as_ref(), output.as_os_str()])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .expect("the participant binary starts");
    let mut simulate = ChildGuard {
        name: "simulate".into(),
        child,
    };
    let succeeded = simulate.wait();
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(
        succeeded,
        "simulate failed: {printed}\n{}",
        std::fs::read_to_string(dir.path().join("stderr.log")).unwrap()
    );
    assert!(
        printed.contains("global curve:"),
        "the summary does not mention the global curve: {printed}"
    );

    let summary = read_json(&output.join("summary.json"));
    let curve = summary["global_curve"].as_array().expect("a global curve");
    assert!(!curve.is_empty(), "the global curve has no points");
    let mut previous: Option<&serde_json::Value> = None;
    for point in curve {
        let accuracy = point["accuracy"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&accuracy),
            "accuracy {accuracy} outside [0, 1]"
        );
        let uploads = point["uploads"].as_u64().unwrap();
        assert!(uploads >= PARTICIPANTS, "a point after {uploads} uploads");
        assert!(uploads <= PARTICIPANTS * EPOCHS, "{uploads} uploads");
        // f16 values and Rice-coded indices: under 3 bytes a change, where
        // f32 values alone take 4.
        let uploaded = point["uploaded_bytes"].as_u64().unwrap();
        assert!(
            uploaded < uploads * CHANGES_PER_UPLOAD * 3,
            "{uploaded} payload bytes for {uploads} uploads"
        );
        assert!(
            uploaded > uploads * CHANGES_PER_UPLOAD * 2,
            "{uploaded} bytes"
        );
        assert!(
            uploads >= point["version"].as_u64().unwrap(),
            "the parameters count more uploads than the byte counters: {point}"
        );
        if let Some(previous) = previous {
            for key in ["seconds", "uploads", "uploaded_bytes"] {
                assert!(
                    point[key].as_f64() > previous[key].as_f64(),
                    "{key} did not grow: {previous} then {point}"
                );
            }
            // The next upload can land before the uploader's next download.
            assert!(
                point["downloaded_bytes"].as_u64() >= previous["downloaded_bytes"].as_u64(),
                "downloaded_bytes fell: {previous} then {point}"
            );
        }
        previous = Some(point);
    }
    let last = curve.last().unwrap();
    assert!(
        last["accuracy"].as_f64().unwrap() > 0.8,
        "the global model reached only {last}"
    );
    // Every participant downloads the whole model (109,386 f32) before
    // each epoch; the curve's own downloads are not counted.
    let downloads = last["downloaded_bytes"].as_u64().unwrap() / (4 * 109_386);
    assert!(
        (last["uploads"].as_u64().unwrap()..=PARTICIPANTS * (EPOCHS + 1)).contains(&downloads),
        "{downloads} dense downloads for {last}"
    );
    assert_eq!(
        summary["config"]["sharing"]["upload_values"], "f16",
        "the summary records the value encoding"
    );
}
