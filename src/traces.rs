//! OpenTelemetry traces: a span per data-plane request, a child span per upstream call, W3C
//! trace context read from the caller and written to the model server and to shadows.
//!
//! Exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise there is no tracer at all and the request path
//! pays one `Option` check (the caller's `traceparent` still travels to the upstream untouched,
//! like every other header). The SDK reads the other standard variables itself:
//! `OTEL_SERVICE_NAME` (default `modelgate`), `OTEL_TRACES_SAMPLER`(`_ARG`) — parent-based
//! always-on by default — and `OTEL_EXPORTER_OTLP_HEADERS` / `_TIMEOUT`. Spans are batched and
//! sent from the SDK's own thread; when the collector is slow or down they are dropped, never
//! waited for.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The tracer, when traces are exported.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Traces")
    }
}

impl Traces {
    /// Exports to `endpoint` (`http://host:4317`) over OTLP/gRPC. Must run inside a Tokio
    /// runtime (the gRPC client needs it).
    pub fn otlp(endpoint: &str) -> anyhow::Result<Traces> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("modelgate");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("modelgate");
        Ok(Traces {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Starts the span of a request, a child of the caller's `traceparent` when there is one.
    pub fn request(&self, headers: &HeaderMap, method: &str) -> RequestSpan {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(span_name(method))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", method.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            cx: parent.with_span(span),
        }
    }

    /// Starts the child span of an upstream call and writes its context into the upstream
    /// request's `traceparent` (replacing the caller's: the model server's span becomes our
    /// child, and ours the caller's).
    pub fn upstream(&self, parent: &RequestSpan, endpoint: &str, headers: &mut HeaderMap) -> Span {
        let span = self
            .tracer
            .span_builder("upstream")
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("server.address", endpoint.to_string())])
            .start_with_context(&self.tracer, &parent.cx);
        let cx = parent.cx.with_span(span);
        self.propagator
            .inject_context(&cx, &mut HeadersMut(headers));
        Span { cx }
    }

    /// The `traceparent` naming the request's span, for copies sent to shadows.
    pub fn traceparent(&self, span: &RequestSpan) -> Option<HeaderValue> {
        let mut h = HeaderMap::new();
        self.propagator
            .inject_context(&span.cx, &mut HeadersMut(&mut h));
        h.remove("traceparent")
    }

    /// Sends what is buffered and stops the exporter (blocking; at shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
    }
}

/// `ModelInfer` for `/inference.GRPCInferenceService/ModelInfer`: the gRPC method name.
fn span_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// The span of one request.
pub struct RequestSpan {
    cx: Context,
}

/// What a finished request's span records.
pub struct Outcome<'a> {
    /// Model named by the call.
    pub model: &'a str,
    /// Version that served it.
    pub version: Option<u32>,
    /// Experiment and variant.
    pub experiment: Option<(&'a str, &'a str)>,
    /// Request id.
    pub request_id: &'a str,
    /// gRPC status.
    pub code: tonic::Code,
}

impl RequestSpan {
    /// Records the outcome and ends the span.
    pub fn finish(self, o: Outcome<'_>) {
        let span = self.cx.span();
        let mut attrs = vec![
            KeyValue::new("modelgate.request_id", o.request_id.to_string()),
            KeyValue::new("rpc.grpc.status_code", o.code as i64),
        ];
        if !o.model.is_empty() {
            attrs.push(KeyValue::new("modelgate.model", o.model.to_string()));
        }
        if let Some(v) = o.version {
            attrs.push(KeyValue::new("modelgate.version", v as i64));
        }
        if let Some((e, v)) = o.experiment {
            attrs.push(KeyValue::new("modelgate.experiment", e.to_string()));
            attrs.push(KeyValue::new("modelgate.variant", v.to_string()));
        }
        span.set_attributes(attrs);
        if o.code != tonic::Code::Ok {
            span.set_status(Status::error(crate::telemetry::code_name(o.code)));
        }
        span.end();
    }
}

/// A child span (an upstream call).
pub struct Span {
    cx: Context,
}

impl Span {
    /// Ends the span; `error` marks it failed.
    pub fn end(self, error: Option<String>) {
        let span = self.cx.span();
        if let Some(e) = error {
            span.set_status(Status::error(e));
        }
        span.end();
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(mut value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            // A new value on every request: kept out of HPACK tables (see the proxy).
            value.set_sensitive(true);
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_are_grpc_method_names() {
        assert_eq!(
            span_name("/inference.GRPCInferenceService/ModelInfer"),
            "ModelInfer"
        );
        assert_eq!(span_name("odd"), "odd");
    }
}
