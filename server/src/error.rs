//! Domain errors of the parameter server and their one mapping to gRPC
//! status codes.

use dssgd_common::config::ConfigError;
use dssgd_common::sparse::SparseError;
use thiserror::Error;
use tonic::{Code, Status};

use crate::durable::StateError;

/// Why the server rejected a request. Every variant leaves the global
/// parameters unchanged.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A field has an invalid value (fraction, bound, identifier).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The packed slice is malformed or violates a rule (range, duplicates,
    /// counts, finiteness, bound).
    #[error("invalid slice: {0}")]
    Slice(#[from] SparseError),
    /// A required field is missing.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field is present but its value is not allowed.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// Name of the field.
        field: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// The slice has more entries than the declared upload fraction allows.
    #[error(
        "upload has {entries} entries but theta_u {theta_u} allows at most {allowed} of {parameter_count}"
    )]
    TooManyEntries {
        /// Entries sent.
        entries: usize,
        /// Declared upload fraction.
        theta_u: f64,
        /// ceil(theta_u * parameter_count).
        allowed: usize,
        /// Number of parameters.
        parameter_count: usize,
    },
    /// The declared gamma exceeds the largest bound the server accepts.
    #[error("invalid gamma {gamma}: the server accepts at most {max_gamma} (--max-gamma)")]
    GammaTooLarge {
        /// Declared gamma.
        gamma: f64,
        /// Configured limit.
        max_gamma: f64,
    },
    /// The upload id is zero.
    #[error("invalid upload id 0: upload ids start at 1")]
    ZeroUploadId,
    /// The upload claims to be based on a version the server has not reached.
    #[error("base version {base_version} is ahead of the current version {current_version}")]
    FutureVersion {
        /// Version the upload claims to build on.
        base_version: u64,
        /// The server's version.
        current_version: u64,
    },
    /// The upload builds on a version older than the staleness limit allows.
    #[error(
        "stale upload: base version {base_version} is {behind} versions behind the current version {current_version}, more than the limit of {max_staleness}; download the parameters again and train on them"
    )]
    StaleVersion {
        /// Version the upload claims to build on.
        base_version: u64,
        /// The server's version.
        current_version: u64,
        /// Versions between the two.
        behind: u64,
        /// The configured limit (--max-staleness).
        max_staleness: u64,
    },
    /// Too many calls are being served at once.
    #[error(
        "the server is overloaded: {limit} calls are already in progress (--max-concurrent-calls); retry after a short wait"
    )]
    Overloaded {
        /// The configured limit.
        limit: usize,
    },
    /// The participant uploads faster than its rate limit.
    #[error(
        "participant {participant:?} exceeded its rate limit of {rate} uploads per second (--max-uploads-per-second); retry in {:.1} s",
        1.0 / rate
    )]
    RateLimited {
        /// The participant.
        participant: String,
        /// The configured rate.
        rate: f64,
    },
    /// The participant never joined.
    #[error("unknown participant {0:?}: call Join first")]
    UnknownParticipant(String),
    /// No participant has joined yet, so there are no global parameters.
    #[error("the server holds no parameters yet: the first participant to join supplies them")]
    Uninitialized,
    /// The first joining participant sent no usable initial parameters.
    #[error(
        "the server holds no parameters yet and the join carries no dense initial parameters: the first participant must send all of them"
    )]
    MissingInitialParameters,
    /// The participant's model differs from the served one.
    #[error("model mismatch: participant has {participant}, server serves {server}")]
    ModelMismatch {
        /// The participant's model, described.
        participant: String,
        /// The server's model, described.
        server: String,
    },
    /// The upload's layout hash differs from the served one.
    #[error("layout mismatch: upload has layout {upload}, server serves layout {server}")]
    LayoutMismatch {
        /// Layout hash in the upload.
        upload: String,
        /// The server's layout hash.
        server: String,
    },
    /// An ordered mode requires the turn for this request.
    #[error("participant {participant:?} does not hold the turn: {reason}")]
    NoTurn {
        /// The participant.
        participant: String,
        /// Why the turn is not held (expired, never granted, other holder).
        reason: String,
    },
    /// The request does not apply to the configured ordering.
    #[error("turns are not used in the asynchronous ordering")]
    TurnsDisabled,
    /// The server requires client certificates, and the connection carries
    /// none that names a participant.
    #[error(
        "the connection has no client certificate with a common name; connect with the participant's certificate and key (--tls-cert, --tls-key)"
    )]
    MissingClientIdentity,
    /// The client certificate names another participant than the request.
    #[error(
        "the client certificate is for participant {certificate:?}, but the request is for {participant:?}; a participant can act only under the identifier in its certificate"
    )]
    IdentityMismatch {
        /// Common name of the client certificate.
        certificate: String,
        /// Participant identifier in the request.
        participant: String,
    },
    /// The change could not be stored durably, so it was not applied; a
    /// retry may succeed, for example after a restart of the server.
    #[error("the change was not applied because storing it failed: {0}")]
    Storage(#[from] StateError),
}

impl ServerError {
    /// Short, stable label of the rejection reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ServerError::Config(_) => "invalid_setting",
            ServerError::Slice(SparseError::DuplicateIndex { .. }) => "duplicate_index",
            ServerError::Slice(SparseError::IndexOutOfRange { .. }) => "index_out_of_range",
            ServerError::Slice(SparseError::CountMismatch { .. }) => "count_mismatch",
            ServerError::Slice(SparseError::NonFiniteValue { .. }) => "non_finite_value",
            ServerError::Slice(SparseError::OutOfBound { .. }) => "out_of_bound",
            ServerError::Slice(_) => "malformed_slice",
            ServerError::MissingField(_) => "missing_field",
            ServerError::InvalidField { .. } => "invalid_field",
            ServerError::TooManyEntries { .. } => "too_many_entries",
            ServerError::GammaTooLarge { .. } => "gamma_too_large",
            ServerError::ZeroUploadId => "zero_upload_id",
            ServerError::FutureVersion { .. } => "future_version",
            ServerError::StaleVersion { .. } => "stale_version",
            ServerError::Overloaded { .. } => "overloaded",
            ServerError::RateLimited { .. } => "rate_limited",
            ServerError::UnknownParticipant(_) => "unknown_participant",
            ServerError::Uninitialized => "uninitialized",
            ServerError::MissingInitialParameters => "missing_initial_parameters",
            ServerError::ModelMismatch { .. } => "model_mismatch",
            ServerError::LayoutMismatch { .. } => "layout_mismatch",
            ServerError::NoTurn { .. } => "no_turn",
            ServerError::TurnsDisabled => "turns_disabled",
            ServerError::MissingClientIdentity => "missing_client_identity",
            ServerError::IdentityMismatch { .. } => "identity_mismatch",
            ServerError::Storage(_) => "storage_failed",
        }
    }

    /// Returns the gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            ServerError::Config(_)
            | ServerError::Slice(_)
            | ServerError::MissingField(_)
            | ServerError::InvalidField { .. }
            | ServerError::TooManyEntries { .. }
            | ServerError::GammaTooLarge { .. }
            | ServerError::ZeroUploadId
            | ServerError::FutureVersion { .. } => Code::InvalidArgument,
            ServerError::UnknownParticipant(_) => Code::NotFound,
            ServerError::Uninitialized
            | ServerError::MissingInitialParameters
            | ServerError::ModelMismatch { .. }
            | ServerError::LayoutMismatch { .. }
            | ServerError::NoTurn { .. }
            | ServerError::TurnsDisabled => Code::FailedPrecondition,
            ServerError::MissingClientIdentity => Code::Unauthenticated,
            ServerError::IdentityMismatch { .. } => Code::PermissionDenied,
            ServerError::Storage(_) => Code::Unavailable,
            ServerError::StaleVersion { .. } => Code::FailedPrecondition,
            ServerError::Overloaded { .. } | ServerError::RateLimited { .. } => {
                Code::ResourceExhausted
            }
        }
    }
}

/// Metadata key of a rejection's stable reason (see
/// [`ServerError::reason`]), so that clients can act on the reason without
/// parsing the message.
pub const REASON_METADATA_KEY: &str = "dssgd-reason";

impl From<ServerError> for Status {
    fn from(error: ServerError) -> Self {
        let mut status = Status::new(error.code(), error.to_string());
        let reason = tonic::metadata::MetadataValue::from_static(error.reason());
        status.metadata_mut().insert(REASON_METADATA_KEY, reason);
        status
    }
}
