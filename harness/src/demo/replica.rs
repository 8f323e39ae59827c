//! `make demo SCENARIO=replica`: one of content-service's three replicas hangs, as one pod does (a
//! deadlock, a stuck pool, a GC storm), and the same gateway calls it through a slice of an Istio mesh
//! ([`MeshLaunch`]): its own sidecar (the caller's side: Istio's default retry policy, no route
//! timeout, round robin over the replicas) and each replica's sidecar (the destination's side).
//!
//! Three runs of the same hang, side by side:
//! - no breaker anywhere;
//! - the breaker on the caller's side only, with the demo's config (today's deployment). It sees a
//!   third of content-service's calls fail, interleaved with successes, and never opens;
//! - the caller's side and the destination's side, where each replica's own breaker has
//!   `stuck_call_duration` and `cut_stuck_calls`: the hung replica's sidecar opens on its stuck calls
//!   and answers them, and every new one, with `UNAVAILABLE`; the caller's sidecar retries those on
//!   another replica.
//!
//! The table and `target/demo/replica.svg` compare them; the goal for the third run (issue 17): at
//! least 99 % of calls OK, and no call waiting more than `stuck_call_duration` + 0.5 s.
//!
//! The run itself is [`drive`]'s, as in today's scenario; the table and the picture are in
//! `replica_report.rs`.

use super::replica_report::{picture, summary};
use super::run::{drive, Column, Stage, Watched, DEMO_LOG_ARGS};
use super::{display_path, output_dir, Phases, DEMO_CONFIG};
use crate::envoy::{Build, MeshLaunch, RunFiles, UpstreamPorts};
use crate::services::{GrpcService, ServiceKind};
use crate::svg;

use super::run::RunReport;

/// The breaker in every replica's own sidecar, in the third run: one breaker for the replica, fed by
/// all its callers, that counts a call with no response headers after 300 ms (the demo's calls take
/// a few milliseconds) as failed, opens after three, and then answers those calls and every new one
/// at once, so that the callers' sidecars retry them elsewhere. Every 3 s one probe tries the replica.
pub(super) const DESTINATION_CONFIG: &str = r#"{
  "failure_threshold": 3,
  "stuck_call_duration": "300ms",
  "cut_stuck_calls": true,
  "open_timeout": "3s",
  "success_threshold": 2,
  "health_path": "/health/circuit-breakers"
}"#;

/// A side without a breaker: the filter passes everything through and tracks nothing.
const NO_BREAKER: &str = r#"{"mode": "disabled"}"#;

/// The timeline's column of the hung replica's own breaker.
pub(super) const HUNG_COLUMN: &str = "replica 1";

/// Where the breaker runs in one run.
pub(super) struct Deployment {
    /// The run's name in the lines, the table and the picture.
    pub(super) label: &'static str,
    /// Names its Envoys' files in `target/demo/`.
    name: &'static str,
    caller: &'static str,
    destination: &'static str,
}

impl Deployment {
    /// Whether the replicas' sidecars run a breaker.
    pub(super) fn guards_destination(&self) -> bool {
        self.destination != NO_BREAKER
    }

    /// Whether only the caller's sidecar runs a breaker (today's deployment).
    pub(super) fn guards_caller_only(&self) -> bool {
        self.caller != NO_BREAKER && !self.guards_destination()
    }
}

/// The three runs, in order.
pub(super) const DEPLOYMENTS: [Deployment; 3] = [
    Deployment {
        label: "no breaker",
        name: "replica-no-breaker",
        caller: NO_BREAKER,
        destination: NO_BREAKER,
    },
    Deployment {
        label: "caller's side",
        name: "replica-caller-side",
        caller: DEMO_CONFIG,
        destination: NO_BREAKER,
    },
    Deployment {
        label: "both sides, cut",
        name: "replica-both-sides",
        caller: DEMO_CONFIG,
        destination: DESTINATION_CONFIG,
    },
];

/// One run: what the gateway saw, and what the sidecars counted.
pub(super) struct ReplicaRun {
    pub(super) deployment: &'static Deployment,
    pub(super) report: RunReport,
    /// The caller's sidecar's retries of content-service's calls (`upstream_rq_retry`).
    pub(super) retries: f64,
    /// Calls the hung replica's own breaker cut, and calls it rejected.
    pub(super) cut: f64,
    pub(super) rejected: f64,
}

/// Runs the scenario: three runs, then the table and the picture.
pub(super) async fn demo(phases: Phases, build: Build) -> Result<(), String> {
    println!(
        "circuit breaker demo, one hung replica: a social app's API gateway calling four gRPC services \
         through its sidecar (Envoy, configured as Istio configures one); content-service has three \
         replicas, each behind its own sidecar."
    );
    println!(
        "The gateway gives every call a {}s deadline; no route timeout. Replica 1 of content-service \
         will take calls and never answer from t={}s to t={}s.",
        super::load::CLIENT_DEADLINE.as_secs(),
        phases.healthy,
        phases.healthy + phases.outage
    );
    println!(
        "Three runs on the {} build: {}.\n",
        build.name(),
        DEPLOYMENTS
            .iter()
            .map(|d| d.label)
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut runs = Vec::with_capacity(DEPLOYMENTS.len());
    for deployment in &DEPLOYMENTS {
        runs.push(one_run(deployment, phases, build).await?);
        println!();
    }

    let out_dir = output_dir();
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("demo: cannot create {}: {e}", out_dir.display()))?;
    let svg_path = out_dir.join("replica.svg");
    std::fs::write(&svg_path, svg::render_comparison(&picture(&runs, phases)))
        .map_err(|e| format!("demo: cannot write {}: {e}", svg_path.display()))?;
    println!("{}", summary(&runs));
    println!("timeline: {}", display_path(&svg_path));
    Ok(())
}

/// One run: the other services, the three replicas, the mesh configured as `deployment` says, and
/// the gateway's load while replica 1 hangs.
async fn one_run(
    deployment: &'static Deployment,
    phases: Phases,
    build: Build,
) -> Result<ReplicaRun, String> {
    let service = |kind| GrpcService::start(kind);
    let cannot = |e: std::io::Error| format!("demo: cannot start the services: {e}");
    let (user, feed, auth) = tokio::try_join!(
        service(ServiceKind::User),
        service(ServiceKind::Feed),
        service(ServiceKind::Auth),
    )
    .map_err(cannot)?;
    let (first, second, third) = tokio::try_join!(
        service(ServiceKind::Content),
        service(ServiceKind::Content),
        service(ServiceKind::Content),
    )
    .map_err(cannot)?;
    let replicas = [first, second, third];
    let mesh = MeshLaunch::new(deployment.name, replicas.each_ref().map(GrpcService::port))
        .build(build)
        .others(UpstreamPorts {
            user: user.port(),
            feed: feed.port(),
            auth: auth.port(),
            ..UpstreamPorts::NEVER_ROUTED
        })
        .caller_config(deployment.caller)
        .destination_config(deployment.destination)
        .files(RunFiles::Fixed(output_dir()))
        .log_args(&DEMO_LOG_ARGS)
        .start()
        .await
        .map_err(|e| format!("demo: {e}"))?;
    let hung_key = mesh
        .inbound_key(0)
        .ok_or_else(|| "demo: the mesh has no replica".to_string())?;
    let hung_sidecar = &mesh.inbound[0];

    let mut columns: Vec<Column<'_>> = ServiceKind::ALL
        .iter()
        .map(|kind| Column {
            name: kind.cluster().to_string(),
            envoy: &mesh.caller,
            key: kind.cluster().to_string(),
        })
        .collect();
    // Only a breaker answers the health path; without one, the request would go to the replica.
    if deployment.guards_destination() {
        columns.push(Column {
            name: HUNG_COLUMN.to_string(),
            envoy: hung_sidecar,
            key: hung_key.clone(),
        });
    }
    let stage = Stage {
        label: deployment.label,
        front: &mesh.caller,
        hangs: &replicas[0],
        hangs_name: "content-service replica 1",
        watched: Watched {
            admin: hung_sidecar.admin(),
            key: hung_key.clone(),
            column: HUNG_COLUMN.to_string(),
        },
        columns,
    };
    println!(
        "   replica 1's own sidecar: breaker key {hung_key}, log {}",
        display_path(hung_sidecar.log_path())
    );
    let report = drive(&stage, phases).await?;

    let caller = mesh
        .caller
        .metrics()
        .await
        .map_err(|e| format!("demo: {e}"))?;
    let hung = hung_sidecar
        .metrics()
        .await
        .map_err(|e| format!("demo: {e}"))?;
    let of_hung = [("upstream", hung_key.as_str())];
    Ok(ReplicaRun {
        deployment,
        report,
        retries: caller.sum(
            "envoy_cluster_upstream_rq_retry",
            &[("envoy_cluster_name", ServiceKind::Content.cluster())],
        ),
        cut: hung.sum("circuit_breaker_cut_calls_total", &of_hung),
        rejected: hung.sum("circuit_breaker_rejected_calls_total", &of_hung),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cb_core::config::FilterConfig;

    #[test]
    fn the_configs_are_ones_the_filter_accepts() {
        for deployment in &DEPLOYMENTS {
            for json in [deployment.caller, deployment.destination] {
                let config = FilterConfig::from_json(json.as_bytes());
                assert!(config.is_ok(), "{json}: {config:?}");
            }
        }
        let destination = FilterConfig::from_json(DESTINATION_CONFIG.as_bytes()).unwrap();
        assert!(destination.tracks_stuck_calls());
        assert!(DEPLOYMENTS[2].guards_destination() && !DEPLOYMENTS[1].guards_destination());
        assert!(DEPLOYMENTS[1].guards_caller_only() && !DEPLOYMENTS[0].guards_caller_only());
    }
}
