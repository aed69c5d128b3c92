//! Sessions ended from the backend: logout revokes one token, disconnect closes a user, tokens expire.

use std::time::{Duration, Instant};

use serde_json::json;

use epoch_testkit::*;

fn token_with(user: u64, jti: &str, ttl: u64) -> String {
    mint(&json!({"sub": user.to_string(), "jti": jti, "exp": now() + ttl}))
}

async fn connect(gw: &Gateway, token: &str) -> PhxClient {
    PhxClient::connect(&gw.socket_url(&format!("token={token}&vsn=2.0.0")))
        .await
        .expect("socket opens")
}

#[tokio::test]
async fn logout_delivers_then_closes_that_token_everywhere_and_refuses_it() {
    let nats = Nats::start();
    let (prefix, bucket) = (unique("s"), unique("presence_"));
    let gw = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let other_gw = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let publisher = nats.client().await;
    let (revoked, kept) = (
        token_with(90, &uuid::Uuid::new_v4().to_string(), 600),
        token_with(90, &uuid::Uuid::new_v4().to_string(), 600),
    );

    let mut device1 = connect(&gw, &revoked).await;
    let mut device1_elsewhere = connect(&other_gw, &revoked).await;
    let mut device2 = connect(&gw, &kept).await;
    for client in [&mut device1, &mut device1_elsewhere, &mut device2] {
        client.join_ok("user:90").await;
    }

    let body = json!({"event": "logout", "payload": {"token": revoked}}).to_string();
    gw.publish(&publisher, "90", &body).await;
    let logout = broadcast("user:90", "logout", json!({"token": revoked}));
    for client in [&mut device1, &mut device1_elsewhere] {
        assert_eq!(
            client.frame().await,
            logout,
            "the client gets the event first"
        );
        assert_eq!(client.next().await, Next::Closed(Some(4402)));
    }
    assert_eq!(device2.frame().await, logout);
    device2
        .send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        device2.frame().await[1],
        "hb",
        "the other session stays connected"
    );

    // The revoked token opens no socket anywhere; the other one still does.
    for g in [&gw, &other_gw] {
        let deadline = Instant::now() + Duration::from_secs(2);
        while g
            .upgrade_status(&format!("token={revoked}&vsn=2.0.0"))
            .await
            != 403
        {
            assert!(Instant::now() < deadline, "revoked token still accepted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            g.upgrade_status(&format!("token={kept}&vsn=2.0.0")).await,
            101
        );
    }
    // A gateway started later learns the revocation from the bucket.
    let late = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while late
        .upgrade_status(&format!("token={revoked}&vsn=2.0.0"))
        .await
        != 403
    {
        assert!(
            Instant::now() < deadline,
            "revocation not loaded from the bucket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gw.metric("epoch_gateway_auth_failures_total{reason=\"revoked\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn disconnect_closes_every_socket_of_the_user_and_no_other() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut joined = gw.authenticated(91).await;
    joined.join_ok("user:public").await;
    let mut idle = gw.authenticated(91).await;
    let mut bystander = gw.authenticated(92).await;
    bystander.join_ok("user:92").await;

    gw.publish(&publisher, "91", r#"{"event":"disconnect"}"#)
        .await;
    assert_eq!(joined.next().await, Next::Closed(Some(4403)));
    assert_eq!(idle.next().await, Next::Closed(Some(4403)));
    bystander.silent_for(Duration::from_millis(200)).await;
    bystander
        .send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(bystander.frame().await[1], "hb");
}

#[tokio::test]
async fn a_socket_is_closed_when_its_token_expires() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut client = connect(&gw, &token_with(93, "soon", 2)).await;
    client.join_ok("user:93").await;
    let started = Instant::now();
    assert_eq!(client.next().await, Next::Closed(Some(4401)));
    assert!(started.elapsed() <= Duration::from_secs(3));

    // Switched off, the socket stays.
    let lenient = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__AUTH__CLOSE_ON_EXPIRY", "false"),
    )
    .await;
    let mut client = connect(&lenient, &token_with(94, "soon2", 1)).await;
    client.join_ok("user:94").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(client.frame().await[1], "hb");
}
