//! Start without NATS, readiness, and shutdown on SIGTERM.

use std::time::Duration;

use serde_json::json;

use epoch_testkit::*;

#[tokio::test]
async fn starts_without_nats_and_becomes_ready_when_it_appears() {
    let port = free_port();
    let gw = Gateway::start_with(
        &format!("nats://127.0.0.1:{port}"),
        GatewayOptions {
            wait_ready: false,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.http_status("/healthz").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.http_status("/readyz").await, 503);

    let nats = Nats::start_on(port);
    gw.wait_ready().await;
    // Ingress works once connected.
    let publisher = nats.client().await;
    let mut client = gw.anonymous().await;
    client.join_ok("user:public").await;
    gw.publish(&publisher, "public", r#"{"event":"announcement"}"#)
        .await;
    assert_eq!(
        client.frame().await,
        broadcast("user:public", "announcement", json!({}))
    );
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_removes_presence_and_exits_0() {
    let nats = Nats::start();
    let mut gw = Gateway::start(&nats.url).await;
    let mut clients = Vec::new();
    for user in [31, 32] {
        let mut client = gw.authenticated(user).await;
        client.join_ok("user:public").await;
        clients.push(client);
    }
    let js = async_nats::jetstream::new(nats.client().await);
    let store = js.get_key_value(&gw.bucket).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while store
        .get(format!("32.{}", gw.node))
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "presence record not written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    gw.signal("TERM");
    for client in &mut clients {
        assert_eq!(client.next().await, Next::Closed(Some(1001)));
    }
    assert_eq!(gw.wait_exit(Duration::from_secs(10)).await, Some(0));
    for user in [31, 32] {
        assert_eq!(
            store.get(format!("{user}.{}", gw.node)).await.unwrap(),
            None,
            "record of {user} removed"
        );
    }
    let logs = gw.logs().join("\n");
    assert!(
        logs.contains("shutdown signal received") && logs.contains("stopped"),
        "{logs}"
    );
}

#[tokio::test]
async fn sigterm_drains_sockets_in_paced_batches_over_the_window() {
    let nats = Nats::start();
    let mut gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__SHUTDOWN__DRAIN_SECS", "2"),
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut client = gw.anonymous().await;
        client.join_ok("user:public").await;
        clients.push(client);
    }
    gw.signal("TERM");
    let started = std::time::Instant::now();
    // Refused at once: readiness and new sockets.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(gw.http_status("/readyz").await, 503);
    assert_eq!(gw.upgrade_status("vsn=2.0.0").await, 503);

    let closes = futures::future::join_all(clients.into_iter().map(|mut client| async move {
        let next = client.next().await;
        (next, started.elapsed())
    }))
    .await;
    let mut times: Vec<Duration> = closes
        .iter()
        .map(|(next, at)| {
            assert_eq!(*next, Next::Closed(Some(1001)));
            *at
        })
        .collect();
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        last - first >= Duration::from_millis(1500),
        "closes spread over the window: {times:?}"
    );
    let early = times
        .iter()
        .filter(|t| **t < first + Duration::from_millis(300))
        .count();
    assert!(early <= 5, "not all at once: {times:?}");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(started.elapsed() < Duration::from_secs(6));
}
