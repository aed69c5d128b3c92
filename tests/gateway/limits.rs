//! Limits on what one client, or a crowd of them, can make an instance do.

use std::time::{Duration, Instant};

use serde_json::json;

use epoch_testkit::*;

#[tokio::test]
async fn connections_beyond_the_instance_limit_get_503() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__WS__MAX_CONNECTIONS", "2"),
    )
    .await;
    let first = gw.anonymous().await;
    let _second = gw.anonymous().await;
    assert_eq!(gw.upgrade_status("vsn=2.0.0").await, 503);
    first.close().await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while gw.upgrade_status("vsn=2.0.0").await != 101 {
        assert!(
            Instant::now() < deadline,
            "the closed socket's slot was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn new_connections_beyond_the_rate_get_503() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__WS__MAX_NEW_CONNECTIONS_PER_SEC", "5"),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(gw.upgrade_status("vsn=2.0.0").await);
    }
    let accepted = statuses.iter().filter(|s| **s == 101).count();
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(accepted + refused, 25, "{statuses:?}");
    // A burst of 10, plus what refills (5/s) while the loop runs.
    assert!((10..=15).contains(&accepted), "{statuses:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gw.upgrade_status("vsn=2.0.0").await, 101);
}

#[tokio::test]
async fn joins_beyond_the_topic_limit_are_refused() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__WS__MAX_TOPICS", "2"),
    )
    .await;
    let mut client = gw.authenticated(5).await;
    client.join_ok("user:public").await;
    client.join_ok("user:role").await;
    let reply = client.join("user:5").await;
    assert_eq!(
        reply[4],
        json!({"status": "error", "response": {"reason": "too many topics joined"}})
    );
}

#[tokio::test]
async fn a_push_flood_gets_error_replies_then_a_close() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default()
            .env("EPOCH_GATEWAY__WS__MAX_PUSHES_PER_SEC", "10")
            .env("EPOCH_GATEWAY__WS__PUSH_BURST", "20"),
    )
    .await;
    let mut client = gw.anonymous().await;
    let jr = client.join_ok("user:public").await;
    let mut well_behaved = gw.anonymous().await;
    let wjr = well_behaved.join_ok("user:public").await;

    for i in 0..200 {
        if !client
            .try_send(json!([jr, i.to_string(), "user:public", "is_online", {"user_id": 1}]))
            .await
        {
            break;
        }
    }
    let (mut ok, mut limited) = (0, 0);
    let close = loop {
        match client.next().await {
            Next::Frame(frame) if frame[4]["status"] == "ok" => ok += 1,
            Next::Frame(frame) => {
                assert_eq!(frame[4]["response"]["reason"], "rate limited", "{frame}");
                limited += 1;
            }
            Next::Closed(code) => break code,
        }
    };
    assert_eq!(close, Some(1008));
    assert!((19..=22).contains(&ok), "the burst (20) is answered: {ok}");
    assert!(limited >= 10, "{limited}");
    // Nobody else is affected.
    let reply = well_behaved
        .push(&wjr, "user:public", "is_online", json!({"user_id": 1}))
        .await;
    assert_eq!(reply[4]["status"], "ok");
}

#[tokio::test]
async fn a_socket_that_never_speaks_is_closed_after_the_first_frame_timeout() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__WS__FIRST_FRAME_TIMEOUT_SECS", "1"),
    )
    .await;
    let mut silent = gw.anonymous().await;
    let mut talker = gw.anonymous().await;
    talker.join_ok("user:public").await;
    let started = Instant::now();
    assert_eq!(silent.next().await, Next::Closed(Some(4000)));
    assert!(started.elapsed() < Duration::from_secs(2));
    // After its first frame, a socket has the full idle timeout (60 s).
    talker.silent_for(Duration::from_millis(1500)).await;
    talker
        .send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(talker.frame().await[1], "hb");
}

#[tokio::test]
async fn a_page_of_is_online_queries_fits_the_default_burst() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut client = gw.anonymous().await;
    let jr = client.join_ok("user:public").await;
    // A 100-post page asks about every poster at once, as the Epochtalk client does; 150 to spare.
    for user in 0..150 {
        client
            .send(json!([jr, format!("q{user}"), "user:public", "is_online", {"user_id": user}]))
            .await;
    }
    for _ in 0..150 {
        assert_eq!(client.frame().await[4]["status"], "ok");
    }
}
