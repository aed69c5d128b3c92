//! Socket authentication: what opens a socket, and what is refused with 403 before the upgrade.

use jsonwebtoken::Algorithm;
use serde_json::json;

use epoch_testkit::*;

#[tokio::test]
async fn anonymous_and_valid_tokens_connect_and_bad_tokens_get_403() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let now = now();

    assert_eq!(
        gw.upgrade_status("vsn=2.0.0").await,
        101,
        "no token: anonymous"
    );
    let valid = gw.token(5);
    assert_eq!(
        gw.upgrade_status(&format!("token={valid}&vsn=2.0.0")).await,
        101
    );

    let good_claims = json!({"sub": "5", "jti": "j", "exp": now + 600});
    // {"alg":"none","typ":"JWT"}.{"sub":"5","jti":"j","exp":9999999999}. with no signature
    let alg_none =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiI1IiwianRpIjoiaiIsImV4cCI6OTk5OTk5OTk5OX0.";
    let refused = [
        (
            "bad signature",
            sign(&good_claims, Algorithm::HS512, "another secret"),
        ),
        (
            "expired",
            mint(&json!({"sub": "5", "jti": "j", "exp": now - 1})),
        ),
        (
            "not yet valid",
            mint(&json!({"sub": "5", "jti": "j", "exp": now + 600, "nbf": now + 60})),
        ),
        ("alg none", alg_none.to_owned()),
        (
            "wrong algorithm",
            sign(&good_claims, Algorithm::HS256, SECRET),
        ),
        ("malformed", "abc.def.ghi".to_owned()),
        ("empty", String::new()),
        ("no jti", mint(&json!({"sub": "5", "exp": now + 600}))),
        ("no sub", mint(&json!({"jti": "j", "exp": now + 600}))),
        (
            "non-numeric sub",
            mint(&json!({"sub": "admin", "jti": "j", "exp": now + 600})),
        ),
        ("no exp", mint(&json!({"sub": "5", "jti": "j"}))),
    ];
    for (case, token) in refused {
        assert_eq!(
            gw.upgrade_status(&format!("token={token}&vsn=2.0.0")).await,
            403,
            "{case}"
        );
    }
    assert_eq!(
        gw.metric("epoch_gateway_auth_failures_total{reason=\"expired\"}")
            .await,
        1.0
    );

    // Unsupported protocol versions: V1 (explicit or implied by a missing vsn) and unknown ones.
    for query in ["", "vsn=1.0.0", "vsn=3.0.0", "vsn=2.1.0"] {
        assert_eq!(gw.upgrade_status(query).await, 403, "query {query:?}");
    }
    // The refusal body is empty.
    let (status, body) = http_get(gw.addr, "/socket/websocket?vsn=2.0.0&token=x")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (403, ""));
}

#[tokio::test]
async fn tokens_never_appear_in_logs() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let bad = sign(
        &json!({"sub": "5", "jti": "j", "exp": now() + 600}),
        Algorithm::HS512,
        "nope",
    );
    assert_eq!(
        gw.upgrade_status(&format!("token={bad}&vsn=2.0.0")).await,
        403
    );
    let good = gw.token(6);
    let client = PhxClient::connect(&gw.socket_url(&format!("token={good}&vsn=2.0.0")))
        .await
        .unwrap();
    client.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let logs = gw.logs().join("\n");
    assert!(logs.contains("invalid token"), "the refusal is logged");
    for secret in [bad.as_str(), good.as_str(), SECRET] {
        assert!(!logs.contains(secret), "a secret leaked into the logs");
    }
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env(
            "EPOCH_GATEWAY__HTTP__ALLOWED_ORIGINS",
            "https://forum.example,localhost",
        ),
    )
    .await;
    assert_eq!(
        gw.upgrade_status("vsn=2.0.0").await,
        101,
        "no Origin header: accepted"
    );
    assert_eq!(gw.upgrade_status_from("https://forum.example").await, 101);
    assert_eq!(gw.upgrade_status_from("http://localhost:5173").await, 101);
    for origin in [
        "https://evil.example",
        "http://forum.example",
        "https://forum.example.evil",
        "null",
    ] {
        assert_eq!(gw.upgrade_status_from(origin).await, 403, "{origin}");
    }
    assert_eq!(
        gw.metric("epoch_gateway_upgrades_refused_origin_total")
            .await,
        4.0
    );

    // Without a list (development), any origin is accepted.
    let open = Gateway::start(&nats.url).await;
    assert_eq!(
        open.upgrade_status_from("https://anywhere.example").await,
        101
    );
}
