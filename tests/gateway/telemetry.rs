//! Observability: a real OTLP/HTTP receiver gets the gateway's spans, continuing the publisher's trace;
//! and a scripted scenario moves every counter of `/metrics` by the expected amount.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;

use epoch_testkit::*;

/// An OTLP/HTTP (protobuf) trace receiver on a random loopback port.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let store = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let store = Arc::clone(&store);
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
                    let mut spans = store.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            spans.extend(scope.spans);
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { endpoint, spans }
    }

    async fn wait_for(&self, what: &str, matches: impl Fn(&Span) -> bool) -> Span {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(span) = self.spans.lock().unwrap().iter().find(|s| matches(s)) {
                return span.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no span {what}; got {:#?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn names(&self) -> Vec<String> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

#[tokio::test]
async fn a_published_message_continues_the_publishers_trace_in_exported_spans() {
    let receiver = Receiver::start().await;
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default()
            .env(
                "EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT",
                &receiver.endpoint,
            )
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let mut client = gw.authenticated(12).await;
    client.join_ok("user:12").await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").as_str(),
    );
    let publisher = nats.client().await;
    publisher
        .publish_with_headers(
            format!("{}.user.12", gw.prefix),
            headers,
            r#"{"event":"newMessage"}"#.into(),
        )
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(
        client.frame().await,
        broadcast("user:12", "newMessage", json!({}))
    );

    let span = receiver
        .wait_for("nats.message in the publisher's trace", |s| {
            s.name == "nats.message" && hex(&s.trace_id) == trace_id
        })
        .await;
    assert_eq!(
        hex(&span.parent_span_id),
        parent_id,
        "a child of the publisher's span"
    );
    assert_eq!(
        attribute(&span, "event"),
        Some(AnyValue::StringValue("newMessage".to_owned()))
    );
    assert_eq!(
        attribute(&span, "topic"),
        Some(AnyValue::StringValue("user:12".to_owned()))
    );
    assert_eq!(attribute(&span, "sockets"), Some(AnyValue::IntValue(1)));
    assert_eq!(attribute(&span, "dropped"), Some(AnyValue::IntValue(0)));

    // The socket's own spans: the connect (auth outcome, never the token) and the join.
    let connect = receiver
        .wait_for("ws.connect", |s| s.name == "ws.connect")
        .await;
    assert_eq!(
        attribute(&connect, "auth"),
        Some(AnyValue::StringValue("authenticated".to_owned()))
    );
    receiver
        .wait_for("channel.join", |s| s.name == "channel.join")
        .await;
    for span in receiver.spans.lock().unwrap().iter() {
        for kv in &span.attributes {
            if let Some(AnyValue::StringValue(value)) = kv.value.clone().and_then(|v| v.value) {
                assert!(
                    !value.contains("eyJ"),
                    "a token in span {} attribute {}",
                    span.name,
                    kv.key
                );
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_scripted_scenario_moves_each_counter_by_the_expected_amount() {
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default().env("EPOCH_GATEWAY__WS__OUTBOUND_QUEUE", "4"),
    )
    .await;
    let publisher = nats.client().await;
    let metric = |name: &'static str| {
        let gw = &gw;
        async move { gw.metric(name).await }
    };

    // Connect: one anonymous, one authenticated; one refused token.
    let mut anon = gw.anonymous().await;
    let mut user = gw.authenticated(3).await;
    assert_eq!(gw.upgrade_status("vsn=2.0.0&token=bad").await, 403);
    assert_eq!(
        metric("epoch_gateway_connections{kind=\"anonymous\"}").await,
        1.0
    );
    assert_eq!(
        metric("epoch_gateway_connections{kind=\"authenticated\"}").await,
        1.0
    );
    assert_eq!(
        metric("epoch_gateway_auth_failures_total{reason=\"malformed\"}").await,
        1.0
    );

    // Join: two public, one role, one user.
    let ajr = anon.join_ok("user:public").await;
    user.join_ok("user:public").await;
    user.join_ok("user:role").await;
    user.join_ok("user:3").await;
    assert_eq!(
        metric("epoch_gateway_joins_total{kind=\"public\"}").await,
        2.0
    );
    assert_eq!(
        metric("epoch_gateway_joins_total{kind=\"role\"}").await,
        1.0
    );
    assert_eq!(
        metric("epoch_gateway_joins_total{kind=\"user\"}").await,
        1.0
    );

    // Publish: one announcement reaches two sockets.
    gw.publish(&publisher, "public", r#"{"event":"announcement"}"#)
        .await;
    anon.frame().await;
    user.frame().await;
    assert_eq!(
        metric("epoch_gateway_nats_events_total{event=\"announcement\"}").await,
        1.0
    );
    assert!(metric("epoch_gateway_fanout_latency_seconds_count").await >= 1.0);

    // is_online: one query, one latency observation.
    anon.push(&ajr, "user:public", "is_online", json!({"user_id": 3}))
        .await;
    assert_eq!(metric("epoch_gateway_is_online_queries_total").await, 1.0);
    assert_eq!(
        metric("epoch_gateway_is_online_latency_seconds_count").await,
        1.0
    );

    // Bad message: dropped and counted; no subscribers: counted.
    gw.publish(&publisher, "public", "not json").await;
    gw.publish(&publisher, "role", r#"{"event":"permissionsChanged"}"#)
        .await;
    gw.publish(&publisher, "public", r#"{"event":"somethingElse"}"#)
        .await;
    anon.frame().await;
    user.frame().await;
    user.frame().await;
    assert_eq!(
        metric("epoch_gateway_ingress_drops_total{reason=\"not_json\"}").await,
        1.0
    );
    assert_eq!(
        metric("epoch_gateway_nats_events_total{event=\"other\"}").await,
        1.0
    );

    // Slow client: `user` stops reading while 5,000 frames of 1 KiB are published; it is cut off (4001).
    anon.close().await;
    let padding = "x".repeat(1024);
    for seq in 0..5000 {
        let body =
            json!({"event": "announcement", "payload": {"seq": seq, "pad": padding}}).to_string();
        publisher
            .publish(format!("{}.user.public", gw.prefix), body.into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric("epoch_gateway_slow_consumer_closes_total").await < 1.0 {
        assert!(Instant::now() < deadline, "slow consumer not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric("epoch_gateway_closes_total{code=\"4001\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "close 4001 not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The anonymous client closed by itself: code 0.
    assert_eq!(metric("epoch_gateway_closes_total{code=\"0\"}").await, 1.0);
    assert_eq!(metric("epoch_gateway_nats_connected").await, 1.0);
}

#[tokio::test]
async fn every_metric_on_the_grafana_dashboard_is_exported() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let exported = gw.http_body("/metrics").await;
    assert!(
        exported.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends in # EOF"
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/epoch-gateway.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("epoch_gateway_"))
            {
                assert!(
                    exported.contains(&format!("\n{name}")),
                    "{name} (panel {}) is not exported",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10);
}
