//! The privacy ledger: an append-only record on disk of every private
//! release a participant made, and the budget check before the next one.
//!
//! One JSON object per line. Each line is written and synced to disk before
//! the release it records leaves the process, so a crash can over-count the
//! spend (a release recorded but never sent) but never under-count it. The
//! total is the sum of the per-epoch spends (basic sequential composition):
//! `T` uploads of `epsilon` each make the participant `T * epsilon`
//! differentially private with respect to its whole training set.
//!
//! Opening a ledger checks every line: the sequence numbers count up from 1,
//! each spend is positive and finite, each running total is the previous
//! total plus the spend, and the participant is the one opening it. Any
//! other content is an error that names the file and line; the ledger is
//! never reset or rewritten. The one exception is a last line without its
//! newline, which can only be a write that a crash cut short: its release
//! never left the process, so the fragment is reported and cut off.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Slack allowed between a running total and the sum of its spends, and in
/// the budget comparison, for floating-point rounding.
const TOTAL_TOLERANCE: f64 = 1e-9;

/// One private release.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Position in the ledger, from 1.
    pub sequence: u64,
    /// The participant whose data the release is about.
    pub participant: String,
    /// Upload id the release was sent under.
    pub upload_id: u64,
    /// Local epoch of the release (1-based, within its run).
    pub epoch: usize,
    /// Privacy spent by this release.
    pub epsilon: f64,
    /// Most parameters released: `ceil(theta_u * n)`.
    pub c: usize,
    /// `epsilon / c`, the per-parameter figure of Shokri and Shmatikov.
    pub epsilon_per_parameter: f64,
    /// Total spent after this release (basic composition).
    pub total_epsilon: f64,
    /// Milliseconds since the Unix epoch when the entry was written.
    pub unix_ms: u64,
}

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading or writing the file failed.
    #[error("privacy ledger {path}: {source}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A line is not a valid entry.
    #[error(
        "privacy ledger {path}, line {line}: {reason}; the ledger is never rewritten \
         automatically: restore it from a backup, or move it away to start a new one \
         and account for its spend by hand"
    )]
    Corrupt {
        /// The ledger file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The reason the line is invalid.
        reason: String,
    },
    /// The next release would spend more than the budget allows.
    #[error(
        "privacy budget exhausted: spent {spent} of {budget}, and the next upload would spend \
         {next}; raise --privacy-budget only if the data owner allows it"
    )]
    BudgetExhausted {
        /// Spent so far.
        spent: f64,
        /// The configured total budget.
        budget: f64,
        /// The spend of the next release.
        next: f64,
    },
}

/// An open ledger.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    participant: String,
    last_sequence: u64,
    total: f64,
    budget: Option<f64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

impl Ledger {
    /// Opens (or creates) the ledger at `path` for `participant`, with an
    /// optional total `budget`, checking every line already in it.
    pub fn open(path: &Path, participant: &str, budget: Option<f64>) -> Result<Self, LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            file: file.try_clone().map_err(io)?,
            participant: participant.to_string(),
            last_sequence: 0,
            total: 0.0,
            budget,
        };
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut reader = BufReader::new(&mut file);
        let mut line = String::new();
        let mut valid_bytes = 0u64;
        let mut number = 0;
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(io)?;
            if read == 0 {
                break;
            }
            number += 1;
            if !line.ends_with('\n') {
                warn!(
                    ledger = %path.display(),
                    line = number,
                    fragment = %line,
                    "cutting off an unfinished last ledger line (a write interrupted by a crash; \
                     its release was never sent)"
                );
                ledger.file.set_len(valid_bytes).map_err(io)?;
                ledger.file.sync_all().map_err(io)?;
                break;
            }
            ledger.check_line(line.trim_end(), number)?;
            valid_bytes += read as u64;
        }
        Ok(ledger)
    }

    fn check_line(&mut self, text: &str, line: usize) -> Result<(), LedgerError> {
        let corrupt = |reason: String| LedgerError::Corrupt {
            path: self.path.clone(),
            line,
            reason,
        };
        let entry: LedgerEntry = serde_json::from_str(text)
            .map_err(|error| corrupt(format!("not a ledger entry ({error})")))?;
        if entry.participant != self.participant {
            return Err(corrupt(format!(
                "the entry is about participant {:?}, not {:?}",
                entry.participant, self.participant
            )));
        }
        if entry.sequence != self.last_sequence + 1 {
            return Err(corrupt(format!(
                "sequence {} follows {}; entries were removed or reordered",
                entry.sequence, self.last_sequence
            )));
        }
        if !(entry.epsilon.is_finite() && entry.epsilon > 0.0) {
            return Err(corrupt(format!(
                "spend {} is not a positive number",
                entry.epsilon
            )));
        }
        let expected = self.total + entry.epsilon;
        if (entry.total_epsilon - expected).abs() > TOTAL_TOLERANCE * expected.max(1.0) {
            return Err(corrupt(format!(
                "running total {} differs from the sum of the spends {expected}",
                entry.total_epsilon
            )));
        }
        self.last_sequence = entry.sequence;
        self.total = expected;
        Ok(())
    }

    /// Total spent so far.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// Number of releases recorded.
    pub fn releases(&self) -> u64 {
        self.last_sequence
    }

    /// The configured total budget.
    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails when a release spending `epsilon` would pass the budget.
    pub fn check(&self, epsilon: f64) -> Result<(), LedgerError> {
        match self.budget {
            Some(budget) if self.total + epsilon > budget * (1.0 + TOTAL_TOLERANCE) => {
                Err(LedgerError::BudgetExhausted {
                    spent: self.total,
                    budget,
                    next: epsilon,
                })
            }
            _ => Ok(()),
        }
    }

    /// Records a release of `epsilon` before it is sent: checks the budget,
    /// appends the entry and syncs it to disk. Returns the new total.
    pub fn record(
        &mut self,
        upload_id: u64,
        epoch: usize,
        epsilon: f64,
        c: usize,
    ) -> Result<f64, LedgerError> {
        self.check(epsilon)?;
        let entry = LedgerEntry {
            sequence: self.last_sequence + 1,
            participant: self.participant.clone(),
            upload_id,
            epoch,
            epsilon,
            c,
            epsilon_per_parameter: epsilon / c.max(1) as f64,
            total_epsilon: self.total + epsilon,
            unix_ms: now_ms(),
        };
        let mut line = serde_json::to_string(&entry).expect("a ledger entry serializes");
        line.push('\n');
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.last_sequence = entry.sequence;
        self.total = entry.total_epsilon;
        Ok(self.total)
    }
}

/// Reads every entry of the ledger at `path` (for reports and tests).
pub fn read_entries(path: &Path) -> Result<Vec<LedgerEntry>, LedgerError> {
    let io = |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut entries = Vec::new();
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let entry = serde_json::from_str(&line).map_err(|error| LedgerError::Corrupt {
            path: path.to_path_buf(),
            line: number + 1,
            reason: format!("not a ledger entry ({error})"),
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("ledgers").join("p000.jsonl")
    }

    #[test]
    fn survives_a_restart_and_only_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger_path(&dir);
        let mut ledger = Ledger::open(&path, "p000", None).unwrap();
        assert_eq!(ledger.total(), 0.0);
        let mut totals = vec![];
        for epoch in 1..=3 {
            totals.push(ledger.record(epoch as u64, epoch, 0.5, 10).unwrap());
        }
        assert_eq!(totals, vec![0.5, 1.0, 1.5]);
        drop(ledger);

        let mut reopened = Ledger::open(&path, "p000", None).unwrap();
        assert_eq!(reopened.total(), 1.5);
        assert_eq!(reopened.releases(), 3);
        reopened.record(4, 1, 0.25, 10).unwrap();
        let entries = read_entries(&path).unwrap();
        assert_eq!(entries.len(), 4);
        assert!(
            entries
                .windows(2)
                .all(|w| w[1].total_epsilon > w[0].total_epsilon)
        );
        assert_eq!(entries[3].total_epsilon, 1.75);
        assert_eq!(entries[3].epsilon_per_parameter, 0.025);
    }

    #[test]
    fn blocks_a_release_that_would_pass_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger_path(&dir);
        let mut ledger = Ledger::open(&path, "p000", Some(1.0)).unwrap();
        ledger.record(1, 1, 0.4, 1).unwrap();
        ledger.record(2, 2, 0.4, 1).unwrap();
        let error = ledger.record(3, 3, 0.4, 1).unwrap_err();
        assert!(matches!(error, LedgerError::BudgetExhausted { .. }));
        let message = error.to_string();
        assert!(
            message.contains("spent 0.8") && message.contains("of 1"),
            "{message}"
        );
        // Nothing was recorded for the refused release, and a restart with the
        // same budget still refuses it.
        assert_eq!(read_entries(&path).unwrap().len(), 2);
        let reopened = Ledger::open(&path, "p000", Some(1.0)).unwrap();
        assert!(reopened.check(0.4).is_err());
        assert!(reopened.check(0.2).is_ok());
    }

    #[test]
    fn a_spend_exactly_at_the_budget_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(&ledger_path(&dir), "p000", Some(0.3)).unwrap();
        for epoch in 1..=3 {
            ledger.record(epoch as u64, epoch, 0.1, 1).unwrap();
        }
        assert!(ledger.check(0.1).is_err());
    }

    #[test]
    fn an_edited_ledger_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger_path(&dir);
        let mut ledger = Ledger::open(&path, "p000", None).unwrap();
        for epoch in 1..=3 {
            ledger.record(epoch as u64, epoch, 1.0, 1).unwrap();
        }
        drop(ledger);
        let original = std::fs::read_to_string(&path).unwrap();

        // A removed entry breaks the sequence.
        let lines: Vec<&str> = original.lines().collect();
        let edited = format!("{}\n{}\n", lines[0], lines[2]);
        std::fs::write(&path, &edited).unwrap();
        let error = Ledger::open(&path, "p000", None).unwrap_err().to_string();
        assert!(
            error.contains("line 2") && error.contains("sequence 3 follows 1"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), edited);

        // A lowered spend breaks the running total.
        let lowered = original.replacen("\"epsilon\":1.0", "\"epsilon\":0.5", 1);
        std::fs::write(&path, &lowered).unwrap();
        let error = Ledger::open(&path, "p000", None).unwrap_err().to_string();
        assert!(
            error.contains("line 1") && error.contains("running total"),
            "{error}"
        );

        // Another participant's ledger.
        std::fs::write(&path, &original).unwrap();
        let error = Ledger::open(&path, "p001", None).unwrap_err().to_string();
        assert!(error.contains("\"p000\", not \"p001\""), "{error}");

        // Garbage.
        std::fs::write(&path, "not json\n").unwrap();
        let error = Ledger::open(&path, "p000", None).unwrap_err().to_string();
        assert!(
            error.contains("line 1") && error.contains("not a ledger entry"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not json\n");
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger_path(&dir);
        let mut ledger = Ledger::open(&path, "p000", None).unwrap();
        ledger.record(1, 1, 1.0, 1).unwrap();
        ledger.record(2, 2, 1.0, 1).unwrap();
        drop(ledger);
        let complete = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{complete}{{\"sequence\":3,\"partic")).unwrap();

        let mut reopened = Ledger::open(&path, "p000", None).unwrap();
        assert_eq!(reopened.total(), 2.0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), complete);
        reopened.record(3, 3, 1.0, 1).unwrap();
        assert_eq!(read_entries(&path).unwrap().len(), 3);
    }
}
