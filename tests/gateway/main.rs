//! Integration tests: the real binary against a real nats-server, driven by real WebSocket clients.

// Helpers are `pub` for the test modules of this one binary.
#![allow(unreachable_pub)]

mod auth;
mod channels;
mod cli;
mod cluster;
mod delivery;
mod failover;
mod helpers;
mod hostile;
mod ingress;
mod lifecycle;
mod limits;
mod outage;
mod phoenix_js;
mod presence;
mod sessions;
mod slow;
mod stream;
mod telemetry;
