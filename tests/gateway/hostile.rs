//! Hostile input, table-driven: each malformed client frame and NATS message has its documented outcome,
//! and the instance keeps serving a well-behaved client throughout.

use std::time::Duration;

use serde_json::json;

use epoch_testkit::*;

#[derive(Debug)]
enum Outcome {
    /// The socket is closed with this code.
    Close(u16),
    /// An error reply with this reason.
    Error(&'static str),
    /// An ok reply.
    Ok,
}

fn frames() -> Vec<(&'static str, Message, Outcome)> {
    let text = |s: &str| Message::text(s.to_owned());
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let nested = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
    let deep_payload = format!(r#"["1","1","user:public","is_online",{nested}]"#);
    vec![
        ("not JSON", text("hello"), Outcome::Close(1007)),
        ("empty text", text(""), Outcome::Close(1007)),
        (
            "JSON object (V1 shape)",
            text(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}"#),
            Outcome::Close(1007),
        ),
        ("JSON string", text(r#""phx_join""#), Outcome::Close(1007)),
        ("JSON number", text("42"), Outcome::Close(1007)),
        ("empty array", text("[]"), Outcome::Close(1007)),
        (
            "four elements",
            text(r#"[null,"1","phoenix","heartbeat"]"#),
            Outcome::Close(1007),
        ),
        (
            "numeric ref",
            text(r#"[null,1,"phoenix","heartbeat",{}]"#),
            Outcome::Close(1007),
        ),
        (
            "numeric join_ref",
            text(r#"[1,"1","user:public","phx_join",{}]"#),
            Outcome::Close(1007),
        ),
        (
            "object ref",
            text(r#"[null,{},"phoenix","heartbeat",{}]"#),
            Outcome::Close(1007),
        ),
        (
            "null topic",
            text(r#"[null,"1",null,"heartbeat",{}]"#),
            Outcome::Close(1007),
        ),
        (
            "empty topic",
            text(r#"[null,"1","","phx_join",{}]"#),
            Outcome::Close(1007),
        ),
        (
            "numeric topic",
            text(r#"[null,"1",7,"phx_join",{}]"#),
            Outcome::Close(1007),
        ),
        (
            "null event",
            text(r#"[null,"1","user:public",null,{}]"#),
            Outcome::Close(1007),
        ),
        (
            "topic of 300 bytes",
            text(&format!(
                r#"["1","1","user:{}","phx_join",{{}}]"#,
                "9".repeat(300)
            )),
            Outcome::Close(1007),
        ),
        (
            "ref of 100 bytes",
            text(&format!(
                r#"[null,"{}","phoenix","heartbeat",{{}}]"#,
                "1".repeat(100)
            )),
            Outcome::Close(1007),
        ),
        ("nesting 300 deep", text(&deep), Outcome::Close(1007)),
        (
            "payload nested 200 deep",
            text(&deep_payload),
            Outcome::Close(1007),
        ),
        (
            "binary frame holding invalid UTF-8",
            Message::Binary(vec![b'[', 0xff, 0xfe, b']'].into()),
            Outcome::Close(1003),
        ),
        (
            "binary frame",
            Message::binary(vec![0u8, 1, 2, 3]),
            Outcome::Close(1003),
        ),
        (
            "message over 64 KiB",
            text(&format!(
                r#"[null,"1","phoenix","heartbeat",{{"p":"{}"}}]"#,
                "x".repeat(70_000)
            )),
            Outcome::Close(1009),
        ),
        (
            "unknown topic join",
            text(r#"["1","1","rooms:lobby","phx_join",{}]"#),
            Outcome::Error("unmatched topic"),
        ),
        (
            "join without ref",
            text(r#"[null,null,"user:public","phx_join",{}]"#),
            Outcome::Ok,
        ),
        (
            "push to a topic not joined",
            text(r#"["1","2","user:public","is_online",{"user_id":1}]"#),
            Outcome::Error("unmatched topic"),
        ),
        (
            "heartbeat on a user topic",
            text(r#"[null,"3","user:public","heartbeat",{}]"#),
            Outcome::Error("unmatched topic"),
        ),
        (
            "join on the phoenix topic",
            text(r#"["4","4","phoenix","phx_join",{}]"#),
            Outcome::Error("unmatched topic"),
        ),
        (
            "phx_reply sent by a client",
            text(r#"[null,"5","phoenix","phx_reply",{}]"#),
            Outcome::Error("unmatched topic"),
        ),
        (
            "anonymous join of user:role",
            text(r#"["6","6","user:role","phx_join",{}]"#),
            Outcome::Error("unauthorized, cannot join 'user:role' channel"),
        ),
        (
            "join of user:-1",
            text(r#"["7","7","user:-1","phx_join",{}]"#),
            Outcome::Error("unauthorized, cannot join 'user:-1' channel"),
        ),
        (
            "payload that is an array",
            text(r#"["8","8","user:public","phx_join",[1,2]]"#),
            Outcome::Ok,
        ),
        (
            "extra elements",
            text(r#"[null,"9","phoenix","heartbeat",{},"x","y"]"#),
            Outcome::Ok,
        ),
    ]
}

#[tokio::test]
async fn malformed_client_frames_get_their_documented_outcome() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut bystander = gw.anonymous().await;
    let bjr = bystander.join_ok("user:public").await;
    let cases = frames();
    assert!(cases.len() >= 25);
    for (name, message, expected) in cases {
        let mut client = gw.anonymous().await;
        client.send_raw(message).await;
        let got = client.next().await;
        match (&expected, &got) {
            (Outcome::Close(code), Next::Closed(Some(c))) if c == code => {}
            (Outcome::Error(reason), Next::Frame(frame))
                if frame[3] == "phx_reply"
                    && frame[4]["status"] == "error"
                    && frame[4]["response"]["reason"] == *reason => {}
            (Outcome::Ok, Next::Frame(frame))
                if frame[3] == "phx_reply" && frame[4]["status"] == "ok" => {}
            _ => panic!("{name}: expected {expected:?}, got {got:?}"),
        }
        // The instance keeps serving everyone else.
        let reply = bystander
            .push(&bjr, "user:public", "is_online", json!({"user_id": 1}))
            .await;
        assert_eq!(reply[4]["status"], "ok", "after {name}");
    }
}

#[tokio::test]
async fn malformed_nats_messages_are_dropped_with_their_reason() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut client = gw.authenticated(5).await;
    client.join_ok("user:public").await;
    client.join_ok("user:role").await;
    client.join_ok("user:5").await;

    let invalid_utf8: &[u8] = &[b'{', b'"', b'e', 0xff, b'"', b':', b'1', b'}'];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("public", b"".to_vec(), "not_json"),
        ("public", b"null".to_vec(), "not_json"),
        ("public", invalid_utf8.to_vec(), "not_json"),
        ("public", br#"{"event":"announcement""#.to_vec(), "not_json"),
        ("public", br#"{"event":null}"#.to_vec(), "not_json"),
        ("public", br#"{"event":["a"]}"#.to_vec(), "not_json"),
        (
            "role",
            br#"{"event":"permissionsChanged","payload":true}"#.to_vec(),
            "bad_payload",
        ),
        (
            "role",
            br#"{"event":"permissionsChanged","payload":3}"#.to_vec(),
            "bad_payload",
        ),
        (
            "5",
            format!(r#"{{"event":"{}"}}"#, "e".repeat(200)).into_bytes(),
            "bad_event",
        ),
        ("5", br#"{"event":"phx_error"}"#.to_vec(), "bad_event"),
        (
            "5",
            format!(
                r#"{{"event":"x","payload":{{"p":"{}"}}}}"#,
                "y".repeat(70_000)
            )
            .into_bytes(),
            "too_large",
        ),
        ("-5", br#"{"event":"x"}"#.to_vec(), "bad_subject"),
        ("5x", br#"{"event":"x"}"#.to_vec(), "bad_subject"),
        (
            "99999999999999999999999",
            br#"{"event":"x"}"#.to_vec(),
            "bad_subject",
        ),
    ];
    let mut expected: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
    for (suffix, body, reason) in &cases {
        publisher
            .publish(format!("{}.user.{suffix}", gw.prefix), body.clone().into())
            .await
            .unwrap();
        // With the event stream (the default), a subject that names no topic is stored but followed by
        // no instance: it never reaches one.
        if *reason != "bad_subject" {
            *expected.entry(reason).or_default() += 1.0;
        }
    }
    publisher.flush().await.unwrap();
    gw.publish(&publisher, "5", r#"{"event":"newMessage"}"#)
        .await;
    assert_eq!(
        client.frame().await,
        broadcast("user:5", "newMessage", json!({}))
    );
    client.silent_for(Duration::from_millis(200)).await;
    for (reason, count) in expected {
        let counted = gw
            .metric(&format!(
                "epoch_gateway_ingress_drops_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(counted, count, "{reason}");
    }
    let bad_subjects = gw
        .metric("epoch_gateway_ingress_drops_total{reason=\"bad_subject\"}")
        .await;
    assert_eq!(bad_subjects, 0.0, "bad subjects never reach an instance");
}

/// A text frame whose bytes are not UTF-8, written by hand: WebSocket client libraries refuse to send one.
#[tokio::test]
async fn a_text_frame_with_invalid_utf8_is_closed_with_1007() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let handshake = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.addr
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        response.push(tcp.read_u8().await.unwrap());
    }
    assert!(
        response.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    // FIN + text, masked with a zero key, payload [0xff, 0xfe].
    tcp.write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe])
        .await
        .unwrap();
    let mut header = [0u8; 2];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(header[0], 0x88, "a close frame");
    let mut body = vec![0u8; usize::from(header[1] & 0x7f)];
    tcp.read_exact(&mut body).await.unwrap();
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), 1007);
}
