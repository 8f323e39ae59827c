//! What the `circuit-breaker simulate` command-line tests share: running the binary, and files for it
//! to read.

use std::path::PathBuf;
use std::process::{Command, Output};

/// `circuit-breaker simulate ARGS...`, run to its end.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_circuit-breaker"))
        .arg("simulate")
        .args(args)
        .output()
        .unwrap()
}

/// `contents` written to `name` in a folder of this test process's own.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cb-simulate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}
