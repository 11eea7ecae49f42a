//! Helpers for the end-to-end tests: finding and running the real `mesh` binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `mesh` binary built in this workspace's target directory (or `$MESH_BIN`).
///
/// `scripts/test.sh` builds it before the tests run.
pub fn mesh_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/mesh
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("mesh"))
        .expect("target directory layout");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p mesh-cli` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs `mesh` with `args` to completion.
pub fn mesh(args: &[&str]) -> Output {
    Command::new(mesh_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mesh")
}

/// Stdout as text, trimmed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stderr as text, trimmed.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}
