//! epoch-gateway: the real-time edge of the Epochtalk forum.
//!
//! Browsers hold a Phoenix Channels V2 WebSocket (phoenix.js); backend services publish events on NATS;
//! the gateway joins the two, authenticates sockets by JWT, and keeps cluster-wide presence in a
//! JetStream KV bucket with per-key TTL.
//!
//! # Data flow
//!
//! ```text
//! publisher ─► <prefix>.user.* ─► event stream ─(republish per topic)─► delivery::live (order, gaps, catch-up)
//!                                                                               │
//!                        broker::ingress (check + encode once) ◄────────────────┘
//!                                 ─► hub (topic → sockets) ─► mailbox (bounded) ─► session ─► socket
//! socket ─► session ─► protocol::decode ─► ws::channel (join / leave / is_online) ─► reply ─► socket
//!                                              │
//!                                              └─► presence (local counts) ─► presence::store ─► KV bucket ─► watch ─► presence
//! ```
//!
//! # Layout
//! - [`config`]: layered settings (defaults → file → `EPOCH_GATEWAY__…`), validated and parsed once.
//! - [`protocol`]: the Phoenix V2 wire format and the close-code catalogue; no I/O.
//! - [`topic`]: user ids and topics, parsed from client topics and NATS subjects.
//! - [`auth`]: verifying and minting Guardian-shaped JWTs.
//! - [`limits`]: per-socket limits and the token bucket behind the rate limits.
//! - [`metrics`], [`telemetry`]: OpenMetrics text (Prometheus scrapes it) and structured logs / traces
//!   ([`telemetry::resolve`]: the OTLP settings over the standard `OTEL_*` variables;
//!   [`telemetry::export`]: the bounded, counted way spans leave for the collector).
//! - [`hub`]: local fan-out into a bounded [`hub::mailbox`] per socket; knows neither NATS nor sockets.
//! - [`broker`]: the NATS connection and its health, [`broker::fanin`] (a lean subscriber of many
//!   subjects on a connection of its own), [`broker::ingress`] (where a NATS message becomes a
//!   frame), the KV plumbing and the retry loop shared by presence and revocation.
//! - [`presence`]: who is online; [`presence::store`] keeps the KV records and the watch,
//!   [`presence::task`] runs them, [`presence::feed`] turns them into `presence_state` and `presence_diff`
//!   for the sockets that watch.
//! - [`revocation`]: revoked token ids in a KV bucket, followed by a watch; `logout` writes them.
//! - [`delivery`]: the event stream (nothing lost, positions, recovery): its settings and epoch, the
//!   ingress that follows it ([`delivery::live`]), the reads back, the hot windows, and publishing with an
//!   acknowledgement ([`delivery::publish`], the `publish` command).
//! - [`ws`]: the WebSocket endpoint and the state its sessions share, the per-socket session, the channel
//!   logic.
//! - [`http`]: the router (`/socket/websocket`, `/healthz`, `/readyz`, `/metrics`).
//! - [`app`]: wiring and ordered shutdown.
//!
//! # Who may import whom
//! Each line may use the lines above it and nothing below, so no module imports a module that imports
//! it. Only `broker`, `presence`, `revocation` and `delivery` name `async_nats`.
//!
//! ```text
//! protocol, topic, limits            leaves: std and libraries only
//! hub                                protocol, topic
//! config                             limits, topic
//! auth, telemetry                    config, topic
//! metrics                            auth (failure labels), protocol (close codes), telemetry (span drops),
//!                                    topic (topic kinds)
//! broker                             hub, metrics, protocol, topic
//! presence, revocation               auth, broker, config, hub, metrics, protocol, topic
//! delivery                           broker, hub, metrics, protocol, topic
//! ws                                 auth, config, delivery, hub, limits, metrics, presence, protocol,
//!                                    revocation, topic
//! http                               broker, delivery, metrics, ws
//! app                                everything above; imported by nobody but `main`
//! ```

/// Declares a fieldless enum together with `ALL`, its variants in declaration order, so that whatever is
/// built from every variant (a metric's label values, the close-code table) cannot miss one.
macro_rules! enum_with_all {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident,)+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            $vis const ALL: &'static [Self] = &[$(Self::$variant,)+];
        }
    };
}

pub mod app;
pub mod auth;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod revocation;
pub mod telemetry;
pub mod topic;
pub mod ws;
