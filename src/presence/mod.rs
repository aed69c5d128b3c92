//! Who is online: this instance's users, counted per socket, and a view of every other instance's users.
//!
//! Sessions call [`Presence::join`] and [`Presence::leave`] when an authenticated socket joins or leaves
//! `user:public`; a user's first join and last leave on this instance mark the user dirty, and the KV
//! writer ([`store`]) turns dirty users into records in the JetStream KV bucket. The KV watcher feeds the
//! records of other instances back in. `is_online` is answered from memory: this instance's own count is
//! authoritative for its own users (no wait for the KV round trip), the watched view for everyone else.
//!
//! The `is_online` question has one shape wherever it is asked (a client push, the NATS service):
//! [`IsOnlineRequest`] in, [`IsOnline`] out.

pub mod feed;
pub mod service;
pub mod store;
pub mod task;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use crate::topic::UserId;

/// The client event, and the NATS service endpoint, that ask whether a user is online.
pub const EVENT_IS_ONLINE: &str = "is_online";

/// Why an `is_online` request names no user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IsOnlineError {
    #[error("missing user_id")]
    MissingUserId,
    #[error("user_id must be a user id (a number or a numeric string)")]
    NotAUserId,
}

/// An `is_online` request: `{"user_id": 42}` or `{"user_id": "42"}`; a number and a numeric string name
/// the same user.
#[derive(Debug, Clone, Copy)]
pub struct IsOnlineRequest<'a> {
    /// `user_id` as sent, echoed in the answer with its JSON type.
    id: &'a Value,
    user: UserId,
}

impl<'a> IsOnlineRequest<'a> {
    /// # Errors
    /// [`IsOnlineError`] when `request` has no `user_id`, or one that is not a user id.
    pub fn parse(request: &'a Value) -> Result<Self, IsOnlineError> {
        let id = request.get("user_id").ok_or(IsOnlineError::MissingUserId)?;
        let user = UserId::from_json(id).ok_or(IsOnlineError::NotAUserId)?;
        Ok(Self { id, user })
    }
}

/// The answer to an [`IsOnlineRequest`]: `{"id": <user_id as sent>, "online": bool}`.
#[derive(Debug, Serialize)]
pub struct IsOnline<'a> {
    pub id: &'a Value,
    pub online: bool,
}

/// Presence state of this instance.
#[derive(Debug)]
pub struct Presence {
    node: Arc<str>,
    /// Joined `user:public` sockets per user on this instance.
    local: Mutex<HashMap<UserId, u32>>,
    /// Users whose record must be written or removed; a set, so a burst of joins and leaves of one user
    /// costs one write, and its size is bounded by the number of users.
    dirty: Mutex<HashSet<UserId>>,
    dirty_notify: Notify,
    /// Other instances holding a record per user, from the KV watch.
    remote: RwLock<RemoteView>,
    /// Users whose set of instances changed since the presence feed last looked; `None` when there is no
    /// feed. A set: bounded by the number of users, however often they come and go.
    changes: Option<Mutex<HashSet<UserId>>>,
}

/// Per user, the other instances that hold a record for them.
pub type RemoteView = HashMap<UserId, Vec<Arc<str>>>;

/// Applies one record (or its removal) to `view`; returns whether the view changed (a refresh of a
/// record already held does not).
fn apply_record(view: &mut RemoteView, user: UserId, node: &str, present: bool) -> bool {
    if present {
        let nodes = view.entry(user).or_default();
        if nodes.iter().any(|n| &**n == node) {
            return false;
        }
        nodes.push(node.into());
        true
    } else if let Some(nodes) = view.get_mut(&user) {
        let before = nodes.len();
        nodes.retain(|n| &**n != node);
        let changed = nodes.len() != before;
        if nodes.is_empty() {
            view.remove(&user);
        }
        changed
    } else {
        false
    }
}

impl Presence {
    pub fn new(node: &str) -> Arc<Self> {
        Arc::new(Self::build(node, None))
    }

    /// Presence that also notes which users' instances changed, for the presence feed
    /// ([`Self::take_changes`]).
    pub fn with_changes(node: &str) -> Arc<Self> {
        Arc::new(Self::build(node, Some(Mutex::default())))
    }

    fn build(node: &str, changes: Option<Mutex<HashSet<UserId>>>) -> Self {
        Self {
            node: node.into(),
            local: Mutex::default(),
            dirty: Mutex::default(),
            dirty_notify: Notify::new(),
            remote: RwLock::default(),
            changes,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// One more socket of `user` joined `user:public` here.
    pub fn join(&self, user: UserId) {
        let first = {
            let mut local = lock(&self.local);
            let count = local.entry(user).or_insert(0);
            *count += 1;
            *count == 1
        };
        if first {
            self.mark_dirty([user]);
            self.changed([user]);
        }
    }

    /// One socket of `user` left `user:public` here (left, closed, or rejoined elsewhere).
    pub fn leave(&self, user: UserId) {
        let last = {
            let mut local = lock(&self.local);
            match local.get_mut(&user) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    local.remove(&user);
                    true
                }
                None => false,
            }
        };
        if last {
            self.mark_dirty([user]);
            self.changed([user]);
        }
    }

    pub fn is_local(&self, user: UserId) -> bool {
        lock(&self.local).contains_key(&user)
    }

    /// Online anywhere in the cluster.
    pub fn is_online(&self, user: UserId) -> bool {
        self.is_local(user) || read(&self.remote).contains_key(&user)
    }

    pub fn answer<'a>(&self, request: IsOnlineRequest<'a>) -> IsOnline<'a> {
        IsOnline {
            id: request.id,
            online: self.is_online(request.user),
        }
    }

    /// Calls `visit` with every instance `user` is online on: this one first when the user has a socket
    /// here, then the others whose records this instance has seen.
    pub fn nodes_of(&self, user: UserId, mut visit: impl FnMut(&str)) {
        if self.is_local(user) {
            visit(&self.node);
        }
        if let Some(nodes) = read(&self.remote).get(&user) {
            nodes.iter().for_each(|node| visit(node));
        }
    }

    /// The users whose instances changed since the last call (none without [`Self::with_changes`]).
    pub fn take_changes(&self) -> HashSet<UserId> {
        self.changes
            .as_ref()
            .map(|changes| std::mem::take(&mut *lock(changes)))
            .unwrap_or_default()
    }

    fn changed(&self, users: impl IntoIterator<Item = UserId>) {
        if let Some(changes) = &self.changes {
            lock(changes).extend(users);
        }
    }

    pub fn local_users(&self) -> Vec<UserId> {
        lock(&self.local).keys().copied().collect()
    }

    /// Users online anywhere: this instance's plus those only other instances hold.
    pub fn online_count(&self) -> usize {
        let local = lock(&self.local);
        let remote = read(&self.remote);
        local.len()
            + remote
                .keys()
                .filter(|user| !local.contains_key(user))
                .count()
    }

    fn mark_dirty(&self, users: impl IntoIterator<Item = UserId>) {
        lock(&self.dirty).extend(users);
        self.dirty_notify.notify_one();
    }

    fn take_dirty(&self) -> HashSet<UserId> {
        std::mem::take(&mut *lock(&self.dirty))
    }

    /// Records that `node` holds (or no longer holds) a record for `user`. This instance's own records are
    /// ignored: its local count already answers for them.
    fn record_remote(&self, user: UserId, node: &str, present: bool) {
        if node != &*self.node && apply_record(&mut write(&self.remote), user, node, present) {
            self.changed([user]);
        }
    }

    /// Records into a view being rebuilt, with the same rule as [`Self::record_remote`].
    fn record_into(&self, view: &mut RemoteView, user: UserId, node: &str, present: bool) {
        if node != &*self.node {
            apply_record(view, user, node, present);
        }
    }

    /// Swaps in a view rebuilt from the bucket, in one step: no query sees a half-built view.
    fn replace_remote(&self, view: RemoteView) {
        let old = std::mem::replace(&mut *write(&self.remote), view);
        if self.changes.is_some() {
            // Every user of either view may have changed; the feed compares each with what it published.
            let new = read(&self.remote).keys().copied().collect::<Vec<_>>();
            self.changed(old.into_keys().chain(new));
        }
    }
}

// Every critical section above is a single map operation, so a poisoned lock still guards consistent data.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_join_and_last_leave_mark_dirty() {
        let presence = Presence::new("a");
        let user = UserId::new(5);
        presence.join(user);
        presence.join(user);
        assert_eq!(presence.take_dirty(), HashSet::from([user]));
        presence.leave(user);
        assert!(presence.take_dirty().is_empty());
        assert!(presence.is_online(user));
        presence.leave(user);
        assert_eq!(presence.take_dirty(), HashSet::from([user]));
        assert!(!presence.is_online(user));
        presence.leave(user);
        assert!(presence.take_dirty().is_empty());
    }

    #[test]
    fn is_online_requests_name_a_user_by_number_or_numeric_string() {
        let presence = Presence::new("a");
        presence.join(UserId::new(5));
        let answer = |request: serde_json::Value| {
            IsOnlineRequest::parse(&request)
                .map(|request| serde_json::to_value(presence.answer(request)).unwrap())
        };
        assert_eq!(
            answer(serde_json::json!({"user_id": 5})),
            Ok(serde_json::json!({"id": 5, "online": true}))
        );
        assert_eq!(
            answer(serde_json::json!({"user_id": "6"})),
            Ok(serde_json::json!({"id": "6", "online": false}))
        );
        assert_eq!(
            answer(serde_json::json!({"id": 5})),
            Err(IsOnlineError::MissingUserId)
        );
        assert_eq!(
            answer(serde_json::json!({"user_id": "five"})),
            Err(IsOnlineError::NotAUserId)
        );
    }

    #[test]
    fn remote_records_of_other_nodes_count() {
        let presence = Presence::new("a");
        let user = UserId::new(5);
        presence.record_remote(user, "a", true);
        assert!(!presence.is_online(user));
        presence.record_remote(user, "b", true);
        presence.record_remote(user, "c", true);
        presence.record_remote(user, "b", false);
        assert!(presence.is_online(user));
        presence.record_remote(user, "c", false);
        assert!(!presence.is_online(user));
        assert_eq!(presence.online_count(), 0);
    }
}
