//! The DSSGD parameter server: keeps the global parameters, a per-parameter
//! update counter and a version, applies participants' sparse uploads
//! atomically and serves downloads of the most-updated parameters.
//!
//! - [`store`]: the state behind one lock, and the apply and download rules.
//! - [`durable`]: the state's durable copy in an embedded redb database.
//! - [`turns`]: leased, exclusive turns for the round robin and random
//!   orderings.
//! - [`service`]: the tonic handler, validation, and protobuf conversion.
//! - [`error`]: rejection reasons and their gRPC status codes.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`health`]: the standard gRPC health service and its client check.
//! - [`tls`]: TLS settings, participant identities from client
//!   certificates, and certificate generation.
//!
//! The server does not link libtorch. It learns the model from the first
//! participant that joins, which sends the model's name, parameter count,
//! layout hash and initial parameters; every later participant must declare
//! the same model.

#![warn(missing_docs)]

pub mod durable;
pub mod error;
pub mod health;
pub mod metrics;
pub mod service;
pub mod store;
pub mod tls;
pub mod turns;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dssgd_common::config::Ordering;
use dssgd_proto::v1::parameter_server_server::ParameterServerServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use service::Service;
pub use store::Store;

/// Default largest gRPC message, in bytes. tonic's own default is 4 MiB,
/// which a dense upload or download of a model above one million parameters
/// exceeds; 64 MiB covers 16 million f32 parameters. Participants read the
/// server's value from the join response and use it for their side.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Settings of one server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// How participants take turns.
    pub ordering: Ordering,
    /// Lease of a turn in the ordered modes; a holder that neither renews
    /// nor releases within it loses the turn.
    pub lease: Duration,
    /// Maximum time one AcquireTurn call waits before returning ungranted.
    pub turn_wait: Duration,
    /// Largest request or response, in bytes.
    pub max_message_bytes: usize,
    /// Largest bound gamma an upload may declare; `None` accepts any.
    pub max_gamma: Option<f64>,
    /// Model name the server accepts; `None` takes the first participant's.
    pub expected_model: Option<String>,
    /// Seed of the random ordering and of turn tokens.
    pub seed: u64,
    /// Metrics the handler updates; share it with [`metrics::serve`] to
    /// expose them.
    pub metrics: Arc<metrics::Metrics>,
    /// Maximum number of Join, DownloadParameters and UploadGradients calls
    /// served at once; further calls are rejected with RESOURCE_EXHAUSTED,
    /// which participants retry.
    pub max_concurrent_calls: usize,
    /// Uploads per second each participant may make (with a burst of the
    /// same size, at least one); `None` sets no limit.
    pub max_uploads_per_second: Option<f64>,
    /// Largest accepted distance, in versions, between an upload's base
    /// version and the current version; `None` accepts any.
    pub max_staleness: Option<u64>,
    /// TLS settings; `None` serves plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Whether each request must come over a connection whose client
    /// certificate's common name is the request's participant identifier.
    /// Set it together with a TLS configuration that requires client
    /// certificates.
    pub require_client_identity: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            ordering: Ordering::Asynchronous,
            lease: Duration::from_secs(60),
            turn_wait: Duration::from_secs(10),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_gamma: None,
            expected_model: None,
            seed: 0,
            metrics: Arc::new(metrics::Metrics::new()),
            max_concurrent_calls: 256,
            max_uploads_per_second: None,
            max_staleness: None,
            tls: None,
            require_client_identity: false,
        }
    }
}

/// HTTP/2 flow-control window of each call, in bytes, on the server and on
/// the participant's client. With hyper's defaults the transport benchmark
/// measured sparse ingest at 0.2 of a bare tonic service; with these
/// windows at 1.0.
// NOTE: why the defaults slow the parameter server's uploads of about 60 KB
// and not the bare service's messages of the same size is not understood.
pub const HTTP2_STREAM_WINDOW: u32 = 4 << 20;

/// HTTP/2 flow-control window of a whole connection, in bytes.
pub const HTTP2_CONNECTION_WINDOW: u32 = 8 << 20;

/// Largest HTTP/2 frame the server and the participant's client accept, in
/// bytes. A dense transfer of 4 MiB then takes 4 DATA frames instead of
/// 256 of the default 16 KiB; the transport benchmark measured dense
/// downloads 3 times faster. A larger frame would hold up the other calls
/// of the connection (lease renewals) for longer on a slow link.
pub const HTTP2_MAX_FRAME_SIZE: u32 = 1 << 20;

/// Accepted connections of `listener` with Nagle's algorithm off, which
/// tonic sets only on listeners it binds itself: a response written in two
/// parts would otherwise wait for the client's delayed acknowledgement.
pub fn accept_without_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "failed to turn off Nagle's algorithm");
            }
        })
    })
}

/// Serves the parameter server on `listener` until `shutdown` completes,
/// then stops accepting and lets in-flight calls finish.
pub async fn run(
    config: ServerConfig,
    store: Arc<Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let max_message_bytes = config.max_message_bytes;
    let address = listener.local_addr().ok();
    let tls = config.tls.clone();
    info!(
        address = ?address,
        tls = tls.is_some(),
        client_certificates = config.require_client_identity,
        max_concurrent_calls = config.max_concurrent_calls,
        max_uploads_per_second = config.max_uploads_per_second,
        max_staleness = config.max_staleness,
        ordering = config.ordering.name(),
        lease_ms = config.lease.as_millis() as u64,
        max_message_bytes,
        "parameter server listening"
    );
    let service = ParameterServerServer::new(Service::new(store, config))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let (health_reporter, health_service) = health::serving().await;
    let shutdown = async move {
        shutdown.await;
        health::set_not_serving(&health_reporter).await;
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dssgd_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptor sets are valid");
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME_SIZE);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(accept_without_delay(listener), shutdown)
        .await?;
    info!("parameter server stopped");
    Ok(())
}
