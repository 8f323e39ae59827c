//! One filter configuration (`config_new`, on Envoy's main thread): the JSON validated by the core,
//! refused whole with the same line as the wasm build, and the metrics defined, since Envoy lets a
//! module define metrics nowhere else.
#![deny(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cb_core::config::{ConfigError, FilterConfig};
use cb_core::store::LocalStore;
use cb_core::telemetry::Level;
use cb_core::worker::Worker;

use crate::abi;
use crate::host::{self, ConfigEnvoy, ConfigScheduler, ConfigTelemetry, MetricIds};
use crate::tables;
use crate::ticker::Ticker;

/// One Envoy worker's breakers, over the process-wide table.
pub type NativeWorker = Worker<Arc<LocalStore>>;

/// The only `filter_name` this module serves (contract section 7).
pub const FILTER_NAME: &str = "circuit_breaker";

/// What every stream of one filter configuration shares. Immutable once built: streams on every worker
/// read it at once.
pub struct ModuleConfig {
    /// The validated configuration.
    pub filter: Arc<FilterConfig>,
    /// Ids of the metrics defined for this configuration.
    pub metrics: MetricIds,
    /// Envoy's worker count when the configuration was made, for per-worker state.
    pub concurrency: u32,
    /// One core worker per Envoy worker, each behind a lock its own thread takes (and the main thread,
    /// briefly, for the stuck-call check): never contended on a request's path.
    workers: Box<[Mutex<NativeWorker>]>,
    /// Envoy's object for this configuration, to count and log outside streams.
    pub(crate) envoy: ConfigEnvoy,
    /// The stuck-call check's clock, when a breaker tracks stuck calls. Dropped with the
    /// configuration, which stops it.
    ticker: Option<Ticker>,
}

impl ModuleConfig {
    /// The core worker of Envoy worker `index` (the last one for an index Envoy should not give).
    pub fn worker(&self, index: u32) -> Option<MutexGuard<'_, NativeWorker>> {
        let slot = self
            .workers
            .get(index as usize)
            .or_else(|| self.workers.last())?;
        // A poisoned lock means a hook panicked holding it (and failed open); the worker's data is
        // whole between calls, so it goes on being used.
        Some(slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The stuck-call check over every worker's calls in flight (main thread, from the ticker).
    pub fn check_stuck(&self) {
        let now = host::now_ms();
        let mut telemetry = ConfigTelemetry::new(self);
        for index in 0..self.workers.len() {
            if let Some(mut w) = self.worker(index as u32) {
                // Cuts are not delivered by this build yet: the orders are dropped.
                let _ = w.tick(now, &mut telemetry);
            }
        }
    }
}

// Streams on every worker read one configuration at once, and it may be dropped on any of them.
const _: fn() = || {
    fn shared_across_workers<T: Send + Sync>() {}
    shared_across_workers::<ModuleConfig>();
};

/// Parses and validates the configuration bytes (the `filter_config` StringValue, or a Struct as
/// JSON). Safe and free of Envoy calls, so it can be fuzzed.
pub fn config_from_bytes(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
    FilterConfig::from_json(bytes)
}

/// The configuration for `filter_name` `name`: only [`FILTER_NAME`] is served.
fn parse(name: &[u8], bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
    if name != FILTER_NAME.as_bytes() {
        return Err(ConfigError {
            field: "filter_name".into(),
            value: format!("{:?}", String::from_utf8_lossy(name)),
            allowed: format!("{FILTER_NAME:?}"),
        });
    }
    config_from_bytes(bytes)
}

/// `config_new`: the configuration for Envoy to keep, or `None` to make Envoy refuse it (at start-up,
/// or as a NACK of an update while the previous configuration keeps serving).
pub fn config_new(envoy: abi::ConfigEnvoyPtr, name: &[u8], bytes: &[u8]) -> Option<ModuleConfig> {
    let filter = match parse(name, bytes) {
        Ok(filter) => filter,
        Err(e) => {
            host::log(Level::Error, &e.rejected_line());
            return None;
        }
    };
    host::log_with(Level::Info, || filter.configured_line());
    let envoy = ConfigEnvoy::new(envoy);
    let filter = Arc::new(filter);
    let concurrency = host::concurrency();
    let mut config = ModuleConfig {
        workers: workers(&filter, concurrency),
        filter,
        metrics: MetricIds::define(envoy),
        concurrency,
        envoy,
        ticker: None,
    };
    if config.filter.tracks_stuck_calls() {
        config.ticker = ticker(envoy);
    }
    Some(config)
}

/// The stuck-call check's clock, or `None` (said in a log line) when Envoy gave no scheduler or no
/// thread could start: the check then runs only when a request comes for the upstream.
fn ticker(envoy: ConfigEnvoy) -> Option<Ticker> {
    let ticker = ConfigScheduler::new(envoy).and_then(Ticker::start);
    if ticker.is_none() {
        host::log(
            Level::Warn,
            "circuit breaker: no timer for the stuck-call check; it runs only when a request comes",
        );
    }
    ticker
}

/// One core worker per Envoy worker, all on the process-wide table for `max_upstreams`.
fn workers(filter: &Arc<FilterConfig>, concurrency: u32) -> Box<[Mutex<NativeWorker>]> {
    let table = tables::table(filter.max_upstreams);
    let now = host::now_ms();
    (0..concurrency.max(1))
        .map(|i| {
            let seed = seed(now, i);
            Mutex::new(Worker::new(
                Arc::clone(filter),
                now,
                Arc::clone(&table),
                seed,
            ))
        })
        .collect()
}

/// A seed for worker `index`'s random draws (the jitter of open times): the standard library's hash
/// keys, drawn from the OS once per process and advanced per use, mixed with the time and the index,
/// so every worker of every Envoy draws its own sequence.
fn seed(now_ms: u64, index: u32) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((now_ms, index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{stubs, LogLevel};
    use cb_core::telemetry::Metric;

    #[test]
    fn a_bad_configuration_is_refused_with_the_wasm_line() {
        stubs::take();
        let refused = config_new(
            stubs::fake_envoy_ptr(),
            b"circuit_breaker",
            br#"{"failure_threshold": -1}"#,
        );
        assert!(refused.is_none());
        let logs = stubs::take().logs;
        let (level, line) = logs.first().unwrap();
        assert_eq!(*level, LogLevel::Error);
        let expected = config_from_bytes(br#"{"failure_threshold": -1}"#)
            .unwrap_err()
            .rejected_line();
        assert_eq!(line, &expected);
        assert!(
            line.starts_with("circuit breaker configuration rejected: failure_threshold"),
            "{line}"
        );
    }

    #[test]
    fn another_filter_name_is_refused() {
        stubs::take();
        assert!(config_new(stubs::fake_envoy_ptr(), b"other", b"{}").is_none());
        let logs = stubs::take().logs;
        assert!(logs.iter().any(|(l, m)| *l == LogLevel::Error
            && m == r#"circuit breaker configuration rejected: filter_name must be "circuit_breaker", got "other""#), "{logs:?}");
    }

    #[test]
    fn a_good_configuration_logs_and_defines_every_metric_with_its_labels() {
        stubs::take();
        let config = config_new(
            stubs::fake_envoy_ptr(),
            b"circuit_breaker",
            br#"{"failure_threshold": 3}"#,
        )
        .unwrap();
        assert_eq!(config.filter.defaults().failure_threshold, 3);
        assert_eq!(config.concurrency, 2, "the stub Envoy has two workers");
        let recorded = stubs::take();
        assert!(
            recorded.logs.iter().any(|(l, m)| *l == LogLevel::Info
                && m.starts_with("circuit breaker configured: upstream_key=cluster mode=enforce")),
            "{:?}",
            recorded.logs
        );
        let expected: Vec<(String, Vec<String>)> = Metric::ALL
            .iter()
            .map(|m| {
                (
                    m.name().to_string(),
                    m.labels().iter().map(|l| l.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(recorded.defined, expected);
    }
}
