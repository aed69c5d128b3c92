//! The presence-feed scenario's sockets, on the gateway: the watchers and the churn pool.
//!
//! - A **watcher** is one of the users' sockets (authenticated, joined to `user:public`, `user:role` and
//!   `user:<id>`, phoenix.js's heartbeats, per-user deliveries timed into [`Stats`]) whose `user:public`
//!   join asks for the presence feed, `{"presence": true}`, when its gateway has the feed on; with the feed
//!   off it joins plainly, so that both gateways hold the same sockets and joins. It is open once its three
//!   joins are answered and, with the feed on, its `presence_state` has arrived. It keeps who is online as
//!   phoenix.js's `Presence` does (`syncState`, then `syncDiff` for each `presence_diff`, metas told apart by
//!   `phx_ref`) in an [`OnlineList`], and reports into [`Watch`] what the feed cost it (frames and bytes,
//!   its initial state apart) and how far apart its diffs arrived. Every watcher reads its own frames, but
//!   a frame's text is parsed once for all of them ([`Reader`]): the gateway sends every watcher the same
//!   bytes.
//! - A **churner** is the socket of a user of the churn pool (ids above the users'): authenticated and
//!   joined to nothing at first. The [`Pool`] says whether its user should be online; the socket then joins
//!   `user:public` (a presence join) or leaves it with `phx_leave` (a presence leave), and once the gateway
//!   has answered, the pool records where the user is: the online set the watchers' lists are checked
//!   against.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail, ensure};
use epoch_bench::rng::Rng;
use epoch_gateway::presence::feed::{
    EVENT_DIFF, EVENT_STATE, EVENT_SUSPENDED, FEED_TOPIC, PARAM_PRESENCE, STATE_CHUNK_USERS,
};
use epoch_testkit::Ws;
use futures::{SinkExt, StreamExt};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Endpoint, SOCKET_SEED, heartbeat_timer, message_or_end, phoenix, tcp_connect};
use crate::stats::{Latency, LatencyHistogram, Stats, now_us, percentiles};

/// How every frame of the feed starts (the gateway's broadcasts on `user:public`), before its event name;
/// a test checks it against the gateway's topic.
const FEED_HEAD: &str = "[null,null,\"user:public\",\"";
/// Refs one list tells apart: a user's metas are one per gateway instance the user is online on (the
/// scenario runs one instance per gateway), so a bit each in a byte is room enough.
const MOST_REFS: usize = u8::BITS as usize;
/// The churners' refs start with this, so that their replies are told from the heartbeats' (digits only).
const CHURN_REF: &str = "c";

// ---------------------------------------------------------------------------------------------------------
// Feed frames, read once, and the online list of one watcher

/// Per user id, the metas the feed listed (`{"42": {"metas": [{"phx_ref": "…"}]}}`).
type Presences = HashMap<String, Metas>;

#[derive(Deserialize)]
struct Metas {
    metas: Vec<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    phx_ref: String,
}

#[derive(Deserialize)]
struct Diff {
    joins: Presences,
    leaves: Presences,
}

/// A feed frame, `[null, null, "user:public", "presence_…", payload]`, of which only the payload is read.
#[derive(Deserialize)]
struct FeedFrame<P>(IgnoredAny, IgnoredAny, IgnoredAny, IgnoredAny, P);

/// A frame's users as a list applies them: per user, its index (`user - 1`) and a bit per ref of its metas.
type Placed = Vec<(usize, u8)>;

/// A feed frame, read.
enum Parsed {
    State(Placed),
    Diff { joins: Placed, leaves: Placed },
}

/// Reads feed frames for every watcher. The gateway encodes a frame once and sends the same bytes to
/// every watcher, so each is parsed once: the tool's own work per diff then does not grow with the
/// watchers, and does not delay the deliveries it times.
struct Reader {
    /// Users `1..=users` can be placed.
    users: u64,
    /// The `phx_ref`s seen so far, a bit each.
    refs: Vec<String>,
    /// The latest frames read, by their text; `None`: a frame no list can take.
    recent: VecDeque<(String, Option<Arc<Parsed>>)>,
}

/// Frames the [`Reader`] keeps: a watcher that reads a tick's diff late finds it among them.
const FRAMES_KEPT: usize = 4;

impl Reader {
    fn new(users: u64) -> Self {
        Self {
            users,
            refs: Vec::new(),
            recent: VecDeque::with_capacity(FRAMES_KEPT),
        }
    }

    /// Frame `text`, carrying `event`: read before, or read now.
    fn read(&mut self, event: FeedEvent, text: &str) -> Option<Arc<Parsed>> {
        if let Some((_, parsed)) = self.recent.iter().find(|(seen, _)| seen == text) {
            return parsed.clone();
        }
        let parsed = self.parse(event, text).map(Arc::new);
        if self.recent.len() == FRAMES_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((text.to_owned(), parsed.clone()));
        parsed
    }

    fn parse(&mut self, event: FeedEvent, text: &str) -> Option<Parsed> {
        match event {
            FeedEvent::State => {
                let FeedFrame(.., state) =
                    serde_json::from_str::<FeedFrame<Presences>>(text).ok()?;
                Some(Parsed::State(self.place(&state)?))
            }
            FeedEvent::Diff => {
                let FeedFrame(.., diff) = serde_json::from_str::<FeedFrame<Diff>>(text).ok()?;
                Some(Parsed::Diff {
                    joins: self.place(&diff.joins)?,
                    leaves: self.place(&diff.leaves)?,
                })
            }
            FeedEvent::Suspended => None,
        }
    }

    /// Where `presences` go; `None` when one names a user outside `1..=users` or more refs than a list
    /// tells apart.
    fn place(&mut self, presences: &Presences) -> Option<Placed> {
        presences
            .iter()
            .map(|(user, metas)| Some((self.index(user)?, self.bits(metas)?)))
            .collect()
    }

    fn index(&self, user: &str) -> Option<usize> {
        let id: u64 = user.parse().ok()?;
        (1..=self.users)
            .contains(&id)
            .then(|| usize::try_from(id - 1).ok())
            .flatten()
    }

    /// The bits of `metas`' refs, each ref given a bit when first seen.
    fn bits(&mut self, metas: &Metas) -> Option<u8> {
        metas.metas.iter().try_fold(0u8, |bits, meta| {
            let known = self.refs.iter().position(|r| *r == meta.phx_ref);
            let at = match known {
                Some(at) => at,
                None if self.refs.len() < MOST_REFS => {
                    self.refs.push(meta.phx_ref.clone());
                    self.refs.len() - 1
                }
                None => return None,
            };
            Some(bits | 1 << at)
        })
    }
}

/// Who is online as one watcher's phoenix.js `Presence` would hold it: per user (index `user - 1`), a bit
/// per ref of the user's metas; 0 when the user is not listed.
pub(crate) struct OnlineList {
    metas: Vec<u8>,
}

impl OnlineList {
    /// An empty list of users `1..=users`.
    pub(crate) fn new(users: u64) -> Self {
        Self {
            metas: vec![0; users as usize],
        }
    }

    /// `Presence.syncState`: the list becomes `state`.
    fn sync_state(&mut self, state: &Placed) {
        self.metas.fill(0);
        for &(user, bits) in state {
            self.metas[user] |= bits;
        }
    }

    /// `Presence.syncDiff`: the joins' metas are added to their users' (by `phx_ref`), then the leaves'
    /// removed; a user left with none is gone, and a leave of a user not listed changes nothing.
    fn sync_diff(&mut self, joins: &Placed, leaves: &Placed) {
        for &(user, bits) in joins {
            self.metas[user] |= bits;
        }
        for &(user, bits) in leaves {
            self.metas[user] &= !bits;
        }
    }

    /// Users listed.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.metas.iter().filter(|&&m| m != 0).count() as u64
    }

    /// Users online by `online` (per user index) that the list lacks, and users it lists that are not.
    fn differences(&self, online: &[bool]) -> (u64, u64) {
        self.metas
            .iter()
            .zip(online)
            .fold((0, 0), |(missing, excess), (&metas, &online)| {
                match (metas != 0, online) {
                    (false, true) => (missing + 1, excess),
                    (true, false) => (missing, excess + 1),
                    _ => (missing, excess),
                }
            })
    }
}

// ---------------------------------------------------------------------------------------------------------
// What the watchers report

/// What every watcher of a run reports into, and their lists.
pub(crate) struct Watch {
    /// Two diffs on one watcher closer than this are two in one interval.
    early_below_us: u64,
    /// Whether the spacing of diffs is judged now (the measured windows; not while sockets open, where the
    /// tool's own work delays what it reads).
    checking: AtomicBool,
    /// The checked window under way, counted from 1: only two diffs of one window are a gap (between two
    /// windows lie the other target's turns).
    window: AtomicU64,
    lists: Vec<Mutex<OnlineList>>,
    reader: Mutex<Reader>,
    /// How far apart one watcher's diffs arrived, while checking (µs).
    gaps: LatencyHistogram,
    pub(crate) tally: WatchTally,
}

/// The watchers' counters.
#[derive(Default)]
pub(crate) struct WatchTally {
    /// Watchers' initial lists received (a `presence_state`, then for a long list `presence_diff`s that
    /// only join, [`STATE_CHUNK_USERS`] users a frame): how many, their bytes (all, and the largest frame)
    /// and the users they listed.
    pub(crate) states: AtomicU64,
    pub(crate) state_bytes: AtomicU64,
    pub(crate) state_bytes_max: AtomicU64,
    pub(crate) state_users: AtomicU64,
    /// `presence_state`s after a watcher's first (the feed resumed after a suspension).
    pub(crate) later_states: AtomicU64,
    pub(crate) suspended: AtomicU64,
    /// Diffs received, their bytes and the users they name.
    diffs: AtomicU64,
    diff_bytes: AtomicU64,
    diff_joins: AtomicU64,
    diff_leaves: AtomicU64,
    /// Diffs closer than `early_below_us` to the watcher's last one, and the closest two (µs; `u64::MAX`:
    /// none), while checking.
    pub(crate) early_diffs: AtomicU64,
    pub(crate) closest_us: AtomicU64,
    /// Feed frames that could not be read or applied (or a diff before the state).
    pub(crate) malformed: AtomicU64,
    /// Watchers closed by the server, or broken.
    pub(crate) closed: AtomicU64,
}

/// The diffs' counters at one moment; two give what arrived in between.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct DiffCounts {
    pub(crate) diffs: u64,
    pub(crate) bytes: u64,
    pub(crate) joins: u64,
    pub(crate) leaves: u64,
}

impl DiffCounts {
    /// What arrived since `earlier`.
    pub(crate) fn since(self, earlier: Self) -> Self {
        self.each(earlier, |now, then| now - then)
    }

    pub(crate) fn add(self, other: Self) -> Self {
        self.each(other, |a, b| a + b)
    }

    fn each(self, other: Self, f: fn(u64, u64) -> u64) -> Self {
        Self {
            diffs: f(self.diffs, other.diffs),
            bytes: f(self.bytes, other.bytes),
            joins: f(self.joins, other.joins),
            leaves: f(self.leaves, other.leaves),
        }
    }
}

/// How the watchers' lists differ from the users online.
#[derive(Serialize, Clone, Copy, Default, Debug)]
pub(crate) struct ListDifferences {
    pub(crate) watchers_checked: u64,
    pub(crate) watchers_differing: u64,
    /// Over all lists: users online that a list lacks, and users a list names that are not online.
    pub(crate) users_missing: u64,
    pub(crate) users_in_excess: u64,
}

impl Watch {
    /// `watchers` lists of users `1..=users`; diffs closer than `early_below_us` count as early.
    pub(crate) fn new(watchers: u64, users: u64, early_below_us: u64) -> Self {
        Self {
            early_below_us,
            checking: AtomicBool::new(false),
            window: AtomicU64::new(0),
            lists: (0..watchers)
                .map(|_| Mutex::new(OnlineList::new(users)))
                .collect(),
            reader: Mutex::new(Reader::new(users)),
            gaps: LatencyHistogram::new(),
            tally: WatchTally {
                closest_us: AtomicU64::new(u64::MAX),
                ..WatchTally::default()
            },
        }
    }

    /// Frame `text`, carrying `event`, read once for every watcher.
    fn read(&self, event: FeedEvent, text: &str) -> Option<Arc<Parsed>> {
        self.reader
            .lock()
            .expect("no panics under this lock")
            .read(event, text)
    }

    /// From now on the diffs' spacing is judged (`true`: a window starts), or not.
    pub(crate) fn check_spacing(&self, on: bool) {
        if on {
            self.window.fetch_add(1, Ordering::Relaxed);
        }
        self.checking.store(on, Ordering::Relaxed);
    }

    /// The checked window under way (0: none).
    fn checked_window(&self) -> u64 {
        if self.checking.load(Ordering::Relaxed) {
            self.window.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    pub(crate) fn counts(&self) -> DiffCounts {
        let t = &self.tally;
        DiffCounts {
            diffs: t.diffs.load(Ordering::Relaxed),
            bytes: t.diff_bytes.load(Ordering::Relaxed),
            joins: t.diff_joins.load(Ordering::Relaxed),
            leaves: t.diff_leaves.load(Ordering::Relaxed),
        }
    }

    /// How far apart one watcher's diffs arrived while checking.
    pub(crate) fn spacing(&self) -> Latency {
        percentiles(&self.gaps.snapshot())
    }

    /// How the lists of the watchers `opened` (their numbers) differ from `online` (per user index).
    pub(crate) fn differences(&self, opened: &[u64], online: &[bool]) -> ListDifferences {
        let mut found = ListDifferences::default();
        for &w in opened {
            let list = self.lists[w as usize]
                .lock()
                .expect("no panics under this lock");
            let (missing, excess) = list.differences(online);
            found.watchers_checked += 1;
            found.watchers_differing += u64::from(missing + excess > 0);
            found.users_missing += missing;
            found.users_in_excess += excess;
        }
        found
    }
}

/// The feed events a watcher reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FeedEvent {
    State,
    Diff,
    Suspended,
}

/// The feed event a frame carries; `None` for any other frame (a delivery, a reply).
fn feed_event(text: &str) -> Option<FeedEvent> {
    let (event, _) = text.strip_prefix(FEED_HEAD)?.split_once('"')?;
    match event {
        EVENT_STATE => Some(FeedEvent::State),
        EVENT_DIFF => Some(FeedEvent::Diff),
        EVENT_SUSPENDED => Some(FeedEvent::Suspended),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Watchers

/// One watcher's socket, between frames.
pub(crate) struct Watcher {
    /// The socket's index among the users' (user `i + 1`), for its deliveries.
    i: u64,
    /// Its number among the watchers: its list in [`Watch`].
    w: usize,
    watch: Arc<Watch>,
    stats: Arc<Stats>,
    has_state: bool,
    /// The initial list's last frame was full: the next diff, if it only joins, continues the list.
    list_continues: bool,
    /// When its last diff arrived ([`now_us`]), in which checked window (0: none).
    last_diff: Option<(u64, u64)>,
}

impl Watcher {
    fn on_frame(&mut self, text: &str) {
        match feed_event(text) {
            None => phoenix::Session::on_frame(text, self.i, &self.stats),
            Some(FeedEvent::State) => self.on_state(text),
            Some(FeedEvent::Diff) => self.on_diff(text),
            Some(FeedEvent::Suspended) => {
                self.watch.tally.suspended.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, OnlineList> {
        self.watch.lists[self.w]
            .lock()
            .expect("no panics under this lock")
    }

    fn malformed(&self) {
        self.watch.tally.malformed.fetch_add(1, Ordering::Relaxed);
    }

    fn on_state(&mut self, text: &str) {
        let parsed = self.watch.read(FeedEvent::State, text);
        let Some(Parsed::State(state)) = parsed.as_deref() else {
            self.malformed();
            return;
        };
        self.list().sync_state(state);
        self.list_continues = state.len() == STATE_CHUNK_USERS;
        let t = &self.watch.tally;
        if self.has_state {
            t.later_states.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.has_state = true;
        t.states.fetch_add(1, Ordering::Relaxed);
        self.count_initial(text, state.len());
    }

    /// One frame of the watcher's initial list.
    fn count_initial(&self, text: &str, users: usize) {
        let t = &self.watch.tally;
        let bytes = text.len() as u64;
        t.state_bytes.fetch_add(bytes, Ordering::Relaxed);
        t.state_bytes_max.fetch_max(bytes, Ordering::Relaxed);
        t.state_users.fetch_add(users as u64, Ordering::Relaxed);
    }

    fn on_diff(&mut self, text: &str) {
        let now = now_us();
        let parsed = self.watch.read(FeedEvent::Diff, text);
        let Some(Parsed::Diff { joins, leaves }) = parsed.as_deref() else {
            self.malformed();
            return;
        };
        // The gateway promises the state before any diff.
        if self.has_state {
            self.list().sync_diff(joins, leaves);
        } else {
            self.malformed();
        }
        if self.list_continues && leaves.is_empty() {
            // The rest of a long initial list: counted with it, not as the feed's diffs.
            self.list_continues = joins.len() == STATE_CHUNK_USERS;
            self.count_initial(text, joins.len());
            return;
        }
        self.list_continues = false;
        let t = &self.watch.tally;
        t.diffs.fetch_add(1, Ordering::Relaxed);
        t.diff_bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        t.diff_joins
            .fetch_add(joins.len() as u64, Ordering::Relaxed);
        t.diff_leaves
            .fetch_add(leaves.len() as u64, Ordering::Relaxed);
        let window = self.watch.checked_window();
        if let Some((last, last_window)) = self.last_diff
            && window > 0
            && window == last_window
        {
            let gap = now.saturating_sub(last);
            self.watch.gaps.record(gap);
            t.closest_us.fetch_min(gap, Ordering::Relaxed);
            if gap < self.watch.early_below_us {
                t.early_diffs.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last_diff = Some((now, window));
    }

    fn closed(&self, code: u16) {
        self.stats.closed(code);
        self.watch.tally.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The socket of user `i + 1` to the gateway at `endpoint`, from the source address of socket `i`, not
/// joined to anything yet.
async fn connect(endpoint: &Endpoint, i: u64) -> Result<Ws> {
    let stream = tcp_connect(endpoint.addr, i).await?;
    let query = phoenix::token_query(&endpoint.auth, i + 1);
    Ok(phoenix::connect(stream, endpoint.addr, &query)
        .await?
        .into_inner())
}

/// Opens socket `i` as watcher `w`: its three joins pipelined as phoenix.js writes them, `user:public`
/// asking for the feed when `feed`; open once every join is answered ok and, with the feed, its
/// `presence_state` has arrived (recorded as the watcher's initial state).
pub(crate) async fn open_watcher(
    endpoint: &Endpoint,
    i: u64,
    w: usize,
    feed: bool,
    watch: Arc<Watch>,
    stats: Arc<Stats>,
) -> Result<(Ws, Watcher)> {
    let mut ws = connect(endpoint, i).await?;
    let own = format!("user:{}", i + 1);
    let public = if feed {
        json!({ PARAM_PRESENCE: true })
    } else {
        json!({})
    };
    let joins = [
        (FEED_TOPIC, public),
        ("user:role", json!({})),
        (own.as_str(), json!({})),
    ];
    for (n, (topic, payload)) in joins.iter().enumerate() {
        let r = (n + 1).to_string();
        let frame = json!([r, r, topic, "phx_join", payload]).to_string();
        ws.feed(Message::text(frame)).await?;
    }
    ws.flush().await?;
    let mut watcher = Watcher {
        i,
        w,
        watch,
        stats,
        has_state: false,
        list_continues: false,
        last_diff: None,
    };
    let mut answered = 0;
    while answered < joins.len() || (feed && !watcher.has_state) {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"phx_reply\"") => {
                let reply: Value = serde_json::from_str(&text)?;
                ensure!(reply[4]["status"] == "ok", "join refused: {reply}");
                answered += 1;
            }
            Some(Ok(Message::Text(text))) => watcher.on_frame(&text),
            Some(Ok(Message::Close(close))) => bail!("closed while joining: {close:?}"),
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error.into()),
            None => bail!("closed while joining"),
        }
    }
    Ok((ws, watcher))
}

/// Holds a watcher opened by [`open_watcher`] until `stop`: its feed frames go to its list and the
/// watchers' figures, its deliveries to [`Stats`]; heartbeats as phoenix.js sends them.
pub(crate) async fn hold_watcher((mut ws, mut watcher): (Ws, Watcher), stop: CancellationToken) {
    let mut session = phoenix::Session::default();
    let mut heartbeat = heartbeat_timer(&mut Rng::seeded(SOCKET_SEED ^ watcher.i));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = heartbeat.tick() => {
                if ws.send(session.heartbeat()).await.is_err() {
                    watcher.closed(0);
                    return;
                }
            }
            message = ws.next() => match message_or_end(message) {
                Ok(Message::Text(text)) => watcher.on_frame(&text),
                Ok(_) => {}
                Err(code) => {
                    watcher.closed(code);
                    return;
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The churn pool

/// The churn pool: per socket, whether its user should be online and whether the gateway has said so.
pub(crate) struct Pool {
    want: Vec<AtomicBool>,
    wake: Vec<Notify>,
    /// The socket's last join (true) or leave (false) answered ok.
    online: Vec<AtomicBool>,
    /// Joins and leaves answered ok, and refused.
    pub(crate) joins: AtomicU64,
    pub(crate) leaves: AtomicU64,
    pub(crate) refused: AtomicU64,
}

impl Pool {
    pub(crate) fn new(sockets: u64) -> Self {
        let flags = || (0..sockets).map(|_| AtomicBool::new(false)).collect();
        Self {
            want: flags(),
            wake: (0..sockets).map(|_| Notify::new()).collect(),
            online: flags(),
            joins: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Socket `k`'s user is to come online (`true`: a join) or go offline (a leave).
    pub(crate) fn set(&self, k: usize, online: bool) {
        self.want[k].store(online, Ordering::Relaxed);
        self.wake[k].notify_one();
    }

    /// Whether the gateway answered socket `k`'s last join (and no leave since).
    pub(crate) fn is_online(&self, k: usize) -> bool {
        self.online[k].load(Ordering::Relaxed)
    }

    /// Whether every join and leave asked for has been answered.
    pub(crate) fn settled(&self) -> bool {
        self.want
            .iter()
            .zip(&self.online)
            .all(|(want, online)| want.load(Ordering::Relaxed) == online.load(Ordering::Relaxed))
    }
}

/// Opens socket `i` of the pool (user `i + 1`), joined to nothing.
pub(crate) async fn open_churner(endpoint: &Endpoint, i: u64) -> Result<Ws> {
    connect(endpoint, i).await
}

/// A churner's join or leave awaiting its reply.
struct Pending {
    msg_ref: String,
    join: bool,
}

/// Holds pool socket `k` (socket `i`) until `stop`: joins `user:public` or leaves it whenever the pool
/// says, and records the answers; heartbeats as phoenix.js sends them.
pub(crate) async fn hold_churner(
    mut ws: Ws,
    k: usize,
    i: u64,
    pool: Arc<Pool>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut session = phoenix::Session::default();
    let mut heartbeat = heartbeat_timer(&mut Rng::seeded(SOCKET_SEED ^ i));
    let mut refs = 0u64;
    // The ref of the join under way or done, until its leave.
    let mut joined: Option<String> = None;
    let mut pending: Option<Pending> = None;
    loop {
        let sent = tokio::select! {
            () = stop.cancelled() => return,
            _ = heartbeat.tick() => ws.send(session.heartbeat()).await,
            () = pool.wake[k].notified() => {
                let want = pool.want[k].load(Ordering::Relaxed);
                refs += 1;
                let msg_ref = format!("{CHURN_REF}{refs}");
                let frame = match (&joined, want) {
                    (None, true) => {
                        joined = Some(msg_ref.clone());
                        json!([msg_ref, msg_ref, FEED_TOPIC, "phx_join", {}])
                    }
                    (Some(join_ref), false) => {
                        let frame = json!([join_ref, msg_ref, FEED_TOPIC, "phx_leave", {}]);
                        joined = None;
                        frame
                    }
                    _ => continue,
                };
                pending = Some(Pending { msg_ref, join: want });
                ws.send(Message::text(frame.to_string())).await
            }
            message = ws.next() => match message_or_end(message) {
                Ok(Message::Text(text)) => {
                    if let Some(p) = pending.take_if(|p| is_reply_to(&text, &p.msg_ref)) {
                        on_churn_reply(&text, &p, k, &pool);
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(code) => {
                    stats.closed(code);
                    return;
                }
            },
        };
        if sent.is_err() {
            stats.closed(0);
            return;
        }
    }
}

/// Whether `text` is the reply to the frame with ref `msg_ref`: `[join_ref,"<msg_ref>",…,"phx_reply",…]`.
fn is_reply_to(text: &str, msg_ref: &str) -> bool {
    text.contains("\"phx_reply\"") && text.contains(&format!(",\"{msg_ref}\","))
}

fn on_churn_reply(text: &str, pending: &Pending, k: usize, pool: &Pool) {
    let ok = serde_json::from_str::<Value>(text).is_ok_and(|reply| reply[4]["status"] == "ok");
    if !ok {
        pool.refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    pool.online[k].store(pending.join, Ordering::Relaxed);
    let counter = if pending.join {
        &pool.joins
    } else {
        &pool.leaves
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presences(value: Value) -> Presences {
        serde_json::from_value(value).unwrap()
    }

    fn diff_of(value: Value) -> Diff {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn feed_frames_are_told_from_deliveries() {
        assert_eq!(FEED_HEAD, format!("[null,null,\"{FEED_TOPIC}\",\""));
        let state = format!("{FEED_HEAD}{EVENT_STATE}\",{{}}]");
        assert_eq!(feed_event(&state), Some(FeedEvent::State));
        let diff = format!("{FEED_HEAD}{EVENT_DIFF}\",{{\"joins\":{{}},\"leaves\":{{}}}}]");
        assert_eq!(feed_event(&diff), Some(FeedEvent::Diff));
        assert_eq!(
            feed_event(&format!("{FEED_HEAD}announcement\",{{}}]")),
            None
        );
        assert_eq!(
            feed_event("[null,null,\"user:7\",\"presence_diff\",{}]"),
            None
        );
    }

    /// `state`, then each of `diffs`, read and applied to a list of users `1..=users`.
    fn list_after(users: u64, state: Value, diffs: &[Value]) -> Option<OnlineList> {
        let mut reader = Reader::new(users);
        let mut list = OnlineList::new(users);
        list.sync_state(&reader.place(&presences(state))?);
        for diff in diffs {
            let diff = diff_of(diff.clone());
            list.sync_diff(&reader.place(&diff.joins)?, &reader.place(&diff.leaves)?);
        }
        Some(list)
    }

    #[test]
    fn a_list_follows_state_and_diffs_as_phoenix_presence_does() {
        let a = json!({"metas": [{"phx_ref": "a"}]});
        let b = json!({"metas": [{"phx_ref": "b"}]});
        // User 3 joins on two instances, then leaves one: still listed. User 1 leaves; user 9 was never
        // listed, its leave changes nothing.
        let diffs = [
            json!({"joins": {"3": a}, "leaves": {"1": a, "9": a}}),
            json!({"joins": {"3": b}, "leaves": {}}),
            json!({"joins": {}, "leaves": {"3": a}}),
        ];
        let list = list_after(10, json!({"1": a, "2": a}), &diffs).unwrap();
        let mut online = vec![false; 10];
        online[1] = true;
        online[2] = true;
        assert_eq!(list.differences(&online), (0, 0));
        online[4] = true;
        online[1] = false;
        assert_eq!(list.differences(&online), (1, 1));
        // A fresh state replaces the list.
        let fresh = list_after(10, json!({"5": b}), &[]).unwrap();
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn a_frame_is_read_once_and_what_no_list_can_take_is_refused() {
        let mut reader = Reader::new(3);
        let a = json!({"metas": [{"phx_ref": "a"}]});
        for user in ["4", "0", "x"] {
            assert!(
                reader.place(&presences(json!({user: a}))).is_none(),
                "{user}"
            );
        }
        let many: Vec<Value> = (0..=MOST_REFS)
            .map(|n| json!({"phx_ref": n.to_string()}))
            .collect();
        assert!(
            reader
                .place(&presences(json!({"1": {"metas": many}})))
                .is_none()
        );
        // The refs the last one named are taken: a reader of its own.
        let mut reader = Reader::new(3);
        let frame =
            format!("{FEED_HEAD}{EVENT_DIFF}\",{{\"joins\":{{\"2\":{a}}},\"leaves\":{{}}}}]");
        let first = reader.read(FeedEvent::Diff, &frame).unwrap();
        let again = reader.read(FeedEvent::Diff, &frame).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(matches!(&*first, Parsed::Diff { joins, .. } if joins == &[(1, 1)]));
        assert!(reader.read(FeedEvent::Diff, "[null,null]").is_none());
    }

    #[test]
    fn a_churners_reply_is_found_by_its_ref() {
        let reply = r#"["c1","c2","user:public","phx_reply",{"status":"ok","response":{}}]"#;
        assert!(is_reply_to(reply, "c2"));
        assert!(!is_reply_to(reply, "c1"));
        assert!(!is_reply_to(
            r#"["c1","c1","user:public","phx_close",{}]"#,
            "c1"
        ));
    }
}
