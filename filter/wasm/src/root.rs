//! The root context: one per plugin configuration per worker VM. It validates the configuration
//! (refusing a bad one whole), holds this worker's [`Worker`] and metric ids for every stream of that
//! configuration, and runs the stuck-call check on its tick.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use cb_core::config::FilterConfig;
use cb_core::session::deliver_cut;
use cb_core::store::SharedData;
use cb_core::telemetry::Level;
use cb_core::worker::Worker;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host::{self, HostStore, WasmHost};
use crate::http::Stream;
use crate::metrics::Metrics;

/// How often the tick runs when a breaker tracks stuck calls (ms): calls are recorded within this of
/// crossing the limit, and cut within this of the breaker opening.
const STUCK_CHECK_PERIOD_MS: u32 = 50;
/// How often it runs otherwise: the state gauges are set again from the stored states every second
/// ([`cb_core::worker::GAUGE_RESYNC_MS`]).
const IDLE_TICK_PERIOD_MS: u32 = 1_000;

/// This worker's breakers over Envoy shared data.
pub type WasmWorker = Worker<SharedData<HostStore>>;

/// What every stream of one configuration shares (single-threaded: one VM per worker).
pub struct Shared {
    /// This worker's view of the breakers.
    pub worker: RefCell<WasmWorker>,
    /// Metric ids.
    pub metrics: RefCell<Metrics>,
}

/// The root context.
#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match FilterConfig::from_json(&host::plugin_configuration()) {
            Ok(config) => {
                self.start(config);
                true
            }
            Err(e) => {
                // One line that names the field; returning false makes Envoy refuse the configuration
                // (at start-up, or as a NACK while the previous configuration keeps serving).
                host::log(
                    Level::Error,
                    &format!("circuit breaker configuration rejected: {e}"),
                );
                false
            }
        }
    }

    /// The worker's tick; then each stuck call it orders cut is answered from here: the stream is
    /// made the effective context, and the core's reply sent to it. Envoy sends the reply once the
    /// tick returns, and resets the upstream request. Stream ids are this VM's own, so each worker
    /// cuts its own calls; a stream that ended meanwhile is refused (`BadArgument`) and skipped.
    fn on_tick(&mut self) {
        let Some(shared) = self.shared.as_ref() else {
            return;
        };
        let (Ok(mut worker), Ok(mut metrics), Some(now)) = (
            shared.worker.try_borrow_mut(),
            shared.metrics.try_borrow_mut(),
            host::now_ms(),
        ) else {
            return;
        };
        let mut host = WasmHost {
            metrics: &mut metrics,
            stream: None,
        };
        for order in worker.tick(now, &mut host) {
            let Ok(stream) = u32::try_from(order.stream) else {
                continue;
            };
            if crate::abi::set_effective_context(stream).is_ok() {
                deliver_cut(&mut worker, &mut host, order.call);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(self.shared.clone(), context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    fn start(&mut self, config: FilterConfig) {
        host::log(Level::Info, &config.configured_line());
        let stuck = config.tracks_stuck_calls();
        let capacity = config.max_upstreams;
        let now = host::now_ms().unwrap_or(0);
        let store = SharedData::new(HostStore, capacity);
        let mut worker = Worker::new(Arc::new(config), now, store, seed(now));
        if let Err(e) = worker.prepare() {
            // Not fatal: a slot missing later is treated as empty. Worth a line, though.
            host::log(
                Level::Warn,
                &format!("circuit breaker: could not create the breaker table: {e}"),
            );
        }
        let period = if stuck {
            STUCK_CHECK_PERIOD_MS
        } else {
            IDLE_TICK_PERIOD_MS
        };
        let _ = crate::abi::set_tick_period(period);
        self.shared = Some(Rc::new(Shared {
            worker: RefCell::new(worker),
            metrics: RefCell::new(Metrics::default()),
        }));
    }
}

/// A seed for this worker's random draws (the jitter of open times): the standard library's hash
/// keys, which on `wasm32-wasip1` come from WASI `random_get` (Envoy fills it from its own random
/// source), mixed with the time. Each worker VM draws its own, so breakers of one fleet, and of one
/// Envoy's workers, do not share a sequence.
fn seed(now_ms: u64) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(now_ms)
}
