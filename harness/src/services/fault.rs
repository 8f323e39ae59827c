//! [`Fault`]: how a demo server answers; and the tower layer that applies it to every gRPC call before
//! the generated router sees it.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::Status;

use super::switch::Control;

/// Boxed error, as tower and tonic pass them around.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How a server answers, switchable while it runs with `set_fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer normally (gRPC `OK`; HTTP 200).
    #[default]
    Ok,
    /// gRPC: status `UNAVAILABLE` (14) in a trailers-only response. HTTP: 503.
    Unavailable,
    /// gRPC: status `INTERNAL` (13). HTTP: 500.
    Internal,
    /// Answer normally after this delay.
    Slow(Duration),
    /// Never answer; the request is dropped only when the client (Envoy) gives up on it and resets the
    /// stream or closes the connection.
    Hang,
    /// Answer with no response at all. gRPC: the HTTP/2 stream is reset (`RST_STREAM` with
    /// `INTERNAL_ERROR`, before any response headers) while the connection stays up, which is what
    /// hyper does when the service itself fails. HTTP/1.1: the connection is closed with `SO_LINGER` 0,
    /// so the peer sees a TCP RST instead of a response.
    Reset,
    /// The listener is closed, so new connections are refused, and the open connections are shut down
    /// (Envoy pools upstream connections; without this it would keep using them). Switching to any
    /// other fault listens again on the same port.
    Down,
}

/// Applies the server's [`Fault`] to every request before the generated router sees it.
#[derive(Clone)]
pub(super) struct FaultLayer {
    pub(super) control: Arc<Control>,
}

impl<S> tower_layer::Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            control: Arc::clone(&self.control),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Clone)]
pub(super) struct FaultService<S> {
    inner: S,
    control: Arc<Control>,
}

/// The error that makes hyper reset the stream for [`Fault::Reset`]. tonic turns only `Status` (and a
/// few transport errors) back into responses; anything else reaches hyper, which answers with
/// `RST_STREAM`.
#[derive(Debug)]
struct InjectedReset;

impl fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected fault: stream reset")
    }
}

impl std::error::Error for InjectedReset {}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, BoxError>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for FaultService<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is checked on the clone that serves the call, below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let fault = self.control.arrive();
        Box::pin(async move {
            match fault {
                Fault::Ok => {}
                Fault::Slow(delay) => tokio::time::sleep(delay).await,
                Fault::Unavailable => {
                    return Ok(Status::unavailable("injected fault: unavailable").into_http())
                }
                Fault::Internal => {
                    return Ok(Status::internal("injected fault: internal").into_http())
                }
                // Cancelled (dropped) by hyper when Envoy resets the stream or the connection closes.
                Fault::Hang => std::future::pending::<()>().await,
                // A request that raced with going down gets no answer either.
                Fault::Reset | Fault::Down => return Err(Box::new(InjectedReset) as BoxError),
            }
            let never = |e: Infallible| -> BoxError { match e {} };
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(never)?;
            inner.call(request).await.map_err(never)
        })
    }
}
