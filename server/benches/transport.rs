//! Transport benchmarks: each figure of the parameter server next to a
//! reference measured in the same run, on loopback.
//!
//! Run: `cargo bench -p dssgd-server --bench transport`. It prints one
//! Markdown row per figure: the server's value, the reference's, their
//! ratio and the target. The references are a bare tonic service in this
//! workspace (`dssgd.bench.v1.Baseline`, which receives or returns the same
//! bytes and does nothing else) and raw TCP sockets. The server keeps its
//! state in memory here; `durable_upload` measures the durable store.
//!
//! - sparse ingest: `UploadGradients` at theta_u 0.1 of the MLP's 109,386
//!   parameters from 8 concurrent clients, in applied parameters per
//!   second, against the bare service receiving messages of the same size;
//! - bulk transfer: a dense `DownloadParameters` and a dense upload of
//!   1,048,576 parameters (4 MiB), against raw TCP moving the same bytes;
//! - small-call latency: the median of a one-parameter upload at
//!   concurrency 1, against the median TCP round trip of one byte;
//! - server logic overhead: one-parameter uploads per second at
//!   concurrency 64, against the bare service echoing a message of the
//!   same size;
//! - wire efficiency: bytes that cross the socket per uploaded parameter,
//!   counted by a relay between client and server, against the 4 bytes of
//!   an f32 value.
//!
//! Every figure is the median of `DSSGD_BENCH_REPEATS` runs (default 5);
//! the ratios of ingest and bulk transfer are the medians of the runs'
//! ratios. Name figures on the command line to run only those: `cargo
//! bench -p dssgd-server --bench transport -- bulk wire`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use dssgd_common::select::fraction_count;
use dssgd_common::sparse::{IndexEncoding, SliceEncoding, ValueEncoding, encode_values};
use dssgd_proto::bench::v1 as bench;
use dssgd_proto::bench::v1::baseline_client::BaselineClient;
use dssgd_proto::bench::v1::baseline_server::{Baseline, BaselineServer};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use dssgd_server::store::ModelInfo;
use dssgd_server::{ServerConfig, Store};
use prost::Message;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

mod support;
use support::{participant_channel, random_changes};

/// Parameters of the MLP.
const MLP: usize = 109_386;
/// Parameters of the bulk-transfer model: 4 MiB of f32.
const BULK: usize = 1 << 20;
const GAMMA: f64 = 0.01;
const MAX_MESSAGE: usize = 64 << 20;

/// The bare reference service.
struct Bare;

#[tonic::async_trait]
impl Baseline for Bare {
    async fn receive(&self, request: Request<bench::Blob>) -> Result<Response<bench::Ack>, Status> {
        let length = request.into_inner().data.len() as u64;
        Ok(Response::new(bench::Ack { length }))
    }

    async fn echo(&self, request: Request<bench::Blob>) -> Result<Response<bench::Blob>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    async fn send(
        &self,
        request: Request<bench::SizeRequest>,
    ) -> Result<Response<bench::Blob>, Status> {
        let length = request.into_inner().length as usize;
        Ok(Response::new(bench::Blob {
            data: vec![0u8; length],
        }))
    }
}

/// Reads `DSSGD_BENCH_REPEATS` (default 5); an invalid value ends the
/// benchmark with a message that names it.
fn repeats() -> usize {
    let Ok(text) = std::env::var("DSSGD_BENCH_REPEATS") else {
        return 5;
    };
    match text.parse() {
        Ok(n) if n > 0 => n,
        _ => {
            eprintln!("invalid DSSGD_BENCH_REPEATS {text:?}: expected a whole number from 1");
            std::process::exit(2);
        }
    }
}

/// The figures named on the command line (`ingest` is figure 1, `bulk`
/// 2, `latency` 3, `overhead` 4 and `wire` 7); none named means all of
/// them. `--help` prints the names; other flags that cargo passes to every
/// bench binary, such as `--bench`, are ignored.
struct Figures(Vec<String>);

impl Figures {
    fn wants(&self, figure: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|name| name == figure)
    }
}

fn chosen_figures() -> Figures {
    const KNOWN: [&str; 5] = ["ingest", "bulk", "latency", "overhead", "wire"];
    if std::env::args().any(|arg| arg == "--help" || arg == "-h") {
        println!(
            "usage: cargo bench -p dssgd-server --bench transport [-- FIGURE...]\n\
             figures: ingest (1), bulk (2), latency (3), overhead (4), wire (7); none runs them all\n\
             DSSGD_BENCH_REPEATS sets the runs per figure (default 5)"
        );
        std::process::exit(0);
    }
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    for name in &names {
        if !KNOWN.contains(&name.as_str()) {
            eprintln!(
                "unknown figure {name:?}; expected some of {} (none runs them all)",
                KNOWN.join(", ")
            );
            std::process::exit(2);
        }
    }
    Figures(names)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Returns the median over runs of each run's ratio. A run measures the server and
/// its reference back to back, so its ratio moves less with the machine's
/// load than the ratio of the two medians.
fn median_ratio(ours: &[f64], reference: &[f64]) -> f64 {
    median(ours.iter().zip(reference).map(|(o, r)| o / r).collect())
}

fn model(n: usize) -> ModelInfo {
    ModelInfo {
        name: "mlp".into(),
        parameter_count: n as u64,
        layout_hash: "0123456789abcdef".into(),
    }
}

/// Starts the parameter server on loopback with `participants` joined to
/// a model of `n` parameters; returns its address.
async fn start_server(n: usize, participants: usize) -> String {
    let store = Arc::new(Store::new());
    for participant in 0..participants {
        store
            .join(&format!("p{participant}"), &model(n), Some(vec![0.0; n]))
            .expect("joining the bench model succeeds");
    }
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback binds");
    let address = format!("http://{}", listener.local_addr().expect("bound"));
    tokio::spawn(dssgd_server::run(
        ServerConfig::default(),
        store,
        listener,
        std::future::pending::<()>(),
    ));
    address
}

/// Starts the bare service on loopback; returns its address.
async fn start_bare() -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback binds");
    let address = format!("http://{}", listener.local_addr().expect("bound"));
    let service = BaselineServer::new(Bare)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(dssgd_server::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(dssgd_server::HTTP2_CONNECTION_WINDOW)
            .max_frame_size(dssgd_server::HTTP2_MAX_FRAME_SIZE)
            .add_service(service)
            .serve_with_incoming(dssgd_server::accept_without_delay(listener)),
    );
    address
}

fn ours(channel: Channel) -> ParameterServerClient<Channel> {
    ParameterServerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn bare(channel: Channel) -> BaselineClient<Channel> {
    BaselineClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Builds a sparse upload of `count` random changes out of `n`, encoded
/// as the participant encodes them: Rice-coded indices and f32 values.
fn upload(
    rng: &mut ChaCha8Rng,
    participant: usize,
    id: u64,
    n: usize,
    count: usize,
) -> pb::UploadRequest {
    let participant_encoding = SliceEncoding {
        indices: IndexEncoding::Rice,
        values: ValueEncoding::F32,
    };
    upload_with(rng, participant, id, n, count, participant_encoding)
}

/// Builds a sparse upload of `count` random changes out of `n` in
/// `encoding`.
fn upload_with(
    rng: &mut ChaCha8Rng,
    participant: usize,
    id: u64,
    n: usize,
    count: usize,
    encoding: SliceEncoding,
) -> pb::UploadRequest {
    let (indices, values) = random_changes(rng, n, count, GAMMA as f32).encode_with(encoding);
    pb::UploadRequest {
        participant_id: format!("p{participant}"),
        upload_id: id,
        base_version: 0,
        layout_hash: "0123456789abcdef".into(),
        gamma: GAMMA,
        theta_u: (count as f64 / n as f64).min(1.0),
        changes: Some(pb::SparseSlice::from_payloads(indices, values, encoding)),
        turn_token: String::new(),
        epsilon: 0.0,
    }
}

/// Builds a dense upload of every parameter of a model of `n`.
fn dense_upload(participant: usize, id: u64, n: usize) -> pb::UploadRequest {
    let values = vec![0.001f32; n];
    pb::UploadRequest {
        participant_id: format!("p{participant}"),
        upload_id: id,
        base_version: 0,
        layout_hash: "0123456789abcdef".into(),
        gamma: GAMMA,
        theta_u: 1.0,
        changes: Some(pb::SparseSlice {
            values: encode_values(&values).into(),
            dense: true,
            ..Default::default()
        }),
        turn_token: String::new(),
        epsilon: 0.0,
    }
}

/// Prints one row of the output table.
fn row(figure: &str, unit: &str, ours: f64, reference: f64, ratio: f64, target: &str) {
    let verdict = match target.split_once(' ') {
        Some((">=", bound)) => ratio >= bound.parse::<f64>().unwrap_or(f64::NAN),
        Some(("<=", bound)) => ratio <= bound.parse::<f64>().unwrap_or(f64::NAN),
        _ => false,
    };
    println!(
        "| {figure} | {ours:.4e} {unit} | {reference:.4e} {unit} | {ratio:.3} | {target} | {} |",
        if verdict { "met" } else { "missed" }
    );
}

/// Sparse ingest: applied parameters per second.
async fn sparse_ingest(repeats: usize) {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 250;
    let count = fraction_count(0.1, MLP);
    let server = start_server(MLP, CLIENTS).await;
    let baseline = start_bare().await;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut next_id = 1u64;
    let (mut ours_rates, mut bare_rates) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let batches: Vec<Vec<pb::UploadRequest>> = (0..CLIENTS)
            .map(|client| {
                (0..PER_CLIENT)
                    .map(|k| upload(&mut rng, client, next_id + k as u64, MLP, count))
                    .collect()
            })
            .collect();
        next_id += PER_CLIENT as u64;
        let size = batches[0][0].encoded_len();
        let started = Instant::now();
        let tasks: Vec<_> = batches
            .into_iter()
            .map(|batch| {
                let server = server.clone();
                tokio::spawn(async move {
                    let mut client = ours(participant_channel(&server).await);
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
        ours_rates.push((CLIENTS * PER_CLIENT * count) as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let baseline = baseline.clone();
                tokio::spawn(async move {
                    let mut client = bare(participant_channel(&baseline).await);
                    for _ in 0..PER_CLIENT {
                        let blob = bench::Blob {
                            data: vec![7u8; size],
                        };
                        client.receive(blob).await.expect("the blob is received");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("the client task finishes");
        }
        bare_rates.push((CLIENTS * PER_CLIENT * count) as f64 / started.elapsed().as_secs_f64());
    }
    let ratio = median_ratio(&ours_rates, &bare_rates);
    let (ours_rate, bare_rate) = (median(ours_rates), median(bare_rates));
    row(
        "1. sparse ingest, theta_u 0.1 of 109,386, 8 clients",
        "params/s",
        ours_rate,
        bare_rate,
        ratio,
        ">= 0.7",
    );
}

/// Starts a raw TCP server that replies to each one-byte request with
/// `reply` bytes, or reads `expect` bytes and replies with one byte.
async fn start_raw(reply: usize, expect: usize) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback binds");
    let address = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            socket.set_nodelay(true).expect("nodelay");
            tokio::spawn(async move {
                let payload = vec![3u8; reply];
                let mut incoming = vec![0u8; expect.max(1)];
                loop {
                    if socket.read_exact(&mut incoming).await.is_err() {
                        return;
                    }
                    let answer: &[u8] = if reply > 0 { &payload } else { &[1u8] };
                    if socket.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// Bulk transfer of 4 MiB each way, in bytes per second.
async fn bulk_transfer(repeats: usize) {
    const TRANSFERS: usize = 20;
    let bytes = BULK * 4;
    let server = start_server(BULK, 1).await;
    let mut client = ours(participant_channel(&server).await);
    let download_raw = start_raw(bytes, 1).await;
    let upload_raw = start_raw(0, bytes).await;
    let (mut down, mut raw_down, mut up, mut raw_up) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut next_id = 1u64;
    for _ in 0..repeats {
        let started = Instant::now();
        for _ in 0..TRANSFERS {
            let response = client
                .download_parameters(pb::DownloadRequest {
                    participant_id: "p0".into(),
                    theta_d: 1.0,
                    ..Default::default()
                })
                .await
                .expect("the download succeeds")
                .into_inner();
            let values = response.parameters.map_or(0, |p| p.values.len());
            assert_eq!(values, bytes, "the download is dense");
        }
        down.push((TRANSFERS * bytes) as f64 / started.elapsed().as_secs_f64());

        let mut socket = TcpStream::connect(download_raw).await.expect("raw server");
        socket.set_nodelay(true).expect("nodelay");
        let mut buffer = vec![0u8; bytes];
        let started = Instant::now();
        for _ in 0..TRANSFERS {
            socket.write_all(&[1]).await.expect("raw request");
            socket.read_exact(&mut buffer).await.expect("raw reply");
        }
        raw_down.push((TRANSFERS * bytes) as f64 / started.elapsed().as_secs_f64());

        let requests: Vec<pb::UploadRequest> = (0..TRANSFERS)
            .map(|k| dense_upload(0, next_id + k as u64, BULK))
            .collect();
        next_id += TRANSFERS as u64;
        let started = Instant::now();
        for request in requests {
            client
                .upload_gradients(request)
                .await
                .expect("the dense upload is applied");
        }
        up.push((TRANSFERS * bytes) as f64 / started.elapsed().as_secs_f64());

        let mut socket = TcpStream::connect(upload_raw).await.expect("raw server");
        socket.set_nodelay(true).expect("nodelay");
        let payload = vec![5u8; bytes];
        let mut ack = [0u8; 1];
        let started = Instant::now();
        for _ in 0..TRANSFERS {
            socket.write_all(&payload).await.expect("raw upload");
            socket.read_exact(&mut ack).await.expect("raw ack");
        }
        raw_up.push((TRANSFERS * bytes) as f64 / started.elapsed().as_secs_f64());
    }
    let (down_ratio, up_ratio) = (median_ratio(&down, &raw_down), median_ratio(&up, &raw_up));
    let (down, raw_down, up, raw_up) = (median(down), median(raw_down), median(up), median(raw_up));
    row(
        "2a. dense download, 4 MiB",
        "B/s",
        down,
        raw_down,
        down_ratio,
        ">= 0.25",
    );
    row(
        "2b. dense upload, 4 MiB",
        "B/s",
        up,
        raw_up,
        up_ratio,
        ">= 0.25",
    );
}

/// Median latency of a one-parameter upload at concurrency 1, and the TCP
/// round trip of one byte.
async fn small_call_latency(repeats: usize) {
    const CALLS: usize = 2_000;
    let server = start_server(MLP, 1).await;
    let mut client = ours(participant_channel(&server).await);
    let raw = start_raw(0, 1).await;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut next_id = 1u64;
    let (mut call, mut round_trip) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let mut latencies = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let request = upload(&mut rng, 0, next_id, MLP, 1);
            next_id += 1;
            let started = Instant::now();
            client
                .upload_gradients(request)
                .await
                .expect("the upload is applied");
            latencies.push(started.elapsed().as_secs_f64());
        }
        call.push(median(latencies));

        let mut socket = TcpStream::connect(raw).await.expect("raw server");
        socket.set_nodelay(true).expect("nodelay");
        let mut byte = [0u8; 1];
        let mut latencies = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let started = Instant::now();
            socket.write_all(&[1]).await.expect("raw ping");
            socket.read_exact(&mut byte).await.expect("raw pong");
            latencies.push(started.elapsed().as_secs_f64());
        }
        round_trip.push(median(latencies));
    }
    let (call, round_trip) = (median(call), median(round_trip));
    row(
        "3. small-call latency, median, concurrency 1",
        "s",
        call,
        round_trip,
        call / round_trip,
        "<= 12",
    );
}

/// One-parameter uploads per second at concurrency 64, against the bare
/// service echoing a message of the same size.
async fn server_overhead(repeats: usize) {
    const TASKS: usize = 64;
    const CONNECTIONS: usize = 8;
    const PER_TASK: usize = 200;
    let server = start_server(MLP, TASKS).await;
    let baseline = start_bare().await;
    let mut ours_channels = Vec::new();
    let mut bare_channels = Vec::new();
    for _ in 0..CONNECTIONS {
        ours_channels.push(participant_channel(&server).await);
        bare_channels.push(participant_channel(&baseline).await);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let size = upload(&mut rng, 0, 1, MLP, 1).encoded_len();
    let mut next_id = 1u64;
    let (mut ours_rates, mut bare_rates) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let requests: Vec<pb::UploadRequest> = (0..PER_TASK)
                    .map(|k| upload(&mut rng, task, next_id + k as u64, MLP, 1))
                    .collect();
                let mut client = ours(ours_channels[task % CONNECTIONS].clone());
                tokio::spawn(async move {
                    for request in requests {
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
        next_id += PER_TASK as u64;
        ours_rates.push((TASKS * PER_TASK) as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let mut client = bare(bare_channels[task % CONNECTIONS].clone());
                tokio::spawn(async move {
                    for _ in 0..PER_TASK {
                        let blob = bench::Blob {
                            data: vec![7u8; size],
                        };
                        client.echo(blob).await.expect("the blob is echoed");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("the client task finishes");
        }
        bare_rates.push((TASKS * PER_TASK) as f64 / started.elapsed().as_secs_f64());
    }
    let (ours_rate, bare_rate) = (median(ours_rates), median(bare_rates));
    row(
        "4. tiny uploads, concurrency 64",
        "calls/s",
        ours_rate,
        bare_rate,
        ours_rate / bare_rate,
        ">= 0.9",
    );
}

/// Starts a relay on loopback that forwards every connection to `target`
/// and counts the bytes sent toward it.
async fn start_relay(
    target: std::net::SocketAddr,
    upstream: Arc<AtomicU64>,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback binds");
    let address = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                let server = TcpStream::connect(target).await.expect("the server is up");
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let forward = async {
                    let mut buffer = vec![0u8; 1 << 16];
                    loop {
                        let read = match client_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => read,
                        };
                        upstream.fetch_add(read as u64, AtomicOrdering::Relaxed);
                        if server_write.write_all(&buffer[..read]).await.is_err() {
                            return;
                        }
                    }
                };
                let back = tokio::io::copy(&mut server_read, &mut client_write);
                let _ = tokio::join!(forward, back);
            });
        }
    });
    address
}

/// Bits per index of the best possible code for a uniformly random choice
/// of `k` of `n` indices: log2(n choose k) / k.
fn entropy_bits_per_index(n: usize, k: usize) -> f64 {
    let log2_choose: f64 = (0..k)
        .map(|i| ((n - i) as f64 / (k - i) as f64).log2())
        .sum();
    log2_choose / k as f64
}

/// Bytes on the wire per uploaded parameter at several densities and
/// encodings. The participant's encoding (Rice, f32) is the figure; the
/// others show what the index code and f16 values change. The last
/// columns split an upload into values, indices and the rest (the
/// request's other fields, gRPC and HTTP/2 framing).
async fn wire_efficiency() {
    const UPLOADS: usize = 50;
    let server = start_server(MLP, 1).await;
    let target: std::net::SocketAddr = server
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address");
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut next_id = 1u64;
    println!();
    println!(
        "| density | indices | values | wire B per parameter | ratio to 4 B | target | verdict | value B | index B | entropy bound, index B | other B per upload |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let encodings = [
        (IndexEncoding::Rice, ValueEncoding::F32),
        (IndexEncoding::DeltaVarint, ValueEncoding::F32),
        (IndexEncoding::Rice, ValueEncoding::F16),
    ];
    for density in [0.001, 0.01, 0.1] {
        let count = fraction_count(density, MLP);
        for (indices, values) in encodings {
            let encoding = SliceEncoding { indices, values };
            let upstream = Arc::new(AtomicU64::new(0));
            let relay = start_relay(target, Arc::clone(&upstream)).await;
            let mut client = ours(participant_channel(&format!("http://{relay}")).await);
            let requests: Vec<pb::UploadRequest> = (0..UPLOADS)
                .map(|k| upload_with(&mut rng, 0, next_id + k as u64, MLP, count, encoding))
                .collect();
            next_id += UPLOADS as u64;
            let payload = |part: fn(&pb::SparseSlice) -> usize| -> f64 {
                let total: usize = requests
                    .iter()
                    .map(|request| request.changes.as_ref().map_or(0, part))
                    .sum();
                total as f64 / (UPLOADS * count) as f64
            };
            let value_bytes = payload(|slice| slice.values.len());
            let index_bytes = payload(|slice| slice.indices.len());
            // The connection's preface and settings are counted once, as a
            // participant that keeps its connection pays them once.
            for request in requests {
                client
                    .upload_gradients(request)
                    .await
                    .expect("the upload is applied");
            }
            let wire = upstream.load(AtomicOrdering::Relaxed) as f64;
            let per_parameter = wire / (UPLOADS * count) as f64;
            let other = (per_parameter - value_bytes - index_bytes) * count as f64;
            let ratio = per_parameter / 4.0;
            let participant_default =
                indices == IndexEncoding::Rice && values == ValueEncoding::F32;
            let (target, verdict) = match (participant_default, ratio <= 1.5) {
                (true, true) => ("<= 1.5", "met"),
                (true, false) => ("<= 1.5", "missed"),
                (false, _) => ("-", "-"),
            };
            println!(
                "| {density} ({count} of 109,386) | {indices:?} | {values:?} | {per_parameter:.3} | {ratio:.3} | {target} | {verdict} | {value_bytes:.3} | {index_bytes:.3} | {:.3} | {other:.0} |",
                entropy_bits_per_index(MLP, count) / 8.0,
            );
        }
    }
}

fn main() {
    let repeats = repeats();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the runtime starts");
    let chosen = chosen_figures();
    println!(
        "transport benchmarks on {} cores, median of {repeats} runs; the server keeps its state in memory",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // The wire figure prints a table of its own.
    if ["ingest", "bulk", "latency", "overhead"]
        .iter()
        .any(|figure| chosen.wants(figure))
    {
        println!();
        println!("| figure | server | reference | ratio | target | verdict |");
        println!("|---|---|---|---|---|---|");
    }
    runtime.block_on(async {
        if chosen.wants("ingest") {
            sparse_ingest(repeats).await;
        }
        if chosen.wants("bulk") {
            bulk_transfer(repeats).await;
        }
        if chosen.wants("latency") {
            small_call_latency(repeats).await;
        }
        if chosen.wants("overhead") {
            server_overhead(repeats).await;
        }
        if chosen.wants("wire") {
            wire_efficiency().await;
        }
    });
    // Give the spawned servers no chance to hold the process open.
    runtime.shutdown_timeout(Duration::from_millis(100));
}
