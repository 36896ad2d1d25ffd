//! Command-line entry point of the DSSGD parameter server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dssgd_common::config::{Ordering, check_positive};
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
    #[arg(long, env = "DSSGD_LEASE_SECONDS", default_value_t = 60.0)]
    lease_seconds: f64,

    /// Largest gRPC message in bytes, in both directions.
    #[arg(long, env = "DSSGD_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,

    /// Largest bound gamma an upload may declare (default: any).
    #[arg(long, env = "DSSGD_MAX_GAMMA")]
    max_gamma: Option<f64>,

    /// Accept only participants of this model (mlp or cnn); by default the
    /// first participant's model is served.
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
    /// upload log holds more changes than this many times the parameter
    /// count. Larger values make uploads cheaper and restarts slower; 0
    /// writes a checkpoint with every upload.
    #[arg(long, env = "DSSGD_CHECKPOINT_FACTOR", default_value_t = 4)]
    checkpoint_factor: u64,

    /// On SIGTERM or SIGINT, time given to calls in flight to finish, in
    /// seconds, before the server stops without them.
    #[arg(long, env = "DSSGD_SHUTDOWN_GRACE_SECONDS", default_value_t = 5.0)]
    shutdown_grace_seconds: f64,

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
    #[arg(long, default_value_t = 5.0)]
    timeout_seconds: f64,
}

fn config_from(args: &Args) -> anyhow::Result<ServerConfig> {
    let lease = check_positive("lease-seconds", args.lease_seconds)?;
    if let Some(max_gamma) = args.max_gamma {
        check_positive("max-gamma", max_gamma)?;
    }
    if let Some(model) = &args.model {
        anyhow::ensure!(
            matches!(model.as_str(), "mlp" | "cnn"),
            "invalid model {model:?}: expected mlp or cnn"
        );
    }
    anyhow::ensure!(
        args.max_message_bytes >= 1024,
        "invalid max-message-bytes {}: expected at least 1024",
        args.max_message_bytes
    );
    Ok(ServerConfig {
        ordering: args.ordering,
        lease: Duration::from_secs_f64(lease),
        max_message_bytes: args.max_message_bytes,
        max_gamma: args.max_gamma,
        expected_model: args.model.clone(),
        seed: args.seed,
        ..ServerConfig::default()
    })
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
    if let Some(Command::Health(health)) = &args.command {
        std::process::exit(check_health(&args, health).await);
    }
    init_logging(args.log_json);
    if let Err(error) = serve(&args).await {
        eprintln!("dssgd-server: error: {error:#}");
        std::process::exit(1);
    }
}

/// Runs the health subcommand and returns the process exit code.
async fn check_health(args: &Args, health: &HealthArgs) -> i32 {
    let address = health
        .addr
        .clone()
        .unwrap_or_else(|| dssgd_server::health::local_probe_address(args.listen));
    let timeout = match check_positive("timeout-seconds", health.timeout_seconds) {
        Ok(seconds) => Duration::from_secs_f64(seconds),
        Err(error) => {
            eprintln!("dssgd-server: error: {error}");
            return 1;
        }
    };
    match dssgd_server::health::check(&address, &health.service, timeout).await {
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
    let grace = Duration::from_secs_f64(check_positive(
        "shutdown-grace-seconds",
        args.shutdown_grace_seconds,
    )?);
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
