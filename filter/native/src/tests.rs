//! The hooks over the stub Envoy (`abi::stubs`): the panic guard, the stream objects' lifetime, the
//! metric ids, the host's calls; `streams` drives whole streams through the exported hooks, `cut` the
//! delivery of a cut.
#![deny(unsafe_code)]

mod cut;
mod streams;

use std::sync::Once;

use cb_core::telemetry::{Metric, Series, Telemetry};

use super::*;
use crate::abi::{stubs, LogLevel};
use crate::config::ModuleConfig;
use crate::host::{ConfigTelemetry, NativeHost};

fn module_config() -> ModuleConfig {
    config_from("{}")
}

/// A configuration made from `json` over the stub Envoy (its metric ids count from 0).
fn config_from(json: &str) -> ModuleConfig {
    stubs::take(); // metric ids count from 0 again
    config::config_new(ConfigEnvoy::stub(), b"circuit_breaker", json.as_bytes()).unwrap()
}

/// A configuration as Envoy holds it (freed by the `config_destroy` hook).
fn config_ptr(json: &str) -> ModulePtr {
    objects::config_into_ptr(Box::new(config_from(json)))
}

fn envoy() -> FilterEnvoyPtr {
    stubs::fake_envoy_ptr()
}

/// The end of a stream as Envoy makes it: `stream_complete`, then `filter_destroy`.
fn end_stream(stream: ModulePtr) {
    envoy_dynamic_module_on_http_filter_stream_complete(envoy(), stream);
    envoy_dynamic_module_on_http_filter_destroy(stream);
}

/// Runs `f` on the stream behind `ptr` as a hook would; `None` for the pass-through object.
#[allow(unsafe_code)]
fn peek<R>(ptr: ModulePtr, f: impl FnOnce(&mut Stream) -> R) -> Option<R> {
    // SAFETY: the tests pass pointers from `stream_into_ptr` or `filter_new` that they have not
    // destroyed, on the thread that made them, outside any hook.
    match unsafe { objects::lease_stream(ptr) } {
        Lease::Lent(mut lease) => Some(f(lease.stream())),
        Lease::PassThrough | Lease::Busy => None,
    }
}

/// The amount counted in `metric` with these label values.
fn counted(recorded: &stubs::Recorded, metric: Metric, labels: &[&str]) -> u64 {
    recorded
        .counted
        .iter()
        .filter(|(id, l, _)| {
            *id == metric as usize && l.iter().map(String::as_str).eq(labels.iter().copied())
        })
        .map(|(_, _, n)| n)
        .sum()
}

/// The Critical lines logged.
fn critical(recorded: &stubs::Recorded) -> Vec<&str> {
    recorded
        .logs
        .iter()
        .filter(|(l, _)| *l == LogLevel::Critical)
        .map(|(_, m)| m.as_str())
        .collect()
}

fn with_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(guard::install_panic_hook);
}

fn panics_counted(recorded: &stubs::Recorded) -> u64 {
    counted(recorded, Metric::Panics, &[])
}

#[test]
fn program_init_returns_the_abi_version() {
    assert_eq!(
        envoy_dynamic_module_on_program_init(),
        abi::ABI_VERSION.as_ptr()
    );
    assert_eq!(abi::ABI_VERSION.to_str().unwrap(), "v0.2.0");
}

#[test]
fn a_panic_in_a_guard_fails_open_logged_with_its_place_and_counted() {
    with_panic_hook();
    let config = module_config();
    stubs::take();
    let out = guard(
        "request_headers",
        HeadersStatus::Continue,
        Some(&config),
        || -> HeadersStatus { panic!("boom in the body") },
    );
    assert_eq!(out, HeadersStatus::Continue);
    let recorded = stubs::take();
    let (level, line) = recorded.logs.last().unwrap();
    assert_eq!(*level, LogLevel::Critical);
    assert!(line.contains("hook request_headers panicked"), "{line}");
    assert!(line.contains("boom in the body"), "{line}");
    assert!(
        line.contains("src/tests.rs:"),
        "the line says where: {line}"
    );
    assert_eq!(panics_counted(&recorded), 1);
}

#[test]
fn a_guard_without_a_panic_returns_the_body_value_and_counts_nothing() {
    let config = module_config();
    stubs::take();
    assert_eq!(guard("x", 1, Some(&config), || 2), 2);
    let recorded = stubs::take();
    assert!(recorded.logs.is_empty());
    assert_eq!(panics_counted(&recorded), 0);
}

#[test]
fn a_stream_whose_hook_panicked_passes_through_from_then_on() {
    with_panic_hook();
    let config = config_ptr("{}");
    let ptr = envoy_dynamic_module_on_http_filter_new(config, envoy());
    stubs::take();
    let out = on_stream(
        "response_headers",
        envoy(),
        ptr,
        7,
        |_, _| -> (i32, Pending) { panic!("half-way") },
    );
    assert_eq!(out, 7);
    assert_eq!(peek(ptr, |s| s.failed), Some(true));
    let mut ran = false;
    assert_eq!(
        on_stream("response_trailers", envoy(), ptr, 7, |_, _| {
            ran = true;
            (8, None)
        }),
        7
    );
    assert!(!ran, "a failed stream runs no more of the filter");
    assert_eq!(panics_counted(&stubs::take()), 1);
    envoy_dynamic_module_on_http_filter_destroy(ptr);
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}

#[test]
fn the_pass_through_object_runs_nothing_and_is_never_freed() {
    let stream = objects::stream_into_ptr(None);
    assert!(!stream.is_null(), "a null stream would make Envoy close it");
    assert!(peek(stream, |_| ()).is_none());
    let mut ran = false;
    assert_eq!(
        on_stream("request_headers", envoy(), stream, 1, |_, _| {
            ran = true;
            (2, None)
        }),
        1
    );
    assert!(!ran);
    envoy_dynamic_module_on_http_filter_destroy(stream);
    envoy_dynamic_module_on_http_filter_destroy(std::ptr::null());
}

#[test]
fn a_refused_configuration_gives_envoy_null() {
    let name = b"circuit_breaker";
    let bad = br#"{"window_size": 0}"#;
    let buf = |b: &[u8]| EnvoyBuffer {
        ptr: b.as_ptr().cast(),
        length: b.len(),
    };
    let config = envoy_dynamic_module_on_http_filter_config_new(
        stubs::fake_envoy_ptr(),
        buf(name),
        buf(bad),
    );
    assert!(config.is_null());
    let good = envoy_dynamic_module_on_http_filter_config_new(
        stubs::fake_envoy_ptr(),
        buf(name),
        buf(b""),
    );
    assert!(
        !good.is_null(),
        "empty configuration bytes mean all defaults"
    );
    envoy_dynamic_module_on_http_filter_config_destroy(good);
}

#[test]
fn metric_ids_are_indexed_in_the_order_of_metric_all() {
    for (i, m) in Metric::ALL.iter().enumerate() {
        assert_eq!(*m as usize, i, "{m:?}");
    }
}

// ---- NativeHost over the stub stream -------------------------------------------------------------

use cb_core::breaker::{Rejection, StateKind};
use cb_core::host::Host;

use crate::abi::stubs::StubStream;
use crate::abi::{AttributeId, HeaderType};

fn header(kind: HeaderType, name: &str, value: &[u8]) -> (HeaderType, Vec<u8>, Vec<u8>) {
    (kind, name.as_bytes().to_vec(), value.to_vec())
}

#[test]
fn header_values_come_back_as_bytes_whatever_they_hold() {
    let config = module_config();
    let huge = vec![b'x'; 1 << 20];
    stubs::set_stream(StubStream {
        headers: vec![
            header(HeaderType::RequestHeader, "x-tenant", &[0xff, 0xfe, b'a']),
            header(HeaderType::RequestHeader, "x-huge", &huge),
            header(HeaderType::RequestHeader, "x-empty", b""),
        ],
        ..StubStream::default()
    });
    let envoy = FilterEnvoy::stub();
    let mut host = NativeHost::new(&envoy, &config, None, None);
    assert_eq!(
        host.request_header("x-tenant"),
        Some(vec![0xff, 0xfe, b'a']),
        "not UTF-8: as is"
    );
    assert_eq!(host.request_header("x-huge"), Some(huge));
    assert_eq!(
        host.request_header("x-empty"),
        Some(Vec::new()),
        "empty is not absent"
    );
    assert_eq!(host.request_header("x-missing"), None);
}

#[test]
fn each_header_map_is_read_where_it_is() {
    let config = module_config();
    stubs::set_stream(StubStream {
        headers: vec![
            header(HeaderType::ResponseHeader, "grpc-status", b"14"),
            header(HeaderType::ResponseTrailer, "grpc-status", b"4"),
        ],
        ..StubStream::default()
    });
    let envoy = FilterEnvoy::stub();
    let mut host = NativeHost::new(&envoy, &config, None, None);
    assert_eq!(host.response_header("grpc-status"), Some(b"14".to_vec()));
    assert_eq!(host.response_trailer("grpc-status"), Some(b"4".to_vec()));
    assert_eq!(
        host.request_header("grpc-status"),
        None,
        "a client's header is not the response's"
    );
}

#[test]
fn cluster_code_and_flags_come_from_envoy_and_none_when_it_has_none() {
    let config = module_config();
    stubs::set_stream(StubStream::default());
    let envoy = FilterEnvoy::stub();
    let mut host = NativeHost::new(&envoy, &config, None, None);
    assert_eq!(
        (
            host.cluster_name(),
            host.response_code(),
            host.response_flags()
        ),
        (None, None, None)
    );
    stubs::set_stream(StubStream {
        cluster: Some(b"content".to_vec()),
        attributes: vec![
            (AttributeId::ResponseCode, 503),
            (AttributeId::ResponseFlags, 0x10),
        ],
        ..StubStream::default()
    });
    assert_eq!(host.cluster_name(), Some(b"content".to_vec()));
    assert_eq!(host.response_code(), Some(503));
    assert_eq!(host.response_flags(), Some(0x10));
    stubs::set_stream(StubStream {
        attributes: vec![(AttributeId::ResponseCode, 70_000)],
        ..StubStream::default()
    });
    assert_eq!(host.response_code(), None, "not an HTTP status");
}

#[test]
fn headers_are_set_on_the_request_and_added_to_the_response() {
    let config = module_config();
    let envoy = FilterEnvoy::stub();
    let mut host = NativeHost::new(&envoy, &config, None, None);
    host.set_request_header("x-envoy-upstream-rq-timeout-ms", "250");
    host.add_response_header("x-circuit-breaker-dry-run", "open");
    let written = stubs::take().written;
    assert_eq!(
        written,
        vec![
            (
                HeaderType::RequestHeader,
                "x-envoy-upstream-rq-timeout-ms".into(),
                "250".into(),
                false
            ),
            (
                HeaderType::ResponseHeader,
                "x-circuit-breaker-dry-run".into(),
                "open".into(),
                true
            ),
        ]
    );
}

#[test]
fn a_grpc_rejection_goes_to_envoy_with_grpc_status_14_and_no_body() {
    let config = module_config();
    let envoy = FilterEnvoy::stub();
    let mut host = NativeHost::new(&envoy, &config, None, None);
    let rejection = Rejection {
        state: StateKind::Open,
        retry_after_ms: Some(1500),
    };
    let parts = cb_core::reply::RejectParts::new("content");
    let answer = cb_core::reply::rejection(true, &parts, "open", rejection.retry_after_ms, None);
    stubs::take();
    assert!(host.send_reply(answer.clone()));
    let (_, held) = host.finish();
    assert!(
        stubs::take().replies.is_empty(),
        "held until the hook lets go of the stream"
    );
    reply::send_local_reply(FilterEnvoy::stub(), &held.unwrap());
    let replies = stubs::take().replies;
    let sent = replies.first().unwrap();
    assert_eq!((sent.status, sent.body.as_slice()), (200, &b""[..]));
    assert_eq!(sent.details, "circuit_breaker");
    let grpc_status = ("grpc-status".to_string(), "14".to_string());
    assert!(sent.headers.contains(&grpc_status), "{:?}", sent.headers);
    let expected: Vec<(String, String)> = answer
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_str().to_string()))
        .collect();
    assert_eq!(sent.headers, expected);
}

#[test]
fn labelled_series_reach_envoy_with_their_values_in_label_order() {
    let config = module_config();
    let id = |m: Metric| Metric::ALL.iter().position(|x| *x == m).unwrap();
    let labels = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let envoy = FilterEnvoy::stub();
    let mut host = NativeHost::new(&envoy, &config, None, None);
    let calls = Series {
        metric: Metric::Calls,
        upstream: "content",
        extra: ["failure", ""],
    };
    host.add(&calls, 2);
    host.set(&Series::of(Metric::State, "content"), 1);
    ConfigTelemetry::new(&config).add(&Series::of(Metric::StuckCalls, "feed"), 1);
    let recorded = stubs::take();
    let calls = (id(Metric::Calls), labels(&["content", "failure"]), 2);
    assert_eq!(recorded.counted[0], calls);
    assert_eq!(
        recorded.gauges,
        vec![(id(Metric::State), labels(&["content"]), 1)]
    );
    let stuck = (id(Metric::StuckCalls), labels(&["feed"]), 1);
    assert_eq!(
        recorded.counted[1], stuck,
        "outside a stream, through the config's callbacks"
    );
}

// ---- The module's clock ----------------------------------------------------------------------------

#[test]
fn configurations_leave_the_clock_when_dropped_and_no_tick_reaches_a_deleted_scheduler() {
    let strays = stubs::config_strays();
    let configs: Vec<ModuleConfig> = (0..20)
        .map(|_| config_from(r#"{"stuck_call_duration": "1s"}"#))
        .collect();
    assert!(
        ticker::registered() >= 20,
        "each configuration is on the clock"
    );
    // Long enough for the clock to commit to them a few times (a 50 ms period), so that some drops
    // race a commit.
    std::thread::sleep(std::time::Duration::from_millis(120));
    drop(configs);
    assert_eq!(
        stubs::config_strays(),
        strays,
        "a commit reached a scheduler deleted with its configuration"
    );
}
