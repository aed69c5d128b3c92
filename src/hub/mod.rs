//! Local fan-out: which sockets of this instance are joined to which topic, and which authenticated
//! sessions belong to which user and token.
//!
//! Ingress hands the hub one encoded [`Frame`] per NATS message; the hub offers a clone (a reference-count
//! bump) to the [`Mailbox`] of every subscribed socket. A socket whose queue is full is not waited for:
//! its mailbox is kicked with [`Kick::SlowConsumer`] and its session closes it. The same handle closes
//! every socket of a user (`disconnect`) or of one token (`logout`). The hub knows neither NATS nor
//! sockets.

pub mod mailbox;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};

pub use self::mailbox::{Mailbox, Next, Offered};
use crate::protocol::Frame;

/// A frame in a socket's queue, with the time its NATS message arrived (for the fan-out latency).
///
/// One allocation per published message, shared by every socket it reaches: a queue slot is one pointer.
#[derive(Debug, Clone)]
pub struct Queued(Arc<Published>);

#[derive(Debug)]
struct Published {
    frame: Frame,
    received: std::time::Instant,
    topic: Topic,
    /// The event's position in the event stream; 0 on the core NATS path.
    seq: u64,
}

impl Queued {
    pub fn new(frame: Frame, received: std::time::Instant, topic: Topic, seq: u64) -> Self {
        Self(Arc::new(Published {
            frame,
            received,
            topic,
            seq,
        }))
    }

    pub fn frame(&self) -> Frame {
        self.0.frame.clone()
    }

    pub fn received(&self) -> std::time::Instant {
        self.0.received
    }

    pub fn topic(&self) -> Topic {
        self.0.topic
    }

    pub fn seq(&self) -> u64 {
        self.0.seq
    }
}

/// One published message as the hub offers it: the frame every plain subscriber gets, and the frame with
/// the event's position in the ref slot, built at most once and only when a subscriber asked for
/// positions.
pub struct Message<'a, F: FnOnce() -> Frame> {
    pub topic: Topic,
    pub frame: &'a Frame,
    pub positioned: F,
    pub seq: u64,
    pub received: std::time::Instant,
}

/// A change of which users have an authenticated session on this instance: the upstream subscriptions
/// (per-user NATS interest) follow it. `generation` tells an old acknowledgement from a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    Add { user: UserId, generation: u64 },
    Remove { user: UserId },
}

use crate::topic::{Topic, UserId};

/// Identifies one socket for its whole life on this instance.
pub type ConnId = u64;

/// Why a socket is closed from outside its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Its outbound queue overflowed.
    SlowConsumer,
    /// Its token was revoked (a `logout` for that token).
    Revoked,
    /// A `disconnect` for its user.
    Disconnected,
    /// The instance is draining its sockets before it stops.
    ShuttingDown,
}

/// An authenticated session, as `disconnect` and `logout` find it.
#[derive(Debug)]
struct Session {
    conn: ConnId,
    jti: Arc<str>,
    mailbox: Mailbox,
}

/// What happened to one published frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Sockets whose queue took the frame.
    pub queued: usize,
    /// Sockets dropped as slow consumers by this publish.
    pub overflowed: usize,
}

impl Delivery {
    /// Counts one socket's outcome.
    pub fn add(&mut self, offered: Offered) {
        match offered {
            Offered::Queued => self.queued += 1,
            Offered::Overflowed => self.overflowed += 1,
            Offered::Closing => {}
        }
    }
}

/// A socket on a topic, and whether it asked for positions.
#[derive(Debug, Clone)]
struct Subscriber {
    mailbox: Mailbox,
    positions: bool,
}

/// Whether the upstream subscription of a user's events is in place, and who waits for it.
#[derive(Debug, Default)]
struct Upstream {
    generation: u64,
    ready: bool,
    waiters: Vec<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
struct Subscribers {
    public: HashMap<ConnId, Subscriber>,
    role: HashMap<ConnId, Subscriber>,
    /// A user has a handful of sockets (tabs, devices); a short list beats a map per user.
    users: HashMap<UserId, Vec<(ConnId, Subscriber)>>,
    /// Every authenticated session by user, joined to any topic or none.
    sessions: HashMap<UserId, Vec<Session>>,
    /// Per user with a session here, when per-user interest is on.
    upstream: HashMap<UserId, Upstream>,
    next_generation: u64,
    /// Every socket, for the shutdown drain.
    sockets: HashMap<ConnId, Mailbox>,
}

/// Topic → subscribed sockets. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Hub {
    // A std lock: it is never held across an await, and publishing (the hot path) only reads.
    subscribers: RwLock<Subscribers>,
    /// Where the first session and the last session of a user are announced, when per-user interest is
    /// on; `None`: every user's events arrive anyway.
    interest: Option<mpsc::UnboundedSender<Interest>>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub that announces its users' first and last sessions on the returned channel, and whose user
    /// topics are ready only once [`Self::upstream_ready`] has been called for the announced generation.
    pub fn with_interest() -> (Self, mpsc::UnboundedReceiver<Interest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Self {
            subscribers: RwLock::default(),
            interest: Some(tx),
        };
        (hub, rx)
    }

    /// Adds `conn` to `topic`. Subscribing twice is harmless: the second replaces the first.
    pub fn subscribe(&self, topic: Topic, conn: ConnId, mailbox: Mailbox) {
        self.subscribe_with(topic, conn, mailbox, false);
    }

    /// [`Self::subscribe`], with broadcasts carrying their position when `positions` is set.
    pub fn subscribe_with(&self, topic: Topic, conn: ConnId, mailbox: Mailbox, positions: bool) {
        let outbound = Subscriber { mailbox, positions };
        let mut subs = self.write();
        match topic {
            Topic::Public => {
                subs.public.insert(conn, outbound);
            }
            Topic::Role => {
                subs.role.insert(conn, outbound);
            }
            Topic::User(user) => {
                let list = subs.users.entry(user).or_default();
                list.retain(|(id, _)| *id != conn);
                list.push((conn, outbound));
            }
        }
    }

    pub fn unsubscribe(&self, topic: Topic, conn: ConnId) {
        let mut subs = self.write();
        match topic {
            Topic::Public => {
                subs.public.remove(&conn);
            }
            Topic::Role => {
                subs.role.remove(&conn);
            }
            Topic::User(user) => {
                if let Some(list) = subs.users.get_mut(&user) {
                    list.retain(|(id, _)| *id != conn);
                    if list.is_empty() {
                        subs.users.remove(&user);
                    }
                }
            }
        }
    }

    /// Whether any local socket listens on `topic`; lets ingress skip encoding unwanted messages.
    pub fn has_subscribers(&self, topic: Topic) -> bool {
        let subs = self.read();
        match topic {
            Topic::Public => !subs.public.is_empty(),
            Topic::Role => !subs.role.is_empty(),
            Topic::User(user) => subs.users.contains_key(&user),
        }
    }

    /// Offers `frame` to every socket on `topic` without waiting for any of them.
    pub fn publish(&self, topic: Topic, frame: &Frame, received: std::time::Instant) -> Delivery {
        self.publish_stored(Message {
            topic,
            frame,
            positioned: || frame.clone(),
            seq: 0,
            received,
        })
    }

    /// Offers a stored event to every socket on its topic without waiting for any of them; sockets that
    /// asked for positions get `message.positioned`.
    pub fn publish_stored<F: FnOnce() -> Frame>(&self, message: Message<'_, F>) -> Delivery {
        let subs = self.read();
        let mut delivery = Delivery::default();
        let Message {
            topic,
            frame,
            positioned,
            seq,
            received,
        } = message;
        let plain = Queued::new(frame.clone(), received, topic, seq);
        let mut positioned = Some(positioned);
        let mut with_position: Option<Queued> = None;
        let mut offer = |subscriber: &Subscriber| {
            let queued = if subscriber.positions {
                with_position
                    .get_or_insert_with(|| {
                        // `positioned` is taken once, the first time a subscriber wants it.
                        let make = positioned.take().expect("built at most once");
                        Queued::new(make(), received, topic, seq)
                    })
                    .clone()
            } else {
                plain.clone()
            };
            delivery.add(subscriber.mailbox.offer(queued));
        };
        match topic {
            Topic::Public => subs.public.values().for_each(&mut offer),
            Topic::Role => subs.role.values().for_each(&mut offer),
            Topic::User(user) => {
                if let Some(list) = subs.users.get(&user) {
                    list.iter().for_each(|(_, subscriber)| offer(subscriber));
                }
            }
        }
        delivery
    }

    /// Users with a session here (the per-user interest to hold upstream).
    pub fn session_users(&self) -> Vec<UserId> {
        self.read().sessions.keys().copied().collect()
    }

    /// Records that the upstream subscription announced as `generation` for `user` is in place, and wakes
    /// the joins waiting for it. An acknowledgement of an older generation is ignored.
    pub fn upstream_ready(&self, user: UserId, generation: u64) {
        let mut subs = self.write();
        if let Some(upstream) = subs.upstream.get_mut(&user)
            && upstream.generation == generation
        {
            upstream.ready = true;
            for waiter in upstream.waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// `None` when `user`'s events already arrive here; otherwise resolves once they do (or is dropped
    /// when the user's last session ends first).
    pub fn wait_upstream(&self, user: UserId) -> Option<oneshot::Receiver<()>> {
        self.interest.as_ref()?;
        let mut subs = self.write();
        let upstream = subs.upstream.get_mut(&user)?;
        if upstream.ready {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        upstream.waiters.push(tx);
        Some(rx)
    }

    /// Makes a socket reachable by [`Self::close_some`].
    pub fn register_socket(&self, conn: ConnId, mailbox: Mailbox) {
        self.write().sockets.insert(conn, mailbox);
    }

    pub fn unregister_socket(&self, conn: ConnId) {
        self.write().sockets.remove(&conn);
    }

    /// Sockets still registered.
    pub fn socket_count(&self) -> usize {
        self.read().sockets.len()
    }

    /// Closes up to `count` sockets that are not closing yet; returns how many it closed.
    pub fn close_some(&self, count: usize, kick: Kick) -> usize {
        let subs = self.read();
        subs.sockets
            .values()
            .filter(|mailbox| !mailbox.is_closing())
            .take(count)
            .filter(|mailbox| mailbox.close(kick))
            .count()
    }

    /// Makes an authenticated session reachable by [`Self::close_user`] and [`Self::close_token`]. The
    /// user's first session here announces the user's interest.
    pub fn register_session(&self, user: UserId, conn: ConnId, jti: &str, mailbox: Mailbox) {
        let mut guard = self.write();
        let subs = &mut *guard;
        let list = subs.sessions.entry(user).or_default();
        list.push(Session {
            conn,
            jti: jti.into(),
            mailbox,
        });
        if list.len() == 1
            && let Some(interest) = &self.interest
        {
            subs.next_generation += 1;
            let generation = subs.next_generation;
            subs.upstream.insert(
                user,
                Upstream {
                    generation,
                    ..Upstream::default()
                },
            );
            // Sent under the lock, so announcements keep the order of the changes. The receiver lives as
            // long as ingress; after it stopped, nothing is waited for.
            let _ = interest.send(Interest::Add { user, generation });
        }
    }

    /// The user's last session here withdraws the user's interest.
    pub fn unregister_session(&self, user: UserId, conn: ConnId) {
        let mut subs = self.write();
        if let Some(list) = subs.sessions.get_mut(&user) {
            list.retain(|session| session.conn != conn);
            if list.is_empty() {
                subs.sessions.remove(&user);
                if subs.upstream.remove(&user).is_some()
                    && let Some(interest) = &self.interest
                {
                    let _ = interest.send(Interest::Remove { user });
                }
            }
        }
    }

    /// Closes every session of `user`; returns how many.
    pub fn close_user(&self, user: UserId, kick: Kick) -> usize {
        self.close_where(user, kick, |_| true)
    }

    /// Closes the sessions of `user` that authenticated with the token `jti`; returns how many.
    pub fn close_token(&self, user: UserId, jti: &str, kick: Kick) -> usize {
        self.close_where(user, kick, |session| &*session.jti == jti)
    }

    fn close_where(&self, user: UserId, kick: Kick, matches: impl Fn(&Session) -> bool) -> usize {
        let subs = self.read();
        subs.sessions.get(&user).map_or(0, |list| {
            list.iter()
                .filter(|session| matches(session))
                .filter(|session| session.mailbox.close(kick))
                .count()
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Subscribers> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is one call), so
        // a poisoned lock is still consistent.
        self.subscribers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Subscribers> {
        self.subscribers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_close_by_user_or_by_token() {
        let hub = Hub::new();
        let (a, b, c) = (Mailbox::new(1), Mailbox::new(1), Mailbox::new(1));
        let user = UserId::new(3);
        hub.register_session(user, 1, "jti-1", a.clone());
        hub.register_session(user, 2, "jti-2", b.clone());
        hub.register_session(UserId::new(4), 3, "jti-1", c.clone());
        assert_eq!(hub.close_token(user, "jti-1", Kick::Revoked), 1);
        assert!(a.is_closing() && !b.is_closing() && !c.is_closing());
        hub.unregister_session(user, 1);
        assert_eq!(hub.close_user(user, Kick::Disconnected), 1);
        assert_eq!(b.kick(), Some(Kick::Disconnected));
        // Closing twice counts once.
        assert_eq!(hub.close_user(user, Kick::Disconnected), 0);
    }

    fn socket(capacity: usize) -> Mailbox {
        Mailbox::new(capacity)
    }

    #[test]
    fn delivers_once_to_each_subscriber_of_the_topic() {
        let hub = Hub::new();
        let (a, b) = (socket(4), socket(4));
        hub.subscribe(Topic::Public, 1, a.clone());
        hub.subscribe(Topic::Public, 1, a.clone());
        hub.subscribe(Topic::User(UserId::new(9)), 1, a.clone());
        hub.subscribe(Topic::Public, 2, b.clone());

        let frame: Frame = "x".into();
        assert_eq!(
            hub.publish(Topic::Public, &frame, std::time::Instant::now())
                .queued,
            2
        );
        assert_eq!(
            hub.publish(
                Topic::User(UserId::new(9)),
                &frame,
                std::time::Instant::now()
            )
            .queued,
            1
        );
        assert_eq!(
            hub.publish(Topic::Role, &frame, std::time::Instant::now())
                .queued,
            0
        );
        assert_eq!(a.try_recv().unwrap().frame(), frame);
        assert_eq!(a.try_recv().unwrap().frame(), frame);
        assert!(a.try_recv().is_none());
        assert_eq!(b.try_recv().unwrap().frame(), frame);
        assert!(b.try_recv().is_none());

        hub.unsubscribe(Topic::User(UserId::new(9)), 1);
        assert!(!hub.has_subscribers(Topic::User(UserId::new(9))));
    }

    #[test]
    fn a_full_queue_marks_only_that_socket() {
        let hub = Hub::new();
        let (slow, fast) = (socket(1), socket(8));
        hub.subscribe(Topic::Role, 1, slow.clone());
        hub.subscribe(Topic::Role, 2, fast.clone());
        let frame: Frame = "x".into();
        hub.publish(Topic::Role, &frame, std::time::Instant::now());
        let second = hub.publish(Topic::Role, &frame, std::time::Instant::now());
        assert_eq!(
            second,
            Delivery {
                queued: 1,
                overflowed: 1
            }
        );
        assert_eq!(slow.kick(), Some(Kick::SlowConsumer));
        assert!(!fast.is_closing());
        assert!(fast.try_recv().is_some() && fast.try_recv().is_some());
    }
}
