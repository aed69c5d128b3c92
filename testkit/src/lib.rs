//! The process harness of epoch-gateway: the real processes that the integration tests (`tests/gateway`)
//! and the benchmark programs (`bench/`) start and talk to. No mocks: NATS is a real nats-server, the
//! gateway is the real binary, sockets are real WebSockets.
//!
//! - [`Nats`]: nats-server on a random loopback port with JetStream in a temporary store, or with a plain
//!   WebSocket listener ([`Serves`]); [`Cluster`]: three JetStream nodes from `nats/cluster/`.
//! - [`Gateway`]: the `epoch-gateway` binary ([`gateway_bin`]) on port 0, its address taken from its log,
//!   ready once `/readyz` says so. Each gets its own subject prefix, presence bucket and node id, so tests
//!   run in parallel. Its log lines are kept ([`Gateway::logs`]).
//! - [`PhxClient`]: a Phoenix V2 client over a real WebSocket.
//! - [`Process`]: every child is killed and reaped on drop; nothing outlives a test or a program.
//!
//! A test wants a panic that shows what did not start; a program wants an error it can report:
//! [`Nats::start`] and [`Gateway::start_with`] panic, [`Nats::launch`] and [`Gateway::try_start`] return
//! the error.

mod gateway;
mod nats;
mod phoenix;
mod process;

pub use gateway::{Echo, Gateway, GatewayOptions, SECRET, http_get, metric_in, mint, now, sign};
pub use nats::{Cluster, Nats, Serves};
pub use phoenix::{Next, PhxClient, WAIT, Ws, broadcast};
pub use process::{Process, START_WAIT, free_port, gateway_bin, nats_server_bin, unique, vm_rss};
/// For tests that need a scratch directory.
pub use tempfile;
/// WebSocket messages, for tests that send frames a Phoenix client would not.
pub use tokio_tungstenite::tungstenite::Message;
