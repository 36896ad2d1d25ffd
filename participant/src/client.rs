//! gRPC client of the parameter server, with retries.
//!
//! Every call is retried with exponential backoff while the server is
//! unreachable or overloaded, up to a total time limit. Uploads are safe to
//! retry because each carries an upload id that the server applies at most
//! once.

use std::time::Duration;

use dssgd_common::sparse::{self, IndexEncoding, SliceEncoding, SparseSlice, ValueEncoding};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_client::ParameterServerClient;
use prost::Message;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, warn};

/// Metadata key of the server's reason for a rejection.
const REASON_METADATA_KEY: &str = "dssgd-reason";

/// Largest gRPC message the client sends or accepts, in bytes: the server's
/// default (64 MiB), which covers dense transfers of 16 million parameters.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long to keep retrying a call, and how fast.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// First wait after a failure.
    pub initial_backoff: Duration,
    /// Maximum wait between two attempts.
    pub max_backoff: Duration,
    /// Give up once this much time has passed since the first attempt.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// Failure of a call after retries, or a rejection by the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not an `http://` or `https://` URI.
    #[error(
        "invalid server address {address:?}: {reason}; expected for example http://127.0.0.1:50051"
    )]
    Address {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server returned an error that retrying cannot fix.
    #[error("{rpc} rejected by the server ({code:?}): {message}")]
    Rejected {
        /// Name of the call.
        rpc: &'static str,
        /// gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
        /// The server's stable reason label (metadata `dssgd-reason`), for
        /// example `stale_version`; empty when the server sent none.
        reason: String,
    },
    /// The server stayed unavailable for the whole retry period.
    #[error(
        "{rpc} to {address} failed after retrying for {seconds:.0} s: {last}; check that the server is running and reachable"
    )]
    GaveUp {
        /// Name of the call.
        rpc: &'static str,
        /// The server address.
        address: String,
        /// Time spent retrying.
        seconds: f64,
        /// The last error.
        last: String,
    },
    /// The connection failed in a way that retrying cannot fix, so no call
    /// reached the server.
    #[error("{rpc} to {address} failed: {detail}")]
    Transport {
        /// Name of the call.
        rpc: &'static str,
        /// The server address.
        address: String,
        /// The transport's error, with its causes and advice.
        detail: String,
    },
    /// The TLS handshake failed, so no call reached the server.
    #[error(
        "{rpc} to {address} failed in the TLS handshake: {detail}; check --tls-ca (the CA that signed the server's certificate, which must cover the host in the address) and --tls-cert and --tls-key (a certificate signed by the federation's CA whose common name is this participant's identifier)"
    )]
    Handshake {
        /// Name of the call.
        rpc: &'static str,
        /// The server address.
        address: String,
        /// The TLS library's error, with its causes.
        detail: String,
    },
    /// The TLS files could not be loaded.
    #[error(
        "failed to load the TLS files of --tls-ca, --tls-cert and --tls-key: {detail}; check that each is a PEM file and that the key belongs to the certificate"
    )]
    TlsFiles {
        /// The error of tonic and rustls, with its causes.
        detail: String,
    },
    /// The server sent a response this client cannot decode.
    #[error("invalid {rpc} response: {reason}")]
    InvalidResponse {
        /// Name of the call.
        rpc: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// Parameters received by a download.
#[derive(Clone, Debug)]
pub struct Downloaded {
    /// Version the parameters were read at.
    pub version: u64,
    /// Selected indices; `None` when all parameters were sent.
    pub indices: Option<Vec<u32>>,
    /// Values, one per index (or per parameter).
    pub values: Vec<f32>,
}

/// Byte counters of the messages sent and received (protobuf encoded size).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Traffic {
    /// Bytes of requests sent, counting each attempt once.
    pub bytes_sent: u64,
    /// Bytes of responses received.
    pub bytes_received: u64,
}

impl ClientError {
    /// Whether the server rejected an upload because its base version is
    /// too old (`--max-staleness`): the participant should drop it and
    /// train on a fresh download.
    pub fn is_stale(&self) -> bool {
        matches!(self, ClientError::Rejected { reason, .. } if reason == "stale_version")
    }
}

/// A connection to one parameter server.
#[derive(Clone, Debug)]
pub struct Client {
    inner: ParameterServerClient<Channel>,
    address: String,
    participant_id: String,
    retry: RetryPolicy,
    traffic: Traffic,
}

fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    ) || (status.code() == Code::Unknown && status.message().contains("transport"))
}

/// Formats the status message followed by the messages of its sources.
fn status_detail(status: &Status) -> String {
    dssgd_server::tls::error_chain(status)
}

/// Returns whether `detail` describes a failed TLS handshake: the server rejected
/// this client's certificate (a fatal alert), this client rejected the
/// server's, or the server replied in plaintext (a corrupt message).
/// Retrying cannot fix any of them.
fn is_tls_failure(detail: &str) -> bool {
    [
        "received fatal alert",
        "invalid peer certificate",
        "corrupt message",
    ]
    .iter()
    .any(|symptom| detail.contains(symptom))
}

/// Returns advice for a failure that a TLS mismatch explains, given the
/// address's scheme and the error's `detail`.
///
/// A TLS server closes a plaintext connection, which the client sees as a
/// broken pipe, a reset or an HTTP/2 protocol error, depending on which
/// side's write comes first. A mutual-TLS server closes a connection that
/// has no client certificate in the same way when its alert arrives after
/// the client's first write. A plaintext server's reply to a handshake is
/// a corrupt message to the TLS library.
fn tls_mismatch_hint(address: &str, detail: &str) -> Option<&'static str> {
    let detail = detail.to_lowercase();
    let closed = ["broken pipe", "connection reset", "h2 protocol error"]
        .iter()
        .any(|symptom| detail.contains(symptom));
    if address.starts_with("http://") && closed {
        Some("the server may require TLS: connect with https:// and --tls-ca")
    } else if address.starts_with("https://") && detail.contains("corrupt message") {
        Some("the server does not seem to use TLS: connect with http:// and --insecure")
    } else if address.starts_with("https://") && closed {
        Some("the server may require a client certificate: pass --tls-cert and --tls-key")
    } else {
        None
    }
}

/// Appends the advice of [`tls_mismatch_hint`], if any, to `message`.
fn with_tls_hint(address: &str, mut message: String) -> String {
    if let Some(hint) = tls_mismatch_hint(address, &message) {
        message.push_str("; ");
        message.push_str(hint);
    }
    message
}

impl Client {
    /// Creates a client for `address`: `https://HOST:PORT` with `tls`, or
    /// `http://HOST:PORT` (plaintext) without it. The connection is made
    /// lazily, so a server that is not up yet is reached by the first call's
    /// retries.
    pub fn new(
        address: &str,
        tls: Option<ClientTlsConfig>,
        participant_id: &str,
        max_message_bytes: usize,
        retry: RetryPolicy,
    ) -> Result<Self, ClientError> {
        let invalid = |reason: String| ClientError::Address {
            address: address.to_string(),
            reason,
        };
        let https = address.starts_with("https://");
        if !(address.starts_with("http://") || https) {
            return Err(invalid("the scheme is missing".into()));
        }
        if https != tls.is_some() {
            return Err(invalid(match https {
                true => "https needs TLS settings: give the federation's CA with --tls-ca".into(),
                false => {
                    "TLS settings are given but the address is plaintext http; use https://".into()
                }
            }));
        }
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|error| invalid(error.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(dssgd_server::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(dssgd_server::HTTP2_CONNECTION_WINDOW)
            .max_frame_size(dssgd_server::HTTP2_MAX_FRAME_SIZE)
            // Without pings, a connection whose server vanished (a container
            // that came back under another address) waits forever, because
            // no data is left unacknowledged for TCP to time out.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| ClientError::TlsFiles {
                    detail: dssgd_server::tls::error_chain(&error),
                })?;
        }
        let inner = ParameterServerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Ok(Self {
            inner,
            address: address.to_string(),
            participant_id: participant_id.to_string(),
            retry,
            traffic: Traffic::default(),
        })
    }

    /// Returns the bytes sent and received so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Returns the participant this client acts for.
    pub fn participant_id(&self) -> &str {
        &self.participant_id
    }

    /// Runs `call` until it succeeds, fails with a non-retryable status, or
    /// the retry period runs out.
    async fn with_retry<Req, Resp, F, Fut>(
        &mut self,
        rpc: &'static str,
        request: Req,
        call: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Message + Clone,
        Resp: Message,
        F: Fn(ParameterServerClient<Channel>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = self.retry.initial_backoff;
        let request_bytes = request.encoded_len() as u64;
        loop {
            self.traffic.bytes_sent += request_bytes;
            match call(self.inner.clone(), request.clone()).await {
                Ok(response) => {
                    let response = response.into_inner();
                    self.traffic.bytes_received += response.encoded_len() as u64;
                    return Ok(response);
                }
                Err(status) if is_tls_failure(&status_detail(&status)) => {
                    return Err(ClientError::Handshake {
                        rpc,
                        address: self.address.clone(),
                        detail: with_tls_hint(&self.address, status_detail(&status)),
                    });
                }
                Err(status) if is_retryable(&status) => {
                    let elapsed = started.elapsed();
                    if elapsed >= self.retry.give_up_after {
                        return Err(ClientError::GaveUp {
                            rpc,
                            address: self.address.clone(),
                            seconds: elapsed.as_secs_f64(),
                            last: with_tls_hint(&self.address, status_detail(&status)),
                        });
                    }
                    warn!(
                        participant = %self.participant_id,
                        rpc,
                        code = ?status.code(),
                        error = %status_detail(&status),
                        retry_in_ms = backoff.as_millis() as u64,
                        "call failed; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
                Err(status) => {
                    // A TLS mismatch fails in the transport, before any
                    // server could reject the call.
                    if let Some(hint) = tls_mismatch_hint(&self.address, status.message()) {
                        return Err(ClientError::Transport {
                            rpc,
                            address: self.address.clone(),
                            detail: format!("{}; {hint}", status_detail(&status)),
                        });
                    }
                    let message = status.message().to_string();
                    let reason = status
                        .metadata()
                        .get(REASON_METADATA_KEY)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    return Err(ClientError::Rejected {
                        rpc,
                        code: status.code(),
                        message,
                        reason,
                    });
                }
            }
        }
    }

    /// Joins the federation, sending the model identity and its initial
    /// parameters (used only if the server has none yet).
    pub async fn join(
        &mut self,
        model: pb::ModelInfo,
        initial_parameters: &[f32],
    ) -> Result<pb::JoinResponse, ClientError> {
        let request = pb::JoinRequest {
            participant_id: self.participant_id.clone(),
            model: Some(model),
            initial_parameters: Some(pb::SparseSlice {
                values: sparse::encode_values(initial_parameters).into(),
                dense: true,
                ..Default::default()
            }),
        };
        self.with_retry("Join", request, |mut client, request| async move {
            client.join(request).await
        })
        .await
    }

    /// Downloads the `theta_d` fraction of most-updated global parameters.
    pub async fn download(
        &mut self,
        theta_d: f64,
        parameter_count: u64,
    ) -> Result<Downloaded, ClientError> {
        let request = pb::DownloadRequest {
            participant_id: self.participant_id.clone(),
            theta_d,
            index_encoding: pb::IndexEncoding::Rice as i32,
        };
        let response = self
            .with_retry(
                "DownloadParameters",
                request,
                |mut client, request| async move { client.download_parameters(request).await },
            )
            .await?;
        let invalid = |reason: String| ClientError::InvalidResponse {
            rpc: "DownloadParameters",
            reason,
        };
        let slice = response
            .parameters
            .ok_or_else(|| invalid("no parameters".into()))?;
        if slice.value_encoding != pb::ValueEncoding::F32 as i32 {
            return Err(invalid(format!(
                "value_encoding {}; parameters are sent as f32 (0)",
                slice.value_encoding
            )));
        }
        let (indices, values) = if slice.dense {
            let values = SparseSlice::decode_dense(&slice.values, parameter_count)
                .map_err(|error| invalid(error.to_string()))?;
            (None, values)
        } else {
            let indices = pb::IndexEncoding::try_from(slice.index_encoding)
                .map(IndexEncoding::from)
                .map_err(|_| invalid(format!("unknown index_encoding {}", slice.index_encoding)))?;
            let encoding = SliceEncoding {
                indices,
                values: ValueEncoding::F32,
            };
            let decoded =
                SparseSlice::decode_with(&slice.indices, &slice.values, parameter_count, encoding)
                    .map_err(|error| invalid(error.to_string()))?;
            (Some(decoded.indices), decoded.values)
        };
        debug!(participant = %self.participant_id, version = response.version, "downloaded");
        Ok(Downloaded {
            version: response.version,
            indices,
            values,
        })
    }

    /// Uploads one slice of parameter changes. Retries reuse `upload_id`, so
    /// the server applies the slice at most once.
    pub async fn upload(
        &mut self,
        request: pb::UploadRequest,
    ) -> Result<pb::UploadResponse, ClientError> {
        self.with_retry(
            "UploadGradients",
            request,
            |mut client, request| async move { client.upload_gradients(request).await },
        )
        .await
    }

    /// Waits until the server grants this participant the turn; returns the
    /// token and the lease.
    pub async fn acquire_turn(&mut self) -> Result<(String, Duration), ClientError> {
        loop {
            let request = pb::TurnRequest {
                participant_id: self.participant_id.clone(),
            };
            let response = self
                .with_retry("AcquireTurn", request, |mut client, request| async move {
                    client.acquire_turn(request).await
                })
                .await?;
            if response.granted {
                return Ok((response.token, Duration::from_millis(response.lease_ms)));
            }
        }
    }

    /// Extends the lease of a held turn.
    pub async fn renew_turn(&mut self, token: &str) -> Result<Duration, ClientError> {
        let request = pb::TurnLease {
            participant_id: self.participant_id.clone(),
            token: token.to_string(),
        };
        let response = self
            .with_retry("RenewTurn", request, |mut client, request| async move {
                client.renew_turn(request).await
            })
            .await?;
        Ok(Duration::from_millis(response.lease_ms))
    }

    /// Gives the turn back.
    pub async fn release_turn(&mut self, token: &str) -> Result<(), ClientError> {
        let request = pb::TurnLease {
            participant_id: self.participant_id.clone(),
            token: token.to_string(),
        };
        self.with_retry("ReleaseTurn", request, |mut client, request| async move {
            client.release_turn(request).await
        })
        .await?;
        Ok(())
    }

    /// Reads the server's status.
    pub async fn status(&mut self) -> Result<pb::StatusResponse, ClientError> {
        self.with_retry(
            "GetStatus",
            pb::StatusRequest {},
            |mut client, request| async move { client.get_status(request).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_stop_retries() {
        assert!(is_tls_failure("received fatal alert: CertificateRequired"));
        assert!(is_tls_failure("invalid peer certificate: UnknownIssuer"));
        assert!(is_tls_failure(
            "received corrupt message of type InvalidContentType"
        ));
        assert!(!is_tls_failure("connection refused"));
    }

    #[test]
    fn tls_hints_follow_the_scheme() {
        let plaintext = "http://127.0.0.1:1";
        let tls = "https://127.0.0.1:1";
        assert_eq!(
            tls_mismatch_hint(plaintext, "stream closed because of a broken pipe"),
            Some("the server may require TLS: connect with https:// and --tls-ca")
        );
        assert_eq!(
            tls_mismatch_hint(plaintext, "h2 protocol error: http2 error"),
            Some("the server may require TLS: connect with https:// and --tls-ca")
        );
        assert_eq!(
            tls_mismatch_hint(tls, "received corrupt message of type InvalidContentType"),
            Some("the server does not seem to use TLS: connect with http:// and --insecure")
        );
        assert_eq!(
            tls_mismatch_hint(tls, "Connection reset by peer (os error 104)"),
            Some("the server may require a client certificate: pass --tls-cert and --tls-key")
        );
        assert_eq!(tls_mismatch_hint(plaintext, "connection refused"), None);
        assert_eq!(tls_mismatch_hint(tls, "connection refused"), None);
    }

    #[test]
    fn hint_appends_only_known_advice() {
        let message = with_tls_hint("http://127.0.0.1:1", "broken pipe".into());
        assert_eq!(
            message,
            "broken pipe; the server may require TLS: connect with https:// and --tls-ca"
        );
        assert_eq!(
            with_tls_hint("http://127.0.0.1:1", "refused".into()),
            "refused"
        );
    }
}
