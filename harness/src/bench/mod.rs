//! `harness bench`, what `make bench` runs (issues 6 and 12): both builds of the filter (the wasm filter
//! in V8 and the native dynamic module) measured against Envoy's own floor, side by side in one run,
//! and written up as `BENCHMARKS.md`.
//!
//! Every comparison is made between listeners that differ only in what is measured, with the variants
//! run in interleaved rounds (the order rotates every round). Each build runs in an Envoy of its own,
//! from its own bootstrap (`envoy/<name>.yaml`, `envoy/<name>-native.yaml`), both pinned to the same
//! core and measured in the same rounds, each against the floor listener of its own Envoy. A shared,
//! noisy machine then shifts both sides of a ratio alike, which is why the report leads with ratios
//! and gives every figure as a median with its min–max over the rounds.
//!
//! 1. Closed-state overhead (`envoy/bench.yaml` and `envoy/bench-native.yaml`, one worker each): gRPC
//!    unary calls through `ingress` (the filter, enforcing), `filter_disabled` (the filter in `mode:
//!    disabled`: the price of the wasm VM, or of the module's hooks) and `baseline` (router only), all
//!    to a second Envoy that answers every call with a trailers-only gRPC OK
//!    (`envoy/bench-upstream.yaml`). Saturated throughput, proxy CPU per request (`/proc/<pid>/stat`
//!    utime+stime over Envoy's own request counter), and p50/p99 at a fixed rate of half the slowest
//!    variant's capacity.
//! 2. Open-state fail-fast (`envoy/bench-open.yaml`, `envoy/bench-open-native.yaml`): the filter held
//!    open (`forced_open`) against Envoy's `direct_response` with the same trailers-only UNAVAILABLE,
//!    and against no breaker in front of a hanging upstream with a route timeout. The guarded cluster
//!    must see no request at all.
//! 3. Core: the criterion benches `harness/benches/breakers.rs` and
//!    `filter/core/benches/admit_record.rs` (run by `make bench` just before this), read back from
//!    `target/criterion`.
//! 4. Contention: `ingress` and `baseline` of both builds with 1, 2 and 4 Envoy workers; CAS retries
//!    per call (wasm).
//! 5. Memory: shared-data bytes per upstream (from the codec), the artifacts' sizes, Envoy's RSS with
//!    1 and with 1000 upstream keys (`upstream_key: header:x-tenant`, wasm build).
//! 6. Host calls: the price of each kind the wasm filter makes, from a probe module.
//! 7. LDS (issue 18): an update replacing the filter configurations of 20 listeners of a native Envoy
//!    (`envoy/bench-lds.yaml`, listeners from a file), with and without `stuck_call_duration`, timed
//!    from the file's swap until Envoy has built the new configurations and destroyed the old ones.
//!    Both should cost the same: dropping a configuration waits for no ticker's sleep.
//!
//! Every Envoy is started by the one launcher, [`crate::envoy::Launch`]. Load comes from h2load
//! (nghttp2); the load generator and the upstream share the cores the proxy is not pinned to. Every
//! load run is bounded in time (h2load `-D`, or `-n` with a route timeout) and killed if it overruns.
//!
//! ```text
//! harness bench [--out BENCHMARKS.md] [--rounds 5] [--secs 3] [--only closed,open,hostcalls,contention,memory,lds]
//!               [--criterion target/criterion] [--quick]
//! ```
//!
//! The modules, by concern: `machine` (CPUs, placement, versions, a process's CPU time and memory),
//! `load` (h2load runs, in interleaved rounds over one or more Envoys), `stats` (Envoy's counters,
//! medians, ratios, the criterion results), `phases` (what each measurement starts and runs),
//! `report` (`BENCHMARKS.md`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::envoy::{
    envoy_binary, native_path, wasm_path, workspace_root, Envoy, Launch, Metrics, RunFiles,
    UpstreamPorts,
};

mod load;
mod machine;
mod phases;
mod report;
mod stats;

use machine::{clk_tck, loadavg, placement, Machine};
use phases::{
    closed_phase, contention_phase, hostcalls_phase, lds_phase, memory_phase, open_phase,
    probe_wasm,
};
use report::{write_report, Report};
use stats::CoreResults;

type Result<T> = std::result::Result<T, String>;

/// Entry point of `harness bench`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    // One thread is enough: the driver mostly waits; the hanging upstream it serves does nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
    rt.block_on(run_all(opts))
}

#[derive(Debug, Clone)]
struct Options {
    out: PathBuf,
    rounds: usize,
    secs: f64,
    criterion: PathBuf,
    only: Vec<String>,
}

const PHASES: [&str; 6] = ["closed", "open", "hostcalls", "contention", "memory", "lds"];

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace_root().join("target"), PathBuf::from);
        let mut o = Options {
            out: workspace_root().join("BENCHMARKS.md"),
            rounds: 5,
            secs: 3.0,
            criterion: target.join("criterion"),
            only: PHASES.iter().map(|s| s.to_string()).collect(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{arg} needs a value"))
            };
            match arg.as_str() {
                "--out" => o.out = PathBuf::from(value()?),
                "--criterion" => o.criterion = PathBuf::from(value()?),
                "--rounds" => {
                    o.rounds = value()?
                        .parse()
                        .ok()
                        .filter(|r| (1..=20).contains(r))
                        .ok_or("--rounds must be 1..=20")?
                }
                "--secs" => {
                    o.secs = value()?
                        .parse()
                        .ok()
                        .filter(|s: &f64| (0.5..=30.0).contains(s))
                        .ok_or("--secs must be in 0.5..=30")?
                }
                "--only" => {
                    o.only = value()?.split(',').map(str::to_string).collect();
                    if let Some(bad) = o.only.iter().find(|p| !PHASES.contains(&p.as_str())) {
                        return Err(format!("--only: unknown phase {bad:?} (phases: {PHASES:?})"));
                    }
                }
                "--quick" => {
                    o.rounds = 2;
                    o.secs = 1.0;
                }
                other => {
                    return Err(format!(
                        "harness bench: unknown argument {other:?}\nusage: harness bench [--out FILE] [--rounds N] [--secs S] [--only {}] [--criterion DIR] [--quick]",
                        PHASES.join(",")
                    ))
                }
            }
        }
        Ok(o)
    }

    fn runs(&self, phase: &str) -> bool {
        self.only.iter().any(|p| p == phase)
    }
}

/// What every phase needs: where things are, which cores to use.
struct Ctx {
    dir: PathBuf,
    envoy: PathBuf,
    wasm: PathBuf,
    /// The native module (`dist/libcircuit_breaker.so`), which the native Envoys load.
    native: PathBuf,
    body: PathBuf,
    /// The core the proxy under test is pinned to (None: one core only, nothing pinned).
    proxy_cpus: Option<String>,
    /// The cores the load generator and the upstream run on.
    load_cpus: Option<String>,
    clk_tck: f64,
    /// Example command lines, for the report.
    commands: BTreeMap<String, String>,
}

impl Ctx {
    /// An Envoy of the bench from `template`: one worker, not pinned, its files under
    /// `target/bench/<name>.*`, logging nothing per request, no main listener (each template names
    /// its own listeners).
    fn launch(&self, name: &str, template: &str) -> Launch {
        Launch::new(name)
            .template(template)
            .concurrency(1)
            .files(RunFiles::Fixed(self.dir.clone()))
            .log_args(&["--log-level", "warn"])
            .main_listener(None)
    }
}

/// The ports of a bench template: only the content cluster routes anywhere.
fn content_at(port: u16) -> UpstreamPorts {
    UpstreamPorts {
        content: port,
        ..UpstreamPorts::default()
    }
}

async fn start(launch: Launch) -> Result<Envoy> {
    launch.start().await.map_err(|e| e.to_string())
}

async fn run_all(opts: Options) -> Result<()> {
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The body of a unary gRPC call with an empty message: the 5-byte frame header (uncompressed,
    // length 0). h2load POSTs it.
    let body = dir.join("grpc-empty.bin");
    fs::write(&body, [0u8; 5]).map_err(|e| format!("cannot write {}: {e}", body.display()))?;
    let (proxy_cpus, load_cpus) = placement();
    let mut ctx = Ctx {
        dir,
        envoy: envoy_binary().map_err(|e| e.to_string())?,
        wasm: wasm_path().map_err(|e| e.to_string())?,
        native: native_path().map_err(|e| e.to_string())?,
        body,
        proxy_cpus,
        load_cpus,
        clk_tck: clk_tck(),
        commands: BTreeMap::new(),
    };
    let machine = Machine::read(&ctx).await;
    eprintln!(
        "bench: {} cpus ({}), proxy on {:?}, load on {:?}; {} rounds of {} s",
        machine.nproc, machine.cpu, ctx.proxy_cpus, ctx.load_cpus, opts.rounds, opts.secs
    );
    let started = Instant::now();

    let upstream = start(
        ctx.launch("bench-upstream", "envoy/bench-upstream.yaml")
            .cpus(ctx.load_cpus.as_deref()),
    )
    .await?;
    let upstream_port = upstream.port("grpc_ok").map_err(|e| e.to_string())?;
    ctx.commands
        .insert("upstream Envoy".into(), shorten(upstream.command()));

    let closed = if opts.runs("closed") {
        Some(closed_phase(&mut ctx, &opts, upstream_port).await?)
    } else {
        None
    };
    let open = if opts.runs("open") {
        Some(open_phase(&mut ctx, &opts).await?)
    } else {
        None
    };
    let hostcalls = match (opts.runs("hostcalls"), probe_wasm()) {
        (true, Some(probe)) => Some(hostcalls_phase(&mut ctx, &opts, upstream_port, &probe).await?),
        (true, None) => {
            eprintln!(
                "bench: no host-call probe (build it: cargo build --manifest-path harness/benches/hostcall-probe/Cargo.toml --target wasm32-wasip1 --release --target-dir target/fixtures); skipping that phase"
            );
            None
        }
        (false, _) => None,
    };
    let contention = if opts.runs("contention") {
        Some(contention_phase(&mut ctx, &opts, upstream_port).await?)
    } else {
        None
    };
    let memory = if opts.runs("memory") {
        Some(memory_phase(&mut ctx, upstream_port).await?)
    } else {
        None
    };
    let lds = if opts.runs("lds") {
        Some(lds_phase(&mut ctx, &opts).await?)
    } else {
        None
    };
    let core = CoreResults::read(&opts.criterion);
    drop(upstream);

    let report = Report {
        machine,
        machine_after: loadavg(),
        opts: &opts,
        ctx: &ctx,
        closed,
        open,
        hostcalls,
        contention,
        memory,
        lds,
        core,
        elapsed: started.elapsed(),
    };
    let generated = report.render();
    write_report(&opts.out, &generated)?;
    eprintln!(
        "bench: wrote {} in {:.0} s",
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `/stats/prometheus` of `envoy`.
async fn prometheus(envoy: &Envoy) -> Result<Metrics> {
    envoy.metrics().await.map_err(|e| e.to_string())
}

/// The bound port of `envoy`'s listener `name`.
fn port(envoy: &Envoy, name: &str) -> Result<u16> {
    envoy.port(name).map_err(|e| e.to_string())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

/// A command line with the workspace root elided, for the report.
fn shorten(command: &str) -> String {
    let root = workspace_root();
    let root = root.to_str().unwrap_or("");
    if root.is_empty() {
        command.to_string()
    } else {
        command.replace(&format!("{root}/"), "")
    }
}
