//! Prometheus metrics of the parameter server, served as OpenMetrics text at
//! `GET /metrics` on a separate HTTP listener.
//!
//! Request counters are updated by the gRPC handler as calls finish. Values
//! that the store already keeps (version, participants, per-participant
//! uploads and privacy spend) are read from the store when the endpoint is
//! scraped, so they cannot drift from the state that gRPC clients see.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::store::Store;

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The gRPC method, for example `UploadGradients`.
    pub rpc: &'static str,
    /// `ok` or `rejected`.
    pub outcome: &'static str,
}

/// Labels of a rejection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// The gRPC method.
    pub rpc: &'static str,
    /// Stable reason label (see `ServerError::reason`).
    pub reason: &'static str,
}

/// Labels of a per-participant value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParticipantLabels {
    /// The participant identifier (validated: letters, digits, `-`, `_`, `.`).
    pub participant: String,
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    uploaded_parameters: Counter,
    uploaded_bytes: Counter,
    downloaded_parameters: Counter,
    downloaded_bytes: Counter,
    upload_staleness: Histogram,
    version: Gauge,
    participants: Gauge,
    total_updates: Gauge,
    participant_uploads: Family<ParticipantLabels, Gauge>,
    participant_epsilon: Family<ParticipantLabels, Gauge<f64, AtomicU64>>,
    durable: Gauge,
    checkpoint_age: Gauge<f64, AtomicU64>,
    checkpoint_version: Gauge,
    logged_changes: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dssgd");
        let metrics = Self {
            registry: Registry::default(),
            calls: Family::default(),
            rejections: Family::default(),
            uploaded_parameters: Counter::default(),
            uploaded_bytes: Counter::default(),
            downloaded_parameters: Counter::default(),
            downloaded_bytes: Counter::default(),
            // Versions between the download an upload was computed from and
            // the upload: 0, 1, 2, 4, ... 2^15.
            upload_staleness: Histogram::new(
                std::iter::once(0.0).chain((0..16).map(|power| f64::from(1u32 << power))),
            ),
            version: Gauge::default(),
            participants: Gauge::default(),
            total_updates: Gauge::default(),
            participant_uploads: Family::default(),
            participant_epsilon: Family::default(),
            durable: Gauge::default(),
            checkpoint_age: Gauge::default(),
            checkpoint_version: Gauge::default(),
            logged_changes: Gauge::default(),
        };
        registry.register(
            "calls",
            "Finished gRPC calls by method and outcome",
            metrics.calls.clone(),
        );
        registry.register(
            "rejections",
            "Rejected gRPC calls by method and reason",
            metrics.rejections.clone(),
        );
        registry.register(
            "uploaded_parameters",
            "Parameter changes applied from uploads",
            metrics.uploaded_parameters.clone(),
        );
        registry.register(
            "uploaded_bytes",
            "Encoded bytes of the applied uploads' changes",
            metrics.uploaded_bytes.clone(),
        );
        registry.register(
            "downloaded_parameters",
            "Parameters sent in downloads",
            metrics.downloaded_parameters.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Encoded bytes of the downloads' parameters",
            metrics.downloaded_bytes.clone(),
        );
        registry.register(
            "upload_staleness_versions",
            "Versions applied between an upload's base version and its arrival",
            metrics.upload_staleness.clone(),
        );
        registry.register(
            "version",
            "Current version of the global parameters",
            metrics.version.clone(),
        );
        registry.register(
            "participants",
            "Participants that have joined",
            metrics.participants.clone(),
        );
        registry.register(
            "total_updates",
            "Sum of the per-parameter update counters",
            metrics.total_updates.clone(),
        );
        registry.register(
            "participant_uploads",
            "Applied uploads per participant",
            metrics.participant_uploads.clone(),
        );
        registry.register(
            "participant_epsilon_spent",
            "Privacy spend declared by each participant's applied uploads (basic composition)",
            metrics.participant_epsilon.clone(),
        );
        registry.register(
            "durable",
            "1 when the state is kept in a state directory, 0 when in memory only",
            metrics.durable.clone(),
        );
        registry.register(
            "checkpoint_age_seconds",
            "Seconds since the last checkpoint of the durable state (or since it was opened); 0 in memory",
            metrics.checkpoint_age.clone(),
        );
        registry.register(
            "checkpoint_version",
            "Version of the last checkpoint of the durable state",
            metrics.checkpoint_version.clone(),
        );
        registry.register(
            "logged_changes",
            "Parameter changes logged since the last checkpoint, which a restart replays",
            metrics.logged_changes.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts a finished call.
    pub fn call(&self, rpc: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "rejected" };
        self.calls.get_or_create(&CallLabels { rpc, outcome }).inc();
    }

    /// Counts a rejection with its reason.
    pub fn rejection(&self, rpc: &'static str, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectionLabels { rpc, reason })
            .inc();
    }

    /// Records an applied upload.
    pub fn upload(&self, parameters: usize, bytes: usize, staleness: u64) {
        self.uploaded_parameters.inc_by(parameters as u64);
        self.uploaded_bytes.inc_by(bytes as u64);
        self.upload_staleness.observe(staleness as f64);
    }

    /// Records a download.
    pub fn download(&self, parameters: usize, bytes: usize) {
        self.downloaded_parameters.inc_by(parameters as u64);
        self.downloaded_bytes.inc_by(bytes as u64);
    }

    /// Payload bytes of the downloads so far.
    pub fn downloaded_bytes(&self) -> u64 {
        self.downloaded_bytes.get()
    }

    /// Copies the store's current values into the gauges and returns the
    /// OpenMetrics text.
    pub fn render(&self, store: &Store) -> String {
        let status = store.status();
        self.version.set(status.version as i64);
        self.participants.set(status.participants.len() as i64);
        self.total_updates.set(status.total_updates as i64);
        let checkpoint = store.checkpoint_status();
        self.durable.set(i64::from(checkpoint.is_some()));
        if let Some(checkpoint) = checkpoint {
            self.checkpoint_age.set(checkpoint.age.as_secs_f64());
            self.checkpoint_version.set(checkpoint.version as i64);
            self.logged_changes.set(checkpoint.logged_changes as i64);
        }
        for (participant, record) in &status.participants {
            let labels = ParticipantLabels {
                participant: participant.clone(),
            };
            self.participant_uploads
                .get_or_create(&labels)
                .set(record.uploads as i64);
            self.participant_epsilon
                .get_or_create(&labels)
                .set(record.epsilon_spent);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state((metrics, store));
    info!(%address, "metrics endpoint listening at /metrics");
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(error) = &result {
        warn!(%address, %error, "metrics endpoint failed");
    }
    result
}

async fn scrape(State((metrics, store)): State<(Arc<Metrics>, Arc<Store>)>) -> impl IntoResponse {
    let text = metrics.render(&store);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ModelInfo, Upload};
    use dssgd_common::sparse::SparseSlice;

    #[test]
    fn render_reports_counters_and_store_values() {
        let store = Store::new();
        let model = ModelInfo {
            name: "toy".into(),
            parameter_count: 4,
            layout_hash: "abc".into(),
        };
        store.join("p1", &model, Some(vec![0.0; 4])).unwrap();
        store
            .apply(&Upload {
                participant: "p1".into(),
                upload_id: 1,
                base_version: 0,
                changes: crate::store::Changes::Sparse(SparseSlice {
                    indices: vec![0, 2],
                    values: vec![0.1, 0.2],
                }),
                epsilon: 0.5,
                encoded_bytes: 0,
            })
            .unwrap();
        let metrics = Metrics::new();
        metrics.call("UploadGradients", true);
        metrics.call("UploadGradients", false);
        metrics.rejection("UploadGradients", "out_of_bound");
        metrics.upload(2, 13, 3);
        metrics.download(4, 16);

        let text = metrics.render(&store);
        for line in [
            "dssgd_calls_total{rpc=\"UploadGradients\",outcome=\"ok\"} 1",
            "dssgd_calls_total{rpc=\"UploadGradients\",outcome=\"rejected\"} 1",
            "dssgd_rejections_total{rpc=\"UploadGradients\",reason=\"out_of_bound\"} 1",
            "dssgd_uploaded_parameters_total 2",
            "dssgd_uploaded_bytes_total 13",
            "dssgd_downloaded_parameters_total 4",
            "dssgd_version 1",
            "dssgd_participants 1",
            "dssgd_total_updates 2",
            "dssgd_participant_uploads{participant=\"p1\"} 1",
            "dssgd_participant_epsilon_spent{participant=\"p1\"} 0.5",
            "dssgd_upload_staleness_versions_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
