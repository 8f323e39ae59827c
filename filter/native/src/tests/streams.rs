//! Whole streams through the exported hooks over the stub Envoy: what a call does to the breaker, and
//! the local reply sent only once the hook has let go of its stream. Each test routes to its own
//! cluster, since the breaker tables are the process's.

use super::*;
use crate::abi::stubs::StubStream;
use crate::abi::{AttributeId, HeaderType};

/// A request to `cluster`, answered (once the response hooks run) with HTTP `status`.
fn routed(cluster: &str, status: u64) -> StubStream {
    StubStream {
        headers: vec![
            (HeaderType::RequestHeader, b":path".to_vec(), b"/".to_vec()),
            (
                HeaderType::ResponseHeader,
                b":status".to_vec(),
                status.to_string().into_bytes(),
            ),
        ],
        cluster: Some(cluster.as_bytes().to_vec()),
        attributes: vec![(AttributeId::ResponseCode, status)],
    }
}

/// One call from `filter_new` to `filter_destroy`, answered by the upstream with the stream's status.
fn answered_call(config: ModulePtr) {
    let stream = envoy_dynamic_module_on_http_filter_new(config, envoy());
    assert_eq!(
        envoy_dynamic_module_on_http_filter_request_headers(envoy(), stream, true),
        HeadersStatus::Continue
    );
    assert_eq!(
        envoy_dynamic_module_on_http_filter_response_headers(envoy(), stream, true),
        HeadersStatus::Continue
    );
    end_stream(stream);
}

#[test]
fn a_stream_from_new_to_destroy_records_its_calls_outcome() {
    let config = config_ptr("{}");
    stubs::set_stream(routed("streams-ok", 200));
    answered_call(config);
    stubs::set_stream(routed("streams-ok", 503));
    answered_call(config);
    let recorded = stubs::take();
    assert_eq!(
        counted(&recorded, Metric::Calls, &["streams-ok", "success"]),
        1
    );
    assert_eq!(
        counted(&recorded, Metric::Calls, &["streams-ok", "failure"]),
        1
    );
    assert!(critical(&recorded).is_empty(), "{:?}", recorded.logs);
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}

#[test]
fn a_rejection_is_sent_after_the_hook_lets_go_even_when_envoy_destroys_the_stream_inside_the_send()
{
    let config = config_ptr(r#"{"failure_threshold": 1}"#);
    stubs::set_stream(routed("streams-open", 503));
    answered_call(config);
    stubs::take();

    let stream = envoy_dynamic_module_on_http_filter_new(config, envoy());
    // As Envoy does inside `send_response`: the stream completes, and is destroyed, before the call
    // returns. With the stream still lent to the hook, both would find it busy (a Critical line) and
    // the destroy would leak it.
    let completed = std::rc::Rc::new(std::cell::Cell::new(false));
    stubs::on_send_response({
        let completed = std::rc::Rc::clone(&completed);
        move || {
            completed.set(peek(stream, |_| ()).is_some());
            end_stream(stream);
        }
    });
    assert_eq!(
        envoy_dynamic_module_on_http_filter_request_headers(envoy(), stream, true),
        HeadersStatus::StopIteration
    );
    let recorded = stubs::take();
    assert!(
        completed.get(),
        "the stream was free to lend inside the send"
    );
    assert!(critical(&recorded).is_empty(), "{:?}", recorded.logs);
    let reply = recorded.replies.first().expect("the rejection was sent");
    assert_eq!(reply.status, 503);
    assert!(
        reply
            .headers
            .contains(&("x-circuit-breaker".into(), "open".into())),
        "{:?}",
        reply.headers
    );
    assert_eq!(
        counted(&recorded, Metric::RejectedCalls, &["streams-open"]),
        1
    );
    envoy_dynamic_module_on_http_filter_config_destroy(config);
}
