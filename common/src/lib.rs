//! Pieces of Distributed Selective SGD shared by the parameter server and the
//! participants, free of libtorch so the server can use them too.
//!
//! - [`sparse`]: the packed wire form of a sparse slice (delta-encoded varint
//!   indices and little-endian f32 values) and its validating decoder.
//! - [`select`]: choosing which parameters to upload or download (largest
//!   values, random with threshold, top counters) and bounding to gamma.
//! - [`shard`]: the deterministic split of a training set among participants.
//! - [`config`]: orderings, fractions and other validated settings.
//! - [`privacy`]: the differentially private upload (exact discrete Laplace
//!   noise and the sparse vector technique).

#![warn(missing_docs)]

pub mod config;
pub mod privacy;
pub mod select;
pub mod shard;
pub mod sparse;
