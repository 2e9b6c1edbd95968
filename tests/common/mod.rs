//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::Command;

/// The `keel` binary under test.
pub fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// A fresh, empty directory for one test (unique per test binary's process and name).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
