//! Transport security of the real server binary: mutual TLS with
//! certificates made by `dssgd-server certs`, handshakes that fail in every
//! usual way without stopping the server from serving the next participant,
//! participant identities bound to certificates, and the start-up checks of
//! the TLS and plaintext flags.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dssgd_common::sparse::{encode_indices, encode_values};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_tests::{ChildGuard, binary};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const N: u64 = 100;
const LAYOUT: &str = "0123456789abcdef";
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `dssgd-server certs --out DIR` with `extra` flags.
fn make_certs(dir: &Path, extra: &[&str]) {
    let output = Command::new(binary("dssgd-server"))
        .arg("certs")
        .arg("--out")
        .arg(dir)
        .args(extra)
        .output()
        .expect("dssgd-server certs should run");
    assert!(
        output.status.success(),
        "dssgd-server certs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts the server with mutual TLS from the certificates in `certs` and
/// returns it with its `https://` address.
fn start_mutual_tls_server(certs: &Path, log: &PathBuf) -> (ChildGuard, String) {
    let path = |name: &str| certs.join(name).display().to_string();
    let args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--tls-cert".into(),
        path("server.pem"),
        "--tls-key".into(),
        path("server.key"),
        "--client-ca".into(),
        path("ca.pem"),
    ];
    let mut server = ChildGuard::spawn("server", &binary("dssgd-server"), &args, log);
    let line = server.first_line();
    let address = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "the TLS server did not start ({line:?}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .to_string();
    (server, address)
}

/// TLS settings that trust the CA in `ca_dir` and, when given, present the
/// certificate `id` from `identity_dir`.
fn client_tls(ca_dir: &Path, identity: Option<(&Path, &str)>) -> ClientTlsConfig {
    let read = |path: PathBuf| {
        std::fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_dir.join("ca.pem"))));
    if let Some((dir, id)) = identity {
        config = config.identity(Identity::from_pem(
            read(dir.join(format!("{id}.pem"))),
            read(dir.join(format!("{id}.key"))),
        ));
    }
    config
}

/// Connects to `address` (`host:port`) with `tls`, or in plaintext without.
async fn connect(
    address: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<ParameterServerClient<Channel>, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .expect("the address is a valid URI")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).expect("valid TLS settings");
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| format!("{error:?}"))?;
    Ok(ParameterServerClient::new(channel))
}

fn join_request(participant: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        participant_id: participant.into(),
        model: Some(pb::ModelInfo {
            name: "toy".into(),
            parameter_count: N,
            layout_hash: LAYOUT.into(),
        }),
        initial_parameters: Some(pb::SparseSlice {
            values: encode_values(&vec![0.5; N as usize]).into(),
            dense: true,
            ..Default::default()
        }),
    }
}

fn upload_request(participant: &str, upload_id: u64) -> pb::UploadRequest {
    pb::UploadRequest {
        participant_id: participant.into(),
        upload_id,
        base_version: 0,
        layout_hash: LAYOUT.into(),
        gamma: 0.1,
        theta_u: 0.1,
        changes: Some(pb::SparseSlice {
            indices: encode_indices(&[3, 7]).into(),
            values: encode_values(&[0.05, -0.05]).into(),
            dense: false,
            ..Default::default()
        }),
        turn_token: String::new(),
        epsilon: 0.0,
    }
}

/// Tries a join over `tls` and returns the error, which must exist.
async fn failed_join(address: &str, tls: Option<ClientTlsConfig>, case: &str) -> String {
    let mut client = match connect(address, tls).await {
        Ok(client) => client,
        Err(error) => return error,
    };
    match client.join(join_request("p000")).await {
        Ok(_) => panic!("{case}: the join succeeded"),
        Err(status) => format!("{status:?}"),
    }
}

async fn status(client: &mut ParameterServerClient<Channel>) -> pb::StatusResponse {
    client
        .get_status(pb::StatusRequest {})
        .await
        .expect("status call should succeed")
        .into_inner()
}

#[test]
fn failed_handshakes_leave_server_serving() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    let certs = dir.path().join("federation");
    let foreign = dir.path().join("foreign");
    make_certs(&certs, &["--participant-count", "2"]);
    make_certs(&foreign, &["--participant", "p000"]);
    let log = dir.path().join("server.log");
    let (mut server, address) = start_mutual_tls_server(&certs, &log);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime should start");

    runtime.block_on(async {
        let cases = [
            ("no client certificate", Some(client_tls(&certs, None))),
            (
                "a certificate from a foreign CA",
                Some(client_tls(&certs, Some((&foreign, "p000")))),
            ),
            ("plaintext", None),
        ];
        for (case, tls) in cases {
            let error = failed_join(&address, tls, case).await;
            eprintln!(
                "  {case}: rejected ({})",
                error.lines().next().unwrap_or("")
            );
        }
    });

    // A peer that sends the first bytes of a ClientHello and hangs up, and
    // one that connects and stalls without a byte, held open while a valid
    // participant joins.
    {
        let mut half = TcpStream::connect(&address).expect("TCP connect should succeed");
        half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .expect("writing half a ClientHello should succeed");
    }
    let _stalled = TcpStream::connect(&address).expect("TCP connect should succeed");

    runtime.block_on(async {
        let mut p0 = connect(&address, Some(client_tls(&certs, Some((&certs, "p000")))))
            .await
            .expect("p000 with its certificate should connect");
        let joined = p0
            .join(join_request("p000"))
            .await
            .expect("p000 should join with its own certificate")
            .into_inner();
        assert!(joined.initialized_parameters, "p000 initialised the server");
        let applied = p0
            .upload_gradients(upload_request("p000", 1))
            .await
            .expect("p000 should upload with its own certificate")
            .into_inner();
        assert!(applied.applied, "the upload of p000 was applied");

        // p000's certificate cannot act as p001.
        let error = p0
            .join(join_request("p001"))
            .await
            .expect_err("p000's certificate must not join as p001");
        assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
        assert!(error.message().contains("\"p000\""), "{}", error.message());
        assert!(error.message().contains("\"p001\""), "{}", error.message());
        let mut p1 = connect(&address, Some(client_tls(&certs, Some((&certs, "p001")))))
            .await
            .expect("p001 with its certificate should connect");
        p1.join(join_request("p001"))
            .await
            .expect("p001 should join with its own certificate");
        let before = status(&mut p0).await;
        let error = p0
            .upload_gradients(upload_request("p001", 1))
            .await
            .expect_err("p000's certificate must not upload as p001");
        assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
        let error = p0
            .download_parameters(pb::DownloadRequest {
                participant_id: "p001".into(),
                theta_d: 1.0,
                ..Default::default()
            })
            .await
            .expect_err("p000's certificate must not download as p001");
        assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
        let after = status(&mut p0).await;
        assert_eq!(
            after.version, before.version,
            "version after the rejections"
        );
        assert_eq!(after.version, 1, "only p000's upload is applied");
        let p1_uploads = after
            .participants
            .iter()
            .find(|record| record.participant_id == "p001")
            .map(|record| record.uploads);
        assert_eq!(p1_uploads, Some(0), "uploads recorded for p001");
    });

    assert!(
        server
            .child
            .try_wait()
            .expect("try_wait should work")
            .is_none(),
        "the server exited:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The health probe of the local server uses the server's own TLS flags;
    // a probe from elsewhere names the CA and a client certificate.
    let path = |name: &str| certs.join(name).display().to_string();
    let local = Command::new(binary("dssgd-server"))
        .args(["--listen", &address, "--tls-cert", &path("server.pem")])
        .args([
            "--tls-key",
            &path("server.key"),
            "--client-ca",
            &path("ca.pem"),
        ])
        .arg("health")
        .output()
        .expect("the health probe should run");
    assert!(
        local.status.success(),
        "local health probe: {}",
        String::from_utf8_lossy(&local.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&local.stdout).trim(), "SERVING");
    let remote = Command::new(binary("dssgd-server"))
        .args(["health", "--addr", &format!("https://{address}")])
        .args(["--ca", &path("ca.pem"), "--cert", &path("p001.pem")])
        .args(["--key", &path("p001.key")])
        .output()
        .expect("the health probe should run");
    assert!(
        remote.status.success(),
        "health probe with a participant certificate: {}",
        String::from_utf8_lossy(&remote.stderr)
    );
    let without_certificate = Command::new(binary("dssgd-server"))
        .args(["health", "--addr", &format!("https://{address}")])
        .args(["--ca", &path("ca.pem"), "--timeout-seconds", "3"])
        .output()
        .expect("the health probe should run");
    assert!(
        !without_certificate.status.success(),
        "a health probe without a client certificate passed"
    );
    server.kill();

    // No private key material reaches the log.
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let key = std::fs::read_to_string(certs.join("server.key")).expect("the key is readable");
    let secret = key
        .lines()
        .find(|line| !line.starts_with("-----"))
        .expect("the key has a body line");
    assert!(!log_text.contains(secret), "the server log holds its key");
    assert!(
        !log_text.contains("PRIVATE KEY"),
        "the server log holds a key"
    );
}

/// Runs the server with `args` and returns its exit status and stderr.
fn run_server(args: &[&str]) -> (bool, String) {
    let output = Command::new(binary("dssgd-server"))
        .args(args)
        .output()
        .expect("the server should start");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn missing_or_empty_client_ca_stops_server() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    make_certs(dir.path(), &[]);
    let empty = dir.path().join("empty-ca.pem");
    std::fs::write(&empty, b"").expect("writing an empty file should succeed");
    let missing = dir.path().join("missing-ca.pem");
    let cert = dir.path().join("server.pem").display().to_string();
    let key = dir.path().join("server.key").display().to_string();
    for client_ca in [&empty, &missing] {
        let ca = client_ca.display().to_string();
        let (success, stderr) = run_server(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca,
        ]);
        assert!(!success, "the server started with client CA {ca}");
        assert!(
            stderr.contains(&ca),
            "the error does not name {ca}:\n{stderr}"
        );
    }
}

#[test]
fn plaintext_needs_insecure_flag() {
    let (success, stderr) = run_server(&["--listen", "127.0.0.1:0"]);
    assert!(!success, "the server started without TLS or --insecure");
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");

    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    let output = Command::new(binary("dssgd-participant"))
        .args([
            "collaborate",
            "--server",
            "http://127.0.0.1:9",
            "--index",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("the participant should start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the participant accepted a plaintext address without --insecure"
    );
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("http://127.0.0.1:9"), "{stderr}");

    let log = dir.path().join("server.log");
    let (mut server, _) = dssgd_tests::start_server(&[], &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("serving plaintext gRPC (--insecure)"),
        "the plaintext server did not warn:\n{text}"
    );
    server.kill();
}

#[test]
fn mismatched_key_stops_before_listening() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    make_certs(dir.path(), &["--participant", "p000"]);
    let cert = dir.path().join("server.pem").display().to_string();
    let other_key = dir.path().join("p000.key").display().to_string();
    let output = Command::new(binary("dssgd-server"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert", &cert])
        .args(["--tls-key", &other_key])
        .output()
        .expect("the server should start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the server started with a foreign key"
    );
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening on"),
        "the server reported listening before it failed"
    );
    assert!(
        stderr.contains(&cert),
        "the error does not name {cert}:\n{stderr}"
    );
    assert!(
        stderr.contains(&other_key),
        "the error does not name {other_key}:\n{stderr}"
    );
}

/// Runs a one-epoch participant against `server` over TLS, trusting the CA
/// in `ca_dir` and presenting the certificate p000 from `cert_dir`, with
/// 120 s of retries. Returns its output and how long it ran.
fn run_tls_participant(server: &str, ca_dir: &Path, cert_dir: &Path) -> (Output, Duration) {
    let path = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let started = Instant::now();
    let output = Command::new(binary("dssgd-participant"))
        .args(["collaborate", "--server", server])
        .args(["--tls-ca", &path(ca_dir, "ca.pem")])
        .args(["--tls-cert", &path(cert_dir, "p000.pem")])
        .args(["--tls-key", &path(cert_dir, "p000.key")])
        .args(["--index", "0", "--participants", "1", "--epochs", "1"])
        .args(["--shard-fraction", "0.01", "--retry-seconds", "120"])
        .arg("--data-dir")
        .arg(dssgd_tests::mnist_dir())
        .output()
        .expect("the participant should start");
    (output, started.elapsed())
}

#[test]
fn foreign_participant_certificate_fails_fast() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    let certs = dir.path().join("federation");
    let foreign = dir.path().join("foreign");
    make_certs(&certs, &["--participant-count", "1"]);
    make_certs(&foreign, &["--participant-count", "1"]);
    let (mut server, address) = start_mutual_tls_server(&certs, &dir.path().join("server.log"));
    let (output, elapsed) = run_tls_participant(&format!("https://{address}"), &certs, &foreign);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the foreign participant succeeded"
    );
    assert!(
        stderr.contains("TLS handshake"),
        "the error does not name the handshake:\n{stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "the participant retried a handshake that cannot succeed for {elapsed:?}"
    );
    server.kill();
}

#[test]
fn plaintext_participant_gets_tls_hint() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    make_certs(dir.path(), &["--participant-count", "1"]);
    let (mut server, address) = start_mutual_tls_server(dir.path(), &dir.path().join("server.log"));
    let output = Command::new(binary("dssgd-participant"))
        .args([
            "collaborate",
            "--insecure",
            "--server",
            &format!("http://{address}"),
        ])
        .args(["--index", "0", "--participants", "1", "--epochs", "1"])
        .args(["--shard-fraction", "0.01", "--retry-seconds", "20"])
        .arg("--data-dir")
        .arg(dssgd_tests::mnist_dir())
        .output()
        .expect("the participant should start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a plaintext participant joined a TLS server"
    );
    assert!(
        stderr.contains("may require TLS"),
        "the error gives no TLS hint:\n{stderr}"
    );
    server.kill();
}

#[test]
fn tls_participant_stops_at_plaintext_server() {
    let dir = tempfile::tempdir().expect("a temporary directory should be creatable");
    make_certs(dir.path(), &["--participant-count", "1"]);
    let (mut server, address) = dssgd_tests::start_server(&[], &dir.path().join("server.log"));
    let server_address = address.replacen("http://", "https://", 1);
    let (output, elapsed) = run_tls_participant(&server_address, dir.path(), dir.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a TLS participant joined a plaintext server"
    );
    assert!(
        stderr.contains("does not seem to use TLS"),
        "the error gives no plaintext hint:\n{stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "the participant retried a handshake that cannot succeed for {elapsed:?}"
    );
    server.kill();
}

#[test]
fn negative_participant_values_name_the_option() {
    let output = Command::new(binary("dssgd-participant"))
        .args(["collaborate", "--insecure", "--index", "0", "--lr", "-1"])
        .output()
        .expect("the participant should start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a negative learning rate was accepted"
    );
    assert!(stderr.contains("invalid lr -1"), "{stderr}");
}
