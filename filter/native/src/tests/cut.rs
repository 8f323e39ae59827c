//! The delivery of a cut over the stub Envoy: the tick commits the order to the stuck call's own
//! stream scheduler, the stream's `scheduled` hook sends the breaker's answer once it has let go of the
//! stream, and no commit or delete ever reaches a scheduler that is gone.

use super::*;
use crate::abi::stubs::StubStream;
use crate::abi::HeaderType;

const CUTTING: &str =
    r#"{"failure_threshold": 1, "stuck_call_duration": "1s", "cut_stuck_calls": true}"#;

/// A gRPC request to `cluster`.
fn grpc_to(cluster: &str) -> StubStream {
    StubStream {
        headers: vec![
            (
                HeaderType::RequestHeader,
                b":path".to_vec(),
                b"/feed.Feed/Get".to_vec(),
            ),
            (
                HeaderType::RequestHeader,
                b"content-type".to_vec(),
                b"application/grpc".to_vec(),
            ),
        ],
        cluster: Some(cluster.as_bytes().to_vec()),
        attributes: Vec::new(),
    }
}

/// Runs the configuration's tick at `ms` past now, as the ticker's event does on the main thread.
#[allow(unsafe_code)]
fn tick_after(config: ModulePtr, ms: u64) {
    // SAFETY: a configuration pointer from `config_ptr` that the test has not destroyed.
    let config = unsafe { objects::config_ref(config) }.unwrap();
    config.tick(host::now_ms() + ms);
}

/// A stream admitted to `cluster` and waiting for its answer.
fn waiting_call(config: ModulePtr, cluster: &str) -> ModulePtr {
    stubs::set_stream(grpc_to(cluster));
    let stream = envoy_dynamic_module_on_http_filter_new(config, envoy());
    assert_eq!(
        envoy_dynamic_module_on_http_filter_request_headers(envoy(), stream, true),
        HeadersStatus::Continue
    );
    stream
}

#[test]
fn a_stuck_call_is_cut_on_its_own_stream_once_its_breaker_opens() {
    let config = config_ptr(CUTTING);
    let stream = waiting_call(config, "cut-open");
    let made = stubs::take().schedulers_made;
    assert_eq!(
        made.len(),
        1,
        "a call that may be cut gets its stream's scheduler"
    );

    tick_after(config, 2_000);
    let recorded = stubs::take();
    assert_eq!(counted(&recorded, Metric::StuckCalls, &["cut-open"]), 1);
    let [(scheduler, event)] = recorded.committed[..] else {
        panic!(
            "one order, to the stream's scheduler: {:?}",
            recorded.committed
        );
    };
    assert_eq!(scheduler, made[0]);
    assert!(
        recorded.replies.is_empty(),
        "the tick only orders; the stream's worker answers"
    );

    // Envoy completes and destroys the stream inside the send, as it does for a local reply.
    stubs::on_send_response(move || {
        end_stream(stream);
    });
    envoy_dynamic_module_on_http_filter_scheduled(envoy(), stream, event);
    let recorded = stubs::take();
    let reply = recorded.replies.first().expect("the cut was answered");
    assert_eq!(reply.status, 200, "trailers-only gRPC");
    for header in [("grpc-status", "14"), ("x-circuit-breaker", "cut")] {
        let header = (header.0.to_string(), header.1.to_string());
        assert!(reply.headers.contains(&header), "{:?}", reply.headers);
    }
    assert_eq!(counted(&recorded, Metric::CutCalls, &["cut-open"]), 1);
    assert_eq!(
        counted(&recorded, Metric::Calls, &["cut-open", "failure"]),
        0,
        "the outcome stays the stuck failure recorded at the tick"
    );
    assert_eq!(
        recorded.schedulers_deleted, made,
        "deleted once, by the stream's destroy"
    );
    assert!(recorded.strays.is_empty(), "{:?}", recorded.strays);
    assert!(critical(&recorded).is_empty(), "{:?}", recorded.logs);
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}

#[test]
fn a_stream_gone_before_its_event_leaves_nothing_to_commit_to() {
    let config = config_ptr(CUTTING);
    let stream = waiting_call(config, "cut-gone");
    tick_after(config, 2_000);
    assert_eq!(stubs::take().committed.len(), 1);
    // The client gave up first: Envoy completes and destroys the stream, and drops its event.
    end_stream(stream);
    tick_after(config, 4_000);
    let recorded = stubs::take();
    assert_eq!(recorded.schedulers_deleted.len(), 1);
    assert!(
        recorded.committed.is_empty(),
        "no order outlives its stream"
    );
    assert!(recorded.strays.is_empty(), "{:?}", recorded.strays);
    assert_eq!(counted(&recorded, Metric::CutCalls, &["cut-gone"]), 0);
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}

#[test]
fn without_cut_stuck_calls_a_stuck_call_is_recorded_and_left_alone() {
    let config = config_ptr(r#"{"failure_threshold": 1, "stuck_call_duration": "1s"}"#);
    let stream = waiting_call(config, "cut-off");
    tick_after(config, 2_000);
    let recorded = stubs::take();
    assert_eq!(counted(&recorded, Metric::StuckCalls, &["cut-off"]), 1);
    assert!(recorded.schedulers_made.is_empty() && recorded.committed.is_empty());
    end_stream(stream);
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}
