//! Phase 6: the price of each kind of host call the wasm filter makes, from the host-call probe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::super::load::{rounds_of, saturating, warm_up, Run, Variant};
use super::super::stats::{differences, Spread};
use super::super::{content_at, path_str, start, Ctx, Options, Result};
use crate::envoy::workspace_root;

/// Calls of each kind per probe request: enough that their cost stands well clear of the noise of a
/// shared machine (a few µs per request).
pub(in crate::bench) const PROBE_TIMES: u32 = 20;

/// The probe's calls, and how many of each the filter makes for one gRPC call through a Closed breaker
/// (trailers-only response): (`x-probe`, what it is, calls per filtered request (fewest, most), hands
/// data back).
pub(in crate::bench) const PROBES: [(&str, &str, (f64, f64), bool); 8] = [
    (
        "property_cluster",
        "`get_property(xds.cluster_name)`: the upstream key",
        (1.0, 1.0),
        true,
    ),
    (
        "property_flags",
        "`get_property(response.flags)` (read only when they could change the outcome: not on an upstream's OK, nor on a failure already)",
        (0.0, 0.0),
        true,
    ),
    (
        "request_header",
        "`get_header_map_value`: the request's `content-type`, the response's `grpc-status` (`:status` only when it has none)",
        (2.0, 2.0),
        true,
    ),
    (
        "shared_get",
        "`get_shared_data` (one slot): the admit's read, and the record's unless it can start from the latest read",
        (1.0, 2.0),
        true,
    ),
    ("shared_set", "`set_shared_data` (one slot)", (1.0, 1.0), false),
    ("clock", "`get_current_time`", (2.0, 2.0), false),
    ("metric", "`increment_metric`", (1.0, 1.0), false),
    (
        "core",
        "no host call: the core's admit + record in the VM (decode, decide, encode, on an in-VM store)",
        (1.0, 1.0),
        false,
    ),
];

/// The probe kinds that make up the shared-data work of a call.
pub(in crate::bench) const SHARED_DATA_PROBES: [&str; 3] = ["shared_get", "shared_set", "core"];

pub(in crate::bench) struct HostCalls {
    pub(in crate::bench) runs: BTreeMap<String, Vec<Run>>,
    pub(in crate::bench) times: u32,
}

/// Where `make bench` builds the probe: `CB_PROBE_WASM`, else target/fixtures/.
pub(in crate::bench) fn probe_wasm() -> Option<PathBuf> {
    let path = std::env::var_os("CB_PROBE_WASM")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || workspace_root().join("target/fixtures/wasm32-wasip1/release/hostcall_probe.wasm"),
            PathBuf::from,
        );
    path.is_file().then_some(path)
}

pub(in crate::bench) async fn hostcalls_phase(
    ctx: &mut Ctx,
    opts: &Options,
    upstream_port: u16,
    probe: &Path,
) -> Result<HostCalls> {
    let proxy = start(
        ctx.launch("bench-hostcalls", "envoy/bench-hostcalls.yaml")
            .ports(content_at(upstream_port))
            .var("PROBE_WASM", path_str(probe)?)
            .var("PROBE_TIMES", PROBE_TIMES.to_string())
            .cpus(ctx.proxy_cpus.as_deref()),
    )
    .await?;
    let probe_variant = |name: &str| Variant {
        headers: vec![format!("x-probe: {name}")],
        ..Variant::new(name, 0, "probe")
    };
    let mut variants = vec![probe_variant("none")];
    variants.extend(PROBES.iter().map(|(probe, ..)| probe_variant(probe)));
    variants.push(Variant::new("baseline", 0, "baseline"));
    warm_up(ctx, &[&proxy], &variants).await?;
    // The cost sought is a difference of CPU per request, so the runs need not be long, only many.
    let secs = (opts.secs * 0.7).max(1.5);
    let runs = rounds_of(
        ctx,
        &[&proxy],
        &variants,
        &saturating(secs, 4),
        opts.rounds.div_ceil(2).max(2),
        "host calls",
    )
    .await?;
    Ok(HostCalls {
        runs,
        times: PROBE_TIMES,
    })
}

impl HostCalls {
    /// µs per call of one probe kind, per round: (kind − none) / times.
    pub(in crate::bench) fn price(&self, kind: &str) -> Option<Spread> {
        let per_request = differences(&self.runs, kind, "none", |r| r.cpu_us)?;
        let t = f64::from(self.times);
        Some(Spread {
            median: per_request.median / t,
            min: per_request.min / t,
            max: per_request.max / t,
        })
    }

    /// The filter's host calls and core work for one call, priced: (fewest, most) calls.
    pub(in crate::bench) fn estimate(&self, only: Option<&[&str]>) -> (Option<f64>, Option<f64>) {
        let mut low = Some(0.0);
        let mut high = Some(0.0);
        for (kind, _, (fewest, most), _) in PROBES {
            if only.is_some_and(|o| !o.contains(&kind)) {
                continue;
            }
            let price = self.price(kind).map(|p| p.median.max(0.0));
            low = low.zip(price).map(|(sum, p)| sum + p * fewest);
            high = high.zip(price).map(|(sum, p)| sum + p * most);
        }
        (low, high)
    }

    pub(in crate::bench) fn shared_data_work(&self) -> (Option<f64>, Option<f64>) {
        self.estimate(Some(&SHARED_DATA_PROBES))
    }
}
