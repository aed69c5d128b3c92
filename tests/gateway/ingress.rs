//! NATS ingress: every Epochtalk event reaches every joined socket exactly once; invalid messages do not.

use std::time::Duration;

use serde_json::json;

use epoch_testkit::*;

#[tokio::test]
async fn every_event_reaches_each_joined_socket_exactly_once() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut anon = gw.anonymous().await;
    let mut user = gw.authenticated(11).await;
    let mut other = gw.authenticated(12).await;
    anon.join_ok("user:public").await;
    for topic in ["user:public", "user:role", "user:11"] {
        user.join_ok(topic).await;
    }
    other.join_ok("user:role").await;
    other.join_ok("user:12").await;

    // A message published right after the join reply is delivered.
    gw.publish(
        &publisher,
        "public",
        r#"{"event":"announcement","payload":{"motd":"message"}}"#,
    )
    .await;
    let announcement = broadcast("user:public", "announcement", json!({"motd": "message"}));
    assert_eq!(anon.frame().await, announcement);
    assert_eq!(user.frame().await, announcement);

    gw.publish(
        &publisher,
        "role",
        r#"{"event":"permissionsChanged","payload":{"lookup":"user"}}"#,
    )
    .await;
    let changed = broadcast("user:role", "permissionsChanged", json!({"lookup": "user"}));
    assert_eq!(user.frame().await, changed);
    assert_eq!(other.frame().await, changed);

    let personal = [
        ("reauthenticate", json!({})),
        ("logout", json!({"token": "some_token"})),
        ("newMessage", json!({})),
        ("refreshMentions", json!({})),
        (
            "someFutureEvent",
            json!({"nested": {"list": [1, "two", null]}}),
        ),
    ];
    for (event, payload) in &personal {
        let body = json!({"event": event, "payload": payload}).to_string();
        gw.publish(&publisher, "11", &body).await;
        assert_eq!(
            user.frame().await,
            broadcast("user:11", event, payload.clone())
        );
    }
    // A missing payload defaults to {}.
    gw.publish(&publisher, "11", r#"{"event":"refreshMentions"}"#)
        .await;
    assert_eq!(
        user.frame().await,
        broadcast("user:11", "refreshMentions", json!({}))
    );

    // Nothing twice, nothing to the wrong socket.
    user.silent_for(Duration::from_millis(300)).await;
    anon.silent_for(Duration::from_millis(50)).await;
    other.silent_for(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn invalid_nats_messages_are_dropped_counted_and_harmless() {
    invalid_messages(Path::Stream).await;
}

#[tokio::test]
async fn without_the_event_stream_invalid_messages_are_dropped_and_counted_as_before() {
    invalid_messages(Path::Core).await;
}

/// How messages reach the gateway.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Through the event stream (the default).
    Stream,
    /// Core NATS (`delivery.enabled=false`), the gateway subscribed to every user subject.
    Core,
}

async fn invalid_messages(path: Path) {
    let nats = Nats::start();
    let options = match path {
        Path::Stream => GatewayOptions::default(),
        Path::Core => GatewayOptions::default().env("EPOCH_GATEWAY__DELIVERY__ENABLED", "false"),
    };
    let gw = Gateway::start_with(&nats.url, options).await;
    let publisher = nats.client().await;
    let mut client = gw.authenticated(5).await;
    client.join_ok("user:public").await;
    client.join_ok("user:5").await;

    let huge = format!(
        r#"{{"event":"announcement","payload":{{"x":"{}"}}}}"#,
        "y".repeat(70_000)
    );
    let invalid: [(&str, &str, &str); 11] = [
        ("public", "not json", "not_json"),
        ("public", r#"{"payload":{}}"#, "not_json"),
        ("public", r#"["announcement",{}]"#, "not_json"),
        ("public", r#"{"event":42}"#, "not_json"),
        ("public", r#"{"event":""}"#, "bad_event"),
        ("public", r#"{"event":"phx_close"}"#, "bad_event"),
        (
            "public",
            r#"{"event":"phx_reply","payload":{"status":"ok"}}"#,
            "bad_event",
        ),
        (
            "public",
            r#"{"event":"announcement","payload":[1,2]}"#,
            "bad_payload",
        ),
        (
            "5",
            r#"{"event":"logout","payload":"token"}"#,
            "bad_payload",
        ),
        ("public", &huge, "too_large"),
        ("05", r#"{"event":"logout","payload":{}}"#, "bad_subject"),
    ];
    for (suffix, body, _) in &invalid {
        gw.publish(&publisher, suffix, body).await;
    }
    gw.publish(
        &publisher,
        "public",
        r#"{"event":"announcement","payload":{"after":"bad ones"}}"#,
    )
    .await;
    assert_eq!(
        client.frame().await,
        broadcast("user:public", "announcement", json!({"after": "bad ones"}))
    );
    client.silent_for(Duration::from_millis(200)).await;

    for reason in [
        "not_json",
        "bad_event",
        "bad_payload",
        "too_large",
        "bad_subject",
    ] {
        let mut expected = invalid.iter().filter(|(_, _, r)| *r == reason).count() as f64;
        if path == Path::Stream && reason == "bad_subject" {
            // The stream stores them, but no instance follows a subject that names no topic.
            expected = 0.0;
        }
        let counted = gw
            .metric(&format!(
                "epoch_gateway_ingress_drops_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(counted, expected, "{reason}");
    }
    // The instance still serves: a new socket joins and receives.
    let mut fresh = gw.anonymous().await;
    fresh.join_ok("user:public").await;
    gw.publish(&publisher, "public", r#"{"event":"announcement"}"#)
        .await;
    assert_eq!(
        fresh.frame().await,
        broadcast("user:public", "announcement", json!({}))
    );
}
