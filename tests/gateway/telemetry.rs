//! Observability: real OTLP receivers (HTTP/protobuf, and gRPC over HTTP/2) get the gateway's spans,
//! continuing the publisher's trace, configured by the gateway's keys or the standard `OTEL_*` variables;
//! a collector that is down costs counted drops and one warning, never a slow socket; and a scripted
//! scenario moves every counter of `/metrics` by the expected amount.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;

use epoch_testkit::*;

/// One export request as a receiver got it: its HTTP headers or gRPC metadata, and its body.
#[derive(Clone, Debug)]
struct Export {
    headers: Vec<(String, String)>,
    request: ExportTraceServiceRequest,
}

impl Export {
    fn of(headers: &axum::http::HeaderMap, request: ExportTraceServiceRequest) -> Self {
        let headers = headers
            .iter()
            .map(|(name, value)| {
                let value = value.to_str().unwrap_or("<not text>");
                (name.as_str().to_owned(), value.to_owned())
            })
            .collect();
        Self { headers, request }
    }

    fn spans(&self) -> impl Iterator<Item = &Span> {
        self.request
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .flat_map(|scope| &scope.spans)
    }

    /// Every value of header `name`.
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A string attribute of the resource of this export's spans.
    fn resource(&self, key: &str) -> Option<String> {
        let resource = self.request.resource_spans.first()?.resource.as_ref()?;
        match resource
            .attributes
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .clone()?
            .value?
        {
            AnyValue::StringValue(value) => Some(value),
            other => panic!("resource attribute {key} is {other:?}"),
        }
    }
}

type Exports = Arc<Mutex<Vec<Export>>>;

/// An OTLP trace receiver on a random loopback port.
struct Receiver {
    /// What the gateway is configured with: the base URL (HTTP) or the target (gRPC).
    endpoint: String,
    exports: Exports,
}

/// The gRPC side: `TraceService/Export`, as a collector serves it on 4317.
struct GrpcTraces(Exports);

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        let export = Export::of(&headers, request.into_inner());
        self.0.lock().unwrap().push(export);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// OTLP/HTTP (protobuf): `POST /v1/traces`.
    async fn http() -> Self {
        let exports: Exports = Arc::default();
        let store = Arc::clone(&exports);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let store = Arc::clone(&store);
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
                    store.lock().unwrap().push(Export::of(&headers, request));
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
        Self { endpoint, exports }
    }

    /// OTLP/gRPC: a tonic server with the collector's trace service.
    async fn grpc() -> Self {
        Self::grpc_with(tonic::transport::Server::builder(), "http").await
    }

    /// OTLP/gRPC over TLS, with the certificate of `tls/` (`localhost`, `127.0.0.1`) signed by the test CA.
    async fn grpc_tls() -> Self {
        let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gateway/tls");
        let read = |name: &str| std::fs::read(tls.join(name)).unwrap();
        let identity = tonic::transport::Identity::from_pem(read("server.pem"), read("server.key"));
        let server = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap();
        Self::grpc_with(server, "https").await
    }

    async fn grpc_with(mut server: tonic::transport::Server, scheme: &str) -> Self {
        let exports: Exports = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
        let service = TraceServiceServer::new(GrpcTraces(Arc::clone(&exports)));
        tokio::spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Self { endpoint, exports }
    }

    async fn wait_for(&self, what: &str, matches: impl Fn(&Span) -> bool) -> Span {
        let (_, span) = self.wait_for_export(what, matches).await;
        span
    }

    /// The first span that `matches`, and the export that carried it.
    async fn wait_for_export(&self, what: &str, matches: impl Fn(&Span) -> bool) -> (Export, Span) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.exports.lock().unwrap().iter().find_map(|export| {
                let span = export.spans().find(|s| matches(s))?;
                Some((export.clone(), span.clone()))
            });
            if let Some(found) = found {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no span {what}; got {:#?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.exports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|export| export.spans().cloned().collect::<Vec<_>>())
            .collect()
    }

    fn names(&self) -> Vec<String> {
        self.spans().into_iter().map(|s| s.name).collect()
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
    let receiver = Receiver::http().await;
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
    for span in &receiver.spans() {
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

/// Headers for the exporter, percent-encoded as `OTEL_EXPORTER_OTLP_HEADERS` wants them.
const HEADERS: &str = "x-api-key=s3cr%20t,X-Tenant=forum";

/// Asserts that `export` carried the headers of [`HEADERS`], decoded, each once.
fn assert_headers(export: &Export) {
    assert_eq!(
        export.header("x-api-key"),
        ["s3cr t"],
        "{:?}",
        export.headers
    );
    assert_eq!(export.header("x-tenant"), ["forum"], "{:?}", export.headers);
}

#[tokio::test]
async fn spans_go_over_grpc_as_the_standard_variables_say() {
    let receiver = Receiver::grpc().await;
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default()
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
            .env("OTEL_EXPORTER_OTLP_HEADERS", HEADERS)
            .env(
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test,service.name=from-attributes,team=real%2Dtime",
            )
            .env("OTEL_SERVICE_NAME", "edge-gateway")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let mut client = gw.authenticated(7).await;
    client.join_ok("user:7").await;

    let (export, connect) = receiver
        .wait_for_export("ws.connect", |s| s.name == "ws.connect")
        .await;
    assert_eq!(
        attribute(&connect, "auth"),
        Some(AnyValue::StringValue("authenticated".to_owned()))
    );
    // OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES; the rest are decoded.
    assert_eq!(
        export.resource("service.name").as_deref(),
        Some("edge-gateway")
    );
    assert_eq!(
        export.resource("deployment.environment").as_deref(),
        Some("test")
    );
    assert_eq!(export.resource("team").as_deref(), Some("real-time"));
    assert_eq!(
        export.resource("telemetry.sdk.language").as_deref(),
        Some("rust")
    );
    // The headers arrive as gRPC metadata (HTTP/2 headers), once each.
    assert_headers(&export);
    assert_eq!(export.header("content-type"), ["application/grpc"]);
    let logs = gw.logs();
    assert!(
        logs.iter().any(|l| l.contains("exporting traces over OTLP")
            && l.contains("protocol=\"grpc\"")
            && l.contains("from=\"OTEL_EXPORTER_OTLP_ENDPOINT\"")),
        "{logs:#?}"
    );
    assert!(
        !logs.iter().any(|l| l.contains("s3cr")),
        "a header value in the logs: {logs:#?}"
    );
}

#[tokio::test]
async fn a_grpc_endpoint_without_a_scheme_is_tls_checked_against_the_trusted_roots() {
    let receiver = Receiver::grpc_tls().await;
    let port = receiver.endpoint.rsplit(':').next().unwrap();
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gateway/tls/ca.pem");
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default()
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            // No scheme and no OTEL_EXPORTER_OTLP_INSECURE: TLS, verified for the name "localhost".
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("localhost:{port}"))
            // The roots the exporter trusts instead of the system's: the test CA alone.
            .env("SSL_CERT_FILE", ca.to_str().unwrap())
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let mut client = gw.anonymous().await;
    client.join_ok("user:public").await;
    receiver
        .wait_for("ws.connect", |s| s.name == "ws.connect")
        .await;
    let logs = gw.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains(&format!("endpoint=https://localhost:{port}"))),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn the_gateways_keys_win_over_the_standard_variables() {
    // The keys say: HTTP to this receiver, as "from-key"; the variables say gRPC to the other one.
    let chosen = Receiver::http().await;
    let other = Receiver::grpc().await;
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default()
            .env("EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT", &chosen.endpoint)
            .env("EPOCH_GATEWAY__TELEMETRY__OTLP_PROTOCOL", "http/protobuf")
            .env("EPOCH_GATEWAY__TELEMETRY__SERVICE_NAME", "from-key")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &other.endpoint)
            .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &other.endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env("OTEL_SERVICE_NAME", "from-variable")
            .env("OTEL_EXPORTER_OTLP_HEADERS", HEADERS)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let mut client = gw.anonymous().await;
    client.join_ok("user:public").await;

    let (export, _) = chosen
        .wait_for_export("ws.connect", |s| s.name == "ws.connect")
        .await;
    assert_eq!(export.resource("service.name").as_deref(), Some("from-key"));
    // Headers have no key: the variable applies, as HTTP headers.
    assert_headers(&export);
    assert_eq!(export.header("content-type"), ["application/x-protobuf"]);
    // The receiver the variables name got nothing: every span went to the chosen one.
    chosen
        .wait_for("channel.join", |s| s.name == "channel.join")
        .await;
    assert!(other.spans().is_empty(), "{:?}", other.names());
}

#[tokio::test]
async fn a_collector_that_is_down_costs_counted_spans_and_one_warning() {
    // A port nobody listens on: every export is refused, then retried by the exporter, then dropped.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let nats = Nats::start();
    let gw = Gateway::start_with(
        &nats.url,
        GatewayOptions::default()
            .env("EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT", &endpoint)
            .env("EPOCH_GATEWAY__TELEMETRY__OTLP_PROTOCOL", "grpc")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let dropped = "epoch_gateway_trace_spans_dropped_total{reason=\"export_failed\"}";
    assert_eq!(gw.metric(dropped).await, 0.0);

    // Several seconds of sockets coming and going (spans: ws.connect, channel.join, socket), while one
    // socket's heartbeats are answered as promptly as ever.
    let mut steady = gw.anonymous().await;
    let started = Instant::now();
    let mut heartbeats = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let mut passing = gw.anonymous().await;
        passing.join_ok("user:public").await;
        passing.close().await;
        let r = steady.make_ref();
        let sent = Instant::now();
        let reply = steady
            .request(
                &json!([null, r, "phoenix", "heartbeat", {}]),
                Duration::from_secs(1),
            )
            .await
            .expect("a heartbeat answered within a second");
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        assert!(sent.elapsed() < Duration::from_secs(1));
        heartbeats += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(heartbeats >= 10, "{heartbeats} heartbeats in 6 s");

    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric(dropped).await < 1.0 {
        assert!(Instant::now() < deadline, "no dropped span counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = gw.logs();
    let warnings: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("trace export failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning a minute at most: {logs:#?}");
    assert!(warnings[0].contains(" WARN "), "{}", warnings[0]);
    // Nothing else about it: none of the SDK's per-export events, no error at all.
    for line in logs.iter().filter(|l| !l.contains("trace export failed")) {
        assert!(
            !line.contains(" ERROR ")
                && !line.contains("opentelemetry")
                && !line.contains("Export"),
            "{line}"
        );
    }
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
