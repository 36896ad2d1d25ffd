//! Soak of the real server binary with its durable state: 200 simulated
//! participants join and upload concurrently over gRPC. Every acknowledged
//! upload must be in the server's state, and the server's resident memory
//! must stay flat once every participant has joined.
//!
//! The printed line gives the figures of the run: participants, uploads,
//! uploads per second, and the server's resident memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use dssgd_common::sparse::{encode_indices, encode_values};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_tests::start_server;
use tonic::transport::Channel;

const PARTICIPANTS: usize = 200;
const UPLOADS_PER_PARTICIPANT: u64 = 25;
/// A model of 100,000 parameters, of which each upload changes 1%.
const N: u64 = 100_000;
const CHANGES: u64 = 1000;
const LAYOUT: &str = "0123456789abcdef";
/// Resident memory the server may gain between the first and the last
/// quarter of the uploads. The global state is fixed in size, so growth
/// beyond allocator noise would be a leak.
const MAX_GROWTH_BYTES: u64 = 48 * 1024 * 1024;

fn participant_id(index: usize) -> String {
    format!("s{index:03}")
}

fn join_request(index: usize) -> pb::JoinRequest {
    pb::JoinRequest {
        participant_id: participant_id(index),
        model: Some(pb::ModelInfo {
            name: "soak".into(),
            parameter_count: N,
            layout_hash: LAYOUT.into(),
        }),
        initial_parameters: Some(pb::SparseSlice {
            values: encode_values(&vec![0.0; N as usize]).into(),
            dense: true,
            ..Default::default()
        }),
    }
}

fn upload_request(index: usize, upload_id: u64) -> pb::UploadRequest {
    let offset = (index as u64 * 37 + upload_id * 11) % (N / CHANGES);
    let indices: Vec<u32> = (0..CHANGES)
        .map(|j| (offset + j * (N / CHANGES)) as u32)
        .collect();
    let values = vec![0.001f32; CHANGES as usize];
    pb::UploadRequest {
        participant_id: participant_id(index),
        upload_id,
        base_version: 0,
        layout_hash: LAYOUT.into(),
        gamma: 0.01,
        theta_u: 0.01,
        changes: Some(pb::SparseSlice {
            indices: encode_indices(&indices).into(),
            values: encode_values(&values).into(),
            dense: false,
            ..Default::default()
        }),
        turn_token: String::new(),
        epsilon: 0.0,
    }
}

/// Resident memory of process `pid` in bytes, from /proc.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status should be readable");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS is listed");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmRSS is a number of kB");
    kib * 1024
}

async fn connect(address: &str) -> ParameterServerClient<Channel> {
    let channel = Channel::from_shared(address.to_string())
        .expect("the address is a valid URI")
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connecting to {address} failed: {error}"));
    ParameterServerClient::new(channel)
}

#[test]
fn soak_keeps_memory_flat_and_uploads() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    let state = dir.path().join("state");
    let state = state.to_str().expect("the state path is UTF-8");
    let (server, address) = start_server(&["--state-dir", state], &dir.path().join("server.log"));
    let pid = server.child.id();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime should start");
    let total = PARTICIPANTS as u64 * UPLOADS_PER_PARTICIPANT;
    let acknowledged = Arc::new(AtomicU64::new(0));

    let (elapsed, samples) = runtime.block_on(async {
        // Every participant joins first, each over its own connection.
        let mut clients = Vec::with_capacity(PARTICIPANTS);
        for index in 0..PARTICIPANTS {
            let mut client = connect(&address).await;
            client
                .join(join_request(index))
                .await
                .unwrap_or_else(|status| {
                    panic!("join of {} failed: {status}", participant_id(index))
                });
            clients.push(client);
        }
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(index, mut client)| {
                let acknowledged = Arc::clone(&acknowledged);
                tokio::spawn(async move {
                    for upload_id in 1..=UPLOADS_PER_PARTICIPANT {
                        let response = client
                            .upload_gradients(upload_request(index, upload_id))
                            .await
                            .unwrap_or_else(|status| {
                                panic!(
                                    "upload {upload_id} of {} failed: {status}",
                                    participant_id(index)
                                )
                            })
                            .into_inner();
                        assert!(response.applied, "a new upload id was not applied");
                        acknowledged.fetch_add(1, AtomicOrdering::SeqCst);
                    }
                })
            })
            .collect();
        // Sample the server's memory at each quarter of the uploads.
        let mut samples = Vec::new();
        for quarter in 1..=4u64 {
            while acknowledged.load(AtomicOrdering::SeqCst) < total * quarter / 4 {
                assert!(
                    started.elapsed() < Duration::from_secs(400),
                    "the soak did not finish in 400 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples.push(resident_bytes(pid));
        }
        for task in tasks {
            task.await.expect("a participant task panicked");
        }
        (started.elapsed(), samples)
    });

    let status = runtime.block_on(async {
        connect(&address)
            .await
            .get_status(pb::StatusRequest {})
            .await
            .expect("status call should succeed")
            .into_inner()
    });
    assert_eq!(status.version, total, "version after the soak");
    assert_eq!(
        status.participants.len(),
        PARTICIPANTS,
        "participants in the state"
    );
    for record in &status.participants {
        assert_eq!(
            (record.uploads, record.last_upload_id),
            (UPLOADS_PER_PARTICIPANT, UPLOADS_PER_PARTICIPANT),
            "uploads of {}",
            record.participant_id
        );
    }
    assert_eq!(status.total_updates, total * CHANGES, "update counters");
    let growth = samples[3].saturating_sub(samples[0]);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "soak: {PARTICIPANTS} participants, {total} durable uploads of {CHANGES} changes to \
         {N} parameters in {:.1} s ({:.0} uploads/s); server resident memory at each quarter \
         {:.1}, {:.1}, {:.1}, {:.1} MiB; uploads lost: 0",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        mib(samples[0]),
        mib(samples[1]),
        mib(samples[2]),
        mib(samples[3]),
    );
    assert!(
        growth <= MAX_GROWTH_BYTES,
        "the server's resident memory grew by {:.1} MiB between the first and the last quarter",
        mib(growth)
    );
}
