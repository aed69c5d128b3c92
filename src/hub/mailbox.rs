//! One socket's mailbox: its bounded queue of outbound frames and the request to close it, in one small
//! allocation that the hub, the presence feed and the socket's session share.
//!
//! Every socket has one for its whole life, and most sockets are idle, so its size at rest is what counts:
//! a `VecDeque` that allocates on the first frame (and gives a burst's room back once drained), a kick
//! slot, and one waker for the session's task. A tokio channel and a cancellation token in its place cost
//! about 0.9 KiB per socket before the first frame (cache-padded channel state, a first block of 32 slots,
//! the token's tree node).
//!
//! Many producers (ingress, the feed, `logout`/`disconnect`, the drain) offer frames or kicks without
//! waiting; one consumer, the session, takes them. A full queue kicks the socket as a slow consumer instead
//! of waiting for it. The first kick wins; after it, offers are dropped, while frames queued before it stay
//! to be written (a `logout` event before its close).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use super::{Kick, Queued};

/// Above this many slots, an emptied queue gives its room back: a burst's buffer is not kept by a socket
/// that has gone quiet.
const KEEP_SLOTS: usize = 64;

/// A handle on one socket's mailbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Mailbox(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Frames queued before a socket counts as a slow consumer.
    capacity: usize,
    state: Mutex<State>,
    /// The session's task, woken by a frame or a kick.
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Queued>,
    kick: Option<Kick>,
}

/// What [`Mailbox::offer`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    Queued,
    /// The queue was full: the socket is now closed as a slow consumer.
    Overflowed,
    /// The socket is already closing; the frame was dropped.
    Closing,
}

/// What the session gets next: a kick first, whatever is queued.
#[derive(Debug)]
pub enum Next {
    Kicked(Kick),
    Frame(Queued),
}

impl Mailbox {
    /// An empty mailbox of `capacity` frames (at least one).
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new(Shared {
            capacity: capacity.max(1),
            state: Mutex::default(),
            waker: AtomicWaker::new(),
        }))
    }

    /// Queues `queued` without waiting. A full queue closes the socket as a slow consumer instead.
    pub fn offer(&self, queued: Queued) -> Offered {
        let offered = {
            let mut state = self.lock();
            if state.kick.is_some() {
                return Offered::Closing;
            }
            if state.queue.len() >= self.0.capacity {
                state.kick = Some(Kick::SlowConsumer);
                Offered::Overflowed
            } else {
                state.queue.push_back(queued);
                Offered::Queued
            }
        };
        self.0.waker.wake();
        offered
    }

    /// Asks the session to close its socket; returns whether this call was the first to.
    pub fn close(&self, kick: Kick) -> bool {
        let first = {
            let mut state = self.lock();
            let first = state.kick.is_none();
            state.kick.get_or_insert(kick);
            first
        };
        self.0.waker.wake();
        first
    }

    /// The kick, if one was given.
    pub fn kick(&self) -> Option<Kick> {
        self.lock().kick
    }

    /// Whether a kick was given.
    pub fn is_closing(&self) -> bool {
        self.kick().is_some()
    }

    /// The oldest queued frame, without waiting, kick or not (a kicked session writes what was queued).
    pub fn try_recv(&self) -> Option<Queued> {
        let mut state = self.lock();
        let queued = state.queue.pop_front();
        if queued.is_none() && state.queue.capacity() > KEEP_SLOTS {
            state.queue = VecDeque::new();
        }
        queued
    }

    /// The kick, once given; else the next queued frame, once there is one.
    pub async fn next(&self) -> Next {
        poll_fn(|cx| {
            self.poll(cx, |state| {
                if let Some(kick) = state.kick {
                    return Some(Next::Kicked(kick));
                }
                state.queue.pop_front().map(Next::Frame)
            })
        })
        .await
    }

    /// Resolves with the kick once one is given; frames stay queued.
    pub async fn kicked(&self) -> Kick {
        poll_fn(|cx| self.poll(cx, |state| state.kick)).await
    }

    /// Polls `take` on the state, registering the session's waker before a second look so that a frame
    /// or kick offered in between is not missed.
    fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut take: impl FnMut(&mut State) -> Option<T>,
    ) -> Poll<T> {
        if let Some(found) = take(&mut self.lock()) {
            return Poll::Ready(found);
        }
        self.0.waker.register(cx.waker());
        take(&mut self.lock()).map_or(Poll::Pending, Poll::Ready)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a single queue or slot operation: a poisoned lock is still consistent.
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Topic;

    fn frame(n: u64) -> Queued {
        Queued::new(
            n.to_string().into(),
            std::time::Instant::now(),
            Topic::Public,
            n,
        )
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_a_kick_comes_first() {
        let mailbox = Mailbox::new(4);
        assert_eq!(mailbox.offer(frame(1)), Offered::Queued);
        assert_eq!(mailbox.offer(frame(2)), Offered::Queued);
        assert!(matches!(mailbox.next().await, Next::Frame(q) if q.seq() == 1));
        assert!(mailbox.close(Kick::Revoked));
        assert!(!mailbox.close(Kick::Disconnected), "the first kick wins");
        assert!(matches!(mailbox.next().await, Next::Kicked(Kick::Revoked)));
        assert_eq!(mailbox.kicked().await, Kick::Revoked);
        // Queued before the kick: still there to be written; offered after it: dropped.
        assert_eq!(mailbox.offer(frame(3)), Offered::Closing);
        assert_eq!(mailbox.try_recv().map(|q| q.seq()), Some(2));
        assert!(mailbox.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_full_queue_kicks_the_socket_as_a_slow_consumer() {
        let mailbox = Mailbox::new(2);
        mailbox.offer(frame(1));
        mailbox.offer(frame(2));
        assert_eq!(mailbox.offer(frame(3)), Offered::Overflowed);
        assert_eq!(mailbox.offer(frame(4)), Offered::Closing);
        assert!(mailbox.is_closing());
        assert_eq!(mailbox.kicked().await, Kick::SlowConsumer);
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_a_frame_from_another_task() {
        let mailbox = Mailbox::new(8);
        let waiting = tokio::spawn({
            let mailbox = mailbox.clone();
            async move { mailbox.next().await }
        });
        tokio::task::yield_now().await;
        mailbox.offer(frame(7));
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(matches!(next, Next::Frame(q) if q.seq() == 7));
    }

    #[test]
    fn an_emptied_queue_gives_a_burst_s_room_back() {
        let mailbox = Mailbox::new(1024);
        for n in 0..500 {
            mailbox.offer(frame(n));
        }
        while mailbox.try_recv().is_some() {}
        assert_eq!(mailbox.lock().queue.capacity(), 0);
    }
}
