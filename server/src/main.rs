//! Command-line entry point of the DSSGD parameter server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dssgd_common::config::{Ordering, check_positive, check_seconds};
use dssgd_server::{DEFAULT_MAX_MESSAGE_BYTES, ServerConfig, Store};
use tokio::net::TcpListener;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// DSSGD parameter server: holds the global parameters that participants
/// update with sparse, bounded uploads. Every option can also be set through
/// the environment variable named in its help.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "DSSGD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,

    /// Ordering of participants: asynchronous, round-robin or random-order.
    #[arg(long, env = "DSSGD_ORDERING", default_value = "asynchronous")]
    ordering: Ordering,

    /// Lease of a turn in the ordered modes, in seconds; a participant that
    /// dies holding the turn delays the others by at most this long.
    #[arg(
        long,
        env = "DSSGD_LEASE_SECONDS",
        default_value_t = 60.0,
        allow_negative_numbers = true
    )]
    lease_seconds: f64,

    /// Largest gRPC message in bytes, in both directions.
    #[arg(long, env = "DSSGD_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,

    /// Maximum number of joins, downloads and uploads served at once. Calls
    /// beyond it are rejected with RESOURCE_EXHAUSTED, which participants
    /// retry, so the memory held by requests stays bounded.
    #[arg(long, env = "DSSGD_MAX_CONCURRENT_CALLS", default_value_t = 256)]
    max_concurrent_calls: usize,

    /// Uploads per second each participant may make, with a burst of the
    /// same size (at least one); faster uploads are rejected with
    /// RESOURCE_EXHAUSTED and retried. Default: no limit.
    #[arg(
        long,
        env = "DSSGD_MAX_UPLOADS_PER_SECOND",
        allow_negative_numbers = true
    )]
    max_uploads_per_second: Option<f64>,

    /// Reject uploads whose base version is more than this many versions
    /// behind the current version, with FAILED_PRECONDITION and the current
    /// version in the message. Default: accept any base version.
    #[arg(long, env = "DSSGD_MAX_STALENESS")]
    max_staleness: Option<u64>,

    /// Largest bound gamma an upload may declare (default: any).
    #[arg(long, env = "DSSGD_MAX_GAMMA", allow_negative_numbers = true)]
    max_gamma: Option<f64>,

    /// Accept only participants of this model (mlp, cnn or svhn-cnn); by
    /// default the first participant's model is served.
    #[arg(long, env = "DSSGD_MODEL")]
    model: Option<String>,

    /// Seed of the random ordering.
    #[arg(long, env = "DSSGD_SEED", default_value_t = 0)]
    seed: u64,

    /// Write logs as JSON lines.
    #[arg(long, env = "DSSGD_LOG_JSON")]
    log_json: bool,

    /// Directory of the durable state (created if missing). Every upload is
    /// committed there before it is acknowledged, and a restart on the same
    /// directory continues from it. Without it the state is in memory only
    /// and lost when the server stops.
    #[arg(long, env = "DSSGD_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// With --state-dir: write a checkpoint of the parameters once the
    /// upload log contains more changes than this many times the parameter
    /// count. Larger values make uploads cheaper and restarts slower; 0
    /// writes a checkpoint with every upload.
    #[arg(long, env = "DSSGD_CHECKPOINT_FACTOR", default_value_t = 4)]
    checkpoint_factor: u64,

    /// On SIGTERM or SIGINT, time given to calls in flight to finish, in
    /// seconds, before the server stops without them.
    #[arg(
        long,
        env = "DSSGD_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    shutdown_grace_seconds: f64,

    /// PEM certificate chain of the server. With --tls-key, the server
    /// serves TLS only. `dssgd-server certs` generates one.
    #[arg(long, env = "DSSGD_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DSSGD_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// PEM CA certificates that sign the participants' certificates. Every
    /// client must then present a certificate signed by them (mutual TLS),
    /// and may act only as the participant named by its common name.
    #[arg(long, env = "DSSGD_CLIENT_CA")]
    client_ca: Option<PathBuf>,

    /// Serve plaintext gRPC without TLS. Anyone on the network path can then
    /// read and alter uploads and act as any participant: use it only on a
    /// trusted network, such as loopback or a private container network.
    #[arg(long, env = "DSSGD_INSECURE")]
    insecure: bool,

    /// Serve Prometheus metrics at http://ADDRESS/metrics (for example
    /// 127.0.0.1:9090); off unless set.
    #[arg(long, env = "DSSGD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// Run a subcommand instead of serving.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask a running server for its status through the standard gRPC health
    /// service (grpc.health.v1.Health/Check). Prints the status and exits 0
    /// when it is SERVING, 1 otherwise. Container health checks run this.
    Health(HealthArgs),
    /// Generate a CA, a server certificate and one client certificate per
    /// participant for a mutual-TLS federation, as PEM files. Keys are
    /// written readable by the owner only; an existing CA in --out is
    /// reused, so participants can be added later.
    Certs(CertsArgs),
}

#[derive(Debug, clap::Args)]
struct CertsArgs {
    /// Directory for the files (created if missing).
    #[arg(long)]
    out: PathBuf,

    /// DNS name or IP address the server is reached under; repeat for
    /// several. The first is the certificate's common name; localhost and
    /// 127.0.0.1 are always added. Without it, an existing server
    /// certificate in --out is kept, and a new one covers only localhost and
    /// 127.0.0.1.
    #[arg(long = "server-name")]
    server_names: Vec<String>,

    /// Participant identifier to make a client certificate for; repeat for
    /// several.
    #[arg(long = "participant")]
    participants: Vec<String>,

    /// Also make client certificates for p000 to p{N-1}, the identifiers
    /// that participants started with --index take.
    #[arg(long, default_value_t = 0)]
    participant_count: usize,

    /// Validity of every certificate, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    /// Address of the server to check (default: this host, on the port of
    /// --listen, so a container checks its own server).
    #[arg(long, env = "DSSGD_HEALTH_ADDR")]
    addr: Option<String>,

    /// Service to check; an empty name checks the whole server.
    #[arg(long, default_value = dssgd_server::health::SERVICE_NAME)]
    service: String,

    /// Time limit of the check, connecting included, in seconds.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    timeout_seconds: f64,

    /// PEM CA certificate to verify a TLS server with; the default address
    /// then uses https.
    #[arg(long, env = "DSSGD_HEALTH_CA")]
    ca: Option<PathBuf>,

    /// PEM client certificate, for a server that requires one.
    #[arg(long, env = "DSSGD_HEALTH_CERT")]
    cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, env = "DSSGD_HEALTH_KEY")]
    key: Option<PathBuf>,

    /// Name to verify the server's certificate against (default: the host
    /// of the address).
    #[arg(long, env = "DSSGD_HEALTH_DOMAIN")]
    domain: Option<String>,
}

fn config_from(args: &Args) -> anyhow::Result<ServerConfig> {
    let lease = check_seconds("lease-seconds", args.lease_seconds)?;
    if let Some(max_gamma) = args.max_gamma {
        check_positive("max-gamma", max_gamma)?;
    }
    if let Some(model) = &args.model {
        anyhow::ensure!(
            matches!(model.as_str(), "mlp" | "cnn" | "svhn-cnn"),
            "invalid model {model:?}: expected mlp, cnn or svhn-cnn"
        );
    }
    anyhow::ensure!(
        args.max_message_bytes >= 1024,
        "invalid max-message-bytes {}: expected at least 1024",
        args.max_message_bytes
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.max_concurrent_calls),
        "invalid max-concurrent-calls {}: expected 1 to 1000000",
        args.max_concurrent_calls
    );
    if let Some(rate) = args.max_uploads_per_second {
        anyhow::ensure!(
            rate.is_finite() && (0.001..=1_000_000.0).contains(&rate),
            "invalid max-uploads-per-second {rate}: expected 0.001 to 1000000"
        );
    }
    if args.max_staleness == Some(0) {
        anyhow::bail!(
            "invalid max-staleness 0: expected at least 1 (leave it unset to accept any base version)"
        );
    }
    let tls = tls_from(args)?;
    Ok(ServerConfig {
        max_concurrent_calls: args.max_concurrent_calls,
        max_uploads_per_second: args.max_uploads_per_second,
        max_staleness: args.max_staleness,
        tls,
        require_client_identity: args.client_ca.is_some(),
        ordering: args.ordering,
        lease,
        max_message_bytes: args.max_message_bytes,
        max_gamma: args.max_gamma,
        expected_model: args.model.clone(),
        seed: args.seed,
        ..ServerConfig::default()
    })
}

/// Checks the transport flags and reads the TLS files.
fn tls_from(args: &Args) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (None, None) => {
            anyhow::ensure!(
                args.client_ca.is_none(),
                "--client-ca requires TLS: set --tls-cert and --tls-key as well"
            );
            anyhow::ensure!(
                args.insecure,
                "no TLS certificate given: set --tls-cert and --tls-key (and --client-ca for mutual TLS; `dssgd-server certs` generates them), or pass --insecure to serve plaintext on a trusted network"
            );
            warn!(
                "serving plaintext gRPC (--insecure): anyone on the network path can read and alter uploads and act as any participant; use it only on a trusted network"
            );
            return Ok(None);
        }
        (Some(_), None) => anyhow::bail!("--tls-cert is set but --tls-key is missing"),
        (None, Some(_)) => anyhow::bail!("--tls-key is set but --tls-cert is missing"),
    };
    anyhow::ensure!(
        !args.insecure,
        "--insecure conflicts with --tls-cert: drop --insecure to serve TLS"
    );
    if args.client_ca.is_none() {
        warn!(
            "TLS without --client-ca: clients are not authenticated, so any client that reaches the port can act as any participant; set --client-ca for mutual TLS"
        );
    }
    let files = dssgd_server::tls::TlsFiles {
        cert,
        key,
        client_ca: args.client_ca.clone(),
    };
    let config = dssgd_server::tls::server_config(&files)?;
    // tonic parses the certificate and key only when the server is built, so
    // build one now: a bad file then stops the start-up before the server
    // reports that it listens.
    if let Err(error) = tonic::transport::Server::builder().tls_config(config.clone()) {
        let detail = dssgd_server::tls::error_chain(&error);
        anyhow::bail!(
            "failed to load the TLS certificate {} and key {}{}: {detail}; check that both are PEM files and that the key belongs to the certificate",
            files.cert.display(),
            files.key.display(),
            files
                .client_ca
                .as_ref()
                .map(|ca| format!(" with the client CA {}", ca.display()))
                .unwrap_or_default()
        );
    }
    Ok(Some(config))
}

/// Runs the certs subcommand.
fn generate_certs(certs: &CertsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        certs.days >= 1,
        "invalid days {}: expected at least 1",
        certs.days
    );
    let mut participants = certs.participants.clone();
    participants.extend((0..certs.participant_count).map(|index| format!("p{index:03}")));
    for id in &participants {
        dssgd_common::config::check_participant_id(id)?;
    }
    let server_names = (!certs.server_names.is_empty()).then_some(certs.server_names.as_slice());
    let files = dssgd_server::tls::generate_federation(
        &certs.out,
        server_names,
        &participants,
        certs.days,
    )?;
    println!("CA certificate       {}", files.ca_cert.display());
    println!("CA key (keep secret) {}", files.ca_key.display());
    println!(
        "server               {} {}{}",
        files.server.0.display(),
        files.server.1.display(),
        if files.server_written { "" } else { " (kept)" }
    );
    for (id, cert, key) in &files.participants {
        println!("participant {id:<8} {} {}", cert.display(), key.display());
    }
    Ok(())
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler should succeed on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupt received; shutting down"),
        _ = terminate.recv() => info!("SIGTERM received; shutting down"),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match &args.command {
        Some(Command::Health(health)) => std::process::exit(check_health(&args, health).await),
        Some(Command::Certs(certs)) => {
            if let Err(error) = generate_certs(certs) {
                eprintln!("dssgd-server: error: {error:#}");
                std::process::exit(1);
            }
            return;
        }
        None => {}
    }
    init_logging(args.log_json);
    if let Err(error) = serve(&args).await {
        eprintln!("dssgd-server: error: {error:#}");
        std::process::exit(1);
    }
}

/// Runs the health subcommand and returns the process exit code.
async fn check_health(args: &Args, health: &HealthArgs) -> i32 {
    let mut files = dssgd_server::tls::ClientTlsFiles {
        ca: health.ca.clone(),
        cert: health.cert.clone(),
        key: health.key.clone(),
        domain: health.domain.clone(),
    };
    // A probe of the local TLS server trusts its client CA and presents the
    // server's own certificate, unless the probe's own TLS options are given.
    if health.addr.is_none() && !files.is_set() && args.tls_cert.is_some() {
        let Some(client_ca) = &args.client_ca else {
            eprintln!(
                "dssgd-server: error: the local server serves TLS without --client-ca, so the probe does not know which CA to trust; pass --ca"
            );
            return 1;
        };
        files = dssgd_server::tls::ClientTlsFiles {
            ca: Some(client_ca.clone()),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            domain: None,
        };
    }
    let address = health.addr.clone().unwrap_or_else(|| {
        let plain = dssgd_server::health::local_probe_address(args.listen);
        match files.is_set() {
            true => plain.replacen("http://", "https://", 1),
            false => plain,
        }
    });
    let tls = match files.is_set() {
        true => match dssgd_server::tls::client_config(&files) {
            Ok(tls) => Some(tls),
            Err(error) => {
                eprintln!("dssgd-server: error: {error}");
                return 1;
            }
        },
        false => None,
    };
    let timeout = match check_seconds("timeout-seconds", health.timeout_seconds) {
        Ok(timeout) => timeout,
        Err(error) => {
            eprintln!("dssgd-server: error: {error}");
            return 1;
        }
    };
    match dssgd_server::health::check(&address, &health.service, timeout, tls).await {
        Ok(status) if status == "SERVING" => {
            println!("{status}");
            0
        }
        Ok(status) => {
            println!("{status}");
            eprintln!(
                "dssgd-server: service {:?} at {address} is {status}",
                health.service
            );
            1
        }
        Err(error) => {
            eprintln!("dssgd-server: error: {error:#}");
            1
        }
    }
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    let config = config_from(args)?;
    let grace = check_seconds("shutdown-grace-seconds", args.shutdown_grace_seconds)?;
    let store = Arc::new(open_store(args)?);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    // Tests and the local simulation start the server on port 0 and read the
    // real port from this line.
    println!("listening on {}", listener.local_addr()?);
    if let Some(address) = args.metrics_listen {
        let metrics_listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("failed to listen for metrics on {address}"))?;
        println!("metrics on {}", metrics_listener.local_addr()?);
        // The endpoint stops with the process, after the gRPC server.
        tokio::spawn(dssgd_server::metrics::serve(
            metrics_listener,
            Arc::clone(&config.metrics),
            Arc::clone(&store),
            std::future::pending(),
        ));
    }
    run_until_signal(config, Arc::clone(&store), listener, grace).await?;
    if store.is_durable() {
        store
            .close()
            .context("failed to close the state database")?;
        info!("state database closed; every acknowledged upload is stored");
    }
    Ok(())
}

/// Opens the durable state of `--state-dir`, or an in-memory store without
/// it, and logs what was restored.
fn open_store(args: &Args) -> anyhow::Result<Store> {
    let Some(dir) = &args.state_dir else {
        warn!(
            "the state is in memory only and is lost when the server stops; set --state-dir to keep it"
        );
        return Ok(Store::new());
    };
    let options = dssgd_server::durable::DurableOptions {
        checkpoint_factor: args.checkpoint_factor,
    };
    let (store, report) = Store::open_durable(dir, args.ordering, options)?;
    if let (Some(expected), Some(model)) = (&args.model, &report.model) {
        anyhow::ensure!(
            *expected == model.name,
            "the state in {} serves {model}, but --model is {expected}; use another --state-dir for a new federation",
            report.path.display()
        );
    }
    let path = report.path.display().to_string();
    if report.created {
        info!(path, "created a new state database");
    } else {
        info!(
            path,
            version = report.version,
            participants = report.participants,
            model = report.model.as_ref().map(ToString::to_string),
            checkpoint_version = report.checkpoint_version,
            replayed_uploads = report.replayed_uploads,
            "restored the state"
        );
    }
    Ok(store)
}

/// Serves until SIGTERM or SIGINT, then stops accepting calls and gives the
/// calls in flight `grace` to finish before it stops waiting for them.
async fn run_until_signal(
    config: ServerConfig,
    store: Arc<Store>,
    listener: TcpListener,
    grace: Duration,
) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = dssgd_server::run(config, store, listener, async move {
        let _ = stopped.await;
    });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return Ok(result?),
        () = shutdown_signal() => {}
    }
    let _ = stop.send(());
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result?,
        Err(_) => warn!(
            grace_seconds = grace.as_secs_f64(),
            "calls still in flight at the end of the shutdown grace period; stopping without them"
        ),
    }
    Ok(())
}
