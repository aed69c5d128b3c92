//! Presence records in a JetStream KV bucket with per-key TTL (nats-server ≥ 2.11).
//!
//! One record per (user, instance), key `<user_id>.<node_id>`, written with a `Nats-TTL` of the configured
//! presence TTL and rewritten every third of it while the user stays online here. A clean leave purges the
//! record at once; a record that is not refreshed (the instance died) expires by itself and leaves a
//! delete marker that every watcher sees. Purge and expiry markers carry a short TTL of their own, so the
//! bucket does not fill up with markers of instances that are gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Presence, RemoteView};
use crate::broker::kv::{
    MARKER_TTL, OpenError, is_key_token, key_subject, open_or_create, purge_headers, ttl_headers,
};
use crate::metrics::Metrics;
use crate::topic::UserId;

/// Records are rewritten this many times per TTL, so one lost write does not expire a user.
const REFRESHES_PER_TTL: u32 = 3;
/// A refresh period is cut into slices this far apart, each rewriting its share of the local users: the
/// writes (and every instance's watch updates) flow evenly instead of in one burst per period, which would
/// hold up deliveries on the same cores.
const REFRESH_SLICE: Duration = Duration::from_millis(10);
/// Records published before their acknowledgements are awaited. async-nats holds at most 5,000
/// unacknowledged JetStream publishes per context and makes the next publish wait for a permit that only an
/// awaited acknowledgement returns: a larger batch would wait on itself forever.
const WRITE_CHUNK: usize = 1_000;
/// Pause before retrying writes that failed (NATS down, JetStream busy).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Bounds of the wait for a record's acknowledgement (half a refresh period).
const MIN_WRITE_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two updates of the presence gauges.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause before re-opening a watch that failed.
const REWATCH_DELAY: Duration = Duration::from_millis(500);
/// Longest wait for a rebuilt view to catch up with the bucket before it is used anyway.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// Why the presence bucket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "presence bucket '{bucket}' exists with other settings: {differences}; delete it or change the configuration"
    )]
    Mismatch { bucket: String, differences: String },
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// The bucket settings the gateway needs.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub bucket: String,
    pub replicas: usize,
}

impl BucketSpec {
    fn config(&self) -> kv::Config {
        kv::Config {
            bucket: self.bucket.clone(),
            description: "epoch-gateway presence: one record per (user, instance)".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        }
    }
}

/// Opens the bucket, creating it when missing. An existing bucket with other settings is an error; it is
/// never changed or recreated here.
///
/// # Errors
/// [`StoreError::Mismatch`] listing what differs, or [`StoreError::Open`] when NATS does not answer.
pub async fn open_bucket(
    js: &jetstream::Context,
    spec: &BucketSpec,
) -> Result<kv::Store, StoreError> {
    open_or_create(js, spec.config(), |actual| {
        let differences = differences(actual, spec);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Mismatch {
                bucket: spec.bucket.clone(),
                differences: differences.join(", "),
            })
        }
    })
    .await
}

fn differences(actual: &stream::Config, spec: &BucketSpec) -> Vec<String> {
    let mut out = Vec::new();
    if !actual.allow_message_ttl {
        out.push("per-message TTL is off (needs nats-server >= 2.11 and limit markers)".to_owned());
    }
    if actual.subject_delete_marker_ttl != Some(MARKER_TTL) {
        out.push(format!(
            "limit marker TTL is {:?}, expected {MARKER_TTL:?}",
            actual.subject_delete_marker_ttl
        ));
    }
    if actual.max_messages_per_subject != 1 {
        out.push(format!(
            "history is {}, expected 1",
            actual.max_messages_per_subject
        ));
    }
    if actual.num_replicas != spec.replicas {
        out.push(format!(
            "replicas are {}, expected {}",
            actual.num_replicas, spec.replicas
        ));
    }
    out
}

/// Key of `user`'s record from `node`. Node ids are validated at configuration time to be a single key
/// token, and user ids are decimal, so the key has exactly two tokens.
pub fn record_key(user: UserId, node: &str) -> String {
    format!("{user}.{node}")
}

/// The inverse of [`record_key`]; `None` for any key this gateway does not write.
pub fn parse_record_key(key: &str) -> Option<(UserId, &str)> {
    let (user, node) = key.split_once('.')?;
    is_key_token(node).then_some(())?;
    Some((UserId::parse(user)?, node))
}

/// Writes this instance's records: dirty users as they change, every local user once per refresh period
/// (in [`REFRESH_SLICE`] slices), and every local user again at once after a NATS reconnect (the server
/// may have lost them).
#[derive(Debug)]
pub struct Writer {
    pub presence: Arc<Presence>,
    pub js: jetstream::Context,
    /// Reopened (and recreated when missing) after a reconnect or a failed write: a NATS server that
    /// restarted with an empty store has lost the bucket.
    pub spec: BucketSpec,
    pub ttl: Duration,
    pub metrics: Arc<Metrics>,
    pub reconnects: watch::Receiver<u64>,
}

impl Writer {
    /// Runs until `stop` is cancelled, then writes the last changes and purges every record it still holds.
    pub async fn run(mut self, stop: CancellationToken) {
        let period = self.ttl / REFRESHES_PER_TTL;
        // After a failover the stream may be electing a leader: a write that is not acknowledged within half
        // a refresh period is retried rather than awaited for the client's default 5 s, so that a record is
        // rewritten long before it expires.
        self.js
            .set_timeout((period / 2).clamp(MIN_WRITE_TIMEOUT, MAX_WRITE_TIMEOUT));
        let mut records = Records {
            held: HashSet::new(),
            rotation: Rotation::new(period),
        };
        let mut refresh = tokio::time::interval(records.rotation.slice_interval);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reopen = false;
        let mut gauges_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.presence.dirty_notify.notified() => {}
                _ = refresh.tick() => {
                    let due = records.due();
                    if !due.is_empty() {
                        self.presence.mark_dirty(due);
                    }
                }
                changed = self.reconnects.changed() => {
                    if changed.is_ok() {
                        tracing::info!("NATS reconnected: re-asserting presence records");
                        reopen = true;
                        self.presence.mark_dirty(self.presence.local_users());
                    }
                }
            }
            if reopen {
                match open_bucket(&self.js, &self.spec).await {
                    Ok(_) => reopen = false,
                    Err(error) => tracing::warn!(%error, "presence bucket not available"),
                }
            }
            let dirty = self.presence.take_dirty();
            if !self.write(dirty, &mut records).await {
                reopen = true;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
            // Counting online users walks the whole view: at most once per GAUGE_INTERVAL.
            if gauges_at.is_none_or(|at| at.elapsed() >= GAUGE_INTERVAL) {
                self.update_gauges(&records.held);
                gauges_at = Some(tokio::time::Instant::now());
            }
        }
        let mut last = self.presence.take_dirty();
        last.extend(records.held.iter().copied());
        // After `stop`, sessions are gone, so every remaining user is written as offline.
        self.write(last, &mut records).await;
        self.update_gauges(&records.held);
        if !records.held.is_empty() {
            tracing::warn!(
                records = records.held.len(),
                "presence records left to expire by TTL"
            );
        }
    }

    /// Writes one batch, [`WRITE_CHUNK`] records per round trip; failed users go back to the dirty set.
    /// Returns whether everything was written.
    async fn write(&self, users: HashSet<UserId>, records: &mut Records) -> bool {
        let users: Vec<UserId> = users.into_iter().collect();
        let mut all_written = true;
        for chunk in users.chunks(WRITE_CHUNK) {
            all_written &= self.write_chunk(chunk, records).await;
        }
        all_written
    }

    async fn write_chunk(&self, users: &[UserId], records: &mut Records) -> bool {
        // Publish the whole chunk before awaiting any acknowledgement: JetStream applies them in order and
        // one round trip covers them all.
        let mut pending = Vec::with_capacity(users.len());
        for &user in users {
            let online = self.presence.is_local(user);
            let subject = key_subject(&self.spec.bucket, &record_key(user, self.presence.node()));
            let headers = if online {
                ttl_headers(self.ttl)
            } else {
                purge_headers()
            };
            let ack = self
                .js
                .publish_with_headers(subject, headers, Bytes::new())
                .await;
            pending.push((user, online, ack));
        }
        self.metrics.presence_written(pending.len());
        let mut all_written = true;
        let acks = pending.into_iter().map(|(user, online, ack)| async move {
            let result = match ack {
                Ok(ack) => ack.await.map(|_| ()),
                Err(error) => Err(error),
            };
            (user, online, result)
        });
        for (user, online, result) in join_all(acks).await {
            match result {
                Ok(()) => records.written(user, online),
                Err(error) => {
                    all_written = false;
                    self.metrics.presence_write_failed();
                    tracing::warn!(%user, %error, "presence record not written; will retry");
                    self.presence.mark_dirty([user]);
                }
            }
        }
        all_written
    }

    fn update_gauges(&self, held: &HashSet<UserId>) {
        self.metrics
            .presence_users(held.len(), self.presence.online_count());
    }
}

/// The records this instance holds in the bucket, and when each is due for a rewrite.
#[derive(Debug)]
struct Records {
    held: HashSet<UserId>,
    rotation: Rotation,
}

impl Records {
    /// The records due for a rewrite in this slice of the period.
    fn due(&mut self) -> Vec<UserId> {
        let mut due = self
            .rotation
            .next_slice(|| self.held.iter().copied().collect());
        // Records purged since the period began (their users left) are not rewritten.
        due.retain(|user| self.held.contains(user));
        due
    }

    fn written(&mut self, user: UserId, online: bool) {
        if !online {
            self.held.remove(&user);
        } else if self.held.insert(user) {
            self.rotation.add(user);
        }
    }
}

/// Hands out the local users in slices, so that each is due once per refresh period. A user's slice is
/// fixed by its id, so consecutive rewrites of a record are one period apart however the set changes.
#[derive(Debug)]
struct Rotation {
    slice_interval: Duration,
    /// Users of the current period, by slice; refilled when the period begins.
    slices: Vec<Vec<UserId>>,
    next: usize,
}

impl Rotation {
    fn new(period: Duration) -> Self {
        let count = (period.as_millis() / REFRESH_SLICE.as_millis()).max(1);
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        Self {
            slice_interval: period / u32::try_from(count).unwrap_or(u32::MAX),
            slices: vec![Vec::new(); count],
            next: 0,
        }
    }

    /// A record written for the first time: if its slice is still ahead in this period, it is rewritten
    /// there (otherwise the next period's first slice takes it in), so no rewrite is more than a period
    /// after the first write.
    fn add(&mut self, user: UserId) {
        let slice = slice_of(user, self.slices.len());
        if self.next != 0 && slice >= self.next {
            self.slices[slice].push(user);
        }
    }

    /// The next slice's users; at the first slice of a period, `users` is asked for the current set.
    fn next_slice(&mut self, users: impl FnOnce() -> Vec<UserId>) -> Vec<UserId> {
        let count = self.slices.len();
        if self.next == 0 {
            for user in users() {
                self.slices[slice_of(user, count)].push(user);
            }
        }
        let slice = std::mem::take(&mut self.slices[self.next]);
        self.next = (self.next + 1) % count;
        slice
    }
}

/// A user's slice: ids are often consecutive, so they are spread by a multiplicative hash first.
fn slice_of(user: UserId, count: usize) -> usize {
    let spread = user.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    usize::try_from(spread % count as u64).unwrap_or(0)
}

/// Keeps [`Presence`]'s view of other instances' records current, rebuilding it from the bucket after a
/// reconnect or a broken watch. A rebuild collects the bucket's current records aside and swaps them in
/// once caught up, so users do not flicker offline while it runs.
pub async fn watch_records(
    presence: Arc<Presence>,
    store: kv::Store,
    metrics: Arc<Metrics>,
    mut reconnects: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        let opened = async {
            Ok::<_, async_nats::Error>((
                store.status().await?.values(),
                store.watch_with_history(">").await?,
            ))
        };
        let (existing, mut records) = match opened.await {
            Ok(opened) => opened,
            Err(error) => {
                tracing::warn!(%error, "presence watch could not start; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(REWATCH_DELAY) => continue,
                }
            }
        };
        // `Some` while the bucket's existing records are still arriving.
        let mut rebuilding = if existing == 0 {
            presence.replace_remote(RemoteView::new());
            None
        } else {
            Some(RemoteView::new())
        };
        let catch_up = tokio::time::sleep(CATCH_UP_LIMIT);
        tokio::pin!(catch_up);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = reconnects.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                // Records can expire between the count and the watch; do not wait for them forever.
                () = &mut catch_up, if rebuilding.is_some() => {
                    presence.replace_remote(rebuilding.take().unwrap_or_default());
                }
                entry = records.next() => match entry {
                    Some(Ok(entry)) => {
                        metrics.presence_watch_update();
                        let Some((user, node)) = parse_record_key(&entry.key) else {
                            tracing::debug!(key = %entry.key, "ignoring foreign presence key");
                            continue;
                        };
                        let present = matches!(entry.operation, kv::Operation::Put);
                        match rebuilding.as_mut() {
                            Some(view) => {
                                presence.record_into(view, user, node, present);
                                if entry.delta == 0 {
                                    presence.replace_remote(rebuilding.take().unwrap_or_default());
                                }
                            }
                            None => presence.record_remote(user, node, present),
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "presence watch failed; rebuilding");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip() {
        let key = record_key(UserId::new(42), "gw-1_a");
        assert_eq!(key, "42.gw-1_a");
        assert_eq!(parse_record_key(&key), Some((UserId::new(42), "gw-1_a")));
    }

    #[test]
    fn foreign_keys_are_refused() {
        for key in [
            "42",
            "42.",
            ".gw",
            "x.gw",
            "042.gw",
            "42.gw.extra",
            "42.g w",
            "-1.gw",
        ] {
            assert_eq!(parse_record_key(key), None, "{key:?}");
        }
    }

    #[test]
    fn a_period_s_slices_hold_every_user_once_spread_evenly() {
        let mut rotation = Rotation::new(REFRESH_SLICE * 100);
        assert_eq!(rotation.slices.len(), 100);
        assert_eq!(rotation.slice_interval, REFRESH_SLICE);
        let users: Vec<UserId> = (1..=10_000).map(UserId::new).collect();
        let mut position = std::collections::HashMap::new();
        for period in 0..2 {
            let mut seen = HashSet::new();
            for slice in 0..100 {
                let due = rotation.next_slice(|| users.clone());
                // Consecutive ids spread out: about 100 per slice, none far off.
                assert!(
                    (60..=140).contains(&due.len()),
                    "slice {slice}: {}",
                    due.len()
                );
                for user in due {
                    assert!(seen.insert(user), "{user} twice in a period");
                    // The same slice in every period: rewrites stay one period apart.
                    assert_eq!(
                        *position.entry(user).or_insert(slice),
                        slice,
                        "period {period}"
                    );
                }
            }
            assert_eq!(seen.len(), users.len());
        }
    }

    #[test]
    fn users_are_taken_once_per_period_at_its_first_slice() {
        let mut rotation = Rotation::new(REFRESH_SLICE * 10);
        assert_eq!(rotation.slices.len(), 10);
        let mut asked = 0;
        let mut due = Vec::new();
        for _ in 0..10 {
            due.extend(rotation.next_slice(|| {
                asked += 1;
                vec![UserId::new(7)]
            }));
        }
        assert_eq!((asked, due), (1, vec![UserId::new(7)]));
        // A short period still has at least one slice.
        let mut tiny = Rotation::new(REFRESH_SLICE / 2);
        assert_eq!(
            tiny.next_slice(|| vec![UserId::new(1)]),
            vec![UserId::new(1)]
        );
        assert_eq!(
            tiny.next_slice(|| vec![UserId::new(2)]),
            vec![UserId::new(2)]
        );
    }

    #[test]
    fn a_new_record_is_due_within_a_period_of_its_first_write() {
        let mut rotation = Rotation::new(REFRESH_SLICE * 100);
        let count = rotation.slices.len();
        let ahead = (1..)
            .map(UserId::new)
            .find(|&u| slice_of(u, count) > count / 2)
            .unwrap();
        let behind = (1..)
            .map(UserId::new)
            .find(|&u| slice_of(u, count) < count / 2)
            .unwrap();
        let mut handed = Vec::new();
        for _ in 0..count / 2 {
            handed.extend(rotation.next_slice(Vec::new));
        }
        // Written halfway through the period: one still has its slice ahead, the other's has passed.
        rotation.add(ahead);
        rotation.add(behind);
        for _ in count / 2..count {
            handed.extend(rotation.next_slice(Vec::new));
        }
        assert_eq!(handed, vec![ahead]);
        // The next period's set includes both, each in its own slice.
        let mut next = Vec::new();
        for _ in 0..count {
            next.extend(rotation.next_slice(|| vec![ahead, behind]));
        }
        assert_eq!(next, vec![behind, ahead]);
    }
}
