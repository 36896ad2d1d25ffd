//! The durable copy of the server state, in an embedded redb database
//! (`state.redb` in the state directory).
//!
//! Every change of the state is one redb write transaction, committed with
//! immediate durability and two-phase commit before the server returns from the
//! call, so an acknowledged upload survives a kill of the process at any
//! moment. Two-phase commit makes the newest commit authoritative: damage to
//! it is reported as corruption instead of being rolled back silently to the
//! commit before.
//!
//! Writing all `n` parameters per upload would cost O(n) per upload, so an
//! upload writes its own sparse changes instead, as a log entry keyed by the
//! version it creates. The global parameters and update counters are kept
//! in chunks of [`CHUNK_PARAMETERS`] parameters. Once the log holds more
//! changes than `checkpoint_factor * n`, the next upload's transaction also
//! rewrites the chunks that the logged uploads touched, from the in-memory
//! state, and empties the log (a checkpoint). A restart reads the chunks and
//! replays the log in version order with the same f64 additions, which
//! reproduces the acknowledged state bit for bit.
//!
//! Tables (format 1):
//!
//! | table | key | value |
//! |---|---|---|
//! | `numbers` | name | `format`, `chunk_parameters`, `version`, `checkpoint_version`, `parameter_count` |
//! | `text` | name | `ordering`, `model_name`, `layout_hash` |
//! | `chunks` | chunk number | f64 parameters, then u64 counters, little-endian |
//! | `log` | version | the upload's packed indices and f32 values, as on the wire |
//! | `participants` | identifier | uploads, parameters uploaded, last upload id, epsilon spent, private uploads |
//! | `join_order` | position | identifier |

mod scratch;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use dssgd_common::config::Ordering;
use dssgd_common::sparse::{SparseSlice, encode_indices, encode_values};
use redb::{
    Builder, Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError, WriteTransaction,
};
use thiserror::Error;

use crate::store::{ModelInfo, ParticipantRecord};

/// File name of the database inside the state directory.
pub const DATABASE_FILE: &str = "state.redb";

/// Parameters per stored chunk. Each chunk contains 16 bytes per parameter (an
/// f64 value and a u64 counter), so 4096 parameters make a 64 KiB value.
pub const CHUNK_PARAMETERS: usize = 4096;

/// Version of the table layout described in the module documentation.
const FORMAT: u64 = 1;

const NUMBERS: TableDefinition<'_, &str, u64> = TableDefinition::new("numbers");
const TEXT: TableDefinition<'_, &str, &str> = TableDefinition::new("text");
const CHUNKS: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("chunks");
const LOG: TableDefinition<'_, u64, (&[u8], &[u8])> = TableDefinition::new("log");
const PARTICIPANTS: TableDefinition<'_, &str, ParticipantRow> =
    TableDefinition::new("participants");
const JOIN_ORDER: TableDefinition<'_, u64, &str> = TableDefinition::new("join_order");

/// uploads, parameters_uploaded, last_upload_id, epsilon_spent, private_uploads.
type ParticipantRow = (u64, u64, u64, f64, u64);

/// Tuning of the durable state.
#[derive(Clone, Copy, Debug)]
pub struct DurableOptions {
    /// A checkpoint is written once the log contains more parameter changes
    /// than this many times the parameter count. It bounds the replay at a
    /// restart to this many full passes over the parameters. 0 writes a
    /// checkpoint with every upload, so each upload rewrites the chunks that
    /// the previous one touched.
    pub checkpoint_factor: u64,
}

impl Default for DurableOptions {
    fn default() -> Self {
        Self {
            checkpoint_factor: 4,
        }
    }
}

/// Error in opening or writing the durable state.
#[derive(Debug, Error)]
pub enum StateError {
    /// The state directory cannot be created or read.
    #[error("failed to use the state directory {path}: {error}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The state path exists but is not a directory.
    #[error(
        "the state directory {path} exists but is not a directory; pass a directory to --state-dir"
    )]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The database file exists but cannot be opened, so its content was
    /// not examined.
    #[error(
        "failed to open the state database {path}: {error}. The file was not examined: check that the server's user may read and write it and its directory, and that the file system is not mounted read-only"
    )]
    Access {
        /// The database file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The database path is a symbolic link whose target is missing.
    #[error(
        "the state database {path} is a symbolic link to {target}, which does not exist; mount or restore the target, or remove the link to start a new federation"
    )]
    DanglingLink {
        /// The database file.
        path: PathBuf,
        /// Target of the link.
        target: PathBuf,
    },
    /// Another process has the database open.
    #[error(
        "the state database {path} is in use by another process; is another server running with the same --state-dir?"
    )]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file is damaged, truncated, or not a state database.
    #[error(
        "the state database {path} is corrupt or unreadable: {detail}. The server does not start on damaged state: restore the file from a backup, or move it away to start a new federation"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The problem that redb or the format check found.
        detail: String,
    },
    /// The file is a valid state database that this server cannot serve.
    #[error("the state database {path} {detail}")]
    Incompatible {
        /// The database file.
        path: PathBuf,
        /// The mismatch.
        detail: String,
    },
    /// A commit failed; the change it carried was not applied.
    #[error("failed to write the state database {path}: {source}")]
    Write {
        /// The database file.
        path: PathBuf,
        /// redb's error.
        source: redb::Error,
    },
    /// The database is closed because the server is shutting down.
    #[error("the state database {path} is closed because the server is shutting down")]
    Closed {
        /// The database file.
        path: PathBuf,
    },
}

/// The state read back from the database.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Restored {
    /// The served model, if a participant has joined.
    pub model: Option<ModelInfo>,
    /// Global parameters.
    pub parameters: Vec<f64>,
    /// Update counters.
    pub counters: Vec<u64>,
    /// Version of the last acknowledged upload.
    pub version: u64,
    /// Participants in the order they first joined.
    pub participants: Vec<(String, ParticipantRecord)>,
    /// Version of the last checkpoint.
    pub checkpoint_version: u64,
    /// Uploads replayed from the log on top of the checkpoint.
    pub replayed_uploads: u64,
}

/// An open state database and the bookkeeping of its next checkpoint.
#[derive(Debug)]
pub struct DurableState {
    path: PathBuf,
    /// `state.lock` in the state directory, locked exclusively while this
    /// state is open, so that two servers never open or create the same
    /// database.
    _lock: std::fs::File,
    /// `None` once closed.
    db: Option<Database>,
    options: DurableOptions,
    parameter_count: usize,
    /// Chunks that uploads changed since the last checkpoint.
    dirty: BTreeSet<u32>,
    /// Parameter changes in the log.
    logged_changes: u64,
    /// Version of the last checkpoint.
    checkpoint_version: u64,
    /// When the last checkpoint was written, or the state opened.
    checkpoint_time: std::time::Instant,
}

/// Position of the durable state relative to its last checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckpointStatus {
    /// Version of the last checkpoint.
    pub version: u64,
    /// Time since the last checkpoint, or since the state was opened.
    pub age: std::time::Duration,
    /// Parameter changes logged since the last checkpoint, which a restart
    /// replays.
    pub logged_changes: u64,
}

impl DurableState {
    /// Opens the database in `dir`, creating the directory and a new
    /// database if there is none, and reads the state back. The file is
    /// verified (every page checksum) before anything is written to it, so
    /// a damaged file is reported and left as it was. `ordering` must match
    /// the ordering the database was created with.
    pub fn open(
        dir: &Path,
        ordering: Ordering,
        options: DurableOptions,
    ) -> Result<(Self, Restored, bool), StateError> {
        if dir.exists() && !dir.is_dir() {
            return Err(StateError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|error| StateError::Directory {
            path: dir.to_path_buf(),
            error,
        })?;
        let path = dir.join(DATABASE_FILE);
        let lock = lock_directory(dir, &path)?;
        if let Ok(link) = std::fs::symlink_metadata(&path)
            && link.file_type().is_symlink()
            && !path.exists()
        {
            let target = std::fs::read_link(&path).unwrap_or_default();
            return Err(StateError::DanglingLink { path, target });
        }
        let created = match std::fs::metadata(&path) {
            Ok(metadata) if metadata.is_dir() => {
                return Err(StateError::Access {
                    path,
                    error: std::io::Error::other("it is a directory, not a database file"),
                });
            }
            Ok(metadata) if metadata.len() == 0 => {
                return Err(corrupt(&path, "the file is empty"));
            }
            Ok(_) => false,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                create(&path, ordering)?;
                true
            }
            Err(error) => return Err(StateError::Access { path, error }),
        };
        let verified = verify_and_read(&path)?;
        if verified.ordering != ordering.name() {
            return Err(StateError::Incompatible {
                path,
                detail: format!(
                    "was created with --ordering {stored}, but the server runs with --ordering {}; start it with --ordering {stored}, or with another --state-dir for a new federation",
                    ordering.name(),
                    stored = verified.ordering,
                ),
            });
        }
        let db = Builder::new().open(&path).map_err(|error| match error {
            DatabaseError::DatabaseAlreadyOpen => StateError::InUse { path: path.clone() },
            other => corrupt(&path, other),
        })?;
        let state = Self {
            path,
            _lock: lock,
            db: Some(db),
            options,
            parameter_count: verified.restored.parameters.len(),
            dirty: verified.dirty,
            logged_changes: verified.logged_changes,
            checkpoint_version: verified.restored.checkpoint_version,
            checkpoint_time: std::time::Instant::now(),
        };
        let restored = verified.restored;
        Ok((state, restored, created))
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a join: the model and its initial parameters when this join
    /// initialises the server, and the participant at `position` in the join
    /// order when it is new.
    pub fn record_join(
        &mut self,
        initial: Option<(&ModelInfo, &[f64])>,
        new_participant: Option<(&str, u64)>,
    ) -> Result<(), StateError> {
        let result = self.write(|txn| {
            if let Some((model, parameters)) = initial {
                let mut text = txn.open_table(TEXT)?;
                text.insert("model_name", model.name.as_str())?;
                text.insert("layout_hash", model.layout_hash.as_str())?;
                txn.open_table(NUMBERS)?
                    .insert("parameter_count", model.parameter_count)?;
                let counters = vec![0u64; parameters.len()];
                let mut chunks = txn.open_table(CHUNKS)?;
                for chunk in 0..chunk_count(parameters.len()) {
                    let range = chunk_range(chunk, parameters.len());
                    let bytes = encode_chunk(&parameters[range.clone()], &counters[range]);
                    chunks.insert(chunk as u32, bytes.as_slice())?;
                }
            }
            if let Some((participant, position)) = new_participant {
                txn.open_table(PARTICIPANTS)?
                    .insert(participant, row(&ParticipantRecord::default()))?;
                txn.open_table(JOIN_ORDER)?.insert(position, participant)?;
            }
            Ok(())
        });
        result?;
        if let Some((_, parameters)) = initial {
            self.parameter_count = parameters.len();
        }
        Ok(())
    }

    /// Records an applied upload in one transaction: its changes in the log
    /// under `version + 1`, the participant's new record and the new version.
    /// `parameters` and `counters` are the state at `version`, which a
    /// checkpoint written first stores.
    pub fn record_upload(
        &mut self,
        parameters: &[f64],
        counters: &[u64],
        version: u64,
        participant: &str,
        record: &ParticipantRecord,
        changes: &SparseSlice,
    ) -> Result<(), StateError> {
        let limit = self
            .options
            .checkpoint_factor
            .saturating_mul(self.parameter_count as u64);
        let checkpoint =
            self.logged_changes > 0 && self.logged_changes + changes.len() as u64 > limit;
        let dirty = &self.dirty;
        self.write(|txn| {
            if checkpoint {
                write_checkpoint(txn, dirty, parameters, counters, version)?;
            }
            let indices = encode_indices(&changes.indices);
            let values = encode_values(&changes.values);
            txn.open_table(LOG)?
                .insert(version + 1, (indices.as_slice(), values.as_slice()))?;
            txn.open_table(PARTICIPANTS)?
                .insert(participant, row(record))?;
            txn.open_table(NUMBERS)?.insert("version", version + 1)?;
            Ok(())
        })?;
        if checkpoint {
            self.checkpointed(version);
        }
        self.logged_changes += changes.len() as u64;
        self.dirty.extend(touched_chunks(&changes.indices));
        Ok(())
    }

    /// Writes a checkpoint of `parameters` and `counters`, the state at
    /// `version`, and empties the log, so that the next start replays
    /// nothing. Does nothing when the log is empty.
    pub fn checkpoint(
        &mut self,
        parameters: &[f64],
        counters: &[u64],
        version: u64,
    ) -> Result<(), StateError> {
        if self.logged_changes == 0 {
            return Ok(());
        }
        let dirty = &self.dirty;
        self.write(|txn| write_checkpoint(txn, dirty, parameters, counters, version))?;
        self.checkpointed(version);
        Ok(())
    }

    /// The last checkpoint's version and age, and the uploads logged since.
    pub fn checkpoint_status(&self) -> CheckpointStatus {
        CheckpointStatus {
            version: self.checkpoint_version,
            age: self.checkpoint_time.elapsed(),
            logged_changes: self.logged_changes,
        }
    }

    fn checkpointed(&mut self, version: u64) {
        self.dirty.clear();
        self.logged_changes = 0;
        self.checkpoint_version = version;
        self.checkpoint_time = std::time::Instant::now();
    }

    /// Closes the database. Every change was already committed durably, so
    /// this only records a clean shutdown, which spares the next start
    /// redb's crash recovery. Later writes fail with [`StateError::Closed`].
    pub fn close(&mut self) -> Result<(), StateError> {
        match self.db.take() {
            Some(db) => db.close().map_err(|error| StateError::Write {
                path: self.path.clone(),
                source: error.into(),
            }),
            None => Ok(()),
        }
    }

    /// Runs `body` in a write transaction and commits it durably.
    fn write(
        &self,
        body: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StateError> {
        let db = self.db.as_ref().ok_or_else(|| StateError::Closed {
            path: self.path.clone(),
        })?;
        let failed = |source: redb::Error| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let mut txn = db.begin_write().map_err(|e| failed(e.into()))?;
        txn.set_two_phase_commit(true);
        body(&txn).map_err(failed)?;
        txn.commit().map_err(|e| failed(e.into()))
    }
}

/// Takes the exclusive lock of the state directory, or reports that another
/// server holds it.
fn lock_directory(dir: &Path, database: &Path) -> Result<std::fs::File, StateError> {
    let path = dir.join("state.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| StateError::Directory {
            path: path.clone(),
            error,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StateError::InUse {
            path: database.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(error)) => Err(StateError::Directory { path, error }),
    }
}

/// Rewrites the `dirty` chunks from the state at `version` and empties the
/// log, inside `txn`.
fn write_checkpoint(
    txn: &WriteTransaction,
    dirty: &BTreeSet<u32>,
    parameters: &[f64],
    counters: &[u64],
    version: u64,
) -> Result<(), redb::Error> {
    let mut chunks = txn.open_table(CHUNKS)?;
    for &chunk in dirty {
        let range = chunk_range(chunk as usize, parameters.len());
        let bytes = encode_chunk(&parameters[range.clone()], &counters[range]);
        chunks.insert(chunk, bytes.as_slice())?;
    }
    txn.open_table(LOG)?.retain(|_, _| false)?;
    txn.open_table(NUMBERS)?
        .insert("checkpoint_version", version)?;
    Ok(())
}

fn corrupt(path: &Path, detail: impl std::fmt::Display) -> StateError {
    StateError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn format_error(detail: impl Into<String>) -> redb::Error {
    redb::Error::Corrupted(detail.into())
}

/// Creates a database with the format numbers and the ordering. It is built
/// under a temporary name and renamed into place, so a database file at
/// `path` is always a complete one, and an empty or short file there is
/// damage, never an interrupted creation.
fn create(path: &Path, ordering: Ordering) -> Result<(), StateError> {
    let temporary = path.with_extension("redb.new");
    let failed = |detail: String| StateError::Directory {
        path: temporary.clone(),
        error: std::io::Error::other(detail),
    };
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != ErrorKind::NotFound => return Err(failed(error.to_string())),
        _ => {}
    }
    let db = Database::create(&temporary).map_err(|error| failed(error.to_string()))?;
    let mut txn = db
        .begin_write()
        .map_err(|error| failed(error.to_string()))?;
    txn.set_two_phase_commit(true);
    let written = (|| -> Result<(), redb::Error> {
        let mut numbers = txn.open_table(NUMBERS)?;
        numbers.insert("format", FORMAT)?;
        numbers.insert("chunk_parameters", CHUNK_PARAMETERS as u64)?;
        numbers.insert("version", 0)?;
        numbers.insert("checkpoint_version", 0)?;
        txn.open_table(TEXT)?.insert("ordering", ordering.name())?;
        txn.open_table(PARTICIPANTS)?;
        txn.open_table(CHUNKS)?;
        txn.open_table(LOG)?;
        txn.open_table(JOIN_ORDER)?;
        Ok(())
    })();
    written.map_err(|error| failed(error.to_string()))?;
    txn.commit().map_err(|error| failed(error.to_string()))?;
    db.close().map_err(|error| failed(error.to_string()))?;
    std::fs::rename(&temporary, path).map_err(|error| failed(error.to_string()))?;
    // The rename is durable once the directory is synced.
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| failed(error.to_string()))
}

/// Result of [`verify_and_read`] on a database.
#[derive(Debug)]
struct Verified {
    restored: Restored,
    ordering: String,
    /// Chunks that the logged uploads touch.
    dirty: BTreeSet<u32>,
    /// Parameter changes in the log.
    logged_changes: u64,
}

/// Opens the file through a scratch backend that keeps redb's writes in
/// memory, has redb verify every page checksum (and run its crash recovery
/// if the last run was killed), and reads and checks the whole state.
fn verify_and_read(path: &Path) -> Result<Verified, StateError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| StateError::Access {
            path: path.to_path_buf(),
            error,
        })?;
    let backend = scratch::ScratchBackend::new(file).map_err(|error| corrupt(path, error))?;
    // redb returns errors rather than panicking on a damaged file when it
    // checks integrity on open. The catch is a second line of defence, so
    // that a panic is still reported with the file's path.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let db = Builder::new()
            .set_check_integrity_on_open(true)
            .create_with_backend(backend)?;
        let verified = read_state(&db.begin_read()?)?;
        db.close()?;
        Ok::<_, redb::Error>(verified)
    }));
    match outcome {
        Ok(Ok(verified)) => Ok(verified),
        Ok(Err(redb::Error::DatabaseAlreadyOpen)) => Err(StateError::InUse {
            path: path.to_path_buf(),
        }),
        Ok(Err(error)) => Err(corrupt(path, error)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "redb panicked".into());
            Err(corrupt(path, format!("redb panicked: {message}")))
        }
    }
}

fn open_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<'_, K, V>,
) -> Result<redb::ReadOnlyTable<K, V>, redb::Error> {
    txn.open_table(table).map_err(|error| match error {
        TableError::TableDoesNotExist(name) => format_error(format!("the table {name} is missing")),
        other => other.into(),
    })
}

/// Reads the state and checks that its parts agree with each other.
fn read_state(txn: &ReadTransaction) -> Result<Verified, redb::Error> {
    let numbers = open_table(txn, NUMBERS)?;
    let number = |name: &str| -> Result<Option<u64>, redb::Error> {
        Ok(numbers.get(name)?.map(|value| value.value()))
    };
    let required = |name: &str| -> Result<u64, redb::Error> {
        number(name)?.ok_or_else(|| format_error(format!("the number {name} is missing")))
    };
    let format = required("format")?;
    if format != FORMAT {
        return Err(format_error(format!(
            "it has format {format}, and this server reads format {FORMAT}"
        )));
    }
    let chunk_parameters = required("chunk_parameters")?;
    if chunk_parameters != CHUNK_PARAMETERS as u64 {
        return Err(format_error(format!(
            "it stores {chunk_parameters} parameters per chunk, and this server {CHUNK_PARAMETERS}"
        )));
    }
    let version = required("version")?;
    let checkpoint_version = required("checkpoint_version")?;

    let text = open_table(txn, TEXT)?;
    let string = |name: &str| -> Result<Option<String>, redb::Error> {
        Ok(text.get(name)?.map(|value| value.value().to_string()))
    };
    let ordering =
        string("ordering")?.ok_or_else(|| format_error("the ordering is missing".to_string()))?;
    let model = match (
        string("model_name")?,
        string("layout_hash")?,
        number("parameter_count")?,
    ) {
        (Some(name), Some(layout_hash), Some(parameter_count)) => Some(ModelInfo {
            name,
            parameter_count,
            layout_hash,
        }),
        (None, None, None) => None,
        _ => return Err(format_error("the model is stored only in part")),
    };

    let n = match &model {
        Some(model) if model.parameter_count == 0 || model.parameter_count > 1 << 32 => {
            return Err(format_error(format!(
                "invalid parameter count {}",
                model.parameter_count
            )));
        }
        Some(model) => model.parameter_count as usize,
        None => 0,
    };
    let (mut parameters, mut counters) = read_chunks(txn, n)?;

    let log = open_table(txn, LOG)?;
    let mut dirty = BTreeSet::new();
    let mut logged_changes = 0u64;
    let mut expected = checkpoint_version + 1;
    for entry in log.iter()? {
        let (key, value) = entry?;
        if model.is_none() {
            return Err(format_error("the log holds uploads but no model is stored"));
        }
        if key.value() != expected {
            return Err(format_error(format!(
                "the log holds version {} where version {expected} should follow",
                key.value()
            )));
        }
        let (indices, values) = value.value();
        let changes = SparseSlice::decode(indices, values, n as u64).map_err(|error| {
            format_error(format!(
                "the upload of version {expected} is invalid: {error}"
            ))
        })?;
        for (&index, &value) in changes.indices.iter().zip(&changes.values) {
            parameters[index as usize] += f64::from(value);
            counters[index as usize] += 1;
        }
        dirty.extend(touched_chunks(&changes.indices));
        logged_changes += changes.len() as u64;
        expected += 1;
    }
    if expected - 1 != version {
        return Err(format_error(format!(
            "the stored version is {version}, but the checkpoint and the log reach version {}",
            expected - 1
        )));
    }

    let participants = read_participants(txn)?;
    let uploads: u64 = participants.iter().map(|(_, record)| record.uploads).sum();
    if uploads != version {
        return Err(format_error(format!(
            "the participants' uploads add up to {uploads}, but the version is {version}"
        )));
    }
    let uploaded: u64 = participants
        .iter()
        .map(|(_, record)| record.parameters_uploaded)
        .sum();
    let updates: u64 = counters.iter().sum();
    if uploaded != updates {
        return Err(format_error(format!(
            "the participants uploaded {uploaded} parameter changes, but the update counters add up to {updates}"
        )));
    }

    Ok(Verified {
        restored: Restored {
            model,
            parameters,
            counters,
            version,
            participants,
            checkpoint_version,
            replayed_uploads: version - checkpoint_version,
        },
        ordering,
        dirty,
        logged_changes,
    })
}

/// Reads the checkpoint of `n` parameters and their counters.
fn read_chunks(txn: &ReadTransaction, n: usize) -> Result<(Vec<f64>, Vec<u64>), redb::Error> {
    let chunks = open_table(txn, CHUNKS)?;
    let stored = redb::ReadableTableMetadata::len(&chunks)?;
    let count = chunk_count(n);
    if stored != count as u64 {
        return Err(format_error(format!(
            "{stored} parameter chunks are stored where {n} parameters take {count}"
        )));
    }
    let mut parameters = Vec::with_capacity(n);
    let mut counters = Vec::with_capacity(n);
    for chunk in 0..count {
        let value = chunks
            .get(chunk as u32)?
            .ok_or_else(|| format_error(format!("parameter chunk {chunk} is missing")))?;
        let bytes = value.value();
        let len = chunk_range(chunk, n).len();
        if bytes.len() != 16 * len {
            return Err(format_error(format!(
                "parameter chunk {chunk} has {} bytes instead of {}",
                bytes.len(),
                16 * len
            )));
        }
        let (values, counts) = bytes.split_at(8 * len);
        parameters.extend(
            values
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunks_exact yields 8 bytes"))),
        );
        counters.extend(
            counts
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("chunks_exact yields 8 bytes"))),
        );
    }
    Ok((parameters, counters))
}

/// Reads the participant records in join order.
fn read_participants(
    txn: &ReadTransaction,
) -> Result<Vec<(String, ParticipantRecord)>, redb::Error> {
    let mut records = BTreeMap::new();
    for entry in open_table(txn, PARTICIPANTS)?.iter()? {
        let (id, value) = entry?;
        records.insert(id.value().to_string(), record(value.value()));
    }
    let mut ordered = Vec::with_capacity(records.len());
    for entry in open_table(txn, JOIN_ORDER)?.iter()? {
        let (position, id) = entry?;
        let id = id.value();
        if position.value() != ordered.len() as u64 {
            return Err(format_error(format!(
                "the join order has position {} where {} should follow",
                position.value(),
                ordered.len()
            )));
        }
        let record = records.remove(id).ok_or_else(|| {
            format_error(format!(
                "the join order names {id:?}, which has no record or appears twice"
            ))
        })?;
        ordered.push((id.to_string(), record));
    }
    if let Some(id) = records.keys().next() {
        return Err(format_error(format!(
            "participant {id:?} has a record but no place in the join order"
        )));
    }
    Ok(ordered)
}

fn chunk_count(n: usize) -> usize {
    n.div_ceil(CHUNK_PARAMETERS)
}

fn chunk_range(chunk: usize, n: usize) -> std::ops::Range<usize> {
    chunk * CHUNK_PARAMETERS..((chunk + 1) * CHUNK_PARAMETERS).min(n)
}

/// Returns the chunks that the increasing `indices` fall in.
fn touched_chunks(indices: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let mut last = None;
    indices.iter().filter_map(move |&index| {
        let chunk = index / CHUNK_PARAMETERS as u32;
        (last.replace(chunk) != Some(chunk)).then_some(chunk)
    })
}

fn encode_chunk(parameters: &[f64], counters: &[u64]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 * parameters.len());
    for value in parameters {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    for count in counters {
        bytes.extend_from_slice(&count.to_le_bytes());
    }
    bytes
}

fn row(record: &ParticipantRecord) -> ParticipantRow {
    (
        record.uploads,
        record.parameters_uploaded,
        record.last_upload_id,
        record.epsilon_spent,
        record.private_uploads,
    )
}

fn record(row: ParticipantRow) -> ParticipantRecord {
    let (uploads, parameters_uploaded, last_upload_id, epsilon_spent, private_uploads) = row;
    ParticipantRecord {
        uploads,
        parameters_uploaded,
        last_upload_id,
        epsilon_spent,
        private_uploads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ServerError;
    use crate::store::{Store, Upload};
    use rand::seq::index::sample;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Three chunks, the last one partial.
    const N: usize = 2 * CHUNK_PARAMETERS + 1000;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "toy".into(),
            parameter_count: N as u64,
            layout_hash: "abc".into(),
        }
    }

    fn open(dir: &Path, factor: u64) -> Store {
        let options = DurableOptions {
            checkpoint_factor: factor,
        };
        Store::open_durable(dir, Ordering::Asynchronous, options)
            .unwrap()
            .0
    }

    fn initial() -> Vec<f32> {
        (0..N).map(|i| (i as f32).sin()).collect()
    }

    fn random_upload(rng: &mut ChaCha8Rng, participant: &str, id: u64) -> Upload {
        let count = rng.random_range(1..N / 3);
        let mut indices: Vec<u32> = sample(rng, N, count)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        indices.sort_unstable();
        let values = indices
            .iter()
            .map(|_| rng.random_range(-0.01..0.01))
            .collect();
        Upload {
            participant: participant.into(),
            upload_id: id,
            base_version: 0,
            changes: crate::store::Changes::Sparse(SparseSlice { indices, values }),
            epsilon: if id.is_multiple_of(2) { 0.5 } else { 0.0 },
            encoded_bytes: 0,
        }
    }

    fn assert_same_state(restored: &Store, expected: &Store) {
        assert_eq!(restored.parameters(), expected.parameters());
        assert_eq!(restored.counters(), expected.counters());
        assert_eq!(restored.status(), expected.status());
        assert_eq!(restored.join_order(), expected.join_order());
    }

    /// Applies `uploads` uploads to both stores, alternating participants.
    fn apply_both(
        durable: &Store,
        memory: &Store,
        rng: &mut ChaCha8Rng,
        first_id: u64,
        uploads: u64,
    ) {
        for id in first_id..first_id + uploads {
            let participant = if id % 3 == 0 { "p2" } else { "p1" };
            let upload = random_upload(rng, participant, id);
            assert_eq!(
                durable.apply(&upload).unwrap(),
                memory.apply(&upload).unwrap()
            );
        }
    }

    #[test]
    fn reopen_restores_every_upload_bit_for_bit() {
        // Factor 0 checkpoints with every upload, 1 every few uploads, and
        // 1000 never within this test, so all three paths are restored.
        for factor in [0, 1, 1000] {
            let dir = tempfile::tempdir().unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(factor);
            let memory = Store::new();
            {
                let durable = open(dir.path(), factor);
                for store in [&durable, &memory] {
                    store.join("p1", &model(), Some(initial())).unwrap();
                    store.join("p2", &model(), None).unwrap();
                }
                apply_both(&durable, &memory, &mut rng, 1, 20);
                durable.close().unwrap();
            }
            // Continue on the reopened store, so the restored bookkeeping of
            // the next checkpoint is used too, then reopen once more.
            let durable = open(dir.path(), factor);
            assert_same_state(&durable, &memory);
            apply_both(&durable, &memory, &mut rng, 21, 15);
            durable.close().unwrap();
            drop(durable);
            let (reopened, report) = Store::open_durable(
                dir.path(),
                Ordering::Asynchronous,
                DurableOptions::default(),
            )
            .unwrap();
            assert_same_state(&reopened, &memory);
            assert_eq!(report.version, 35, "factor {factor}");
            assert_eq!(report.participants, 2);
            assert!(!report.created);
            assert_eq!(report.model, Some(model()));
        }
    }

    #[test]
    fn retried_upload_id_after_reopen_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let upload = random_upload(&mut rng, "p1", 1);
        {
            let store = open(dir.path(), 4);
            store.join("p1", &model(), Some(initial())).unwrap();
            store.apply(&upload).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path(), 4);
        let before = store.parameters();
        let outcome = store.apply(&upload).unwrap();
        assert!(!outcome.applied);
        assert_eq!(outcome.version, 1);
        assert_eq!(store.parameters(), before);
        let (record, version, initialized) = store.join("p1", &model(), None).unwrap();
        assert_eq!(record.last_upload_id, 1);
        assert_eq!(version, 1);
        assert!(!initialized);
    }

    #[test]
    fn empty_state_reopens_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) =
            Store::open_durable(dir.path(), Ordering::RoundRobin, DurableOptions::default())
                .unwrap();
        assert!(report.created);
        store.close().unwrap();
        drop(store);
        let (store, report) =
            Store::open_durable(dir.path(), Ordering::RoundRobin, DurableOptions::default())
                .unwrap();
        assert!(!report.created);
        assert_eq!(report.version, 0);
        assert_eq!(store.model(), None);
    }

    #[test]
    fn other_ordering_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path(), 4).close().unwrap();
        let error =
            Store::open_durable(dir.path(), Ordering::RoundRobin, DurableOptions::default())
                .unwrap_err();
        assert!(matches!(error, StateError::Incompatible { .. }), "{error}");
        let text = error.to_string();
        assert!(text.contains("--ordering asynchronous"), "{text}");
    }

    #[test]
    fn second_open_is_rejected_while_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path(), 4);
        let error = Store::open_durable(
            dir.path(),
            Ordering::Asynchronous,
            DurableOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(error, StateError::InUse { .. }), "{error}");
    }

    #[test]
    fn closed_store_rejects_changes_as_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 4);
        store.join("p1", &model(), Some(initial())).unwrap();
        store.close().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let error = store.apply(&random_upload(&mut rng, "p1", 1)).unwrap_err();
        assert!(matches!(
            error,
            ServerError::Storage(StateError::Closed { .. })
        ));
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert_eq!(store.version(), 0);
    }

    /// Writes a store with one join and returns the database file's bytes.
    fn stored_bytes(dir: &Path) -> Vec<u8> {
        let store = open(dir, 4);
        store.join("p1", &model(), Some(initial())).unwrap();
        store.close().unwrap();
        std::fs::read(dir.join(DATABASE_FILE)).unwrap()
    }

    fn assert_rejected_unchanged(dir: &Path, damaged: &[u8]) {
        let path = dir.join(DATABASE_FILE);
        std::fs::write(&path, damaged).unwrap();
        let error = Store::open_durable(dir, Ordering::Asynchronous, DurableOptions::default())
            .unwrap_err();
        assert!(matches!(error, StateError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));
        assert!(
            std::fs::read(&path).unwrap() == damaged,
            "the file was changed"
        );
    }

    #[test]
    fn damaged_parameters_are_reported_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = stored_bytes(dir.path());
        // The first parameter of the second chunk, found by its value.
        let needle = f64::from(initial()[CHUNK_PARAMETERS]).to_le_bytes();
        let at = bytes
            .windows(8)
            .position(|window| window == needle)
            .expect("the chunk is stored");
        bytes[at..at + 64].fill(0x5A);
        assert_rejected_unchanged(dir.path(), &bytes);
    }

    #[test]
    fn truncated_and_empty_files_are_reported_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = stored_bytes(dir.path());
        assert_rejected_unchanged(dir.path(), &bytes[..bytes.len() / 2]);
        assert_rejected_unchanged(dir.path(), &[]);
        assert_rejected_unchanged(dir.path(), b"not a database");
    }

    #[test]
    fn dangling_link_is_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        let target = dir.path().join("unmounted/state.redb");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = Store::open_durable(
            dir.path(),
            Ordering::Asynchronous,
            DurableOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(error, StateError::DanglingLink { .. }), "{error}");
        assert!(error.to_string().contains("unmounted"), "{error}");
        assert_eq!(
            std::fs::read_link(&path).unwrap(),
            target,
            "the link was changed"
        );
    }

    #[test]
    fn directory_as_database_is_an_access_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(DATABASE_FILE)).unwrap();
        let error = Store::open_durable(
            dir.path(),
            Ordering::Asynchronous,
            DurableOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(error, StateError::Access { .. }), "{error}");
        assert!(error.to_string().contains("not a database file"), "{error}");
    }

    #[test]
    fn file_as_state_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("afile");
        std::fs::write(&file, b"x").unwrap();
        let error = Store::open_durable(&file, Ordering::Asynchronous, DurableOptions::default())
            .unwrap_err();
        assert!(matches!(error, StateError::NotADirectory { .. }), "{error}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn touched_chunks_lists_each_chunk_once() {
        let indices = [0, 5, 4095, 4096, 9000, 9001, 20_000];
        let chunks: Vec<u32> = touched_chunks(&indices).collect();
        assert_eq!(chunks, vec![0, 1, 2, 4]);
    }
}
