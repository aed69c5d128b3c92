//! Presence records in the JetStream KV bucket, as other instances and services see them.

use std::time::{Duration, Instant};

use futures::StreamExt;

use epoch_testkit::*;

/// Keys in the bucket, 0 while it does not exist (yet).
async fn record_count(nats: &Nats, bucket: &str) -> u64 {
    let count = async {
        let js = async_nats::jetstream::new(nats.client().await);
        let store = js.get_key_value(bucket).await.ok()?;
        let keys = store.keys().await.ok()?;
        Some(
            keys.filter(|key| std::future::ready(key.is_ok()))
                .count()
                .await as u64,
        )
    };
    tokio::time::timeout(Duration::from_secs(5), count)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

async fn keys(nats: &Nats, bucket: &str) -> Vec<String> {
    let js = async_nats::jetstream::new(nats.client().await);
    let store = js.get_key_value(bucket).await.unwrap();
    let mut keys: Vec<String> = store
        .keys()
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    // A key rewritten while the listing runs is listed again.
    keys.sort();
    keys.dedup();
    keys
}

async fn wait_for_keys(nats: &Nats, bucket: &str, expected: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = keys(nats, bucket).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bucket keys {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn one_record_per_user_and_instance_removed_on_last_leave() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let record = format!("21.{}", gw.node);

    let mut tab1 = gw.authenticated(21).await;
    let mut tab2 = gw.authenticated(21).await;
    let mut anon = gw.anonymous().await;
    anon.join_ok("user:public").await;
    tab1.join_ok("user:public").await;
    tab2.join_ok("user:public").await;
    // Joining other topics does not make a record.
    let mut role_only = gw.authenticated(22).await;
    role_only.join_ok("user:role").await;
    wait_for_keys(&nats, &gw.bucket, std::slice::from_ref(&record)).await;

    let js = async_nats::jetstream::new(nats.client().await);
    let stream = js.get_stream(format!("KV_{}", gw.bucket)).await.unwrap();
    assert!(
        stream.cached_info().config.allow_message_ttl,
        "bucket created with per-message TTL"
    );

    tab1.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        keys(&nats, &gw.bucket).await,
        vec![record.clone()],
        "one tab still open"
    );
    tab2.close().await;
    wait_for_keys(&nats, &gw.bucket, &[]).await;
}

async fn ask(client: &mut PhxClient, join_ref: &str) -> bool {
    let reply = client
        .push(
            join_ref,
            "user:public",
            "is_online",
            serde_json::json!({"user_id": 77}),
        )
        .await;
    reply[4]["response"]["online"].as_bool().unwrap()
}

#[tokio::test]
async fn records_written_by_another_instance_count_as_online() {
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let store = js.get_key_value(&gw.bucket).await.unwrap();
    let mut anon = gw.anonymous().await;
    let jr = anon.join_ok("user:public").await;
    assert!(!ask(&mut anon, &jr).await);
    store.put("77.other-node", "".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while !ask(&mut anon, &jr).await {
        assert!(Instant::now() < deadline, "remote record not seen");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    store.purge("77.other-node").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while ask(&mut anon, &jr).await {
        assert!(Instant::now() < deadline, "remote purge not seen");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn a_bucket_with_other_settings_stops_start_up_with_a_clear_message() {
    let nats = Nats::start();
    let bucket = unique("mismatch_");
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: bucket.clone(),
        history: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut gw = Gateway::start_with(
        &nats.url,
        GatewayOptions {
            wait_ready: false,
            ..Default::default()
        }
        .env("EPOCH_GATEWAY__PRESENCE__BUCKET", &bucket),
    )
    .await;
    let code = gw.wait_exit(Duration::from_secs(10)).await;
    assert_ne!(code, Some(0));
    let logs = gw.logs().join("\n");
    assert!(logs.contains("exists with other settings"), "{logs}");
    assert!(logs.contains("history is 5, expected 1"), "{logs}");
    // The bucket is left as it was.
    let store = js.get_key_value(&bucket).await.unwrap();
    assert_eq!(store.status().await.unwrap().history(), 5);
}

/// More local users than async-nats keeps unacknowledged JetStream publishes (5,000): the paced refresh
/// keeps every record alive, and after NATS comes back with an empty store, all of them are re-asserted in
/// one batch that must not wait on itself.
#[tokio::test]
async fn records_of_more_users_than_publishes_in_flight_are_refreshed() {
    const USERS: u64 = 5_200;
    let port = free_port();
    let mut nats = Nats::start_on(port);
    let options = GatewayOptions::default()
        .env("EPOCH_GATEWAY__PRESENCE__TTL_SECS", "3")
        .env("EPOCH_GATEWAY__WS__MAX_NEW_CONNECTIONS_PER_SEC", "100000")
        .env("RUST_LOG", "info");
    let gw = Gateway::start_with(&nats.url, options).await;
    let sockets: Vec<PhxClient> = futures::stream::iter(1..=USERS)
        .map(|user| {
            let gw = &gw;
            async move {
                let mut socket = gw.authenticated(user).await;
                socket.join_ok("user:public").await;
                socket
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    // Longer than the TTL: only refreshed records are still there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(keys(&nats, &gw.bucket).await.len() as u64, USERS);

    let mut late = gw.authenticated(USERS + 1).await;
    late.join_ok("user:public").await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while keys(&nats, &gw.bucket).await.len() as u64 != USERS + 1 {
        assert!(Instant::now() < deadline, "a later join is still written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A server with an empty store: the reconnect re-asserts every record at once.
    nats.kill();
    let nats = Nats::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = record_count(&nats, &gw.bucket).await;
        if held == USERS + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} of {} records re-asserted after the restart",
            USERS + 1
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(sockets);
}
