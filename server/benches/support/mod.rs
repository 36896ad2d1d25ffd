//! Pieces that several server benchmarks share. Each benchmark uses only
//! some of them.
#![allow(dead_code)]

use dssgd_common::sparse::SparseSlice;
use rand::Rng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use tonic::transport::Channel;

/// Draws `count` distinct sorted indices out of `n`, each with a change
/// drawn uniformly from `(-gamma, gamma)`.
pub(crate) fn random_changes(
    rng: &mut ChaCha8Rng,
    n: usize,
    count: usize,
    gamma: f32,
) -> SparseSlice {
    let mut indices: Vec<u32> = sample(rng, n, count)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    indices.sort_unstable();
    let values = indices
        .iter()
        .map(|_| rng.random_range(-gamma..gamma))
        .collect();
    SparseSlice { indices, values }
}

/// Connects to `address` (with its scheme) with the participant's HTTP/2
/// settings and Nagle's algorithm off.
pub(crate) async fn participant_channel(address: &str) -> Channel {
    Channel::from_shared(address.to_string())
        .unwrap_or_else(|error| panic!("invalid address {address:?}: {error}"))
        .tcp_nodelay(true)
        .initial_stream_window_size(dssgd_server::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(dssgd_server::HTTP2_CONNECTION_WINDOW)
        .max_frame_size(dssgd_server::HTTP2_MAX_FRAME_SIZE)
        .connect()
        .await
        .unwrap_or_else(|error| panic!("failed to connect to {address}: {error}"))
}
