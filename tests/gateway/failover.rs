//! The delivery contract under failure (CONTRACT §8), with real components only: a phoenix.js socket
//! through a NATS node kill in a 3-node cluster and through a nats-server restart on its store, recovery
//! on another instance, the honest `recovered: false`, interest-based ingress measured in nats-server's
//! `/connz`, a join/leave storm, the stream switched off, and bad input on the new join keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::Context};
use bytes::Bytes;
use serde_json::{Value, json};

use epoch_testkit::*;

use crate::node::NodeScript;

const USER: u64 = 42;
/// Events a publisher sends through a failure.
const COUNT: u64 = 1000;
/// Events acked before the failure is caused: it happens while they flow.
const BEFORE_FAILURE: u64 = 300;

/// A JetStream context whose requests give up after 1 s, so retries start soon after a failure.
fn context(client: async_nats::Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client)
}

/// A client that keeps reconnecting, quickly, for as long as the test runs.
async fn reconnecting_client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(url)
        .await
        .unwrap()
}

/// Publishes with JetStream and waits for the ack, retrying with the same `Nats-Msg-Id` until it is
/// acked (the stream drops the duplicates); returns the number of attempts.
async fn publish_acked(js: &Context, subject: &str, body: &Bytes, id: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        let acked = match js
            .publish_with_headers(subject.to_owned(), headers, body.clone())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            return attempts;
        }
        assert!(Instant::now() < deadline, "event {id} was never acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `newMessage {n}` for n in 0..count on `subject`, one acked event after the other, counting
/// the acked ones in `acked`. Resolves to the number of retries and the time the last event was acked.
fn publish_events(
    js: Context,
    subject: String,
    count: u64,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(u32, Instant)> {
    let run = unique("");
    tokio::spawn(async move {
        let mut retries = 0;
        for n in 0..count {
            let body = Bytes::from(json!({"event": "newMessage", "payload": {"n": n}}).to_string());
            retries += publish_acked(&js, &subject, &body, &format!("{run}-{n}")).await - 1;
            acked.store(n + 1, Ordering::SeqCst);
        }
        (retries, Instant::now())
    })
}

async fn wait_for(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Makes `server` the leader of `stream`, asking the current leader to step down in its favour.
async fn lead_on(js: &Context, stream: &str, server: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = match js.get_stream(stream).await {
            Ok(mut handle) => handle
                .info()
                .await
                .ok()
                .and_then(|info| info.cluster.clone())
                .and_then(|cluster| cluster.leader),
            Err(_) => None,
        };
        if leader.as_deref() == Some(server) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{stream} is still led by {leader:?}, not {server}"
        );
        let _: Result<Value, _> = js
            .request(
                format!("STREAM.LEADER.STEPDOWN.{stream}"),
                &json!({"placement": {"preferred": server}}),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The environment of `follow_events.mjs` for a socket of [`USER`] on `gw`.
fn follower_env(gw: &Gateway, join: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GATEWAY_SOCKET_URL", format!("ws://{}/socket", gw.addr)),
        ("TOKEN", gw.token(USER)),
        ("USER_ID", USER.to_string()),
        ("COUNT", COUNT.to_string()),
        ("JOIN", join.to_owned()),
        ("WAIT_MS", "40000".to_owned()),
    ]
}

/// The stream keeps every event of the run: what is published during an outage is read back from it, so it
/// must still hold it when the gateway catches up (the default keeps 100 per topic).
const HISTORY: &str = "2000";

/// How long after `since` the last event reached the socket, from the `# last event at <ms>` line of
/// `follow_events.mjs`.
fn last_event_after(output: &str, since: SystemTime) -> Duration {
    let millis: u64 = output
        .lines()
        .find_map(|line| line.strip_prefix("# last event at ")?.parse().ok())
        .unwrap_or_else(|| panic!("no time of the last event in:\n{output}"));
    (SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
        .duration_since(since)
        .unwrap_or_default()
}

const RECONNECTS: &str = "epoch_gateway_nats_reconnects_total";
const READ_BACK: &str = "epoch_gateway_delivery_caught_up_events_total";

/// A gateway connected to node a of `cluster` alone (it learns the other nodes from the cluster), whose
/// event stream is led by `leader`, with a phoenix.js socket following [`USER`] on it.
struct Flow {
    gw: Gateway,
    js: Context,
    script: NodeScript,
}

impl Flow {
    async fn start(cluster: &Cluster, leader: &str, publish_on: usize) -> Self {
        let (prefix, bucket) = (unique("k"), unique("presence_"));
        let options = GatewayOptions::cluster(&prefix, &bucket)
            .env("EPOCH_GATEWAY__PRESENCE__REPLICAS", "3")
            .env("EPOCH_GATEWAY__DELIVERY__REPLICAS", "3")
            // The presence bucket's leader may be on the killed node: its records must outlast an election.
            .env("EPOCH_GATEWAY__PRESENCE__TTL_SECS", "24")
            .env("EPOCH_GATEWAY__DELIVERY__HISTORY_PER_TOPIC", HISTORY);
        let gw = Gateway::start_with(&cluster.urls[0], options).await;
        let js = context(reconnecting_client(&cluster.urls[publish_on]).await);
        lead_on(&js, &format!("events_{prefix}"), leader).await;
        let mut script = NodeScript::start("follow_events.mjs", &follower_env(&gw, "positions"));
        script.line("ready", Duration::from_secs(15)).await;
        Self { gw, js, script }
    }
}

#[tokio::test]
async fn phoenix_js_sockets_lose_nothing_when_the_gateways_nats_node_is_killed() {
    let mut cluster = Cluster::start();
    // Both gateways are on node a. One stream is led by node a: the kill also takes its leader, and nothing
    // is stored until another node is elected. The other is led by node b: events go on being stored while
    // the gateway reconnects, and it must read them back.
    let (elected, kept) = tokio::join!(
        Flow::start(&cluster, "epoch-a", 1),
        Flow::start(&cluster, "epoch-b", 2)
    );
    let flows = [elected, kept];
    let acked: Vec<_> = flows.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let publishers: Vec<_> = flows
        .iter()
        .zip(&acked)
        .map(|(flow, acked)| {
            let subject = format!("{}.user.{USER}", flow.gw.prefix);
            publish_events(flow.js.clone(), subject, COUNT, Arc::clone(acked))
        })
        .collect();
    wait_for(
        "events acked before the kill",
        Duration::from_secs(20),
        || {
            acked
                .iter()
                .all(|acked| acked.load(Ordering::SeqCst) >= BEFORE_FAILURE)
        },
    )
    .await;
    cluster.kill(0);
    let killed = Instant::now();
    let killed_at = SystemTime::now();
    for ((flow, publisher), leader) in flows.into_iter().zip(publishers).zip(["a", "b"]) {
        let (retries, done) = publisher.await.unwrap();
        let output = flow.script.passes(Duration::from_secs(60)).await;
        // It was on node a and moved to a node it was never given.
        assert!(
            flow.gw.metric(RECONNECTS).await >= 1.0,
            "the gateway never reconnected; logs: {:#?}",
            flow.gw.logs()
        );
        eprintln!(
            "node kill, stream led by node {leader}: the last {} events acked {:?} after the \
             kill ({retries} retries), all delivered {:?} after it ({} read back from the stream)\n{output}",
            COUNT - BEFORE_FAILURE,
            done - killed,
            last_event_after(&output, killed_at),
            flow.gw.metric(READ_BACK).await
        );
    }
}

#[tokio::test]
async fn a_phoenix_js_socket_loses_nothing_when_nats_restarts_on_its_store() {
    let mut nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__DELIVERY__HISTORY_PER_TOPIC", HISTORY),
    )
    .await;
    let js = context(reconnecting_client(&nats.url).await);

    let mut script = NodeScript::start("follow_events.mjs", &follower_env(&gw, "plain"));
    script.line("ready", Duration::from_secs(15)).await;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = publish_events(
        js,
        format!("{}.user.{USER}", gw.prefix),
        COUNT,
        Arc::clone(&acked),
    );
    wait_for(
        "events acked before the kill",
        Duration::from_secs(20),
        || acked.load(Ordering::SeqCst) >= BEFORE_FAILURE,
    )
    .await;
    nats.kill();
    let killed = SystemTime::now();
    // The gateway saw the outage before the server comes back.
    let deadline = Instant::now() + WAIT;
    while gw.http_status("/readyz").await != 503 {
        assert!(Instant::now() < deadline, "readyz still 200 without NATS");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Down long enough for the gateway's reconnect attempts to back off: the publisher, retrying every
    // 50 ms, is back first, and what it stores meanwhile has to be read back from the stream.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();
    let (retries, _) = publisher.await.unwrap();
    let output = script.passes(Duration::from_secs(60)).await;
    assert!(gw.metric(RECONNECTS).await >= 1.0);
    eprintln!(
        "restart: all delivered {:?} after the kill ({retries} publish retries, {} read back from the \
         stream)\n{output}",
        last_event_after(&output, killed),
        gw.metric(READ_BACK).await
    );
}

#[tokio::test]
async fn a_phoenix_js_socket_moved_to_another_instance_and_back_recovers_every_event_once() {
    let nats = Nats::start();
    let (prefix, bucket) = (unique("m"), unique("presence_"));
    let a = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let b = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let script = NodeScript::start(
        "recover_switch.mjs",
        &[
            ("SOCKET_URL_A", format!("ws://{}/socket", a.addr)),
            ("SOCKET_URL_B", format!("ws://{}/socket", b.addr)),
            ("NATS_URL", nats.url.clone()),
            ("SUBJECT_PREFIX", prefix.clone()),
            ("TOKEN", a.token(USER)),
            ("USER_ID", USER.to_string()),
            ("COUNT", "300".to_owned()),
        ],
    );
    let output = script.passes(Duration::from_secs(60)).await;
    eprintln!("{output}");
}

// ---- Recovery refused -------------------------------------------------------------------------------

/// Sends a join with `payload` and returns the reply.
async fn join_with(client: &mut PhxClient, topic: &str, payload: Value) -> Value {
    let r = client.make_ref();
    client.send(json!([r, r, topic, "phx_join", payload])).await;
    let reply = client.frame().await;
    assert_eq!(reply[1], json!(r), "the reply to the join: {reply}");
    reply
}

fn assert_position(value: &Value) -> String {
    let position = value
        .as_str()
        .unwrap_or_else(|| panic!("not a position: {value}"));
    assert!(
        !position.is_empty() && position.parse::<f64>().is_err(),
        "a position is never a decimal: {position}"
    );
    position.to_owned()
}

/// The position of `user:<USER>` on `gw` now, as a join with positions reports it.
async fn position_now(gw: &Gateway) -> String {
    let mut socket = gw.authenticated(USER).await;
    let reply = join_with(
        &mut socket,
        &format!("user:{USER}"),
        json!({"positions": true}),
    )
    .await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_position(&reply[4]["response"]["position"])
}

async fn publish_n(gw: &Gateway, nats: &async_nats::Client, from: u64, count: u64) {
    for n in from..from + count {
        let body = json!({"event": "newMessage", "payload": {"n": n}}).to_string();
        gw.publish(nats, &USER.to_string(), &body).await;
    }
}

/// A socket of [`USER`] joined to its topic. Once it has an event, the gateway has delivered it: a socket
/// that joins afterwards cannot get it live, so what it gets after its join reply is a replay or nothing.
struct Witness(PhxClient);

impl Witness {
    async fn on(gw: &Gateway) -> Self {
        let mut socket = gw.authenticated(USER).await;
        socket.join_ok(&format!("user:{USER}")).await;
        Self(socket)
    }

    /// Publishes `newMessage {n}` for n in from..from+count and waits until the gateway delivered them
    /// (skipping the live events other sockets of the test were sent meanwhile).
    async fn publish(&mut self, gw: &Gateway, nats: &async_nats::Client, from: u64, count: u64) {
        publish_n(gw, nats, from, count).await;
        let last = from + count - 1;
        while self.0.frame().await[4]["n"] != json!(last) {}
    }
}

/// A live event for [`USER`], and asserts it is the next frame `socket` gets, with a position.
async fn live_event_is_next(gw: &Gateway, nats: &async_nats::Client, socket: &mut PhxClient) {
    let marker = unique("live-");
    let body = json!({"event": "newMessage", "payload": {"live": marker}}).to_string();
    gw.publish(nats, &USER.to_string(), &body).await;
    let frame = socket.frame().await;
    assert_eq!(
        frame[4],
        json!({"live": marker}),
        "nothing before the live event: {frame}"
    );
    assert_position(&frame[1]);
}

/// A new socket of [`USER`] joining its topic with `since`; the ok reply's response, asserted ok.
async fn join_since(gw: &Gateway, since: &Value) -> (PhxClient, Value) {
    let mut socket = gw.authenticated(USER).await;
    let topic = format!("user:{USER}");
    let reply = join_with(&mut socket, &topic, json!({"since": since})).await;
    assert_eq!(reply[4]["status"], "ok", "{since}: {reply}");
    (socket, reply[4]["response"].clone())
}

/// A join with `since` gets `recovered: true`, the events `ns` in order, then live events.
async fn recovers(gw: &Gateway, nats: &async_nats::Client, since: &str, ns: &[u64]) {
    let (mut socket, response) = join_since(gw, &json!(since)).await;
    assert_eq!(response["recovered"], true, "{since}: {response}");
    for &n in ns {
        let frame = socket.frame().await;
        assert_eq!(frame[4], json!({"n": n}), "{frame}");
        assert_position(&frame[1]);
    }
    live_event_is_next(gw, nats, &mut socket).await;
}

/// A join with `since` is ok with `recovered: false` and a position, replays nothing, and live events
/// follow.
async fn not_recovered(gw: &Gateway, nats: &async_nats::Client, since: Value) {
    let (mut socket, response) = join_since(gw, &since).await;
    assert_eq!(response["recovered"], false, "{since}: {response}");
    assert_position(&response["position"]);
    live_event_is_next(gw, nats, &mut socket).await;
}

/// A gateway (with one delivery setting, or none) on its own nats-server, a publisher, and a witness
/// socket of [`USER`].
struct Fixture {
    gw: Gateway,
    publisher: async_nats::Client,
    witness: Witness,
    _nats: Nats,
}

impl Fixture {
    async fn start(setting: Option<(&str, &str)>) -> Self {
        let nats = Nats::start();
        let options = match setting {
            Some((key, value)) => GatewayOptions::default().env(key, value),
            None => GatewayOptions::default(),
        };
        let gw = Gateway::start_with(&nats.url, options).await;
        let publisher = nats.client().await;
        let witness = Witness::on(&gw).await;
        Self {
            gw,
            publisher,
            witness,
            _nats: nats,
        }
    }

    /// Publishes `count` numbered events from `from` (seen by the witness) and returns the position before
    /// them.
    async fn events_after_now(&mut self, from: u64, count: u64) -> String {
        let since = position_now(&self.gw).await;
        self.witness
            .publish(&self.gw, &self.publisher, from, count)
            .await;
        since
    }
}

#[tokio::test]
async fn a_history_trimmed_past_since_is_not_recovered() {
    let mut f = Fixture::start(Some(("EPOCH_GATEWAY__DELIVERY__HISTORY_PER_TOPIC", "5"))).await;
    // Fewer events after the position than the topic keeps: recovered.
    let since = f.events_after_now(0, 4).await;
    recovers(&f.gw, &f.publisher, &since, &[0, 1, 2, 3]).await;
    // More than it keeps: the oldest after the position is gone.
    let since = f.events_after_now(4, 6).await;
    not_recovered(&f.gw, &f.publisher, json!(since)).await;
}

#[tokio::test]
async fn an_expired_history_is_not_recovered() {
    let mut f = Fixture::start(Some(("EPOCH_GATEWAY__DELIVERY__HISTORY_SECS", "1"))).await;
    let since = f.events_after_now(0, 3).await;
    let (gw, publisher) = (&f.gw, &f.publisher);
    recovers(gw, publisher, &since, &[0, 1, 2]).await;
    // Once the stream has aged every event out.
    let js = jetstream::new(publisher.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = js
            .get_stream(format!("events_{}", gw.prefix))
            .await
            .unwrap();
        if stream.info().await.unwrap().state.messages == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the events never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    not_recovered(gw, publisher, json!(since)).await;
}

#[tokio::test]
async fn more_events_than_max_recover_are_not_recovered() {
    let mut f = Fixture::start(Some(("EPOCH_GATEWAY__DELIVERY__MAX_RECOVER", "3"))).await;
    let since = f.events_after_now(0, 3).await;
    recovers(&f.gw, &f.publisher, &since, &[0, 1, 2]).await;
    let since = f.events_after_now(3, 4).await;
    not_recovered(&f.gw, &f.publisher, json!(since)).await;
}

#[tokio::test]
async fn malformed_positions_are_not_recovered() {
    let mut f = Fixture::start(None).await;
    let since = f.events_after_now(0, 2).await;
    let (gw, publisher) = (&f.gw, &f.publisher);
    // The position, well formed, is recovered.
    recovers(gw, publisher, &since, &[0, 1]).await;
    let (epoch, seq) = since.rsplit_once('.').expect("<epoch>.<seq>");
    for bad in [
        json!("12"),
        json!("1.5"),
        json!(format!("{epoch}.")),
        json!(format!(".{seq}")),
        json!(format!("{epoch}.-1")),
        json!(format!("{epoch}.0{seq}")),
        json!(format!("{epoch}.{seq}.1")),
        json!(format!("{}.{seq}", epoch.to_uppercase())),
        json!([since]),
        json!({"position": since}),
        json!(null),
        json!(true),
    ] {
        not_recovered(gw, publisher, bad).await;
    }
}

#[tokio::test]
async fn a_position_of_another_stream_is_not_recovered() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut witness = Witness::on(&gw).await;
    let since = position_now(&gw).await;
    witness.publish(&gw, &publisher, 0, 2).await;
    // Another gateway, another prefix, another stream.
    let other = Gateway::start(&nats.url).await;
    let foreign = position_now(&other).await;
    assert_ne!(
        foreign.split_once('.').unwrap().0,
        since.split_once('.').unwrap().0,
        "two streams, two epochs"
    );
    not_recovered(&gw, &publisher, json!(foreign)).await;

    // The stream deleted: the gateway creates it again, and positions of the old one are void.
    let js = jetstream::new(publisher.clone());
    let name = format!("events_{}", gw.prefix);
    let old = js.get_stream(&name).await.unwrap().cached_info().created;
    js.delete_stream(&name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(stream) = js.get_stream(&name).await
            && stream.cached_info().created != old
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not create its stream again; logs: {:#?}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = position_now(&gw).await;
    assert_ne!(
        renewed.split_once('.').unwrap().0,
        since.split_once('.').unwrap().0,
        "a recreated stream has a new epoch"
    );
    not_recovered(&gw, &publisher, json!(since)).await;
    // The new stream is followed: its events arrive with its positions, and recover.
    let mut socket = gw.authenticated(USER).await;
    let reply = join_with(
        &mut socket,
        &format!("user:{USER}"),
        json!({"positions": true}),
    )
    .await;
    let position = assert_position(&reply[4]["response"]["position"]);
    witness.publish(&gw, &publisher, 10, 2).await;
    for n in [10, 11] {
        let frame = socket.frame().await;
        assert_eq!(frame[4], json!({"n": n}), "{frame}");
        assert_eq!(
            assert_position(&frame[1]).split_once('.').unwrap().0,
            renewed.split_once('.').unwrap().0
        );
    }
    recovers(&gw, &publisher, &position, &[10, 11]).await;
}

// ---- Interest-based ingress ---------------------------------------------------------------------------

/// Whether a NATS subscription `pattern` (with `*` and `>` wildcards) matches `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for wanted in pattern.split('.') {
        match (wanted, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (wanted, Some(token)) if wanted == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// `out_msgs` and subscriptions of the NATS connections of `gw` (the main one, `epoch-gateway <node>`, and
/// the subscriber of its users' events, `epoch-gateway <node> users`), found by their names.
fn connection_of(connz: &Value, gw: &Gateway) -> (u64, Vec<String>) {
    let names = [
        format!("epoch-gateway {}", gw.node),
        format!("epoch-gateway {} users", gw.node),
    ];
    let connections = connz["connections"].as_array().expect("connections");
    let mut out_msgs = 0;
    let mut subjects = Vec::new();
    for name in &names {
        let found: Vec<&Value> = connections.iter().filter(|c| c["name"] == *name).collect();
        assert_eq!(found.len(), 1, "one connection named {name}: {connz}");
        out_msgs += found[0]["out_msgs"].as_u64().expect("out_msgs");
        subjects.extend(
            found[0]["subscriptions_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned)),
        );
    }
    (out_msgs, subjects)
}

#[tokio::test]
async fn an_instance_receives_only_the_per_user_events_of_its_own_users() {
    const N: u64 = 300;
    // Messages other than the per-user events a gateway may get meanwhile (JetStream API replies, presence).
    const MARGIN: u64 = 20;
    let nats = Nats::start_monitored();
    let (prefix, bucket) = (unique("i"), unique("presence_"));
    let a = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let b = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let mut one = a.authenticated(1).await;
    one.join_ok("user:1").await;
    let mut two = b.authenticated(2).await;
    two.join_ok("user:2").await;

    let before = nats.monitoring("/connz?subs=1").await;
    let (a_before, a_subjects) = connection_of(&before, &a);
    let (b_before, b_subjects) = connection_of(&before, &b);
    // Each is subscribed to its own user's events, and to nothing that would bring it the other's.
    for (subjects, own, other) in [(&a_subjects, 1, 2), (&b_subjects, 2, 1)] {
        let gets = |subject: String| subjects.iter().any(|s| subject_matches(s, &subject));
        assert!(
            gets(format!("{prefix}.delivery.user.{own}")),
            "{subjects:?}"
        );
        assert!(
            !gets(format!("{prefix}.delivery.user.{other}")),
            "{subjects:?}"
        );
        assert!(!gets(format!("{prefix}.user.{other}")), "{subjects:?}");
    }

    let publisher = nats.client().await;
    for n in 0..N {
        for user in ["1", "2"] {
            let body = json!({"event": "newMessage", "payload": {"n": n}}).to_string();
            publisher
                .publish(format!("{prefix}.user.{user}"), body.into())
                .await
                .unwrap();
        }
    }
    publisher.flush().await.unwrap();
    for (socket, topic) in [(&mut one, "user:1"), (&mut two, "user:2")] {
        for n in 0..N {
            assert_eq!(
                socket.frame().await,
                broadcast(topic, "newMessage", json!({"n": n}))
            );
        }
    }
    let after = nats.monitoring("/connz?subs=1").await;
    let a_got = connection_of(&after, &a).0 - a_before;
    let b_got = connection_of(&after, &b).0 - b_before;
    eprintln!("out_msgs while {N} events went to each user: A {a_got}, B {b_got}");
    for (gw, got) in [("A", a_got), ("B", b_got)] {
        assert!(
            (N..N + MARGIN).contains(&got),
            "{gw} got {got} messages for {N} events of its own user and {N} of another's"
        );
    }
}

#[tokio::test]
async fn a_join_and_leave_storm_does_not_stall_ingress() {
    const SOCKETS: u64 = 200;
    const STORM: Duration = Duration::from_secs(3);
    let nats = Nats::start();
    let gw = Arc::new(Gateway::start(&nats.url).await);
    let mut steady = gw.anonymous().await;
    steady.join_ok("user:public").await;

    let running = Arc::new(AtomicBool::new(true));
    let (cycles, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let storm: Vec<_> = (0..SOCKETS)
        .map(|i| {
            let (gw, running) = (Arc::clone(&gw), Arc::clone(&running));
            let (cycles, refused) = (Arc::clone(&cycles), Arc::clone(&refused));
            tokio::spawn(async move {
                let user = 1000 + i;
                let topic = format!("user:{user}");
                while running.load(Ordering::Relaxed) {
                    let mut socket = gw.authenticated(user).await;
                    let reply = socket.join(&topic).await;
                    if reply[4]["status"] != "ok" {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    let join_ref = reply[0].clone();
                    socket
                        .send(json!([join_ref, "leave", topic, "phx_leave", {}]))
                        .await;
                    let _ = socket.frame().await;
                    socket.close().await;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let publisher = nats.client().await;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut k = 0;
    while started.elapsed() < STORM {
        let body = json!({"event": "announcement", "payload": {"k": k}}).to_string();
        let sent = Instant::now();
        gw.publish(&publisher, "public", &body).await;
        let frame = match steady.next_within(Duration::from_secs(1)).await {
            Some(Next::Frame(frame)) => frame,
            other => panic!(
                "public event {k} did not arrive within 1 s during the storm ({} cycles): {other:?}",
                cycles.load(Ordering::Relaxed)
            ),
        };
        assert_eq!(
            frame,
            broadcast("user:public", "announcement", json!({"k": k}))
        );
        slowest = slowest.max(sent.elapsed());
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.store(false, Ordering::Relaxed);
    for task in storm {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a storm socket is stuck")
            .unwrap();
    }
    let cycles = cycles.load(Ordering::Relaxed);
    eprintln!(
        "storm: {cycles} connect/join/leave cycles of {SOCKETS} users in {STORM:?}; {k} public events, slowest {slowest:?}"
    );
    assert!(
        cycles >= SOCKETS,
        "the storm hardly happened: {cycles} cycles"
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "joins refused during the storm"
    );
}

// ---- The stream switched off --------------------------------------------------------------------------

#[tokio::test]
async fn with_delivery_disabled_phoenix_js_works_as_before_and_positions_are_ignored() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__DELIVERY__ENABLED", "false"),
    )
    .await;
    NodeScript::start(
        "phoenix_compat.mjs",
        &[
            ("GATEWAY_SOCKET_URL", format!("ws://{}/socket", gw.addr)),
            ("NATS_URL", nats.url.clone()),
            ("SUBJECT_PREFIX", gw.prefix.clone()),
            ("TOKEN", gw.token(USER)),
            ("USER_ID", USER.to_string()),
            ("OTHER_USER_ID", "77".to_owned()),
        ],
    )
    .passes(Duration::from_secs(60))
    .await;

    let publisher = nats.client().await;
    let mut socket = gw.authenticated(USER).await;
    let topic = format!("user:{USER}");
    for payload in [json!({"positions": true}), json!({"since": "e1abc.1"})] {
        let mut socket = gw.authenticated(USER).await;
        let reply = join_with(&mut socket, &topic, payload.clone()).await;
        assert_eq!(
            reply[4],
            json!({"status": "ok", "response": {}}),
            "{payload}: {reply}"
        );
    }
    let reply = join_with(&mut socket, &topic, json!({"positions": true})).await;
    assert_eq!(reply[4], json!({"status": "ok", "response": {}}), "{reply}");
    publish_n(&gw, &publisher, 0, 2).await;
    for n in 0..2 {
        assert_eq!(
            socket.frame().await,
            broadcast(&topic, "newMessage", json!({"n": n}))
        );
    }
    // No event stream was made.
    let js = jetstream::new(publisher);
    assert!(
        js.get_stream(format!("events_{}", gw.prefix))
            .await
            .is_err()
    );
}

// ---- Bad input on the new keys ------------------------------------------------------------------------

/// A heartbeat is answered: the socket still works.
async fn heartbeat_answered(socket: &mut PhxClient) {
    socket
        .send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        socket.frame().await,
        json!([null, "hb", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[tokio::test]
async fn bad_positions_and_since_get_clear_replies_and_the_socket_keeps_working() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let topic = format!("user:{USER}");
    let mut socket = gw.authenticated(USER).await;

    for bad in [
        json!("yes"),
        json!("true"),
        json!(1),
        json!(null),
        json!({}),
    ] {
        let reply = join_with(&mut socket, &topic, json!({"positions": bad})).await;
        assert_eq!(
            reply[4],
            json!({"status": "error", "response": {"reason": "invalid positions: expected true or false"}}),
            "{bad}: {reply}"
        );
        // Not joined: a push on the topic is unmatched, and events do not reach the socket.
        let r = socket.make_ref();
        socket
            .send(json!([reply[0], r, topic, "is_online", {"user_id": 1}]))
            .await;
        let push = socket.frame().await;
        assert_eq!(push[1], json!(r));
        assert_eq!(push[4]["response"]["reason"], "unmatched topic", "{push}");
        heartbeat_answered(&mut socket).await;
    }
    // An event while the socket is not joined, delivered by the gateway before it joins.
    let mut witness = Witness::on(&gw).await;
    witness.publish(&gw, &publisher, 0, 1).await;
    // `positions: false` is today's join: a first join, so no `phx_close` comes before its reply.
    let reply = join_with(&mut socket, &topic, json!({"positions": false})).await;
    assert_eq!(reply[4], json!({"status": "ok", "response": {}}), "{reply}");
    publish_n(&gw, &publisher, 1, 1).await;
    assert_eq!(
        socket.frame().await,
        broadcast(&topic, "newMessage", json!({"n": 1})),
        "the event published before the join never reached the socket"
    );
    drop(witness);
    socket.close().await;

    let foreign = {
        let other = Gateway::start(&nats.url).await;
        let mut socket = other.authenticated(USER).await;
        let reply = join_with(&mut socket, &topic, json!({"positions": true})).await;
        assert_position(&reply[4]["response"]["position"])
    };
    for since in [json!("e".repeat(10 * 1024)), json!(""), json!(foreign)] {
        let mut socket = gw.authenticated(USER).await;
        let reply = join_with(&mut socket, &topic, json!({"since": since})).await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        assert_eq!(reply[4]["response"]["recovered"], false, "{reply}");
        assert_position(&reply[4]["response"]["position"]);
        heartbeat_answered(&mut socket).await;
        live_event_is_next(&gw, &publisher, &mut socket).await;
    }
    // Another user's channel: the usual refusal, whatever the position.
    let since = position_now(&gw).await;
    let mut socket = gw.authenticated(USER).await;
    let reply = join_with(&mut socket, "user:77", json!({"since": since})).await;
    assert_eq!(
        reply[4],
        json!({"status": "error", "response": {"reason": "unauthorized, cannot join 'user:77' channel"}}),
        "{reply}"
    );
    let reply = join_with(&mut socket, "user:77", json!({"positions": "yes"})).await;
    assert_eq!(
        reply[4]["response"]["reason"], "unauthorized, cannot join 'user:77' channel",
        "{reply}"
    );
    heartbeat_answered(&mut socket).await;
    // An anonymous socket with a huge `since` on the public topic.
    let mut anonymous = gw.anonymous().await;
    let reply = join_with(
        &mut anonymous,
        "user:public",
        json!({"since": "9".repeat(10 * 1024)}),
    )
    .await;
    assert_eq!(reply[4]["response"]["recovered"], false, "{reply}");
    heartbeat_answered(&mut anonymous).await;
}
