//! Command-line entry point of the DSSGD participant.

use clap::Parser;
use dssgd_participant::cli::{Cli, Command, centralized, collaborate, evaluate, standalone};
use dssgd_participant::simulate::simulate;
use tracing_subscriber::EnvFilter;

/// mimalloc, which also replaces malloc for libtorch (the `override`
/// feature). glibc's allocator hands the CNN's activation buffers, several
/// MiB a batch, back to the kernel and faults their pages in again on every
/// batch. mimalloc keeps them for reuse, so a local CNN epoch takes about a
/// third less time (participant/benches/compute.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let result = match &cli.command {
        Command::Collaborate(args) => collaborate(args),
        Command::Standalone(args) => standalone(args),
        Command::Centralized(args) => centralized(args),
        Command::Evaluate(args) => evaluate(args),
        Command::Experiment(args) => dssgd_participant::experiment::experiment(args),
        Command::Host(args) => dssgd_participant::host::host(args),
        Command::Simulate(args) => simulate(args).map(|_| ()),
    };
    if let Err(error) = result {
        eprintln!("dssgd-participant: error: {error:#}");
        std::process::exit(1);
    }
}
