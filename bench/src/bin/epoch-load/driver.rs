//! Load generation in processes of its own, and the turns that alternate the targets.
//!
//! The main process starts every target's servers ([`crate::servers`]), then one *driver* per target: this
//! program again, with the hidden `--drive <target>`. A driver opens and holds that target's sockets,
//! publishes to that target's nats-server, times what arrives, and measures only on the turns the main
//! process gives it. The turns go round the targets, A B C A B C …: one target is loaded at a time while
//! the others hold their sockets open and idle, so that a noisy minute of the machine falls on every target
//! alike instead of on one block of windows, and every server is up, with its sockets open, for the whole
//! run.
//!
//! Why processes and not tasks: a process may hold 20,000 open files, and 10,000 sockets to each of three
//! servers are 30,000 client ends. A driver holds at most `--sockets` (≤ 19,500); the main process holds
//! none. Restarting the targets between windows instead would measure cold servers and reopen every socket
//! for each window.
//!
//! The protocol is JSON lines over the driver's stdin and stdout:
//! - main → driver: `go`, take a turn;
//! - driver → main: `{"driver":"turn_over"}` after each turn, then `{"driver":"outcome",…}` on one more
//!   turn (its report, its headline values and its failures), or `{"driver":"failed","error":…}` at once.
//!
//! Any other line a driver prints is progress, shown with its target's label. A turn is setup (opening the
//! sockets, a warm-up window, the final sample) or measured; a target's CPU figures are taken over its
//! measured turns only ([`Turns`]).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::clients::Kind;
use crate::report::CpuFigures;
use crate::servers::Server;
use crate::stats::{CLOCK_TICKS_PER_SEC, ProcSample, sample, sample_self};

/// The main process's line that gives a driver its turn.
const GO: &str = "go";
/// The option that makes this program a driver.
const DRIVE_FLAG: &str = "--drive";

/// What a driver knows of its target, passed as JSON in `--drive`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Remote {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    pub(crate) nats_url: String,
    pub(crate) pid: u32,
    pub(crate) backing_pid: Option<u32>,
    /// The gateway settings of the target (`EPOCH_GATEWAY__…`, the scenario's then the command line's), so
    /// that a scenario can tell two gateways with other settings apart (presence-feed: the feed off and on).
    pub(crate) settings: Vec<(String, String)>,
    /// The monitoring endpoint of the target's nats-server (`/varz`).
    pub(crate) monitoring: Option<SocketAddr>,
    /// The processes of the other targets (servers and their nats-servers), idle on this target's turns
    /// but not silent (a gateway keeps refreshing its presence records): the timeline samples them too.
    pub(crate) neighbours: Vec<u32>,
}

impl Remote {
    /// `--drive`'s value.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

/// What a target's run produced, as the main process needs it.
#[derive(Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// The target's part of the report (its `TargetReport`).
    pub(crate) report: serde_json::Value,
    /// Its values of the headline rows, in their order (`None`: not measured).
    pub(crate) values: Vec<Option<f64>>,
    /// Promises of the server that the run found broken.
    pub(crate) failures: Vec<String>,
}

/// A driver's line to the main process.
#[derive(Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case")]
enum FromDriver {
    TurnOver,
    Outcome(Outcome),
    Failed { error: String },
}

fn send(message: &FromDriver) -> Result<()> {
    // One line, written whole under stdout's lock, so progress lines never split it.
    println!("{}", serde_json::to_string(message)?);
    Ok(())
}

/// A driver ends with its outcome or its error.
pub(crate) fn report_end(result: Result<Outcome>) -> Result<()> {
    send(&match result {
        Ok(outcome) => FromDriver::Outcome(outcome),
        Err(error) => FromDriver::Failed {
            error: format!("{error:#}"),
        },
    })
}

// ---------------------------------------------------------------------------------------------------------
// Turns, in the driver (or in the main process for the gateway-only scenarios)

/// What a turn is for: its CPU counts in the target's figures only when it measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Phase {
    Setup,
    Measured,
}

/// The turns of one target, and the CPU of its server, nats-server and load over its measured turns.
pub(crate) struct Turns {
    /// The main process's `go` lines; none when this process runs its target alone.
    go: Option<tokio::sync::Mutex<Lines<BufReader<tokio::io::Stdin>>>>,
    server: u32,
    backing: Option<u32>,
    account: Mutex<Account>,
}

#[derive(Default)]
struct Account {
    /// The turn under way and the processes' samples at its start.
    current: Option<(Phase, Samples)>,
    measured: Ticks,
}

#[derive(Clone, Copy)]
struct Samples {
    server: ProcSample,
    backing: Option<ProcSample>,
    tool: ProcSample,
}

/// CPU ticks used, and seconds passed.
#[derive(Default, Clone, Copy)]
struct Ticks {
    server: u64,
    backing: u64,
    tool: u64,
    secs: f64,
}

impl Ticks {
    fn between(from: Samples, to: Samples) -> Self {
        let backing = from
            .backing
            .zip(to.backing)
            .map_or(0, |(a, b)| b.cpu_ticks.saturating_sub(a.cpu_ticks));
        Self {
            server: to.server.cpu_ticks.saturating_sub(from.server.cpu_ticks),
            backing,
            tool: to.tool.cpu_ticks.saturating_sub(from.tool.cpu_ticks),
            secs: to.tool.at.duration_since(from.tool.at).as_secs_f64(),
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            server: self.server + other.server,
            backing: self.backing + other.backing,
            tool: self.tool + other.tool,
            secs: self.secs + other.secs,
        }
    }
}

impl Turns {
    /// Turns given by the main process over this process's stdin.
    pub(crate) fn driven(server: u32, backing: Option<u32>) -> Self {
        let go = BufReader::new(tokio::io::stdin()).lines();
        Self::new(Some(tokio::sync::Mutex::new(go)), server, backing)
    }

    /// Turns this process takes at once: it runs its target alone.
    pub(crate) fn alone(server: u32, backing: Option<u32>) -> Self {
        Self::new(None, server, backing)
    }

    fn new(
        go: Option<tokio::sync::Mutex<Lines<BufReader<tokio::io::Stdin>>>>,
        server: u32,
        backing: Option<u32>,
    ) -> Self {
        Self {
            go,
            server,
            backing,
            account: Mutex::new(Account::default()),
        }
    }

    fn samples(&self) -> Result<Samples> {
        Ok(Samples {
            server: sample(self.server)?,
            backing: self.backing.map(sample).transpose()?,
            tool: sample_self()?,
        })
    }

    /// Waits for the turn, then starts it.
    pub(crate) async fn take(&self, phase: Phase) -> Result<()> {
        if let Some(go) = &self.go {
            let line = go.lock().await.next_line().await?;
            match line.as_deref() {
                Some(GO) => {}
                Some(other) => bail!("unexpected line from the main process: {other:?}"),
                None => bail!("the main process is gone"),
            }
        }
        let samples = self.samples()?;
        let mut account = self.account.lock().expect("no panics under this lock");
        ensure!(account.current.is_none(), "turns do not nest");
        account.current = Some((phase, samples));
        Ok(())
    }

    /// Ends the turn under way.
    pub(crate) fn over(&self) -> Result<()> {
        let now = self.samples()?;
        {
            let mut account = self.account.lock().expect("no panics under this lock");
            if let Some((Phase::Measured, from)) = account.current.take() {
                account.measured = account.measured.add(Ticks::between(from, now));
            }
        }
        if self.go.is_some() {
            send(&FromDriver::TurnOver)?;
        }
        Ok(())
    }

    /// The CPU of the measured turns so far, the one under way included.
    pub(crate) fn cpu(&self) -> Result<CpuFigures> {
        let now = self.samples()?;
        let account = self.account.lock().expect("no panics under this lock");
        let ticks = match account.current {
            Some((Phase::Measured, from)) => account.measured.add(Ticks::between(from, now)),
            _ => account.measured,
        };
        let secs = ticks.secs;
        let percent = |t: u64| 100.0 * t as f64 / CLOCK_TICKS_PER_SEC / secs;
        Ok(CpuFigures {
            measured_secs: secs,
            server_cpu_percent: percent(ticks.server),
            backing_nats_cpu_percent: self.backing.map(|_| percent(ticks.backing)),
            load_tool_cpu_secs: ticks.tool as f64 / CLOCK_TICKS_PER_SEC,
            load_tool_cpu_percent: percent(ticks.tool),
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// The main process's side

/// One target's driver, as the main process holds it; killed when dropped.
struct Driver {
    kind: Kind,
    /// What its progress lines are shown with: the target's label.
    label: String,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Driver {
    /// Starts this program with the main process's arguments and `--drive <server>`, which names the
    /// processes of the `others` too.
    fn spawn(server: &Server, others: &[&Server]) -> Result<Self> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut remote = server.remote();
        remote.neighbours = others
            .iter()
            .flat_map(|other| std::iter::once(other.pid).chain(other.backing_pid))
            .collect();
        let mut child = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .arg(DRIVE_FLAG)
            .arg(serde_json::to_string(&remote)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a driver")?;
        let stdin = child.stdin.take().context("the driver's stdin")?;
        let stdout = child.stdout.take().context("the driver's stdout")?;
        Ok(Self {
            kind: server.kind,
            label: server.label(),
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Gives the driver a turn and shows its progress until the turn is over; its outcome when that was
    /// its last.
    async fn turn(&mut self) -> Result<Option<Outcome>> {
        let label = &self.label;
        // A driver that failed has exited: its last line says why.
        let _ = self.stdin.write_all(format!("{GO}\n").as_bytes()).await;
        let _ = self.stdin.flush().await;
        while let Some(line) = self.lines.next_line().await? {
            match serde_json::from_str::<FromDriver>(&line) {
                Ok(FromDriver::TurnOver) => return Ok(None),
                Ok(FromDriver::Outcome(outcome)) => {
                    // Its sockets are closed before the next target's turn starts.
                    self.child.wait().await?;
                    return Ok(Some(outcome));
                }
                Ok(FromDriver::Failed { error }) => bail!("{label}: {error}"),
                Err(_) => println!("{:<10}{line}", format!("[{label}]")),
            }
        }
        let status = self.child.wait().await?;
        bail!("{label}: the driver ended without a report ({status})")
    }
}

/// Starts a driver per server and gives them turns, one after the other, until every one has reported.
pub(crate) async fn take_turns(servers: &[Server]) -> Result<Vec<(Kind, Outcome)>> {
    let mut drivers = servers
        .iter()
        .enumerate()
        .map(|(i, server)| {
            let others: Vec<&Server> = servers
                .iter()
                .enumerate()
                .filter_map(|(j, other)| (j != i).then_some(other))
                .collect();
            Driver::spawn(server, &others)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut outcomes: Vec<Option<Outcome>> = drivers.iter().map(|_| None).collect();
    while outcomes.iter().any(Option::is_none) {
        for (driver, outcome) in drivers.iter_mut().zip(&mut outcomes) {
            if outcome.is_none() {
                *outcome = driver.turn().await?;
            }
        }
    }
    Ok(drivers
        .iter()
        .zip(outcomes)
        .filter_map(|(driver, outcome)| Some((driver.kind, outcome?)))
        .collect())
}
