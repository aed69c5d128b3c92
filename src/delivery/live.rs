//! The event stream at run time: what the ingress and the channels share ([`Delivery`]), and the ingress
//! that follows the stream ([`follow`]).
//!
//! [`follow`] subscribes to the republished copies of the stream (`<prefix>.delivery.user.<t>`): always
//! `public` and `role` (on the main connection), and `<id>` for each user with a session on this instance,
//! as the hub announces them ([`Interest`]), on the lean subscriber ([`FanIn`]), where a subscription costs
//! its subject and not a channel. Each copy carries its sequence and the previous sequence of its subject; the
//! topic's [`Tracker`] says whether it is next, a duplicate, or after a gap, which is read back from the
//! stream before the copy is delivered. After a NATS reconnect, and after the stream elects a new leader
//! (whose predecessor may have stored events it never republished), every followed topic is caught up
//! from the stream to its head; a deleted stream is created again at once, and its new epoch voids the old
//! positions. Events reach the hub through the same [`Router`] as on the core path, in stream order,
//! exactly once per topic. A newly followed user's starting point (the stream's last sequence after the
//! subscription, its watermark) is read beside the loop; the user's copies wait for it, other topics do not.
//!
//! A topic's head (its last delivered sequence) and, for `public` and `role`, a [`Window`] of its recent
//! frames are updated before the hub gets the event, under one lock that a join also takes after it
//! subscribed: the join's position and replay then meet the live events exactly, with the session dropping
//! live copies at or below what it replayed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_nats::Message;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::position::{Epoch, Position, PositionError};
use super::reader::{self, ReadError, ReadRequest, StoredMessage, Until};
use super::recovery::{self, Facts, Reason, Recover};
use super::stream::{self, Stored, StreamSpec};
use super::tracker::{Tracker, Verdict};
use super::window::{Entry, Window, WindowLimits};
use crate::broker::Nats;
use crate::broker::fanin::{Delivered, FanIn};
use crate::broker::ingress::{self, Broadcast, Control, Router};
use crate::broker::retry::{self, OnError};
use crate::hub::Interest;
use crate::metrics::{Metrics, RecoveryOutcome};
use crate::protocol::{self, Frame};
use crate::topic::{Topic, UserId};

/// Events read per request while catching up after a reconnect: a range of this many sequences holds at
/// most this many events, so memory stays bounded however long the outage was.
const CATCH_UP_CHUNK: u64 = 5_000;
/// Overall time one read of a gap, a catch-up chunk or a replay may take, retries included: long enough to
/// ride out a leader election.
const READ_DEADLINE: Duration = Duration::from_secs(30);
/// A recovery read on a join gives up sooner: the client waits for its reply meanwhile.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for the stream's last sequence when new users are subscribed.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one answer from JetStream. A request sent while the stream (or the cluster's meta layer)
/// has no leader is never answered: it is sent again soon, rather than waited on for the connection's
/// request timeout (10 s) while a catch-up holds up the live events of every topic.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The JetStream context of every request about the event stream.
fn jetstream(nats: &Nats) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(nats.client().clone())
}

/// What the event stream keeps, from configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub spec: StreamSpec,
    pub max_recover: u64,
    /// Largest ingress message body.
    pub max_bytes: usize,
}

/// Topics' heads and hot windows, under one lock.
#[derive(Debug)]
struct Topics {
    trackers: HashMap<Topic, Tracker>,
    public: Window<Frame>,
    role: Window<Frame>,
}

impl Topics {
    fn window(&mut self, topic: Topic) -> Option<&mut Window<Frame>> {
        match topic {
            Topic::Public => Some(&mut self.public),
            Topic::Role => Some(&mut self.role),
            Topic::User(_) => None,
        }
    }
}

/// What a join sees of its topic.
#[derive(Debug)]
pub struct JoinView {
    pub epoch: Epoch,
    /// The topic's last delivered sequence here.
    pub head: u64,
    /// With `since`: the frames after it from the hot window, when the window covers it.
    pub replay: Option<Vec<(u64, Frame)>>,
}

/// The outcome of a recovery.
#[derive(Debug)]
pub enum Recovery {
    /// The events after `since`, in order; the topic's position is the last of them, or `since`.
    Replayed(Vec<(u64, Frame)>),
    Refused(Reason),
}

/// The event stream state shared by the ingress and the channels.
#[derive(Debug)]
pub struct Delivery {
    options: Options,
    nats: Nats,
    metrics: Arc<Metrics>,
    epoch: RwLock<Option<Epoch>>,
    topics: Mutex<Topics>,
}

impl Delivery {
    pub fn new(options: Options, nats: Nats, metrics: Arc<Metrics>) -> Arc<Self> {
        let limits = WindowLimits {
            per_topic: usize::try_from(options.spec.per_topic).unwrap_or(usize::MAX),
            history: options.spec.history,
            max_bytes: super::window::DEFAULT_MAX_BYTES,
        };
        Arc::new(Self {
            topics: Mutex::new(Topics {
                trackers: HashMap::new(),
                public: Window::new(limits, 0),
                role: Window::new(limits, 0),
            }),
            options,
            nats,
            metrics,
            epoch: RwLock::new(None),
        })
    }

    /// The stream's epoch, once the stream is open.
    pub fn epoch(&self) -> Option<Epoch> {
        self.epoch
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, Topics> {
        // Every critical section is a few map and window operations: a poisoned lock still guards
        // consistent data.
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The position of `topic` here and, with `since`, its replay from the hot window. Called by a join
    /// after it subscribed in the hub. `None` until the stream is open and the topic is followed.
    pub fn join_view(&self, topic: Topic, since: Option<u64>) -> Option<JoinView> {
        let epoch = self.epoch()?;
        let mut topics = self.topics();
        let head = topics.trackers.get(&topic)?.last();
        // A `since` past this instance's head is left to the stream, which can tell "from the future"
        // from "another instance saw it first".
        let replay = since.filter(|since| *since <= head).and_then(|since| {
            let window = topics.window(topic)?;
            let entries = window.after(since, SystemTime::now())?;
            let max = usize::try_from(self.options.max_recover).unwrap_or(usize::MAX);
            (entries.len() <= max).then(|| entries.into_iter().map(|e| (e.seq, e.item)).collect())
        });
        Some(JoinView {
            epoch,
            head,
            replay,
        })
    }

    /// Recovers `topic` after `since` from the stream, up to `head` (the topic's head when the join
    /// subscribed): everything after `since`, or a refusal when the stream cannot prove it holds it all.
    pub async fn recover(
        &self,
        topic: Topic,
        since: Result<Position, PositionError>,
        head: u64,
    ) -> Recovery {
        let outcome = self.read_recovery(topic, since, head).await;
        self.record(&outcome);
        outcome
    }

    async fn read_recovery(
        &self,
        topic: Topic,
        since: Result<Position, PositionError>,
        head: u64,
    ) -> Recovery {
        let js = jetstream(&self.nats);
        let name = &self.options.spec.name;
        let state = match reader::stream_state(&js, name).await {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(%error, "recovery: stream state unavailable");
                return Recovery::Refused(Reason::Expired);
            }
        };
        let since_seq = match &since {
            Ok(position) => position.seq,
            Err(_) => 0,
        };
        let per_topic = u64::try_from(self.options.spec.per_topic).unwrap_or(u64::MAX);
        // Enough to tell "fewer than the per-topic limit and no more than max_recover" from the rest.
        let cap = per_topic.min(self.options.max_recover.saturating_add(1));
        let facts = |count| Facts {
            since: since.as_ref(),
            epoch: &state.epoch,
            first_seq: state.first_seq,
            last_seq: state.last_seq,
            count,
            per_topic,
            max_recover: self.options.max_recover,
        };
        // The cheap refusals first: malformed, another stream, from the future, expired.
        if let Recover::Refuse(reason) = recovery::decide(&facts(0)) {
            return Recovery::Refused(reason);
        }
        if head <= since_seq {
            return Recovery::Replayed(Vec::new());
        }
        let filter =
            stream::stored_subject(&self.options.spec.subject_prefix, &topic.subject_token());
        let request = ReadRequest::new(name, &filter, since_seq, Until::Seq(head))
            .max(usize::try_from(cap).unwrap_or(usize::MAX))
            .deadline(RECOVERY_DEADLINE)
            .epoch(state.epoch.clone());
        let events = match reader::read(&js, &request).await {
            Ok(events) => events,
            Err(ReadError::Exceeded { at_least, .. }) => {
                return match recovery::decide(&facts(at_least)) {
                    Recover::Refuse(reason) => Recovery::Refused(reason),
                    Recover::Replay { .. } => Recovery::Refused(Reason::TooMany),
                };
            }
            Err(ReadError::Recreated { .. }) => return Recovery::Refused(Reason::OtherStream),
            Err(error) => {
                tracing::warn!(%error, %topic, "recovery read failed");
                return Recovery::Refused(Reason::Expired);
            }
        };
        if let Recover::Refuse(reason) = recovery::decide(&facts(events.len() as u64)) {
            return Recovery::Refused(reason);
        }
        let frames = events
            .iter()
            .filter_map(|event| {
                // A replay only delivers: no side effect runs again, and `disconnect` is never delivered.
                match ingress::decode(topic, &event.payload, self.options.max_bytes) {
                    Ok(Broadcast {
                        control: Some(Control::Disconnect(_)),
                        ..
                    })
                    | Err(_) => None,
                    Ok(broadcast) => Some((event.seq, broadcast.frame)),
                }
            })
            .collect();
        Recovery::Replayed(frames)
    }

    /// Counts a recovery by its outcome.
    pub fn record(&self, outcome: &Recovery) {
        let (outcome, events) = match outcome {
            Recovery::Replayed(frames) => (RecoveryOutcome::Recovered, frames.len()),
            Recovery::Refused(reason) => (reason.outcome(), 0),
        };
        self.metrics.delivery_recovery(outcome, events);
    }

    /// `frame` with `seq`'s position in the ref slot.
    pub fn positioned(epoch: &Epoch, seq: u64, frame: &Frame) -> Frame {
        protocol::with_ref(frame, &Position::new(epoch.clone(), seq).encode())
    }
}

/// One followed subscription's messages, tagged with their topic.
type Followed = BoxStream<'static, Message>;

/// Where the copies of users' topics arrive: the lean subscriber and its channel.
pub struct UserCopies {
    pub fanin: FanIn,
    pub messages: mpsc::Receiver<Delivered>,
}

/// The ingress of the event stream; runs until `stop`.
pub async fn follow(
    delivery: Arc<Delivery>,
    mut router: Router,
    mut interest: mpsc::UnboundedReceiver<Interest>,
    copies: UserCopies,
    stop: CancellationToken,
) {
    let UserCopies {
        fanin,
        messages: mut user_copies,
    } = copies;
    let mut fanin_reconnects = fanin.reconnects();
    let nats = delivery.nats.clone();
    if !nats.wait_connected(&stop).await {
        return;
    }
    let js = jetstream(&nats);
    let spec = delivery.options.spec.clone();
    let opened = retry::with_backoff(
        &stop,
        || stream::ensure(&js, &spec),
        |error| {
            tracing::warn!(%error, stream = %spec.name, "event stream not available yet; retrying");
            OnError::Retry
        },
    )
    .await;
    let Ok(ensured) = opened else { return };

    let mut follower = Follower {
        delivery: Arc::clone(&delivery),
        nats: nats.clone(),
        epoch: ensured.epoch,
        subscriptions: SelectAll::new(),
        fanin,
        users: HashSet::new(),
        pending: HashMap::new(),
        watermarks: FuturesUnordered::new(),
        next_batch: 0,
        seen_max: ensured.info.state.last_sequence,
    };
    let mut reconnects = nats.reconnects();
    // The stream's advisories: a new leader, or the stream deleted (it is created again at once).
    let mut advisories = match nats
        .client()
        .subscribe(format!("$JS.EVENT.ADVISORY.STREAM.*.{}", spec.name))
        .await
    {
        Ok(advisories) => Some(advisories),
        Err(error) => {
            tracing::warn!(%error, "cannot follow the event stream's advisories");
            None
        }
    };
    for topic in [Topic::Public, Topic::Role] {
        if let Err(error) = follower.subscribe(topic).await {
            tracing::error!(%error, %topic, "cannot subscribe to the event stream's copies");
        }
    }
    let flushed = {
        let client = nats.client().clone();
        async move {
            let _ = tokio::time::timeout(WATERMARK_TIMEOUT, client.flush()).await;
        }
    };
    let watermark = watermark(nats.clone(), spec.name.clone(), follower.seen_max, flushed).await;
    {
        let mut topics = delivery.topics();
        for topic in [Topic::Public, Topic::Role] {
            topics
                .trackers
                .insert(topic, Tracker::lower_bound(watermark));
            if let Some(window) = topics.window(topic) {
                window.reset(watermark);
            }
        }
    }
    // A known epoch means ready: only now does every followed topic have its tracker.
    *delivery
        .epoch
        .write()
        .unwrap_or_else(PoisonError::into_inner) = Some(follower.epoch.clone());
    tracing::info!(stream = %spec.name, epoch = %follower.epoch, outcome = ?ensured.outcome, "event stream open");
    loop {
        tokio::select! {
            // A reconnect first: copies that arrive after it are judged against the caught-up heads.
            biased;
            () = stop.cancelled() => break,
            changed = reconnects.changed() => {
                if changed.is_err() { break }
                tracing::info!("NATS reconnected: catching up on the event stream");
                follower.catch_up(&mut router).await;
            }
            change = interest.recv() => {
                let Some(change) = change else { break };
                let mut changes = vec![change];
                while let Ok(change) = interest.try_recv() {
                    changes.push(change);
                }
                follower.apply(changes, &router).await;
            }
            Some(message) = follower.subscriptions.next() => {
                follower.on_live(message, &mut router).await;
            }
            Some((_, message)) = user_copies.recv() => {
                follower.on_live(message, &mut router).await;
            }
            changed = fanin_reconnects.changed() => {
                if changed.is_err() { break }
                tracing::info!("NATS subscriber of users' events reconnected: catching up on the event stream");
                follower.catch_up(&mut router).await;
            }
            Some(read) = follower.watermarks.next() => {
                follower.on_watermark(read, &mut router).await;
            }
            Some(advisory) = async { match advisories.as_mut() { Some(a) => a.next().await, None => None } } => {
                if advisory.subject.starts_with("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.") {
                    tracing::info!("event stream elected a leader: catching up");
                    follower.catch_up(&mut router).await;
                } else if advisory.subject.starts_with("$JS.EVENT.ADVISORY.STREAM.DELETED.") {
                    tracing::warn!("event stream deleted: creating it again");
                    follower.catch_up(&mut router).await;
                }
            }
        }
    }
}

/// A newly followed user whose watermark is still being read.
struct Pending {
    /// The batch of new users whose watermark read this user waits for.
    batch: u64,
    /// The hub's latest announcement of the user, acknowledged once the watermark is known.
    generation: u64,
    /// The user's copies that arrived meanwhile, in order.
    copies: Vec<Message>,
}

/// The watermark of a batch of new users, once read.
struct WatermarkRead {
    batch: u64,
    users: Vec<UserId>,
    watermark: u64,
    /// The lean subscriber's reconnections when the batch was subscribed.
    reconnects: u64,
}

/// The stream's last sequence, read after subscriptions were made and `flushed` (the server has
/// registered them once a flush returns): every event of a newly followed topic after it arrives live.
/// Falls back on `seen_max`, the highest sequence seen before the subscriptions.
async fn watermark(
    nats: Nats,
    stream: String,
    seen_max: u64,
    flushed: impl Future<Output = ()>,
) -> u64 {
    flushed.await;
    let js = jetstream(&nats);
    match tokio::time::timeout(WATERMARK_TIMEOUT, reader::stream_state(&js, &stream)).await {
        Ok(Ok(state)) => state.last_seq.max(seen_max),
        Ok(Err(error)) => {
            tracing::warn!(%error, "event stream state unavailable; following from the last event seen");
            seen_max
        }
        Err(_) => seen_max,
    }
}

/// The ingress side of the event stream.
struct Follower {
    delivery: Arc<Delivery>,
    nats: Nats,
    epoch: Epoch,
    /// `public` and `role`.
    subscriptions: SelectAll<Followed>,
    /// Users' topics, one subscription per followed user, keyed by the user id.
    fanin: FanIn,
    users: HashSet<UserId>,
    /// Followed users without a tracker yet: their watermark is being read.
    pending: HashMap<UserId, Pending>,
    /// Watermark reads in flight. They run beside the ingress loop: a join storm's round trips to the stream
    /// must not hold up the live events of every other topic.
    watermarks: FuturesUnordered<BoxFuture<'static, WatermarkRead>>,
    next_batch: u64,
    /// Highest sequence seen on any followed subject: a lower bound of the stream's last sequence.
    seen_max: u64,
}

impl Follower {
    fn prefix(&self) -> &str {
        &self.delivery.options.spec.subject_prefix
    }

    /// Subscribes a topic followed for as long as the instance runs (`public`, `role`).
    async fn subscribe(&mut self, topic: Topic) -> Result<(), async_nats::SubscribeError> {
        let subject = stream::republish_subject(self.prefix(), &topic.subject_token());
        let subscriber = self.nats.client().subscribe(subject).await?;
        self.subscriptions.push(subscriber.boxed());
        Ok(())
    }

    /// Follows the users whose first session arrived and drops those whose last one left, then tells
    /// the hub which subscriptions are in place; new users are in place once their watermark is known
    /// ([`Self::on_watermark`]).
    async fn apply(&mut self, changes: Vec<Interest>, router: &Router) {
        // The last change of each user wins; a leave and a join in one batch keep the subscription.
        let mut last: HashMap<UserId, Option<u64>> = HashMap::new();
        for change in changes {
            match change {
                Interest::Add { user, generation } => last.insert(user, Some(generation)),
                Interest::Remove { user } => last.insert(user, None),
            };
        }
        let batch = self.next_batch;
        let mut added = Vec::new();
        let mut ready = Vec::new();
        for (user, generation) in last {
            match generation {
                Some(generation) if self.users.contains(&user) => {
                    match self.pending.get_mut(&user) {
                        Some(pending) => pending.generation = generation,
                        None => ready.push((user, generation)),
                    }
                }
                Some(generation) => {
                    let subject = stream::republish_subject(
                        self.prefix(),
                        &Topic::User(user).subject_token(),
                    );
                    self.fanin.subscribe(user.get(), subject);
                    self.users.insert(user);
                    self.pending.insert(
                        user,
                        Pending {
                            batch,
                            generation,
                            copies: Vec::new(),
                        },
                    );
                    added.push(user);
                }
                None => {
                    if self.users.remove(&user) {
                        self.fanin.unsubscribe(user.get());
                    }
                    self.pending.remove(&user);
                    self.delivery.topics().trackers.remove(&Topic::User(user));
                }
            }
        }
        if !added.is_empty() {
            self.next_batch += 1;
            let reconnects = *self.fanin.reconnects().borrow();
            let fanin = self.fanin.clone();
            let read = watermark(
                self.nats.clone(),
                self.delivery.options.spec.name.clone(),
                self.seen_max,
                async move {
                    fanin.flush(WATERMARK_TIMEOUT).await;
                },
            );
            self.watermarks.push(
                read.map(move |watermark| WatermarkRead {
                    batch,
                    users: added,
                    watermark,
                    reconnects,
                })
                .boxed(),
            );
        }
        for (user, generation) in ready {
            router.hub().upstream_ready(user, generation);
        }
    }

    /// The watermark of a batch of new users is known: each still waiting for it gets its tracker, the
    /// copies that arrived meanwhile, and is announced to the hub as in place.
    async fn on_watermark(&mut self, read: WatermarkRead, router: &mut Router) {
        let WatermarkRead {
            batch,
            users,
            watermark,
            reconnects,
        } = read;
        // The lean subscriber reconnected since the batch was subscribed: its subscriptions may have been
        // registered after the watermark, and the catch-up of that reconnection may have run before these
        // users had a tracker. One more catch-up closes the gap.
        let missed = *self.fanin.reconnects().borrow() != reconnects;
        let mut ready = Vec::with_capacity(users.len());
        for user in users {
            // A user who left meanwhile (and maybe came back in a later batch) is not this batch's.
            if self.pending.get(&user).is_none_or(|p| p.batch != batch) {
                continue;
            }
            let Some(pending) = self.pending.remove(&user) else {
                continue;
            };
            self.delivery
                .topics()
                .trackers
                .insert(Topic::User(user), Tracker::lower_bound(watermark));
            for message in pending.copies {
                self.on_live(message, router).await;
            }
            ready.push((user, pending.generation));
        }
        if missed && !ready.is_empty() {
            tracing::info!("users followed across a reconnection of their subscriber: catching up");
            self.catch_up(router).await;
        }
        for (user, generation) in ready {
            router.hub().upstream_ready(user, generation);
        }
    }

    /// One republished copy: deliver it, drop it as a duplicate, or fill the gap before it.
    async fn on_live(&mut self, message: Message, router: &mut Router) {
        let received = Instant::now();
        let stored = match Stored::from_headers(message.headers.as_ref()) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, subject = %message.subject, "event stream copy without its headers; dropped");
                return;
            }
        };
        self.seen_max = self.seen_max.max(stored.seq);
        let Some(topic) = ingress::subject_topic(self.prefix(), &stored.subject) else {
            return;
        };
        let verdict = self
            .delivery
            .topics()
            .trackers
            .get(&topic)
            .map(|tracker| tracker.check(&stored));
        let Some(verdict) = verdict else {
            // Followed, but its watermark is still being read: kept until it is known. Otherwise no
            // longer followed (the last session left while the copy was in flight).
            if let Topic::User(user) = topic
                && let Some(pending) = self.pending.get_mut(&user)
            {
                pending.copies.push(message);
            }
            return;
        };
        self.delivery.metrics.delivery_lag(stored.time);
        match verdict {
            Verdict::Duplicate => return,
            Verdict::Deliver => {}
            Verdict::Gap { after, through, .. } => {
                if self
                    .fill(topic, &stored.subject, after, through, router)
                    .await
                {
                    self.delivery.metrics.delivery_gap_filled();
                }
            }
        }
        self.deliver(
            topic,
            stored.seq,
            &stored.subject,
            &message.payload,
            message.headers.as_ref(),
            stored.time,
            received,
            router,
        );
    }

    /// Reads `subject` after `after` through `through` from the stream and delivers it. Returns whether
    /// the whole range was read.
    async fn fill(
        &mut self,
        topic: Topic,
        subject: &str,
        after: u64,
        through: u64,
        router: &mut Router,
    ) -> bool {
        let js = jetstream(&self.nats);
        let request = ReadRequest::new(
            &self.delivery.options.spec.name,
            subject,
            after,
            Until::Seq(through),
        )
        .max(usize::MAX)
        .deadline(READ_DEADLINE)
        .epoch(self.epoch.clone());
        match reader::read(&js, &request).await {
            Ok(events) => {
                self.delivery.metrics.delivery_caught_up(events.len());
                for event in &events {
                    self.deliver_stored(topic, event, router);
                }
                true
            }
            Err(error) => {
                tracing::error!(%error, %topic, after, through, "events missing: the gap could not be read back");
                // The hot window must not claim to be complete over the hole.
                if let Some(window) = self.delivery.topics().window(topic) {
                    window.reset(through);
                }
                false
            }
        }
    }

    /// Brings every followed topic up to the stream's head: after a reconnect, or a new stream leader. A
    /// server that came back with an empty store has lost the stream, and a deleted stream is gone: it is
    /// created again, and every followed topic starts over from the new stream's first event.
    async fn catch_up(&mut self, router: &mut Router) {
        let js = jetstream(&self.nats);
        let name = self.delivery.options.spec.name.clone();
        match self.reopen().await {
            Some(epoch) if epoch != self.epoch => {
                tracing::warn!(stream = %name, old = %self.epoch, new = %epoch, "the event stream was recreated: positions of the old one are void");
                self.epoch = epoch.clone();
                *self
                    .delivery
                    .epoch
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(epoch);
                self.seen_max = 0;
                let mut topics = self.delivery.topics();
                for tracker in topics.trackers.values_mut() {
                    *tracker = Tracker::lower_bound(0);
                }
                topics.public.reset(0);
                topics.role.reset(0);
            }
            Some(_) => {}
            None => {
                tracing::warn!(stream = %name, "cannot catch up: the event stream is unavailable");
                return;
            }
        }
        let target = match reader::stream_state(&js, &name).await {
            Ok(state) => state.last_seq,
            Err(error) => {
                tracing::warn!(%error, "cannot catch up: the event stream state is unavailable");
                return;
            }
        };
        let from = {
            let topics = self.delivery.topics();
            topics.trackers.values().map(Tracker::last).min()
        };
        let Some(mut cursor) = from else { return };
        let filter = stream::stored_subject(self.prefix(), ">");
        let started = Instant::now();
        let mut delivered = 0usize;
        while cursor < target {
            let through = cursor.saturating_add(CATCH_UP_CHUNK).min(target);
            let request = ReadRequest::new(&name, &filter, cursor, Until::Seq(through))
                .max(usize::MAX)
                .deadline(READ_DEADLINE)
                .epoch(self.epoch.clone());
            match reader::read(&js, &request).await {
                Ok(events) => {
                    for event in &events {
                        let Some(topic) = ingress::subject_topic(self.prefix(), &event.subject)
                        else {
                            continue;
                        };
                        let next = self
                            .delivery
                            .topics()
                            .trackers
                            .get(&topic)
                            .is_some_and(|tracker| event.seq > tracker.last());
                        if next {
                            delivered += 1;
                            self.deliver_stored(topic, event, router);
                        }
                    }
                    cursor = through;
                }
                Err(error) => {
                    tracing::error!(%error, cursor, target, "catch-up stopped: events after the cursor may arrive late");
                    return;
                }
            }
        }
        // Every followed topic now holds everything up to `target`.
        {
            let mut topics = self.delivery.topics();
            for tracker in topics.trackers.values_mut() {
                if tracker.last() < target {
                    tracker.advance(target);
                }
            }
        }
        self.seen_max = self.seen_max.max(target);
        self.delivery.metrics.delivery_caught_up(delivered);
        tracing::info!(
            delivered,
            target,
            elapsed_ms = started.elapsed().as_millis(),
            "caught up on the event stream"
        );
    }

    /// Opens (or creates again) the stream, retrying through a leader election; its epoch.
    async fn reopen(&mut self) -> Option<Epoch> {
        let js = jetstream(&self.nats);
        let spec = &self.delivery.options.spec;
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        let mut delay = retry::FIRST_DELAY;
        loop {
            match stream::ensure(&js, spec).await {
                Ok(ensured) => return Some(ensured.epoch),
                Err(error) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!(%error, "event stream not available yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(retry::MAX_DELAY);
                }
                Err(error) => {
                    tracing::warn!(%error, "event stream unavailable");
                    return None;
                }
            }
        }
    }

    fn deliver_stored(&self, topic: Topic, event: &StoredMessage, router: &mut Router) {
        self.deliver(
            topic,
            event.seq,
            &event.subject,
            &event.payload,
            event.headers.as_ref(),
            event.time,
            Instant::now(),
            router,
        );
    }

    /// Checks and delivers one stored event of `topic`, after recording it as the topic's head (and in its
    /// hot window), so that a join that subscribes meanwhile sees a consistent position.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        topic: Topic,
        seq: u64,
        subject: &str,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        time: SystemTime,
        received: Instant,
        router: &mut Router,
    ) {
        let span = ingress::message_span(subject, headers);
        let _entered = span.enter();
        let broadcast = router.check(subject, payload, false);
        {
            let mut topics = self.delivery.topics();
            let Some(tracker) = topics.trackers.get_mut(&topic) else {
                return;
            };
            tracker.advance(seq);
            if let (Some(window), Some(broadcast)) = (topics.window(topic), &broadcast)
                && broadcast.control.is_none()
            {
                window.push(
                    Entry {
                        seq,
                        time,
                        size: broadcast.frame.len(),
                        item: broadcast.frame.clone(),
                    },
                    SystemTime::now(),
                );
            }
        }
        if let Some(broadcast) = broadcast {
            let epoch = &self.epoch;
            router.deliver(
                &broadcast,
                seq,
                || Delivery::positioned(epoch, seq, &broadcast.frame),
                received,
            );
        }
    }
}
