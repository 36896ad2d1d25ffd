//! The global parameters, their update counters, the version and the
//! per-participant records, behind one lock so that an upload is applied
//! atomically with respect to downloads.
//!
//! A store is in memory only ([`Store::new`]) or durable
//! ([`Store::open_durable`]). A durable store commits every change to its
//! database before it changes the memory, so what a call returns is on disk.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use dssgd_common::config::Ordering;
use dssgd_common::select::{fraction_count, top_k_by_key};
use dssgd_common::sparse::{
    IndexEncoding, SparseError, SparseSlice, ValueEncoding, decode_values_into, encode_f64_as_f32,
    encode_indices_with, encode_values,
};
use parking_lot::{Mutex, RwLock, RwLockUpgradableReadGuard};

use crate::durable::{DurableOptions, DurableState, StateError};
use crate::error::ServerError;

/// Identity of the served model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// Architecture name.
    pub name: String,
    /// Number of scalar parameters.
    pub parameter_count: u64,
    /// Hash of the parameter names, shapes and order.
    pub layout_hash: String,
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} parameters, layout {})",
            self.name, self.parameter_count, self.layout_hash
        )
    }
}

/// What the server keeps about one participant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParticipantRecord {
    /// Uploads applied.
    pub uploads: u64,
    /// Parameter changes applied over all uploads.
    pub parameters_uploaded: u64,
    /// Largest applied upload id (0 before the first upload).
    pub last_upload_id: u64,
    /// Sum of the privacy spend declared by the applied uploads.
    pub epsilon_spent: f64,
    /// Applied uploads that declared a positive spend.
    pub private_uploads: u64,
}

/// A validated upload, ready to apply.
#[derive(Clone, Debug)]
pub struct Upload {
    /// The uploading participant.
    pub participant: String,
    /// Strictly increasing per participant; a repeat is a retry.
    pub upload_id: u64,
    /// The version the participant last downloaded.
    pub base_version: u64,
    /// Changes to add.
    pub changes: Changes,
    /// Privacy spend the participant declares for this upload (0 without
    /// noise).
    pub epsilon: f64,
    /// Size of the changes as received (indices and values). The store adds
    /// it to its upload bytes when it advances the version.
    pub encoded_bytes: u64,
}

/// The parameter changes of a validated upload.
#[derive(Clone, Debug, PartialEq)]
pub enum Changes {
    /// Changes of some parameters: sorted unique indices and their values.
    Sparse(SparseSlice),
    /// One change for every parameter, index 0 first. A dense upload keeps
    /// no index list and no decoded copy, so it is checked and applied in
    /// single passes over its payload.
    Dense(DenseValues),
}

/// The values of a dense upload, one per parameter, decoded and checked,
/// with their largest magnitude.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseValues {
    values: Vec<f32>,
    largest: f32,
}

impl DenseValues {
    /// Decodes a dense payload in `encoding` and checks it: exactly
    /// `parameter_count` finite values.
    pub fn decode(
        payload: &[u8],
        parameter_count: u64,
        encoding: ValueEncoding,
    ) -> Result<Self, SparseError> {
        Self::decode_into(payload, parameter_count, encoding, Vec::new())
    }

    /// Decodes like [`DenseValues::decode`] into `buffer`, whose allocation
    /// is reused when it is large enough ([`DenseValues::into_buffer`] gives
    /// it back).
    pub fn decode_into(
        payload: &[u8],
        parameter_count: u64,
        encoding: ValueEncoding,
        mut buffer: Vec<f32>,
    ) -> Result<Self, SparseError> {
        decode_values_into(payload, encoding, &mut buffer)?;
        if buffer.len() as u64 != parameter_count {
            return Err(SparseError::DenseLength {
                values: buffer.len(),
                parameter_count,
            });
        }
        // Magnitude bit patterns order like the magnitudes, with infinity
        // and NaN highest, so one integer pass finds the largest and checks
        // that every value is finite.
        let largest_bits = buffer
            .iter()
            .fold(0u32, |largest, v| largest.max(v.to_bits() & 0x7fff_ffff));
        if largest_bits >= f32::INFINITY.to_bits() {
            let (index, &value) = buffer
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
                .expect("a value that is not finite exists");
            return Err(SparseError::NonFiniteValue {
                index: index as u64,
                value,
            });
        }
        Ok(Self {
            values: buffer,
            largest: f32::from_bits(largest_bits),
        })
    }

    /// Returns the decoded values' buffer, for a later
    /// [`DenseValues::decode_into`].
    pub fn into_buffer(self) -> Vec<f32> {
        self.values
    }

    /// Wraps `values`, one per parameter.
    pub fn from_values(values: Vec<f32>) -> Self {
        // Folds over a slice vectorise, where a search with an early exit
        // does not.
        let largest = values.iter().fold(0f32, |largest, v| largest.max(v.abs()));
        Self { values, largest }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Returns whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Returns the values, index 0 first.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
}

impl Changes {
    /// Number of changed parameters.
    pub fn len(&self) -> usize {
        match self {
            Changes::Sparse(slice) => slice.len(),
            Changes::Dense(values) => values.len(),
        }
    }

    /// Returns whether no parameter changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the largest magnitude of a change, 0 for none.
    pub fn largest_magnitude(&self) -> f64 {
        let value = match self {
            Changes::Sparse(slice) => slice
                .values
                .iter()
                .fold(0f32, |largest, v| largest.max(v.abs())),
            Changes::Dense(values) => values.largest,
        };
        f64::from(value)
    }

    /// Returns the changes as a sparse slice, in which a dense upload lists
    /// every index.
    pub fn to_sparse(&self) -> Cow<'_, SparseSlice> {
        match self {
            Changes::Sparse(slice) => Cow::Borrowed(slice),
            Changes::Dense(values) => Cow::Owned(SparseSlice {
                indices: (0..values.len() as u32).collect(),
                values: values.values.clone(),
            }),
        }
    }

    /// Rejects the first value outside `[-gamma, gamma]`, with the bound
    /// rounded as `encoding` rounds values.
    pub fn check_bound(&self, gamma: f64, encoding: ValueEncoding) -> Result<(), SparseError> {
        match self {
            Changes::Sparse(slice) => slice.check_bound_with(gamma, encoding),
            Changes::Dense(values) => {
                let limit = encoding.encoded_bound(gamma);
                if values.largest <= limit {
                    return Ok(());
                }
                let (index, &value) = values
                    .values
                    .iter()
                    .enumerate()
                    .find(|(_, value)| value.abs() > limit)
                    .expect("a value above the bound exists");
                Err(SparseError::OutOfBound {
                    index: index as u64,
                    value,
                    gamma,
                })
            }
        }
    }
}

/// The smallest magnitude that rounds to infinity in f32: halfway between
/// f32::MAX and 2^128. Exact in f64.
const F32_OVERFLOW: f64 = f32::MAX as f64 + f64::from_bits((1023 + 103) << 52);

/// Returns the largest magnitude in `values`, 0 for none.
fn largest_magnitude(values: &[f64]) -> f64 {
    values.iter().fold(0f64, |largest, v| largest.max(v.abs()))
}

/// Finds the first change that would take its parameter beyond the f32
/// range, as `(index, value, sum)`.
fn first_overflow(parameters: &[f64], changes: &Changes) -> Option<(usize, f32, f64)> {
    let overflows = |sum: f64| sum.is_nan() || sum.abs() >= F32_OVERFLOW;
    match changes {
        Changes::Sparse(slice) => slice
            .indices
            .iter()
            .zip(&slice.values)
            .map(|(&index, &value)| {
                let sum = parameters[index as usize] + f64::from(value);
                (index as usize, value, sum)
            })
            .find(|&(_, _, sum)| overflows(sum)),
        Changes::Dense(values) => {
            // A pass without early exit vectorises; the position is only
            // searched for when a sum overflows.
            let any = parameters
                .iter()
                .zip(values.values())
                .fold(false, |any, (&p, &v)| any | overflows(p + f64::from(v)));
            if !any {
                return None;
            }
            parameters
                .iter()
                .zip(values.values())
                .enumerate()
                .map(|(index, (&p, &v))| (index, v, p + f64::from(v)))
                .find(|&(_, _, sum)| overflows(sum))
        }
    }
}

/// Result of applying an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Version after the upload (the current one for a duplicate).
    pub version: u64,
    /// False when the upload id was already applied.
    pub applied: bool,
}

/// Parameters returned by a download.
#[derive(Clone, Debug, PartialEq)]
pub struct Download {
    /// Version the parameters were read at.
    pub version: u64,
    /// Selected indices, increasing; `None` when every parameter is included.
    pub indices: Option<Vec<u32>>,
    /// One value per selected index (or per parameter when dense).
    pub values: Vec<f32>,
}

/// Parameters returned by a download, encoded for the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedDownload {
    /// Version the parameters were read at.
    pub version: u64,
    /// Number of parameters sent.
    pub count: usize,
    /// Encoded indices; `None` when every parameter is included.
    pub indices: Option<Vec<u8>>,
    /// Little-endian f32 values, one per selected index (or per parameter).
    pub values: Vec<u8>,
}

/// The global state: empty until the first participant joins with initial
/// parameters.
///
/// Changes (joins and uploads) take the state's upgradable read lock, which
/// one caller holds at a time while downloads keep reading, commit to the
/// database if the store is durable, and only then take the write lock to
/// change the memory. So a download never sees a change that is not durable.
#[derive(Debug, Default)]
pub struct Store {
    inner: RwLock<Inner>,
    persistence: Mutex<Persistence>,
    /// Largest accepted distance between an upload's base version and the
    /// current version; 0 means no limit.
    max_staleness: AtomicU64,
}

/// Storage of the state besides memory.
#[derive(Debug, Default)]
enum Persistence {
    #[default]
    Memory,
    Durable(DurableState),
}

/// Result of [`Store::open_durable`]: what it found and restored.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreReport {
    /// The database file.
    pub path: PathBuf,
    /// Whether the database was created by this open.
    pub created: bool,
    /// The served model, if a participant had joined.
    pub model: Option<ModelInfo>,
    /// The restored version.
    pub version: u64,
    /// Number of restored participants.
    pub participants: usize,
    /// Version of the last checkpoint in the database.
    pub checkpoint_version: u64,
    /// Uploads replayed from the log on top of the checkpoint.
    pub replayed_uploads: u64,
}

#[derive(Debug, Default)]
struct Inner {
    model: Option<ModelInfo>,
    /// Global parameters. Stored as f64 so that millions of small f32
    /// changes accumulate without the rounding drift of an f32 sum.
    parameters: Vec<f64>,
    /// Per-parameter update counters.
    counters: Vec<u64>,
    /// An upper bound of the largest parameter magnitude. While it plus an
    /// upload's largest change stays below the f32 overflow threshold, no
    /// sum can overflow, and the upload skips the check of every sum.
    magnitude_bound: f64,
    version: u64,
    participants: BTreeMap<String, ParticipantRecord>,
    /// Participants in the order they first joined.
    join_order: Vec<String>,
    /// Encoded bytes of the uploads applied since the process started.
    uploaded_bytes: u64,
}

/// A snapshot of the whole state, for status reports and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreStatus {
    /// The served model, if initialised.
    pub model: Option<ModelInfo>,
    /// Current version.
    pub version: u64,
    /// Per-participant records, sorted by identifier.
    pub participants: BTreeMap<String, ParticipantRecord>,
    /// Sum of all update counters.
    pub total_updates: u64,
    /// Encoded bytes of the uploads applied since the process started,
    /// counted with the same uploads as `version`.
    pub uploaded_bytes: u64,
}

impl Store {
    /// Creates an empty store that keeps its state in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the durable state in `dir` (created if missing) and restores
    /// the acknowledged state from it. A damaged database is reported, not
    /// replaced. `ordering` must be the one the state was created with.
    pub fn open_durable(
        dir: &Path,
        ordering: Ordering,
        options: DurableOptions,
    ) -> Result<(Self, RestoreReport), StateError> {
        let (durable, restored, created) = DurableState::open(dir, ordering, options)?;
        let report = RestoreReport {
            path: durable.path().to_path_buf(),
            created,
            model: restored.model.clone(),
            version: restored.version,
            participants: restored.participants.len(),
            checkpoint_version: restored.checkpoint_version,
            replayed_uploads: restored.replayed_uploads,
        };
        let join_order = restored
            .participants
            .iter()
            .map(|(id, _)| id.clone())
            .collect();
        let inner = Inner {
            model: restored.model,
            magnitude_bound: largest_magnitude(&restored.parameters),
            parameters: restored.parameters,
            counters: restored.counters,
            version: restored.version,
            participants: restored.participants.into_iter().collect(),
            join_order,
            uploaded_bytes: 0,
        };
        let store = Self {
            inner: RwLock::new(inner),
            persistence: Mutex::new(Persistence::Durable(durable)),
            max_staleness: AtomicU64::new(0),
        };
        Ok((store, report))
    }

    /// Rejects uploads whose base version is more than `max` versions behind
    /// the current version; `None` (the default) and `Some(0)` accept any
    /// base version. A repeated upload id is acknowledged as before, however
    /// stale.
    pub fn set_max_staleness(&self, max: Option<u64>) {
        self.max_staleness
            .store(max.unwrap_or(0), AtomicOrdering::Relaxed);
    }

    /// Returns whether the state survives a restart.
    pub fn is_durable(&self) -> bool {
        matches!(*self.persistence.lock(), Persistence::Durable(_))
    }

    /// Writes a final checkpoint and closes the database of a durable store,
    /// after the change in progress, if any. Later changes are rejected as
    /// unavailable. Does nothing for an in-memory store.
    pub fn close(&self) -> Result<(), StateError> {
        // The upgradable lock waits for a change that is being committed.
        let inner = self.inner.upgradable_read();
        match &mut *self.persistence.lock() {
            Persistence::Durable(durable) => {
                // A final checkpoint, so that the next start replays nothing.
                durable.checkpoint(&inner.parameters, &inner.counters, inner.version)?;
                durable.close()
            }
            Persistence::Memory => Ok(()),
        }
    }

    /// Returns the durable state's checkpoint status, or `None` for an
    /// in-memory store.
    pub fn checkpoint_status(&self) -> Option<crate::durable::CheckpointStatus> {
        match &*self.persistence.lock() {
            Persistence::Durable(durable) => Some(durable.checkpoint_status()),
            Persistence::Memory => None,
        }
    }

    /// Participants in the order they first joined.
    pub fn join_order(&self) -> Vec<String> {
        self.inner.read().join_order.clone()
    }

    /// The served model, if any participant has initialised the server.
    pub fn model(&self) -> Option<ModelInfo> {
        self.inner.read().model.clone()
    }

    /// Registers `participant` for `model`, initialising the global
    /// parameters from `initial` when the store is empty. Returns the
    /// participant's record, the current version and whether this call
    /// initialised the parameters. Rejoining keeps the existing record.
    pub fn join(
        &self,
        participant: &str,
        model: &ModelInfo,
        initial: Option<Vec<f32>>,
    ) -> Result<(ParticipantRecord, u64, bool), ServerError> {
        let inner = self.inner.upgradable_read();
        let initial_parameters = match &inner.model {
            Some(served) if served != model => {
                return Err(ServerError::ModelMismatch {
                    participant: model.to_string(),
                    server: served.to_string(),
                });
            }
            Some(_) => None,
            None => {
                let values = initial.ok_or(ServerError::MissingInitialParameters)?;
                debug_assert_eq!(values.len() as u64, model.parameter_count);
                Some(values.into_iter().map(f64::from).collect::<Vec<f64>>())
            }
        };
        let known = inner.participants.get(participant).cloned();
        if (initial_parameters.is_some() || known.is_none())
            && let Persistence::Durable(durable) = &mut *self.persistence.lock()
        {
            let initial = initial_parameters
                .as_deref()
                .map(|parameters| (model, parameters));
            let position = inner.join_order.len() as u64;
            let new_participant = known.is_none().then_some((participant, position));
            durable.record_join(initial, new_participant)?;
        }

        let mut inner = RwLockUpgradableReadGuard::upgrade(inner);
        let initialized = initial_parameters.is_some();
        if let Some(parameters) = initial_parameters {
            inner.counters = vec![0; parameters.len()];
            inner.magnitude_bound = largest_magnitude(&parameters);
            inner.parameters = parameters;
            inner.model = Some(model.clone());
        }
        if known.is_none() {
            inner
                .participants
                .insert(participant.to_string(), ParticipantRecord::default());
            inner.join_order.push(participant.to_string());
        }
        Ok((known.unwrap_or_default(), inner.version, initialized))
    }

    /// Returns whether `participant` has joined.
    pub fn is_registered(&self, participant: &str) -> bool {
        self.inner.read().participants.contains_key(participant)
    }

    /// Current version.
    pub fn version(&self) -> u64 {
        self.inner.read().version
    }

    /// Applies a validated upload atomically: adds every value, bumps each
    /// touched counter and the version, and records the upload id. A repeat
    /// of an applied upload id changes nothing. A durable store commits the
    /// upload before it applies it in memory, and a failed commit leaves the
    /// state unchanged.
    pub fn apply(&self, upload: &Upload) -> Result<ApplyOutcome, ServerError> {
        let inner = self.inner.upgradable_read();
        let version = inner.version;
        if upload.base_version > version {
            return Err(ServerError::FutureVersion {
                base_version: upload.base_version,
                current_version: version,
            });
        }
        let Some(record) = inner.participants.get(&upload.participant) else {
            return Err(ServerError::UnknownParticipant(upload.participant.clone()));
        };
        if upload.upload_id <= record.last_upload_id {
            return Ok(ApplyOutcome {
                version,
                applied: false,
            });
        }
        let max_staleness = self.max_staleness.load(AtomicOrdering::Relaxed);
        let behind = version - upload.base_version;
        if max_staleness > 0 && behind > max_staleness {
            return Err(ServerError::StaleVersion {
                base_version: upload.base_version,
                current_version: version,
                behind,
                max_staleness,
            });
        }
        // Parameters are sent as f32, so a sum beyond its range would reach
        // every participant as infinity.
        let largest_change = upload.changes.largest_magnitude();
        // Compared with f32::MAX rather than the overflow threshold, so that
        // rounding of the f64 sums cannot reach the threshold unchecked.
        let checked = inner.magnitude_bound + largest_change >= f64::from(f32::MAX);
        if checked
            && let Some((index, value, sum)) = first_overflow(&inner.parameters, &upload.changes)
        {
            return Err(ServerError::InvalidField {
                field: "changes.values",
                reason: format!(
                    "adding {value} to parameter {index} gives {sum:e}, beyond the f32 range; bound the changes with a smaller gamma"
                ),
            });
        }
        let mut record = record.clone();
        record.uploads += 1;
        record.parameters_uploaded += upload.changes.len() as u64;
        record.last_upload_id = upload.upload_id;
        record.epsilon_spent += upload.epsilon;
        if upload.epsilon > 0.0 {
            record.private_uploads += 1;
        }
        if let Persistence::Durable(durable) = &mut *self.persistence.lock() {
            durable.record_upload(
                &inner.parameters,
                &inner.counters,
                version,
                &upload.participant,
                &record,
                &upload.changes.to_sparse(),
            )?;
        }

        let mut inner = RwLockUpgradableReadGuard::upgrade(inner);
        let Inner {
            parameters,
            counters,
            ..
        } = &mut *inner;
        match &upload.changes {
            Changes::Sparse(slice) => {
                for (&index, &value) in slice.indices.iter().zip(&slice.values) {
                    parameters[index as usize] += f64::from(value);
                    counters[index as usize] += 1;
                }
            }
            Changes::Dense(values) => {
                for ((parameter, counter), &value) in parameters
                    .iter_mut()
                    .zip(counters.iter_mut())
                    .zip(values.values())
                {
                    *parameter += f64::from(value);
                    *counter += 1;
                }
            }
        }
        // Near the threshold the bound is made exact again, so that it
        // does not stay above it after the parameters shrink.
        inner.magnitude_bound = if checked {
            largest_magnitude(&inner.parameters)
        } else {
            inner.magnitude_bound + largest_change
        };
        inner.version += 1;
        inner.uploaded_bytes += upload.encoded_bytes;
        inner
            .participants
            .insert(upload.participant.clone(), record);
        Ok(ApplyOutcome {
            version: inner.version,
            applied: true,
        })
    }

    /// Reads the `ceil(theta_d * n)` parameters with the largest update
    /// counters (ties broken by the lower index), or all of them, together
    /// with the version they were read at.
    pub fn download(&self, theta_d: f64) -> Result<Download, ServerError> {
        let inner = self.inner.read();
        let (indices, values) = match select_for_download(&inner, theta_d)? {
            Selected::All => {
                let values = inner.parameters.iter().map(|&v| v as f32).collect();
                (None, values)
            }
            Selected::Top { indices, values } => (Some(indices), values),
        };
        Ok(Download {
            version: inner.version,
            indices,
            values,
        })
    }

    /// Reads the same parameters as [`Store::download`] and encodes them
    /// for the wire: values as f32, indices in `index_encoding`. The lock
    /// is released before a sparse selection is encoded.
    pub fn download_encoded(
        &self,
        theta_d: f64,
        index_encoding: IndexEncoding,
    ) -> Result<EncodedDownload, ServerError> {
        let inner = self.inner.read();
        let version = inner.version;
        match select_for_download(&inner, theta_d)? {
            Selected::All => Ok(EncodedDownload {
                version,
                count: inner.parameters.len(),
                indices: None,
                values: encode_f64_as_f32(&inner.parameters),
            }),
            Selected::Top { indices, values } => {
                drop(inner);
                Ok(EncodedDownload {
                    version,
                    count: indices.len(),
                    indices: Some(encode_indices_with(&indices, index_encoding)),
                    values: encode_values(&values),
                })
            }
        }
    }

    /// A copy of every global parameter as f32, with the version.
    pub fn parameters(&self) -> (Vec<f32>, u64) {
        let inner = self.inner.read();
        (
            inner.parameters.iter().map(|&v| v as f32).collect(),
            inner.version,
        )
    }

    /// Returns a copy of the update counters.
    pub fn counters(&self) -> Vec<u64> {
        self.inner.read().counters.clone()
    }

    /// Returns a consistent summary of the state.
    pub fn status(&self) -> StoreStatus {
        let inner = self.inner.read();
        StoreStatus {
            model: inner.model.clone(),
            version: inner.version,
            participants: inner.participants.clone(),
            total_updates: inner.counters.iter().sum(),
            uploaded_bytes: inner.uploaded_bytes,
        }
    }
}

/// Parameters a download returns.
enum Selected {
    /// Every parameter, read from the store in place.
    All,
    /// The most-updated parameters, ascending by index, as f32.
    Top { indices: Vec<u32>, values: Vec<f32> },
}

/// Selects the `ceil(theta_d * n)` parameters with the largest update
/// counters, ties broken by the lower index.
fn select_for_download(inner: &Inner, theta_d: f64) -> Result<Selected, ServerError> {
    if inner.model.is_none() {
        return Err(ServerError::Uninitialized);
    }
    let n = inner.parameters.len();
    let k = fraction_count(theta_d, n);
    if k == n {
        return Ok(Selected::All);
    }
    let indices = top_k_by_key(n, k, |i| inner.counters[i]);
    let values = indices
        .iter()
        .map(|&i| inner.parameters[i as usize] as f32)
        .collect();
    Ok(Selected::Top { indices, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(n: u64) -> ModelInfo {
        ModelInfo {
            name: "toy".into(),
            parameter_count: n,
            layout_hash: "abc".into(),
        }
    }

    fn joined_store(initial: Vec<f32>) -> Store {
        let store = Store::new();
        let n = initial.len() as u64;
        store.join("p1", &model(n), Some(initial)).unwrap();
        store
    }

    fn upload(id: u64, indices: Vec<u32>, values: Vec<f32>) -> Upload {
        let encoded_bytes = 4 * values.len() as u64;
        Upload {
            participant: "p1".into(),
            upload_id: id,
            base_version: 0,
            changes: Changes::Sparse(SparseSlice { indices, values }),
            epsilon: 0.0,
            encoded_bytes,
        }
    }

    #[test]
    fn declared_privacy_spend_is_added_once_per_upload_id() {
        let store = joined_store(vec![0.0; 4]);
        let mut private = upload(1, vec![0], vec![0.5]);
        private.epsilon = 0.25;
        store.apply(&private).unwrap();
        // A retry of the same upload id adds nothing.
        store.apply(&private).unwrap();
        store.apply(&upload(2, vec![1], vec![0.5])).unwrap();
        let mut second = upload(3, vec![2], vec![0.5]);
        second.epsilon = 0.5;
        store.apply(&second).unwrap();
        let record = &store.status().participants["p1"];
        assert_eq!(record.epsilon_spent, 0.75);
        assert_eq!(record.private_uploads, 2);
        assert_eq!(record.uploads, 3);
    }

    #[test]
    fn first_join_initialises_and_later_joins_keep_parameters() {
        let store = Store::new();
        let (_, version, initialized) = store
            .join("p1", &model(3), Some(vec![1.0, 2.0, 3.0]))
            .unwrap();
        assert!(initialized);
        assert_eq!(version, 0);
        let (_, _, initialized) = store
            .join("p2", &model(3), Some(vec![9.0, 9.0, 9.0]))
            .unwrap();
        assert!(!initialized);
        assert_eq!(store.parameters().0, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn join_with_other_model_is_rejected() {
        let store = joined_store(vec![0.0; 3]);
        let other = ModelInfo {
            layout_hash: "def".into(),
            ..model(3)
        };
        let error = store.join("p2", &other, None).unwrap_err();
        assert!(matches!(error, ServerError::ModelMismatch { .. }));
        let text = error.to_string();
        assert!(
            text.contains("layout def") && text.contains("layout abc"),
            "{text}"
        );
        assert!(!store.is_registered("p2"));
    }

    #[test]
    fn upload_adds_values_and_counts() {
        let store = joined_store(vec![1.0, 1.0, 1.0, 1.0]);
        let outcome = store
            .apply(&upload(1, vec![0, 2], vec![0.5, -0.25]))
            .unwrap();
        assert_eq!(
            outcome,
            ApplyOutcome {
                version: 1,
                applied: true
            }
        );
        assert_eq!(store.parameters().0, vec![1.5, 1.0, 0.75, 1.0]);
        assert_eq!(store.counters(), vec![1, 0, 1, 0]);
    }

    #[test]
    fn repeated_upload_id_is_applied_once() {
        let store = joined_store(vec![0.0; 2]);
        store.apply(&upload(1, vec![1], vec![0.5])).unwrap();
        let again = store.apply(&upload(1, vec![1], vec![0.5])).unwrap();
        assert_eq!(
            again,
            ApplyOutcome {
                version: 1,
                applied: false
            }
        );
        assert_eq!(store.parameters().0, vec![0.0, 0.5]);
        let status = store.status();
        assert_eq!(status.participants["p1"].uploads, 1);
        assert_eq!(status.uploaded_bytes, 4, "a retry's bytes are not counted");
        store.apply(&upload(2, vec![0, 1], vec![0.5, 0.5])).unwrap();
        let status = store.status();
        assert_eq!((status.version, status.uploaded_bytes), (2, 12));
    }

    #[test]
    fn future_base_version_is_rejected() {
        let store = joined_store(vec![0.0; 2]);
        let mut bad = upload(1, vec![0], vec![0.1]);
        bad.base_version = 5;
        assert!(matches!(
            store.apply(&bad),
            Err(ServerError::FutureVersion { .. })
        ));
        assert_eq!(store.version(), 0);
    }

    #[test]
    fn download_takes_most_updated_with_low_index_ties() {
        let store = joined_store(vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        store
            .apply(&upload(1, vec![1, 3, 4], vec![0.0, 0.0, 0.0]))
            .unwrap();
        store.apply(&upload(2, vec![3], vec![0.0])).unwrap();
        let top2 = store.download(0.4).unwrap();
        assert_eq!(top2.indices, Some(vec![1, 3]));
        assert_eq!(top2.values, vec![1.0, 3.0]);
        assert_eq!(top2.version, 2);
        let top3 = store.download(0.6).unwrap();
        assert_eq!(top3.indices, Some(vec![1, 3, 4]));
        let all = store.download(1.0).unwrap();
        assert_eq!(all.indices, None);
        assert_eq!(all.values.len(), 5);
        let none = store.download(0.0).unwrap();
        assert_eq!(none.indices, Some(vec![]));
    }

    #[test]
    fn sums_round_to_infinity_from_half_an_ulp_above_f32_max() {
        let max = f64::from(f32::MAX);
        let half_ulp = f64::from_bits((1023 + 103) << 52);
        let parameters = [max, max, -max];
        let sparse = |index: u32, value: f32| {
            Changes::Sparse(SparseSlice {
                indices: vec![index],
                values: vec![value],
            })
        };
        // Below the midpoint the sum still rounds to f32::MAX.
        let below = (half_ulp * 0.99) as f32;
        assert_eq!(first_overflow(&parameters, &sparse(0, below)), None);
        assert!(((max + f64::from(below)) as f32).is_finite());
        let at = half_ulp as f32;
        assert_eq!(
            first_overflow(&parameters, &sparse(1, at)),
            Some((1, at, max + half_ulp))
        );
        assert!(((max + half_ulp) as f32).is_infinite());
        let dense = Changes::Dense(DenseValues::from_values(vec![0.0, 0.0, -at]));
        assert_eq!(
            first_overflow(&parameters, &dense),
            Some((2, -at, -max - half_ulp))
        );
        assert_eq!(
            first_overflow(
                &parameters,
                &Changes::Dense(DenseValues::from_values(vec![0.0; 3]))
            ),
            None
        );
    }

    #[test]
    fn dense_upload_adds_every_value() {
        let store = joined_store(vec![1.0, 2.0, 3.0]);
        let dense = Upload {
            changes: Changes::Dense(DenseValues::from_values(vec![0.5, -0.5, 0.25])),
            ..upload(1, Vec::new(), Vec::new())
        };
        store.apply(&dense).unwrap();
        assert_eq!(store.parameters().0, vec![1.5, 1.5, 3.25]);
        assert_eq!(store.counters(), vec![1, 1, 1]);
        let encoded = store.download_encoded(1.0, IndexEncoding::Rice).unwrap();
        assert_eq!(encoded.indices, None);
        assert_eq!(encoded.values, encode_values(&[1.5, 1.5, 3.25]));
    }

    #[test]
    fn dense_payload_is_checked_and_measured() {
        let payload = encode_values(&[0.5, -0.75, 0.125]);
        let dense = DenseValues::decode(&payload, 3, ValueEncoding::F32).unwrap();
        assert_eq!(dense.values(), [0.5, -0.75, 0.125]);
        assert_eq!(Changes::Dense(dense).largest_magnitude(), 0.75);
        assert_eq!(
            DenseValues::decode(&payload, 4, ValueEncoding::F32),
            Err(SparseError::DenseLength {
                values: 3,
                parameter_count: 4
            })
        );
        assert_eq!(
            DenseValues::decode(&payload[1..], 3, ValueEncoding::F32),
            Err(SparseError::RaggedValues {
                bytes: 11,
                width: 4
            })
        );
        let with_nan = encode_values(&[0.5, f32::NAN, 0.125]);
        let error = DenseValues::decode(&with_nan, 3, ValueEncoding::F32).unwrap_err();
        assert!(
            matches!(error, SparseError::NonFiniteValue { index: 1, .. }),
            "{error}"
        );
        let half = dssgd_common::sparse::encode_values_with(&[0.5, -0.25], ValueEncoding::F16);
        let dense = DenseValues::decode(&half, 2, ValueEncoding::F16).unwrap();
        assert_eq!(dense.values(), [0.5, -0.25]);
    }

    #[test]
    fn dense_decode_finds_infinities_and_largest() {
        for (values, index) in [
            (vec![0.5, f32::NEG_INFINITY, 0.125], 1),
            (vec![0.5, 0.25, f32::INFINITY], 2),
            (vec![-f32::NAN, 0.25, 0.125], 0),
        ] {
            let error =
                DenseValues::decode(&encode_values(&values), 3, ValueEncoding::F32).unwrap_err();
            assert!(
                matches!(error, SparseError::NonFiniteValue { index: at, .. } if at == index),
                "{values:?} gave {error:?}"
            );
        }
        let values = [-0.0, -f32::MAX, f32::MIN_POSITIVE / 2.0];
        let dense = DenseValues::decode(&encode_values(&values), 3, ValueEncoding::F32).unwrap();
        assert_eq!(
            Changes::Dense(dense).largest_magnitude(),
            f64::from(f32::MAX)
        );
        let zeros =
            DenseValues::decode(&encode_values(&[-0.0, 0.0]), 2, ValueEncoding::F32).unwrap();
        assert_eq!(Changes::Dense(zeros).largest_magnitude(), 0.0);
    }

    #[test]
    fn dense_bound_check_names_the_first_value_outside() {
        let dense = Changes::Dense(DenseValues::from_values(vec![0.1, -0.3, 0.4]));
        assert!(dense.check_bound(0.5, ValueEncoding::F32).is_ok());
        assert_eq!(
            dense.check_bound(0.2, ValueEncoding::F32),
            Err(SparseError::OutOfBound {
                index: 1,
                value: -0.3,
                gamma: 0.2
            })
        );
    }

    #[test]
    fn encoded_download_matches_the_plain_one() {
        let store = joined_store(vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        store
            .apply(&upload(1, vec![1, 3, 4], vec![0.5, 0.5, 0.5]))
            .unwrap();
        for encoding in [IndexEncoding::DeltaVarint, IndexEncoding::Rice] {
            let plain = store.download(0.6).unwrap();
            let encoded = store.download_encoded(0.6, encoding).unwrap();
            let indices = plain.indices.unwrap();
            assert_eq!(encoded.version, plain.version);
            assert_eq!(encoded.count, indices.len());
            assert_eq!(
                encoded.indices,
                Some(encode_indices_with(&indices, encoding))
            );
            assert_eq!(encoded.values, encode_values(&plain.values));
        }
    }

    #[test]
    fn download_before_initialisation_fails() {
        assert!(matches!(
            Store::new().download(1.0),
            Err(ServerError::Uninitialized)
        ));
    }

    #[test]
    fn concurrent_readers_see_whole_uploads() {
        // Every upload adds 1 to all parameters, so a reader that saw half of
        // one would find two different values in one download.
        let store = std::sync::Arc::new(joined_store(vec![0.0; 1000]));
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for id in 1..=200 {
                    store
                        .apply(&upload(id, (0..1000).collect(), vec![1.0; 1000]))
                        .unwrap();
                }
            })
        };
        for _ in 0..200 {
            let download = store.download(1.0).unwrap();
            let first = download.values[0];
            assert!(download.values.iter().all(|&v| v == first));
            assert_eq!(first as u64, download.version);
        }
        writer.join().unwrap();
    }
}
