//! Prometheus metrics, served as text at `/metrics` on the HTTP port of
//! every role.
//!
//! Counters and histograms are recorded where things happen (the RPC layer,
//! the pipeline); depth gauges (queue, dead letters, webhooks by status)
//! are read from the queue and the database when `/metrics` is scraped, so
//! they are true for the whole deployment, not one process.
//!
//! Names follow the Prometheus and OpenTelemetry conventions (`_seconds`,
//! `_total`; labels `rpc_method`, `rpc_grpc_status_code`, ...). Every label
//! value comes from a fixed set: never a webhook id, a tenant or a URL.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicI64, AtomicU64},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::{pipeline::queue::Queue, store::Store};

type Labels = Vec<(&'static str, &'static str)>;

/// Seconds, from 1 ms to about 2 minutes.
fn latency_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
    ])
}

/// Seconds, from 10 ms to a day (delivery lag includes retries).
fn lag_buckets() -> Histogram {
    Histogram::new([
        0.01,
        0.05,
        0.1,
        0.5,
        1.0,
        5.0,
        30.0,
        60.0,
        300.0,
        1800.0,
        3600.0,
        6.0 * 3600.0,
        86400.0,
    ])
}

/// Writes per grouped transaction, 1 to the largest `worker.write_batch_max`.
fn group_buckets() -> Histogram {
    Histogram::new([
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
    ])
}

fn attempt_buckets() -> Histogram {
    Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0])
}

pub struct Metrics {
    registry: Registry,
    /// RPCs by service, method, status code and transport (grpc, http).
    pub rpc: Family<Labels, Histogram, fn() -> Histogram>,
    /// Delivery attempts by outcome: completed, retry, dead_letter.
    pub deliveries: Family<Labels, Counter>,
    /// Duration of the POST to the receiver, by outcome.
    pub delivery_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// From verified (deliverable) to the receiver's 2xx, retries included.
    pub delivery_lag: Histogram,
    /// Attempts a webhook took, observed when it completes or is
    /// dead-lettered, by outcome.
    pub attempts: Family<Labels, Histogram, fn() -> Histogram>,
    /// Verification HEADs by outcome: verified, missing, mismatch,
    /// storage_error.
    pub verifications: Family<Labels, Counter>,
    /// Open StreamEvents streams (gRPC and SSE) in this process.
    pub event_streams: Gauge,
    /// Deliveries waiting for their receiver's host (per-host limit), not
    /// holding a worker slot.
    pub host_waiting: Gauge,
    /// Calls refused by admission control (`api.max_in_flight`).
    pub rpc_shed: Counter,
    /// Writes per grouped transaction of the pipeline (its sum is the
    /// number of writes, its count the number of transactions).
    write_groups: Histogram,
    /// Grouped transactions that failed and were written one by one.
    write_group_splits: Counter,
    // Read at scrape time.
    queue_entries: Family<Labels, Gauge>,
    queue_pending: Gauge,
    queue_delayed: Gauge,
    queue_poison: Gauge,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    dead_letters: Gauge,
    webhooks: Family<Labels, Gauge>,
    scrape_errors: Counter,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("uploadhook");
        let rpc = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_buckets as fn() -> Histogram,
        );
        registry.register_with_unit(
            "rpc_server_duration",
            "Duration of RPCs served, by service, method, gRPC status code and transport (grpc or http); its count is the number of RPCs",
            Unit::Seconds,
            rpc.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "deliveries",
            "Delivery attempts by outcome (completed, retry, dead_letter)",
            deliveries.clone(),
        );
        let delivery_duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_buckets as fn() -> Histogram,
            );
        registry.register_with_unit(
            "delivery_duration",
            "Duration of the POST to the receiver, by outcome",
            Unit::Seconds,
            delivery_duration.clone(),
        );
        let delivery_lag = lag_buckets();
        registry.register_with_unit(
            "delivery_lag",
            "Time from verified to delivered (the receiver's 2xx), retries included",
            Unit::Seconds,
            delivery_lag.clone(),
        );
        let attempts = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            attempt_buckets as fn() -> Histogram,
        );
        registry.register(
            "webhook_attempts",
            "Attempts per webhook, observed when it completes or is dead-lettered",
            attempts.clone(),
        );
        let verifications = Family::<Labels, Counter>::default();
        registry.register(
            "verifications",
            "Object verifications (HEAD) by outcome (verified, missing, mismatch, storage_error)",
            verifications.clone(),
        );
        let host_waiting = Gauge::default();
        registry.register(
            "deliveries_waiting_for_host",
            "Deliveries waiting for a slot of their receiver's host (worker.per_host_concurrency), without holding a worker slot",
            host_waiting.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "event_streams_open",
            "Open StreamEvents streams in this process",
            event_streams.clone(),
        );
        let rpc_shed = Counter::default();
        registry.register(
            "rpc_shed",
            "Calls refused with UNAVAILABLE because api.max_in_flight calls were running",
            rpc_shed.clone(),
        );
        let write_groups = group_buckets();
        registry.register(
            "write_group_size",
            "Status changes written per database transaction by a worker's write batcher (its _count is the transactions, its _sum the writes)",
            write_groups.clone(),
        );
        let write_group_splits = Counter::default();
        registry.register(
            "write_group_splits",
            "Grouped transactions that failed and were written again one write at a time",
            write_group_splits.clone(),
        );
        let queue_entries = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_entries",
            "Jobs in the queue's streams (waiting or taken, not yet acked), by priority",
            queue_entries.clone(),
        );
        let queue_pending = Gauge::default();
        registry.register(
            "queue_pending",
            "Jobs taken by a worker and not yet acked",
            queue_pending.clone(),
        );
        let queue_delayed = Gauge::default();
        registry.register(
            "queue_delayed",
            "Jobs due later (retries)",
            queue_delayed.clone(),
        );
        let queue_poison = Gauge::default();
        registry.register(
            "queue_poison",
            "Jobs parked after too many deliveries",
            queue_poison.clone(),
        );
        let queue_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest unfinished job in the queue (0 when empty; Redis only)",
            Unit::Seconds,
            queue_oldest_age.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "dead_letters",
            "Dead letters not redriven",
            dead_letters.clone(),
        );
        let webhooks = Family::<Labels, Gauge>::default();
        registry.register(
            "webhooks",
            "Webhooks by status (pending counts AUTO checks still to run)",
            webhooks.clone(),
        );
        let scrape_errors = Counter::default();
        registry.register(
            "metrics_scrape_errors",
            "Scrapes that could not read the queue or the database",
            scrape_errors.clone(),
        );
        Self {
            registry,
            rpc,
            deliveries,
            delivery_duration,
            delivery_lag,
            attempts,
            verifications,
            event_streams,
            host_waiting,
            rpc_shed,
            write_groups,
            write_group_splits,
            queue_entries,
            queue_pending,
            queue_delayed,
            queue_poison,
            queue_oldest_age,
            dead_letters,
            webhooks,
            scrape_errors,
        }
    }

    pub fn delivery(&self, outcome: &'static str, took: Duration) {
        let l = vec![("outcome", outcome)];
        self.deliveries.get_or_create(&l).inc();
        self.delivery_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// A grouped transaction of `writes` writes was attempted.
    pub fn write_group(&self, writes: usize) {
        self.write_groups.observe(writes as f64);
    }

    /// A grouped transaction failed and its writes went one by one.
    pub fn write_group_split(&self) {
        self.write_group_splits.inc();
    }

    pub fn verification(&self, outcome: &'static str) {
        self.verifications
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn finished(&self, outcome: &'static str, attempts: i32) {
        self.attempts
            .get_or_create(&vec![("outcome", outcome)])
            .observe(f64::from(attempts));
    }

    /// Reads the depth gauges (bounded by `timeout`), then renders the
    /// registry as Prometheus text.
    pub async fn render(&self, store: &Store, queue: &dyn Queue, timeout: Duration) -> String {
        let read = async {
            let stats = queue.stats().await.map_err(|e| e.to_string())?;
            let by_status = store.counts_by_status().await.map_err(|e| e.to_string())?;
            let dead = store.open_dead_letters().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((stats, by_status, dead))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok((stats, by_status, dead))) => {
                let high = stats.high.min(stats.stream);
                set(
                    &self
                        .queue_entries
                        .get_or_create(&vec![("priority", "high")]),
                    high,
                );
                set(
                    &self
                        .queue_entries
                        .get_or_create(&vec![("priority", "normal")]),
                    stats.stream - high,
                );
                set(&self.queue_pending, stats.pending);
                set(&self.queue_delayed, stats.delayed);
                set(&self.queue_poison, stats.poison);
                self.queue_oldest_age
                    .set(stats.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
                set(&self.dead_letters, dead);
                for (status, n) in by_status {
                    set(
                        &self
                            .webhooks
                            .get_or_create(&vec![("status", status.as_str())]),
                        n,
                    );
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: reading queue or database figures failed");
                self.scrape_errors.inc();
            }
            Err(_) => {
                tracing::warn!("metrics: reading queue or database figures timed out");
                self.scrape_errors.inc();
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

fn set(g: &Gauge<i64, AtomicI64>, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// A tower layer that records [`Metrics::rpc`] for a gRPC service: the
/// method from the request path (only names in `methods`; anything else
/// is `unknown`), the status code from the `grpc-status` header of a
/// trailers-only response, otherwise `OK`.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    transport: &'static str,
    methods: Arc<[(&'static str, &'static str)]>,
}

impl RpcMetricsLayer {
    /// `methods` are `(service, method)` pairs, e.g. from the descriptors.
    pub fn new(transport: &'static str, methods: Arc<[(&'static str, &'static str)]>) -> Self {
        Self { transport, methods }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl RpcMetricsLayer {
    fn labels_of(&self, path: &str) -> (&'static str, &'static str) {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        self.methods
            .iter()
            .find(|(s, m)| *s == service && *m == method)
            .copied()
            .unwrap_or(("unknown", "unknown"))
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = self.layer.labels_of(req.uri().path());
        let transport = self.layer.transport;
        let started = Instant::now();
        // The RPC's span, continuing the caller's trace.
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            transport,
        );
        crate::telemetry::set_parent_from_headers(&span, req.headers());
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                let res = fut.await;
                let code = match &res {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or("OK", code_name),
                    Err(_) => "INTERNAL",
                };
                METRICS
                    .rpc
                    .get_or_create(&vec![
                        ("rpc_service", service),
                        ("rpc_method", method),
                        ("rpc_grpc_status_code", code),
                        ("transport", transport),
                    ])
                    .observe(started.elapsed().as_secs_f64());
                res
            },
            span,
        ))
    }
}

fn code_name(code: i32) -> &'static str {
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The `(service, method)` pairs served on the gRPC port, for
/// [`RpcMetricsLayer`]: the API's methods from the descriptors, plus
/// health and reflection.
pub fn served_methods() -> Arc<[(&'static str, &'static str)]> {
    let mut out: Vec<(&'static str, &'static str)> = vec![
        ("grpc.health.v1.Health", "Check"),
        ("grpc.health.v1.Health", "Watch"),
        (
            "grpc.reflection.v1.ServerReflection",
            "ServerReflectionInfo",
        ),
        (
            "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ),
    ];
    if let Ok(pool) = prost_reflect::DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
        && let Some(svc) = pool.get_service_by_name(crate::proto::SERVICE_NAME)
    {
        let name: &'static str = Box::leak(svc.full_name().to_string().into_boxed_str());
        for m in svc.methods() {
            out.push((name, Box::leak(m.name().to_string().into_boxed_str())));
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_descriptors_and_unknown_paths_are_one_label() {
        let layer = RpcMetricsLayer::new("grpc", served_methods());
        assert_eq!(
            layer.labels_of("/uploadhook.v1.WebhookService/Confirm"),
            ("uploadhook.v1.WebhookService", "Confirm")
        );
        assert_eq!(
            layer.labels_of("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            layer.labels_of("/uploadhook.v1.WebhookService/Nope"),
            ("unknown", "unknown")
        );
        assert_eq!(layer.labels_of("/x/../../etc"), ("unknown", "unknown"));
    }

    #[test]
    fn text_exposition_names_follow_prometheus_conventions() {
        METRICS.delivery("completed", Duration::from_millis(3));
        METRICS.verification("verified");
        METRICS.finished("completed", 1);
        let mut out = String::new();
        encode(&mut out, &METRICS.registry).unwrap();
        assert!(
            out.contains("uploadhook_deliveries_total{outcome=\"completed\"}"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE uploadhook_delivery_duration_seconds histogram"),
            "{out}"
        );
        assert!(
            out.contains("uploadhook_verifications_total{outcome=\"verified\"}"),
            "{out}"
        );
        assert!(
            out.contains("uploadhook_webhook_attempts_bucket{le=\"1.0\",outcome=\"completed\"}")
                || out.contains(
                    "uploadhook_webhook_attempts_bucket{outcome=\"completed\",le=\"1.0\"}"
                ),
            "{out}"
        );
    }
}
