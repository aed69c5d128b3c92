//! The export pipeline around the OpenTelemetry SDK, built so that a collector that is slow or away costs
//! the gateway counted spans and one warning a minute, never a blocked socket or a flooded log.
//!
//! A span that ends on a gateway thread passes [`QueueGate`], which admits it into the SDK's batch
//! processor (a bounded queue and its own export thread) while the queue has room, and drops and counts it
//! otherwise: the batch processor would drop it too, but uncounted and silent after its first warning.
//! The batch processor hands batches to [`ReportingExporter`], which wraps the OTLP exporter: a batch whose
//! export fails (after the exporter's own retries) is dropped and counted, and [`Reporter`] turns the
//! failures and drops into at most one warning per [`WARNING_INTERVAL`], with the number of spans dropped
//! since the last one, and one line when exports succeed again. [`SpanDrops`] holds the counts, which
//! `/metrics` renders as `epoch_gateway_trace_spans_dropped_total`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// Least time between two warnings about dropped spans.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(60);

enum_with_all! {
    /// Why a span was not exported.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum SpanDrop {
        /// The export queue was full (exports slower than spans end).
        QueueFull,
        /// The collector did not take the batch: unreachable, refusing, or too slow.
        ExportFailed,
    }
}

impl SpanDrop {
    pub const fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

/// Spans dropped since start, by [`SpanDrop`]; cloning shares the counts.
#[derive(Debug, Clone, Default)]
pub struct SpanDrops(Arc<[AtomicU64; SpanDrop::ALL.len()]>);

impl SpanDrops {
    pub fn count(&self, reason: SpanDrop) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }

    fn add(&self, reason: SpanDrop, spans: usize) {
        self.0[reason as usize].fetch_add(spans as u64, Ordering::Relaxed);
    }
}

/// The state the gate and the exporter share.
#[derive(Debug)]
pub struct Pipeline {
    drops: SpanDrops,
    /// Spans admitted into the batch processor's queue and not yet handed to an export.
    queued: AtomicUsize,
    /// The batch processor's queue size: with at most this many admitted, its queue never overflows.
    capacity: usize,
    reporter: Mutex<Reporter>,
}

impl Pipeline {
    pub fn new(capacity: usize, drops: SpanDrops) -> Arc<Self> {
        Arc::new(Self {
            drops,
            queued: AtomicUsize::new(0),
            capacity,
            reporter: Mutex::new(Reporter::default()),
        })
    }

    /// Takes a place in the queue; false when it is full.
    fn admit(&self) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < self.capacity).then_some(queued + 1)
            })
            .is_ok()
    }

    /// `spans` left the queue for an export.
    fn taken(&self, spans: usize) {
        // Saturating: spans the batch processor held when the gate was built are not counted in.
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                Some(queued.saturating_sub(spans))
            });
    }

    fn dropped(&self, reason: SpanDrop, spans: usize) {
        self.drops.add(reason, spans);
        self.reporter().dropped(spans as u64);
    }

    fn reporter(&self) -> std::sync::MutexGuard<'_, Reporter> {
        // The reporter's state is two counters and an instant: still meaningful after a panic elsewhere.
        self.reporter.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// In front of the batch processor: admits a span while its queue has room, else drops and counts it.
#[derive(Debug)]
pub struct QueueGate<P> {
    inner: P,
    pipeline: Arc<Pipeline>,
}

impl<P> QueueGate<P> {
    pub fn new(inner: P, pipeline: Arc<Pipeline>) -> Self {
        Self { inner, pipeline }
    }
}

impl<P: SpanProcessor> SpanProcessor for QueueGate<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        // Called on the thread that ended the span (a socket's, an ingress task's): never block, never log.
        if self.pipeline.admit() {
            self.inner.on_end(span);
        } else {
            self.pipeline.dropped(SpanDrop::QueueFull, 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, with failures counted and reported at most once per [`WARNING_INTERVAL`].
#[derive(Debug)]
pub struct ReportingExporter<E> {
    inner: E,
    pipeline: Arc<Pipeline>,
}

impl<E> ReportingExporter<E> {
    pub fn new(inner: E, pipeline: Arc<Pipeline>) -> Self {
        Self { inner, pipeline }
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        self.pipeline.taken(spans);
        let result = self.inner.export(batch).await;
        if result.is_err() {
            self.pipeline.dropped(SpanDrop::ExportFailed, spans);
        }
        // Logged here, on the batch processor's thread, after the export: never on a gateway thread.
        let report = self
            .pipeline
            .reporter()
            .exported(result.is_ok(), Instant::now());
        report.log(result.as_ref().err());
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Decides, after each export, whether the log hears about dropped spans: at most one warning per
/// [`WARNING_INTERVAL`], and one line when exports succeed again after a warned failure.
#[derive(Debug, Default)]
pub struct Reporter {
    /// Spans dropped (for either reason) since the last line about them.
    unreported: u64,
    last_warning: Option<Instant>,
    /// A failed export was warned about and no export has succeeded since.
    failing: bool,
}

/// What to log after an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Nothing,
    /// Spans were dropped since the last line: the last export failed, or (after a success) the queue
    /// was full.
    Dropped {
        spans: u64,
        export_failed: bool,
    },
    /// An export succeeded after failures that were warned about.
    Resumed {
        dropped_since_warning: u64,
    },
}

impl Reporter {
    fn dropped(&mut self, spans: u64) {
        self.unreported += spans;
    }

    /// An export ended at `now`, successfully or not.
    pub fn exported(&mut self, succeeded: bool, now: Instant) -> Report {
        if succeeded && self.failing {
            self.failing = false;
            return Report::Resumed {
                dropped_since_warning: std::mem::take(&mut self.unreported),
            };
        }
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARNING_INTERVAL);
        if self.unreported == 0 || !due {
            return Report::Nothing;
        }
        self.last_warning = Some(now);
        self.failing |= !succeeded;
        Report::Dropped {
            spans: std::mem::take(&mut self.unreported),
            export_failed: !succeeded,
        }
    }
}

impl Report {
    fn log(self, error: Option<&OTelSdkError>) {
        match (self, error) {
            (Self::Nothing, _) => {}
            (Self::Dropped { spans, .. }, Some(error)) => tracing::warn!(
                dropped = spans,
                %error,
                "trace export failed: spans dropped (counted in epoch_gateway_trace_spans_dropped_total; \
                 this warning repeats at most once a minute)"
            ),
            (Self::Dropped { spans, .. }, None) => tracing::warn!(
                dropped = spans,
                "trace export queue full: spans dropped (counted in epoch_gateway_trace_spans_dropped_total; \
                 this warning repeats at most once a minute)"
            ),
            (
                Self::Resumed {
                    dropped_since_warning,
                },
                _,
            ) => tracing::info!(dropped_since_warning, "trace export resumed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_up_to_the_queue_size() {
        let drops = SpanDrops::default();
        let pipeline = Pipeline::new(2, drops.clone());
        assert!(pipeline.admit());
        assert!(pipeline.admit());
        assert!(!pipeline.admit());
        pipeline.taken(1);
        assert!(pipeline.admit());
        assert!(!pipeline.admit());
        pipeline.taken(5);
        assert!(pipeline.admit());
        let empty = Pipeline::new(0, drops);
        assert!(!empty.admit());
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let drops = SpanDrops::default();
        let pipeline = Pipeline::new(1, drops.clone());
        pipeline.dropped(SpanDrop::QueueFull, 1);
        pipeline.dropped(SpanDrop::ExportFailed, 512);
        pipeline.dropped(SpanDrop::ExportFailed, 3);
        assert_eq!(drops.count(SpanDrop::QueueFull), 1);
        assert_eq!(drops.count(SpanDrop::ExportFailed), 515);
    }

    #[test]
    fn a_collector_that_is_down_gets_one_warning_a_minute() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut reporter = Reporter::default();
        // Every export fails, one a second, 10 spans each, for three minutes.
        let mut warnings = Vec::new();
        for second in 0..180 {
            reporter.dropped(10);
            match reporter.exported(false, at(second)) {
                Report::Nothing => {}
                Report::Dropped {
                    spans,
                    export_failed: true,
                } => warnings.push((second, spans)),
                other => panic!("{other:?} at {second} s"),
            }
        }
        // The first failure at once; then every 60 s, with what was dropped in between.
        assert_eq!(warnings, [(0, 10), (60, 600), (120, 600)]);
        // Back: one line, with the drops not yet warned about; then quiet.
        assert_eq!(
            reporter.exported(true, at(181)),
            Report::Resumed {
                dropped_since_warning: 590
            }
        );
        assert_eq!(reporter.exported(true, at(182)), Report::Nothing);
        // Down again: the last warning is over a minute old, so at once; then quiet for a minute.
        reporter.dropped(10);
        assert_eq!(
            reporter.exported(false, at(183)),
            Report::Dropped {
                spans: 10,
                export_failed: true
            }
        );
        reporter.dropped(10);
        assert_eq!(reporter.exported(false, at(200)), Report::Nothing);
        reporter.dropped(10);
        assert_eq!(
            reporter.exported(false, at(243)),
            Report::Dropped {
                spans: 20,
                export_failed: true
            }
        );
    }

    #[test]
    fn a_full_queue_is_reported_after_a_successful_export() {
        let start = Instant::now();
        let mut reporter = Reporter::default();
        assert_eq!(reporter.exported(true, start), Report::Nothing);
        reporter.dropped(3);
        assert_eq!(
            reporter.exported(true, start),
            Report::Dropped {
                spans: 3,
                export_failed: false
            }
        );
        // Not a failure: no "resumed" line follows.
        assert_eq!(
            reporter.exported(true, start + Duration::from_secs(1)),
            Report::Nothing
        );
    }
}
