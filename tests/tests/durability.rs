//! Durability of the server's state, checked against the real server
//! binary. Participants upload concurrently over gRPC while the server is
//! killed with SIGKILL, then the server is started again on the same state
//! directory and must hold every acknowledged upload exactly once, with the
//! parameters equal to the sum of exactly those uploads.
//!
//! Every uploaded value is a multiple of 1/1024 and every sum stays far
//! below 2^14, so f64 and f32 additions are exact in any order and the
//! expected parameters can be compared for equality.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use dssgd_common::sparse::{SparseSlice, encode_indices, encode_values};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_tests::{ChildGuard, start_server};
use tonic::transport::Channel;

const MODEL: &str = "toy";
const LAYOUT: &str = "0123456789abcdef";
const N: u64 = 1000;
/// Changes per upload: theta_u = 0.1 of the 1000 parameters.
const CHANGES: u64 = 100;
const THETA_U: f64 = 0.1;
const GAMMA: f64 = 0.1;
const PARTICIPANTS: usize = 4;
/// Timeout of every call, so that a hung server fails the test.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

fn participant_id(participant: usize) -> String {
    format!("p{participant}")
}

fn model() -> pb::ModelInfo {
    pb::ModelInfo {
        name: MODEL.into(),
        parameter_count: N,
        layout_hash: LAYOUT.into(),
    }
}

/// The changes of upload `upload_id` of `participant`: 100 distinct indices
/// ten apart, and values in [-100/1024, 100/1024], both depending on the
/// participant and the upload id.
fn changes(participant: usize, upload_id: u64) -> (Vec<u32>, Vec<f32>) {
    let start = (participant as u64 * 3 + upload_id * 7) % 10;
    let indices: Vec<u32> = (0..CHANGES).map(|j| (start + 10 * j) as u32).collect();
    let values = (0..CHANGES)
        .map(|j| {
            let step = (participant as u64 * 7 + upload_id * 13 + j * 3) % 201;
            (step as f32 - 100.0) / 1024.0
        })
        .collect();
    (indices, values)
}

fn upload_request(participant: usize, upload_id: u64) -> pb::UploadRequest {
    let (indices, values) = changes(participant, upload_id);
    pb::UploadRequest {
        participant_id: participant_id(participant),
        upload_id,
        base_version: 0,
        layout_hash: LAYOUT.into(),
        gamma: GAMMA,
        theta_u: THETA_U,
        changes: Some(pb::SparseSlice {
            indices: encode_indices(&indices).into(),
            values: encode_values(&values).into(),
            dense: false,
            ..Default::default()
        }),
        turn_token: String::new(),
        epsilon: 0.25,
    }
}

fn join_request(participant: usize) -> pb::JoinRequest {
    pb::JoinRequest {
        participant_id: participant_id(participant),
        model: Some(model()),
        initial_parameters: Some(pb::SparseSlice {
            values: encode_values(&vec![0.0; N as usize]).into(),
            dense: true,
            ..Default::default()
        }),
    }
}

/// Parameters after uploads `1..=last[p]` of every participant `p`, starting
/// from zeros.
fn expected_parameters(last: &[u64]) -> Vec<f32> {
    let mut parameters = vec![0.0f32; N as usize];
    for (participant, &last) in last.iter().enumerate() {
        for upload_id in 1..=last {
            let (indices, values) = changes(participant, upload_id);
            for (index, value) in indices.iter().zip(values) {
                parameters[*index as usize] += value;
            }
        }
    }
    parameters
}

async fn connect(address: &str) -> ParameterServerClient<Channel> {
    let channel = tokio::time::timeout(
        CALL_TIMEOUT,
        Channel::from_shared(address.to_string())
            .expect("the server address is a valid URI")
            .connect(),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to {address} timed out"))
    .unwrap_or_else(|error| panic!("connecting to {address} failed: {error}"));
    ParameterServerClient::new(channel)
}

/// One participant: joins, then uploads ids above the server's last applied
/// id until a call fails because the server was killed. Each acknowledged id
/// is stored in `acknowledged`.
async fn upload_until_failure(address: String, participant: usize, acknowledged: Arc<AtomicU64>) {
    let mut client = connect(&address).await;
    let joined = match client.join(join_request(participant)).await {
        Ok(response) => response.into_inner(),
        // Killed before this participant joined.
        Err(_) => return,
    };
    assert!(
        joined.last_upload_id >= acknowledged.load(AtomicOrdering::SeqCst),
        "{} rejoined with last upload id {}, below the acknowledged {}",
        participant_id(participant),
        joined.last_upload_id,
        acknowledged.load(AtomicOrdering::SeqCst)
    );
    let mut upload_id = joined.last_upload_id + 1;
    loop {
        let call = client.upload_gradients(upload_request(participant, upload_id));
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => {
                assert!(
                    response.into_inner().applied,
                    "a new upload id was not applied"
                );
                acknowledged.store(upload_id, AtomicOrdering::SeqCst);
                upload_id += 1;
            }
            // The kill breaks the connection; which status a broken
            // connection maps to depends on when it broke.
            Ok(Err(_)) => return,
            Err(_) => panic!("upload {upload_id} timed out"),
        }
    }
}

/// A server process on a state directory.
struct Server {
    guard: ChildGuard,
    address: String,
    log: PathBuf,
}

impl Server {
    fn start(state: &Path, checkpoint_factor: u64, log: PathBuf) -> Self {
        let state = state.to_str().expect("the state path is UTF-8");
        let factor = checkpoint_factor.to_string();
        let (guard, address) = start_server(
            &["--state-dir", state, "--checkpoint-factor", &factor],
            &log,
        );
        Self {
            guard,
            address,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Checks the restored state against the acknowledged uploads and returns
/// the last applied upload id of every participant. A participant may have
/// one upload more than acknowledged: the one in flight at the kill, which
/// was committed but whose response was lost.
async fn check_restored(address: &str, acknowledged: &[u64]) -> Vec<u64> {
    let mut client = connect(address).await;
    let status = client
        .get_status(pb::StatusRequest {})
        .await
        .expect("status call should succeed")
        .into_inner();
    let records: BTreeMap<String, pb::ParticipantStatus> = status
        .participants
        .into_iter()
        .map(|record| (record.participant_id.clone(), record))
        .collect();
    let mut last = Vec::new();
    for (participant, &acked) in acknowledged.iter().enumerate() {
        let id = participant_id(participant);
        let record = records
            .get(&id)
            .unwrap_or_else(|| panic!("{id} is missing from the restored state"));
        assert!(
            record.last_upload_id >= acked,
            "{id}: upload {acked} was acknowledged but the restored state ends at {}",
            record.last_upload_id
        );
        assert!(
            record.last_upload_id <= acked + 1,
            "{id}: the restored state has upload {} but only {acked} was acknowledged",
            record.last_upload_id
        );
        assert_eq!(
            record.uploads, record.last_upload_id,
            "{id}: uploads applied against the last upload id"
        );
        assert_eq!(
            record.epsilon_spent,
            0.25 * record.uploads as f64,
            "{id}: declared privacy spend"
        );
        last.push(record.last_upload_id);
    }
    let total: u64 = last.iter().sum();
    assert_eq!(status.version, total, "restored version");
    assert_eq!(status.total_updates, total * CHANGES, "update counters");

    let download = client
        .download_parameters(pb::DownloadRequest {
            participant_id: participant_id(0),
            theta_d: 1.0,
            ..Default::default()
        })
        .await
        .expect("dense download should succeed")
        .into_inner();
    assert_eq!(download.version, total, "version of the download");
    let values = SparseSlice::decode_dense(
        &download
            .parameters
            .expect("the download carries parameters")
            .values,
        N,
    )
    .expect("the dense download decodes");
    let expected = expected_parameters(&last);
    let wrong = values
        .iter()
        .zip(&expected)
        .filter(|(value, expected)| value != expected)
        .count();
    assert_eq!(
        wrong, 0,
        "restored parameters that differ from the sum of the applied uploads"
    );

    // A retry of the last applied upload id is recognised after the restart.
    for (participant, &id) in last.iter().enumerate() {
        if id == 0 {
            continue;
        }
        let response = client
            .upload_gradients(upload_request(participant, id))
            .await
            .expect("a retried upload should be answered")
            .into_inner();
        assert!(
            !response.applied,
            "{} upload {id} was applied twice",
            participant_id(participant)
        );
        assert_eq!(response.version, total, "version after a retry");
    }
    last
}

#[test]
fn kill_during_uploads_keeps_acknowledged() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime should start");
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    let state = dir.path().join("state");
    let acknowledged: Vec<Arc<AtomicU64>> = (0..PARTICIPANTS)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    // Checkpoint factor 0 writes a checkpoint with every upload, so every
    // kill in those rounds falls in or next to a checkpoint's commit. Factor
    // 1 checkpoints every tenth upload, so a restart replays the log.
    let factors = [0, 1, 0, 1];
    let mut total_kills = 0;
    let mut committed_unacknowledged = 0;
    for (round, &factor) in factors.iter().enumerate() {
        let log = dir.path().join(format!("server-{round}.log"));
        let mut server = Server::start(&state, factor, log);
        let acked: Vec<u64> = acknowledged
            .iter()
            .map(|id| id.load(AtomicOrdering::SeqCst))
            .collect();
        if round > 0 {
            let last = runtime.block_on(check_restored(&server.address, &acked));
            committed_unacknowledged += last.iter().zip(&acked).map(|(l, a)| l - a).sum::<u64>();
            assert!(
                server.log_text().contains("restored the state"),
                "round {round}: the server did not report restoring its state:\n{}",
                server.log_text()
            );
            // The participants continue from what the server restored.
            for (id, last) in acknowledged.iter().zip(last) {
                id.store(last, AtomicOrdering::SeqCst);
            }
        }

        let tasks: Vec<_> = (0..PARTICIPANTS)
            .map(|participant| {
                runtime.spawn(upload_until_failure(
                    server.address.clone(),
                    participant,
                    Arc::clone(&acknowledged[participant]),
                ))
            })
            .collect();
        // Kill after a number of uploads that changes from round to round,
        // so that the kills land at different points of the work.
        let target: u64 = acknowledged
            .iter()
            .map(|id| id.load(AtomicOrdering::SeqCst))
            .sum::<u64>()
            + 40
            + 25 * round as u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while acknowledged
            .iter()
            .map(|id| id.load(AtomicOrdering::SeqCst))
            .sum::<u64>()
            < target
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the participants did not reach {target} uploads in 120 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        server.guard.kill();
        total_kills += 1;
        for task in tasks {
            runtime.block_on(task).expect("a participant task panicked");
        }
    }
    assert_eq!(total_kills, factors.len());

    // A last restart, then a clean SIGTERM shutdown, then one more restart:
    // the state is the same each time.
    let acked: Vec<u64> = acknowledged
        .iter()
        .map(|id| id.load(AtomicOrdering::SeqCst))
        .collect();
    let server = Server::start(&state, 4, dir.path().join("server-final.log"));
    let last = runtime.block_on(check_restored(&server.address, &acked));
    assert!(
        last.iter().sum::<u64>() >= 40 * factors.len() as u64,
        "too few uploads were applied over the rounds: {last:?}"
    );
    let mut guard = server.guard;
    let pid = guard.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill should run");
    assert!(sent.success(), "sending SIGTERM failed");
    assert!(
        guard.wait(),
        "the server did not exit cleanly after SIGTERM"
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("state database closed"),
        "the server did not report closing its state after SIGTERM:\n{log}"
    );
    let again = Server::start(&state, 4, dir.path().join("server-again.log"));
    let after = runtime.block_on(check_restored(&again.address, &last));
    assert_eq!(after, last, "state after a clean shutdown and restart");
    let restart_log = again.log_text();
    assert!(
        restart_log.contains("replayed_uploads=0"),
        "the shutdown left uploads to replay; the final checkpoint is missing:\n{restart_log}"
    );
    eprintln!(
        "{total_kills} kills with SIGKILL during uploads: {} uploads applied, every acknowledged \
         one present once; uploads committed at a kill before their response was sent: \
         {committed_unacknowledged}",
        last.iter().sum::<u64>()
    );
}

#[test]
fn corrupt_state_stops_server_unchanged() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("the state directory should be creatable");
    let file = state.join("state.redb");
    let damaged = b"this is not a redb database, and must stay as it is".repeat(100);
    std::fs::write(&file, &damaged).expect("writing the damaged file should succeed");

    let log = dir.path().join("server.log");
    let output = std::process::Command::new(dssgd_tests::binary("dssgd-server"))
        .args(["--listen", "127.0.0.1:0", "--insecure", "--state-dir"])
        .arg(&state)
        .stderr(std::fs::File::create(&log).expect("the log should be creatable"))
        .output()
        .expect("the server should start");
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !output.status.success(),
        "the server started on a corrupt state file:\n{stderr}"
    );
    assert!(
        stderr.contains("corrupt"),
        "the error does not say the state is corrupt:\n{stderr}"
    );
    assert!(
        stderr.contains(&file.display().to_string()),
        "the error does not name the file:\n{stderr}"
    );
    assert!(
        std::fs::read(&file).expect("the file should still be there") == damaged,
        "the server changed the corrupt file"
    );
    let mut entries: Vec<String> = std::fs::read_dir(&state)
        .expect("the state directory should be readable")
        .map(|entry| {
            let name = entry.expect("directory entry").file_name();
            name.to_string_lossy().into_owned()
        })
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["state.lock", "state.redb"],
        "files in the state directory"
    );
}
