//! Metrics a participant or a baseline writes as JSON at the end of a run.

use std::path::Path;

use serde::Serialize;

/// One local epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub loss: f64,
    /// Test accuracy of the local model after the epoch, when evaluated.
    pub accuracy: Option<f64>,
    /// Global version the epoch started from (collaborative runs only).
    pub version: Option<u64>,
    /// Parameters downloaded before the epoch.
    pub parameters_downloaded: usize,
    /// Parameters uploaded after the epoch.
    pub parameters_uploaded: usize,
    /// Wall time of the epoch, download and upload included, in seconds.
    pub seconds: f64,
    /// Privacy spent by this epoch's upload (private runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Privacy spent in total after this epoch, as the ledger composes it
    /// (private runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_total: Option<f64>,
    /// Seconds spent selecting, noising and recording the private upload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy_seconds: Option<f64>,
}

/// Privacy spend of a private run.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacySummary {
    /// Privacy spent by each upload (per local epoch).
    pub epsilon_per_epoch: f64,
    /// Most parameters released per upload: `ceil(theta_u * n)`.
    pub c: usize,
    /// `epsilon / c`, the per-parameter figure Shokri and Shmatikov report.
    pub epsilon_per_parameter: f64,
    /// Spent by this run's uploads (basic composition).
    pub run_epsilon: f64,
    /// Spent in total according to the ledger, earlier runs included.
    pub total_epsilon: f64,
    /// The configured total budget.
    pub budget: Option<f64>,
    /// Uploads this run made with noise.
    pub private_uploads: usize,
    /// The ledger file.
    pub ledger: String,
}

/// The whole record of one training run.
#[derive(Clone, Debug, Serialize)]
pub struct RunMetrics {
    /// Participant identifier, or the baseline's name.
    pub participant: String,
    /// `collaborative`, `standalone` or `centralized`.
    pub method: String,
    /// Model name.
    pub model: String,
    /// Number of training examples used.
    pub training_examples: usize,
    /// Per-epoch records.
    pub epochs: Vec<EpochRecord>,
    /// Test accuracy of the final model.
    pub final_accuracy: f64,
    /// Test accuracy of the full global model at the end (collaborative).
    pub global_accuracy: Option<f64>,
    /// Test accuracy of a model trained on the same shard alone with the
    /// same settings, when the participant was asked to train one.
    pub standalone_accuracy: Option<f64>,
    /// Bytes of requests sent to the server.
    pub bytes_sent: u64,
    /// Bytes of responses received from the server.
    pub bytes_received: u64,
    /// Parameters sent over all uploads.
    pub parameters_sent: u64,
    /// Parameters received over all downloads.
    pub parameters_received: u64,
    /// Wall time of the whole run, in seconds.
    pub wall_seconds: f64,
    /// Privacy spend (private runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
    /// Why the run stopped before its last epoch, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early: Option<String>,
    /// Participants hosted by the process that ran this one, when it hosted
    /// several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosted_participants: Option<usize>,
    /// Peak resident memory of that process, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_peak_rss_bytes: Option<u64>,
    /// The effective settings of the run.
    pub config: serde_json::Value,
}

impl RunMetrics {
    /// Writes the metrics as pretty JSON to `path`, creating parent folders
    /// and replacing the file atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_json(path, self)
    }
}

/// Rounds `value` to `digits` significant digits, so that printed figures
/// read 0.01 rather than 0.010000000000000002.
pub fn significant(value: f64, digits: i32) -> f64 {
    if value == 0.0 || !value.is_finite() {
        return value;
    }
    let scale = 10f64.powi(digits - 1 - value.abs().log10().floor() as i32);
    (value * scale).round() / scale
}

/// Writes `value` as pretty JSON to `path` through a temporary file and a
/// rename, so a reader never sees half a file.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&temporary, text + "\n")?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::significant;

    #[test]
    fn significant_digits_hide_float_noise() {
        assert_eq!(significant(0.010000000000000002, 6).to_string(), "0.01");
        assert_eq!(significant(65631.60000000002, 6).to_string(), "65631.6");
        assert_eq!(significant(109386.0, 6).to_string(), "109386");
        assert_eq!(significant(0.0, 6), 0.0);
        assert_eq!(significant(-2.345678, 3), -2.35);
    }
}
