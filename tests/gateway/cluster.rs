//! Cluster-wide presence: three gateways on a 3-node NATS cluster (R3 bucket), crashes and failover.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use epoch_testkit::*;

/// Waits that set a test up rather than check it. On a cluster that has just started, with other tests'
/// clusters busy on the same cores, a first presence record has been seen to take more than the second
/// that the propagation checks (`presence_is_shared_by_every_instance_and_the_nats_service`) allow.
const SETUP: Duration = Duration::from_secs(5);

/// A socket joined to `user:public` that asks `is_online` questions.
struct Observer {
    client: PhxClient,
    join_ref: String,
}

impl Observer {
    async fn on(gw: &Gateway) -> Self {
        let mut client = gw.anonymous().await;
        let join_ref = client.join_ok("user:public").await;
        Self { client, join_ref }
    }

    async fn online(&mut self, user: u64) -> bool {
        let reply = self
            .client
            .push(
                &self.join_ref,
                "user:public",
                "is_online",
                json!({"user_id": user}),
            )
            .await;
        reply[4]["response"]["online"]
            .as_bool()
            .expect("an is_online answer")
    }

    /// Polls until `user` is `online`; returns how long it took. Polls stay under the default push
    /// rate limit (50/s per socket).
    async fn wait_until(&mut self, user: u64, online: bool, within: Duration) -> Duration {
        let started = Instant::now();
        while self.online(user).await != online {
            assert!(
                started.elapsed() < within,
                "user {user} not online={online} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        started.elapsed()
    }
}

async fn online_tab(gw: &Gateway, user: u64) -> PhxClient {
    let mut client = gw.authenticated(user).await;
    client.join_ok("user:public").await;
    client
}

/// The next frame that is not a `probe` event.
async fn after_probes(client: &mut PhxClient) -> Value {
    loop {
        let frame = client.frame().await;
        if frame[3] != "probe" {
            return frame;
        }
    }
}

async fn service_request(
    nats: &async_nats::Client,
    subject: String,
    body: &str,
) -> async_nats::Message {
    tokio::time::timeout(WAIT, nats.request(subject, body.to_owned().into()))
        .await
        .expect("service answers in time")
        .unwrap()
}

async fn three_gateways(cluster: &Cluster, ttl: &str) -> Vec<Gateway> {
    let (prefix, bucket) = (unique("c"), unique("presence_"));
    let mut gateways = Vec::new();
    for url in &cluster.urls {
        let options = GatewayOptions::cluster(&prefix, &bucket)
            .env("EPOCH_GATEWAY__PRESENCE__REPLICAS", "3")
            .env("EPOCH_GATEWAY__DELIVERY__REPLICAS", "3")
            .env("EPOCH_GATEWAY__PRESENCE__TTL_SECS", ttl);
        gateways.push(Gateway::start_with(url, options).await);
    }
    gateways
}

#[tokio::test]
async fn presence_is_shared_by_every_instance_and_the_nats_service() {
    let cluster = Cluster::start();
    let gws = three_gateways(&cluster, "30").await;
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);
    let mut on_c = Observer::on(c).await;
    let nats = async_nats::connect(&cluster.urls[1]).await.unwrap();

    let tab_a = online_tab(a, 50).await;
    on_c.wait_until(50, true, Duration::from_secs(1)).await;
    let reply = service_request(
        &nats,
        format!("{}.presence.is_online", c.prefix),
        r#"{"user_id": 50}"#,
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"id": 50, "online": true})
    );
    let reply = service_request(
        &nats,
        format!("{}.presence.is_online", c.prefix),
        r#"{"user_id": "51"}"#,
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"id": "51", "online": false})
    );
    let reply = service_request(&nats, format!("{}.presence.count", c.prefix), "").await;
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"online": 1})
    );
    // Bad requests get an error reply, not silence.
    for bad in ["not json", r#"{"user":50}"#, r#"{"user_id":"x"}"#] {
        let reply = service_request(&nats, format!("{}.presence.is_online", c.prefix), bad).await;
        let headers = reply.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400"),
            "{bad}"
        );
    }
    // The service shows in $SRV.PING like any NATS micro service.
    let ping = service_request(&nats, "$SRV.PING.epoch-gateway-presence".to_owned(), "").await;
    assert_eq!(
        serde_json::from_slice::<Value>(&ping.payload).unwrap()["name"],
        "epoch-gateway-presence"
    );

    // Two tabs on two instances: one closes, the user stays online.
    let tab_b = online_tab(b, 50).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tab_a.close().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(on_c.online(50).await, "still online through the tab on B");
    // The last tab closes: offline on C within 1 s.
    tab_b.close().await;
    let took = on_c.wait_until(50, false, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn a_killed_instance_s_users_expire_within_the_ttl_and_leave_no_ghosts() {
    let cluster = Cluster::start();
    let mut gws = three_gateways(&cluster, "3").await;
    let mut on_b = Observer::on(&gws[1]).await;
    let mut on_c = Observer::on(&gws[2]).await;
    let _tabs = [online_tab(&gws[0], 60).await, online_tab(&gws[0], 61).await];
    on_b.wait_until(61, true, SETUP).await;
    on_c.wait_until(60, true, SETUP).await;

    let dead = gws.remove(0);
    let (node, bucket) = (dead.node.clone(), dead.bucket.clone());
    dead.signal("KILL");
    let killed = Instant::now();
    // TTL (3 s) + 2 s.
    let limit = Duration::from_secs(5);
    for user in [60, 61] {
        on_b.wait_until(user, false, limit.saturating_sub(killed.elapsed()))
            .await;
        on_c.wait_until(user, false, limit.saturating_sub(killed.elapsed()))
            .await;
    }
    drop(dead);

    // No record of the dead node remains: not as a key, and not as a marker once markers expire.
    let js = async_nats::jetstream::new(async_nats::connect(&cluster.urls[2]).await.unwrap());
    let stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for user in [60, 61] {
        let subject = format!("$KV.{bucket}.{user}.{node}");
        while stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .is_ok()
        {
            assert!(
                Instant::now() < deadline,
                "a record or marker of the dead node remains: {subject}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn an_instance_fails_over_when_its_nats_node_dies() {
    let mut cluster = Cluster::start();
    // The bucket's leader may be on the killed node: the TTL must outlast a JetStream election (nats-server
    // picks election timeouts between 4 and 9 s, and a first round may fail) after the last refresh before the
    // kill (one period, TTL/3).
    let gws = three_gateways(&cluster, "24").await;
    let mut tab = online_tab(&gws[0], 70).await;
    let mut on_b = Observer::on(&gws[1]).await;
    on_b.wait_until(70, true, SETUP).await;
    let own = tab.join_ok("user:70").await;

    cluster.kill(0);
    // Longer than the TTL: the record survives only if A keeps refreshing it through another node.
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(26) {
        assert!(
            on_b.online(70).await,
            "user went offline {:?} after the failover",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The WebSocket client is still connected and served.
    tab.send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(tab.frame().await[1], "hb");
    // Messages published on another node still reach it.
    let publisher = async_nats::connect(&cluster.urls[2]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        gws[0]
            .publish(&publisher, "70", r#"{"event":"refreshMentions"}"#)
            .await;
        match tab.next_within(Duration::from_millis(300)).await {
            Some(Next::Frame(frame)) => {
                assert_eq!(frame, broadcast("user:70", "refreshMentions", json!({})));
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "no delivery after failover: {other:?}"
            ),
        }
    }
    let _ = own;
}

#[tokio::test]
async fn presence_is_rebuilt_after_nats_restarts_with_an_empty_store() {
    let port = free_port();
    let mut nats = Nats::start_on(port);
    let (prefix, bucket) = (unique("r"), unique("presence_"));
    let gw = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let other = Gateway::start_with(&nats.url, GatewayOptions::cluster(&prefix, &bucket)).await;
    let _tab = online_tab(&gw, 80).await;
    let mut observer = Observer::on(&other).await;
    observer.wait_until(80, true, Duration::from_secs(1)).await;

    nats.kill();
    let nats = Nats::start_on(port);
    // The bucket is recreated and the record re-asserted, without any client action.
    let js = async_nats::jetstream::new(nats.client().await);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(store) = js.get_key_value(&bucket).await
            && store
                .get(format!("80.{}", gw.node))
                .await
                .ok()
                .flatten()
                .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence not rebuilt; logs: {:#?}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    observer.wait_until(80, true, Duration::from_secs(5)).await;
    gw.wait_ready().await;
}

#[tokio::test]
async fn scale_out_an_event_published_on_any_node_reaches_clients_on_every_gateway() {
    let cluster = Cluster::start();
    let (prefix, bucket) = (unique("x"), unique("presence_"));
    let options = || {
        GatewayOptions::cluster(&prefix, &bucket)
            .env("EPOCH_GATEWAY__PRESENCE__REPLICAS", "3")
            .env("EPOCH_GATEWAY__DELIVERY__REPLICAS", "3")
    };
    let a = Gateway::start_with(&cluster.urls[0], options()).await;
    let b = Gateway::start_with(&cluster.urls[1], options()).await;
    let mut on_a = online_tab(&a, 100).await;
    let mut on_b = online_tab(&b, 101).await;
    for (i, url) in cluster.urls.iter().enumerate() {
        let publisher = async_nats::connect(url).await.unwrap();
        // A node learns of the gateways' subscriptions over the routes, and core NATS drops what it is given
        // before that: probe until both sockets have had a message from this node.
        let probe = json!({"event": "probe", "payload": {}}).to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        for client in [&mut on_a, &mut on_b] {
            loop {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {i} never routed to both gateways"
                );
                a.publish(&publisher, "public", &probe).await;
                if client
                    .next_within(Duration::from_millis(100))
                    .await
                    .is_some()
                {
                    break;
                }
            }
        }
        let body = json!({"event": "announcement", "payload": {"from_node": i}}).to_string();
        a.publish(&publisher, "public", &body).await;
        let expected = broadcast("user:public", "announcement", json!({"from_node": i}));
        assert_eq!(after_probes(&mut on_a).await, expected);
        assert_eq!(after_probes(&mut on_b).await, expected);
    }
    // Presence is shared both ways.
    Observer::on(&a).await.wait_until(101, true, SETUP).await;
    Observer::on(&b).await.wait_until(100, true, SETUP).await;
}
