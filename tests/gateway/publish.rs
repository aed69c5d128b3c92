//! Publishing with an ack: `epoch-gateway publish` and the publisher examples (Rust, Node) against a
//! real nats-server with the event stream created here, as the gateway creates it at start-up.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use serde_json::{Value, json};

use epoch_testkit::*;

/// The stream's name in these tests (the gateway's default).
const STREAM: &str = "epoch_events";

/// Output of a finished process: exit code, stdout, stderr.
struct Run {
    code: i32,
    out: String,
    err: String,
}

async fn run(command: &mut tokio::process::Command) -> Run {
    let output = command.output().await.expect("process runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `epoch-gateway publish ARGS` with the NATS URL and subject prefix in the environment.
async fn cli(nats_url: &str, prefix: &str, args: &[&str]) -> Run {
    run(tokio::process::Command::new(gateway_bin())
        .arg("publish")
        .args(args)
        .env_clear()
        .env("EPOCH_GATEWAY__NATS__URL", nats_url)
        .env("EPOCH_GATEWAY__NATS__SUBJECT_PREFIX", prefix))
    .await
}

/// The stream over `<prefix>.user.>`, with a duplicate window, as the gateway creates it.
async fn create_stream(nats: &Nats, prefix: &str) -> stream::Stream {
    jetstream::new(nats.client().await)
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{prefix}.user.>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn stored_count(stream: &mut stream::Stream) -> u64 {
    stream.info().await.unwrap().state.messages
}

/// Subject, body and `Nats-Msg-Id` of the stored message at `sequence`.
async fn stored(stream: &stream::Stream, sequence: u64) -> (String, Value, String) {
    let message = stream.get_raw_message(sequence).await.unwrap();
    let msg_id = message
        .headers
        .get("Nats-Msg-Id")
        .expect("stored with a Nats-Msg-Id")
        .to_string();
    (
        message.subject.to_string(),
        serde_json::from_slice(&message.payload).unwrap(),
        msg_id,
    )
}

#[tokio::test]
async fn the_cli_stores_one_event_per_call_and_prints_its_sequence() {
    let nats = Nats::start();
    let prefix = unique("t");
    let mut stream = create_stream(&nats, &prefix).await;
    let calls: [(&[&str], &str, Value); 3] = [
        (
            &[
                "--user",
                "42",
                "--event",
                "newMessage",
                "--payload",
                r#"{"id":1}"#,
            ],
            "user.42",
            json!({"event": "newMessage", "payload": {"id": 1}}),
        ),
        (
            &["--topic", "public", "--event", "announcement"],
            "user.public",
            json!({"event": "announcement", "payload": {}}),
        ),
        (
            &[
                "--topic",
                "role",
                "--event",
                "permissionsChanged",
                "--payload",
                r#"{"lookup":"admin"}"#,
            ],
            "user.role",
            json!({"event": "permissionsChanged", "payload": {"lookup": "admin"}}),
        ),
    ];
    let mut ids = Vec::new();
    for (sequence, (args, suffix, body)) in (1..).zip(calls) {
        let run = cli(&nats.url, &prefix, args).await;
        assert_eq!(run.code, 0, "{args:?}: {}", run.err);
        assert_eq!(run.out.trim(), format!("stored in {STREAM} at {sequence}"));
        let (subject, stored_body, msg_id) = stored(&stream, sequence).await;
        assert_eq!(subject, format!("{prefix}.{suffix}"));
        assert_eq!(stored_body, body);
        assert!(
            uuid::Uuid::parse_str(&msg_id).is_ok(),
            "random UUID: {msg_id}"
        );
        ids.push(msg_id);
    }
    assert_eq!(stored_count(&mut stream).await, 3);
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "a fresh id per call: {ids:?}");
}

#[tokio::test]
async fn the_same_msg_id_is_stored_once() {
    let nats = Nats::start();
    let prefix = unique("t");
    let mut stream = create_stream(&nats, &prefix).await;
    let args = [
        "--user",
        "7",
        "--event",
        "refreshMentions",
        "--msg-id",
        "mention-1001",
    ];
    let first = cli(&nats.url, &prefix, &args).await;
    assert_eq!(first.code, 0, "{}", first.err);
    assert_eq!(first.out.trim(), format!("stored in {STREAM} at 1"));
    let again = cli(&nats.url, &prefix, &args).await;
    assert_eq!(again.code, 0, "{}", again.err);
    assert!(
        again.out.starts_with(&format!("stored in {STREAM} at 1 "))
            && again.out.contains("duplicate"),
        "{}",
        again.out
    );
    assert_eq!(stored_count(&mut stream).await, 1);
    assert_eq!(stored(&stream, 1).await.2, "mention-1001");
    let other = cli(
        &nats.url,
        &prefix,
        &[
            "--user",
            "7",
            "--event",
            "refreshMentions",
            "--msg-id",
            "mention-1002",
        ],
    )
    .await;
    assert_eq!(other.out.trim(), format!("stored in {STREAM} at 2"));
    assert_eq!(stored_count(&mut stream).await, 2);
}

#[tokio::test]
async fn events_that_ingress_would_drop_are_refused_and_not_published() {
    let nats = Nats::start();
    let prefix = unique("t");
    let mut stream = create_stream(&nats, &prefix).await;
    let cases: [(&[&str], &str); 8] = [
        (
            &["--user", "1", "--event", "x", "--payload", "{\"id\":"],
            "the payload is not valid JSON",
        ),
        (
            &["--user", "1", "--event", "x", "--payload", "[1,2]"],
            "the payload must be a JSON object",
        ),
        (
            &["--user", "1", "--event", "phx_reply"],
            "reserved for the Phoenix protocol",
        ),
        (&["--user", "1", "--event", ""], "the event name is empty"),
        (&["--user", "1", "--event", &"e".repeat(129)], "at most 128"),
        (
            &["--user", "1", "--topic", "public", "--event", "x"],
            "cannot be used with",
        ),
        (&["--event", "x"], "--user <ID>"),
        (
            &["--user", "1", "--event", "x", "--msg-id", " padded"],
            "message id",
        ),
    ];
    for (args, expected) in cases {
        let run = cli(&nats.url, &prefix, args).await;
        assert_eq!(run.code, 2, "{args:?}: {} {}", run.out, run.err);
        assert!(run.err.contains(expected), "{args:?}: {}", run.err);
        assert!(run.out.is_empty(), "{args:?}: {}", run.out);
    }
    assert_eq!(stored_count(&mut stream).await, 0);
}

#[tokio::test]
async fn without_a_stream_the_cli_fails_at_once_and_names_who_creates_it() {
    let nats = Nats::start();
    let started = Instant::now();
    let run = cli(&nats.url, &unique("t"), &["--user", "42", "--event", "x"]).await;
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err.contains("no JetStream stream stores")
            && run.err.contains("the gateway creates it at start-up")
            && run.err.contains("delivery.stream"),
        "{}",
        run.err
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no waiting for the 10 s timeout"
    );
}

#[tokio::test]
async fn a_nats_server_without_jetstream_is_named_as_the_problem() {
    /// Killed on drop, also when an assertion fails.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let port = free_port();
    let _server = Server(
        std::process::Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let run = cli(&url, "epoch", &["--user", "42", "--event", "x"]).await;
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(run.err.contains("JetStream is not enabled"), "{}", run.err);
}

#[tokio::test]
async fn an_unreachable_nats_fails_after_the_timeout_with_its_url() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let run = cli(
        &url,
        "epoch",
        &["--user", "42", "--event", "x", "--timeout", "1"],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err
            .contains(&format!("cannot connect to NATS at {url}")),
        "{}",
        run.err
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A stand-in for the stream on `subject`: answers the n-th publish with `reply(n)` (none for `None`)
/// and reports each publish's `Nats-Msg-Id`.
async fn fake_stream(
    nats: &Nats,
    subject: String,
    reply: fn(usize) -> Option<Value>,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let client = nats.client().await;
    let mut requests = client.subscribe(subject).await.unwrap();
    client.flush().await.unwrap();
    let (ids, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(request) = requests.next().await {
            n += 1;
            let id = request
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(ToString::to_string)
                .unwrap_or_default();
            let _ = ids.send(id);
            if let (Some(answer), Some(inbox)) = (reply(n), request.reply) {
                client
                    .publish(inbox, answer.to_string().into())
                    .await
                    .unwrap();
                client.flush().await.unwrap();
            }
        }
    });
    seen
}

#[tokio::test]
async fn attempts_without_an_ack_are_repeated_with_the_same_id_until_acked() {
    let nats = Nats::start();
    let prefix = unique("t");
    // Twice "temporarily unavailable", as while a stream elects a leader, then the ack.
    let mut seen = fake_stream(&nats, format!("{prefix}.user.42"), |n| {
        Some(if n < 3 {
            json!({"error": {"code": 503, "err_code": 10008, "description": "JetStream system temporarily unavailable"}})
        } else {
            json!({"stream": STREAM, "seq": 77})
        })
    })
    .await;
    let run = cli(
        &nats.url,
        &prefix,
        &["--user", "42", "--event", "x", "--msg-id", "retry-me"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(run.out.trim(), format!("stored in {STREAM} at 77"));
    let mut ids = Vec::new();
    while let Ok(id) = seen.try_recv() {
        ids.push(id);
    }
    assert_eq!(ids, ["retry-me", "retry-me", "retry-me"]);
}

#[tokio::test]
async fn a_refusal_by_the_stream_is_not_retried() {
    let nats = Nats::start();
    let prefix = unique("t");
    let mut seen = fake_stream(&nats, format!("{prefix}.user.42"), |_| {
        Some(
            json!({"error": {"code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"}}),
        )
    })
    .await;
    let run = cli(&nats.url, &prefix, &["--user", "42", "--event", "x"]).await;
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err.contains("the stream refused the event")
            && run.err.contains("message size exceeds maximum allowed"),
        "{}",
        run.err
    );
    assert!(seen.try_recv().is_ok());
    assert!(seen.try_recv().is_err(), "one attempt only");
}

#[tokio::test]
async fn no_ack_before_the_timeout_is_a_failure_that_names_the_msg_id() {
    let nats = Nats::start();
    let prefix = unique("t");
    let _seen = fake_stream(&nats, format!("{prefix}.user.42"), |_| None).await;
    let started = Instant::now();
    let run = cli(
        &nats.url,
        &prefix,
        &[
            "--user",
            "42",
            "--event",
            "x",
            "--msg-id",
            "lost-1",
            "--timeout",
            "1",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err.contains("no ack for the event") && run.err.contains("lost-1"),
        "{}",
        run.err
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

/// The compiled `examples/publish.rs`, next to the binary under test (`cargo test` builds examples).
fn rust_example() -> PathBuf {
    let path = gateway_bin()
        .parent()
        .expect("the binary is in a directory")
        .join("examples")
        .join(format!("publish{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it, or `cargo build --example publish`",
        path.display()
    );
    path
}

/// Runs a publisher example twice and checks that each run stores exactly one event, with its own id.
async fn each_run_stores_one_event(example: impl Fn() -> tokio::process::Command) {
    let nats = Nats::start();
    let prefix = unique("t");
    let mut stream = create_stream(&nats, &prefix).await;
    let subject = format!("{prefix}.user.42");
    let mut ids = Vec::new();
    for sequence in 1..=2 {
        let run = run(example()
            .arg(&nats.url)
            .arg(&subject)
            .arg("newMessage")
            .arg(format!(r#"{{"id":{sequence}}}"#)))
        .await;
        assert_eq!(run.code, 0, "{}\n{}", run.out, run.err);
        assert_eq!(run.out.trim(), format!("stored in {STREAM} at {sequence}"));
        assert_eq!(stored_count(&mut stream).await, sequence);
        let (stored_subject, body, msg_id) = stored(&stream, sequence).await;
        assert_eq!(stored_subject, subject);
        assert_eq!(
            body,
            json!({"event": "newMessage", "payload": {"id": sequence}})
        );
        assert!(!msg_id.is_empty());
        ids.push(msg_id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn the_rust_example_stores_one_event_per_run() {
    let example = rust_example();
    each_run_stores_one_event(|| tokio::process::Command::new(&example)).await;
}

#[tokio::test]
async fn the_node_example_stores_one_event_per_run() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/publishers");
    assert!(
        dir.join("node_modules/nats").exists(),
        "examples/publishers/node_modules is missing: run `scripts/setup.sh`"
    );
    each_run_stores_one_event(|| {
        let mut command = tokio::process::Command::new("node");
        command.arg(dir.join("publish.mjs"));
        command
    })
    .await;
}
