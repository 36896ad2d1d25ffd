//! The gRPC service: converts protobuf messages into domain types,
//! validates them, and calls the store and the turn coordinator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use dssgd_common::config::{
    Ordering, check_non_negative, check_participant_id, check_positive, check_unit_closed,
    check_unit_open_closed,
};
use dssgd_common::select::fraction_count;
use dssgd_common::sparse::{IndexEncoding, SliceEncoding, SparseSlice, ValueEncoding};
use dssgd_proto::v1 as pb;
use dssgd_proto::v1::parameter_server_server::ParameterServer;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::ServerConfig;
use crate::error::ServerError;
use crate::metrics::Metrics;
use crate::store::{Changes, DenseValues, ModelInfo, Store, Upload};
use crate::turns::Turns;

/// Largest encoded upload, in bytes, that the in-memory store applies on
/// the reactor thread instead of the blocking pool: about 2,000 changes.
const INLINE_UPLOAD_BYTES: usize = 16 << 10;

/// The parameter server's gRPC handler.
#[derive(Debug, Clone)]
pub struct Service {
    store: Arc<Store>,
    turns: Arc<Turns>,
    config: Arc<ServerConfig>,
    metrics: Arc<Metrics>,
    /// Permits of the calls that run on the blocking pool.
    calls: Arc<Semaphore>,
    /// Upload rate buckets of the joined participants.
    rates: Arc<Mutex<HashMap<String, TokenBucket>>>,
    /// Buffers of decoded dense uploads, kept for the next ones. glibc
    /// returns a freed buffer of several MiB to the kernel, so a fresh one
    /// per dense upload faults in every page again: decoding 2^20 values
    /// took 2.5 ms into a fresh buffer and 0.4 ms into a reused one.
    dense_buffers: Arc<Mutex<Vec<Vec<f32>>>>,
}

/// Largest number of dense-upload buffers kept; more concurrent dense
/// uploads allocate their own.
const KEPT_DENSE_BUFFERS: usize = 2;

/// A token bucket: `rate` tokens per second up to `rate` (at least one),
/// one token per upload.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// Takes a token if one is available at `now`.
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let burst = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Service {
    /// Creates a handler over `store`. Participants restored from a durable
    /// store keep their place in the round robin order.
    pub fn new(store: Arc<Store>, config: ServerConfig) -> Self {
        let turns = Turns::new(config.ordering, config.lease, config.seed);
        for participant in store.join_order() {
            turns.register(&participant);
        }
        let metrics = Arc::clone(&config.metrics);
        store.set_max_staleness(config.max_staleness);
        let calls = Arc::new(Semaphore::new(config.max_concurrent_calls.max(1)));
        Self {
            store,
            turns: Arc::new(turns),
            config: Arc::new(config),
            metrics,
            calls,
            rates: Arc::new(Mutex::new(HashMap::new())),
            dense_buffers: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The handler's metrics, for the metrics endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Validates and applies a join without the gRPC layer; the handler
    /// and the fuzz target call it.
    pub fn handle_join(&self, request: pb::JoinRequest) -> Result<pb::JoinResponse, ServerError> {
        let participant = check_participant_id(&request.participant_id)?;
        let model = request.model.ok_or(ServerError::MissingField("model"))?;
        let model = ModelInfo {
            name: model.name,
            parameter_count: model.parameter_count,
            layout_hash: model.layout_hash,
        };
        if let Some(expected) = &self.config.expected_model
            && *expected != model.name
        {
            return Err(ServerError::ModelMismatch {
                participant: model.to_string(),
                server: format!("{expected} (--model)"),
            });
        }
        if model.parameter_count == 0 {
            return Err(ServerError::InvalidField {
                field: "model.parameter_count",
                reason: "0 parameters; expected at least 1".into(),
            });
        }
        let initial = match (self.store.model(), request.initial_parameters) {
            (None, Some(slice)) if slice.dense => {
                let encoding = slice_encoding("initial_parameters", &slice)?;
                if encoding.values != ValueEncoding::F32 {
                    return Err(ServerError::InvalidField {
                        field: "initial_parameters.value_encoding",
                        reason: format!(
                            "{} values; initial parameters must be sent as f32",
                            encoding.values.name()
                        ),
                    });
                }
                Some(SparseSlice::decode_dense(
                    &slice.values,
                    model.parameter_count,
                )?)
            }
            _ => None,
        };
        let (record, version, initialized) = self.store.join(participant, &model, initial)?;
        self.turns.register(participant);
        info!(participant, model = %model, version, initialized, "participant joined");
        Ok(pb::JoinResponse {
            model: Some(to_proto_model(&model)),
            ordering: to_proto_ordering(self.config.ordering) as i32,
            version,
            last_upload_id: record.last_upload_id,
            initialized_parameters: initialized,
            max_message_bytes: self.config.max_message_bytes as u64,
            max_gamma: self.config.max_gamma.unwrap_or(0.0),
        })
    }

    /// Validates and serves a download without the gRPC layer.
    pub fn handle_download(
        &self,
        request: pb::DownloadRequest,
    ) -> Result<pb::DownloadResponse, ServerError> {
        self.check_registered(&request.participant_id)?;
        let theta_d = check_unit_closed("theta_d", request.theta_d)?;
        let index_encoding = index_encoding("index_encoding", request.index_encoding)?;
        let download = self.store.download_encoded(theta_d, index_encoding)?;
        debug!(
            participant = %request.participant_id,
            version = download.version,
            parameters = download.count,
            "download"
        );
        let parameters = pb::SparseSlice {
            dense: download.indices.is_none(),
            indices: download.indices.unwrap_or_default().into(),
            values: download.values.into(),
            index_encoding: pb::IndexEncoding::from(index_encoding) as i32,
            value_encoding: pb::ValueEncoding::F32 as i32,
        };
        let bytes = parameters.indices.len() + parameters.values.len();
        self.metrics.download(download.count, bytes);
        Ok(pb::DownloadResponse {
            version: download.version,
            parameters: Some(parameters),
        })
    }

    /// Validates and applies an upload without the gRPC layer.
    pub fn handle_upload(
        &self,
        request: pb::UploadRequest,
    ) -> Result<pb::UploadResponse, ServerError> {
        let participant = request.participant_id.clone();
        self.check_registered(&participant)?;
        self.check_rate(&participant)?;
        let model = self.store.model().ok_or(ServerError::Uninitialized)?;
        if request.layout_hash != model.layout_hash {
            return Err(ServerError::LayoutMismatch {
                upload: request.layout_hash,
                server: model.layout_hash,
            });
        }
        let gamma = check_positive("gamma", request.gamma)?;
        if let Some(max_gamma) = self.config.max_gamma
            && gamma > max_gamma
        {
            return Err(ServerError::GammaTooLarge { gamma, max_gamma });
        }
        let theta_u = check_unit_open_closed("theta_u", request.theta_u)?;
        let epsilon = check_non_negative("epsilon", request.epsilon)?;
        if request.upload_id == 0 {
            return Err(ServerError::ZeroUploadId);
        }
        let encoded_bytes = request
            .changes
            .as_ref()
            .map_or(0, |slice| slice.indices.len() + slice.values.len());
        let (changes, value_encoding) =
            self.decode_changes(request.changes, model.parameter_count)?;
        let n = model.parameter_count as usize;
        let allowed = fraction_count(theta_u, n);
        if changes.len() > allowed {
            return Err(ServerError::TooManyEntries {
                entries: changes.len(),
                theta_u,
                allowed,
                parameter_count: n,
            });
        }
        changes.check_bound(gamma, value_encoding)?;
        if self.config.ordering.uses_turns() {
            self.turns.check(&participant, &request.turn_token)?;
        }

        let upload = Upload {
            participant,
            upload_id: request.upload_id,
            base_version: request.base_version,
            changes,
            epsilon,
            encoded_bytes: encoded_bytes as u64,
        };
        let changed = upload.changes.len();
        let outcome = self.store.apply(&upload);
        if let Changes::Dense(values) = upload.changes {
            let mut buffers = self.dense_buffers.lock();
            if buffers.len() < KEPT_DENSE_BUFFERS {
                buffers.push(values.into_buffer());
            }
        }
        let outcome = outcome?;
        debug!(
            participant = %upload.participant,
            upload_id = upload.upload_id,
            base_version = upload.base_version,
            version = outcome.version,
            parameters = changed,
            epsilon = upload.epsilon,
            applied = outcome.applied,
            "upload"
        );
        if outcome.applied {
            // Versions applied by others between the base and this upload.
            let staleness = outcome.version.saturating_sub(1 + upload.base_version);
            self.metrics.upload(changed, encoded_bytes, staleness);
        }
        if !outcome.applied {
            info!(
                participant = %upload.participant,
                upload_id = upload.upload_id,
                "repeated upload id acknowledged without applying it again"
            );
        }
        Ok(pb::UploadResponse {
            version: outcome.version,
            applied: outcome.applied,
        })
    }

    /// Decodes an upload's changes; returns them with the code of their
    /// values.
    fn decode_changes(
        &self,
        slice: Option<pb::SparseSlice>,
        parameter_count: u64,
    ) -> Result<(Changes, ValueEncoding), ServerError> {
        let slice = slice.ok_or(ServerError::MissingField("changes"))?;
        let encoding = slice_encoding("changes", &slice)?;
        if slice.dense {
            if !slice.indices.is_empty() {
                return Err(ServerError::InvalidField {
                    field: "changes.indices",
                    reason: format!(
                        "{} bytes of indices in a dense slice, which has none",
                        slice.indices.len()
                    ),
                });
            }
            let buffer = self.dense_buffers.lock().pop().unwrap_or_default();
            let values =
                DenseValues::decode_into(&slice.values, parameter_count, encoding.values, buffer)?;
            return Ok((Changes::Dense(values), encoding.values));
        }
        let changes =
            SparseSlice::decode_with(&slice.indices, &slice.values, parameter_count, encoding)?;
        Ok((Changes::Sparse(changes), encoding.values))
    }

    /// Takes one upload token of the joined `participant`, when uploads are
    /// rate limited. Only joined participants get a bucket, so the map is
    /// bounded by the number of participants.
    fn check_rate(&self, participant: &str) -> Result<(), ServerError> {
        let Some(rate) = self.config.max_uploads_per_second else {
            return Ok(());
        };
        let now = Instant::now();
        let mut rates = self.rates.lock();
        let bucket = rates
            .entry(participant.to_string())
            .or_insert_with(|| TokenBucket {
                tokens: rate.max(1.0),
                updated: now,
            });
        if bucket.take(rate, now) {
            Ok(())
        } else {
            Err(ServerError::RateLimited {
                participant: participant.to_string(),
                rate,
            })
        }
    }

    /// Checks that `request` came over a connection whose client
    /// certificate names `participant`, when the server requires client
    /// identities.
    fn check_identity<T>(
        &self,
        request: &Request<T>,
        participant: &str,
    ) -> Result<(), ServerError> {
        if !self.config.require_client_identity {
            return Ok(());
        }
        let certificate = request
            .peer_certs()
            .and_then(|chain| chain.first().and_then(|leaf| crate::tls::common_name(leaf)))
            .ok_or(ServerError::MissingClientIdentity)?;
        if certificate == participant {
            Ok(())
        } else {
            Err(ServerError::IdentityMismatch {
                certificate,
                participant: participant.to_string(),
            })
        }
    }

    /// Rejects `request` through [`finish`] unless its connection's identity
    /// is `participant`.
    fn authorize<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        participant: &str,
    ) -> Result<(), Status> {
        let checked = self.check_identity(request, participant);
        if checked.is_err() {
            finish(&self.metrics, rpc, participant, checked)?;
        }
        Ok(())
    }

    fn check_registered(&self, participant: &str) -> Result<(), ServerError> {
        check_participant_id(participant)?;
        if self.store.is_registered(participant) {
            Ok(())
        } else {
            Err(ServerError::UnknownParticipant(participant.to_string()))
        }
    }

    fn status(&self) -> pb::StatusResponse {
        let status = self.store.status();
        pb::StatusResponse {
            model: status.model.as_ref().map(to_proto_model),
            version: status.version,
            ordering: to_proto_ordering(self.config.ordering) as i32,
            participants: status
                .participants
                .iter()
                .map(|(id, record)| pb::ParticipantStatus {
                    participant_id: id.clone(),
                    uploads: record.uploads,
                    parameters_uploaded: record.parameters_uploaded,
                    last_upload_id: record.last_upload_id,
                    epsilon_spent: record.epsilon_spent,
                    private_uploads: record.private_uploads,
                })
                .collect(),
            total_updates: status.total_updates,
            // Read under the store's lock, so that the bytes and the version
            // count the same uploads.
            uploaded_bytes: status.uploaded_bytes,
            downloaded_bytes: self.metrics.downloaded_bytes(),
        }
    }
}

/// Reads the codes of a slice's payloads; an unknown code is rejected
/// rather than read as the default.
fn slice_encoding(
    field: &'static str,
    slice: &pb::SparseSlice,
) -> Result<SliceEncoding, ServerError> {
    let indices = index_encoding(field, slice.index_encoding)?;
    let values = pb::ValueEncoding::try_from(slice.value_encoding)
        .map(ValueEncoding::from)
        .map_err(|_| ServerError::InvalidField {
            field,
            reason: format!(
                "unknown value_encoding {}; expected 0 (f32) or 1 (f16)",
                slice.value_encoding
            ),
        })?;
    Ok(SliceEncoding { indices, values })
}

fn index_encoding(field: &'static str, code: i32) -> Result<IndexEncoding, ServerError> {
    pb::IndexEncoding::try_from(code)
        .map(IndexEncoding::from)
        .map_err(|_| ServerError::InvalidField {
            field,
            reason: format!("unknown index_encoding {code}; expected 0 (delta varint) or 1 (Rice)"),
        })
}

fn to_proto_model(model: &ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        name: model.name.clone(),
        parameter_count: model.parameter_count,
        layout_hash: model.layout_hash.clone(),
    }
}

fn to_proto_ordering(ordering: Ordering) -> pb::Ordering {
    match ordering {
        Ordering::Asynchronous => pb::Ordering::Asynchronous,
        Ordering::RoundRobin => pb::Ordering::RoundRobin,
        Ordering::RandomOrder => pb::Ordering::RandomOrder,
    }
}

impl Service {
    /// Runs one request's handler on the blocking pool, because decoding,
    /// validating and copying a large slice is CPU work that would stall the
    /// reactor threads, and converts its rejection into a logged status.
    async fn off_reactor<T, F>(
        &self,
        rpc: &'static str,
        participant: String,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ServerError> + Send + 'static,
    {
        self.run_handler(rpc, participant, false, handler).await
    }

    /// Runs `handler` like [`Service::off_reactor`], but on the calling
    /// reactor thread when `inline` is set: for work of a few microseconds
    /// the hop to the blocking pool costs more than the work itself.
    async fn run_handler<T, F>(
        &self,
        rpc: &'static str,
        participant: String,
        inline: bool,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ServerError> + Send + 'static,
    {
        // A call over the limit is rejected at once instead of queueing, so
        // the memory held by waiting requests stays bounded.
        let Ok(permit) = Arc::clone(&self.calls).try_acquire_owned() else {
            let limit = self.config.max_concurrent_calls;
            let overloaded = Err(ServerError::Overloaded { limit });
            return finish(&self.metrics, rpc, &participant, overloaded).map(Response::new);
        };
        let result = if inline {
            let _permit = permit;
            handler()
        } else {
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                handler()
            })
            .await
            .map_err(|error| Status::internal(format!("{rpc} task failed: {error}")))?
        };
        finish(&self.metrics, rpc, &participant, result).map(Response::new)
    }
}

/// Counts a finished call. A rejection is also logged once at warn with its
/// reason and converted into a status.
fn finish<T>(
    metrics: &Metrics,
    rpc: &'static str,
    participant: &str,
    result: Result<T, ServerError>,
) -> Result<T, Status> {
    metrics.call(rpc, result.is_ok());
    result.map_err(|error| {
        metrics.rejection(rpc, error.reason());
        warn!(rpc, participant, reason = error.reason(), error = %error, "request rejected");
        error.into()
    })
}

#[tonic::async_trait]
impl ParameterServer for Service {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.authorize("Join", &request, &request.get_ref().participant_id)?;
        let request = request.into_inner();
        let participant = request.participant_id.clone();
        let service = self.clone();
        self.off_reactor("Join", participant, move || service.handle_join(request))
            .await
    }

    async fn download_parameters(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<pb::DownloadResponse>, Status> {
        self.authorize(
            "DownloadParameters",
            &request,
            &request.get_ref().participant_id,
        )?;
        let request = request.into_inner();
        let participant = request.participant_id.clone();
        let service = self.clone();
        self.off_reactor("DownloadParameters", participant, move || {
            service.handle_download(request)
        })
        .await
    }

    async fn upload_gradients(
        &self,
        request: Request<pb::UploadRequest>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.authorize(
            "UploadGradients",
            &request,
            &request.get_ref().participant_id,
        )?;
        let request = request.into_inner();
        let participant = request.participant_id.clone();
        // A small upload to the in-memory store takes microseconds, so it
        // runs on the reactor. A large one, or one that the durable store
        // must commit to disk, goes to the blocking pool.
        let size = request
            .changes
            .as_ref()
            .map_or(0, |slice| slice.indices.len() + slice.values.len());
        let inline = size <= INLINE_UPLOAD_BYTES && !self.store.is_durable();
        let service = self.clone();
        self.run_handler("UploadGradients", participant, inline, move || {
            service.handle_upload(request)
        })
        .await
    }

    async fn acquire_turn(
        &self,
        request: Request<pb::TurnRequest>,
    ) -> Result<Response<pb::TurnResponse>, Status> {
        self.authorize("AcquireTurn", &request, &request.get_ref().participant_id)?;
        let participant = request.into_inner().participant_id;
        let grant = match self.check_registered(&participant) {
            Ok(()) => {
                self.turns
                    .acquire(&participant, self.config.turn_wait)
                    .await
            }
            Err(error) => Err(error),
        };
        let grant = finish(&self.metrics, "AcquireTurn", &participant, grant)?;
        Ok(Response::new(match grant {
            Some(grant) => pb::TurnResponse {
                granted: true,
                token: grant.token,
                lease_ms: grant.lease.as_millis() as u64,
            },
            None => pb::TurnResponse {
                granted: false,
                token: String::new(),
                lease_ms: 0,
            },
        }))
    }

    async fn renew_turn(
        &self,
        request: Request<pb::TurnLease>,
    ) -> Result<Response<pb::TurnResponse>, Status> {
        self.authorize("RenewTurn", &request, &request.get_ref().participant_id)?;
        let lease = request.into_inner();
        let grant = self.turns.renew(&lease.participant_id, &lease.token);
        let grant = finish(&self.metrics, "RenewTurn", &lease.participant_id, grant)?;
        Ok(Response::new(pb::TurnResponse {
            granted: true,
            token: grant.token,
            lease_ms: grant.lease.as_millis() as u64,
        }))
    }

    async fn release_turn(
        &self,
        request: Request<pb::TurnLease>,
    ) -> Result<Response<pb::ReleaseTurnResponse>, Status> {
        self.authorize("ReleaseTurn", &request, &request.get_ref().participant_id)?;
        let lease = request.into_inner();
        let released = self.turns.release(&lease.participant_id, &lease.token);
        finish(
            &self.metrics,
            "ReleaseTurn",
            &lease.participant_id,
            released,
        )?;
        debug!(participant = %lease.participant_id, "turn released");
        Ok(Response::new(pb::ReleaseTurnResponse {}))
    }

    async fn get_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join_request() -> pb::JoinRequest {
        pb::JoinRequest {
            participant_id: "p1".into(),
            model: Some(pb::ModelInfo {
                name: "toy".into(),
                parameter_count: 4,
                layout_hash: "abc".into(),
            }),
            initial_parameters: Some(pb::SparseSlice {
                values: dssgd_common::sparse::encode_values(&[0.0; 4]).into(),
                dense: true,
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn call_over_concurrency_limit_is_rejected() {
        let config = ServerConfig {
            max_concurrent_calls: 1,
            ..ServerConfig::default()
        };
        let service = Service::new(Arc::new(Store::new()), config);
        let held = Arc::clone(&service.calls)
            .try_acquire_owned()
            .expect("the only permit is free");
        let status = ParameterServer::join(&service, Request::new(join_request()))
            .await
            .expect_err("a call over the limit must be rejected");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("1 calls"), "{}", status.message());
        assert_eq!(
            service.store.model(),
            None,
            "the rejected join changed the state"
        );

        drop(held);
        let joined = ParameterServer::join(&service, Request::new(join_request()))
            .await
            .expect("the join should succeed once the permit is free");
        assert!(joined.into_inner().initialized_parameters);
    }

    #[test]
    fn dense_upload_buffers_are_reused() {
        let service = Service::new(Arc::new(Store::new()), ServerConfig::default());
        service.handle_join(join_request()).unwrap();
        let dense = |upload_id: u64| pb::UploadRequest {
            participant_id: "p1".into(),
            upload_id,
            base_version: 0,
            layout_hash: "abc".into(),
            gamma: 1.0,
            theta_u: 1.0,
            changes: Some(pb::SparseSlice {
                values: dssgd_common::sparse::encode_values(&[0.5; 4]).into(),
                dense: true,
                ..Default::default()
            }),
            turn_token: String::new(),
            epsilon: 0.0,
        };
        service.handle_upload(dense(1)).unwrap();
        let kept: Vec<usize> = service
            .dense_buffers
            .lock()
            .iter()
            .map(Vec::capacity)
            .collect();
        assert_eq!(kept, vec![4], "the first upload's buffer is kept");
        service.handle_upload(dense(2)).unwrap();
        assert_eq!(
            service.dense_buffers.lock().len(),
            1,
            "the second upload took the kept buffer and gave it back"
        );
        assert_eq!(service.store.parameters().0, vec![1.0; 4]);
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket {
            tokens: 2.0,
            updated: start,
        };
        assert!(bucket.take(2.0, start), "first token of the burst");
        assert!(bucket.take(2.0, start), "second token of the burst");
        assert!(!bucket.take(2.0, start), "burst exhausted");
        let later = start + std::time::Duration::from_millis(500);
        assert!(bucket.take(2.0, later), "one token after half a second");
        assert!(!bucket.take(2.0, later), "only one token refilled");
    }
}
