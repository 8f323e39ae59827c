//! [`Launch`]: how an Envoy is started, the one place that does it. The end-to-end tests, the demo and
//! `make bench` all start theirs here; they differ only in the options below.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{
    envoy_binary, err, http_request, native_path, render_config_with, wasm_path, workspace_root,
    Envoy, Error, Result, UpstreamPorts,
};

/// How long Envoy may take to load the filter and open its listeners. V8 compiles the `.wasm` once
/// per worker, which takes seconds on a busy two-core machine, hence the generous bound.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long Envoy may take to give up on a configuration it refuses.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The tests' logging: the filter's debug lines, and the access log flushed often (it is buffered for
/// 10 s by default) so a test's log is complete.
const TEST_LOG_ARGS: [&str; 6] = [
    "--log-level",
    "info",
    "--component-log-level",
    "wasm:debug",
    "--file-flush-interval-msec",
    "100",
];

/// Where the files of a run go (rendered bootstrap, log, admin address), and how its shared memory is
/// kept apart from every other Envoy's on the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunFiles {
    /// `target/e2e/<name>-<pid>-<n>.*`, and a `--base-id` made of the pid and `n`: many Envoys at once
    /// from one process (the tests run in parallel), every log kept.
    PerInstance,
    /// `<dir>/<name>.*`, replaced by the next run of that name, and `--use-dynamic-base-id`.
    Fixed(PathBuf),
}

/// How to start an Envoy: the bootstrap template and what fills it, and its command line. The
/// defaults are the tests': `envoy/e2e.yaml`, two workers (so every behaviour is seen across two
/// workers sharing one breaker), verbose logs, files per instance, and an `ingress` listener.
#[derive(Debug, Clone)]
pub struct Launch {
    name: String,
    template: String,
    ports: UpstreamPorts,
    filter_config: String,
    vars: Vec<(String, String)>,
    concurrency: u32,
    cpus: Option<String>,
    files: RunFiles,
    log_args: Vec<String>,
    args: Vec<String>,
    main_listener: Option<String>,
}

impl Launch {
    /// An Envoy whose files are named after `name`, with the tests' defaults.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            template: "envoy/e2e.yaml".to_string(),
            ports: UpstreamPorts::default(),
            filter_config: "{}".to_string(),
            vars: Vec::new(),
            concurrency: 2,
            cpus: None,
            files: RunFiles::PerInstance,
            log_args: TEST_LOG_ARGS.map(str::to_string).to_vec(),
            args: Vec::new(),
            main_listener: Some("ingress".to_string()),
        }
    }

    /// The bootstrap template, relative to the workspace root (an absolute path works too).
    pub fn template(mut self, template: &str) -> Self {
        self.template = template.to_string();
        self
    }

    /// The upstream ports the template routes to.
    pub fn ports(mut self, ports: UpstreamPorts) -> Self {
        self.ports = ports;
        self
    }

    /// The filter's JSON configuration (`{{FILTER_CONFIG}}`).
    pub fn filter_config(mut self, json: &str) -> Self {
        self.filter_config = json.to_string();
        self
    }

    /// Fills the template's own placeholder `{{name}}` with `value`, verbatim.
    pub fn var(mut self, name: &str, value: impl Into<String>) -> Self {
        self.vars.push((name.to_string(), value.into()));
        self
    }

    /// Envoy's worker threads.
    pub fn concurrency(mut self, workers: u32) -> Self {
        self.concurrency = workers;
        self
    }

    /// Pins Envoy to these CPUs (`taskset -c`, a list such as `0` or `1,2`); `None`: not pinned.
    pub fn cpus(mut self, cpus: Option<&str>) -> Self {
        self.cpus = cpus.map(str::to_string);
        self
    }

    /// Where the run's files go.
    pub fn files(mut self, files: RunFiles) -> Self {
        self.files = files;
        self
    }

    /// Replaces the tests' logging flags (e.g. `["--log-level", "warn"]`: nothing per request).
    pub fn log_args(mut self, args: &[&str]) -> Self {
        self.log_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Further flags, after all the others (e.g. `["--drain-time-s", "0"]`: a replaced listener's
    /// filter chains drain, and are destroyed, at once).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The listener [`Envoy::listener`] addresses, which start-up waits for; `None` for a bootstrap
    /// without a main listener (then [`Envoy::listener`] is port 0; use [`Envoy::port`]).
    pub fn main_listener(mut self, name: Option<&str>) -> Self {
        self.main_listener = name.map(str::to_string);
        self
    }

    /// Starts Envoy and waits until it is ready and every listener is bound.
    pub async fn start(&self) -> Result<Envoy> {
        let (files, child, command) = self.spawn()?;
        let mut envoy = Envoy {
            child,
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listener: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listeners: BTreeMap::new(),
            log: files.log.clone(),
            command,
        };
        wait_ready(&mut envoy, &files, self.main_listener.as_deref()).await?;
        Ok(envoy)
    }

    /// Starts Envoy with a configuration it should refuse, and returns its log once it has exited.
    /// Fails if Envoy comes up and serves instead.
    pub async fn start_expecting_failure(&self) -> Result<String> {
        let (files, mut child, _) = self.spawn()?;
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

    /// Renders the bootstrap, writes it, and starts Envoy with its output going to the log. Returns
    /// the files, the process and its command line.
    fn spawn(&self) -> Result<(Files, Child, String)> {
        let files = Files::new(&self.name, &self.files)?;
        let vars: Vec<(&str, &str)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let rendered = render_config_with(
            &self.template,
            &self.ports,
            &wasm_path()?,
            &self.filter_config,
            &vars,
        )?;
        fs::write(&files.config, rendered)?;
        let argv = self.argv(&files)?;
        let command = argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        fs::File::create(&files.log)?;
        // Append mode: Envoy reopens /dev/stderr for the access log (a new file description with its
        // own offset), and only appending writers keep the two streams from overwriting each other.
        let log = fs::OpenOptions::new().append(true).open(&files.log)?;
        let log_err = log.try_clone()?;
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error("empty command".into()))?;
        let child = Command::new(program)
            .args(args)
            .envs(native_path().ok().and_then(|p| {
                let dir = p.parent()?.to_path_buf();
                Some(("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir))
            }))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| Error(format!("cannot start Envoy ({command}): {e}")))?;
        Ok((files, child, command))
    }

    /// `[taskset -c CPUS] envoy --config-path … --concurrency N <base id> --admin-address-path … <log>
    /// <args>`.
    fn argv(&self, files: &Files) -> Result<Vec<OsString>> {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(cpus) = &self.cpus {
            argv.extend(["taskset", "-c", cpus].map(OsString::from));
        }
        argv.push(envoy_binary()?.into());
        argv.push("--config-path".into());
        argv.push(files.config.clone().into());
        argv.push("--concurrency".into());
        argv.push(self.concurrency.to_string().into());
        match files.base_id {
            Some(id) => argv.extend(["--base-id".into(), id.to_string().into()]),
            // Never collide with another Envoy on this machine (the e2e suite may be running).
            None => argv.push("--use-dynamic-base-id".into()),
        }
        argv.push("--admin-address-path".into());
        argv.push(files.admin_address.clone().into());
        argv.extend(self.log_args.iter().map(OsString::from));
        argv.extend(self.args.iter().map(OsString::from));
        Ok(argv)
    }
}

/// Gives every Envoy of this process its own name and base id.
static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// The files of one Envoy run, and its base id (`None`: dynamic).
struct Files {
    config: PathBuf,
    log: PathBuf,
    admin_address: PathBuf,
    base_id: Option<u32>,
}

impl Files {
    fn new(name: &str, how: &RunFiles) -> Result<Self> {
        let (dir, stem, base_id) = match how {
            RunFiles::PerInstance => {
                let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
                let pid = std::process::id();
                // Distinct per process and instance, so parallel Envoys never share hot-restart memory.
                let base_id = (pid % 40_000) * 100 + n % 100;
                (e2e_dir(), format!("{name}-{pid}-{n}"), Some(base_id))
            }
            RunFiles::Fixed(dir) => (dir.clone(), name.to_string(), None),
        };
        fs::create_dir_all(&dir)
            .map_err(|e| Error(format!("cannot create {}: {e}", dir.display())))?;
        let files = Self {
            config: dir.join(format!("{stem}.yaml")),
            log: dir.join(format!("{stem}.log")),
            admin_address: dir.join(format!("{stem}.admin")),
            base_id,
        };
        // A stale admin address file from an earlier run would fool the wait for readiness.
        let _ = fs::remove_file(&files.admin_address);
        Ok(files)
    }
}

/// Directory for the tests' Envoy logs and rendered configs: `target/e2e/`.
fn e2e_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("e2e")
}

/// Waits until Envoy's admin says ready, every listener is bound and `main` (if any) is among them.
async fn wait_ready(envoy: &mut Envoy, files: &Files, main: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = envoy.child.try_wait()? {
            return err(format!(
                "Envoy exited during start-up ({status}); log {}:\n{}",
                envoy.log.display(),
                envoy.log()
            ));
        }
        if let Some(admin) = read_admin_address(&files.admin_address) {
            envoy.admin = admin;
            if matches!(envoy.admin_get("/ready").await, Ok(r) if r.status == 200) {
                if let Some(listeners) = bound_listeners(admin).await {
                    let port = match main {
                        Some(name) => listeners.get(name).copied(),
                        None => Some(0),
                    };
                    if let Some(port) = port {
                        envoy.listener = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                        envoy.listeners = listeners;
                        return Ok(());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return err(format!(
                "Envoy not ready after {START_TIMEOUT:?}; log {}:\n{}",
                envoy.log.display(),
                envoy.log()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every listener's port (they were configured with port 0), once Envoy lists at least one and all are
/// bound.
async fn bound_listeners(admin: SocketAddr) -> Option<BTreeMap<String, u16>> {
    let response = http_request(admin, "GET", "/listeners?format=json", &[])
        .await
        .ok()?;
    let json: serde_json::Value = serde_json::from_str(&response.body).ok()?;
    let mut out = BTreeMap::new();
    for listener in json.get("listener_statuses")?.as_array()? {
        let name = listener.get("name")?.as_str()?;
        let port = listener
            .pointer("/local_address/socket_address/port_value")?
            .as_u64()?;
        out.insert(
            name.to_string(),
            u16::try_from(port).ok().filter(|p| *p != 0)?,
        );
    }
    (!out.is_empty()).then_some(out)
}

fn read_admin_address(path: &Path) -> Option<SocketAddr> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}
