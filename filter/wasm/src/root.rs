//! The root context: one per plugin configuration per worker VM. It validates the configuration
//! (refusing a bad one whole), and hands each new stream what it needs: the configuration, this
//! worker's registry and the metric ids.

use std::cell::RefCell;
use std::rc::Rc;

use cb_core::config::FilterConfig;
use cb_core::registry::Registry;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use crate::host::{self, HostStore};
use crate::http::Stream;
use crate::metrics::Metrics;

/// What every stream of one configuration shares (single-threaded: one VM per worker).
pub struct Shared {
    /// The validated configuration.
    pub config: FilterConfig,
    /// This worker's view of the breakers.
    pub registry: RefCell<Registry>,
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
        let bytes = host::plugin_configuration();
        match FilterConfig::from_json(&bytes) {
            Ok(config) => {
                if let Err(e) = Registry::ensure_index(&HostStore) {
                    // Not fatal: registration creates the index too. Worth a line, though.
                    host::log(
                        LogLevel::Warn,
                        &format!("circuit breaker: could not create the upstream index: {e}"),
                    );
                }
                host::log(
                    LogLevel::Info,
                    &format!(
                        "circuit breaker configured: upstream_key={} mode={} overrides={} max_upstreams={}",
                        config.upstream_key,
                        config.defaults.mode.as_str(),
                        config.override_count(),
                        config.max_upstreams
                    ),
                );
                let registry = RefCell::new(Registry::new(config.max_upstreams));
                self.shared = Some(Rc::new(Shared {
                    config,
                    registry,
                    metrics: RefCell::new(Metrics::default()),
                }));
                true
            }
            Err(e) => {
                // One line that names the field; returning false makes Envoy refuse the configuration
                // (at start-up, or as a NACK while the previous configuration keeps serving).
                host::log(
                    LogLevel::Error,
                    &format!("circuit breaker configuration rejected: {e}"),
                );
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
