//! A real Prometheus scraping the sidecar through an outage: the open-breaker alert expression of
//! `k8s/monitoring/rules.yaml` is true while the breaker is open and false after recovery, the alert
//! goes pending, and every Grafana dashboard query evaluates.

use super::*;

use std::net::TcpListener;
use std::process::{Child, Stdio};

use harness::envoy::{http_request, HttpResponse};

use super::rendered_filter::{filter_config, sidecar_filter};
use super::sidecar::{call, cluster, trip, CallResult, Sidecar};

/// A Prometheus on 127.0.0.1 with a free port and a temporary data directory, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

const PROMETHEUS_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on waiting for a query to show what a test waits for: scrapes and rule evaluations are every
/// second, so this is generous on a busy machine.
const QUERY_WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

impl Prometheus {
    /// Starts Prometheus scraping Envoy's admin `/stats/prometheus` every second, with `rule_files`
    /// evaluated every second. The scrape adds `namespace` and `pod` labels, as Kubernetes service
    /// discovery would.
    async fn start(envoy_admin: SocketAddr, rule_files: &[PathBuf]) -> Self {
        let binary = which(
            "prometheus",
            "`make test-k8s` installs it (Debian package `prometheus`)",
        );
        let mut dir = tempfile::tempdir().unwrap();
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": rule_files,
            "scrape_configs": [{
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{
                    "targets": [envoy_admin.to_string()],
                    "labels": {"namespace": "social", "pod": "web-7d9c-1"}
                }]
            }]
        });
        let config_path = dir.path().join("prometheus.yml");
        // JSON is YAML.
        fs::write(&config_path, config.to_string()).unwrap();
        // A free port can be taken between finding it and Prometheus binding it; try a few.
        for _ in 0..3 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut prometheus = Self { child, addr, dir };
            if prometheus.wait_ready().await {
                return prometheus;
            }
            dir = prometheus.take_dir();
        }
        panic!(
            "Prometheus did not start; log:\n{}",
            fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }

    /// Kills this instance and hands its directory back for another try.
    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        dir
    }

    /// True once `/-/ready` answers 200; false when the process exits or the wait times out.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + PROMETHEUS_START_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if matches!(http_request(self.addr, "GET", "/-/ready", &[]).await, Ok(r) if r.status == 200)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the `data.result` array, or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let path = format!("/api/v1/query?query={encoded}");
        let response: HttpResponse = http_request(self.addr, "GET", &path, &[])
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&response.body)
            .map_err(|e| format!("not JSON ({e}): {}", response.body))?;
        if body["status"] != "success" {
            return Err(format!(
                "{} {}: {}",
                body["errorType"], body["error"], response.body
            ));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Polls `promql` until `done` holds for its result, at most [`QUERY_WAIT`].
    async fn wait_for(
        &self,
        promql: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + QUERY_WAIT;
        let mut last = Err("not queried yet".to_string());
        while Instant::now() < deadline {
            last = self.query(promql).await;
            if let Ok(result) = &last {
                if done(result) {
                    return result.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{what}: not seen within {QUERY_WAIT:?}.\nquery: {promql}\nlast answer: {last:?}\n\
             Prometheus log:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rule of `k8s/monitoring/rules.yaml` by alert name.
fn alert_rule(name: &str) -> Value {
    let rules = yaml_file("monitoring/rules.yaml");
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .find(|r| r["alert"] == name)
        .unwrap_or_else(|| panic!("rules.yaml has no alert {name}"))
}

fn label<'a>(sample: &'a Value, name: &str) -> &'a str {
    sample["metric"][name].as_str().unwrap_or("")
}

/// A breaker opens in a dev sidecar (WasmPlugin form); Prometheus scrapes it: the open-breaker alert
/// expression is true, the alert goes pending, the dashboard queries evaluate; after recovery the
/// expression is false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_breaker_open_and_close() {
    let overlay = Overlay::find("dev");
    let docs = kustomize(&overlay.path());
    let config = filter_config(&docs, Side::Caller, overlay.loader);
    let sidecar = Sidecar::start(
        "k8s-prometheus",
        &sidecar_filter(&docs, Side::Caller, overlay.loader),
    )
    .await;
    sidecar.serves_one_call().await;
    let envoy = &sidecar.envoy;
    let prometheus = Prometheus::start(envoy.admin(), &[k8s("monitoring/rules.yaml")]).await;
    prometheus
        .wait_for("up{job=\"envoy\"} == 1", "Envoy scraped", |r| !r.is_empty())
        .await;

    let rule = alert_rule("CircuitBreakerOpen");
    let open_expr = rule["expr"].as_str().unwrap().trim().to_string();
    assert_eq!(rule["for"], "2m");
    let media = cluster(ServiceKind::Content);
    assert!(
        prometheus.query(&open_expr).await.unwrap().is_empty(),
        "the open-breaker expression holds before any outage"
    );

    // The outage: media-service fails; dev opens on the first failure.
    sidecar.content.set_fault(Fault::Unavailable).await.unwrap();
    let (_, reached) = trip(envoy, &sidecar.content, 10).await;
    assert_eq!(Some(reached), config["failure_threshold"].as_u64());
    assert_eq!(
        sidecar
            .metric("circuit_breaker_state", &[("upstream", media)])
            .await,
        1.0
    );

    let firing = prometheus
        .wait_for(&open_expr, "the open-breaker expression true", |r| {
            !r.is_empty()
        })
        .await;
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(label(&firing[0], "upstream"), media, "{firing:?}");
    assert_eq!(label(&firing[0], "namespace"), "social", "{firing:?}");
    // The rule itself, loaded by Prometheus from rules.yaml, sees it: pending for its 2 minutes.
    prometheus
        .wait_for(
            "ALERTS{alertname=\"CircuitBreakerOpen\", alertstate=\"pending\"}",
            "CircuitBreakerOpen pending",
            |r| r.iter().any(|s| label(s, "upstream") == media),
        )
        .await;

    // Every dashboard query is valid PromQL against the real metrics; the state panel shows it open.
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(k8s("monitoring/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    for (title, expr) in dashboard_queries(&dashboard) {
        let promql = grafana_to_promql(&expr);
        let result = prometheus
            .query(&promql)
            .await
            .unwrap_or_else(|e| panic!("dashboard panel {title:?}: {e}\n{promql}"));
        if title == "Breaker state per upstream" {
            assert!(
                result
                    .iter()
                    .any(|s| label(s, "upstream") == media && s["value"][1] == "1"),
                "{title}: {result:?}"
            );
        }
    }
    for name in [
        "CircuitBreakerHighRejectionRate",
        "CircuitBreakerFlapping",
        "CircuitBreakerReplicaHung",
    ] {
        let expr = alert_rule(name)["expr"].as_str().unwrap().to_string();
        prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    // Recovery: media-service answers again; after open_timeout a probe closes the breaker.
    sidecar.content.set_fault(Fault::Ok).await.unwrap();
    let deadline = Instant::now() + QUERY_WAIT;
    loop {
        let closed = matches!(
            call(envoy, ServiceKind::Content).await,
            CallResult::Passed(Ok(()))
        ) && sidecar
            .metric("circuit_breaker_state", &[("upstream", media)])
            .await
            == 0.0;
        if closed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker for {media} did not close within {QUERY_WAIT:?} of the recovery"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    prometheus
        .wait_for(
            &open_expr,
            "the open-breaker expression false after recovery",
            |r| r.is_empty(),
        )
        .await;
}

/// A dashboard query with Grafana's variables as Grafana would fill them for "All".
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$namespace", ".*")
        .replace("$upstream", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
}
