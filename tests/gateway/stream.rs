//! The event stream seen from a socket (CONTRACT §8): positions on a join that asks for them, recovery
//! of what a socket missed, on the same or another instance, and the honest `recovered: false`.

use std::time::Duration;

use serde_json::{Value, json};

use epoch_testkit::*;

/// Sends a join with `payload` and returns the reply.
async fn join_with(client: &mut PhxClient, topic: &str, payload: Value) -> Value {
    let r = client.make_ref();
    client.send(json!([r, r, topic, "phx_join", payload])).await;
    client.frame().await
}

/// The position of a broadcast, asserting it is one.
fn position_of(frame: &Value) -> String {
    let position = frame[1]
        .as_str()
        .unwrap_or_else(|| panic!("no position: {frame}"));
    assert!(
        position.parse::<f64>().is_err(),
        "a position must never be a decimal: {position}"
    );
    position.to_owned()
}

async fn publish_n(gw: &Gateway, nats: &async_nats::Client, suffix: &str, from: u64, count: u64) {
    for n in from..from + count {
        gw.publish(
            nats,
            suffix,
            &json!({"event": "newMessage", "payload": {"n": n}}).to_string(),
        )
        .await;
    }
}

#[tokio::test]
async fn positions_ride_in_the_ref_slot_and_a_rejoin_recovers_what_it_missed() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;

    let mut first = gw.authenticated(42).await;
    let reply = join_with(&mut first, "user:42", json!({"positions": true})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let start = reply[4]["response"]["position"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(start.parse::<f64>().is_err(), "{start}");
    assert!(reply[4]["response"].get("recovered").is_none(), "{reply}");

    publish_n(&gw, &publisher, "42", 0, 5).await;
    let mut positions = Vec::new();
    for n in 0..5 {
        let frame = first.frame().await;
        assert_eq!(frame[0], Value::Null);
        assert_eq!(frame[4]["n"], n, "{frame}");
        positions.push(position_of(&frame));
    }
    // A plain join on another socket of the same user sees today's frames.
    let mut plain = gw.authenticated(42).await;
    plain.join_ok("user:42").await;
    publish_n(&gw, &publisher, "42", 5, 1).await;
    assert_eq!(
        plain.frame().await,
        broadcast("user:42", "newMessage", json!({"n": 5}))
    );
    let sixth = first.frame().await;
    positions.push(position_of(&sixth));

    // A new socket that saw up to the second event recovers the four after it, then goes live.
    let mut again = gw.authenticated(42).await;
    let reply = join_with(&mut again, "user:42", json!({"since": positions[1]})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
    assert_eq!(
        reply[4]["response"]["position"],
        json!(positions[5]),
        "{reply}"
    );
    for n in 2..6 {
        let frame = again.frame().await;
        assert_eq!(frame[4]["n"], n, "{frame}");
        assert_eq!(frame[1], json!(positions[n as usize]));
    }
    publish_n(&gw, &publisher, "42", 6, 1).await;
    assert_eq!(again.frame().await[4]["n"], 6);
    again.silent_for(Duration::from_millis(200)).await;

    // The public topic is recovered from the hot window.
    let mut public = gw.anonymous().await;
    let reply = join_with(&mut public, "user:public", json!({"positions": true})).await;
    let since = reply[4]["response"]["position"]
        .as_str()
        .unwrap()
        .to_owned();
    publish_n(&gw, &publisher, "public", 100, 3).await;
    for n in 100..103 {
        assert_eq!(public.frame().await[4]["n"], n);
    }
    let mut back = gw.anonymous().await;
    let reply = join_with(&mut back, "user:public", json!({"since": since})).await;
    assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
    for n in 100..103 {
        assert_eq!(back.frame().await[4]["n"], n);
    }
    back.silent_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn another_instance_recovers_and_bad_positions_are_not_recovered() {
    let nats = Nats::start();
    let (prefix, bucket) = (unique("s"), unique("presence_"));
    let a = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let b = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let publisher = nats.client().await;

    let mut on_a = a.authenticated(7).await;
    let reply = join_with(&mut on_a, "user:7", json!({"positions": true})).await;
    let since = reply[4]["response"]["position"]
        .as_str()
        .unwrap()
        .to_owned();
    on_a.close().await;
    publish_n(&a, &publisher, "7", 0, 3).await;

    let mut on_b = b.authenticated(7).await;
    let reply = join_with(&mut on_b, "user:7", json!({"since": since})).await;
    assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
    for n in 0..3 {
        assert_eq!(on_b.frame().await[4]["n"], n);
    }

    for bad in [
        json!("x"),
        json!(""),
        json!(12),
        json!("e1abc.99999999999"),
        json!("ezzzzzzz.1"),
    ] {
        let mut socket = b.authenticated(7).await;
        let reply = join_with(&mut socket, "user:7", json!({"since": bad})).await;
        assert_eq!(reply[4]["status"], "ok", "{bad}: {reply}");
        assert_eq!(reply[4]["response"]["recovered"], false, "{bad}: {reply}");
        socket.silent_for(Duration::from_millis(100)).await;
    }
    let mut socket = b.authenticated(7).await;
    let reply = join_with(&mut socket, "user:7", json!({"positions": "yes"})).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
}
