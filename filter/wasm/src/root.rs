//! The root context: one per plugin configuration per worker VM. It validates the configuration
//! (refusing a bad one whole), holds this worker's [`Worker`] and metric ids for every stream of that
//! configuration, and runs the stuck-call check on its tick.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use cb_core::config::FilterConfig;
use cb_core::store::SharedData;
use cb_core::telemetry::Level;
use cb_core::worker::Worker;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host::{self, HostStore, WasmHost};
use crate::http::Stream;
use crate::metrics::Metrics;

/// How often the stuck-call check runs (ms): calls are recorded within this of crossing the limit.
const STUCK_CHECK_PERIOD_MS: u32 = 50;

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
        worker.check_stuck(
            now,
            &mut WasmHost {
                metrics: &mut metrics,
            },
        );
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(self.shared.clone())))
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
        let mut worker = Worker::new(Arc::new(config), now, SharedData::new(HostStore, capacity));
        if let Err(e) = worker.prepare() {
            // Not fatal: a slot missing later is treated as empty. Worth a line, though.
            host::log(
                Level::Warn,
                &format!("circuit breaker: could not create the breaker table: {e}"),
            );
        }
        if stuck {
            let _ = crate::abi::set_tick_period(STUCK_CHECK_PERIOD_MS);
        }
        self.shared = Some(Rc::new(Shared {
            worker: RefCell::new(worker),
            metrics: RefCell::new(Metrics::default()),
        }));
    }
}
