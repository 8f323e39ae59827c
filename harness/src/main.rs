//! `circuit-breaker`: the native tools around the breaker core.
//!
//! ```text
//! circuit-breaker simulate --log access.jsonl --config filter.json [--svg out.svg]
//! circuit-breaker demo     (what `make demo` runs)
//! circuit-breaker bench    (what `make bench` runs; writes BENCHMARKS.md)
//! ```
//!
//! `circuit-breaker <command> --help` tells each one's options.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "circuit-breaker",
    version,
    about = "The native tools around the circuit-breaker core: replay traffic offline, the live demo, the benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Simulate(harness::simulate::Args),
    /// The live outage demo in a real Envoy (what `make demo` runs)
    #[command(
        long_about = "The live outage demo (what `make demo` runs): Envoy with the filter in front of the demo \
gRPC services; content-service hangs for a while, the breaker is seen to open, fail fast and recover, \
then the same run without the breaker for comparison. Needs dist/circuit_breaker.wasm and an Envoy \
(ENVOY=/path/to/envoy).",
        after_help = "Options (passed to the demo as they are):\n  --healthy S    seconds before the outage (1 to 300, default 6)\n  --outage S     seconds content-service hangs (default 16)\n  --recovery S   seconds after it (default 12)\n  --native       the native build of the filter (dist/libcircuit_breaker.so)\n  --scenario S   service (default: content-service hangs, with the breaker and without) or\n                 replica (one of its three replicas hangs behind sidecars: no breaker, the\n                 caller's side, both sides with cut_stuck_calls)"
    )]
    Demo(PassThrough),
    /// The benchmarks: the filter in Envoy against Envoy's own floor (what `make bench` runs)
    #[command(
        after_help = "Options are passed to the benchmark driver as they are: --out FILE, --rounds N, --secs S, \
--only PHASES, --criterion DIR, --quick (see harness/src/bench/mod.rs)."
    )]
    Bench(PassThrough),
}

/// The options after a subcommand that parses its own.
#[derive(Debug, clap::Args)]
struct PassThrough {
    /// The subcommand's own options (below), passed on as they are
    #[arg(
        value_name = "OPTIONS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Simulate(args) => harness::simulate::run_args(args),
        Command::Demo(rest) => harness::demo::run(&rest.args),
        Command::Bench(rest) => harness::bench::run(&rest.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
    }
}
