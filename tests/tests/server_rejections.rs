//! Every rejection rule of the parameter server, checked against a real
//! server over gRPC on loopback: the bad request gets the right status code
//! and a message naming the offending value, and the global parameters, the
//! version and the update counters stay exactly as they were.

use std::sync::Arc;
use std::time::Duration;

use dssgd_common::config::Ordering;
use dssgd_common::sparse::{encode_indices, encode_values, write_varint};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_server::{ServerConfig, Store};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

/// Every await in these tests is bounded by this, so a hang fails fast.
const TIMEOUT: Duration = Duration::from_secs(30);
const N: u64 = 1000;
const LAYOUT: &str = "0123456789abcdef";
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .expect("call timed out")
}

struct Server {
    client: ParameterServerClient<Channel>,
    _stop: oneshot::Sender<()>,
}

async fn start(config: ServerConfig) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(dssgd_server::run(
        config,
        Arc::new(Store::new()),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = within(
        Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let client = ParameterServerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Server {
        client,
        _stop: stop,
    }
}

fn model(name: &str, count: u64, layout: &str) -> pb::ModelInfo {
    pb::ModelInfo {
        name: name.into(),
        parameter_count: count,
        layout_hash: layout.into(),
    }
}

fn join_request(id: &str, info: pb::ModelInfo) -> pb::JoinRequest {
    let values: Vec<f32> = (0..info.parameter_count)
        .map(|i| i as f32 * 0.001)
        .collect();
    pb::JoinRequest {
        participant_id: id.into(),
        model: Some(info),
        initial_parameters: Some(pb::SparseSlice {
            indices: vec![],
            values: encode_values(&values),
            dense: true,
        }),
    }
}

/// A server with the toy model, joined by p1.
async fn joined(config: ServerConfig) -> Server {
    let mut server = start(config).await;
    within(
        server
            .client
            .join(join_request("p1", model("toy", N, LAYOUT))),
    )
    .await
    .unwrap();
    server
}

fn slice(indices: &[u32], values: &[f32]) -> pb::SparseSlice {
    pb::SparseSlice {
        indices: encode_indices(indices),
        values: encode_values(values),
        dense: false,
    }
}

fn upload(id: u64, changes: pb::SparseSlice) -> pb::UploadRequest {
    pb::UploadRequest {
        participant_id: "p1".into(),
        upload_id: id,
        base_version: 0,
        layout_hash: LAYOUT.into(),
        gamma: 0.1,
        theta_u: 0.1,
        changes: Some(changes),
        turn_token: String::new(),
    }
}

/// Everything a rejected request must leave unchanged.
#[derive(Debug, PartialEq)]
struct Snapshot {
    parameters: Vec<f32>,
    version: u64,
    total_updates: u64,
}

async fn snapshot(server: &mut Server) -> Snapshot {
    let request = pb::DownloadRequest {
        participant_id: "p1".into(),
        theta_d: 1.0,
    };
    let response = within(server.client.download_parameters(request))
        .await
        .unwrap()
        .into_inner();
    let values = response.parameters.unwrap().values;
    let parameters = values
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let status = within(server.client.get_status(pb::StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    Snapshot {
        parameters,
        version: status.version,
        total_updates: status.total_updates,
    }
}

/// Sends `request` and checks the rejection and that nothing changed.
async fn assert_upload_rejected(
    server: &mut Server,
    case: &str,
    request: pb::UploadRequest,
    code: Code,
    needle: &str,
) {
    let before = snapshot(server).await;
    let status = within(server.client.upload_gradients(request))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        code,
        "{case}: wrong code, message {:?}",
        status.message()
    );
    assert!(
        status.message().contains(needle),
        "{case}: message {:?} does not name {needle:?}",
        status.message()
    );
    assert_eq!(snapshot(server).await, before, "{case}: state changed");
}

#[tokio::test]
async fn malformed_slices_are_rejected() {
    let mut server = joined(ServerConfig::default()).await;
    let mut duplicate = Vec::new();
    write_varint(&mut duplicate, 17);
    write_varint(&mut duplicate, 0);
    let cases: Vec<(&str, pb::SparseSlice, &str)> = vec![
        (
            "index out of range",
            slice(&[3, 1000], &[0.01, 0.01]),
            "1000",
        ),
        (
            "count mismatch",
            pb::SparseSlice {
                indices: encode_indices(&[1, 2, 3]),
                values: encode_values(&[0.01, 0.02]),
                dense: false,
            },
            "3 indices, 2 values",
        ),
        (
            "duplicate index",
            pb::SparseSlice {
                indices: duplicate,
                values: encode_values(&[0.01, 0.02]),
                dense: false,
            },
            "duplicate index 17",
        ),
        ("NaN value", slice(&[4], &[f32::NAN]), "NaN"),
        ("infinite value", slice(&[4], &[f32::INFINITY]), "inf"),
        (
            "negative infinite value",
            slice(&[4], &[f32::NEG_INFINITY]),
            "-inf",
        ),
        (
            "value outside the bound",
            slice(&[4, 9], &[0.05, -0.5]),
            "-0.5",
        ),
        (
            "truncated varint",
            pb::SparseSlice {
                indices: vec![0x80],
                values: encode_values(&[0.01]),
                dense: false,
            },
            "truncated varint",
        ),
        (
            "ragged values",
            pb::SparseSlice {
                indices: encode_indices(&[1]),
                values: vec![0, 0, 0],
                dense: false,
            },
            "3 bytes",
        ),
        (
            "short dense slice",
            pb::SparseSlice {
                indices: vec![],
                values: encode_values(&[0.01; 10]),
                dense: true,
            },
            "10 values",
        ),
    ];
    for (case, changes, needle) in cases {
        let request = pb::UploadRequest {
            theta_u: 1.0,
            ..upload(1, changes)
        };
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needle).await;
    }
}

#[tokio::test]
async fn invalid_settings_are_rejected() {
    let mut server = joined(ServerConfig::default()).await;
    let valid = || upload(1, slice(&[1, 2], &[0.01, 0.02]));
    let cases: Vec<(&str, pb::UploadRequest, &str)> = vec![
        (
            "theta_u zero",
            pb::UploadRequest {
                theta_u: 0.0,
                ..valid()
            },
            "theta_u 0",
        ),
        (
            "theta_u negative",
            pb::UploadRequest {
                theta_u: -0.5,
                ..valid()
            },
            "theta_u -0.5",
        ),
        (
            "theta_u above one",
            pb::UploadRequest {
                theta_u: 1.5,
                ..valid()
            },
            "theta_u 1.5",
        ),
        (
            "theta_u NaN",
            pb::UploadRequest {
                theta_u: f64::NAN,
                ..valid()
            },
            "theta_u NaN",
        ),
        (
            "gamma zero",
            pb::UploadRequest {
                gamma: 0.0,
                ..valid()
            },
            "gamma 0",
        ),
        (
            "gamma negative",
            pb::UploadRequest {
                gamma: -1.0,
                ..valid()
            },
            "gamma -1",
        ),
        (
            "gamma infinite",
            pb::UploadRequest {
                gamma: f64::INFINITY,
                ..valid()
            },
            "gamma inf",
        ),
        (
            "upload id zero",
            pb::UploadRequest {
                upload_id: 0,
                ..valid()
            },
            "upload id 0",
        ),
        (
            "future version",
            pb::UploadRequest {
                base_version: 7,
                ..valid()
            },
            "7",
        ),
        (
            "more entries than theta_u allows",
            pb::UploadRequest {
                theta_u: 0.001,
                ..valid()
            },
            "2 entries",
        ),
    ];
    for (case, request, needle) in cases {
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needle).await;
    }
}

#[tokio::test]
async fn unknown_participant_is_rejected() {
    let mut server = joined(ServerConfig::default()).await;
    let request = pb::UploadRequest {
        participant_id: "stranger".into(),
        ..upload(1, slice(&[1], &[0.01]))
    };
    assert_upload_rejected(&mut server, "upload", request, Code::NotFound, "stranger").await;

    let download = pb::DownloadRequest {
        participant_id: "stranger".into(),
        theta_d: 1.0,
    };
    let status = within(server.client.download_parameters(download))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("stranger"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn layout_mismatch_on_upload_is_rejected() {
    let mut server = joined(ServerConfig::default()).await;
    let request = pb::UploadRequest {
        layout_hash: "ffffffffffffffff".into(),
        ..upload(1, slice(&[1], &[0.01]))
    };
    let code = Code::FailedPrecondition;
    assert_upload_rejected(&mut server, "layout", request, code, "ffffffffffffffff").await;
}

#[tokio::test]
async fn model_mismatch_on_join_is_rejected() {
    let mut server = joined(ServerConfig::default()).await;
    let before = snapshot(&mut server).await;
    let cases = [
        (
            "other layout",
            model("toy", N, "fedcba9876543210"),
            "fedcba9876543210",
        ),
        ("other count", model("toy", 999, LAYOUT), "999 parameters"),
        ("other name", model("big", N, LAYOUT), "big"),
    ];
    for (case, info, needle) in cases {
        let status = within(server.client.join(join_request("p2", info)))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{case}: {}",
            status.message()
        );
        assert!(
            status.message().contains(needle),
            "{case}: {}",
            status.message()
        );
        assert!(
            status.message().contains(LAYOUT),
            "{case}: server layout missing"
        );
    }
    assert_eq!(snapshot(&mut server).await, before);
    let status = within(server.client.get_status(pb::StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.participants.len(),
        1,
        "a rejected participant was registered"
    );
}

#[tokio::test]
async fn invalid_download_fraction_is_rejected() {
    let mut server = joined(ServerConfig::default()).await;
    for theta_d in [-0.1, 1.1, f64::NAN] {
        let request = pb::DownloadRequest {
            participant_id: "p1".into(),
            theta_d,
        };
        let status = within(server.client.download_parameters(request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "theta_d {theta_d}");
        assert!(
            status.message().contains("theta_d"),
            "theta_d {theta_d}: {}",
            status.message()
        );
    }
}

#[tokio::test]
async fn valid_upload_changes_exactly_its_indices() {
    let mut server = joined(ServerConfig::default()).await;
    let before = snapshot(&mut server).await;
    let request = upload(1, slice(&[5, 700], &[0.05, -0.025]));
    let response = within(server.client.upload_gradients(request))
        .await
        .unwrap()
        .into_inner();
    assert!(response.applied);
    assert_eq!(response.version, 1);

    let after = snapshot(&mut server).await;
    assert_eq!(after.version, 1);
    assert_eq!(after.total_updates, 2);
    for (index, (old, new)) in before.parameters.iter().zip(&after.parameters).enumerate() {
        let expected = match index {
            5 => old + 0.05,
            700 => old - 0.025,
            _ => *old,
        };
        assert!(
            (new - expected).abs() < 1e-6,
            "parameter {index}: {new} != {expected}"
        );
    }

    // The two updated parameters now have the largest counters.
    let request = pb::DownloadRequest {
        participant_id: "p1".into(),
        theta_d: 0.002,
    };
    let top = within(server.client.download_parameters(request))
        .await
        .unwrap()
        .into_inner();
    let top = top.parameters.unwrap();
    assert!(!top.dense);
    assert_eq!(top.indices, encode_indices(&[5, 700]));
}

#[tokio::test]
async fn retried_upload_is_applied_once() {
    let mut server = joined(ServerConfig::default()).await;
    let request = upload(1, slice(&[5], &[0.05]));
    within(server.client.upload_gradients(request.clone()))
        .await
        .unwrap();
    let before = snapshot(&mut server).await;
    let again = within(server.client.upload_gradients(request))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.applied);
    assert_eq!(again.version, 1);
    assert_eq!(snapshot(&mut server).await, before);
}

#[tokio::test]
async fn upload_without_turn_is_rejected_in_round_robin() {
    let config = ServerConfig {
        ordering: Ordering::RoundRobin,
        ..ServerConfig::default()
    };
    let mut server = joined(config).await;
    let request = upload(1, slice(&[5], &[0.05]));
    let code = Code::FailedPrecondition;
    assert_upload_rejected(&mut server, "no turn", request.clone(), code, "turn").await;

    let turn = pb::TurnRequest {
        participant_id: "p1".into(),
    };
    let grant = within(server.client.acquire_turn(turn))
        .await
        .unwrap()
        .into_inner();
    assert!(grant.granted);
    let with_turn = pb::UploadRequest {
        turn_token: grant.token.clone(),
        ..request
    };
    let response = within(server.client.upload_gradients(with_turn))
        .await
        .unwrap()
        .into_inner();
    assert!(response.applied);
    let lease = pb::TurnLease {
        participant_id: "p1".into(),
        token: grant.token,
    };
    within(server.client.release_turn(lease)).await.unwrap();
}

#[tokio::test]
async fn model_above_four_mebibytes_round_trips() {
    let mut server = start(ServerConfig::default()).await;
    let count = 2_000_000;
    within(
        server
            .client
            .join(join_request("p1", model("wide", count, LAYOUT))),
    )
    .await
    .unwrap();
    let request = pb::DownloadRequest {
        participant_id: "p1".into(),
        theta_d: 1.0,
    };
    let response = within(server.client.download_parameters(request))
        .await
        .unwrap()
        .into_inner();
    let values = response.parameters.unwrap().values;
    assert_eq!(values.len() as u64, count * 4);
    let last = f32::from_le_bytes(values[values.len() - 4..].try_into().unwrap());
    assert_eq!(last, (count - 1) as f32 * 0.001);
}
