//! Structured logs and OpenTelemetry traces through `tracing`.
//!
//! Logs: human-readable text for a terminal, or JSON; the filter comes from `RUST_LOG` when set, else from
//! `log.level`; they go to standard output. Traces: when an OTLP endpoint is configured ([`resolve`]: the
//! `telemetry.*` keys over the standard `OTEL_*` variables), spans are sampled parent-based with
//! `telemetry.sampling_ratio` and go through the export pipeline ([`export`]: a bounded queue, drops
//! counted, one warning a minute at most) to an OTLP/HTTP (protobuf) or OTLP/gRPC exporter;
//! [`Telemetry::shutdown`] flushes them at exit. With no endpoint, nothing is exported and no exporter
//! thread runs.
//!
//! Two filters keep the exporter from feeding on itself: the trace layer ignores spans of the crates the
//! exporters are built on (a span of theirs would be exported by the same crates, and so on), and the log
//! leaves out the SDK's events of every failed export, which the pipeline's warning replaces.

pub mod export;
pub mod resolve;

use std::collections::HashMap;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
use opentelemetry_otlp::{
    Protocol, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogFormat, LogSettings, OtlpProtocol, TelemetrySettings};
use export::{Pipeline, QueueGate, ReportingExporter};
pub use export::{SpanDrop, SpanDrops};
use resolve::{DEFAULT_SERVICE_NAME, ExportPlan, PlanError};

/// Events opentelemetry 0.33 logs on every failed export: the batch processor's error and the OTLP
/// exporter's verdicts after its retries. With a collector away they would be a line per batch; the
/// pipeline counts the failures and warns once a minute instead.
const PER_EXPORT_FAILURE_EVENTS: [&str; 4] = [
    "BatchSpanProcessor.ExportError",
    "Export.Failed.Exhausted",
    "Export.Failed.DeadlineExceeded",
    "Export.Failed.NonRetryable",
];

/// The crates under the exporters (targets match by prefix: `hyper` is also `hyper_util`): their spans
/// are not exported, since exporting them would make more of them.
const EXPORTER_TARGETS: [&str; 6] = ["opentelemetry", "tonic", "h2", "hyper", "tower", "reqwest"];

/// Worker threads of the gRPC exporter's runtime: it sends one batch at a time.
const EXPORT_RUNTIME_THREADS: usize = 1;

/// Keeps the trace pipeline alive; flush it with [`Self::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The gRPC exporter's own runtime: it is built before the gateway's runtime exists, and its
    /// connection never competes with sockets for a worker.
    runtime: Option<tokio::runtime::Runtime>,
    drops: SpanDrops,
}

impl Telemetry {
    /// The counts of spans dropped on the way to the collector (`/metrics` renders them).
    pub fn span_drops(&self) -> SpanDrops {
        self.drops.clone()
    }

    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.force_flush() {
                tracing::warn!(%error, "spans not flushed");
            }
            let _ = provider.shutdown();
        }
        if let Some(runtime) = self.runtime {
            // A connection attempt or a name lookup still running must not hold up the exit.
            runtime.shutdown_background();
        }
    }
}

/// Why the trace exporter was not built.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("the OTLP exporter could not be built: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("the gRPC exporter's runtime could not start: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Installs the global subscriber. Call once, at start, before any other runtime is built.
pub fn init(log: &LogSettings, settings: &TelemetrySettings) -> Telemetry {
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
    let quiet = filter_fn(|metadata| {
        !(metadata.target().starts_with("opentelemetry")
            && PER_EXPORT_FAILURE_EVENTS.contains(&metadata.name()))
    });

    let resolution = resolve::plan(settings, |name| std::env::var(name).ok());
    let drops = SpanDrops::default();
    let built = resolution.plan.map_err(ExportError::from).and_then(|plan| {
        plan.map(|plan| build(&plan, settings.sampling_ratio, &drops).map(|built| (plan, built)))
            .transpose()
    });
    let (plan, provider, runtime, export_error) = match built {
        Ok(Some((plan, (provider, runtime)))) => (Some(plan), Some(provider), runtime, None),
        Ok(None) => (None, None, None, None),
        Err(error) => (None, None, None, Some(error)),
    };

    let otel = provider.as_ref().map(|provider| {
        let exporters_own = Targets::new()
            .with_default(LevelFilter::TRACE)
            .with_targets(EXPORTER_TARGETS.map(|target| (target, LevelFilter::OFF)));
        // No busy/idle timing: it would cost two clock reads on every poll of every socket's task.
        tracing_opentelemetry::layer()
            .with_tracked_inactivity(false)
            .with_tracer(provider.tracer(DEFAULT_SERVICE_NAME))
            .with_filter(exporters_own)
    });
    // `try_init` fails only when a subscriber is already installed, which is then kept.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(quiet)
        .with(text)
        .with(json)
        .with(otel)
        .try_init();

    for ignored in &resolution.ignored {
        tracing::warn!(
            variable = ignored.variable,
            problem = %ignored.reason,
            "OpenTelemetry setting ignored"
        );
    }
    if let Some(plan) = &plan {
        // Header names only: their values are often credentials.
        let headers: Vec<&str> = plan.headers.iter().map(|(name, _)| name.as_str()).collect();
        tracing::info!(
            protocol = plan.protocol.name(),
            endpoint = %plan.endpoint,
            from = plan.endpoint_from,
            service_name = %plan.service_name,
            headers = ?headers,
            "exporting traces over OTLP"
        );
    }
    if let Some(error) = export_error {
        tracing::error!(%error, "trace export disabled");
    }
    Telemetry {
        provider,
        runtime,
        drops,
    }
}

/// The tracer provider of `plan`, and the runtime of its gRPC exporter.
fn build(
    plan: &ExportPlan,
    sampling_ratio: f64,
    drops: &SpanDrops,
) -> Result<(SdkTracerProvider, Option<tokio::runtime::Runtime>), ExportError> {
    let headers: HashMap<String, String> = plan.headers.iter().cloned().collect();
    let (exporter, runtime) = match plan.protocol {
        OtlpProtocol::HttpProtobuf => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                // Set here, so that an OTEL_EXPORTER_OTLP_PROTOCOL=grpc the gateway's key overrode does
                // not make the HTTP builder refuse.
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(&plan.endpoint)
                .with_headers(headers)
                .build()?;
            (exporter, None)
        }
        OtlpProtocol::Grpc => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(EXPORT_RUNTIME_THREADS)
                .thread_name("otlp-export")
                .enable_all()
                .build()?;
            // Names and values were checked by `resolve::parse_headers`; whatever the conversion still
            // refuses is left out rather than stopping the export.
            let metadata = (&headers)
                .try_into()
                .map(MetadataMap::from_headers)
                .unwrap_or_default();
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&plan.endpoint)
                .with_metadata(metadata);
            if plan.endpoint.starts_with("https://") {
                // The exporter's default TLS settings trust no root at all; these are the system's (or
                // those of SSL_CERT_FILE / SSL_CERT_DIR), and the build fails when there are none.
                builder = builder.with_tls_config(ClientTlsConfig::new().with_native_roots());
            }
            let exporter = {
                // The channel's connection task is spawned on the runtime current while it is built.
                let _entered = runtime.enter();
                builder.build()?
            };
            (exporter, Some(runtime))
        }
    };
    let pipeline = Pipeline::new(plan.queue_size, drops.clone());
    let batch = BatchSpanProcessor::builder(ReportingExporter::new(
        exporter,
        std::sync::Arc::clone(&pipeline),
    ))
    .with_batch_config(
        // The other batch settings come from the OTEL_BSP_* variables, which the builder reads.
        BatchConfigBuilder::default()
            .with_max_queue_size(plan.queue_size)
            .build(),
    )
    .build();
    let resource = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(
            plan.resource
                .iter()
                .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
        )
        .with_service_name(plan.service_name.clone())
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(sampling_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueGate::new(batch, pipeline))
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    Ok((provider, runtime))
}
