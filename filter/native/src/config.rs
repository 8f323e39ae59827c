//! One filter configuration (`config_new`, on Envoy's main thread): the JSON validated by the core,
//! refused whole with the same line as the wasm build, and the metrics defined, since Envoy lets a
//! module define metrics nowhere else.
#![deny(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cb_core::config::{ConfigError, FilterConfig};
use cb_core::store::LocalStore;
use cb_core::telemetry::{Level, Telemetry};
use cb_core::worker::Worker;

use crate::host::{self, ConfigEnvoy, ConfigTelemetry, MetricIds};
use crate::scheduler::{ConfigScheduler, StreamSchedulers};
use crate::tables;
use crate::ticker::{self, Ticker};

/// One Envoy worker's breakers, over the process-wide table.
pub type NativeWorker = Worker<Arc<LocalStore>>;

/// The only `filter_name` this module serves (contract section 7).
pub const FILTER_NAME: &str = "circuit_breaker";

/// What one Envoy worker's streams share under one lock: the core worker, and the schedulers of its
/// streams that may be cut (together, so that the tick's cut orders reach only live schedulers: see
/// `scheduler.rs`).
#[derive(Debug)]
pub struct WorkerState {
    /// The core worker.
    pub core: NativeWorker,
    /// Its streams' schedulers, by token.
    pub schedulers: StreamSchedulers,
}

/// What every stream of one filter configuration shares. Immutable once built: streams on every worker
/// read it at once.
pub struct ModuleConfig {
    /// This configuration's place on the module's clock. Dropped first with the configuration, which
    /// takes it off the clock (see `ticker.rs`).
    _ticker: Option<Ticker>,
    /// The validated configuration.
    pub filter: Arc<FilterConfig>,
    /// Ids of the metrics defined for this configuration.
    pub metrics: MetricIds,
    /// One state per Envoy worker, each behind a lock its own thread takes (and the main thread,
    /// briefly, for the tick): never contended on a request's path.
    workers: Box<[Mutex<WorkerState>]>,
    /// Envoy's object for this configuration, to count and log outside streams.
    pub(crate) envoy: ConfigEnvoy,
}

impl ModuleConfig {
    /// The state of Envoy worker `index` (the last one for an index Envoy should not give).
    pub fn worker(&self, index: u32) -> Option<MutexGuard<'_, WorkerState>> {
        let slot = self
            .workers
            .get(index as usize)
            .or_else(|| self.workers.last())?;
        // A poisoned lock means a hook panicked holding it (and failed open); the worker's data is
        // whole between calls, so it goes on being used.
        Some(slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The tick (main thread, from the ticker's event), at `now_ms`: each worker's
    /// [`Worker::tick`], and each cut it orders committed to its stream's scheduler, under the
    /// worker's lock.
    pub fn tick(&self, now_ms: u64) {
        let mut telemetry = ConfigTelemetry::new(self);
        for slot in self.workers.iter() {
            let mut state = slot.lock().unwrap_or_else(PoisonError::into_inner);
            let orders = state.core.tick(now_ms, &mut telemetry);
            for order in orders {
                if !state.schedulers.commit(order) {
                    // Its stream ended without its session settling the call (a hook panicked).
                    telemetry.log(
                        Level::Debug,
                        "circuit breaker: a stuck call to cut has no stream any more",
                    );
                }
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
pub fn config_new(envoy: ConfigEnvoy, name: &[u8], bytes: &[u8]) -> Option<ModuleConfig> {
    let filter = match parse(name, bytes) {
        Ok(filter) => filter,
        Err(e) => {
            host::log(Level::Error, &e.rejected_line());
            return None;
        }
    };
    host::log_with(Level::Info, || filter.configured_line());
    let filter = Arc::new(filter);
    Some(ModuleConfig {
        workers: workers(&filter, host::concurrency()),
        metrics: MetricIds::define(envoy),
        _ticker: ticker(envoy, &filter),
        filter,
        envoy,
    })
}

/// The configuration's place on the module's clock, or `None` (said in a log line) when Envoy gave no
/// scheduler or the clock's thread could not start: stuck calls are then recorded only when they end,
/// and never cut.
fn ticker(envoy: ConfigEnvoy, filter: &FilterConfig) -> Option<Ticker> {
    let ticker = ConfigScheduler::new(envoy).and_then(|s| Ticker::start(s, ticker::period(filter)));
    if ticker.is_none() {
        host::log(
            Level::Warn,
            "circuit breaker: no timer for this configuration; stuck calls are recorded only when they end",
        );
    }
    ticker
}

/// One state per Envoy worker, all on the process-wide table for `max_upstreams`.
fn workers(filter: &Arc<FilterConfig>, concurrency: u32) -> Box<[Mutex<WorkerState>]> {
    let table = tables::table(filter.max_upstreams);
    let now = host::now_ms();
    (0..concurrency.max(1))
        .map(|i| {
            let core = Worker::new(Arc::clone(filter), now, Arc::clone(&table), seed(now, i));
            Mutex::new(WorkerState {
                core,
                schedulers: StreamSchedulers::default(),
            })
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
            ConfigEnvoy::stub(),
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
        assert!(config_new(ConfigEnvoy::stub(), b"other", b"{}").is_none());
        let logs = stubs::take().logs;
        assert!(logs.iter().any(|(l, m)| *l == LogLevel::Error
            && m == r#"circuit breaker configuration rejected: filter_name must be "circuit_breaker", got "other""#), "{logs:?}");
    }

    #[test]
    fn a_good_configuration_logs_and_defines_every_metric_with_its_labels() {
        stubs::take();
        let config = config_new(
            ConfigEnvoy::stub(),
            b"circuit_breaker",
            br#"{"failure_threshold": 3}"#,
        )
        .unwrap();
        assert_eq!(config.filter.defaults().failure_threshold, 3);
        assert_eq!(config.workers.len(), 2, "one per worker of the stub Envoy");
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
