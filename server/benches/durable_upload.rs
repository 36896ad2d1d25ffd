//! Upload throughput of the parameter server with its state in memory and
//! with a durable state directory.
//!
//! Run: `cargo bench -p dssgd-server --bench durable_upload`. The database
//! goes to a temporary directory under `DSSGD_BENCH_DIR` (default: the
//! system's temporary directory), so point that at the file system that the
//! server's `--state-dir` will use.
//!
//! The model has the MLP's 109,386 parameters. Each upload carries
//! `ceil(theta_u * n)` changes at random indices, so it touches every
//! 4096-parameter chunk at theta_u 0.1. Two measurements:
//!
//! - store: uploads applied one after another straight to the store, which
//!   isolates the cost of the commit;
//! - gRPC: an in-process server on loopback and 1 or 8 clients uploading
//!   concurrently, which adds decoding, validation and the network stack.
//!
//! "durable" is the server's setting (a checkpoint after 4n logged changes);
//! "durable, checkpoint every upload" rewrites the touched chunks with every
//! upload, which is what storing the parameters without a log would cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use dssgd_common::config::Ordering;
use dssgd_common::select::fraction_count;
use dssgd_common::sparse::{SparseSlice, encode_indices, encode_values};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_server::durable::{DurableOptions, StateError};
use dssgd_server::store::{Changes, ModelInfo, Upload};
use dssgd_server::{ServerConfig, Store};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::net::TcpListener;

mod support;
use support::random_changes;

const N: usize = 109_386;
const GAMMA: f64 = 0.01;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Memory,
    Durable { checkpoint_factor: u64 },
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::Durable {
                checkpoint_factor: 0,
            } => "durable, checkpoint every upload",
            Mode::Durable { .. } => "durable",
        }
    }

    /// A store joined by participants `p0..p{participants}`, and the
    /// directory that contains its database.
    fn store(self, participants: usize) -> Result<(Store, Option<tempfile::TempDir>), StateError> {
        let (store, dir) = match self {
            Mode::Memory => (Store::new(), None),
            Mode::Durable { checkpoint_factor } => {
                let base = std::env::var_os("DSSGD_BENCH_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir);
                let dir = tempfile::tempdir_in(base).expect("the bench directory is writable");
                let options = DurableOptions { checkpoint_factor };
                let (store, _) = Store::open_durable(dir.path(), Ordering::Asynchronous, options)?;
                (store, Some(dir))
            }
        };
        let initial = vec![0.0f32; N];
        for participant in 0..participants {
            store
                .join(&format!("p{participant}"), &model(), Some(initial.clone()))
                .expect("joining the bench model succeeds");
        }
        Ok((store, dir))
    }
}

fn model() -> ModelInfo {
    ModelInfo {
        name: "mlp".into(),
        parameter_count: N as u64,
        layout_hash: "bench".into(),
    }
}

fn random_upload_changes(rng: &mut ChaCha8Rng, theta_u: f64) -> SparseSlice {
    random_changes(rng, N, fraction_count(theta_u, N), GAMMA as f32)
}

fn database_megabytes(dir: &Option<tempfile::TempDir>) -> String {
    dir.as_ref()
        .and_then(|dir| std::fs::metadata(dir.path().join("state.redb")).ok())
        .map_or(String::new(), |metadata| {
            format!(", database {:.1} MB", metadata.len() as f64 / 1e6)
        })
}

fn bench_store(mode: Mode, theta_u: f64, uploads: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let changes: Vec<SparseSlice> = (0..uploads)
        .map(|_| random_upload_changes(&mut rng, theta_u))
        .collect();
    let (store, dir) = mode.store(1).expect("the bench database opens");
    let started = Instant::now();
    for (id, changes) in changes.into_iter().enumerate() {
        let upload = Upload {
            participant: "p0".into(),
            upload_id: id as u64 + 1,
            base_version: 0,
            changes: Changes::Sparse(changes),
            epsilon: 0.0,
            encoded_bytes: 0,
        };
        store.apply(&upload).expect("the upload is applied");
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "store  theta_u {theta_u:<5} {:<34} {:>7.0} uploads/s ({uploads} uploads in {seconds:.2} s{})",
        mode.label(),
        uploads as f64 / seconds,
        database_megabytes(&dir)
    );
    store.close().expect("the bench database closes");
}

async fn bench_grpc(mode: Mode, theta_u: f64, clients: usize, uploads_per_client: usize) {
    let (store, dir) = mode.store(clients).expect("the bench database opens");
    let store = Arc::new(store);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding loopback works");
    let address = format!("http://{}", listener.local_addr().expect("bound"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dssgd_server::run(
        ServerConfig::default(),
        Arc::clone(&store),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));

    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut requests = Vec::with_capacity(clients);
    for client in 0..clients {
        let batch: Vec<pb::UploadRequest> = (0..uploads_per_client)
            .map(|id| {
                let changes = random_upload_changes(&mut rng, theta_u);
                pb::UploadRequest {
                    participant_id: format!("p{client}"),
                    upload_id: id as u64 + 1,
                    base_version: 0,
                    layout_hash: "bench".into(),
                    gamma: GAMMA,
                    theta_u,
                    changes: Some(pb::SparseSlice {
                        indices: encode_indices(&changes.indices).into(),
                        values: encode_values(&changes.values).into(),
                        dense: false,
                        ..Default::default()
                    }),
                    turn_token: String::new(),
                    epsilon: 0.0,
                }
            })
            .collect();
        requests.push(batch);
    }

    let started = Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|batch| {
            let address = address.clone();
            tokio::spawn(async move {
                let mut client = ParameterServerClient::connect(address)
                    .await
                    .expect("the bench server accepts connections");
                for request in batch {
                    client
                        .upload_gradients(request)
                        .await
                        .expect("the upload is applied");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("the client task finishes");
    }
    let seconds = started.elapsed().as_secs_f64();
    let uploads = clients * uploads_per_client;
    println!(
        "gRPC   theta_u {theta_u:<5} {:<34} {:>7.0} uploads/s ({clients} clients, {uploads} uploads in {seconds:.2} s{})",
        mode.label(),
        uploads as f64 / seconds,
        database_megabytes(&dir)
    );
    let _ = stop.send(());
    server
        .await
        .expect("the server task finishes")
        .expect("the server stops cleanly");
    store.close().expect("the bench database closes");
}

fn main() {
    // cargo bench passes --bench; nothing else is accepted.
    let modes = [
        Mode::Memory,
        Mode::Durable {
            checkpoint_factor: DurableOptions::default().checkpoint_factor,
        },
        Mode::Durable {
            checkpoint_factor: 0,
        },
    ];
    println!("{N} parameters; random indices, so theta_u 0.1 touches every chunk");
    for (theta_u, uploads) in [(0.1, 300), (0.01, 1000)] {
        for mode in modes {
            bench_store(mode, theta_u, uploads);
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    for clients in [1, 8] {
        for mode in modes {
            runtime.block_on(bench_grpc(mode, 0.1, clients, 300 / clients));
        }
    }
}
