//! Helpers for the end-to-end tests in `tests/`: locating the built
//! binaries and MNIST, and managing child processes that must not outlive a
//! failing test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Maximum time any one child process of a test may run. A hang fails the
/// test with the child's name instead of blocking CI.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Folder with the MNIST files: `DSSGD_MNIST_DIR`, else the shared data
/// folder beside the repository.
pub fn mnist_dir() -> PathBuf {
    std::env::var_os("DSSGD_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data/mnist"))
}

/// Path of a workspace binary: from `DSSGD_BIN_DIR`, else the release build
/// folder. The test command builds the binaries before running the tests.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("DSSGD_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build it first with `cargo build --release --bins` or set DSSGD_BIN_DIR",
        path.display()
    );
    path
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    /// Name used in failure messages.
    pub name: String,
    /// The process.
    pub child: Child,
}

impl ChildGuard {
    /// Starts `program` with `args`, stderr sent to `log`.
    pub fn spawn(name: &str, program: &PathBuf, args: &[String], log: &PathBuf) -> Self {
        let stderr = std::fs::File::create(log).expect("log file should be creatable");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", program.display()));
        Self {
            name: name.to_string(),
            child,
        }
    }

    /// Reads the first stdout line (the server prints its address there).
    pub fn first_line(&mut self) -> String {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("stdout should be readable");
        line.trim().to_string()
    }

    /// Reads the first `count` stdout lines (the server prints its gRPC
    /// address, then its metrics address when it serves metrics).
    pub fn first_lines(&mut self, count: usize) -> Vec<String> {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let mut reader = BufReader::new(stdout);
        (0..count)
            .map(|_| {
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .expect("stdout should be readable");
                line.trim().to_string()
            })
            .collect()
    }

    /// Waits for the process to exit within [`CHILD_TIMEOUT`] and returns
    /// whether it succeeded.
    pub fn wait(&mut self) -> bool {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait should work") {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "{} ran longer than {CHILD_TIMEOUT:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Starts `dssgd-server` in plaintext (`--insecure`) on an ephemeral
/// loopback port with `extra` flags; returns the guard and the `http://`
/// address.
pub fn start_server(extra: &[&str], log: &PathBuf) -> (ChildGuard, String) {
    start_server_with("127.0.0.1:0", extra, log)
}

/// Starts `dssgd-server` listening on `listen` (for example `127.0.0.1:7000`).
pub fn start_server_at(listen: &str, log: &PathBuf) -> (ChildGuard, String) {
    start_server_with(listen, &[], log)
}

fn start_server_with(listen: &str, extra: &[&str], log: &PathBuf) -> (ChildGuard, String) {
    // Plaintext on loopback; the TLS tests start their servers themselves.
    let mut args = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--insecure".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut server = ChildGuard::spawn("server", &binary("dssgd-server"), &args, log);
    let line = server.first_line();
    let address = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first server line {line:?}"));
    (server, format!("http://{address}"))
}

/// Reads a JSON file written by a participant or baseline.
pub fn read_json(path: &PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
    serde_json::from_str(&text).expect("metrics should be valid JSON")
}
