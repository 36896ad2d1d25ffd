//! Pieces that several participant benchmarks share. Each benchmark uses
//! only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use dssgd_participant::data::{DataError, Splits, load_mnist};

/// Returns the median of `values`, the upper one of an even count.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Returns the workspace's root folder.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the participant crate is in the workspace")
        .to_path_buf()
}

/// Returns the Python with PyTorch 2.13: `DSSGD_PYTHON`, or the one that
/// `scripts/pytorch-env.sh` installs and prints. The error explains why there
/// is none.
pub(crate) fn python() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DSSGD_PYTHON") {
        return Ok(PathBuf::from(path));
    }
    let script = workspace_root().join("scripts/pytorch-env.sh");
    let stdout = script_output(&mut Command::new(&script), &script)?;
    Ok(PathBuf::from(
        String::from_utf8_lossy(&stdout).trim().to_string(),
    ))
}

/// Runs `command`, which runs `script`, and returns its standard output. A
/// failed start names the program, and a failed exit names the script and
/// gives its standard error.
pub(crate) fn script_output(command: &mut Command, script: &Path) -> Result<Vec<u8>, String> {
    let output = command.output().map_err(|error| {
        let program = Path::new(command.get_program()).display().to_string();
        format!("failed to run {program}: {error}")
    })?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output.stdout)
}

/// Reads the environment variable `name` as a `T` that passes `valid`, or
/// `default` when it is unset. An invalid value ends the benchmark with a
/// message that names it and what `expected` describes.
pub(crate) fn env_setting<T: FromStr>(
    name: &str,
    default: T,
    expected: &str,
    valid: impl Fn(&T) -> bool,
) -> T {
    let Ok(text) = std::env::var(name) else {
        return default;
    };
    match text.parse::<T>() {
        Ok(value) if valid(&value) => value,
        _ => {
            eprintln!("invalid {name} {text:?}: expected {expected}");
            std::process::exit(2);
        }
    }
}

/// Returns the MNIST folder that `DSSGD_DATA_DIR` names, or `data/mnist`
/// when it is unset or empty. A relative path is read from the workspace
/// root, because cargo runs each benchmark in its package's folder.
pub(crate) fn data_dir() -> PathBuf {
    let path = std::env::var_os("DSSGD_DATA_DIR")
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from("data/mnist"), PathBuf::from);
    workspace_root().join(path)
}

/// Loads MNIST from [`data_dir`], or ends the benchmark with a message
/// that names the folder.
pub(crate) fn load_data() -> Splits {
    let dir = data_dir();
    load_mnist(&dir).unwrap_or_else(|error| {
        // The loader's advice for missing files names options of
        // dssgd-participant, which a benchmark does not take.
        let problem = match error {
            DataError::Missing { .. } => "the MNIST files are missing".to_string(),
            other => other.to_string(),
        };
        eprintln!(
            "failed to load MNIST from {}: {problem}\nset DSSGD_DATA_DIR to a folder with the MNIST files (a relative path is read from the workspace root)",
            dir.display()
        );
        std::process::exit(2);
    })
}
