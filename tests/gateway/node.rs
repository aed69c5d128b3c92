//! Node scripts of `tests/js` (phoenix.js and nats.js) as test processes, read line by line.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epoch_testkit::WAIT;

/// A Node script of `tests/js` (phoenix.js and nats.js), run with `node`; its output is read line by line.
/// Killed when dropped.
pub(crate) struct NodeScript {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    output: Arc<Mutex<Vec<String>>>,
}

impl NodeScript {
    pub(crate) fn start(script: &str, env: &[(&str, String)]) -> Self {
        let js_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
        assert!(
            js_dir.join("node_modules/phoenix").exists(),
            "tests/js/node_modules is missing: run `make setup` (npm ci in tests/js)"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .current_dir(js_dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, tag) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                "",
            ),
            (Box::new(stderr), "[stderr] "),
        ] {
            let (output, tx) = (Arc::clone(&output), tx.clone());
            let script = script.to_owned();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("TEST_LOG").is_some() {
                        eprintln!("[{script}] {tag}{line}");
                    }
                    output.lock().unwrap().push(format!("{tag}{line}"));
                    if tag.is_empty() {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        Self {
            child,
            lines,
            output,
        }
    }

    /// Waits for a line of the script's output that starts with `prefix`; returns the rest of it.
    pub(crate) async fn line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                _ => panic!(
                    "no `{prefix}` line from the script within {within:?}; output:\n{}",
                    self.output()
                ),
            }
        }
    }

    pub(crate) fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits for the script to end and asserts that every one of its checks passed; returns its output.
    pub(crate) async fn passes(mut self, within: Duration) -> String {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the script did not end within {within:?}; output:\n{}",
                    self.output()
                )
            })
            .unwrap();
        // The readers end with the process's output.
        let deadline = Instant::now() + WAIT;
        while !self.output().contains(" passed, ") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let output = self.output();
        assert!(status.success(), "the script failed:\n{output}");
        assert!(output.contains(" passed, 0 failed"), "{output}");
        output
    }
}
