//! A backend service's publish that loses nothing, with async-nats.
//!
//! `cargo run --example publish -- nats://127.0.0.1:4222 epoch.user.42 newMessage '{"id":1}'`
//!
//! The event is published with JetStream, so the server answers with an ack once the stream has stored
//! it. The `Nats-Msg-Id` header names this one event: when an ack does not come (a failover, a
//! reconnect), the same message is sent again with the same id, and the stream drops the copy it
//! already holds. Without an ack there is no way to know whether the event was stored.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};

/// The overall deadline: past it the event is reported as not stored.
const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: publish <NATS_URL> <SUBJECT> <EVENT> [PAYLOAD_JSON]";
    let (Some(url), Some(subject), Some(event)) = (args.next(), args.next(), args.next()) else {
        return Err(usage.into());
    };
    let payload: serde_json::Value = serde_json::from_str(&args.next().unwrap_or("{}".into()))?;
    if !payload.is_object() {
        return Err("the payload must be a JSON object".into());
    }
    let body = serde_json::to_vec(&serde_json::json!({ "event": event, "payload": payload }))?;

    let client = async_nats::connect(url).await?;
    // Each attempt waits at most 2 s for its ack.
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);

    // One id per event, chosen once, before the first attempt.
    let msg_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    loop {
        let message = PublishMessage::build()
            .payload(body.clone().into())
            .message_id(&msg_id);
        // The first `.await` sends the message, the second waits for the stream's ack.
        let result = match jetstream.send_publish(subject.clone(), message).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match result {
            Ok(ack) => {
                println!("stored in {} at {}", ack.stream, ack.sequence);
                return Ok(());
            }
            Err(error) if started.elapsed() < DEADLINE => {
                eprintln!("not acked yet ({error}); sending {msg_id} again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(format!("not stored: {error}").into()),
        }
    }
}
