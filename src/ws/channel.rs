//! The `user:*` channels of one socket: joins, leaves, `is_online`, heartbeats.
//!
//! [`Channels::handle`] takes one decoded client frame and returns the frames to send back, in order. It
//! subscribes and unsubscribes the socket in the hub and tells presence about authenticated joins of
//! `user:public`. Everything here is synchronous: no frame waits on NATS. Dropping [`Channels`] (the socket
//! ended, however it ended) leaves every joined topic.

use std::sync::Arc;

use serde_json::Value;

use crate::auth::Principal;
use crate::hub::{ConnId, Hub, Outbound};
use crate::metrics::Metrics;
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

/// Frames produced by one client frame; at most two (a `phx_close` and a reply).
pub type Replies = Vec<Frame>;

#[derive(Debug)]
struct Joined {
    /// Topic string as the client sent it (it is the key of later pushes).
    name: String,
    topic: Topic,
    join_ref: Option<String>,
}

/// Channel state of one socket.
#[derive(Debug)]
pub struct Channels {
    conn: ConnId,
    max_topics: usize,
    principal: Option<Principal>,
    outbound: Outbound,
    joined: Vec<Joined>,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
}

impl Channels {
    pub fn new(
        conn: ConnId,
        max_topics: usize,
        principal: Option<Principal>,
        outbound: Outbound,
        hub: Arc<Hub>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            conn,
            max_topics,
            principal,
            outbound,
            joined: Vec::new(),
            hub,
            presence,
            metrics,
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
        let index = self.joined.iter().position(|j| j.name == topic);
        match (event.as_str(), index) {
            (EVENT_JOIN, Some(i)) => {
                // Phoenix closes the old channel before joining again; the hub subscription stays, so no
                // broadcast is missed in between.
                let joined = &mut self.joined[i];
                let close = protocol::close(joined.join_ref.as_deref(), &topic);
                joined.join_ref.clone_from(&join_ref);
                let reply =
                    protocol::reply(join_ref.as_deref(), msg_ref, &topic, Status::Ok, &Empty {});
                vec![close, reply]
            }
            (EVENT_JOIN, None) => vec![self.join(join_ref, msg_ref, topic)],
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

    fn join(&mut self, join_ref: Option<String>, msg_ref: Option<&str>, name: String) -> Frame {
        let _span = tracing::info_span!("channel.join", topic = %name).entered();
        if self.joined.len() >= self.max_topics {
            return error(join_ref.as_deref(), msg_ref, &name, REASON_TOO_MANY_TOPICS);
        }
        let user = self.principal.as_ref().map(|p| p.user_id);
        let topic = match (Route::of(&name), user) {
            (Route::Unmatched, _) => return error(None, msg_ref, &name, REASON_UNMATCHED_TOPIC),
            (Route::Public, _) => Topic::Public,
            (Route::Role, Some(_)) => Topic::Role,
            (Route::User(suffix), Some(user)) if UserId::parse(suffix) == Some(user) => {
                Topic::User(user)
            }
            // Anonymous, or another user's channel: the reason Epochtalk gives in both cases.
            (Route::Role | Route::User(_), _) => {
                self.metrics.join_refused();
                let reason = format!("unauthorized, cannot join '{name}' channel");
                return error(join_ref.as_deref(), msg_ref, &name, &reason);
            }
        };
        // Subscribe before replying: a message published after the client sees "ok" is delivered.
        self.hub.subscribe(topic, self.conn, self.outbound.clone());
        if let (Topic::Public, Some(user)) = (topic, user) {
            self.presence.join(user);
        }
        self.metrics.joined(topic.kind());
        let reply = protocol::reply(join_ref.as_deref(), msg_ref, &name, Status::Ok, &Empty {});
        self.joined.push(Joined {
            name,
            topic,
            join_ref,
        });
        reply
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
    use crate::hub::Closer;
    use tokio::sync::mpsc;

    fn channels(user: Option<u64>) -> (Channels, Arc<Hub>, Arc<Presence>) {
        let hub = Arc::new(Hub::new());
        let presence = Presence::new("n1");
        let (tx, _rx) = mpsc::channel(8);
        let principal = user.map(|id| Principal {
            user_id: UserId::new(id),
            jti: "j".to_owned(),
            expires_at: u64::MAX,
        });
        let channels = Channels::new(
            1,
            16,
            principal,
            Outbound::new(tx, Closer::new()),
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
            let (tx, _rx) = mpsc::channel(8);
            let principal = Principal {
                user_id: UserId::new(7),
                jti: "j".to_owned(),
                expires_at: u64::MAX,
            };
            let mut ch = Channels::new(
                2,
                16,
                Some(principal),
                Outbound::new(tx, Closer::new()),
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
