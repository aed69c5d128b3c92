//! The `user:*` channels of one socket: joins, leaves, `is_online`, heartbeats.
//!
//! [`Channels::handle`] takes one decoded client frame and returns the frames to send back, in order. It
//! subscribes and unsubscribes the socket in the hub and tells presence about authenticated joins of
//! `user:public`. It is synchronous, with one exception: a join that must wait for the event stream (a
//! user topic whose upstream subscription is not in place yet, or a `since` that the hot window cannot
//! answer) leaves a [`PendingJoin`], which the session completes with [`Channels::complete`] before it
//! reads the next frame. Dropping [`Channels`] (the socket ended, however it ended) leaves every joined
//! topic.
//!
//! A join of `user:public` may ask for the presence feed (`{"presence": true}`, [`crate::presence::feed`]):
//! its ok reply is followed by `presence_state`, and the socket's queue gets the `presence_diff`s.
//!
//! With the event stream on, a join may ask for positions (`{"positions": true}`, or `{"since": P}`):
//! its broadcasts then carry their position in the ref slot, its ok reply carries `position` (and
//! `recovered` with `since`), and a recovery replays what the socket missed, after which live copies up
//! to the last replayed position are dropped ([`Channels::replayed`]).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::delivery::live::{Delivery, JoinView, Recovery};
use crate::delivery::position::{Position, PositionError};
use crate::hub::Queued;

use crate::auth::Principal;
use crate::hub::{ConnId, Hub, Mailbox};
use crate::metrics::Metrics;
use crate::presence::feed::{Feed, PARAM_PRESENCE, Refused};
use crate::presence::{EVENT_IS_ONLINE, IsOnlineRequest, Presence};
use crate::protocol::{
    self, ClientFrame, EVENT_HEARTBEAT, EVENT_JOIN, EVENT_LEAVE, Empty, Frame, PHOENIX_TOPIC,
    Reason, Status,
};
use crate::topic::{Route, Topic, UserId};

pub const REASON_UNMATCHED_TOPIC: &str = "unmatched topic";
pub const REASON_UNKNOWN_EVENT: &str = "unknown event";
pub const REASON_TOO_MANY_TOPICS: &str = "too many topics joined";
pub const REASON_RATE_LIMITED: &str = "rate limited";
pub const REASON_INVALID_USER_ID: &str =
    "invalid user_id: expected a user id as a number or a numeric string";
pub const REASON_INVALID_POSITIONS: &str = "invalid positions: expected true or false";
pub const REASON_UNAVAILABLE: &str = "temporarily unavailable: the event stream is not reachable";

/// Join payload key turning positions on.
pub const PARAM_POSITIONS: &str = "positions";
/// Join payload key asking for a recovery after a position (positions on too).
pub const PARAM_SINCE: &str = "since";
/// How long a join waits for its user's upstream subscription before it is refused as unavailable
/// (phoenix.js rejoins after an error).
const UPSTREAM_WAIT: Duration = Duration::from_secs(3);
/// How long a recovery may take before the join is answered with `recovered: false`. With
/// [`UPSTREAM_WAIT`], within phoenix.js's default join timeout of 10 s.
const RECOVERY_WAIT: Duration = Duration::from_secs(5);

/// What a join asked for beyond the plain subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wants {
    /// Today's join: `[null, null, …]` broadcasts, `{}` response.
    Plain,
    /// Positions, no recovery.
    Positions,
    /// Positions and a recovery after `since` (parsed, or why it is not a position).
    Since(Result<Position, PositionError>),
}

/// A join that waits for the event stream before it is answered.
#[derive(Debug)]
pub struct PendingJoin {
    topic: Topic,
    name: String,
    join_ref: Option<String>,
    msg_ref: Option<String>,
    wants: Wants,
    upstream: Option<oneshot::Receiver<()>>,
    /// The feed's list to send after the reply (and the replay), when the join watches the feed.
    presence_state: Option<Arc<[Frame]>>,
}

/// The response of a join with positions.
#[derive(Serialize)]
struct Positioned {
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

/// Frames produced by one client frame, in order: a reply (after a `phx_close` on a rejoin), and after a
/// join the replay or the presence feed's list.
pub type Replies = Vec<Frame>;

/// A joined topic. Only canonical topic names are joined (`user:<id>` with a canonical id), so the name
/// a client sends later is matched against the topic itself, and not kept per socket.
#[derive(Debug)]
struct Joined {
    topic: Topic,
    join_ref: Option<Box<str>>,
}

/// Channel state of one socket.
#[derive(Debug)]
pub struct Channels {
    conn: ConnId,
    max_topics: usize,
    principal: Option<Principal>,
    mailbox: Mailbox,
    joined: Vec<Joined>,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    /// The event stream, when delivery is on.
    delivery: Option<Arc<Delivery>>,
    /// The presence feed, when `presence.feed` is not `off`.
    feed: Option<Arc<Feed>>,
    /// Boxed: every socket holds the field, few ever fill it.
    pending: Option<Box<PendingJoin>>,
    /// Per topic, the last position replayed to this socket: live copies up to it are dropped.
    replayed: Vec<(Topic, u64)>,
}

impl Channels {
    pub fn new(
        conn: ConnId,
        max_topics: usize,
        principal: Option<Principal>,
        mailbox: Mailbox,
        hub: Arc<Hub>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            conn,
            max_topics,
            principal,
            mailbox,
            joined: Vec::new(),
            hub,
            presence,
            metrics,
            delivery: None,
            feed: None,
            pending: None,
            replayed: Vec::new(),
        }
    }

    /// Channels whose joins may ask for positions and recovery from `delivery`.
    pub fn with_delivery(mut self, delivery: Option<Arc<Delivery>>) -> Self {
        self.delivery = delivery;
        self
    }

    /// Channels whose `user:public` joins may watch `feed`.
    pub fn with_feed(mut self, feed: Option<Arc<Feed>>) -> Self {
        self.feed = feed;
        self
    }

    /// The join left by the last [`Self::handle`] to complete, if any.
    pub fn take_pending(&mut self) -> Option<PendingJoin> {
        self.pending.take().map(|pending| *pending)
    }

    /// Whether a queued broadcast was already replayed to this socket (and must not be written again).
    pub fn replayed(&mut self, queued: &Queued) -> bool {
        if queued.seq() == 0 {
            // Not an event of the stream (the core path, the presence feed): never part of a replay.
            return false;
        }
        let Some(i) = self.replayed.iter().position(|(t, _)| *t == queued.topic()) else {
            return false;
        };
        if queued.seq() <= self.replayed[i].1 {
            return true;
        }
        // Live copies arrive in stream order: once one is past the replay, every later one is too.
        self.replayed.swap_remove(i);
        false
    }

    /// Completes a pending join: waits for the user's upstream subscription, then recovers when asked.
    /// Returns the reply and, after it, the replayed broadcasts.
    pub async fn complete(&mut self, mut pending: PendingJoin) -> Replies {
        let presence_state = pending.presence_state.take();
        let mut replies = self.answer(pending).await;
        // The feed's diffs queued since the join follow this state, and the queue is written after it.
        replies.extend(
            presence_state
                .iter()
                .flat_map(|frames| frames.iter().cloned()),
        );
        replies
    }

    /// The reply (and replay) of a pending join.
    async fn answer(&mut self, pending: PendingJoin) -> Replies {
        let PendingJoin {
            topic,
            name,
            join_ref,
            msg_ref,
            wants,
            upstream,
            presence_state: _,
        } = pending;
        if let Some(upstream) = upstream
            && !matches!(
                tokio::time::timeout(UPSTREAM_WAIT, upstream).await,
                Ok(Ok(()))
            )
        {
            tracing::warn!(%topic, "join refused: the user's events are not subscribed yet");
            self.leave_topic(&name);
            return vec![error(
                join_ref.as_deref(),
                msg_ref.as_deref(),
                &name,
                REASON_UNAVAILABLE,
            )];
        }
        let (join_ref, msg_ref) = (join_ref.as_deref(), msg_ref.as_deref());
        let (delivery, since) = match (&self.delivery, &wants) {
            (Some(delivery), Wants::Positions) => (Arc::clone(delivery), None),
            (Some(delivery), Wants::Since(since)) => (Arc::clone(delivery), Some(since.clone())),
            // Today's join, answered once the user's events are subscribed.
            (None, _) | (Some(_), Wants::Plain) => {
                return vec![protocol::reply(
                    join_ref,
                    msg_ref,
                    &name,
                    Status::Ok,
                    &Empty {},
                )];
            }
        };
        let view = delivery.join_view(
            topic,
            since.as_ref().and_then(|s| s.as_ref().ok()).map(|p| p.seq),
        );
        match (view, since) {
            (None, since) => {
                vec![self.positioned_reply(join_ref, msg_ref, &name, None, since.map(|_| false))]
            }
            (Some(view), None) => {
                vec![self.positioned_reply(join_ref, msg_ref, &name, Some(&view), None)]
            }
            (Some(view), Some(since)) => {
                let recovery = match (&view.replay, &since) {
                    (Some(frames), Ok(position)) if position.epoch == view.epoch => {
                        let recovery = Recovery::Replayed(frames.clone());
                        delivery.record(&recovery);
                        recovery
                    }
                    _ => match tokio::time::timeout(
                        RECOVERY_WAIT,
                        delivery.recover(topic, since.clone(), view.head),
                    )
                    .await
                    {
                        Ok(recovery) => recovery,
                        Err(_) => {
                            tracing::warn!(%topic, "recovery timed out; answered as not recovered");
                            let refused =
                                Recovery::Refused(crate::delivery::recovery::Reason::Expired);
                            delivery.record(&refused);
                            refused
                        }
                    },
                };
                self.recovered(join_ref, msg_ref, &name, topic, &view, since, recovery)
            }
        }
    }

    /// The ok reply and replay of a join with `since`.
    #[allow(clippy::too_many_arguments)]
    fn recovered(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        name: &str,
        topic: Topic,
        view: &JoinView,
        since: Result<Position, PositionError>,
        recovery: Recovery,
    ) -> Replies {
        let Recovery::Replayed(frames) = recovery else {
            return vec![self.positioned_reply(join_ref, msg_ref, name, Some(view), Some(false))];
        };
        // The socket has seen everything up to `since`, and is given everything up to the replay's end.
        let since_seq = since.map_or(0, |p| p.seq);
        let upto = frames
            .last()
            .map_or(since_seq, |(seq, _)| *seq)
            .max(since_seq);
        let position = Position::new(view.epoch.clone(), upto.max(view.head)).encode();
        let mut replies = Vec::with_capacity(frames.len() + 1);
        replies.push(protocol::reply(
            join_ref,
            msg_ref,
            name,
            Status::Ok,
            &Positioned {
                position: Some(position),
                recovered: Some(true),
            },
        ));
        replies.extend(
            frames
                .iter()
                .map(|(seq, frame)| Delivery::positioned(&view.epoch, *seq, frame)),
        );
        self.replayed.retain(|(t, _)| *t != topic);
        self.replayed.push((topic, upto.max(view.head)));
        replies
    }

    fn positioned_reply(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        name: &str,
        view: Option<&JoinView>,
        recovered: Option<bool>,
    ) -> Frame {
        let position = view.map(|view| Position::new(view.epoch.clone(), view.head).encode());
        protocol::reply(
            join_ref,
            msg_ref,
            name,
            Status::Ok,
            &Positioned {
                position,
                recovered,
            },
        )
    }

    /// Where the joined topic a client names is in [`Self::joined`].
    fn position(&self, name: &str) -> Option<usize> {
        self.joined.iter().position(|j| j.topic.is_named(name))
    }

    /// Leaves `name` after a join that could not be completed.
    fn leave_topic(&mut self, name: &str) {
        if let Some(i) = self.position(name) {
            let joined = self.joined.swap_remove(i);
            self.unsubscribe(joined.topic);
        }
    }

    pub fn handle(&mut self, frame: ClientFrame) -> Replies {
        let ClientFrame {
            join_ref,
            msg_ref,
            topic,
            event,
            payload,
        } = frame;
        let msg_ref = msg_ref.as_deref();
        if topic == PHOENIX_TOPIC && event == EVENT_HEARTBEAT {
            return vec![protocol::reply(
                None,
                msg_ref,
                PHOENIX_TOPIC,
                Status::Ok,
                &Empty {},
            )];
        }
        let index = self.position(&topic);
        match (event.as_str(), index) {
            (EVENT_JOIN, Some(i)) => self.rejoin(i, join_ref, msg_ref, &topic, &payload),
            (EVENT_JOIN, None) => self.join(join_ref, msg_ref, topic, &payload),
            (EVENT_LEAVE, Some(i)) => {
                let joined = self.joined.swap_remove(i);
                self.unsubscribe(joined.topic);
                vec![
                    protocol::reply(join_ref.as_deref(), msg_ref, &topic, Status::Ok, &Empty {}),
                    protocol::close(joined.join_ref.as_deref(), &topic),
                ]
            }
            (EVENT_LEAVE, None) => {
                vec![protocol::reply(
                    join_ref.as_deref(),
                    msg_ref,
                    &topic,
                    Status::Ok,
                    &Empty {},
                )]
            }
            (EVENT_IS_ONLINE, Some(_)) => {
                vec![self.is_online(join_ref.as_deref(), msg_ref, &topic, &payload)]
            }
            (_, Some(_)) => vec![error(
                join_ref.as_deref(),
                msg_ref,
                &topic,
                REASON_UNKNOWN_EVENT,
            )],
            (_, None) => vec![error(None, msg_ref, &topic, REASON_UNMATCHED_TOPIC)],
        }
    }

    /// The error reply to a frame refused by the socket's rate limit.
    pub fn rate_limited(frame: &ClientFrame) -> Frame {
        error(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            REASON_RATE_LIMITED,
        )
    }

    /// A second `phx_join` of a joined topic. Phoenix closes the old channel before joining again; the hub
    /// subscription stays, so no broadcast is missed in between.
    fn rejoin(
        &mut self,
        i: usize,
        join_ref: Option<String>,
        msg_ref: Option<&str>,
        name: &str,
        payload: &Value,
    ) -> Replies {
        let joined = &mut self.joined[i];
        let close = protocol::close(joined.join_ref.as_deref(), name);
        joined.join_ref = join_ref.as_deref().map(Box::from);
        let subscribed = joined.topic;
        let join_ref = join_ref.as_deref();
        let (wants, feed) = match (self.wants(payload), self.wants_feed(subscribed, payload)) {
            (Err(reason), _) => return vec![close, error(join_ref, msg_ref, name, reason)],
            (_, Err(refused)) => {
                return vec![close, self.feed_refused(join_ref, msg_ref, name, refused)];
            }
            (Ok(wants), Ok(feed)) => (wants, feed),
        };
        let presence_state = if feed {
            match self.watch() {
                Ok(state) => Some(state),
                Err(refused) => {
                    return vec![close, self.feed_refused(join_ref, msg_ref, name, refused)];
                }
            }
        } else {
            self.unwatch(subscribed);
            None
        };
        let reply = match wants {
            Wants::Plain => protocol::reply(join_ref, msg_ref, name, Status::Ok, &Empty {}),
            // The socket stayed subscribed, so it missed nothing: a `since` is recovered as is.
            wants => {
                self.hub
                    .subscribe_with(subscribed, self.conn, self.mailbox.clone(), true);
                let view = self
                    .delivery
                    .as_ref()
                    .and_then(|delivery| delivery.join_view(subscribed, None));
                let recovered = match (&wants, &view) {
                    (Wants::Since(Ok(since)), Some(view)) => Some(since.epoch == view.epoch),
                    (Wants::Since(_), _) => Some(false),
                    _ => None,
                };
                self.positioned_reply(join_ref, msg_ref, name, view.as_ref(), recovered)
            }
        };
        let mut replies = vec![close, reply];
        replies.extend(
            presence_state
                .iter()
                .flat_map(|frames| frames.iter().cloned()),
        );
        replies
    }

    /// Whether the join payload asks for the presence feed, and may have it; the refusal otherwise.
    fn wants_feed(&self, topic: Topic, payload: &Value) -> Result<bool, Refused> {
        match payload.get(PARAM_PRESENCE) {
            None | Some(Value::Bool(false)) => return Ok(false),
            Some(Value::Bool(true)) => {}
            Some(_) => return Err(Refused::Invalid),
        }
        if topic != Topic::Public {
            return Err(Refused::WrongTopic);
        }
        let feed = self.feed.as_ref().ok_or(Refused::Off)?;
        feed.admits(self.principal.is_some())?;
        Ok(true)
    }

    /// Makes this socket a watcher of the feed; returns the list's frames to send after the reply.
    fn watch(&self) -> Result<Arc<[Frame]>, Refused> {
        let feed = self.feed.as_ref().ok_or(Refused::Off)?;
        feed.watch(self.conn, self.mailbox.clone())
    }

    fn unwatch(&self, topic: Topic) {
        if let (Topic::Public, Some(feed)) = (topic, &self.feed) {
            feed.unwatch(self.conn);
        }
    }

    fn feed_refused(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        name: &str,
        refused: Refused,
    ) -> Frame {
        self.metrics.presence_feed_refused(refused.label());
        error(join_ref, msg_ref, name, &refused.to_string())
    }

    /// What the join payload asks for; an error reason for a payload it cannot take.
    fn wants(&self, payload: &Value) -> Result<Wants, &'static str> {
        if self.delivery.is_none() {
            // Without the event stream there are no positions: the join is today's.
            return Ok(Wants::Plain);
        }
        let positions = match payload.get(PARAM_POSITIONS) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => return Err(REASON_INVALID_POSITIONS),
        };
        Ok(match payload.get(PARAM_SINCE) {
            Some(Value::String(since)) => Wants::Since(Position::parse(since)),
            // A `since` that is not a string is no position: the join goes on, not recovered.
            Some(_) => Wants::Since(Err(PositionError::NotAString)),
            None if positions => Wants::Positions,
            None => Wants::Plain,
        })
    }

    fn join(
        &mut self,
        join_ref: Option<String>,
        msg_ref: Option<&str>,
        name: String,
        payload: &Value,
    ) -> Replies {
        let _span = tracing::info_span!("channel.join", topic = %name).entered();
        if self.joined.len() >= self.max_topics {
            return vec![error(
                join_ref.as_deref(),
                msg_ref,
                &name,
                REASON_TOO_MANY_TOPICS,
            )];
        }
        let user = self.principal.as_ref().map(|p| p.user_id);
        let topic = match (Route::of(&name), user) {
            (Route::Unmatched, _) => {
                return vec![error(None, msg_ref, &name, REASON_UNMATCHED_TOPIC)];
            }
            (Route::Public, _) => Topic::Public,
            (Route::Role, Some(_)) => Topic::Role,
            (Route::User(suffix), Some(user)) if UserId::parse(suffix) == Some(user) => {
                Topic::User(user)
            }
            // Anonymous, or another user's channel: the reason Epochtalk gives in both cases.
            (Route::Role | Route::User(_), _) => {
                self.metrics.join_refused();
                let reason = format!("unauthorized, cannot join '{name}' channel");
                return vec![error(join_ref.as_deref(), msg_ref, &name, &reason)];
            }
        };
        let wants = match self.wants(payload) {
            Ok(wants) => wants,
            Err(reason) => return vec![error(join_ref.as_deref(), msg_ref, &name, reason)],
        };
        // Watching before subscribing: a refusal leaves nothing to undo, and the diffs queued from now on
        // are written after the reply and the state, which the session writes first.
        let presence_state = match self.wants_feed(topic, payload) {
            Ok(false) => None,
            Ok(true) => match self.watch() {
                Ok(state) => Some(state),
                Err(refused) => {
                    return vec![self.feed_refused(join_ref.as_deref(), msg_ref, &name, refused)];
                }
            },
            Err(refused) => {
                return vec![self.feed_refused(join_ref.as_deref(), msg_ref, &name, refused)];
            }
        };
        // Subscribe before replying: a message published after the client sees "ok" is delivered.
        let positions = wants != Wants::Plain;
        self.hub
            .subscribe_with(topic, self.conn, self.mailbox.clone(), positions);
        if let (Topic::Public, Some(user)) = (topic, user) {
            self.presence.join(user);
        }
        self.metrics.joined(topic.kind());
        self.joined.push(Joined {
            topic,
            join_ref: join_ref.as_deref().map(Box::from),
        });
        let upstream = match topic {
            Topic::User(user) => self.hub.wait_upstream(user),
            Topic::Public | Topic::Role => None,
        };
        if upstream.is_none() && wants == Wants::Plain {
            let reply = protocol::reply(join_ref.as_deref(), msg_ref, &name, Status::Ok, &Empty {});
            let state = presence_state
                .iter()
                .flat_map(|frames| frames.iter().cloned());
            return std::iter::once(reply).chain(state).collect();
        }
        self.pending = Some(Box::new(PendingJoin {
            topic,
            name,
            join_ref,
            msg_ref: msg_ref.map(str::to_owned),
            wants,
            upstream,
            presence_state,
        }));
        Vec::new()
    }

    fn is_online(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        payload: &Value,
    ) -> Frame {
        self.metrics.is_online_query();
        let span = tracing::info_span!("is_online", online = tracing::field::Empty).entered();
        let Ok(request) = IsOnlineRequest::parse(payload) else {
            return error(join_ref, msg_ref, topic, REASON_INVALID_USER_ID);
        };
        let answer = self.presence.answer(request);
        span.record("online", answer.online);
        protocol::reply(join_ref, msg_ref, topic, Status::Ok, &answer)
    }

    fn unsubscribe(&self, topic: Topic) {
        self.hub.unsubscribe(topic, self.conn);
        self.unwatch(topic);
        if let (Topic::Public, Some(principal)) = (topic, &self.principal) {
            self.presence.leave(principal.user_id);
        }
    }
}

impl Drop for Channels {
    fn drop(&mut self) {
        for joined in std::mem::take(&mut self.joined) {
            self.unsubscribe(joined.topic);
        }
    }
}

fn error(join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str, reason: &str) -> Frame {
    protocol::reply(join_ref, msg_ref, topic, Status::Error, &Reason { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(user: Option<u64>) -> (Channels, Arc<Hub>, Arc<Presence>) {
        let hub = Arc::new(Hub::new());
        let presence = Presence::new("n1");
        let principal = user.map(|id| Principal {
            user_id: UserId::new(id),
            jti: "j".to_owned(),
            expires_at: u64::MAX,
        });
        let channels = Channels::new(
            1,
            16,
            principal,
            Mailbox::new(8),
            Arc::clone(&hub),
            Arc::clone(&presence),
            Arc::new(Metrics::new()),
        );
        (channels, hub, presence)
    }

    fn send(channels: &mut Channels, text: &str) -> Vec<String> {
        let frame = protocol::decode(text).unwrap();
        channels
            .handle(frame)
            .iter()
            .map(|f| f.as_str().to_owned())
            .collect()
    }

    #[test]
    fn join_leave_and_presence() {
        let (mut ch, hub, presence) = channels(Some(7));
        let out = send(&mut ch, r#"["1","1","user:public","phx_join",{}]"#);
        assert_eq!(
            out,
            [r#"["1","1","user:public","phx_reply",{"status":"ok","response":{}}]"#]
        );
        assert!(hub.has_subscribers(Topic::Public));
        assert!(presence.is_online(UserId::new(7)));

        let out = send(
            &mut ch,
            r#"["1","2","user:public","is_online",{"user_id":"7"}]"#,
        );
        assert_eq!(
            out,
            [
                r#"["1","2","user:public","phx_reply",{"status":"ok","response":{"id":"7","online":true}}]"#
            ]
        );

        let out = send(&mut ch, r#"["1","3","user:public","phx_leave",{}]"#);
        assert_eq!(
            out,
            [
                r#"["1","3","user:public","phx_reply",{"status":"ok","response":{}}]"#,
                r#"["1","1","user:public","phx_close",{}]"#
            ]
        );
        assert!(!hub.has_subscribers(Topic::Public));
        assert!(!presence.is_online(UserId::new(7)));
    }

    #[test]
    fn refusals_and_unmatched_topics() {
        let (mut anon, _, _) = channels(None);
        let out = send(&mut anon, r#"["1","1","user:role","phx_join",{}]"#);
        assert_eq!(
            out,
            [
                r#"["1","1","user:role","phx_reply",{"status":"error","response":{"reason":"unauthorized, cannot join 'user:role' channel"}}]"#
            ]
        );
        let (mut authed, _, _) = channels(Some(7));
        let out = send(&mut authed, r#"["2","2","user:8","phx_join",{}]"#);
        assert_eq!(
            out,
            [
                r#"["2","2","user:8","phx_reply",{"status":"error","response":{"reason":"unauthorized, cannot join 'user:8' channel"}}]"#
            ]
        );
        let out = send(&mut authed, r#"["3","3","room:1","phx_join",{}]"#);
        assert_eq!(
            out,
            [
                r#"[null,"3","room:1","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
            ]
        );
        let out = send(
            &mut authed,
            r#"["4","4","user:public","is_online",{"user_id":1}]"#,
        );
        assert_eq!(
            out,
            [
                r#"[null,"4","user:public","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
            ]
        );
    }

    #[tokio::test]
    async fn a_panic_in_a_session_releases_its_topics_and_presence_and_nothing_else() {
        let (mut bystander, hub, presence) = channels(Some(8));
        send(&mut bystander, r#"["1","1","user:public","phx_join",{}]"#);
        let (task_hub, task_presence) = (Arc::clone(&hub), Arc::clone(&presence));
        let session = tokio::spawn(async move {
            let principal = Principal {
                user_id: UserId::new(7),
                jti: "j".to_owned(),
                expires_at: u64::MAX,
            };
            let mut ch = Channels::new(
                2,
                16,
                Some(principal),
                Mailbox::new(8),
                task_hub,
                task_presence,
                Arc::new(Metrics::new()),
            );
            send(&mut ch, r#"["1","1","user:public","phx_join",{}]"#);
            send(&mut ch, r#"["2","2","user:7","phx_join",{}]"#);
            assert!(ch.presence.is_online(UserId::new(7)));
            panic!("a bug while serving one socket");
        });
        assert!(session.await.unwrap_err().is_panic());
        assert!(!presence.is_online(UserId::new(7)));
        assert!(!hub.has_subscribers(Topic::User(UserId::new(7))));
        // The other socket is untouched.
        assert!(presence.is_online(UserId::new(8)));
        assert!(hub.has_subscribers(Topic::Public));
    }

    #[test]
    fn dropping_the_socket_leaves_everything() {
        let (mut ch, hub, presence) = channels(Some(7));
        send(&mut ch, r#"["1","1","user:public","phx_join",{}]"#);
        send(&mut ch, r#"["2","2","user:7","phx_join",{}]"#);
        drop(ch);
        assert!(!hub.has_subscribers(Topic::Public));
        assert!(!hub.has_subscribers(Topic::User(UserId::new(7))));
        assert!(!presence.is_online(UserId::new(7)));
    }
}
