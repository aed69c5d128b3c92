//! The Phoenix V2 channel protocol on the wire: joins, refusals, leaves, heartbeats, pushes.

use std::time::Duration;

use serde_json::json;

use epoch_testkit::*;

#[tokio::test]
async fn heartbeat_is_answered_without_a_join() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut client = gw.anonymous().await;
    client
        .send(json!([null, "9", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        client.frame().await,
        json!([null, "9", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[tokio::test]
async fn joins_follow_the_epochtalk_rules() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;

    let mut anon = gw.anonymous().await;
    assert_eq!(
        anon.join("user:public").await,
        json!(["1", "1", "user:public", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        anon.join("user:role").await,
        json!(["2", "2", "user:role", "phx_reply",
               {"status": "error", "response": {"reason": "unauthorized, cannot join 'user:role' channel"}}])
    );
    assert_eq!(
        anon.join("user:1").await,
        json!(["3", "3", "user:1", "phx_reply",
               {"status": "error", "response": {"reason": "unauthorized, cannot join 'user:1' channel"}}])
    );

    let mut authed = gw.authenticated(7).await;
    authed.join_ok("user:public").await;
    authed.join_ok("user:role").await;
    authed.join_ok("user:7").await;
    // Ownership: another user's channel, or a non-canonical spelling of one's own, is refused.
    for topic in ["user:8", "user:07", "user:", "user:abc"] {
        let reply = authed.join(topic).await;
        let reason = format!("unauthorized, cannot join '{topic}' channel");
        assert_eq!(
            reply[4],
            json!({"status": "error", "response": {"reason": reason}}),
            "{topic}"
        );
    }
}

#[tokio::test]
async fn unknown_topics_and_pushes_to_unjoined_topics_are_unmatched() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut client = gw.authenticated(3).await;
    let unmatched = json!({"status": "error", "response": {"reason": "unmatched topic"}});

    assert_eq!(
        client.join("rooms:lobby").await,
        json!([null, "1", "rooms:lobby", "phx_reply", unmatched])
    );
    client
        .send(json!(["5", "6", "user:public", "is_online", {"user_id": 3}]))
        .await;
    assert_eq!(
        client.frame().await,
        json!([null, "6", "user:public", "phx_reply", unmatched])
    );
    // A leave of a topic that is not joined is answered ok (phoenix.js sends it after refused joins).
    client
        .send(json!(["7", "8", "user:role", "phx_leave", {}]))
        .await;
    assert_eq!(
        client.frame().await,
        json!(["7", "8", "user:role", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[tokio::test]
async fn leave_replies_then_closes_and_stops_delivery() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut client = gw.authenticated(4).await;
    let join_ref = client.join_ok("user:role").await;

    client
        .send(json!([join_ref, "20", "user:role", "phx_leave", {}]))
        .await;
    assert_eq!(
        client.frame().await,
        json!([join_ref, "20", "user:role", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        client.frame().await,
        json!([join_ref, join_ref, "user:role", "phx_close", {}])
    );
    gw.publish(
        &publisher,
        "role",
        r#"{"event":"permissionsChanged","payload":{"lookup":"user"}}"#,
    )
    .await;
    client.silent_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_second_join_closes_the_first_and_delivery_stays_exactly_once() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut client = gw.authenticated(4).await;
    let first = client.join_ok("user:public").await;

    client
        .send(json!(["9", "9", "user:public", "phx_join", {}]))
        .await;
    assert_eq!(
        client.frame().await,
        json!([first, first, "user:public", "phx_close", {}])
    );
    assert_eq!(
        client.frame().await,
        json!(["9", "9", "user:public", "phx_reply", {"status": "ok", "response": {}}])
    );
    gw.publish(
        &publisher,
        "public",
        r#"{"event":"announcement","payload":{"motd":"x"}}"#,
    )
    .await;
    assert_eq!(
        client.frame().await,
        broadcast("user:public", "announcement", json!({"motd": "x"}))
    );
    client.silent_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn is_online_answers_for_numbers_and_strings_and_refuses_bad_ids() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut me = gw.authenticated(42).await;
    let jr = me.join_ok("user:public").await;
    let ok = |id: serde_json::Value, online: bool| json!({"status": "ok", "response": {"id": id, "online": online}});

    assert_eq!(
        me.push(&jr, "user:public", "is_online", json!({"user_id": 42}))
            .await[4],
        ok(json!(42), true)
    );
    assert_eq!(
        me.push(&jr, "user:public", "is_online", json!({"user_id": "42"}))
            .await[4],
        ok(json!("42"), true)
    );
    assert_eq!(
        me.push(&jr, "user:public", "is_online", json!({"user_id": 43}))
            .await[4],
        ok(json!(43), false)
    );

    // Answered on any joined user:* topic.
    let own = me.join_ok("user:42").await;
    assert_eq!(
        me.push(&own, "user:42", "is_online", json!({"user_id": 42}))
            .await[4],
        ok(json!(42), true)
    );

    for bad in [
        json!({}),
        json!({"user_id": "4x"}),
        json!({"user_id": -1}),
        json!({"user_id": null}),
        json!([42]),
    ] {
        let reply = me.push(&jr, "user:public", "is_online", bad.clone()).await;
        assert_eq!(reply[4]["status"], "error", "{bad}");
        assert!(reply[4]["response"]["reason"].is_string(), "{bad}");
    }
    let reply = me.push(&jr, "user:public", "shout", json!({})).await;
    assert_eq!(
        reply,
        json!([jr, reply[1], "user:public", "phx_reply", {"status": "error", "response": {"reason": "unknown event"}}])
    );
    // The channel is still joined after those errors.
    assert_eq!(
        me.push(&jr, "user:public", "is_online", json!({"user_id": 42}))
            .await[4],
        ok(json!(42), true)
    );

    // An anonymous socket asks about the same user.
    let mut anon = gw.anonymous().await;
    let ajr = anon.join_ok("user:public").await;
    assert_eq!(
        anon.push(&ajr, "user:public", "is_online", json!({"user_id": 42}))
            .await[4],
        ok(json!(42), true)
    );
    me.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let reply = anon
            .push(&ajr, "user:public", "is_online", json!({"user_id": 42}))
            .await;
        if reply[4] == ok(json!(42), false) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "user still online after closing: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn malformed_frames_close_the_socket_with_a_documented_code() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let cases: [(&str, u16); 5] = [
        ("not json", 1007),
        (r#"{"topic":"phoenix"}"#, 1007),
        (r#"[null,"1","phoenix"]"#, 1007),
        (r#"[null,1,"phoenix","heartbeat",{}]"#, 1007),
        (r#"[null,"1",null,"heartbeat",{}]"#, 1007),
    ];
    for (text, code) in cases {
        let mut client = gw.anonymous().await;
        client.send_text(text).await;
        assert_eq!(client.next().await, Next::Closed(Some(code)), "{text}");
    }
    let mut client = gw.anonymous().await;
    client.send_raw(Message::binary(vec![0u8, 1, 2])).await;
    assert_eq!(client.next().await, Next::Closed(Some(1003)));
    let mut client = gw.anonymous().await;
    let huge = format!(
        r#"[null,"1","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(70_000)
    );
    client.send_text(&huge).await;
    assert_eq!(client.next().await, Next::Closed(Some(1009)));

    // Others are unaffected.
    let mut healthy = gw.anonymous().await;
    healthy.join_ok("user:public").await;
}

#[tokio::test]
async fn an_idle_socket_is_closed() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__WS__IDLE_TIMEOUT_SECS", "1"),
    )
    .await;
    let mut idle = gw.anonymous().await;
    let mut busy = gw.anonymous().await;
    let started = std::time::Instant::now();
    // The busy socket heartbeats every 300 ms and stays open.
    for i in 0..6 {
        busy.send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]))
            .await;
        busy.frame().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(idle.next().await, Next::Closed(Some(4000)));
    assert!(started.elapsed() >= Duration::from_millis(900));
    busy.send(json!([null, "x", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(busy.frame().await[1], "x");
}
