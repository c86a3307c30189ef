//! Admission control: at most `api.max_in_flight` unary calls of
//! WebhookService run at once in a process; beyond that a call is refused
//! at once with UNAVAILABLE and `retry-after: 1` (503 with Retry-After over
//! REST), instead of queueing inside the service. Under overload the
//! service then keeps serving what it admits at its normal latency, and
//! its memory stays bounded, while callers back off and retry (UNAVAILABLE
//! is the code gRPC retry policies retry).
//!
//! StreamEvents is not counted: streams are long-lived and have their own
//! cap (`streams.max_streams`).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::server::NamedService;

use crate::{error::RETRY_AFTER, metrics::METRICS};

/// Wraps a gRPC service with the in-flight limit.
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Option<Arc<Semaphore>>,
    limit: usize,
}

impl<S> Admission<S> {
    /// `max_in_flight = 0`: no limit.
    pub fn new(inner: S, max_in_flight: usize) -> Self {
        Self {
            inner,
            permits: (max_in_flight > 0).then(|| Arc::new(Semaphore::new(max_in_flight))),
            limit: max_in_flight,
        }
    }
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

/// Calls that are not counted (long-lived streams).
fn exempt(path: &str) -> bool {
    path.ends_with("/StreamEvents")
}

impl<S, B> tower::Service<http::Request<B>> for Admission<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let permit = match &self.permits {
            Some(permits) if !exempt(req.uri().path()) => match permits.clone().try_acquire_owned()
            {
                Ok(p) => Some(p),
                Err(_) => {
                    METRICS.rpc_shed.inc();
                    let mut status = tonic::Status::unavailable(format!(
                        "the server is at its limit of {} calls in flight (api.max_in_flight); retry with backoff",
                        self.limit
                    ));
                    status.metadata_mut().insert(RETRY_AFTER, 1u64.into());
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            },
            _ => None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            drop(permit);
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// A service whose calls wait until the gate opens.
    #[derive(Clone)]
    struct Held(Arc<Semaphore>);

    impl tower::Service<http::Request<()>> for Held {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let gate = self.0.clone();
            Box::pin(async move {
                drop(gate.acquire().await);
                Ok(http::Response::new(tonic::body::Body::empty()))
            })
        }
    }

    fn call(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn grpc_status(r: &http::Response<tonic::body::Body>) -> Option<&str> {
        r.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn refuses_beyond_the_limit_at_once_and_admits_again_after() {
        let gate = Arc::new(Semaphore::new(0));
        let svc = Admission::new(Held(gate.clone()), 2);
        let create = "/uploadhook.v1.WebhookService/CreateUploadWebhook";
        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(call(create))))
            .collect();
        // Wait until both hold their permits.
        while svc.permits.as_ref().unwrap().available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let refused = svc.clone().oneshot(call(create)).await.unwrap();
        assert_eq!(grpc_status(&refused), Some("14"), "UNAVAILABLE");
        assert_eq!(
            refused
                .headers()
                .get(RETRY_AFTER)
                .unwrap()
                .to_str()
                .unwrap(),
            "1"
        );
        let message = refused
            .headers()
            .get("grpc-message")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(message.contains("api.max_in_flight"), "{message}");

        // A stream is not counted: it is admitted while the limit is full.
        let stream = tokio::spawn(
            svc.clone()
                .oneshot(call("/uploadhook.v1.WebhookService/StreamEvents")),
        );
        gate.add_permits(10);
        assert_eq!(grpc_status(&stream.await.unwrap().unwrap()), None);
        for h in held {
            assert_eq!(grpc_status(&h.await.unwrap().unwrap()), None);
        }
        // The permits came back: a new call is admitted.
        assert_eq!(svc.permits.as_ref().unwrap().available_permits(), 2);
        let again = svc.clone().oneshot(call(create)).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }

    #[tokio::test]
    async fn zero_means_no_limit() {
        let gate = Arc::new(Semaphore::new(0));
        let svc = Admission::new(Held(gate.clone()), 0);
        let calls: Vec<_> = (0..50)
            .map(|_| tokio::spawn(svc.clone().oneshot(call("/x/Y"))))
            .collect();
        gate.add_permits(50);
        for c in calls {
            assert_eq!(grpc_status(&c.await.unwrap().unwrap()), None);
        }
    }
}
