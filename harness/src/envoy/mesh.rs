//! [`Mesh`]: a slice of an Istio mesh on loopback, for the end-to-end test of one hung replica and
//! `make demo SCENARIO=replica`. A caller's sidecar (`envoy/outbound.yaml`: Istio's default retry
//! policy, no route timeout, cluster limits at their maximum) routes content-service's calls, round
//! robin, to three replicas, each behind its own sidecar's inbound listener (`envoy/inbound.yaml`,
//! cluster `inbound|<port>||`). Both kinds of sidecar run the filter, each with its own configuration:
//! the caller's side and the destination's side (`{"mode": "disabled"}` for a side without a breaker).
//!
//! The replicas themselves are the caller's to start and to break (they are the demo services); the
//! mesh only needs their ports.

use super::{Build, Envoy, Launch, Result, RunFiles, UpstreamPorts};

/// Replicas of content-service behind the caller's sidecar: what `envoy/outbound.yaml` routes to.
pub const REPLICAS: usize = 3;

/// The caller's sidecar's bootstrap (wasm; [`Build::template`] names the native twin).
const OUTBOUND: &str = "envoy/outbound.yaml";
/// A replica's sidecar's bootstrap (wasm; [`Build::template`] names the native twin).
const INBOUND: &str = "envoy/inbound.yaml";

/// The cluster a replica's own sidecar routes its inbound calls to, named as Istio names it after the
/// port the application listens on; with the default `upstream_key`, the destination's breaker key.
pub fn inbound_cluster(app_port: u16) -> String {
    format!("inbound|{app_port}||")
}

/// How to start a [`Mesh`]. The defaults are the tests': files per instance, the tests' logging.
#[derive(Debug, Clone)]
pub struct MeshLaunch {
    name: String,
    build: Build,
    replicas: [u16; REPLICAS],
    others: UpstreamPorts,
    caller_config: String,
    destination_config: String,
    files: RunFiles,
    log_args: Option<Vec<String>>,
}

impl MeshLaunch {
    /// A mesh whose Envoys' files are named after `name`, in front of the replicas listening on
    /// `replicas`, with the build `CB_BUILD` names and both sides' filter configured `{}`.
    pub fn new(name: &str, replicas: [u16; REPLICAS]) -> Self {
        Self {
            name: name.to_string(),
            build: Build::from_env(),
            replicas,
            others: UpstreamPorts::NEVER_ROUTED,
            caller_config: "{}".to_string(),
            destination_config: "{}".to_string(),
            files: RunFiles::PerInstance,
            log_args: None,
        }
    }

    /// The build of the filter in every sidecar.
    pub fn build(mut self, build: Build) -> Self {
        self.build = build;
        self
    }

    /// The ports of user-, feed- and auth-service, which the caller's sidecar routes to directly
    /// (`content` is ignored: content-service is the replicas). Unset: nothing listens there.
    pub fn others(mut self, ports: UpstreamPorts) -> Self {
        self.others = ports;
        self
    }

    /// The filter's JSON in the caller's sidecar.
    pub fn caller_config(mut self, json: &str) -> Self {
        self.caller_config = json.to_string();
        self
    }

    /// The filter's JSON in every replica's sidecar.
    pub fn destination_config(mut self, json: &str) -> Self {
        self.destination_config = json.to_string();
        self
    }

    /// Where the Envoys' files go (see [`Launch::files`]).
    pub fn files(mut self, files: RunFiles) -> Self {
        self.files = files;
        self
    }

    /// Replaces the tests' logging flags of every Envoy (see [`Launch::log_args`]).
    pub fn log_args(mut self, args: &[&str]) -> Self {
        self.log_args = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Starts the replicas' sidecars (together), then the caller's, which needs their ports; returns
    /// once every one serves.
    pub async fn start(&self) -> Result<Mesh> {
        let [a, b, c] = self.replicas;
        let (a, b, c) = (self.inbound(0, a), self.inbound(1, b), self.inbound(2, c));
        let (first, second, third) = tokio::try_join!(a.start(), b.start(), c.start())?;
        let inbound = [first, second, third];
        let caller = inbound
            .iter()
            .enumerate()
            .try_fold(self.launch("caller", OUTBOUND), |launch, (i, envoy)| {
                envoy
                    .port("inbound")
                    .map(|port| launch.var(&format!("CONTENT_REPLICA_{}", i + 1), port.to_string()))
            })?
            .ports(self.others)
            .filter_config(&self.caller_config)
            .main_listener(Some("outbound"))
            .start()
            .await?;
        Ok(Mesh {
            caller,
            inbound,
            replicas: self.replicas,
        })
    }

    /// The sidecar of replica `i`, listening on `app_port`.
    fn inbound(&self, i: usize, app_port: u16) -> Launch {
        self.launch(&format!("replica-{}", i + 1), INBOUND)
            .var("APP_PORT", app_port.to_string())
            .filter_config(&self.destination_config)
            .main_listener(Some("inbound"))
    }

    fn launch(&self, role: &str, template: &str) -> Launch {
        let launch = Launch::new(&format!("{}-{role}", self.name))
            .template(&self.build.template(template))
            .files(self.files.clone());
        match &self.log_args {
            Some(args) => launch.log_args(&args.iter().map(String::as_str).collect::<Vec<_>>()),
            None => launch,
        }
    }
}

/// The running sidecars: the caller's and one per replica. Each Envoy is stopped when dropped.
pub struct Mesh {
    /// The caller's sidecar: the client calls its `outbound` listener ([`Envoy::listener`]).
    pub caller: Envoy,
    /// Replica `i`'s sidecar, in the order of the replicas' ports; its `inbound` listener is the
    /// endpoint the caller's sidecar sends to.
    pub inbound: [Envoy; REPLICAS],
    replicas: [u16; REPLICAS],
}

impl Mesh {
    /// The destination's breaker key of replica `i` (its inbound cluster); `None` past the last.
    pub fn inbound_key(&self, i: usize) -> Option<String> {
        self.replicas.get(i).map(|port| inbound_cluster(*port))
    }

    /// The address the caller's sidecar knows replica `i` by (its sidecar's inbound listener), as
    /// Envoy writes it in `%UPSTREAM_HOST%` and `/clusters`.
    pub fn endpoint(&self, i: usize) -> Option<std::net::SocketAddr> {
        self.inbound.get(i).map(Envoy::listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::{render_config_with, workspace_root};
    use std::path::Path;

    /// Every placeholder of the four bootstraps is one the mesh fills, and the names Istio gives are
    /// there.
    #[test]
    fn the_sidecar_bootstraps_render() {
        for build in [Build::Wasm, Build::Native] {
            let inbound = render_config_with(
                &build.template(INBOUND),
                &UpstreamPorts::default(),
                Path::new("/x/cb.wasm"),
                "{}",
                &[("APP_PORT", "7001")],
            )
            .unwrap();
            assert!(inbound.contains("cluster: inbound|7001||"), "{inbound}");
            let outbound = render_config_with(
                &build.template(OUTBOUND),
                &UpstreamPorts::NEVER_ROUTED,
                Path::new("/x/cb.wasm"),
                "{}",
                &[
                    ("CONTENT_REPLICA_1", "7101"),
                    ("CONTENT_REPLICA_2", "7102"),
                    ("CONTENT_REPLICA_3", "7103"),
                ],
            )
            .unwrap();
            for expected in [
                "retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                "num_retries: 2",
                "envoy.retry_host_predicates.previous_hosts",
                "host_selection_retry_max_attempts: 5",
                "max_retries: 4294967295",
                "port_value: 7103",
            ] {
                assert!(outbound.contains(expected), "{expected}: {outbound}");
            }
        }
        assert!(workspace_root().join("envoy/inbound-native.yaml").is_file());
        assert_eq!(inbound_cluster(8080), "inbound|8080||");
    }
}
