//! Load: h2load runs against a listener, with the proxy's CPU and request counter sampled inside the
//! measured period, in interleaved rounds.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::machine::cpu_ticks;
use super::stats::{percentile, spread, stat};
use super::{path_str, port, shorten, Ctx, Envoy, Options, Result};

/// The gRPC method every load run calls (the route matches any path; this is the realistic one).
const GRPC_PATH: &str = "/social.v1.ContentService/GetPost";
/// Extra time an h2load run may take past its nominal length before it is killed.
const LOAD_GRACE: Duration = Duration::from_secs(30);

/// One h2load run.
#[derive(Debug, Clone)]
pub(super) struct LoadSpec {
    pub(super) clients: u32,
    /// Max concurrent streams per connection.
    pub(super) streams: u32,
    /// Measured seconds (`-D`), after `warmup` seconds.
    pub(super) secs: f64,
    pub(super) warmup: f64,
    /// Fixed rate per client (`--rps`); None: as fast as it goes.
    pub(super) rps_per_client: Option<u32>,
    /// A fixed number of requests (`-n`) instead of a duration.
    pub(super) requests: Option<u64>,
    /// Write and read back per-request latencies.
    pub(super) latencies: bool,
    /// Extra request headers (`name: value`).
    pub(super) headers: Vec<String>,
}

impl LoadSpec {
    pub(super) fn args(&self, port: u16, body: &Path, log: Option<&Path>) -> Result<Vec<String>> {
        let mut a: Vec<String> = vec![
            "-c".into(),
            self.clients.to_string(),
            "-m".into(),
            self.streams.to_string(),
        ];
        match self.requests {
            Some(n) => a.extend(["-n".into(), n.to_string()]),
            None => a.extend([
                "-D".into(),
                format!("{}ms", (self.secs * 1000.0).round() as u64),
                "--warm-up-time".into(),
                format!("{}ms", (self.warmup * 1000.0).round() as u64),
            ]),
        }
        if let Some(r) = self.rps_per_client {
            a.extend(["--rps".into(), r.to_string()]);
        }
        if let Some(log) = log {
            a.extend(["--log-file".into(), path_str(log)?.to_string()]);
        }
        for h in &self.headers {
            a.extend(["-H".into(), h.clone()]);
        }
        a.extend([
            "-d".into(),
            path_str(body)?.to_string(),
            "-H".into(),
            "content-type: application/grpc".into(),
            "-H".into(),
            "te: trailers".into(),
            format!("http://127.0.0.1:{port}{GRPC_PATH}"),
        ]);
        Ok(a)
    }

    pub(super) fn bound(&self) -> Duration {
        Duration::from_secs_f64(self.secs + self.warmup) + LOAD_GRACE
    }
}

/// One measured run on one listener.
#[derive(Debug, Clone, Default)]
pub(super) struct Run {
    /// h2load's requests per second over the measured period.
    pub(super) rps: f64,
    pub(super) succeeded: u64,
    pub(super) failed: u64,
    /// Proxy CPU (utime+stime, all threads) per request the listener served, in µs, sampled inside
    /// the measured period.
    pub(super) cpu_us: Option<f64>,
    /// The proxy's CPU use over that period, in cores.
    pub(super) busy: Option<f64>,
    pub(super) p50_us: Option<f64>,
    pub(super) p99_us: Option<f64>,
    pub(super) max_us: Option<f64>,
}

/// Runs h2load against `listener` of `proxy`, sampling the proxy's CPU and request counter inside the
/// measured period.
pub(super) async fn measure(
    ctx: &mut Ctx,
    proxy: &Envoy,
    listener: &str,
    spec: &LoadSpec,
) -> Result<Run> {
    let port = port(proxy, listener)?;
    let log = spec.latencies.then(|| ctx.dir.join("latencies.tsv"));
    if let Some(log) = &log {
        let _ = fs::remove_file(log);
    }
    let mut argv: Vec<String> = Vec::new();
    if let Some(cpus) = &ctx.load_cpus {
        argv.extend(["taskset".into(), "-c".into(), cpus.clone()]);
    }
    argv.push("h2load".into());
    argv.extend(spec.args(port, &ctx.body, log.as_deref())?);
    let kind = match (spec.requests, spec.rps_per_client) {
        (Some(_), _) => "h2load, fixed count",
        (None, Some(_)) => "h2load, fixed rate",
        (None, None) => "h2load, saturating",
    };
    // The warm-up runs (1 s) are not worth showing.
    if spec.secs > 1.0 || spec.requests.is_some() {
        ctx.commands.insert(kind.into(), shorten(&argv.join(" ")));
    }
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let started = Instant::now();
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start h2load: {e} (apt-get install nghttp2-client)"))?;

    let counter = format!("http.{listener}.downstream_rq_total");
    let mut sampled = None;
    if spec.requests.is_none() && spec.secs >= 0.5 {
        // Inside the measured period, clear of its edges (connection set-up, the last responses).
        let margin = (spec.secs / 8.0).min(0.3);
        let t0 = started + Duration::from_secs_f64(spec.warmup + margin);
        let t1 = started + Duration::from_secs_f64(spec.warmup + spec.secs - margin);
        tokio::time::sleep_until(t0.into()).await;
        let a = (
            cpu_ticks(proxy.pid()),
            stat(proxy, &counter).await?,
            Instant::now(),
        );
        tokio::time::sleep_until(t1.into()).await;
        let b = (
            cpu_ticks(proxy.pid()),
            stat(proxy, &counter).await?,
            Instant::now(),
        );
        sampled = Some((a, b));
    }
    let output = tokio::time::timeout(spec.bound(), child.wait_with_output())
        .await
        .map_err(|_| format!("h2load overran {:?}; killed", spec.bound()))?
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let mut run = parse_h2load(&text).ok_or_else(|| {
        format!(
            "unparsable h2load output ({}):\n{text}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if let Some(((Some(c0), r0, w0), (Some(c1), r1, w1))) = sampled {
        let cpu_s = c1.saturating_sub(c0) as f64 / ctx.clk_tck;
        let requests = r1.saturating_sub(r0);
        if requests > 0 {
            run.cpu_us = Some(cpu_s * 1e6 / requests as f64);
        }
        let wall = w1.duration_since(w0).as_secs_f64();
        if wall > 0.0 {
            run.busy = Some(cpu_s / wall);
        }
    }
    if let Some(log) = &log {
        let mut lat = read_latencies(log);
        lat.sort_by(f64::total_cmp);
        run.p50_us = percentile(&lat, 0.50);
        run.p99_us = percentile(&lat, 0.99);
        run.max_us = lat.last().copied();
    }
    Ok(run)
}

pub(super) fn parse_h2load(text: &str) -> Option<Run> {
    let mut run = Run::default();
    let finished = text.lines().find(|l| l.starts_with("finished in"))?;
    run.rps = finished
        .split(", ")
        .find_map(|p| p.strip_suffix(" req/s"))?
        .trim()
        .parse()
        .ok()?;
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    for part in requests.trim_start_matches("requests:").split(',') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let n: u64 = n.parse().ok()?;
        match what {
            "succeeded" => run.succeeded = n,
            "failed" => run.failed = n,
            _ => {}
        }
    }
    Some(run)
}

/// h2load's `--log-file`: start (µs since epoch), status, µs until the end of the response.
pub(super) fn read_latencies(path: &Path) -> Vec<f64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect()
}

/// One thing to measure: a listener of one of the proxies of a phase, and request headers that select
/// what it does.
#[derive(Debug, Clone)]
pub(super) struct Variant {
    pub(super) name: String,
    /// Which of the proxies given to [`rounds_of`] serves it (an index into them).
    pub(super) proxy: usize,
    pub(super) listener: String,
    pub(super) headers: Vec<String>,
}

impl Variant {
    /// `listener` of proxy `proxy`, as it is, under `name`.
    pub(super) fn new(name: impl Into<String>, proxy: usize, listener: &str) -> Self {
        Self {
            name: name.into(),
            proxy,
            listener: listener.to_string(),
            headers: Vec::new(),
        }
    }
}

/// Interleaved rounds: every round runs each variant once, the order rotating so no variant always
/// runs first (or right after the same neighbour). Variants may live in different proxies (one per
/// build, pinned to the same core): only the one being measured is loaded, so each proxy's CPU per
/// call is its own. Results by variant name, in round order.
pub(super) async fn rounds_of(
    ctx: &mut Ctx,
    proxies: &[&Envoy],
    variants: &[Variant],
    spec: &LoadSpec,
    n: usize,
    label: &str,
) -> Result<BTreeMap<String, Vec<Run>>> {
    let mut out: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for round in 0..n {
        for i in 0..variants.len() {
            let Some(v) = variants.get((i + round) % variants.len()) else {
                continue;
            };
            let proxy = proxies.get(v.proxy).ok_or_else(|| {
                format!(
                    "variant {} names proxy {} of {}",
                    v.name,
                    v.proxy,
                    proxies.len()
                )
            })?;
            let spec = LoadSpec {
                headers: v.headers.clone(),
                ..spec.clone()
            };
            let run = measure(ctx, proxy, &v.listener, &spec).await?;
            eprintln!(
                "bench: {label} round {}/{n} {}: {:.0} req/s, cpu {} µs/req, p99 {} µs",
                round + 1,
                v.name,
                run.rps,
                run.cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
                run.p99_us.map_or("-".into(), |c| format!("{c:.0}")),
            );
            out.entry(v.name.clone()).or_default().push(run);
        }
    }
    Ok(out)
}

/// A short unrecorded run on each variant's listener: V8's JIT, connection pools and allocators warm
/// up.
pub(super) async fn warm_up(ctx: &mut Ctx, proxies: &[&Envoy], variants: &[Variant]) -> Result<()> {
    let spec = LoadSpec {
        clients: 4,
        streams: 16,
        secs: 1.0,
        warmup: 0.5,
        rps_per_client: None,
        requests: None,
        latencies: false,
        headers: Vec::new(),
    };
    let mut done = std::collections::BTreeSet::new();
    for v in variants {
        let Some(proxy) = proxies.get(v.proxy) else {
            continue;
        };
        if done.insert((v.proxy, v.listener.clone())) {
            measure(ctx, proxy, &v.listener, &spec).await?;
        }
    }
    Ok(())
}

pub(super) fn saturating(secs: f64, clients: u32) -> LoadSpec {
    LoadSpec {
        clients,
        streams: 32,
        secs,
        warmup: 0.5,
        rps_per_client: None,
        requests: None,
        latencies: false,
        headers: Vec::new(),
    }
}

pub(super) fn fixed_rate(secs: f64, total_rps: f64) -> LoadSpec {
    let clients = 4u32;
    LoadSpec {
        clients,
        streams: 16,
        secs,
        warmup: 0.5,
        rps_per_client: Some(((total_rps / f64::from(clients)).round() as u32).max(1)),
        requests: None,
        latencies: true,
        headers: Vec::new(),
    }
}

/// One call at a time on one connection: the latency a call sees with no queue anywhere.
pub(super) fn one_at_a_time(secs: f64) -> LoadSpec {
    LoadSpec {
        clients: 1,
        streams: 1,
        secs: secs.min(2.0),
        warmup: 0.5,
        rps_per_client: None,
        requests: None,
        latencies: true,
        headers: Vec::new(),
    }
}

/// The three loads each variant is measured under, in interleaved rounds.
pub(super) struct Loads {
    /// Saturating: throughput and proxy CPU per call.
    pub(super) throughput: BTreeMap<String, Vec<Run>>,
    /// At `rate`, half the slowest variant's capacity: latency under load.
    pub(super) latency: BTreeMap<String, Vec<Run>>,
    /// One call at a time: latency without queueing.
    pub(super) unloaded: BTreeMap<String, Vec<Run>>,
    /// The fixed rate of `latency`.
    pub(super) rate: f64,
}

/// Warms the variants up, then measures them under the three loads of [`Loads`], all in the same
/// interleaved rounds; `label` names the phase in the progress lines.
pub(super) async fn loads(
    ctx: &mut Ctx,
    proxies: &[&Envoy],
    variants: &[Variant],
    opts: &Options,
    label: &str,
) -> Result<Loads> {
    warm_up(ctx, proxies, variants).await?;
    let throughput = rounds_of(
        ctx,
        proxies,
        variants,
        &saturating(opts.secs, 4),
        opts.rounds,
        &format!("{label} throughput"),
    )
    .await?;
    let rate = half_capacity(&throughput);
    let latency = rounds_of(
        ctx,
        proxies,
        variants,
        &fixed_rate(opts.secs, rate),
        opts.rounds,
        &format!("{label} latency"),
    )
    .await?;
    let unloaded = rounds_of(
        ctx,
        proxies,
        variants,
        &one_at_a_time(opts.secs),
        opts.rounds.div_ceil(2).max(2),
        &format!("{label} unloaded latency"),
    )
    .await?;
    Ok(Loads {
        throughput,
        latency,
        unloaded,
        rate,
    })
}

/// The fixed rate latencies are measured at: half the saturated throughput of the slowest variant, so
/// every variant is loaded but none has a queue building up, and all are compared at the same rate.
pub(super) fn half_capacity(throughput: &BTreeMap<String, Vec<Run>>) -> f64 {
    let slowest = throughput
        .values()
        .filter_map(|runs| spread(runs.iter().map(|r| r.rps)))
        .map(|s| s.median)
        .fold(f64::INFINITY, f64::min);
    if slowest.is_finite() {
        (slowest / 2.0).max(100.0)
    } else {
        1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summaries() {
        let text = "finished in 3.00s, 4272.00 req/s, 62.59KB/s\n\
                    requests: 12816 total, 12816 started, 12816 done, 12800 succeeded, 16 failed, 0 errored, 0 timeout\n";
        let run = parse_h2load(text).unwrap();
        assert_eq!((run.rps, run.succeeded, run.failed), (4272.0, 12800, 16));
        assert!(parse_h2load("garbage").is_none());
    }
}
