//! The global parameters, their update counters, the version and the
//! per-participant records, behind one lock so that an upload is applied
//! atomically with respect to downloads.

use std::collections::BTreeMap;

use dssgd_common::select::{fraction_count, top_k_by_key};
use dssgd_common::sparse::SparseSlice;
use parking_lot::RwLock;

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
    /// Changes to add: sorted unique indices and their values.
    pub changes: SparseSlice,
    /// Privacy spend the participant declares for this upload (0 without
    /// noise).
    pub epsilon: f64,
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

/// The global state: empty until the first participant joins with initial
/// parameters.
#[derive(Debug, Default)]
pub struct Store {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    model: Option<ModelInfo>,
    /// Global parameters. Stored as f64 so that millions of small f32
    /// changes accumulate without the rounding drift of an f32 sum.
    parameters: Vec<f64>,
    /// Per-parameter update counters.
    counters: Vec<u64>,
    version: u64,
    participants: BTreeMap<String, ParticipantRecord>,
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
}

impl Store {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
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
        let mut inner = self.inner.write();
        let mut initialized = false;
        match &inner.model {
            Some(served) if served != model => {
                return Err(ServerError::ModelMismatch {
                    participant: model.to_string(),
                    server: served.to_string(),
                });
            }
            Some(_) => {}
            None => {
                let values = initial.ok_or(ServerError::MissingInitialParameters)?;
                debug_assert_eq!(values.len() as u64, model.parameter_count);
                inner.parameters = values.into_iter().map(f64::from).collect();
                inner.counters = vec![0; inner.parameters.len()];
                inner.model = Some(model.clone());
                initialized = true;
            }
        }
        let record = inner
            .participants
            .entry(participant.to_string())
            .or_default()
            .clone();
        Ok((record, inner.version, initialized))
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
    /// of an applied upload id changes nothing.
    pub fn apply(&self, upload: &Upload) -> Result<ApplyOutcome, ServerError> {
        let mut inner = self.inner.write();
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

        let Inner {
            parameters,
            counters,
            ..
        } = &mut *inner;
        for (&index, &value) in upload.changes.indices.iter().zip(&upload.changes.values) {
            parameters[index as usize] += f64::from(value);
            counters[index as usize] += 1;
        }
        inner.version += 1;
        let version = inner.version;
        let record = inner
            .participants
            .get_mut(&upload.participant)
            .expect("participant presence was checked under the same lock");
        record.uploads += 1;
        record.parameters_uploaded += upload.changes.len() as u64;
        record.last_upload_id = upload.upload_id;
        record.epsilon_spent += upload.epsilon;
        if upload.epsilon > 0.0 {
            record.private_uploads += 1;
        }
        Ok(ApplyOutcome {
            version,
            applied: true,
        })
    }

    /// Reads the `ceil(theta_d * n)` parameters with the largest update
    /// counters (ties broken by the lower index), or all of them, together
    /// with the version they were read at.
    pub fn download(&self, theta_d: f64) -> Result<Download, ServerError> {
        let inner = self.inner.read();
        if inner.model.is_none() {
            return Err(ServerError::Uninitialized);
        }
        let n = inner.parameters.len();
        let k = fraction_count(theta_d, n);
        if k == n {
            let values = inner.parameters.iter().map(|&v| v as f32).collect();
            return Ok(Download {
                version: inner.version,
                indices: None,
                values,
            });
        }
        let indices = top_k_by_key(n, k, |i| inner.counters[i]);
        let values = indices
            .iter()
            .map(|&i| inner.parameters[i as usize] as f32)
            .collect();
        Ok(Download {
            version: inner.version,
            indices: Some(indices),
            values,
        })
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
        }
    }
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
        Upload {
            participant: "p1".into(),
            upload_id: id,
            base_version: 0,
            changes: SparseSlice { indices, values },
            epsilon: 0.0,
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
        assert_eq!(store.status().participants["p1"].uploads, 1);
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
