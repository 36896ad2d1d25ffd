//! A DSSGD participant: trains a network with libtorch on its private shard
//! and shares only selected, bounded parameter changes with the parameter
//! server.
//!
//! - [`data`]: MNIST loading (IDX, gzip or raw), verified download and the
//!   choice of dataset.
//! - [`svhn`]: SVHN loading (MATLAB level-5 MAT-files) and verified download.
//! - [`model`]: the MLP, the two CNNs and their flat parameter vector.
//! - [`train`]: local mini-batch SGD and evaluation.
//! - [`device`]: CPU or CUDA choice.
//! - [`client`]: the gRPC client with retries.
//! - [`dssgd`]: the collaborative loop and the baselines' training loop.
//! - [`host`]: several participants in one process.
//! - [`experiment`], [`report`], [`plot`]: the experiment runner, its
//!   tables and report, and its charts.
//! - [`ledger`]: the privacy ledger on disk and the budget check.
//! - [`metrics`]: the JSON record of a run.
//! - [`cli`]: the command-line interface, including the local simulation.

pub mod cli;
pub mod client;
pub mod data;
pub mod device;
pub mod dssgd;
pub mod experiment;
pub mod host;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod report;
pub mod simulate;
pub mod svhn;
pub mod train;
