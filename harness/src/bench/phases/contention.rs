//! Phase 4: contention, 1, 2 and 4 Envoy workers on one breaker, both builds side by side.

use std::collections::BTreeMap;

use super::super::load::{rounds_of, saturating, warm_up, Run};
use super::super::{content_at, prometheus, Ctx, Envoy, Options, Result};
use super::{side_by_side, start_builds, BUILDS};
use crate::envoy::Build;

pub(in crate::bench) const CONTENTION_LISTENERS: [&str; 2] = ["baseline", "ingress"];

/// What one build's breakers counted over a worker count's rounds.
pub(in crate::bench) struct StoreCounts {
    pub(in crate::bench) build: Build,
    pub(in crate::bench) calls: u64,
    pub(in crate::bench) cas_retries: u64,
    pub(in crate::bench) give_ups: u64,
}

pub(in crate::bench) struct Contention {
    pub(in crate::bench) workers: u32,
    /// Runs by [`super::vname`].
    pub(in crate::bench) throughput: BTreeMap<String, Vec<Run>>,
    pub(in crate::bench) counts: Vec<StoreCounts>,
}

pub(in crate::bench) async fn contention_phase(
    ctx: &mut Ctx,
    opts: &Options,
    upstream_port: u16,
) -> Result<Vec<Contention>> {
    let mut out = Vec::new();
    let variants = side_by_side(&CONTENTION_LISTENERS);
    for workers in [1u32, 2, 4] {
        // Not pinned: the workers get every core there is (shared with the load generator).
        let proxies = start_builds(
            ctx,
            &format!("bench-contention-{workers}"),
            "envoy/bench.yaml",
            "contention",
            |l| {
                l.ports(content_at(upstream_port))
                    .filter_config("{}")
                    .concurrency(workers)
            },
        )
        .await?;
        let refs: Vec<&Envoy> = proxies.iter().collect();
        warm_up(ctx, &refs, &variants).await?;
        let mut before = Vec::new();
        for p in &proxies {
            before.push(prometheus(p).await?);
        }
        // Eight connections, spread over the workers by the listeners' exact balance.
        let throughput = rounds_of(
            ctx,
            &refs,
            &variants,
            &saturating(opts.secs, 8),
            opts.rounds.div_ceil(2).max(2),
            &format!("contention {workers} workers"),
        )
        .await?;
        let mut counts = Vec::new();
        for ((build, proxy), before) in BUILDS.into_iter().zip(&proxies).zip(&before) {
            let after = prometheus(proxy).await?;
            let delta = |name: &str| (after.sum(name, &[]) - before.sum(name, &[])).max(0.0) as u64;
            counts.push(StoreCounts {
                build,
                calls: delta("circuit_breaker_calls_total"),
                cas_retries: delta("circuit_breaker_cas_retries_total"),
                give_ups: delta("circuit_breaker_cas_give_ups_total"),
            });
        }
        out.push(Contention {
            workers,
            throughput,
            counts,
        });
    }
    Ok(out)
}
