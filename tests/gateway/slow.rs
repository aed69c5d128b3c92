//! A client that stops reading is cut off; everyone else keeps receiving everything, in order.

use std::time::{Duration, Instant};

use serde_json::json;

use epoch_testkit::*;

const MESSAGES: usize = 10_000;

#[tokio::test]
async fn a_stalled_client_is_closed_and_the_others_get_every_message_in_order() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let publisher = nats.client().await;
    let mut stalled = gw.anonymous().await;
    stalled.join_ok("user:public").await;
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut client = gw.anonymous().await;
        client.join_ok("user:public").await;
        readers.push(client);
    }

    // 1 KiB per message: 10 MiB in all, more than the kernel buffers a stalled socket can absorb.
    let padding = "x".repeat(1024);
    let publishing = tokio::spawn({
        let subject = format!("{}.user.public", gw.prefix);
        async move {
            for seq in 0..MESSAGES {
                let body =
                    json!({"event": "announcement", "payload": {"seq": seq, "pad": padding}});
                publisher
                    .publish(subject.clone(), body.to_string().into())
                    .await
                    .unwrap();
            }
            publisher.flush().await.unwrap();
        }
    });
    let started = Instant::now();
    let reading = readers.into_iter().map(|mut client| {
        tokio::spawn(async move {
            for expected in 0..MESSAGES {
                let frame = client.frame().await;
                assert_eq!(frame[4]["seq"], json!(expected), "in order, none lost");
            }
            client
        })
    });
    let readers: Vec<_> = reading.collect();

    // The stalled client is closed as a slow consumer. Reading from then on, it finds what the kernel had
    // buffered and then the close frame with its code.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric("epoch_gateway_slow_consumer_closes_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled client was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = loop {
        match stalled
            .next_within(Duration::from_secs(10))
            .await
            .expect("close arrives")
        {
            Next::Frame(_) => continue,
            Next::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(4001));

    for reader in futures::future::join_all(readers).await {
        reader.expect("a reader received all messages in order");
    }
    publishing.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        gw.metric("epoch_gateway_slow_consumer_closes_total").await,
        1.0,
        "only the stalled one"
    );
    eprintln!("3 readers received {MESSAGES} messages each in {elapsed:?}");
}
