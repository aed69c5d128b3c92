//! Revoked tokens, cluster-wide: a JetStream KV bucket of token ids (`jti`), each record living until the
//! token would have expired (per-message TTL), and a local set kept current by a KV watch.
//!
//! A `logout {token}` event arrives on every instance that follows the user (all of them on the core path;
//! those with a session of the user with the event stream); each closes its own sockets of that token and
//! writes the record (an idempotent put), and the upgrade handler refuses a revoked token with 403 from
//! the local set, without a NATS round trip.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::unix_now;
use crate::broker::Nats;
use crate::broker::kv::{
    MARKER_TTL, OpenError, is_key_token, key_subject, open_or_create, ttl_headers,
};
use crate::broker::retry::{self, OnError};

/// Pause before retrying a failed watch or write.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Revoked token ids with their expiry (unix seconds).
#[derive(Debug)]
pub struct Revocations {
    revoked: RwLock<HashMap<String, u64>>,
    pending: mpsc::UnboundedSender<(String, u64)>,
}

impl Revocations {
    /// The set and the receiver of revocations to write to the bucket.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<(String, u64)>) {
        let (pending, rx) = mpsc::unbounded_channel();
        let revocations = Arc::new(Self {
            revoked: RwLock::default(),
            pending,
        });
        (revocations, rx)
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        let revoked = self.revoked.read().unwrap_or_else(PoisonError::into_inner);
        revoked
            .get(&record_key(jti))
            .is_some_and(|exp| *exp >= unix_now())
    }

    /// Revokes `jti` here at once and queues the cluster-wide record.
    pub fn revoke(&self, jti: &str, expires_at: u64) {
        self.remember(&record_key(jti), expires_at);
        // The receiver lives as long as the instance; after shutdown there is nothing left to refuse.
        let _ = self.pending.send((jti.to_owned(), expires_at));
    }

    /// `key` is a [`record_key`], as in the bucket.
    fn remember(&self, key: &str, expires_at: u64) {
        let now = unix_now();
        let mut revoked = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        // Tokens past their expiry are refused anyway; dropping them keeps the set small.
        revoked.retain(|_, exp| *exp >= now);
        revoked.insert(key.to_owned(), expires_at);
    }

    fn forget(&self, key: &str) {
        let mut revoked = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        revoked.remove(key);
    }
}

/// KV key for a token id: the id itself when it is a valid key (UUIDs are), its hex bytes otherwise.
pub fn record_key(jti: &str) -> String {
    if is_key_token(jti) {
        jti.to_owned()
    } else {
        let hex: String = jti.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x_{hex}")
    }
}

/// Opens the revocation bucket, creating it when missing.
///
/// # Errors
/// When JetStream does not answer or refuses the bucket; a missing bucket is created, not an error.
pub async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, OpenError> {
    let config = kv::Config {
        bucket: bucket.to_owned(),
        description: "epoch-gateway revoked token ids".to_owned(),
        history: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    };
    open_or_create(js, config, |_| Ok::<(), OpenError>(())).await
}

/// Waits for NATS, opens the bucket, then records queued revocations and follows the bucket until `stop`.
/// `replicas` is used when the bucket is created (the presence bucket's: both live on the same cluster).
pub async fn run(
    nats: Nats,
    bucket: String,
    replicas: usize,
    revocations: Arc<Revocations>,
    pending: mpsc::UnboundedReceiver<(String, u64)>,
    stop: CancellationToken,
) {
    if !nats.wait_connected(&stop).await {
        return;
    }
    let js = nats.jetstream();
    let opened = retry::with_backoff(
        &stop,
        || open_bucket(&js, &bucket, replicas),
        |error| {
            tracing::debug!(%error, %bucket, "revocation bucket not available yet; retrying");
            OnError::Retry
        },
    )
    .await;
    let Ok(store) = opened else { return };
    let watcher = tokio::spawn(watch_records(revocations, store, stop.clone()));
    write_records(js, bucket, pending, stop).await;
    let _ = watcher.await;
}

/// Writes queued revocations until `stop`.
async fn write_records(
    js: jetstream::Context,
    bucket: String,
    mut pending: mpsc::UnboundedReceiver<(String, u64)>,
    stop: CancellationToken,
) {
    loop {
        let (jti, expires_at) = tokio::select! {
            () = stop.cancelled() => return,
            next = pending.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        // The record lives as long as the token would have.
        let ttl = Duration::from_secs(expires_at.saturating_sub(unix_now()));
        let subject = key_subject(&bucket, &record_key(&jti));
        loop {
            let written = match js
                .publish_with_headers(
                    subject.clone(),
                    ttl_headers(ttl),
                    Bytes::from(expires_at.to_string()),
                )
                .await
            {
                Ok(ack) => ack.await.map(|_| ()),
                Err(error) => Err(error),
            };
            match written {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "revocation not recorded yet; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            }
        }
    }
}

/// Keeps the local set equal to the bucket until `stop`.
async fn watch_records(revocations: Arc<Revocations>, store: kv::Store, stop: CancellationToken) {
    loop {
        let mut records = match store.watch_with_history(">").await {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "revocation watch could not start; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY_DELAY) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                () = stop.cancelled() => return,
                entry = records.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => {
                    // Records are keyed by `record_key(jti)`; the set is keyed the same way.
                    if matches!(entry.operation, kv::Operation::Put) {
                        let expires_at = std::str::from_utf8(&entry.value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(u64::MAX);
                        revocations.remember(&entry.key, expires_at);
                    } else {
                        revocations.forget(&entry.key);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "revocation watch failed; restarting");
                    break;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe_for_any_jti() {
        assert_eq!(record_key("5f0c6a2e-4b7d-4a43"), "5f0c6a2e-4b7d-4a43");
        assert_eq!(record_key("a.b"), "x_612e62");
        assert_eq!(record_key(""), "x_");
    }

    #[test]
    fn revoked_until_expiry() {
        let (revocations, _rx) = Revocations::new();
        revocations.revoke("j1", unix_now() + 60);
        revocations.revoke("j2", unix_now().saturating_sub(1));
        assert!(revocations.is_revoked("j1"));
        assert!(!revocations.is_revoked("j2"));
        revocations.forget(&record_key("j1"));
        assert!(!revocations.is_revoked("j1"));
    }
}
