//! Presence for other services, over NATS: a NATS micro service (visible in `$SRV.PING` / `$SRV.INFO`)
//! with two endpoints, answered from this instance's view of cluster-wide presence.
//!
//! - `<prefix>.presence.is_online` — `{"user_id": 42}` (or `"42"`) → `{"id": 42, "online": true}`
//! - `<prefix>.presence.count` — any body → `{"online": <users online cluster-wide>}`
//!
//! Every instance serves the endpoints in the service's queue group, so each request is answered once.
//! A bad request gets a service error (`Nats-Service-Error` / `Nats-Service-Error-Code: 400` headers).

use std::sync::Arc;

use async_nats::Client;
use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{EVENT_IS_ONLINE, IsOnlineRequest, Presence};

/// Name under which the service registers (`$SRV.INFO.epoch-gateway-presence`).
pub const SERVICE_NAME: &str = "epoch-gateway-presence";
/// Status code of a request the service cannot answer.
const BAD_REQUEST: usize = 400;

#[derive(Serialize)]
struct Count {
    online: usize,
}

/// Serves the endpoints until `stop` is cancelled.
///
/// # Errors
/// When the service or its endpoints cannot be registered.
pub async fn serve(
    client: Client,
    subject_prefix: &str,
    node: &str,
    presence: Arc<Presence>,
    stop: CancellationToken,
) -> Result<(), async_nats::Error> {
    let service = client
        .service_builder()
        .description(format!("epoch-gateway presence (node {node})"))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let mut is_online = service
        .endpoint(format!("{subject_prefix}.presence.{EVENT_IS_ONLINE}"))
        .await?;
    let mut count = service
        .endpoint(format!("{subject_prefix}.presence.count"))
        .await?;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(request) = is_online.next() => {
                let response = answer_is_online(&presence, &request.message.payload);
                respond(&request, response).await;
            }
            Some(request) = count.next() => {
                let body = serde_json::to_vec(&Count { online: presence.online_count() })
                    .map(Bytes::from)
                    .expect("a count serialises");
                respond(&request, Ok(body)).await;
            }
            else => break,
        }
    }
    let _ = service.stop().await;
    Ok(())
}

fn answer_is_online(presence: &Presence, body: &[u8]) -> Result<Bytes, service::error::Error> {
    let bad = |status: &str| service::error::Error {
        status: status.to_owned(),
        code: BAD_REQUEST,
    };
    let request: Value = serde_json::from_slice(body).map_err(|_| bad("request is not JSON"))?;
    let request = IsOnlineRequest::parse(&request).map_err(|error| bad(&error.to_string()))?;
    Ok(serde_json::to_vec(&presence.answer(request))
        .map(Bytes::from)
        .expect("a reply serialises"))
}

async fn respond(request: &service::Request, response: Result<Bytes, service::error::Error>) {
    if let Err(error) = request.respond(response).await {
        tracing::debug!(%error, "presence service reply not sent");
    }
}
