//! The Prometheus endpoint of the real server binary: after a private
//! participant's run and one rejected upload, the scraped text shows the
//! version, the per-participant uploads and privacy spend, and the
//! rejection with its reason.

use std::io::{Read, Write};
use std::net::TcpStream;

use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_tests::{ChildGuard, binary, mnist_dir};

/// Fetches `http://address/metrics` with a plain HTTP/1.1 request.
fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connecting to the metrics endpoint");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[test]
fn metrics_endpoint_reports_uploads_spend_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = ChildGuard::spawn(
        "server",
        &binary("dssgd-server"),
        &args,
        &dir.path().join("server.log"),
    );
    let lines = server.first_lines(2);
    let grpc = format!("http://{}", lines[0].strip_prefix("listening on ").unwrap());
    let metrics = lines[1]
        .strip_prefix("metrics on ")
        .unwrap_or_else(|| panic!("unexpected second line {:?}", lines[1]))
        .to_string();

    let participant: Vec<String> = [
        "collaborate",
        "--participants",
        "1",
        "--epochs",
        "2",
        "--eval-every",
        "2",
        "--device",
        "cpu",
        "--epsilon",
        "0.5",
        "--insecure",
        "--server",
        &grpc,
        "--index",
        "0",
        "--privacy-ledger",
        &dir.path().join("p0.jsonl").display().to_string(),
        "--data-dir",
        &mnist_dir().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.path().join("p0.log");
    let mut child = ChildGuard::spawn("p0", &binary("dssgd-participant"), &participant, &log);
    assert!(
        child.wait(),
        "the participant failed; see {}",
        log.display()
    );

    // One upload with an empty layout hash, which the server rejects.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        let mut client = ParameterServerClient::connect(grpc.clone()).await.unwrap();
        client
            .upload_gradients(pb::UploadRequest {
                participant_id: "p000".into(),
                upload_id: 99,
                ..Default::default()
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let text = scrape(&metrics);
    for line in [
        "dssgd_version 2",
        "dssgd_participants 1",
        "dssgd_participant_uploads{participant=\"p000\"} 2",
        "dssgd_participant_epsilon_spent{participant=\"p000\"} 1.0",
        "dssgd_calls_total{rpc=\"UploadGradients\",outcome=\"ok\"} 2",
        "dssgd_calls_total{rpc=\"UploadGradients\",outcome=\"rejected\"} 1",
        "dssgd_rejections_total{rpc=\"UploadGradients\",reason=\"layout_mismatch\"} 1",
        "dssgd_durable 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains("dssgd_uploaded_parameters_total 21878"),
        "{text}"
    );
}
