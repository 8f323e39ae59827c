//! The hooks over the stub Envoy (`abi::stubs`): the panic guard, the stream objects' lifetime, the
//! metric ids.
#![deny(unsafe_code)]

use std::sync::Once;

use cb_core::telemetry::Metric;

use super::*;
use crate::abi::{stubs, LogLevel};

fn module_config() -> ModuleConfig {
    stubs::take(); // metric ids count from 0 again
    config::config_new(stubs::fake_envoy_ptr(), b"circuit_breaker", b"{}").unwrap()
}

fn with_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(install_panic_hook);
}

fn panics_counted(recorded: &stubs::Recorded) -> u64 {
    let id = Metric::ALL
        .iter()
        .position(|m| *m == Metric::Panics)
        .unwrap();
    recorded
        .counted
        .iter()
        .filter(|(i, labels, _)| *i == id && labels.is_empty())
        .map(|(_, _, n)| n)
        .sum()
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
    let config = module_config();
    let ptr = host::stream_into_ptr(Some(Box::new(Stream::new(&config))));
    let envoy = stubs::fake_envoy_ptr();
    stubs::take();
    let out = on_stream("response_headers", envoy, ptr, 7, |_, _| -> i32 {
        panic!("half-way")
    });
    assert_eq!(out, 7);
    assert!(host::stream_mut(ptr).unwrap().failed);
    let mut ran = false;
    assert_eq!(
        on_stream("response_trailers", envoy, ptr, 7, |_, _| {
            ran = true;
            8
        }),
        7
    );
    assert!(!ran, "a failed stream runs no more of the filter");
    assert_eq!(panics_counted(&stubs::take()), 1);
    envoy_dynamic_module_on_http_filter_destroy(ptr);
}

#[test]
fn a_stream_lives_from_new_to_destroy_and_passes_through() {
    let config = host::config_into_ptr(Box::new(module_config()));
    let envoy = stubs::fake_envoy_ptr();
    let stream = envoy_dynamic_module_on_http_filter_new(config, envoy);
    assert!(host::stream_mut(stream).is_some());
    assert_eq!(
        envoy_dynamic_module_on_http_filter_request_headers(envoy, stream, false),
        HeadersStatus::Continue
    );
    assert_eq!(
        envoy_dynamic_module_on_http_filter_request_body(envoy, stream, true),
        BodyStatus::Continue
    );
    assert_eq!(
        envoy_dynamic_module_on_http_filter_response_headers(envoy, stream, false),
        HeadersStatus::Continue
    );
    assert_eq!(
        envoy_dynamic_module_on_http_filter_response_trailers(envoy, stream),
        TrailersStatus::Continue
    );
    envoy_dynamic_module_on_http_filter_stream_complete(envoy, stream);
    envoy_dynamic_module_on_http_filter_destroy(stream);
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}

#[test]
fn the_pass_through_object_runs_nothing_and_is_never_freed() {
    let stream = host::stream_into_ptr(None);
    assert!(!stream.is_null(), "a null stream would make Envoy close it");
    assert!(host::stream_mut(stream).is_none());
    let envoy = stubs::fake_envoy_ptr();
    let mut ran = false;
    assert_eq!(
        on_stream("request_headers", envoy, stream, 1, |_, _| {
            ran = true;
            2
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
use cb_core::reply;

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
    let mut host = NativeHost::new(stubs::fake_envoy_ptr(), &config);
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
    let mut host = NativeHost::new(stubs::fake_envoy_ptr(), &config);
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
    let mut host = NativeHost::new(stubs::fake_envoy_ptr(), &config);
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
    let mut host = NativeHost::new(stubs::fake_envoy_ptr(), &config);
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
    let mut host = NativeHost::new(stubs::fake_envoy_ptr(), &config);
    let rejection = Rejection {
        state: StateKind::Open,
        retry_after_ms: Some(1500),
    };
    let parts = reply::RejectParts::new("content");
    let answer = reply::rejection(true, &parts, "open", rejection.retry_after_ms, None);
    stubs::take();
    assert!(host.send_reply(answer.clone()));
    assert!(
        stubs::take().replies.is_empty(),
        "held until the worker is released"
    );
    host.send_pending();
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
    let mut host = NativeHost::new(stubs::fake_envoy_ptr(), &config);
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
