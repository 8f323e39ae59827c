//! `harness simulate` (being written).

/// Runs the subcommand.
pub fn run(_args: &[String]) -> Result<(), String> {
    Err("simulate: not built yet".into())
}
