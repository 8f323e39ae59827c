//! Reliability and security (issue 7): the built `.wasm` in a real Envoy (two workers) under load and
//! faults, through live reconfiguration, against hostile input and against foreign bytes in its shared
//! data. What each test holds and the figures measured are in RELIABILITY.md. The tests live in
//! `reliability/`, one file per section of RELIABILITY.md; this file holds the helpers they share and
//! the file-based LDS bed of sections 2 and 4.
//!
//! - Module `chaos`, [`chaos::chaos_under_load`]: 16 concurrent gRPC clients while the upstream goes
//!   down, hangs, resets and flaps. Every call gets an answer of the contract; the breaker opens, fails
//!   fast and recovers; every call is counted exactly once (no outcome lost to CAS races between the
//!   workers).
//! - Module `reconfiguration`,
//!   [`reconfiguration::live_reconfiguration_keeps_state_and_refuses_a_bad_config`]: file-based LDS
//!   (`envoy/lds.yaml`); new filter configurations swapped in under load keep the breakers' state; bad
//!   ones are refused while the last good one keeps serving; no request fails.
//! - Hostile input, module `hostile_traffic`: [`hostile_traffic::a_flood_of_distinct_keys_stays_bounded`]
//!   (100,000 `header:` keys), [`hostile_traffic::malformed_grpc_status_and_message_are_failures`] (a
//!   raw HTTP/2 upstream); module `hostile_configs`:
//!   [`hostile_configs::thousands_of_overrides_load_and_apply`],
//!   [`hostile_configs::deep_nesting_and_too_many_overrides_are_refused`],
//!   [`hostile_configs::huge_configs_are_refused_in_a_short_line`].
//! - Corrupt shared data, module `corrupt_shared_data`:
//!   [`corrupt_shared_data::corrupt_shared_data_fails_open_and_restarts`] and
//!   [`corrupt_shared_data::empty_bytes_under_a_breaker_key_are_corrupt_state`]: a second wasm module on
//!   the breaker's `vm_id` (`tests/fixtures/corruptor`) writes foreign bytes under the breaker's keys.
//!
//! Run with `make test-e2e` (it builds the filter and the corruptor fixture first), or, after those
//! builds, `ENVOY=/path/to/envoy cargo test -p circuit-breaker-e2e --test reliability`.

// Integration tests: clippy's allow-*-in-tests settings cover `#[test]` functions but not the helper
// functions of a test crate, and a failed `unwrap` in a helper is a failed test, as intended.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "reliability/chaos.rs"]
mod chaos;
#[path = "reliability/corrupt_shared_data.rs"]
mod corrupt_shared_data;
#[path = "reliability/hostile_configs.rs"]
mod hostile_configs;
#[path = "reliability/hostile_traffic.rs"]
mod hostile_traffic;
#[path = "reliability/reconfiguration.rs"]
mod reconfiguration;

use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::pb::content_service_client::ContentServiceClient;
use e2e::pb::user_service_client::UserServiceClient;
use e2e::{
    health_entry, workspace_root, Build, Envoy, Fault, GrpcService, HttpServer, Metrics, TestBed,
    Upstreams,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on one call through Envoy. Every upstream call of these tests ends well within it (refused,
/// reset, or cut by `call_timeout`), so reaching it means a hung call: a failure, never a wait.
const CALL_BOUND: Duration = Duration::from_secs(10);

/// The two heavy load tests take turns: on a two-core machine, two floods at once would only measure
/// the scheduler. The other tests run alongside them.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What Envoy logs when a wasm VM traps (`Function: proxy_on_... failed: Uncaught RuntimeError: ...`)
/// or the filter panics (its panic hook's line). None may ever appear. (Envoy's "Wasm VM failed" is
/// not one: it also says that when `on_configure` refuses a configuration, as designed.)
const TRAP_MARKERS: [&str; 3] = ["panicked", "Uncaught", "RuntimeError"];

// ---- small helpers -----------------------------------------------------------------------------

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_BOUND:?}"))
}

/// Polls `f` until it returns true, at most `tries` times, 50 ms apart.
async fn eventually<F, Fut>(what: &str, tries: u32, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..tries {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn meta<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|v| v.to_str().ok())
}

/// The breaker's rejection of contract section 4 (gRPC form), for upstream `key`.
fn is_rejection(status: &Status, key: &str) -> bool {
    status.code() == Code::Unavailable
        && matches!(
            meta(status, "x-circuit-breaker"),
            Some("open" | "half_open")
        )
        && status.message() == format!("circuit breaker open for {key}")
}

async fn get_post(channel: &Channel, metadata: &[(&'static str, &str)]) -> Result<(), Status> {
    let mut client = ContentServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(e2e::pb::GetPostRequest {
        post_id: "1".into(),
    });
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    bounded("GetPost", client.get_post(request))
        .await
        .map(|_| ())
}

async fn get_user(channel: &Channel) -> Result<(), Status> {
    let mut client = UserServiceClient::new(channel.clone());
    let request = e2e::pb::GetUserRequest {
        user_id: "u".into(),
    };
    bounded("GetUser", client.get_user(request))
        .await
        .map(|_| ())
}

/// The health endpoint: status code and JSON.
async fn health(envoy: &Envoy, path: &str) -> (u16, Value) {
    e2e::health(envoy, path).await.unwrap()
}

/// Calls let through and recorded + calls rejected + calls untracked: every call the filter admitted
/// or refused, each exactly once (health requests and the corruptor's replies are neither).
fn accounted(m: &Metrics) -> f64 {
    m.sum("circuit_breaker_calls_total", &[])
        + m.sum("circuit_breaker_rejected_calls_total", &[])
        + m.value("circuit_breaker_untracked_calls_total", &[])
            .unwrap_or(0.0)
}

fn global(m: &Metrics, name: &str) -> f64 {
    m.value(name, &[]).unwrap_or(0.0)
}

/// Fails if Envoy's log shows a trapped VM or a panicking filter.
#[track_caller]
fn assert_no_trap(envoy: &Envoy) {
    let log = envoy.log();
    for marker in TRAP_MARKERS {
        if let Some(line) = log.lines().find(|l| l.contains(marker)) {
            panic!(
                "the filter trapped ({marker}): {line}\nlog: {}",
                envoy.log_path().display()
            );
        }
    }
}

fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("e2e")
        .join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- file-based LDS (live reconfiguration, corruptor) -------------------------------------------

/// The demo services behind an Envoy whose listener comes from a file (`envoy/lds.yaml`).
struct LdsBed {
    user: GrpcService,
    content: GrpcService,
    feed: GrpcService,
    _auth: GrpcService,
    _web: HttpServer,
    envoy: Envoy,
    /// The listener template (`envoy/lds-listener*.yaml`, for the build under test).
    template: String,
    /// The file Envoy watches.
    lds: PathBuf,
    version: u32,
}

/// The corruptor fixture: `CB_CORRUPTOR_WASM`, else where `make test-e2e` builds it.
fn corruptor_path() -> PathBuf {
    let path = std::env::var_os("CB_CORRUPTOR_WASM")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || workspace_root().join("target/fixtures/wasm32-wasip1/release/corruptor.wasm"),
            PathBuf::from,
        );
    assert!(
        path.is_file(),
        "no corruptor fixture at {}: run `make test-e2e`, or `cargo build --manifest-path \
         tests/fixtures/corruptor/Cargo.toml --target wasm32-wasip1 --release --target-dir target/fixtures`",
        path.display()
    );
    path
}

/// Renders a listener template with `filter_config` (and the paths of the built modules).
fn render_listener(template: &str, version: u32, filter_config: &str) -> String {
    let text = fs::read_to_string(workspace_root().join(template)).unwrap();
    let wasm = e2e::wasm_path().unwrap();
    let mut rendered = text
        .replace("{{VERSION}}", &version.to_string())
        .replace("{{WASM_PATH}}", wasm.to_str().unwrap())
        // A JSON string is a valid YAML double-quoted scalar.
        .replace(
            "{{FILTER_CONFIG}}",
            &Value::String(filter_config.to_string()).to_string(),
        );
    if rendered.contains("{{CORRUPTOR_PATH}}") {
        rendered = rendered.replace("{{CORRUPTOR_PATH}}", corruptor_path().to_str().unwrap());
    }
    assert!(
        !rendered.contains("{{"),
        "unfilled placeholder in {template}"
    );
    rendered
}

/// Writes `content` to `path` the way Envoy wants it: a complete file renamed over the watched one.
fn replace_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("yaml.tmp");
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

impl LdsBed {
    /// Starts with the listener `template`, in its twin for the build under test.
    async fn start(name: &str, template: &str, filter_config: &Value) -> Self {
        let template = Build::from_env().template(template);
        let upstreams = Upstreams::start().await.unwrap();
        let ports = upstreams.ports();
        let lds = run_dir(name).join("lds.yaml");
        replace_atomically(
            &lds,
            &render_listener(&template, 1, &filter_config.to_string()),
        );
        let envoy = Envoy::start_with(
            name,
            "envoy/lds.yaml",
            &ports,
            &filter_config.to_string(),
            &[("LDS_PATH", lds.to_str().unwrap())],
        )
        .await
        .unwrap();
        let Upstreams {
            user,
            content,
            feed,
            auth,
            web,
        } = upstreams;
        Self {
            user,
            content,
            feed,
            _auth: auth,
            _web: web,
            envoy,
            template,
            lds,
            version: 1,
        }
    }

    async fn lds_counter(&self, which: &str) -> f64 {
        let m = self.envoy.metrics().await.unwrap();
        global(&m, &format!("envoy_listener_manager_lds_{which}"))
    }

    /// Publishes a new filter configuration and waits until Envoy has taken (`update_success`) or
    /// refused (`update_rejected`) it, as `expect` says.
    async fn publish(&mut self, filter_config: &str, expect: &str) {
        let before = self.lds_counter(expect).await;
        self.version += 1;
        replace_atomically(
            &self.lds,
            &render_listener(&self.template, self.version, filter_config),
        );
        let what = format!("lds {expect} after version {}", self.version);
        eventually(&what, 400, || async {
            self.lds_counter(expect).await > before
        })
        .await;
    }

    /// `version_info` of the listener configuration Envoy serves (the `lds.version_text` readout).
    async fn listener_version(&self) -> String {
        let stats = self
            .envoy
            .admin_get("/stats?filter=lds.version_text")
            .await
            .unwrap()
            .body;
        stats
            .lines()
            .find_map(|l| l.strip_prefix("listener_manager.lds.version_text:"))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("no lds.version_text in {stats}"))
    }
}
