//! The delivery library against a real nats-server: the event stream's settings and epoch, what its
//! republished copies carry, reads of stored ranges (also across a server restart on its store), and the
//! recovery decision on real trimming and expiry.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::Context};
use bytes::Bytes;
use epoch_gateway::delivery::position::{Epoch, Position};
use epoch_gateway::delivery::reader::{self, ReadError, ReadRequest, StoredMessage, Until};
use epoch_gateway::delivery::recovery::{self, Facts, Reason, Recover};
use epoch_gateway::delivery::stream::{self, Outcome, Stored, StreamSpec};
use futures::StreamExt;

use epoch_testkit::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Deadline of a read in these tests: every read here is answered in milliseconds by a healthy server.
const READ_DEADLINE: Duration = Duration::from_secs(5);

fn spec(prefix: &str) -> StreamSpec {
    StreamSpec {
        name: unique("events_"),
        ..StreamSpec::new(prefix)
    }
}

/// A JetStream context whose requests give up after 1 s, so retries start soon after a server comes back.
fn context(client: async_nats::Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client)
}

async fn publish(js: &Context, subject: &str, body: &str) -> u64 {
    js.publish(subject.to_owned(), Bytes::from(body.to_owned()))
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

fn traced() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", TRACEPARENT);
    headers
}

fn seqs(events: &[StoredMessage]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

async fn read(js: &Context, request: ReadRequest) -> Result<Vec<StoredMessage>, ReadError> {
    reader::read(js, &request.deadline(READ_DEADLINE)).await
}

#[tokio::test]
async fn ensure_creates_then_keeps_then_updates_and_a_recreated_stream_has_a_new_epoch() {
    let nats = Nats::start();
    let js = context(nats.client().await);
    let prefix = unique("t");
    let spec = spec(&prefix);

    let created = stream::ensure(&js, &spec).await.unwrap();
    assert_eq!(created.outcome, Outcome::Created);
    let config = &created.info.config;
    assert_eq!(config.subjects, [format!("{prefix}.user.>")]);
    assert_eq!(config.max_age, Duration::from_secs(300));
    assert_eq!(config.max_messages_per_subject, 100);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    assert!(config.allow_direct);
    let republish = config.republish.as_ref().expect("republish is set");
    assert_eq!(republish.destination, format!("{prefix}.delivery.user.>"));
    assert!(!republish.headers_only);
    assert!(created.epoch.as_str().starts_with('e'));

    let again = stream::ensure(&js, &spec).await.unwrap();
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(again.epoch, created.epoch);

    let changed = StreamSpec {
        history: Duration::from_secs(60),
        per_topic: 7,
        ..spec.clone()
    };
    let updated = stream::ensure(&js, &changed).await.unwrap();
    assert_eq!(updated.outcome, Outcome::Updated);
    assert_eq!(updated.info.config.max_age, Duration::from_secs(60));
    assert_eq!(updated.info.config.max_messages_per_subject, 7);
    assert_eq!(
        updated.info.config.duplicate_window,
        Duration::from_secs(60)
    );
    assert_eq!(updated.epoch, created.epoch, "an update keeps the epoch");
    assert_eq!(
        stream::ensure(&js, &changed).await.unwrap().outcome,
        Outcome::Unchanged
    );

    // An operator changed the stream by hand: ensure puts the spec's settings back.
    let mut tampered = updated.info.config.clone();
    tampered.allow_direct = false;
    tampered.republish = None;
    js.update_stream(&tampered).await.unwrap();
    let restored = stream::ensure(&js, &changed).await.unwrap();
    assert_eq!(restored.outcome, Outcome::Updated);
    assert!(restored.info.config.allow_direct);
    assert!(restored.info.config.republish.is_some());

    let state = reader::stream_state(&js, &spec.name).await.unwrap();
    assert_eq!(state.epoch, created.epoch);

    js.delete_stream(&spec.name).await.unwrap();
    assert!(matches!(
        reader::stream_state(&js, &spec.name).await,
        Err(reader::StateError::StreamGone { .. })
    ));
    let recreated = stream::ensure(&js, &spec).await.unwrap();
    assert_eq!(recreated.outcome, Outcome::Created);
    assert_ne!(recreated.epoch, created.epoch, "a new stream, a new epoch");
    assert_eq!(
        reader::stream_state(&js, &spec.name).await.unwrap().epoch,
        recreated.epoch
    );
}

#[tokio::test]
async fn instances_starting_together_agree_on_one_stream() {
    let nats = Nats::start();
    let spec = spec(&unique("t"));
    let mut contexts = Vec::new();
    for _ in 0..4 {
        contexts.push(context(nats.client().await));
    }
    let ensured =
        futures::future::join_all(contexts.iter().map(|js| stream::ensure(js, &spec))).await;
    let ensured: Vec<_> = ensured.into_iter().map(Result::unwrap).collect();
    assert!(ensured.iter().any(|e| e.outcome == Outcome::Created));
    assert!(ensured.iter().all(|e| e.epoch == ensured[0].epoch));
}

#[tokio::test]
async fn each_stored_event_is_republished_once_with_its_metadata_and_the_publishers_headers() {
    let nats = Nats::start();
    let client = nats.client().await;
    let js = context(client.clone());
    let prefix = unique("t");
    let spec = spec(&prefix);
    stream::ensure(&js, &spec).await.unwrap();
    let mut republished = client.subscribe(spec.republish_subjects()).await.unwrap();
    client.flush().await.unwrap();
    let user = stream::stored_subject(&prefix, "42");
    let public = stream::stored_subject(&prefix, "public");

    // A core publish, stored without an ack.
    client
        .publish_with_headers(user.clone(), traced(), Bytes::from_static(b"core"))
        .await
        .unwrap();
    // An acked publish whose publisher retries twice with the same id: stored once.
    let mut acks = Vec::new();
    for _ in 0..3 {
        let mut headers = traced();
        headers.insert("Nats-Msg-Id", "event-1");
        let ack = js
            .publish_with_headers(user.clone(), headers, Bytes::from_static(b"acked"))
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push(ack);
    }
    assert_eq!(
        acks.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        [2, 2, 2]
    );
    assert_eq!(
        acks.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
        [false, true, true]
    );
    publish(&js, &public, "public").await;
    publish(&js, &user, "third").await;
    // Nothing else arrives before this marker, published last.
    publish(&js, &public, "marker").await;

    let mut received = Vec::new();
    while received.len() < 5 {
        let message = tokio::time::timeout(WAIT, republished.next())
            .await
            .expect("republished copy arrives")
            .unwrap();
        received.push(message);
    }
    let stored: Vec<Stored> = received
        .iter()
        .map(|m| Stored::from_headers(m.headers.as_ref()).unwrap())
        .collect();
    let summary: Vec<_> = stored
        .iter()
        .zip(&received)
        .map(|(s, m)| {
            (
                s.seq,
                s.last_on_subject,
                s.subject.as_str(),
                m.payload.as_ref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, None, user.as_str(), &b"core"[..]),
            (2, Some(1), user.as_str(), b"acked"),
            (3, None, public.as_str(), b"public"),
            (4, Some(2), user.as_str(), b"third"),
            (5, Some(3), public.as_str(), b"marker"),
        ]
    );
    for (message, stored) in received.iter().zip(&stored) {
        let token = stream::token_of(&prefix, &stored.subject).unwrap();
        assert_eq!(
            message.subject.as_str(),
            stream::republish_subject(&prefix, token)
        );
        assert_eq!(
            stream::stream_of(message.headers.as_ref()),
            Some(spec.name.as_str())
        );
    }
    let header = |i: usize, name: &str| {
        received[i]
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    assert_eq!(header(0, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header(1, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header(1, "Nats-Msg-Id").as_deref(), Some("event-1"));
    assert_eq!(header(2, "traceparent"), None);
    // What the server sends for a subject's first event.
    assert_eq!(header(0, "Nats-Last-Sequence").as_deref(), Some("0"));
    let now = std::time::SystemTime::now();
    for s in &stored {
        let age = now.duration_since(s.time).unwrap_or_default();
        assert!(age < Duration::from_secs(60), "stored time {:?}", s.time);
    }

    let state = reader::stream_state(&js, &spec.name).await.unwrap();
    assert_eq!((state.first_seq, state.last_seq), (1, 5));
}

/// A stream with ten events alternating between two users: 1, 3, 5, 7, 9 on `a`, 2, 4, 6, 8, 10 on `b`.
async fn alternating(js: &Context) -> (StreamSpec, String, String) {
    let prefix = unique("t");
    let spec = spec(&prefix);
    stream::ensure(js, &spec).await.unwrap();
    let (a, b) = (
        stream::stored_subject(&prefix, "1"),
        stream::stored_subject(&prefix, "2"),
    );
    for i in 1..=10u64 {
        let subject = if i % 2 == 1 { &a } else { &b };
        let ack = js
            .publish_with_headers(subject.clone(), traced(), Bytes::from(format!("event {i}")))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, i);
    }
    (spec, a, b)
}

#[tokio::test]
async fn reads_return_exactly_the_range_in_order() {
    let nats = Nats::start();
    let js = context(nats.client().await);
    let (spec, a, b) = alternating(&js).await;
    let name = spec.name.as_str();

    let head = read(&js, ReadRequest::new(name, &a, 0, Until::Head))
        .await
        .unwrap();
    assert_eq!(seqs(&head), [1, 3, 5, 7, 9]);
    assert_eq!(head[2].payload, "event 5");
    assert_eq!(head[2].subject, a);
    let traceparent = head[2].headers.as_ref().and_then(|h| h.get("traceparent"));
    assert_eq!(traceparent.map(|v| v.as_str()), Some(TRACEPARENT));

    let cases = [
        (&a, 3, Until::Head, vec![5, 7, 9]),
        (&a, 2, Until::Head, vec![3, 5, 7, 9]),
        (&a, 9, Until::Head, vec![]),
        (&a, 1, Until::Seq(5), vec![3, 5]),
        // A target that is not an event of the subject: up to it, not beyond.
        (&a, 1, Until::Seq(6), vec![3, 5]),
        (&a, 1, Until::Seq(10), vec![3, 5, 7, 9]),
        (&a, 5, Until::Seq(5), vec![]),
        (&b, 0, Until::Head, vec![2, 4, 6, 8, 10]),
        (&b, 0, Until::Seq(3), vec![2]),
    ];
    for (subject, after, until, expected) in cases {
        let events = read(&js, ReadRequest::new(name, subject, after, until))
            .await
            .unwrap();
        assert_eq!(seqs(&events), expected, "{subject} after {after} {until:?}");
    }

    let every = spec.subjects();
    let all = read(&js, ReadRequest::new(name, &every, 4, Until::Head))
        .await
        .unwrap();
    assert_eq!(seqs(&all), [5, 6, 7, 8, 9, 10]);
    let all = read(&js, ReadRequest::new(name, &every, 4, Until::Seq(7)))
        .await
        .unwrap();
    assert_eq!(seqs(&all), [5, 6, 7]);

    let nobody = stream::stored_subject(&spec.subject_prefix, "3");
    let none = read(&js, ReadRequest::new(name, &nobody, 0, Until::Head))
        .await
        .unwrap();
    assert!(none.is_empty());
    let none = read(&js, ReadRequest::new(name, &nobody, 0, Until::Seq(10)))
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn reads_refuse_more_than_their_cap_and_other_streams() {
    let nats = Nats::start();
    let js = context(nats.client().await);
    let (spec, a, _) = alternating(&js).await;
    let name = spec.name.as_str();

    let capped = read(&js, ReadRequest::new(name, &a, 0, Until::Head).max(4)).await;
    assert!(
        matches!(
            capped,
            Err(ReadError::Exceeded {
                max: 4,
                at_least: 5
            })
        ),
        "{capped:?}"
    );
    let exact = read(&js, ReadRequest::new(name, &a, 0, Until::Head).max(5))
        .await
        .unwrap();
    assert_eq!(exact.len(), 5);
    let capped = read(&js, ReadRequest::new(name, &a, 0, Until::Seq(7)).max(3)).await;
    assert!(
        matches!(capped, Err(ReadError::Exceeded { max: 3, .. })),
        "{capped:?}"
    );
    let within = read(&js, ReadRequest::new(name, &a, 0, Until::Seq(5)).max(3))
        .await
        .unwrap();
    assert_eq!(seqs(&within), [1, 3, 5]);

    let epoch = reader::stream_state(&js, name).await.unwrap().epoch;
    let same = read(&js, ReadRequest::new(name, &a, 7, Until::Head).epoch(epoch))
        .await
        .unwrap();
    assert_eq!(seqs(&same), [9]);
    let other = Epoch::parse("e0").unwrap();
    let recreated = read(&js, ReadRequest::new(name, &a, 7, Until::Head).epoch(other)).await;
    assert!(
        matches!(recreated, Err(ReadError::Recreated { .. })),
        "{recreated:?}"
    );
    let counted = reader::count_after(&js, "no_such_stream", &a, 0, READ_DEADLINE).await;
    assert!(
        matches!(counted, Err(ReadError::StreamGone { .. })),
        "{counted:?}"
    );
    let gone = read(&js, ReadRequest::new("no_such_stream", &a, 0, Until::Head)).await;
    assert!(
        matches!(gone, Err(ReadError::StreamGone { .. })),
        "{gone:?}"
    );
}

#[tokio::test]
async fn a_read_waits_for_its_target_instead_of_ending_short() {
    let nats = Nats::start();
    let js = context(nats.client().await);
    let (spec, a, b) = alternating(&js).await;

    // Event 12 on `a` is promised (a live event said so) but not stored yet.
    let pending = tokio::spawn({
        let (js, name, a) = (js.clone(), spec.name.clone(), a.clone());
        async move { read(&js, ReadRequest::new(&name, &a, 9, Until::Seq(12))).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "the read ended before its target");
    publish(&js, &b, "event 11").await;
    publish(&js, &a, "event 12").await;
    let events = tokio::time::timeout(WAIT, pending)
        .await
        .expect("the read ends once its target is stored")
        .unwrap()
        .unwrap();
    assert_eq!(seqs(&events), [12]);

    // A target that never comes: the read fails, it does not return what it has.
    let never = reader::read(
        &js,
        &ReadRequest::new(&spec.name, &a, 9, Until::Seq(99)).deadline(Duration::from_millis(700)),
    )
    .await;
    assert!(
        matches!(never, Err(ReadError::Timeout { reached: 12, .. })),
        "{never:?}"
    );
}

/// A nats-server on a fixed port and store directory that can be killed and started again on both.
struct RestartableNats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    _store: tempfile::TempDir,
}

impl RestartableNats {
    fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        let mut server = Self {
            child: None,
            port: free_port(),
            dir: store.path().to_owned(),
            _store: store,
        };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn_nats(self.port, &self.dir));
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not restart");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RestartableNats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_nats(port: u16, dir: &Path) -> Child {
    Command::new(nats_server_bin())
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts")
}

#[tokio::test]
async fn reads_ride_out_a_server_restart_on_its_store() {
    let mut nats = RestartableNats::start();
    let js = context(async_nats::connect(nats.url()).await.unwrap());
    let (spec, a, _) = alternating(&js).await;
    let epoch = reader::stream_state(&js, &spec.name).await.unwrap().epoch;

    nats.kill();
    let head = tokio::spawn({
        let (js, name, a) = (js.clone(), spec.name.clone(), a.clone());
        async move { reader::read(&js, &ReadRequest::new(&name, &a, 1, Until::Head)).await }
    });
    let up_to = tokio::spawn({
        let (js, name, every) = (js.clone(), spec.name.clone(), spec.subjects());
        async move { reader::read(&js, &ReadRequest::new(&name, &every, 0, Until::Seq(10))).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!head.is_finished() && !up_to.is_finished());
    nats.restart();

    let head = head.await.unwrap().unwrap();
    assert_eq!(seqs(&head), [3, 5, 7, 9]);
    let up_to = up_to.await.unwrap().unwrap();
    assert_eq!(seqs(&up_to), (1..=10).collect::<Vec<_>>());
    let state = reader::stream_state(&js, &spec.name).await.unwrap();
    assert_eq!(
        state.epoch, epoch,
        "a restart on the same store keeps the epoch"
    );
    assert_eq!(state.last_seq, 10);
}

/// The recovery decision for `since` on `subject`, from the stream's facts as they are now.
async fn decide(js: &Context, spec: &StreamSpec, subject: &str, since: u64) -> Recover {
    let state = reader::stream_state(js, &spec.name).await.unwrap();
    let count = reader::count_after(js, &spec.name, subject, since, READ_DEADLINE)
        .await
        .unwrap();
    let position = Position::new(state.epoch.clone(), since);
    recovery::decide(&Facts {
        since: Ok(&position),
        epoch: &state.epoch,
        first_seq: state.first_seq,
        last_seq: state.last_seq,
        count,
        per_topic: spec.per_topic as u64,
        max_recover: 1000,
    })
}

#[tokio::test]
async fn a_topic_trimmed_past_since_is_not_recovered() {
    let nats = Nats::start();
    let js = context(nats.client().await);
    let prefix = unique("t");
    let spec = StreamSpec {
        per_topic: 5,
        ..spec(&prefix)
    };
    stream::ensure(&js, &spec).await.unwrap();
    let (a, b) = (
        stream::stored_subject(&prefix, "1"),
        stream::stored_subject(&prefix, "2"),
    );
    // `b` first, so the stream as a whole keeps starting at 1 and only the count can tell a trim.
    publish(&js, &b, "b1").await;
    for i in 2..=4 {
        publish(&js, &a, &format!("a{i}")).await;
    }
    assert_eq!(
        decide(&js, &spec, &a, 2).await,
        Recover::Replay { since: 2 }
    );
    assert_eq!(
        reader::count_after(&js, &spec.name, &a, 2, READ_DEADLINE)
            .await
            .unwrap(),
        2
    );

    // Ten more on `a` (5..=14): the subject keeps only 10..=14, so events 3..=9 after `since` 2 are gone.
    for i in 5..=14 {
        publish(&js, &a, &format!("a{i}")).await;
    }
    let kept = read(&js, ReadRequest::new(&spec.name, &a, 0, Until::Head))
        .await
        .unwrap();
    assert_eq!(seqs(&kept), [10, 11, 12, 13, 14]);
    assert_eq!(
        reader::stream_state(&js, &spec.name)
            .await
            .unwrap()
            .first_seq,
        1
    );
    assert_eq!(
        decide(&js, &spec, &a, 2).await,
        Recover::Refuse(Reason::Trimmed)
    );
    // Nothing after 9 was trimmed, but a full subject cannot prove it.
    assert_eq!(
        decide(&js, &spec, &a, 9).await,
        Recover::Refuse(Reason::Trimmed)
    );
    // After event 10, four of the topic's events remain, fewer than the limit: all of them are stored.
    assert_eq!(
        decide(&js, &spec, &a, 10).await,
        Recover::Replay { since: 10 }
    );
    assert_eq!(
        decide(&js, &spec, &a, 14).await,
        Recover::Replay { since: 14 }
    );
    assert_eq!(
        decide(&js, &spec, &a, 15).await,
        Recover::Refuse(Reason::FromTheFuture)
    );
}

#[tokio::test]
async fn events_aged_out_after_since_are_not_recovered() {
    let nats = Nats::start();
    let js = context(nats.client().await);
    let prefix = unique("t");
    let spec = StreamSpec {
        history: Duration::from_secs(1),
        ..spec(&prefix)
    };
    stream::ensure(&js, &spec).await.unwrap();
    let (a, b) = (
        stream::stored_subject(&prefix, "1"),
        stream::stored_subject(&prefix, "2"),
    );
    publish(&js, &a, "a1").await;
    publish(&js, &a, "a2").await;
    assert_eq!(
        decide(&js, &spec, &a, 1).await,
        Recover::Replay { since: 1 }
    );

    let deadline = Instant::now() + WAIT;
    while reader::stream_state(&js, &spec.name)
        .await
        .unwrap()
        .first_seq
        <= 2
    {
        assert!(Instant::now() < deadline, "events did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish(&js, &b, "b3").await;
    assert_eq!(
        decide(&js, &spec, &a, 1).await,
        Recover::Refuse(Reason::Expired)
    );
    // Nothing of `a` after 2 ever existed, so a client at 2 misses nothing.
    assert_eq!(
        decide(&js, &spec, &a, 2).await,
        Recover::Replay { since: 2 }
    );
}

#[tokio::test]
async fn reads_after_the_stream_leader_is_killed_miss_nothing() {
    let mut cluster = Cluster::start();
    let prefix = unique("t");
    let spec = StreamSpec {
        replicas: 3,
        ..spec(&prefix)
    };
    // A freshly started cluster elects its meta leader first.
    let setup = context(async_nats::connect(&cluster.urls[0]).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let ensured = loop {
        match stream::ensure(&setup, &spec).await {
            Ok(ensured) => break ensured,
            Err(err) => assert!(Instant::now() < deadline, "no event stream: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let leader = ensured
        .info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("an R3 stream has a leader");
    let leader = ["epoch-a", "epoch-b", "epoch-c"]
        .iter()
        .position(|name| *name == leader)
        .expect("the leader is a node of the cluster");
    let survivor = (leader + 1) % 3;
    let js = context(async_nats::connect(&cluster.urls[survivor]).await.unwrap());
    let (a, b) = (
        stream::stored_subject(&prefix, "1"),
        stream::stored_subject(&prefix, "2"),
    );
    for i in 1..=40u64 {
        let subject = if i % 2 == 1 { &a } else { &b };
        assert_eq!(publish(&js, subject, &format!("event {i}")).await, i);
    }

    cluster.kill(leader);
    // Long enough for an election (nats-server picks its timeouts between 4 and 9 s) and a failed round.
    let after_kill = |request: ReadRequest| request.deadline(Duration::from_secs(25));
    let odd = after_kill(ReadRequest::new(&spec.name, &a, 0, Until::Head));
    let every = after_kill(ReadRequest::new(
        &spec.name,
        &spec.subjects(),
        10,
        Until::Seq(40),
    ));
    let (odd, every) = tokio::join!(reader::read(&js, &odd), reader::read(&js, &every));
    assert_eq!(seqs(&odd.unwrap()), (1..=40).step_by(2).collect::<Vec<_>>());
    assert_eq!(seqs(&every.unwrap()), (11..=40).collect::<Vec<_>>());
    let state = reader::stream_state(&js, &spec.name).await.unwrap();
    assert_eq!(
        state.epoch, ensured.epoch,
        "the new leader reports the same epoch"
    );
    assert_eq!(state.last_seq, 40);
}

/// A `disconnect` and a `logout` published while the gateway is cut off from NATS (stored by the stream on
/// a server that came back on its store, before the gateway reconnected) still take effect once it has
/// caught up: the sockets are closed and the token is refused.
#[tokio::test]
async fn side_effects_caught_up_after_an_outage_take_effect() {
    let mut server = RestartableNats::start();
    let gw = Gateway::start(&server.url()).await;
    let logout_token = mint(&serde_json::json!({
        "sub": "9", "jti": "3b7d1f4e-0000-4000-8000-000000000009", "exp": now() + 600
    }));
    let mut logged_out =
        PhxClient::connect(&gw.socket_url(&format!("token={logout_token}&vsn=2.0.0")))
            .await
            .unwrap();
    logged_out.join_ok("user:9").await;
    let mut disconnected = gw.authenticated(10).await;
    disconnected.join_ok("user:10").await;

    server.kill();
    // Long enough for the gateway's reconnect delay to grow past the moment the events are published.
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart();
    let publisher = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(publisher.clone());
    let logout = serde_json::json!({"event": "logout", "payload": {"token": logout_token}});
    for (subject, body) in [
        (format!("{}.user.9", gw.prefix), logout.to_string()),
        (
            format!("{}.user.10", gw.prefix),
            r#"{"event":"disconnect"}"#.to_owned(),
        ),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    // The logout event is delivered, then the socket of that token is closed; the disconnect closes.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw_logout = false;
    loop {
        match logged_out.next_within(deadline - Instant::now()).await {
            Some(Next::Frame(frame)) if frame[3] == "logout" => saw_logout = true,
            Some(Next::Frame(_)) => {}
            Some(Next::Closed(code)) => {
                assert_eq!(code, Some(4402));
                break;
            }
            None => panic!("the logged-out socket was not closed"),
        }
    }
    assert!(saw_logout, "the logout event is delivered before the close");
    match disconnected.next_within(deadline - Instant::now()).await {
        Some(Next::Closed(code)) => assert_eq!(code, Some(4403)),
        other => panic!("the disconnected socket was not closed: {other:?}"),
    }
    let caught_up = gw
        .metric("epoch_gateway_delivery_caught_up_events_total")
        .await;
    assert!(
        caught_up >= 2.0,
        "the events came from the catch-up: {caught_up}"
    );
    assert_eq!(
        gw.upgrade_status(&format!("token={logout_token}&vsn=2.0.0"))
            .await,
        403
    );
}
