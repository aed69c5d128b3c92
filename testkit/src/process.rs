//! Child processes, where their binaries are, and what the harness reads about them from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

/// Bound on a process opening its port, and on a gateway reporting its address and becoming ready.
pub const START_WAIT: Duration = Duration::from_secs(30);

/// A child process, killed and reaped on drop: nothing outlives a test or a program, even on error or panic.
pub struct Process(pub(crate) Child);

impl Process {
    /// Spawns `command`; the error names the binary and says how to get it (`hint`).
    pub fn spawn(command: &mut Command, hint: &str) -> Result<Self> {
        let child = command.spawn().with_context(|| {
            format!(
                "cannot start {}; {hint}",
                command.get_program().to_string_lossy()
            )
        })?;
        Ok(Self(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The child's stdout, when it was spawned with a pipe there; taken once, by whoever reads it.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.stdout.take()
    }

    /// Kills the process (SIGKILL) and reaps it; nothing happens when it has already exited.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends a signal by name (`TERM`, `INT`, …) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// The exit status, once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().expect("the child can be waited for")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on loopback (bound and released; another process could take it in between, which
/// loopback tests and benchmarks accept).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on loopback")
}

/// Waits until something accepts connections on `127.0.0.1:port`.
pub(crate) fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "{what} did not open port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A name no other test or run uses: `prefix` and 12 hex digits.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The root of the workspace (this crate lies in `testkit/`): `nats/`, `.tools/`.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lies inside the workspace")
}

/// `NATS_SERVER_BIN` when set, else the one `scripts/setup.sh` installs into `.tools/`, else `nats-server`
/// from `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let local = workspace_root().join(".tools/nats-server-bin/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// The `epoch-gateway` that cargo built with the running program, in the same `target/<profile>/`: the
/// directory of a benchmark binary, or the parent of an integration test's `deps/`. (For tests this is the
/// path of `CARGO_BIN_EXE_epoch-gateway`; `tests/gateway` checks that it is.)
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the running program has a path");
    let dir = exe.parent().expect("a program lies in a directory");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    profile_dir.join("epoch-gateway")
}

/// Resident set size of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn vm_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kib * 1024)
}
