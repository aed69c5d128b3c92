//! Integration tests: the real binary against a real nats-server, driven by real WebSocket clients
//! (the harness is the `epoch-testkit` crate).

mod auth;
mod channels;
mod cli;
mod cluster;
mod delivery;
mod failover;
mod feed;
mod hostile;
mod ingress;
mod lifecycle;
mod limits;
mod node;
mod outage;
mod phoenix_js;
mod presence;
mod publish;
mod sessions;
mod slow;
mod stream;
mod telemetry;

/// The harness starts the binary cargo built for these tests.
#[test]
fn the_harness_runs_the_binary_under_test() {
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_epoch-gateway"));
    assert_eq!(
        epoch_testkit::gateway_bin().canonicalize().unwrap(),
        built.canonicalize().unwrap()
    );
}
