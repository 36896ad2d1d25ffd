//! Generated gRPC types of the DSSGD protocol (package `dssgd.v1`).
//!
//! This crate owns the wire format and converts the payload codes of
//! `dssgd-common` to and from their wire numbers. The server and participant
//! convert the messages into their own domain types at the service boundary.

#![allow(missing_docs, unreachable_pub, clippy::all)]

pub mod codec;
mod convert;

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("dssgd.v1");

    /// Encoded `FileDescriptorSet` of `dssgd/v1/dssgd.proto`, for gRPC
    /// server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/dssgd_descriptor.bin"));
}

/// Reference services of the transport benchmarks (package
/// `dssgd.bench.v1`), which move bytes and do nothing else.
pub mod bench {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("dssgd.bench.v1");
    }
}
