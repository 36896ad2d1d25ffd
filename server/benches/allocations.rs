//! Heap allocations of the parameter server per call on its hot paths,
//! counted by valgrind's DHAT in the real `dssgd-server` binary.
//!
//! Run: `cargo bench -p dssgd-server --bench allocations` (needs valgrind;
//! Debian's package has DHAT). For each call it starts the server under
//! `valgrind --tool=dhat` twice, joins the MLP's 109,386 parameters, and
//! makes the call `CALLS` and then `2 * CALLS` times over gRPC on loopback.
//! The difference between the two runs' totals, divided by `CALLS`, is
//! what one call allocates, start-up and the join excluded. It counts every
//! allocation of the process: tonic, hyper and h2 as well as the server's
//! own code.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use dssgd_common::select::fraction_count;
use dssgd_common::sparse::{IndexEncoding, SliceEncoding, ValueEncoding, encode_values};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tonic::transport::Channel;

mod support;
use support::{participant_channel, random_changes};

const MLP: usize = 109_386;
const CALLS: usize = 100;
const GAMMA: f64 = 0.01;
const LAYOUT: &str = "0123456789abcdef";

/// One kind of call.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// An upload of one change.
    TinyUpload,
    /// An upload of theta_u 0.1 of the MLP, as a participant sends it.
    SparseUpload,
    /// An upload of every parameter (theta_u 1), a dense slice.
    DenseUpload,
    /// A download of every parameter (theta_d 1).
    DenseDownload,
    /// A download of theta_d 0.1, Rice-coded.
    SparseDownload,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::TinyUpload => "upload of 1 change",
            Call::SparseUpload => "upload of 10,939 changes (theta_u 0.1)",
            Call::DenseUpload => "dense upload of 109,386 changes (theta_u 1)",
            Call::DenseDownload => "download of 109,386 parameters (theta_d 1)",
            Call::SparseDownload => "download of 10,939 parameters (theta_d 0.1)",
        }
    }
}

/// A server under DHAT, stopped with SIGTERM so that DHAT writes its file.
struct Profiled {
    child: Child,
    address: String,
}

impl Profiled {
    fn start(out: &Path) -> Self {
        let server = env!("CARGO_BIN_EXE_dssgd-server");
        let mut child = Command::new("valgrind")
            .arg("--tool=dhat")
            .arg(format!("--dhat-out-file={}", out.display()))
            .args([server, "--listen", "127.0.0.1:0", "--insecure"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("valgrind starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, address }
    }

    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill failed");
        self.child.wait().expect("the server exits");
    }
}

fn changes(rng: &mut ChaCha8Rng, count: usize) -> pb::SparseSlice {
    let encoding = SliceEncoding {
        indices: IndexEncoding::Rice,
        values: ValueEncoding::F32,
    };
    let (indices, values) = random_changes(rng, MLP, count, GAMMA as f32).encode_with(encoding);
    pb::SparseSlice::from_payloads(indices, values, encoding)
}

/// Makes `calls` calls of `call` against the server at `address`.
async fn drive(address: &str, call: Call, calls: usize) {
    let channel = participant_channel(&format!("http://{address}")).await;
    let mut client = ParameterServerClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    client
        .join(pb::JoinRequest {
            participant_id: "p0".into(),
            model: Some(pb::ModelInfo {
                name: "mlp".into(),
                parameter_count: MLP as u64,
                layout_hash: LAYOUT.into(),
            }),
            initial_parameters: Some(pb::SparseSlice {
                values: encode_values(&vec![0.0; MLP]).into(),
                dense: true,
                ..Default::default()
            }),
        })
        .await
        .expect("the join succeeds");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Some uploads first, so that sparse downloads have counters to rank.
    let warm = match call {
        Call::SparseDownload => 10,
        _ => 0,
    };
    let mut next_id = 1;
    let sparse_count = fraction_count(0.1, MLP);
    for _ in 0..warm {
        let changes = changes(&mut rng, sparse_count);
        upload(&mut client, next_id, 0.1, changes).await;
        next_id += 1;
    }
    for _ in 0..calls {
        match call {
            Call::TinyUpload => {
                let changes = changes(&mut rng, 1);
                upload(&mut client, next_id, 0.1, changes).await
            }
            Call::SparseUpload => {
                let changes = changes(&mut rng, sparse_count);
                upload(&mut client, next_id, 0.1, changes).await
            }
            Call::DenseUpload => upload(&mut client, next_id, 1.0, dense_changes()).await,
            Call::DenseDownload | Call::SparseDownload => {
                let theta_d = if matches!(call, Call::DenseDownload) {
                    1.0
                } else {
                    0.1
                };
                client
                    .download_parameters(pb::DownloadRequest {
                        participant_id: "p0".into(),
                        theta_d,
                        index_encoding: pb::IndexEncoding::Rice as i32,
                    })
                    .await
                    .expect("the download succeeds");
            }
        }
        next_id += 1;
    }
}

/// Uploads `changes` as participant p0's upload `id`.
async fn upload(
    client: &mut ParameterServerClient<Channel>,
    id: u64,
    theta_u: f64,
    changes: pb::SparseSlice,
) {
    client
        .upload_gradients(pb::UploadRequest {
            participant_id: "p0".into(),
            upload_id: id,
            base_version: 0,
            layout_hash: LAYOUT.into(),
            gamma: GAMMA,
            theta_u,
            changes: Some(changes),
            turn_token: String::new(),
            epsilon: 0.0,
        })
        .await
        .expect("the upload is applied");
}

fn dense_changes() -> pb::SparseSlice {
    pb::SparseSlice {
        values: encode_values(&vec![0.001; MLP]).into(),
        dense: true,
        ..Default::default()
    }
}

/// Returns the total blocks and bytes that the profiled process allocated.
fn totals(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).expect("DHAT wrote its file");
    let profile: Value = serde_json::from_str(&text).expect("DHAT's file is JSON");
    let points = profile["pps"].as_array().expect("program points");
    let blocks = points.iter().filter_map(|p| p["tbk"].as_u64()).sum();
    let bytes = points.iter().filter_map(|p| p["tb"].as_u64()).sum();
    (blocks, bytes)
}

fn main() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!(
            "valgrind is not installed; install Debian's valgrind package to count allocations"
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the runtime starts");
    let scratch = tempfile::tempdir().expect("a temporary folder");
    println!(
        "heap allocations of dssgd-server per call, counted by valgrind DHAT over {CALLS} calls"
    );
    println!();
    println!("| call | allocations per call | bytes allocated per call |");
    println!("|---|---|---|");
    for call in [
        Call::TinyUpload,
        Call::SparseUpload,
        Call::DenseUpload,
        Call::DenseDownload,
        Call::SparseDownload,
    ] {
        let mut runs = Vec::new();
        for calls in [CALLS, 2 * CALLS] {
            let out = scratch.path().join(format!("{call:?}-{calls}.json"));
            let server = Profiled::start(&out);
            runtime.block_on(drive(&server.address, call, calls));
            server.stop();
            runs.push(totals(&out));
        }
        let blocks = runs[1].0.saturating_sub(runs[0].0) as f64 / CALLS as f64;
        let bytes = runs[1].1.saturating_sub(runs[0].1) as f64 / CALLS as f64;
        println!("| {} | {blocks:.1} | {bytes:.0} |", call.name());
    }
}
