//! Structured logs and OpenTelemetry traces through `tracing`.
//!
//! Logs: human-readable text for a terminal, or JSON; the filter comes from `RUST_LOG` when set, else from
//! `log.level`; they go to standard output. Traces: when an OTLP endpoint is configured
//! (`telemetry.otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`), spans are batched and exported over
//! OTLP/HTTP (protobuf), sampled parent-based with `telemetry.sampling_ratio`; [`Telemetry::shutdown`]
//! flushes them at exit. With no endpoint, nothing is exported and no exporter thread runs.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// Standard variables honoured besides the `EPOCH_GATEWAY__TELEMETRY__…` keys.
const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const OTEL_SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
const DEFAULT_SERVICE_NAME: &str = "epoch-gateway";

/// Keeps the trace pipeline alive; flush it with [`Self::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.force_flush() {
                tracing::warn!(%error, "spans not flushed");
            }
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Call once, at start.
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (text, json) = match log.format {
        LogFormat::Text => (Some(tracing_subscriber::fmt::layer().with_ansi(ansi)), None),
        LogFormat::Json => (
            None,
            Some(tracing_subscriber::fmt::layer().json().flatten_event(true)),
        ),
    };
    let (provider, export_error) = match tracer_provider(telemetry) {
        Ok(provider) => (provider, None),
        Err(error) => (None, Some(error)),
    };
    let otel = provider.as_ref().map(|provider| {
        // No busy/idle timing: it would cost two clock reads on every poll of every socket's task.
        tracing_opentelemetry::layer()
            .with_tracked_inactivity(false)
            .with_tracer(provider.tracer(DEFAULT_SERVICE_NAME))
    });
    // `try_init` fails only when a subscriber is already installed, which is then kept.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init();
    if let Some(error) = export_error {
        tracing::error!(%error, "trace export disabled: the OTLP exporter could not be built");
    }
    Telemetry { provider }
}

fn tracer_provider(
    settings: &TelemetrySettings,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    let configured = settings
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let from_env = std::env::var(OTEL_ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.trim().is_empty());
    if configured.is_none() && from_env.is_none() {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = configured {
        // The configured value is the receiver's base URL, like OTEL_EXPORTER_OTLP_ENDPOINT.
        builder = builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = builder.build()?;
    let service_name = settings
        .service_name
        .clone()
        .or_else(|| std::env::var(OTEL_SERVICE_NAME_ENV).ok())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        settings.sampling_ratio,
    )));
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build(),
    ))
}
