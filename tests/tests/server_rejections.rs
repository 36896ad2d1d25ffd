//! Every rejection rule of the parameter server, checked against the real
//! server running in-process and reached over gRPC on loopback.
//!
//! For each invalid join, download or upload, the tests check the gRPC status
//! code, that the status message names the offending value, and that the
//! global parameters, the version, the update counters and the participant
//! records are exactly as before. Most upload tests then send the corrected
//! request with the same upload id and check that it is applied, so the
//! rejection came from the one bad field and did not use up the id.
//!
//! Positive tests cover an applied upload, a retried upload id, turns in the
//! round robin ordering and a model whose dense form exceeds tonic's default
//! 4 MiB message limit.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dssgd_common::config::Ordering;
use dssgd_common::sparse::{
    IndexEncoding, SliceEncoding, SparseSlice, ValueEncoding, encode_indices, encode_values,
    write_varint,
};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_server::{ServerConfig, Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Timeout of every await in this file, so a hung server fails the test
/// quickly instead of blocking the suite.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Client-side message limit. It matches the server's 64 MiB default, because
/// tonic's own 4 MiB default is too small for the 2,000,000-parameter model.
const CLIENT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

const TOY_NAME: &str = "toy";
const TOY_COUNT: u64 = 1000;
const TOY_LAYOUT: &str = "0123456789abcdef";
const OTHER_LAYOUT: &str = "fedcba9876543210";

/// The participant that initialises every joined test server.
const PARTICIPANT: &str = "p1";

/// Gamma and theta_u of `upload_request`. A theta_u of 0.01 allows 10 of the
/// 1000 parameters in one upload.
const GAMMA: f64 = 0.1;
const THETA_U: f64 = 0.01;

/// Difference allowed between an expected and a downloaded parameter. The
/// server adds in f64 and sends f32, so one f32 rounding step near 1.0 is
/// about 1.2e-7.
const TOLERANCE: f32 = 1e-6;

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

/// Awaits `future`, panicking if it takes longer than `TIMEOUT`.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("call timed out after {TIMEOUT:?}"))
}

/// A real server on 127.0.0.1 and a connected client.
struct TestServer {
    client: ParameterServerClient<Channel>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    /// Starts an empty server with `config` on a free loopback port.
    async fn start(config: ServerConfig) -> Self {
        let listener = within(TcpListener::bind("127.0.0.1:0"))
            .await
            .expect("binding 127.0.0.1:0 failed");
        let address = listener
            .local_addr()
            .expect("bound listener has no address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            // A dropped sender also stops the server.
            let _ = stopped.await;
        };
        let task = tokio::spawn(dssgd_server::run(
            config,
            Arc::new(Store::new()),
            listener,
            shutdown,
        ));
        let endpoint = Channel::from_shared(format!("http://{address}"))
            .expect("loopback address is a valid URI");
        let channel = within(endpoint.connect())
            .await
            .unwrap_or_else(|error| panic!("connecting to {address} failed: {error}"));
        let client = ParameterServerClient::new(channel)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES);
        Self { client, stop, task }
    }

    /// Starts a server with `config` that `PARTICIPANT` has initialised with
    /// the toy model.
    async fn start_joined(config: ServerConfig) -> Self {
        let mut server = Self::start(config).await;
        let response = server
            .join(PARTICIPANT, toy_model())
            .await
            .expect("first join of the toy model failed");
        assert!(
            response.initialized_parameters,
            "first join did not initialise the parameters"
        );
        server
    }

    /// Stops the server and checks that it was still running and exits
    /// without an error, so no request crashed it.
    async fn shutdown(self) {
        let Self { client, stop, task } = self;
        assert!(
            !task.is_finished(),
            "the server stopped before the test ended"
        );
        drop(client);
        let _ = stop.send(());
        let result = within(task).await.expect("the server task panicked");
        result.expect("the server exited with an error");
    }

    async fn join(
        &mut self,
        participant: &str,
        model: pb::ModelInfo,
    ) -> Result<pb::JoinResponse, Status> {
        let request = join_request(participant, model);
        within(self.client.join(request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn upload(&mut self, request: pb::UploadRequest) -> Result<pb::UploadResponse, Status> {
        within(self.client.upload_gradients(request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn download(
        &mut self,
        participant: &str,
        theta_d: f64,
    ) -> Result<pb::DownloadResponse, Status> {
        let request = pb::DownloadRequest {
            participant_id: participant.into(),
            theta_d,
            ..Default::default()
        };
        within(self.client.download_parameters(request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn status(&mut self) -> pb::StatusResponse {
        within(self.client.get_status(pb::StatusRequest {}))
            .await
            .expect("GetStatus failed")
            .into_inner()
    }

    /// Downloads every global parameter (theta_d = 1, a dense slice).
    async fn download_all(&mut self) -> (u64, Vec<f32>) {
        let response = self
            .download(PARTICIPANT, 1.0)
            .await
            .expect("full download failed");
        let parameters = response
            .parameters
            .expect("download response has no parameters");
        assert!(parameters.dense, "a full download is not dense");
        assert!(
            parameters.indices.is_empty(),
            "a dense download carries indices"
        );
        (response.version, decode_f32(&parameters.values))
    }

    /// Downloads the `theta_d` fraction of the toy model's parameters as a
    /// sparse slice.
    async fn download_sparse(&mut self, theta_d: f64) -> (u64, SparseSlice) {
        let response = self
            .download(PARTICIPANT, theta_d)
            .await
            .unwrap_or_else(|status| panic!("download with theta_d {theta_d} failed: {status}"));
        let parameters = response
            .parameters
            .expect("download response has no parameters");
        assert!(
            !parameters.dense,
            "download with theta_d {theta_d} is dense"
        );
        let slice = SparseSlice::decode(&parameters.indices, &parameters.values, TOY_COUNT)
            .expect("the server sent an invalid sparse slice");
        (response.version, slice)
    }

    /// Everything a rejected request must leave unchanged.
    async fn snapshot(&mut self) -> ServerState {
        let (download_version, parameters) = self.download_all().await;
        let status = self.status().await;
        assert_eq!(
            download_version, status.version,
            "download and status report different versions with no upload in between"
        );
        ServerState {
            parameters,
            version: status.version,
            total_updates: status.total_updates,
            participants: status.participants,
        }
    }
}

#[derive(Debug)]
struct ServerState {
    parameters: Vec<f32>,
    version: u64,
    total_updates: u64,
    participants: Vec<pb::ParticipantStatus>,
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

fn model_info(name: &str, parameter_count: u64, layout_hash: &str) -> pb::ModelInfo {
    pb::ModelInfo {
        name: name.into(),
        parameter_count,
        layout_hash: layout_hash.into(),
    }
}

fn toy_model() -> pb::ModelInfo {
    model_info(TOY_NAME, TOY_COUNT, TOY_LAYOUT)
}

/// Initial value of parameter `index`, distinct for every index so that a
/// change at the wrong index shows up.
fn initial_value(index: u64) -> f32 {
    index as f32 * 0.001
}

fn dense_slice(values: &[f32]) -> pb::SparseSlice {
    pb::SparseSlice {
        values: encode_values(values).into(),
        dense: true,
        ..Default::default()
    }
}

/// Builds a join carrying dense initial parameters for `model`, as participants send
/// on their first join.
fn join_request(participant: &str, model: pb::ModelInfo) -> pb::JoinRequest {
    let values: Vec<f32> = (0..model.parameter_count).map(initial_value).collect();
    pb::JoinRequest {
        participant_id: participant.into(),
        model: Some(model),
        initial_parameters: Some(dense_slice(&values)),
    }
}

fn sparse_slice(indices: &[u32], values: &[f32]) -> pb::SparseSlice {
    pb::SparseSlice {
        indices: encode_indices(indices).into(),
        values: encode_values(values).into(),
        dense: false,
        ..Default::default()
    }
}

/// Builds a slice from raw payloads, for encodings that `encode_indices`
/// cannot produce because it panics on unsorted or repeated indices.
fn raw_slice(indices: Vec<u8>, values: Vec<u8>) -> pb::SparseSlice {
    pb::SparseSlice {
        indices: indices.into(),
        values: values.into(),
        dense: false,
        ..Default::default()
    }
}

fn varints(values: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &value in values {
        write_varint(&mut out, value);
    }
    out
}

/// Builds an upload of `changes` from `PARTICIPANT`, valid in every other
/// field.
fn upload_request(upload_id: u64, changes: pb::SparseSlice) -> pb::UploadRequest {
    pb::UploadRequest {
        participant_id: PARTICIPANT.into(),
        upload_id,
        base_version: 0,
        layout_hash: TOY_LAYOUT.into(),
        gamma: GAMMA,
        theta_u: THETA_U,
        changes: Some(changes),
        turn_token: String::new(),
        epsilon: 0.0,
    }
}

/// Builds the valid upload (id 1) that table cases modify in one field.
fn valid_upload() -> pb::UploadRequest {
    upload_request(1, sparse_slice(&[1, 2], &[0.01, -0.02]))
}

fn decode_f32(bytes: &[u8]) -> Vec<f32> {
    assert!(
        bytes.len().is_multiple_of(4),
        "value payload of {} bytes is not whole f32 values",
        bytes.len()
    );
    bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect()
}

// ---------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------

/// Checks that `result` is a rejection with `code` whose message contains
/// every string in `needles`.
fn assert_rejected<T: Debug>(case: &str, result: Result<T, Status>, code: Code, needles: &[&str]) {
    let status = match result {
        Ok(response) => panic!("{case}: request was accepted: {response:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "{case}: wrong status code, message {:?}",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{case}: message {:?} does not contain {needle:?}",
            status.message()
        );
    }
}

/// Checks that nothing observable changed between `before` and `after`.
fn assert_unchanged(case: &str, before: &ServerState, after: &ServerState) {
    assert_eq!(
        after.parameters.len(),
        before.parameters.len(),
        "{case}: parameter count changed"
    );
    let changed = before
        .parameters
        .iter()
        .zip(&after.parameters)
        .position(|(old, new)| old.to_bits() != new.to_bits());
    assert!(
        changed.is_none(),
        "{case}: parameter {changed:?} changed from {:?} to {:?}",
        changed.map(|i| before.parameters[i]),
        changed.map(|i| after.parameters[i])
    );
    assert_eq!(after.version, before.version, "{case}: version changed");
    assert_eq!(
        after.total_updates, before.total_updates,
        "{case}: total_updates changed"
    );
    assert_eq!(
        after.participants, before.participants,
        "{case}: participant records changed"
    );
}

/// Sends `request`, checks its rejection and that the state is unchanged.
async fn assert_upload_rejected(
    server: &mut TestServer,
    case: &str,
    request: pb::UploadRequest,
    code: Code,
    needles: &[&str],
) {
    let before = server.snapshot().await;
    let result = server.upload(request).await;
    assert_rejected(case, result, code, needles);
    assert_unchanged(case, &before, &server.snapshot().await);
}

/// Sends a download request, checks its rejection and that the state is
/// unchanged.
async fn assert_download_rejected(
    server: &mut TestServer,
    case: &str,
    participant: &str,
    theta_d: f64,
    code: Code,
    needles: &[&str],
) {
    let before = server.snapshot().await;
    let result = server.download(participant, theta_d).await;
    assert_rejected(case, result, code, needles);
    assert_unchanged(case, &before, &server.snapshot().await);
}

/// Checks that `valid_upload` (upload id 1) is applied as the first upload,
/// so the rejections before it neither used up the id nor moved the version.
async fn assert_valid_upload_applies(server: &mut TestServer) {
    let response = server
        .upload(valid_upload())
        .await
        .expect("the valid upload after the rejections failed");
    assert!(response.applied, "the valid upload was not applied");
    assert_eq!(
        response.version, 1,
        "the valid upload did not make version 1"
    );
}

// ---------------------------------------------------------------------------
// Malformed or invalid slices
// ---------------------------------------------------------------------------

#[tokio::test]
async fn index_out_of_range_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, pb::SparseSlice, &[&str]); 3] = [
        (
            "index equal to the parameter count",
            sparse_slice(&[1000], &[0.01]),
            &["index 1000", "1000 parameters"],
        ),
        (
            "last of several indices out of range",
            sparse_slice(&[3, 999, 1000], &[0.01, 0.01, 0.01]),
            &["index 1000", "1000 parameters"],
        ),
        (
            "index above u32",
            raw_slice(varints(&[1 << 40]), encode_values(&[0.01])),
            &["index 1099511627776"],
        ),
    ];
    for (case, changes, needles) in cases {
        let request = upload_request(1, changes);
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn count_mismatch_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, pb::SparseSlice, &[&str]); 3] = [
        (
            "more indices than values",
            raw_slice(encode_indices(&[1, 2, 3]), encode_values(&[0.01, 0.02])),
            &["3 indices", "2 values"],
        ),
        (
            "more values than indices",
            raw_slice(encode_indices(&[1]), encode_values(&[0.01, 0.02])),
            &["1 indices", "2 values"],
        ),
        (
            "values without indices",
            raw_slice(Vec::new(), encode_values(&[0.01])),
            &["0 indices", "1 values"],
        ),
    ];
    for (case, changes, needles) in cases {
        let request = upload_request(1, changes);
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn duplicate_index_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    // The cases list raw varints, which are the first index and then the
    // differences, so a 0 repeats the previous index.
    let cases: [(&str, &[u64], &[&str]); 2] = [
        (
            "second index repeats the first",
            &[17, 0],
            &["duplicate index 17"],
        ),
        (
            "third index repeats the second",
            &[17, 3, 0],
            &["duplicate index 20"],
        ),
    ];
    for (case, deltas, needles) in cases {
        let values = vec![0.01; deltas.len()];
        let request = upload_request(1, raw_slice(varints(deltas), encode_values(&values)));
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn non_finite_value_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [
        ("NaN", f32::NAN, "value NaN at index 4"),
        ("positive infinity", f32::INFINITY, "value inf at index 4"),
        (
            "negative infinity",
            f32::NEG_INFINITY,
            "value -inf at index 4",
        ),
    ];
    for (case, value, needle) in cases {
        let request = upload_request(1, sparse_slice(&[2, 4], &[0.01, value]));
        let needles = [needle, "not finite"];
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, &needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn value_outside_bound_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, pb::UploadRequest, &[&str]); 3] = [
        (
            "negative value below -gamma",
            upload_request(1, sparse_slice(&[4, 9], &[0.05, -0.5])),
            &["value -0.5 at index 9", "[-0.1, 0.1]"],
        ),
        (
            "positive value above gamma",
            upload_request(1, sparse_slice(&[4], &[0.2])),
            &["value 0.2 at index 4", "[-0.1, 0.1]"],
        ),
        (
            "value just above a small gamma",
            pb::UploadRequest {
                gamma: 0.001,
                ..upload_request(1, sparse_slice(&[6], &[0.0011]))
            },
            &["value 0.0011 at index 6", "[-0.001, 0.001]"],
        ),
    ];
    for (case, request, needles) in cases {
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_varint_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let mut after_valid_index = varints(&[5]);
    after_valid_index.push(0x80);
    let cases: [(&str, Vec<u8>, &[&str]); 4] = [
        (
            "payload ends inside the first varint",
            vec![0x80],
            &["truncated varint at byte 0"],
        ),
        (
            "payload ends inside the second varint",
            after_valid_index,
            &["truncated varint at byte 1"],
        ),
        (
            "varint longer than ten bytes",
            [[0xff; 10].as_slice(), &[0x01]].concat(),
            &["malformed varint at byte 0"],
        ),
        (
            "tenth byte overflows 64 bits",
            [[0xff; 9].as_slice(), &[0x02]].concat(),
            &["malformed varint at byte 0"],
        ),
    ];
    for (case, indices, needles) in cases {
        let request = upload_request(1, raw_slice(indices, encode_values(&[0.01])));
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn ragged_values_are_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, Vec<u8>, &[&str]); 2] = [
        ("three value bytes", vec![0; 3], &["3 bytes"]),
        (
            "one value and one stray byte",
            [encode_values(&[0.01]).as_slice(), &[0]].concat(),
            &["5 bytes"],
        ),
    ];
    for (case, values, needles) in cases {
        let request = upload_request(1, raw_slice(encode_indices(&[1]), values));
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_dense_upload_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let full = vec![0.01; TOY_COUNT as usize];
    let with_indices = pb::SparseSlice {
        indices: encode_indices(&[0]).into(),
        ..dense_slice(&full)
    };
    let cases: [(&str, pb::SparseSlice, &[&str]); 3] = [
        (
            "too few values",
            dense_slice(&[0.01; 10]),
            &["10 values", "1000 parameters"],
        ),
        (
            "too many values",
            dense_slice(&vec![0.01; 1001]),
            &["1001 values", "1000 parameters"],
        ),
        (
            "indices in a dense slice",
            with_indices,
            &["invalid changes.indices", "in a dense slice"],
        ),
    ];
    for (case, changes, needles) in cases {
        let request = pb::UploadRequest {
            theta_u: 1.0,
            ..upload_request(1, changes)
        };
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Invalid upload settings
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_theta_u_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [
        ("zero", 0.0, "theta_u 0"),
        ("negative", -0.5, "theta_u -0.5"),
        ("above one", 1.5, "theta_u 1.5"),
        ("NaN", f64::NAN, "theta_u NaN"),
        ("infinite", f64::INFINITY, "theta_u inf"),
    ];
    for (case, theta_u, needle) in cases {
        let request = pb::UploadRequest {
            theta_u,
            ..valid_upload()
        };
        let needles = [needle, "(0, 1]"];
        let case = format!("theta_u {case}");
        assert_upload_rejected(&mut server, &case, request, Code::InvalidArgument, &needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn too_many_entries_for_theta_u_are_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, pb::UploadRequest, &[&str]); 3] = [
        (
            "two entries where one is allowed",
            pb::UploadRequest {
                theta_u: 0.001,
                ..valid_upload()
            },
            &["2 entries", "theta_u 0.001", "at most 1 of 1000"],
        ),
        (
            "eleven entries where ten are allowed",
            upload_request(
                1,
                sparse_slice(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0.01; 11]),
            ),
            &["11 entries", "theta_u 0.01", "at most 10 of 1000"],
        ),
        (
            "dense slice where half is allowed",
            pb::UploadRequest {
                theta_u: 0.5,
                ..upload_request(1, dense_slice(&vec![0.01; TOY_COUNT as usize]))
            },
            &["1000 entries", "theta_u 0.5", "at most 500 of 1000"],
        ),
    ];
    for (case, request, needles) in cases {
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_gamma_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [
        ("zero", 0.0, "gamma 0"),
        ("negative", -1.0, "gamma -1"),
        ("positive infinity", f64::INFINITY, "gamma inf"),
        ("negative infinity", f64::NEG_INFINITY, "gamma -inf"),
        ("NaN", f64::NAN, "gamma NaN"),
    ];
    for (case, gamma, needle) in cases {
        let request = pb::UploadRequest {
            gamma,
            ..valid_upload()
        };
        let needles = [needle, "greater than 0"];
        let case = format!("gamma {case}");
        assert_upload_rejected(&mut server, &case, request, Code::InvalidArgument, &needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn gamma_above_server_limit_is_rejected() {
    let config = ServerConfig {
        max_gamma: Some(0.5),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_joined(config).await;
    let request = pb::UploadRequest {
        gamma: 0.75,
        ..valid_upload()
    };
    let needles = ["gamma 0.75", "at most 0.5"];
    assert_upload_rejected(
        &mut server,
        "gamma above --max-gamma",
        request,
        Code::InvalidArgument,
        &needles,
    )
    .await;
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn zero_upload_id_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let request = pb::UploadRequest {
        upload_id: 0,
        ..valid_upload()
    };
    assert_upload_rejected(
        &mut server,
        "upload id 0",
        request,
        Code::InvalidArgument,
        &["upload id 0"],
    )
    .await;
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn future_base_version_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, u64, &[&str]); 2] = [
        ("one ahead", 1, &["base version 1", "current version 0"]),
        (
            "far ahead",
            u64::MAX,
            &["base version 18446744073709551615", "current version 0"],
        ),
    ];
    for (case, base_version, needles) in cases {
        let request = pb::UploadRequest {
            base_version,
            ..valid_upload()
        };
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Unknown participants and mismatched models
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unknown_participant_upload_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let request = pb::UploadRequest {
        participant_id: "stranger".into(),
        ..valid_upload()
    };
    let needles = ["unknown participant \"stranger\"", "Join"];
    assert_upload_rejected(&mut server, "upload", request, Code::NotFound, &needles).await;
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_participant_download_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let needles = ["unknown participant \"stranger\"", "Join"];
    assert_download_rejected(
        &mut server,
        "download",
        "stranger",
        1.0,
        Code::NotFound,
        &needles,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_participant_id_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [("empty", ""), ("space", "p 1"), ("slash", "../p1")];
    for (case, participant) in cases {
        let request = pb::UploadRequest {
            participant_id: participant.into(),
            ..valid_upload()
        };
        let quoted = format!("invalid participant id {participant:?}");
        let needles = [quoted.as_str()];
        let upload_case = format!("upload with {case} id");
        let code = Code::InvalidArgument;
        assert_upload_rejected(&mut server, &upload_case, request, code, &needles).await;

        let download_case = format!("download with {case} id");
        assert_download_rejected(
            &mut server,
            &download_case,
            participant,
            1.0,
            code,
            &needles,
        )
        .await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn layout_mismatch_on_upload_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [("other layout", OTHER_LAYOUT), ("empty layout", "")];
    for (case, layout_hash) in cases {
        let request = pb::UploadRequest {
            layout_hash: layout_hash.into(),
            ..valid_upload()
        };
        let upload_layout = format!("upload has layout {layout_hash},");
        let server_layout = format!("server serves layout {TOY_LAYOUT}");
        let needles = [upload_layout.as_str(), server_layout.as_str()];
        let code = Code::FailedPrecondition;
        assert_upload_rejected(&mut server, case, request, code, &needles).await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn model_mismatch_on_join_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases: [(&str, pb::ModelInfo, [&str; 2]); 3] = [
        (
            "other layout",
            model_info(TOY_NAME, TOY_COUNT, OTHER_LAYOUT),
            ["layout fedcba9876543210", "layout 0123456789abcdef"],
        ),
        (
            "other parameter count",
            model_info(TOY_NAME, 999, TOY_LAYOUT),
            ["999 parameters", "1000 parameters"],
        ),
        (
            "other name",
            model_info("wide", TOY_COUNT, TOY_LAYOUT),
            ["participant has wide (", "server serves toy ("],
        ),
    ];
    for participant in ["p2", PARTICIPANT] {
        for (case, model, needles) in &cases {
            let case = format!("{case}, joining as {participant}");
            let before = server.snapshot().await;
            let result = server.join(participant, model.clone()).await;
            assert_rejected(&case, result, Code::FailedPrecondition, needles);
            assert_unchanged(&case, &before, &server.snapshot().await);
        }
    }

    let status = server.status().await;
    let model = status
        .model
        .expect("status has no model after the rejections");
    assert_eq!(model, toy_model(), "the served model changed");
    let joined: Vec<&str> = status
        .participants
        .iter()
        .map(|p| p.participant_id.as_str())
        .collect();
    assert_eq!(
        joined,
        [PARTICIPANT],
        "a rejected participant was registered"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_first_join_is_rejected() {
    let mut server = TestServer::start(ServerConfig::default()).await;
    let mut non_finite = join_request(PARTICIPANT, toy_model());
    let mut values = vec![0.0; TOY_COUNT as usize];
    values[7] = f32::NAN;
    non_finite.initial_parameters = Some(dense_slice(&values));
    let mut short = join_request(PARTICIPANT, toy_model());
    short.initial_parameters = Some(dense_slice(&[0.0; 10]));
    let mut sparse = join_request(PARTICIPANT, toy_model());
    sparse.initial_parameters = Some(sparse_slice(&[0], &[0.0]));
    let mut missing = join_request(PARTICIPANT, toy_model());
    missing.initial_parameters = None;
    let mut no_model = join_request(PARTICIPANT, toy_model());
    no_model.model = None;
    let zero_count = join_request(PARTICIPANT, model_info(TOY_NAME, 0, TOY_LAYOUT));

    let cases: [(&str, pb::JoinRequest, Code, &[&str]); 6] = [
        (
            "NaN initial parameter",
            non_finite,
            Code::InvalidArgument,
            &["value NaN at index 7"],
        ),
        (
            "too few initial parameters",
            short,
            Code::InvalidArgument,
            &["10 values", "1000 parameters"],
        ),
        (
            "sparse initial parameters",
            sparse,
            Code::FailedPrecondition,
            &["no dense initial parameters"],
        ),
        (
            "no initial parameters",
            missing,
            Code::FailedPrecondition,
            &["no dense initial parameters"],
        ),
        (
            "no model",
            no_model,
            Code::InvalidArgument,
            &["missing field model"],
        ),
        (
            "zero parameter count",
            zero_count,
            Code::InvalidArgument,
            &["invalid model.parameter_count: 0 parameters"],
        ),
    ];
    for (case, request, code, needles) in cases {
        let result = within(server.client.join(request)).await;
        assert_rejected(case, result, code, needles);
        let status = server.status().await;
        assert_eq!(status.model, None, "{case}: the server took a model");
        assert!(
            status.participants.is_empty(),
            "{case}: a participant was registered"
        );
        assert_eq!(status.version, 0, "{case}: version changed");
    }

    let response = server
        .join(PARTICIPANT, toy_model())
        .await
        .expect("valid first join after the rejections failed");
    assert!(
        response.initialized_parameters,
        "valid first join did not initialise the parameters"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_theta_d_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [
        ("negative", -0.1, "theta_d -0.1"),
        ("above one", 1.1, "theta_d 1.1"),
        ("NaN", f64::NAN, "theta_d NaN"),
        ("infinite", f64::INFINITY, "theta_d inf"),
    ];
    for (case, theta_d, needle) in cases {
        let case = format!("theta_d {case}");
        let needles = [needle, "[0, 1]"];
        let code = Code::InvalidArgument;
        assert_download_rejected(&mut server, &case, PARTICIPANT, theta_d, code, &needles).await;
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Turns
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upload_without_turn_is_rejected() {
    let config = ServerConfig {
        ordering: Ordering::RoundRobin,
        // Shorter than TIMEOUT, so an ungranted AcquireTurn returns first.
        turn_wait: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_joined(config).await;
    server
        .join("p2", toy_model())
        .await
        .expect("second participant failed to join");
    let code = Code::FailedPrecondition;

    let request = valid_upload();
    let needles = [
        "participant \"p1\" does not hold the turn",
        "no turn is granted",
    ];
    assert_upload_rejected(&mut server, "no turn granted", request, code, &needles).await;

    let turn = pb::TurnRequest {
        participant_id: PARTICIPANT.into(),
    };
    let grant = within(server.client.acquire_turn(turn))
        .await
        .expect("AcquireTurn failed")
        .into_inner();
    assert!(
        grant.granted,
        "p1 was the only participant waiting but got no turn"
    );
    assert!(!grant.token.is_empty(), "the granted turn has no token");

    let wrong_token = pb::UploadRequest {
        turn_token: "not-the-token".into(),
        ..valid_upload()
    };
    let needles = [
        "participant \"p1\" does not hold the turn",
        "the token does not match the granted turn",
    ];
    assert_upload_rejected(&mut server, "wrong token", wrong_token, code, &needles).await;

    let other_participant = pb::UploadRequest {
        participant_id: "p2".into(),
        turn_token: grant.token.clone(),
        ..valid_upload()
    };
    let needles = [
        "participant \"p2\" does not hold the turn",
        "another participant holds it",
    ];
    let case = "other participant's token";
    assert_upload_rejected(&mut server, case, other_participant, code, &needles).await;

    let with_turn = pb::UploadRequest {
        turn_token: grant.token.clone(),
        ..valid_upload()
    };
    let response = server
        .upload(with_turn)
        .await
        .expect("upload with the granted turn failed");
    assert!(
        response.applied,
        "upload with the granted turn was not applied"
    );
    assert_eq!(
        response.version, 1,
        "upload with the turn did not make version 1"
    );

    let lease = pb::TurnLease {
        participant_id: PARTICIPANT.into(),
        token: grant.token,
    };
    within(server.client.release_turn(lease))
        .await
        .expect("ReleaseTurn failed");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Accepted requests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn valid_upload_changes_only_its_indices() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let before = server.snapshot().await;
    let indices = [5, 700];
    let changes = [0.05, -0.025];
    let response = server
        .upload(upload_request(1, sparse_slice(&indices, &changes)))
        .await
        .expect("valid upload failed");
    assert!(response.applied, "valid upload was not applied");
    assert_eq!(response.version, 1, "response version");

    let after = server.snapshot().await;
    assert_eq!(
        after.version,
        before.version + 1,
        "version did not grow by one"
    );
    assert_eq!(after.total_updates, 2, "total_updates");
    let record = &after.participants[0];
    assert_eq!(record.participant_id, PARTICIPANT, "participant record id");
    assert_eq!(record.uploads, 1, "participant uploads");
    assert_eq!(
        record.parameters_uploaded, 2,
        "participant parameters_uploaded"
    );
    assert_eq!(record.last_upload_id, 1, "participant last_upload_id");
    for (index, (&old, &new)) in before.parameters.iter().zip(&after.parameters).enumerate() {
        let expected = match indices.iter().position(|&i| i as usize == index) {
            Some(k) => old + changes[k],
            None => old,
        };
        assert!(
            (new - expected).abs() <= TOLERANCE,
            "parameter {index} is {new}, expected {expected}"
        );
    }

    // The updated parameters have counter 1 and every other one 0, so they
    // come first, and the tie among the rest goes to the lowest index.
    let (version, top_two) = server.download_sparse(0.002).await;
    assert_eq!(version, 1, "sparse download version");
    assert_eq!(top_two.indices, indices, "top 2 indices");
    for (k, &index) in indices.iter().enumerate() {
        let value = top_two.values[k];
        let expected = after.parameters[index as usize];
        assert_eq!(value, expected, "top 2 value of parameter {index}");
    }
    let (_, top_three) = server.download_sparse(0.003).await;
    assert_eq!(top_three.indices, [0, 5, 700], "top 3 indices");
    server.shutdown().await;
}

/// Builds a slice of `indices` and `values` in `encoding`.
fn encoded_slice(indices: &[u32], values: &[f32], encoding: SliceEncoding) -> pb::SparseSlice {
    let slice = SparseSlice {
        indices: indices.to_vec(),
        values: values.to_vec(),
    };
    let (index_bytes, value_bytes) = slice.encode_with(encoding);
    pb::SparseSlice::from_payloads(index_bytes, value_bytes, encoding)
}

#[tokio::test]
async fn rice_and_f16_uploads_add_their_values() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let before = server.snapshot().await;
    let indices = [0, 1, 2, 500, 999];
    // Multiples of 2^-10 are exact in binary16, so both encodings add the
    // same values.
    let changes = [0.0625, -0.03125, 0.0009765625, -0.0625, 0.09375];
    let encodings = [
        (IndexEncoding::Rice, ValueEncoding::F32),
        (IndexEncoding::Rice, ValueEncoding::F16),
        (IndexEncoding::DeltaVarint, ValueEncoding::F16),
    ];
    for (id, (indices_encoding, values_encoding)) in encodings.into_iter().enumerate() {
        let encoding = SliceEncoding {
            indices: indices_encoding,
            values: values_encoding,
        };
        let request = upload_request(id as u64 + 1, encoded_slice(&indices, &changes, encoding));
        let response = server
            .upload(request)
            .await
            .unwrap_or_else(|status| panic!("{encoding:?} upload failed: {status}"));
        assert!(response.applied, "{encoding:?} upload was not applied");
    }
    let after = server.snapshot().await;
    assert_eq!(after.version, 3, "version after three uploads");
    assert_eq!(after.total_updates, 15, "total_updates");
    for (index, (&old, &new)) in before.parameters.iter().zip(&after.parameters).enumerate() {
        let expected = match indices.iter().position(|&i| i as usize == index) {
            Some(k) => old + 3.0 * changes[k],
            None => old,
        };
        assert!(
            (new - expected).abs() <= TOLERANCE,
            "parameter {index} is {new}, expected {expected}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn f16_bound_uses_rounded_gamma() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let f16 = SliceEncoding {
        indices: IndexEncoding::Rice,
        values: ValueEncoding::F16,
    };
    // 0.001 rounds up to about 0.0010004 in binary16; a participant that
    // clipped to gamma = 0.001 sends exactly that, and it must pass.
    let clipped = pb::UploadRequest {
        gamma: 0.001,
        ..upload_request(1, encoded_slice(&[7], &[0.001], f16))
    };
    let response = server
        .upload(clipped)
        .await
        .expect("a value clipped to gamma and rounded to f16 was rejected");
    assert!(response.applied, "the clipped f16 upload was not applied");
    let above = pb::UploadRequest {
        gamma: 0.001,
        ..upload_request(2, encoded_slice(&[7], &[0.0011], f16))
    };
    assert_upload_rejected(
        &mut server,
        "f16 value above the rounded gamma",
        above,
        Code::InvalidArgument,
        &["at index 7", "[-0.001, 0.001]"],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_or_malformed_encodings_are_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let rice = SliceEncoding {
        indices: IndexEncoding::Rice,
        values: ValueEncoding::F32,
    };
    let cases: [(&str, pb::SparseSlice, &[&str]); 5] = [
        (
            "unknown index encoding",
            pb::SparseSlice {
                index_encoding: 7,
                ..sparse_slice(&[1], &[0.01])
            },
            &["unknown index_encoding 7"],
        ),
        (
            "unknown value encoding",
            pb::SparseSlice {
                value_encoding: 9,
                ..sparse_slice(&[1], &[0.01])
            },
            &["unknown value_encoding 9"],
        ),
        (
            "Rice parameter above 31",
            pb::SparseSlice {
                indices: vec![40u8, 0].into(),
                ..encoded_slice(&[1], &[0.01], rice)
            },
            &["invalid Rice parameter 40"],
        ),
        (
            "Rice payload shorter than the values",
            pb::SparseSlice {
                values: encode_values(&[0.01, 0.02, 0.03]).into(),
                ..encoded_slice(&[1, 2], &[0.01, 0.02], rice)
            },
            &["Rice-coded index payload ends within entry"],
        ),
        (
            "f16 payload of an odd length",
            pb::SparseSlice {
                values: vec![0u8; 3].into(),
                value_encoding: pb::ValueEncoding::F16 as i32,
                ..sparse_slice(&[1], &[0.01])
            },
            &["3 bytes", "2-byte values"],
        ),
    ];
    for (case, changes, needles) in cases {
        let request = upload_request(1, changes);
        assert_upload_rejected(&mut server, case, request, Code::InvalidArgument, needles).await;
    }
    let before = server.snapshot().await;
    let request = pb::DownloadRequest {
        participant_id: PARTICIPANT.into(),
        theta_d: 0.5,
        index_encoding: 5,
    };
    let result = within(server.client.download_parameters(request))
        .await
        .map(tonic::Response::into_inner);
    assert_rejected(
        "download asking for an unknown index encoding",
        result,
        Code::InvalidArgument,
        &["unknown index_encoding 5"],
    );
    assert_unchanged("download encoding", &before, &server.snapshot().await);
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn rice_download_matches_the_varint_download() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    server
        .upload(upload_request(
            1,
            sparse_slice(&[3, 40, 41, 900], &[0.01; 4]),
        ))
        .await
        .expect("the upload failed");
    let (version, varint) = server.download_sparse(0.1).await;
    let request = pb::DownloadRequest {
        participant_id: PARTICIPANT.into(),
        theta_d: 0.1,
        index_encoding: pb::IndexEncoding::Rice as i32,
    };
    let response = within(server.client.download_parameters(request))
        .await
        .expect("the Rice download failed")
        .into_inner();
    let parameters = response.parameters.expect("no parameters");
    assert_eq!(
        parameters.index_encoding,
        pb::IndexEncoding::Rice as i32,
        "the response names its index encoding"
    );
    let rice = SparseSlice::decode_with(
        &parameters.indices,
        &parameters.values,
        TOY_COUNT,
        rice_f32(),
    )
    .expect("the server sent an invalid Rice slice");
    assert_eq!(response.version, version, "versions of the two downloads");
    assert_eq!(rice, varint, "the two downloads hold the same parameters");
    assert!(
        parameters.indices.len() < encode_indices(&varint.indices).len(),
        "Rice indices take {} bytes, varints {}",
        parameters.indices.len(),
        encode_indices(&varint.indices).len()
    );
    server.shutdown().await;
}

fn rice_f32() -> SliceEncoding {
    SliceEncoding {
        indices: IndexEncoding::Rice,
        values: ValueEncoding::F32,
    }
}

#[tokio::test]
async fn status_counts_payload_bytes() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let start = server.status().await;
    assert_eq!(start.uploaded_bytes, 0, "uploaded bytes before any upload");
    assert_eq!(
        start.downloaded_bytes, 0,
        "downloaded bytes before any download"
    );
    let changes = encoded_slice(&[1, 2, 3], &[0.01, 0.02, 0.03], rice_f32());
    let upload_bytes = (changes.indices.len() + changes.values.len()) as u64;
    server
        .upload(upload_request(1, changes))
        .await
        .expect("the upload failed");
    server.download_all().await;
    let status = server.status().await;
    assert_eq!(
        status.uploaded_bytes, upload_bytes,
        "uploaded payload bytes"
    );
    assert_eq!(
        status.downloaded_bytes,
        4 * TOY_COUNT,
        "downloaded payload bytes of one dense download"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn retried_upload_is_applied_once() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let request = upload_request(1, sparse_slice(&[5], &[0.05]));
    let first = server
        .upload(request.clone())
        .await
        .expect("first upload failed");
    assert!(first.applied, "first upload was not applied");
    let before = server.snapshot().await;

    let retry = server.upload(request).await.expect("retried upload failed");
    assert!(!retry.applied, "retried upload was applied again");
    assert_eq!(retry.version, 1, "retried upload reports another version");
    assert_unchanged("retry", &before, &server.snapshot().await);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_epsilon_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let cases = [
        ("negative", -0.5, "epsilon -0.5"),
        ("positive infinity", f64::INFINITY, "epsilon inf"),
        ("NaN", f64::NAN, "epsilon NaN"),
    ];
    for (case, epsilon, needle) in cases {
        let request = pb::UploadRequest {
            epsilon,
            ..valid_upload()
        };
        let case = format!("epsilon {case}");
        assert_upload_rejected(
            &mut server,
            &case,
            request,
            Code::InvalidArgument,
            &[needle],
        )
        .await;
    }
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn declared_epsilon_is_summed_once_per_upload_id() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let first = pb::UploadRequest {
        epsilon: 0.25,
        ..upload_request(1, sparse_slice(&[5], &[0.05]))
    };
    server.upload(first.clone()).await.expect("upload 1 failed");
    let retry = server
        .upload(first)
        .await
        .expect("retry of upload 1 failed");
    assert!(!retry.applied, "the retry was applied again");
    let plain = upload_request(2, sparse_slice(&[6], &[0.05]));
    server.upload(plain).await.expect("upload 2 failed");
    let second = pb::UploadRequest {
        epsilon: 1.5,
        ..upload_request(3, sparse_slice(&[7], &[0.05]))
    };
    server.upload(second).await.expect("upload 3 failed");

    let status = server.status().await;
    let record = status
        .participants
        .iter()
        .find(|p| p.participant_id == PARTICIPANT)
        .expect("the participant is missing from the status");
    assert_eq!(record.epsilon_spent, 1.75);
    assert_eq!(record.private_uploads, 2);
    assert_eq!(record.uploads, 3);
    server.shutdown().await;
}

#[tokio::test]
async fn older_upload_id_is_not_applied() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let newest = upload_request(3, sparse_slice(&[5], &[0.05]));
    server.upload(newest).await.expect("upload 3 failed");
    let before = server.snapshot().await;

    let older = upload_request(2, sparse_slice(&[6], &[0.05]));
    let response = server.upload(older).await.expect("upload 2 failed");
    assert!(!response.applied, "upload 2 after upload 3 was applied");
    assert_eq!(response.version, 1, "upload 2 reports another version");
    assert_unchanged("older id", &before, &server.snapshot().await);
    server.shutdown().await;
}

#[tokio::test]
async fn model_above_4_mib_round_trips() {
    // 2,000,000 f32 values are 8 MB, almost twice tonic's default limit of
    // 4 MiB, in the join, the download and the dense upload.
    let count: u64 = 2_000_000;
    let mut server = TestServer::start(ServerConfig::default()).await;
    let response = server
        .join(PARTICIPANT, model_info("wide", count, TOY_LAYOUT))
        .await
        .expect("join with 2,000,000 parameters failed");
    assert!(
        response.initialized_parameters,
        "join did not initialise the parameters"
    );

    let (version, parameters) = server.download_all().await;
    assert_eq!(version, 0, "download version");
    assert_eq!(parameters.len() as u64, count, "downloaded parameter count");
    let wrong = (0..count).find(|&i| parameters[i as usize] != initial_value(i));
    assert_eq!(wrong, None, "first downloaded parameter that differs");

    let dense = vec![0.5; count as usize];
    let request = pb::UploadRequest {
        gamma: 1.0,
        theta_u: 1.0,
        ..upload_request(1, dense_slice(&dense))
    };
    let response = server.upload(request).await.expect("dense upload failed");
    assert!(response.applied, "dense upload was not applied");

    let (version, parameters) = server.download_all().await;
    assert_eq!(version, 1, "download version after the dense upload");
    // The server adds in f64, where the sum of two f32 values is exact, and
    // rounds once to f32, so the result equals the f32 sum bit for bit.
    let wrong = (0..count).find(|&i| parameters[i as usize] != initial_value(i) + 0.5);
    assert_eq!(wrong, None, "first parameter off after the dense upload");
    let status = server.status().await;
    assert_eq!(status.total_updates, count, "total_updates");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Staleness and rate limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn stale_upload_is_rejected() {
    let config = ServerConfig {
        max_staleness: Some(2),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_joined(config).await;
    // Uploads built on version 0 are 0, 1 and 2 versions behind.
    for upload_id in 1..=3 {
        let request = upload_request(upload_id, sparse_slice(&[upload_id as u32], &[0.01]));
        let response = server
            .upload(request)
            .await
            .unwrap_or_else(|status| panic!("upload {upload_id} failed: {status:?}"));
        assert!(response.applied, "upload {upload_id} was not applied");
    }
    let stale = upload_request(4, sparse_slice(&[4], &[0.01]));
    assert_upload_rejected(
        &mut server,
        "3 versions behind a limit of 2",
        stale.clone(),
        Code::FailedPrecondition,
        &["base version 0", "current version 3", "limit of 2"],
    )
    .await;
    // A retry of an applied upload id is acknowledged, however stale.
    let retry = server
        .upload(upload_request(3, sparse_slice(&[3], &[0.01])))
        .await
        .expect("a retried upload id should be acknowledged");
    assert!(!retry.applied, "the retried upload was applied again");
    // The same upload on a fresh base version is applied.
    let fresh = pb::UploadRequest {
        base_version: 3,
        ..stale
    };
    let response = server
        .upload(fresh)
        .await
        .expect("an up-to-date upload should be applied");
    assert!(response.applied, "the up-to-date upload was not applied");
    assert_eq!(response.version, 4, "version after the up-to-date upload");
    server.shutdown().await;
}

#[tokio::test]
async fn upload_over_rate_limit_is_rejected() {
    let config = ServerConfig {
        max_uploads_per_second: Some(0.5),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_joined(config).await;
    assert_valid_upload_applies(&mut server).await;
    let second = upload_request(2, sparse_slice(&[9], &[0.01]));
    assert_upload_rejected(
        &mut server,
        "second upload within two seconds at 0.5 per second",
        second,
        Code::ResourceExhausted,
        &["\"p1\"", "0.5 uploads per second"],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn sum_beyond_f32_range_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let huge = |upload_id: u64| pb::UploadRequest {
        gamma: f64::from(f32::MAX),
        ..upload_request(upload_id, sparse_slice(&[5], &[f32::MAX]))
    };
    let first = server
        .upload(huge(1))
        .await
        .expect("one value of f32::MAX still fits");
    assert!(first.applied, "the first upload was not applied");
    assert_upload_rejected(
        &mut server,
        "a second f32::MAX on the same parameter",
        huge(2),
        Code::InvalidArgument,
        &["parameter 5", "beyond the f32 range"],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn compressed_request_is_rejected() {
    let mut server = TestServer::start_joined(ServerConfig::default()).await;
    let before = server.snapshot().await;
    // 48 MiB of zero values compress to about 50 KiB; the server accepts no
    // compression, so it must reject the request without inflating it.
    let zeros = vec![0u8; 48 * 1024 * 1024];
    let request = pb::UploadRequest {
        changes: Some(raw_slice(Vec::new(), zeros)),
        ..valid_upload()
    };
    let mut compressing = server
        .client
        .clone()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_encoding_message_size(usize::MAX);
    let result = within(compressing.upload_gradients(request))
        .await
        .map(tonic::Response::into_inner);
    assert_rejected(
        "gzip-compressed upload",
        result,
        Code::Unimplemented,
        &["gzip"],
    );
    assert_unchanged("gzip-compressed upload", &before, &server.snapshot().await);
    assert_valid_upload_applies(&mut server).await;
    server.shutdown().await;
}
