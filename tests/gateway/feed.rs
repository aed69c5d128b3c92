//! The presence feed on `user:public` (`{"presence": true}`): phoenix.js `Presence` across instances, a
//! crash, batching and a rejoin (`tests/js/presence_feed.mjs`); who may watch; bad input; the bound.

use std::time::Duration;

use serde_json::{Value, json};

use crate::node::NodeScript;
use epoch_testkit::*;

const FEED: &str = "EPOCH_GATEWAY__PRESENCE__FEED";
const INTERVAL: &str = "EPOCH_GATEWAY__PRESENCE__FEED_INTERVAL_MS";
const MAX_USERS: &str = "EPOCH_GATEWAY__PRESENCE__FEED_MAX_USERS";
const TTL_SECS: u64 = 3;
/// Longer than a feed interval of [`FAST_INTERVAL_MS`] plus the KV watch.
const DIFF_WAIT: Duration = Duration::from_secs(3);
const FAST_INTERVAL_MS: &str = "200";

fn feed_options(mode: &str) -> GatewayOptions {
    GatewayOptions::default()
        .env(FEED, mode)
        .env(INTERVAL, FAST_INTERVAL_MS)
}

/// Sends a join of `topic` with `payload`; returns the reply.
async fn join_with(client: &mut PhxClient, topic: &str, payload: Value) -> Value {
    let r = client.make_ref();
    client
        .request(&json!([r, r, topic, "phx_join", payload]), DIFF_WAIT)
        .await
        .unwrap()
}

/// The next frame of `event`, skipping others; panics after [`DIFF_WAIT`].
async fn next_event(client: &mut PhxClient, event: &str) -> Value {
    let deadline = tokio::time::Instant::now() + DIFF_WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_within(left).await {
            Some(Next::Frame(frame)) if frame[3] == event => return frame,
            Some(Next::Frame(_)) => {}
            other => panic!("no {event} in time: {other:?}"),
        }
    }
}

fn reason(reply: &Value) -> &str {
    assert_eq!(reply[4]["status"], "error", "{reply}");
    reply[4]["response"]["reason"].as_str().unwrap()
}

#[tokio::test]
async fn phoenix_js_presence_across_instances_through_batching_a_rejoin_and_a_crash() {
    let nats = Nats::start();
    let (prefix, bucket) = (unique("f"), unique("presence_"));
    let options = || {
        GatewayOptions::cluster(&prefix, &bucket)
            .env(FEED, "authenticated")
            .env("EPOCH_GATEWAY__PRESENCE__TTL_SECS", &TTL_SECS.to_string())
    };
    let a = Gateway::start_with(&nats.url, options()).await;
    let mut b = Gateway::start_with(&nats.url, options()).await;
    // More users than one frame of a list holds: the rejoin's fresh list comes as a state and joins.
    let batch: Vec<u64> = (100..250).collect();
    let users = [1, 2, 3].into_iter().chain(batch.iter().copied());
    let tokens: serde_json::Map<String, Value> = users
        .map(|user| (user.to_string(), json!(a.token(user))))
        .collect();
    let batch_ids: Vec<String> = batch.iter().map(u64::to_string).collect();
    let mut script = NodeScript::start(
        "presence_feed.mjs",
        &[
            ("SOCKET_URL_A", format!("ws://{}/socket", a.addr)),
            ("SOCKET_URL_B", format!("ws://{}/socket", b.addr)),
            ("TOKENS", Value::Object(tokens).to_string()),
            ("WATCHER_ID", "1".to_owned()),
            ("B_WATCHER_ID", "2".to_owned()),
            ("B_USER_ID", "3".to_owned()),
            ("BATCH_IDS", batch_ids.join(",")),
            ("TTL_SECS", TTL_SECS.to_string()),
        ],
    );
    script.line("kill B", Duration::from_secs(60)).await;
    b.kill();
    let output = script.passes(Duration::from_secs(60)).await;
    eprintln!("{output}");
}

#[tokio::test]
async fn the_feed_is_off_by_default() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut socket = gw.authenticated(5).await;
    let reply = join_with(&mut socket, "user:public", json!({"presence": true})).await;
    assert_eq!(reason(&reply), "presence feed is off");
    // The socket is unaffected: a plain join works, and no feed arrives.
    socket.join_ok("user:public").await;
    socket.silent_for(Duration::from_millis(1500)).await;
    assert_eq!(
        gw.metric("epoch_gateway_presence_feed_refusals_total{reason=\"off\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn authenticated_mode_refuses_anonymous_sockets_and_everyone_mode_admits_them() {
    let nats = Nats::start();
    let gw = Gateway::start_with(&nats.url, feed_options("authenticated")).await;
    let mut anon = gw.anonymous().await;
    let reply = join_with(&mut anon, "user:public", json!({"presence": true})).await;
    assert_eq!(
        reason(&reply),
        "unauthorized, the presence feed needs a signed-in user"
    );
    let mut user = gw.authenticated(5).await;
    let reply = join_with(&mut user, "user:public", json!({"presence": true})).await;
    assert_eq!(reply[4], json!({"status": "ok", "response": {}}));
    let state = user.frame().await;
    assert_eq!(
        state.as_array().map(|frame| &frame[..4]),
        Some(
            &[
                json!(null),
                json!(null),
                json!("user:public"),
                json!("presence_state")
            ][..]
        )
    );
    // The watcher itself joins the list with the next diff.
    let diff = next_event(&mut user, "presence_diff").await;
    let metas = &diff[4]["joins"]["5"]["metas"];
    assert_eq!(metas.as_array().map(Vec::len), Some(1), "{diff}");
    assert!(metas[0]["phx_ref"].is_string(), "{diff}");
    assert_eq!(diff[4]["leaves"], json!({}));

    let gw = Gateway::start_with(&nats.url, feed_options("everyone")).await;
    let mut anon = gw.anonymous().await;
    let reply = join_with(&mut anon, "user:public", json!({"presence": true})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(anon.frame().await[3], "presence_state");
}

#[tokio::test]
async fn bad_presence_requests_get_an_error_reply_and_the_socket_carries_on() {
    let nats = Nats::start();
    let gw = Gateway::start_with(&nats.url, feed_options("everyone")).await;
    let publisher = nats.client().await;
    let mut socket = gw.authenticated(7).await;
    for bad in [json!("yes"), json!(1), json!(null), json!({})] {
        let reply = join_with(&mut socket, "user:public", json!({"presence": bad})).await;
        assert_eq!(
            reason(&reply),
            "invalid presence: expected true or false",
            "{bad}"
        );
    }
    for topic in ["user:role", "user:7"] {
        let reply = join_with(&mut socket, topic, json!({"presence": true})).await;
        assert_eq!(
            reason(&reply),
            "presence is only on 'user:public'",
            "{topic}"
        );
    }
    // A joined channel asked again with bad input keeps its join: it still gets broadcasts and answers.
    socket.join_ok("user:public").await;
    let r = socket.make_ref();
    socket
        .send(json!([r, r, "user:public", "phx_join", {"presence": "yes"}]))
        .await;
    assert_eq!(socket.frame().await[3], "phx_close");
    let reply = socket.frame().await;
    assert_eq!(reason(&reply), "invalid presence: expected true or false");
    gw.publish(
        &publisher,
        "public",
        r#"{"event":"announcement","payload":{"n":1}}"#,
    )
    .await;
    assert_eq!(
        socket.frame().await,
        broadcast("user:public", "announcement", json!({"n": 1}))
    );
    let answer = socket
        .push(&r, "user:public", "is_online", json!({"user_id": 7}))
        .await;
    assert_eq!(answer[4]["response"], json!({"id": 7, "online": true}));
    assert_eq!(
        gw.metric("epoch_gateway_presence_feed_refusals_total{reason=\"bad_request\"}")
            .await,
        7.0
    );
}

#[tokio::test]
async fn over_the_bound_the_feed_is_suspended_and_comes_back_with_a_fresh_state() {
    let nats = Nats::start();
    let gw =
        Gateway::start_with(&nats.url, feed_options("authenticated").env(MAX_USERS, "2")).await;
    let mut watcher = gw.authenticated(1).await;
    let reply = join_with(&mut watcher, "user:public", json!({"presence": true})).await;
    assert_eq!(reply[4]["status"], "ok");
    assert_eq!(watcher.frame().await[3], "presence_state");
    let mut two = gw.authenticated(2).await;
    two.join_ok("user:public").await;
    let mut three = gw.authenticated(3).await;
    three.join_ok("user:public").await;
    let suspended = next_event(&mut watcher, "presence_suspended").await;
    assert_eq!(
        suspended[4]["reason"],
        "presence feed suspended: more users online than it may list"
    );
    let mut late = gw.authenticated(4).await;
    let reply = join_with(&mut late, "user:public", json!({"presence": true})).await;
    assert_eq!(
        reason(&reply),
        "presence feed suspended: more users online than it may list"
    );
    three.close().await;
    let state = next_event(&mut watcher, "presence_state").await;
    let mut listed: Vec<&String> = state[4].as_object().unwrap().keys().collect();
    listed.sort();
    assert_eq!(listed, ["1", "2"], "{state}");
}
