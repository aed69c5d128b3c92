//! Local fan-out: which sockets of this instance are joined to which topic.
//!
//! Ingress hands the hub one encoded [`Frame`] per NATS message; the hub offers a clone (a reference-count
//! bump) to the bounded queue of every subscribed socket. A socket whose queue is full is not waited for:
//! it is marked as a slow consumer (its [`Outbound::overflow`] token is cancelled) and its session closes
//! it. The hub knows neither NATS nor sockets.

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::Frame;
use crate::topic::{Topic, UserId};

/// Identifies one socket for its whole life on this instance.
pub type ConnId = u64;

/// The sending side of one socket's outbound queue.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Frame>,
    /// Cancelled when the queue overflows; the session then closes the socket.
    overflow: CancellationToken,
}

impl Outbound {
    pub fn new(tx: mpsc::Sender<Frame>, overflow: CancellationToken) -> Self {
        Self { tx, overflow }
    }
}

/// What happened to one published frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Sockets whose queue took the frame.
    pub queued: usize,
    /// Sockets dropped as slow consumers by this publish.
    pub overflowed: usize,
}

#[derive(Debug, Default)]
struct Subscribers {
    public: HashMap<ConnId, Outbound>,
    role: HashMap<ConnId, Outbound>,
    /// A user has a handful of sockets (tabs, devices); a short list beats a map per user.
    users: HashMap<UserId, Vec<(ConnId, Outbound)>>,
}

/// Topic → subscribed sockets. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Hub {
    // A std lock: it is never held across an await, and publishing (the hot path) only reads.
    subscribers: RwLock<Subscribers>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `conn` to `topic`. Subscribing twice is harmless: the second replaces the first.
    pub fn subscribe(&self, topic: Topic, conn: ConnId, outbound: Outbound) {
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
    pub fn publish(&self, topic: Topic, frame: &Frame) -> Delivery {
        let subs = self.read();
        let mut delivery = Delivery::default();
        let mut offer = |outbound: &Outbound| match outbound.tx.try_send(frame.clone()) {
            Ok(()) => delivery.queued += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !outbound.overflow.is_cancelled() {
                    outbound.overflow.cancel();
                    delivery.overflowed += 1;
                }
            }
            // The session is ending and will unsubscribe itself.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        };
        match topic {
            Topic::Public => subs.public.values().for_each(&mut offer),
            Topic::Role => subs.role.values().for_each(&mut offer),
            Topic::User(user) => {
                if let Some(list) = subs.users.get(&user) {
                    list.iter().for_each(|(_, outbound)| offer(outbound));
                }
            }
        }
        delivery
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

    fn socket(capacity: usize) -> (Outbound, mpsc::Receiver<Frame>, CancellationToken) {
        let (tx, rx) = mpsc::channel(capacity);
        let overflow = CancellationToken::new();
        (Outbound::new(tx, overflow.clone()), rx, overflow)
    }

    #[test]
    fn delivers_once_to_each_subscriber_of_the_topic() {
        let hub = Hub::new();
        let (a, mut a_rx, _) = socket(4);
        let (b, mut b_rx, _) = socket(4);
        hub.subscribe(Topic::Public, 1, a.clone());
        hub.subscribe(Topic::Public, 1, a.clone());
        hub.subscribe(Topic::User(UserId::new(9)), 1, a);
        hub.subscribe(Topic::Public, 2, b);

        let frame: Frame = "x".into();
        assert_eq!(hub.publish(Topic::Public, &frame).queued, 2);
        assert_eq!(hub.publish(Topic::User(UserId::new(9)), &frame).queued, 1);
        assert_eq!(hub.publish(Topic::Role, &frame).queued, 0);
        assert_eq!(a_rx.try_recv().unwrap(), frame);
        assert_eq!(a_rx.try_recv().unwrap(), frame);
        assert!(a_rx.try_recv().is_err());
        assert_eq!(b_rx.try_recv().unwrap(), frame);
        assert!(b_rx.try_recv().is_err());

        hub.unsubscribe(Topic::User(UserId::new(9)), 1);
        assert!(!hub.has_subscribers(Topic::User(UserId::new(9))));
    }

    #[test]
    fn a_full_queue_marks_only_that_socket() {
        let hub = Hub::new();
        let (slow, _slow_rx, slow_overflow) = socket(1);
        let (fast, mut fast_rx, fast_overflow) = socket(8);
        hub.subscribe(Topic::Role, 1, slow);
        hub.subscribe(Topic::Role, 2, fast);
        let frame: Frame = "x".into();
        hub.publish(Topic::Role, &frame);
        let second = hub.publish(Topic::Role, &frame);
        assert_eq!(
            second,
            Delivery {
                queued: 1,
                overflowed: 1
            }
        );
        assert!(slow_overflow.is_cancelled());
        assert!(!fast_overflow.is_cancelled());
        assert!(fast_rx.try_recv().is_ok() && fast_rx.try_recv().is_ok());
    }
}
