//! The hooks over the stub Envoy (`abi::stubs`): the panic guard, the stream objects' lifetime, the
//! metric ids.

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
    let v = envoy_dynamic_module_on_program_init();
    // SAFETY: the hook returns a pointer to a static C string.
    let v = unsafe { std::ffi::CStr::from_ptr(v) };
    assert_eq!(v.to_str().unwrap(), "v0.2.0");
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
