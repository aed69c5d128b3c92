//! The presence feed: who is online, as phoenix.js `Presence` consumes it, on `user:public`.
//!
//! A socket that joins `user:public` with `{"presence": true}` becomes a watcher: right after its ok reply
//! it gets `presence_state`, then a `presence_diff` whenever the online set changed, at most one per
//! `presence.feed_interval_ms`:
//!
//! ```text
//! [null,null,"user:public","presence_state",{"42":{"metas":[{"phx_ref":"4f1c0a9e2b7d3c51"}]}}]
//! [null,null,"user:public","presence_diff",{"joins":{"7":{"metas":[…]}},"leaves":{"42":{"metas":[…]}}}]
//! ```
//!
//! The data comes from [`Presence`]: this instance's own users and the records of every other instance
//! (the KV watch), so the feed shows the users `is_online` would, cluster-wide, and a crashed instance's
//! users leave it when their records expire. A user's metas are the instances the user is online on, one
//! meta each, whose `phx_ref` is derived from the instance's node id alone: the same on every instance
//! and in every frame, so a leave names the ref its join named, and a fresh `presence_state` after a
//! rejoin matches the list the client already holds.
//!
//! [`Feed::tick`] runs once per interval: it compares the users [`Presence`] noted as changed with what
//! it published before, and offers one diff, encoded once, to every watcher's queue. A user who came and
//! went within one interval is in no diff. The state sent to a new watcher is what the diffs so far have
//! built (cached, encoded once per change): registering the watcher and taking that state happen under
//! the lock that publishing takes too, so every watcher's diffs start exactly where its state ends.
//!
//! A long list is sent in frames of [`STATE_CHUNK_USERS`] users: `presence_state` with the first of them,
//! then `presence_diff`s that join the rest, which phoenix.js applies in order. The WebSocket library keeps
//! a socket's write buffer as large as the largest frame it wrote, for the socket's whole life; one frame
//! of 10,000 users (half a megabyte) would cost every watcher that much memory.
//!
//! Bound: with more than `presence.feed_max_users` users online the feed is suspended. Watchers get one
//! `presence_suspended {"reason": …}` and no diffs, joins asking for the feed are refused, and once the
//! count is back within the bound every watcher gets a fresh `presence_state` and diffs resume. No state
//! names more users than the bound, and no diff more than twice the bound (joins and leaves).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::Presence;
use crate::config::FeedMode;
use crate::hub::{ConnId, Mailbox, Queued};
use crate::metrics::{FeedRefusal, Metrics};
use crate::protocol::{self, Frame};
use crate::topic::{Topic, UserId};

/// The topic of the feed, as every client names it.
pub const FEED_TOPIC: &str = "user:public";
/// The join payload key asking for the feed.
pub const PARAM_PRESENCE: &str = "presence";
/// phoenix.js `Presence`'s default event names.
pub const EVENT_STATE: &str = "presence_state";
pub const EVENT_DIFF: &str = "presence_diff";
/// Sent to watchers when the feed is suspended (more users online than the bound).
pub const EVENT_SUSPENDED: &str = "presence_suspended";

/// Settings of the feed.
#[derive(Debug, Clone, Copy)]
pub struct FeedOptions {
    pub mode: FeedMode,
    pub interval: Duration,
    pub max_users: usize,
}

/// Why a join may not watch the feed; each is the error reply's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("invalid presence: expected true or false")]
    Invalid,
    #[error("presence is only on 'user:public'")]
    WrongTopic,
    #[error("presence feed is off")]
    Off,
    #[error("unauthorized, the presence feed needs a signed-in user")]
    Anonymous,
    #[error("presence feed suspended: more users online than it may list")]
    TooManyUsers,
}

impl Refused {
    /// The metric label of the refusal.
    pub const fn label(self) -> FeedRefusal {
        match self {
            Self::Invalid | Self::WrongTopic => FeedRefusal::BadRequest,
            Self::Off => FeedRefusal::Off,
            Self::Anonymous => FeedRefusal::Anonymous,
            Self::TooManyUsers => FeedRefusal::TooManyUsers,
        }
    }
}

/// The feed of one instance, shared by its sessions and its ticking task.
#[derive(Debug)]
pub struct Feed {
    options: FeedOptions,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

/// What the watchers have been told, and who they are.
#[derive(Debug, Default)]
struct State {
    /// Per user, the refs of the instances the user is online on, as the diffs so far have said.
    published: HashMap<UserId, Vec<Ref>>,
    watchers: HashMap<ConnId, Mailbox>,
    /// The frames of `published` for a new watcher, encoded on first need after each change.
    state_frames: Option<Arc<[Frame]>>,
    /// More users online than the bound: no diffs until it is back within it.
    suspended: bool,
}

/// An instance's `phx_ref`: a 64-bit FNV-1a hash of its node id, written as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Ref(u64);

impl Ref {
    fn of(node: &str) -> Self {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        Self(node.bytes().fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        }))
    }
}

/// Joins and leaves of one interval, by user.
type Metas = Vec<(UserId, Vec<Ref>)>;

impl Feed {
    pub fn new(options: FeedOptions, presence: Arc<Presence>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            options,
            presence,
            metrics,
            state: Mutex::default(),
        })
    }

    pub fn interval(&self) -> Duration {
        self.options.interval
    }

    /// Whether a socket (anonymous when `authenticated` is false) may watch the feed at all.
    pub fn admits(&self, authenticated: bool) -> Result<(), Refused> {
        match (self.options.mode, authenticated) {
            (FeedMode::Off, _) => Err(Refused::Off),
            (FeedMode::Authenticated, false) => Err(Refused::Anonymous),
            (FeedMode::Authenticated, true) | (FeedMode::Everyone, _) => Ok(()),
        }
    }

    /// Makes `conn` a watcher and returns the frames of the list to send right after its join reply
    /// (`presence_state`, then `presence_diff` joins for a long list): every diff offered to it from now
    /// on follows them. Watching again replaces the watcher.
    pub fn watch(&self, conn: ConnId, mailbox: Mailbox) -> Result<Arc<[Frame]>, Refused> {
        let mut state = self.lock();
        if state.suspended {
            return Err(Refused::TooManyUsers);
        }
        let frames = state.state_frames();
        state.watchers.insert(conn, mailbox);
        self.metrics.presence_feed_watchers(state.watchers.len());
        Ok(frames)
    }

    /// `conn` stops watching (left `user:public`, rejoined without the feed, or closed).
    pub fn unwatch(&self, conn: ConnId) {
        let mut state = self.lock();
        if state.watchers.remove(&conn).is_some() {
            self.metrics.presence_feed_watchers(state.watchers.len());
        }
    }

    /// Publishes what changed since the last tick: one diff, a suspension, or a fresh state.
    pub fn tick(&self) {
        let changed = self.presence.take_changes();
        if changed.is_empty() {
            return;
        }
        let mut state = self.lock();
        let (joins, leaves) = state.apply(&self.presence, changed);
        if joins.is_empty() && leaves.is_empty() {
            return;
        }
        state.state_frames = None;
        let over = state.published.len() > self.options.max_users;
        let frames: Arc<[Frame]> = match (over, state.suspended) {
            (false, false) => {
                self.metrics.presence_feed_diff();
                Arc::new([diff_frame(&joins, &leaves)])
            }
            (true, false) => {
                state.suspended = true;
                tracing::warn!(
                    online = state.published.len(),
                    max = self.options.max_users,
                    "presence feed suspended: more users online than presence.feed_max_users"
                );
                Arc::new([suspended_frame()])
            }
            (false, true) => {
                state.suspended = false;
                tracing::info!(
                    online = state.published.len(),
                    "presence feed resumed: watchers get a fresh presence_state"
                );
                state.state_frames()
            }
            (true, true) => return,
        };
        // Not events of the stream: sequence 0. A watcher whose queue is full is closed as a slow
        // consumer, as for any broadcast.
        let now = Instant::now();
        for frame in frames.iter() {
            let queued = Queued::new(frame.clone(), now, Topic::Public, 0);
            for mailbox in state.watchers.values() {
                mailbox.offer(queued.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the state consistent between statements that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Brings `published` up to date for the `changed` users; returns who joined and who left, with the
    /// refs that came and went. A user who came and went since the last tick is in neither.
    fn apply(&mut self, presence: &Presence, changed: HashSet<UserId>) -> (Metas, Metas) {
        let (mut joins, mut leaves) = (Vec::new(), Vec::new());
        for user in changed {
            let mut now = Vec::new();
            presence.nodes_of(user, |node| now.push(Ref::of(node)));
            now.sort_unstable();
            now.dedup();
            let before = self.published.get(&user).map_or(&[][..], Vec::as_slice);
            let joined: Vec<Ref> = now
                .iter()
                .filter(|r| !before.contains(r))
                .copied()
                .collect();
            let left: Vec<Ref> = before
                .iter()
                .filter(|r| !now.contains(r))
                .copied()
                .collect();
            if !joined.is_empty() {
                joins.push((user, joined));
            }
            if !left.is_empty() {
                leaves.push((user, left));
            }
            if now.is_empty() {
                self.published.remove(&user);
            } else {
                self.published.insert(user, now);
            }
        }
        (joins, leaves)
    }

    fn state_frames(&mut self) -> Arc<[Frame]> {
        let published = &self.published;
        Arc::clone(self.state_frames.get_or_insert_with(|| {
            let users: Vec<(UserId, &[Ref])> =
                published.iter().map(|(u, r)| (*u, &r[..])).collect();
            let mut chunks = users.chunks(STATE_CHUNK_USERS);
            let first = chunks.next().unwrap_or_default();
            let mut payload = String::with_capacity(first.len() * STATE_BYTES_PER_USER + 2);
            write_presences(&mut payload, first.iter().copied());
            std::iter::once(event_frame(EVENT_STATE, payload))
                .chain(chunks.map(|chunk| {
                    let joins: Metas = chunk.iter().map(|(u, r)| (*u, r.to_vec())).collect();
                    diff_frame(&joins, &Vec::new())
                }))
                .collect()
        }))
    }
}

/// Users per frame of a new watcher's list (about 6 KB a frame).
pub const STATE_CHUNK_USERS: usize = 128;
/// About what one user with one instance takes in a `presence_state`.
const STATE_BYTES_PER_USER: usize = 48;

/// `{"<user>":{"metas":[{"phx_ref":"<ref>"},…]},…}`
fn write_presences<'a>(out: &mut String, users: impl Iterator<Item = (UserId, &'a [Ref])>) {
    out.push('{');
    for (i, (user, refs)) in users.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing into a String cannot fail; user ids are digits and refs hex digits, nothing to escape.
        let _ = write!(out, "\"{user}\":{{\"metas\":[");
        for (j, r) in refs.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "{{\"phx_ref\":\"{:016x}\"}}", r.0);
        }
        out.push_str("]}");
    }
    out.push('}');
}

fn diff_frame(joins: &Metas, leaves: &Metas) -> Frame {
    let mut payload =
        String::with_capacity((joins.len() + leaves.len()) * STATE_BYTES_PER_USER + 24);
    payload.push_str("{\"joins\":");
    write_presences(&mut payload, joins.iter().map(|(u, r)| (*u, &r[..])));
    payload.push_str(",\"leaves\":");
    write_presences(&mut payload, leaves.iter().map(|(u, r)| (*u, &r[..])));
    payload.push('}');
    event_frame(EVENT_DIFF, payload)
}

fn suspended_frame() -> Frame {
    let payload = serde_json::json!({ "reason": Refused::TooManyUsers.to_string() }).to_string();
    event_frame(EVENT_SUSPENDED, payload)
}

fn event_frame(event: &str, payload: String) -> Frame {
    // The payload is built above from digits, hex and fixed text: valid JSON by construction.
    let payload = RawValue::from_string(payload).expect("feed payloads are valid JSON");
    protocol::broadcast(FEED_TOPIC, event, &payload)
}

/// Ticks the feed once per interval until `stop`.
pub async fn run(feed: Arc<Feed>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(feed.interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => feed.tick(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(max_users: usize) -> (Arc<Feed>, Arc<Presence>) {
        let presence = Presence::with_changes("a");
        let options = FeedOptions {
            mode: FeedMode::Everyone,
            interval: Duration::from_millis(100),
            max_users,
        };
        let feed = Feed::new(options, Arc::clone(&presence), Arc::new(Metrics::new()));
        (feed, presence)
    }

    fn watcher() -> (Mailbox, Mailbox) {
        let mailbox = Mailbox::new(16);
        (mailbox.clone(), mailbox)
    }

    fn payload(frame: &Frame) -> serde_json::Value {
        let value: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        value[4].clone()
    }

    fn received(rx: &mut Mailbox) -> Vec<(String, serde_json::Value)> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|q| {
                let value: serde_json::Value = serde_json::from_str(q.frame().as_str()).unwrap();
                (value[3].as_str().unwrap().to_owned(), value[4].clone())
            })
            .collect()
    }

    fn meta(node: &str) -> serde_json::Value {
        serde_json::json!({"metas": [{"phx_ref": format!("{:016x}", Ref::of(node).0)}]})
    }

    #[test]
    fn a_watcher_gets_the_state_then_one_diff_per_tick() {
        let (feed, presence) = feed(100);
        presence.join(UserId::new(1));
        feed.tick();
        let (outbound, mut rx) = watcher();
        let state = feed.watch(7, outbound).unwrap();
        assert_eq!(state.len(), 1);
        assert!(
            state[0]
                .as_str()
                .starts_with(r#"[null,null,"user:public","presence_state","#)
        );
        assert_eq!(payload(&state[0]), serde_json::json!({"1": meta("a")}));

        presence.join(UserId::new(2));
        presence.record_remote(UserId::new(3), "b", true);
        presence.leave(UserId::new(1));
        feed.tick();
        let frames = received(&mut rx);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].0, "presence_diff");
        assert_eq!(
            frames[0].1,
            serde_json::json!({
                "joins": {"2": meta("a"), "3": meta("b")},
                "leaves": {"1": meta("a")}
            })
        );
        // Nothing changed: no frame.
        feed.tick();
        assert!(received(&mut rx).is_empty());
    }

    #[test]
    fn a_join_and_a_leave_within_one_interval_cancel_out() {
        let (feed, presence) = feed(100);
        let (outbound, mut rx) = watcher();
        feed.watch(1, outbound).unwrap();
        presence.join(UserId::new(5));
        presence.leave(UserId::new(5));
        presence.record_remote(UserId::new(6), "b", true);
        presence.record_remote(UserId::new(6), "b", false);
        feed.tick();
        assert!(received(&mut rx).is_empty());
    }

    #[test]
    fn a_user_on_two_instances_has_two_metas_and_leaves_one_at_a_time() {
        let (feed, presence) = feed(100);
        let (outbound, mut rx) = watcher();
        feed.watch(1, outbound).unwrap();
        presence.join(UserId::new(5));
        presence.record_remote(UserId::new(5), "b", true);
        feed.tick();
        let joined = &received(&mut rx)[0].1["joins"]["5"]["metas"];
        assert_eq!(joined.as_array().unwrap().len(), 2);
        presence.record_remote(UserId::new(5), "b", false);
        // A refresh of a record already held is no change.
        presence.join(UserId::new(5));
        feed.tick();
        let frames = received(&mut rx);
        assert_eq!(
            frames[0].1,
            serde_json::json!({"joins": {}, "leaves": {"5": meta("b")}})
        );
        let (outbound, _rx) = watcher();
        assert_eq!(
            payload(&feed.watch(2, outbound).unwrap()[0]),
            serde_json::json!({"5": meta("a")})
        );
    }

    #[test]
    fn over_the_bound_the_feed_is_suspended_and_resumes_with_a_fresh_state() {
        let (feed, presence) = feed(2);
        let (outbound, mut rx) = watcher();
        feed.watch(1, outbound).unwrap();
        for id in 1..=3 {
            presence.join(UserId::new(id));
        }
        feed.tick();
        let frames = received(&mut rx);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, "presence_suspended");
        let (late, _late_rx) = watcher();
        assert_eq!(feed.watch(2, late), Err(Refused::TooManyUsers));
        presence.join(UserId::new(4));
        feed.tick();
        assert!(received(&mut rx).is_empty(), "no diffs while suspended");
        presence.leave(UserId::new(1));
        presence.leave(UserId::new(2));
        feed.tick();
        let frames = received(&mut rx);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, "presence_state");
        assert_eq!(
            frames[0].1,
            serde_json::json!({"3": meta("a"), "4": meta("a")})
        );
    }

    #[test]
    fn a_long_list_is_a_state_then_joins_in_bounded_frames() {
        let (feed, presence) = feed(10_000);
        let users = STATE_CHUNK_USERS * 2 + 7;
        for id in 1..=users as u64 {
            presence.join(UserId::new(id));
        }
        feed.tick();
        let (outbound, _rx) = watcher();
        let frames = feed.watch(1, outbound).unwrap();
        assert_eq!(frames.len(), 3);
        let mut listed = std::collections::HashSet::new();
        for (i, frame) in frames.iter().enumerate() {
            let value: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
            let part = if i == 0 {
                assert_eq!(value[3], "presence_state");
                value[4].clone()
            } else {
                assert_eq!(value[3], "presence_diff");
                assert_eq!(value[4]["leaves"], serde_json::json!({}));
                value[4]["joins"].clone()
            };
            let part = part.as_object().unwrap();
            assert!(part.len() <= STATE_CHUNK_USERS);
            for user in part.keys() {
                assert!(listed.insert(user.clone()), "{user} twice");
            }
        }
        assert_eq!(listed.len(), users);
    }

    #[test]
    fn an_unwatched_socket_gets_nothing_more() {
        let (feed, presence) = feed(100);
        let (outbound, mut rx) = watcher();
        feed.watch(1, outbound).unwrap();
        feed.unwatch(1);
        presence.join(UserId::new(5));
        feed.tick();
        assert!(received(&mut rx).is_empty());
    }

    #[test]
    fn refs_are_stable_hex_of_the_node_id() {
        assert_eq!(Ref::of("gw-1"), Ref::of("gw-1"));
        assert_ne!(Ref::of("gw-1"), Ref::of("gw-2"));
        // FNV-1a 64 of the empty string is its offset basis.
        assert_eq!(format!("{:016x}", Ref::of("").0), "cbf29ce484222325");
    }
}
