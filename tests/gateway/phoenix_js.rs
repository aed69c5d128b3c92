//! Compatibility with the official phoenix.js client, replaying the Epochtalk browser's flow
//! (`tests/js/phoenix_compat.mjs`, run by Node).

use std::path::PathBuf;
use std::process::Command;

use epoch_testkit::*;

#[tokio::test]
async fn the_phoenix_js_client_works_unchanged() {
    let js_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js_dir.join("node_modules/phoenix").exists(),
        "tests/js/node_modules is missing: run `make setup` (npm ci in tests/js)"
    );
    let nats = Nats::start();
    let gw = Gateway::start(&nats.url).await;
    let output = tokio::task::spawn_blocking({
        let socket_url = format!("ws://{}/socket", gw.addr);
        let (nats_url, prefix, token) = (nats.url.clone(), gw.prefix.clone(), gw.token(42));
        move || {
            Command::new("node")
                .arg("phoenix_compat.mjs")
                .current_dir(js_dir)
                .env("GATEWAY_SOCKET_URL", socket_url)
                .env("NATS_URL", nats_url)
                .env("SUBJECT_PREFIX", prefix)
                .env("TOKEN", token)
                .env("USER_ID", "42")
                .env("OTHER_USER_ID", "77")
                .output()
                .expect("node runs")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "phoenix.js checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
