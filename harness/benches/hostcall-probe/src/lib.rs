//! A proxy-wasm module that makes one kind of host call `N` times in `on_http_request_headers`, for
//! pricing host calls in Envoy (`make bench`, phase "host calls"). The kind comes from the request's
//! `x-probe` header; `N` is the plugin configuration (a decimal number).
//!
//! Every request also pays the `x-probe` read and the module's callbacks; the bench subtracts the cost
//! of `x-probe: none` from each kind's, and divides by `N`.
//!
//! | `x-probe` | host call | hands back data (allocated inside the VM) |
//! | --- | --- | --- |
//! | `none` | – | |
//! | `property_cluster` | `get_property(xds.cluster_name)` | yes |
//! | `property_flags` | `get_property(response.flags)` | yes |
//! | `request_header` | `get_header_map_value(request, content-type)` | yes |
//! | `shared_get` | `get_shared_data` of one breaker's slot, as the filter stores it | yes |
//! | `shared_set` | `set_shared_data` of that slot | no |
//! | `clock` | `get_current_time` | no |
//! | `metric` | `increment_metric` | no |
//! | `core` | none: one `Worker::admit` + `record` of the breaker core through shared data on an in-VM store (decode, decide, encode, CAS), the filter's own compute per call | – |

use std::cell::RefCell;
use std::sync::Arc;

use cb_core::breaker::Breaker;
use cb_core::classify::{Classification, Outcome};
use cb_core::codec;
use cb_core::config::{BreakerConfig, FilterConfig};
use cb_core::host::Bare;
use cb_core::store::{MemoryStore, SharedData, Slot};
use cb_core::telemetry::Discard;
use cb_core::worker::{Admission, Worker};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};

const KEY: &str = "hostcall_probe.state";
const UPSTREAM: &str = "outbound|8080||content.default.svc.cluster.local";

/// One breaker's slot as the filter keeps it in shared data: the key, its times, a Closed breaker with
/// a count window of 100.
fn slot_bytes() -> Vec<u8> {
    codec::encode_slot(Some(&Slot {
        key: UPSTREAM.to_string(),
        last_call_ms: 1,
        shaped_ms: 0,
        breaker: Breaker::new(&BreakerConfig::default()),
    }))
}

/// `x-probe: core`: the core worker of this VM (one VM per Envoy worker, so per thread), over shared
/// data kept in the VM.
struct Core {
    worker: Worker<SharedData<MemoryStore>>,
    now_ms: u64,
}

thread_local! {
    static CORE: RefCell<Core> = RefCell::new(Core {
        worker: Worker::new(
            Arc::new(FilterConfig::default()),
            0,
            SharedData::new(MemoryStore::new(), 1024),
            0,
        ),
        now_ms: 0,
    });
    static SLOT: Vec<u8> = slot_bytes();
}

fn core_call() {
    CORE.with(|core| {
        let Ok(mut core) = core.try_borrow_mut() else {
            return;
        };
        let core = &mut *core;
        core.now_ms += 1;
        let mut host = Bare {
            now_ms: core.now_ms,
            telemetry: Discard,
        };
        if let Admission::Allow(call) = core.worker.admit(UPSTREAM, &mut host) {
            let ok = Classification {
                outcome: Outcome::Success,
                slow: false,
            };
            core.worker.record(call, ok, core.now_ms, &mut Discard);
        }
    });
}

fn set_slot() -> bool {
    SLOT.with(|v| hostcalls::set_shared_data(KEY, Some(v), None).is_ok())
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

#[derive(Default)]
struct Root {
    times: u32,
    metric: u32,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.times = std::str::from_utf8(&config)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(10);
        self.metric =
            hostcalls::define_metric(MetricType::Counter, "hostcall_probe_total").unwrap_or(0);
        CORE.with(|core| {
            if let Ok(mut core) = core.try_borrow_mut() {
                let _ = core.worker.prepare();
            }
        });
        set_slot()
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            times: self.times,
            metric: self.metric,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    times: u32,
    metric: u32,
}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let probe = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-probe")
            .ok()
            .flatten()
            .unwrap_or_default();
        for _ in 0..self.times {
            // Results are dropped: what is measured is the call, including handing back its data.
            match probe.as_slice() {
                b"property_cluster" => drop(hostcalls::get_property(vec!["xds", "cluster_name"])),
                b"property_flags" => drop(hostcalls::get_property(vec!["response", "flags"])),
                b"request_header" => drop(hostcalls::get_map_value_bytes(
                    MapType::HttpRequestHeaders,
                    "content-type",
                )),
                b"shared_get" => drop(hostcalls::get_shared_data(KEY)),
                b"shared_set" => drop(set_slot()),
                b"clock" => drop(hostcalls::get_current_time()),
                b"metric" => drop(hostcalls::increment_metric(self.metric, 1)),
                b"core" => core_call(),
                _ => break,
            }
        }
        Action::Continue
    }
}
