//! The presence task of one instance: waits for NATS, opens the bucket, then runs the record writer with
//! the KV watcher and the NATS presence service beside it, until `stop`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Presence;
use super::service;
use super::store::{self, BucketSpec, StoreError};
use crate::broker::Nats;
use crate::broker::retry::{self, OnError, Stopped};
use crate::metrics::Metrics;

/// What the task needs besides NATS and the shared state.
#[derive(Debug, Clone)]
pub struct Options {
    pub spec: BucketSpec,
    pub ttl: Duration,
    pub subject_prefix: String,
}

/// Runs presence until `stop`; `ready` turns true once the bucket is open (for `/readyz`).
///
/// # Errors
/// [`StoreError::Mismatch`] when the bucket exists with other settings: the instance cannot keep its
/// presence promise and must stop.
pub async fn run(
    nats: Nats,
    options: Options,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    if !nats.wait_connected(&stop).await {
        return Ok(());
    }
    let js = nats.jetstream();
    let Options {
        spec,
        ttl,
        subject_prefix,
    } = options;
    let opened = retry::with_backoff(
        &stop,
        || store::open_bucket(&js, &spec),
        |error| match error {
            StoreError::Mismatch { .. } => OnError::GiveUp,
            StoreError::Open(error) => {
                tracing::warn!(%error, bucket = %spec.bucket, "presence bucket not available yet; retrying");
                OnError::Retry
            }
        },
    )
    .await;
    let bucket = match opened {
        Ok(bucket) => bucket,
        Err(Stopped::Cancelled) => return Ok(()),
        Err(Stopped::Final(error)) => {
            tracing::error!(%error, "cannot use the presence bucket");
            return Err(error);
        }
    };
    ready.send_replace(true);
    tracing::info!(bucket = %spec.bucket, "presence bucket open");
    let service = tokio::spawn({
        let (client, node) = (nats.client().clone(), presence.node().to_owned());
        let (presence, stop) = (Arc::clone(&presence), stop.clone());
        async move {
            if let Err(error) = service::serve(client, &subject_prefix, &node, presence, stop).await
            {
                tracing::error!(%error, "presence service could not start");
            }
        }
    });
    let watcher = tokio::spawn(store::watch_records(
        Arc::clone(&presence),
        bucket,
        Arc::clone(&metrics),
        nats.reconnects(),
        stop.clone(),
    ));
    let writer = store::Writer {
        presence,
        js,
        spec,
        ttl,
        metrics,
        reconnects: nats.reconnects(),
    };
    writer.run(stop).await;
    let _ = tokio::join!(watcher, service);
    Ok(())
}
