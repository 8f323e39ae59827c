//! `harness`: the native tools around the breaker core.
//!
//! ```text
//! harness simulate --log access.jsonl --config filter.json [--svg out.svg]
//! harness demo     (what `make demo` runs)
//! harness bench    (what `make bench` runs; writes BENCHMARKS.md)
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match command.as_str() {
        "simulate" => harness::simulate::run(&rest),
        "demo" => harness::demo::run(&rest),
        "bench" => harness::bench::run(&rest),
        _ => Err(format!(
            "usage: harness <simulate|demo|bench> [options]\n  simulate: replay an access log or scenario through the breaker\n  demo: the live outage demo (make demo)\n  bench: the benchmarks against Envoy's own floor (make bench)\n(got {command:?})"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
    }
}
