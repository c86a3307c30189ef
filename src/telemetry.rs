//! Logs and traces: the `tracing` subscriber (text or JSON lines on
//! stderr) and, when `telemetry.otlp_endpoint` is set, OpenTelemetry spans
//! exported over OTLP (gRPC or HTTP/protobuf).
//!
//! Spans: one per RPC (`rpc` in the metrics layer, continuing a caller's
//! `traceparent`) and one per pipeline job (`job`: verify, check,
//! deliver). A webhook's trace context is stored on its row when it is
//! created and when it is confirmed, and every job of that webhook
//! continues it, so that the trace survives the queue, retries, a Redis
//! data loss and a restart. The POST to the receiver carries
//! `traceparent`, so a user's trace continues into their handler.

use std::{collections::HashMap, io::IsTerminal, time::Duration};

use anyhow::Context as _;
use opentelemetry::{
    global,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{OtlpProtocol, TelemetryConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flushes and stops the exporter when dropped (end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Off the async runtime: the shutdown waits for the last export,
            // which runs on the runtime.
            let _ = std::thread::spawn(move || p.shutdown()).join();
        }
    }
}

/// Installs the global subscriber. Call once, inside the Tokio runtime
/// (exports run on it).
pub fn init(cfg: &TelemetryConfig, format: LogFormat) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("UPLOADHOOK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Colours only for a person at a terminal (and not with NO_COLOR, which
    // the layer reads itself): in a file, a pipe or a container's log
    // their escape codes are noise that every reader has to strip.
    let fmt = if std::io::stderr().is_terminal() {
        fmt
    } else {
        fmt.with_ansi(false)
    };
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        // Span fields (webhook_id, tenant_id) ride on every line.
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = provider(cfg)?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("uploadhook"))
            .boxed()
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("installing the log subscriber")?;
    if let Some(endpoint) = &cfg.otlp_endpoint {
        tracing::info!(endpoint, protocol = ?cfg.otlp_protocol, sampling_ratio = cfg.sampling_ratio, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

fn provider(cfg: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = &cfg.otlp_endpoint else {
        return Ok(None);
    };
    let timeout = Duration::from_secs(10);
    let exporter = match cfg.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(timeout)
            .build(),
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_timeout(timeout)
            .build(),
    }
    .context("config key `telemetry.otlp_endpoint`: building the OTLP exporter")?;
    let exporter = OnRuntime {
        inner: std::sync::Arc::new(exporter),
        runtime: tokio::runtime::Handle::try_current()
            .context("telemetry must start inside the Tokio runtime")?,
    };
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // A caller's sampling decision is followed; new traces are
            // sampled at this ratio.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build(),
    ))
}

/// Runs exports on the service's Tokio runtime. The SDK's batch processor
/// exports from its own thread, where the tonic and reqwest clients would
/// find no reactor.
#[derive(Debug)]
struct OnRuntime {
    inner: std::sync::Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                e.to_string(),
            )),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = std::sync::Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The current span's context as a W3C `traceparent`, when it is part of
/// a trace (telemetry on).
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` (not yet entered) continue the trace of `traceparent`.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|t| !t.is_empty()) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` continue the trace of an incoming request's `traceparent`
/// header (gRPC metadata or HTTP).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    set_parent(
        span,
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
    );
}
