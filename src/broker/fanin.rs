//! A lean NATS subscriber: one connection of its own carrying many exact-subject subscriptions, every
//! message delivered into one channel, tagged with its subscription's key.
//!
//! async-nats gives each subscription a channel of its own, whose first block of 32 messages (about
//! 6 KiB) is allocated when the subscription is made. Interest-based ingress subscribes once per user with
//! a session here, so that block would be paid by every signed-in socket. [`FanIn`] speaks the NATS client
//! protocol for subscribing only: `SUB`/`UNSUB` per key, `MSG`/`HMSG` decoded into [`Message`]s, `PING`/
//! `PONG` both ways. A subscription costs its subject in a map.
//!
//! The connection is made to the configured servers in turn, and to those the servers announce (`INFO`'s
//! `connect_urls`: a gateway given one node of a cluster fails over to the others), as async-nats does
//! for the main connection; TLS for a `tls://` URL or a server that requires it, verified against the
//! platform's roots, also as async-nats does. After every (re)connection every subscription
//! is sent again and confirmed by a `PONG` before [`FanIn::reconnects`] moves: what was published while
//! the connection was down is the caller's to catch up on, from then on. [`FanIn::flush`] returns once the
//! server has registered every subscription made before it.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, HeaderName, HeaderValue, Message, ServerAddr};
use bytes::{Buf as _, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Messages delivered but not yet taken by the caller; past it, reading the socket waits (and the server
/// buffers, up to its slow-consumer limit).
const DELIVERED_CAPACITY: usize = 8_192;
/// Longest control line accepted from the server (`INFO` with a long URL list is the longest).
const MAX_CONTROL_LINE: usize = 64 * 1024;
/// Largest message accepted whatever the server announces.
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// Bound on connecting, the TLS handshake and the server's answer to `CONNECT`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A `PING` this often; a connection with [`MAX_PINGS_OUT`] of them unanswered is dropped as stale.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const MAX_PINGS_OUT: usize = 2;
/// Reconnect delays, as the main connection's: doubling from the first, capped.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// While the servers cannot be reached, one warning per this many failed attempts (about a minute and a
/// half at the longest delay).
const LOG_EVERY_FAILURES: u32 = 16;
/// Read buffer, grown as messages need.
const READ_CHUNK: usize = 16 * 1024;

/// Why the subscriber could not start.
#[derive(Debug, thiserror::Error)]
pub enum FanInError {
    #[error("invalid NATS URL '{url}': {source}")]
    Url {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no NATS URL")]
    NoUrl,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("the server refused the connection: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no answer to {MAX_PINGS_OUT} pings: the connection is stale")]
    Stale,
}

/// A message and the key of the subscription it arrived on.
pub type Delivered = (u64, Message);

/// The handle of the subscriber; its task runs until the `stop` given to [`start`].
#[derive(Debug, Clone)]
pub struct FanIn {
    commands: mpsc::UnboundedSender<Command>,
    reconnects: watch::Receiver<u64>,
}

#[derive(Debug)]
enum Command {
    Subscribe { key: u64, subject: Box<str> },
    Unsubscribe { key: u64 },
    Flush(oneshot::Sender<()>),
}

impl FanIn {
    /// Subscribes `subject` under `key` (its sid on the wire); a key already subscribed is replaced.
    pub fn subscribe(&self, key: u64, subject: String) {
        let subject = subject.into_boxed_str();
        // Fails only once the task has stopped, and then nothing is delivered anyway.
        let _ = self.commands.send(Command::Subscribe { key, subject });
    }

    pub fn unsubscribe(&self, key: u64) {
        let _ = self.commands.send(Command::Unsubscribe { key });
    }

    /// Resolves `true` once the server has registered every subscription made before the call (a
    /// `PING`'s `PONG`), waiting for a connection if there is none; `false` after `within`.
    pub async fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Flush(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }

    /// Moves after every reconnection (not the first connection), once the subscriptions are in place.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.clone()
    }
}

/// Starts the subscriber's task, connecting to `urls` in turn; returns its handle and the channel of
/// what it receives.
///
/// # Errors
/// [`FanInError`] when a URL cannot be parsed.
pub fn start(
    urls: &[String],
    name: String,
    stop: CancellationToken,
) -> Result<(FanIn, mpsc::Receiver<Delivered>), FanInError> {
    let servers = urls
        .iter()
        .map(|url| {
            url.parse::<ServerAddr>().map_err(|source| FanInError::Url {
                url: url.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(FanInError::NoUrl);
    }
    let (delivered, messages) = mpsc::channel(DELIVERED_CAPACITY);
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (reconnects_tx, reconnects) = watch::channel(0);
    let task = Task {
        servers,
        name,
        subscriptions: HashMap::new(),
        flushes: Vec::new(),
        commands: command_rx,
        delivered,
        reconnects: reconnects_tx,
    };
    tokio::spawn(task.run(stop));
    Ok((
        FanIn {
            commands,
            reconnects,
        },
        messages,
    ))
}

/// A connected, handshaken stream, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// The part of the server's `INFO` the subscriber needs.
#[derive(Debug, Deserialize)]
struct Info {
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    max_payload: usize,
    /// Other servers of the cluster, `host:port`.
    #[serde(default)]
    connect_urls: Vec<String>,
}

/// The subscriber's task: its subscriptions outlive connections.
struct Task {
    servers: Vec<ServerAddr>,
    name: String,
    subscriptions: HashMap<u64, Box<str>>,
    /// Flushes waiting for a connection.
    flushes: Vec<oneshot::Sender<()>>,
    commands: mpsc::UnboundedReceiver<Command>,
    delivered: mpsc::Sender<Delivered>,
    reconnects: watch::Sender<u64>,
}

/// How a connected session ended.
enum Ended {
    Stopped,
    Failed(ConnectionError),
}

impl Task {
    async fn run(mut self, stop: CancellationToken) {
        let mut connected_before = false;
        let mut failures: u32 = 0;
        for next in 0.. {
            let server = self.servers[next % self.servers.len()].clone();
            let handshake = tokio::select! {
                () = stop.cancelled() => return,
                result = self.handshake(&server) => result,
            };
            match handshake {
                Ok((stream, buffer, info)) => {
                    failures = 0;
                    self.discovered(&info.connect_urls);
                    match self
                        .session(stream, buffer, &info, connected_before, &stop)
                        .await
                    {
                        Ended::Stopped => return,
                        Ended::Failed(error) => {
                            tracing::warn!(%error, server = %server.host(), "NATS subscriber connection lost; reconnecting");
                        }
                    }
                    connected_before = true;
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    // Once per server of the list, then every [`LOG_EVERY_FAILURES`]th: not a line per retry.
                    if failures as usize <= self.servers.len()
                        || failures.is_multiple_of(LOG_EVERY_FAILURES)
                    {
                        tracing::warn!(%error, server = %server.host(), failures, "NATS subscriber cannot connect; retrying");
                    }
                }
            }
            let delay = FIRST_RECONNECT_DELAY
                .saturating_mul(1 << failures.min(6))
                .min(MAX_RECONNECT_DELAY);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Adds the servers a server announced to those tried in turn.
    fn discovered(&mut self, urls: &[String]) {
        for url in urls {
            match url.parse::<ServerAddr>() {
                Ok(found) if !self.servers.contains(&found) => {
                    tracing::debug!(%url, "NATS subscriber: server discovered");
                    self.servers.push(found);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%url, %error, "NATS subscriber: announced URL ignored")
                }
            }
        }
    }

    /// Connects, reads `INFO`, upgrades to TLS when asked, sends `CONNECT` and waits for the `PONG` that
    /// confirms it. Returns the stream and what was read past that `PONG`.
    async fn handshake(
        &self,
        server: &ServerAddr,
    ) -> Result<(Box<dyn Stream>, BytesMut, Info), ConnectionError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let address = server
                .socket_addrs()
                .await?
                .next()
                .ok_or(ConnectionError::Protocol(
                    "the server's name resolves to nothing",
                ))?;
            let tcp = TcpStream::connect(address).await?;
            tcp.set_nodelay(true)?;
            let mut stream: Box<dyn Stream> = Box::new(tcp);
            let mut buffer = BytesMut::with_capacity(READ_CHUNK);
            let line = read_line(&mut stream, &mut buffer).await?;
            let info = line
                .strip_prefix("INFO ")
                .and_then(|json| serde_json::from_str::<Info>(json).ok())
                .ok_or(ConnectionError::Protocol(
                    "the server did not start with INFO",
                ))?;
            if server.tls_required() || info.tls_required {
                if !buffer.is_empty() {
                    return Err(ConnectionError::Protocol("data after INFO before TLS"));
                }
                stream = tls(stream, server.host()).await?;
            }
            let connect = serde_json::json!({
                "verbose": false,
                "pedantic": false,
                "tls_required": server.tls_required() || info.tls_required,
                "name": self.name,
                "lang": "rust",
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": 1,
                "echo": true,
                "headers": true,
                "no_responders": false,
            });
            stream
                .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
                .await?;
            loop {
                let line = read_line(&mut stream, &mut buffer).await?;
                match line.split_once(' ').map_or(line.as_str(), |(op, _)| op) {
                    "PONG" => return Ok((stream, buffer, info)),
                    "-ERR" => return Err(ConnectionError::Refused(line[4..].trim().to_owned())),
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| ConnectionError::TimedOut)?
    }

    /// Serves one connection: subscribes everything, then relays commands and messages until it ends.
    /// Flushes it did not answer wait for the next connection.
    async fn session(
        &mut self,
        stream: Box<dyn Stream>,
        buffer: BytesMut,
        info: &Info,
        reconnected: bool,
        stop: &CancellationToken,
    ) -> Ended {
        let mut pongs: VecDeque<Pong> = VecDeque::from([Pong::Subscribed { reconnected }]);
        pongs.extend(self.flushes.drain(..).map(Pong::Flush));
        let ended = self.serve(stream, buffer, info, &mut pongs, stop).await;
        self.flushes
            .extend(pongs.into_iter().filter_map(|pong| match pong {
                Pong::Flush(done) => Some(done),
                Pong::Subscribed { .. } | Pong::KeepAlive => None,
            }));
        ended
    }

    async fn serve(
        &mut self,
        mut stream: Box<dyn Stream>,
        mut buffer: BytesMut,
        info: &Info,
        pongs: &mut VecDeque<Pong>,
        stop: &CancellationToken,
    ) -> Ended {
        let max_payload = if info.max_payload == 0 {
            MAX_PAYLOAD
        } else {
            info.max_payload.min(MAX_PAYLOAD)
        };
        // Every subscription again, then a PING: its PONG means they are all registered.
        let mut out = String::with_capacity(self.subscriptions.len() * 48 + 8);
        for (key, subject) in &self.subscriptions {
            out.push_str(&format!("SUB {subject} {key}\r\n"));
        }
        out.push_str("PING\r\n");
        if let Err(error) = stream.write_all(out.as_bytes()).await {
            return Ended::Failed(error.into());
        }
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
        loop {
            // Whatever is complete in the buffer first.
            loop {
                match parse(&mut buffer, max_payload) {
                    Ok(None) => break,
                    Ok(Some(Op::Message(key, message))) => {
                        if self.delivered.send((key, message)).await.is_err() {
                            return Ended::Stopped;
                        }
                    }
                    Ok(Some(Op::Ping)) => {
                        if let Err(error) = stream.write_all(b"PONG\r\n").await {
                            return Ended::Failed(error.into());
                        }
                    }
                    Ok(Some(Op::Pong)) => match pongs.pop_front() {
                        Some(Pong::Subscribed { reconnected }) => {
                            if reconnected {
                                self.reconnects.send_modify(|n| *n += 1);
                                tracing::info!(
                                    subscriptions = self.subscriptions.len(),
                                    "NATS subscriber reconnected"
                                );
                            }
                        }
                        Some(Pong::Flush(done)) => {
                            let _ = done.send(());
                        }
                        Some(Pong::KeepAlive) | None => {}
                    },
                    Ok(Some(Op::Error(message))) => {
                        tracing::warn!(%message, "NATS subscriber: the server reported an error");
                    }
                    Ok(Some(Op::Other)) => {}
                    Err(error) => return Ended::Failed(error),
                }
            }
            let mut command_out = Vec::new();
            tokio::select! {
                () = stop.cancelled() => return Ended::Stopped,
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ended::Stopped };
                    self.apply(command, &mut command_out, pongs);
                    // A burst of commands (a join storm) goes out in one write.
                    while let Ok(command) = self.commands.try_recv() {
                        self.apply(command, &mut command_out, pongs);
                    }
                }
                read = stream.read_buf(&mut buffer) => match read {
                    Ok(0) => return Ended::Failed(ConnectionError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {}
                    Err(error) => return Ended::Failed(error.into()),
                },
                _ = ping.tick() => {
                    if pongs.iter().filter(|p| matches!(p, Pong::KeepAlive)).count() >= MAX_PINGS_OUT {
                        return Ended::Failed(ConnectionError::Stale);
                    }
                    pongs.push_back(Pong::KeepAlive);
                    command_out.extend_from_slice(b"PING\r\n");
                }
            }
            if !command_out.is_empty()
                && let Err(error) = stream.write_all(&command_out).await
            {
                return Ended::Failed(error.into());
            }
            if buffer.capacity() - buffer.len() < READ_CHUNK / 4 {
                buffer.reserve(READ_CHUNK);
            }
        }
    }

    /// Applies one command to the subscriptions, writing what it sends into `out`.
    fn apply(&mut self, command: Command, out: &mut Vec<u8>, pongs: &mut VecDeque<Pong>) {
        match command {
            Command::Subscribe { key, subject } => {
                out.extend_from_slice(format!("SUB {subject} {key}\r\n").as_bytes());
                self.subscriptions.insert(key, subject);
            }
            Command::Unsubscribe { key } => {
                if self.subscriptions.remove(&key).is_some() {
                    out.extend_from_slice(format!("UNSUB {key}\r\n").as_bytes());
                }
            }
            Command::Flush(done) => {
                out.extend_from_slice(b"PING\r\n");
                pongs.push_back(Pong::Flush(done));
            }
        }
    }
}

/// What a `PONG` answers.
enum Pong {
    Subscribed { reconnected: bool },
    Flush(oneshot::Sender<()>),
    KeepAlive,
}

/// One operation from the server.
#[derive(Debug)]
enum Op {
    Message(u64, Message),
    Ping,
    Pong,
    Error(String),
    /// `+OK`, `INFO` after the first: nothing to do.
    Other,
}

/// Takes one complete operation off the front of `buffer`; `None` while it is incomplete.
fn parse(buffer: &mut BytesMut, max_payload: usize) -> Result<Option<Op>, ConnectionError> {
    let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") else {
        if buffer.len() > MAX_CONTROL_LINE {
            return Err(ConnectionError::Protocol("control line too long"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buffer[..end])
        .map_err(|_| ConnectionError::Protocol("control line is not UTF-8"))?;
    let mut args = line.split_ascii_whitespace();
    let op = args.next().unwrap_or_default();
    let (header_len, total_len, subject, key, reply) = match op {
        "MSG" | "HMSG" => {
            let args: Vec<&str> = args.collect();
            let sizes = if op == "MSG" { 1 } else { 2 };
            let (names, sizes) = match args.len().checked_sub(sizes) {
                Some(split) if split == 2 || split == 3 => args.split_at(split),
                _ => return Err(ConnectionError::Protocol("malformed MSG line")),
            };
            let number = |s: &str| {
                s.parse::<usize>()
                    .map_err(|_| ConnectionError::Protocol("malformed size"))
            };
            let total = number(sizes[sizes.len() - 1])?;
            let header = if op == "HMSG" { number(sizes[0])? } else { 0 };
            if header > total || total > max_payload {
                return Err(ConnectionError::Protocol("message size out of bounds"));
            }
            let key = names[1]
                .parse::<u64>()
                .map_err(|_| ConnectionError::Protocol("unknown subscription id"))?;
            let reply = names.get(2).map(|r| (*r).to_owned());
            (header, total, names[0].to_owned(), key, reply)
        }
        _ => {
            let parsed = match op {
                "PING" => Op::Ping,
                "PONG" => Op::Pong,
                "-ERR" => Op::Error(line[4..].trim().trim_matches('\'').to_owned()),
                _ => Op::Other,
            };
            buffer.advance(end + 2);
            return Ok(Some(parsed));
        }
    };
    let start = end + 2;
    if buffer.len() < start + total_len + 2 {
        buffer.reserve(start + total_len + 2 - buffer.len());
        return Ok(None);
    }
    buffer.advance(start);
    let mut body = buffer.split_to(total_len).freeze();
    buffer.advance(2);
    let headers = if header_len > 0 {
        let block = body.split_to(header_len);
        Some(parse_headers(&block))
    } else {
        None
    };
    let message = Message {
        subject: subject.into(),
        reply: reply.map(Into::into),
        payload: body,
        headers,
        status: None,
        description: None,
        length: total_len,
    };
    Ok(Some(Op::Message(key, message)))
}

/// `NATS/1.0\r\nName: value\r\n…\r\n\r\n`; lines that are not a valid header are skipped.
fn parse_headers(block: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let text = String::from_utf8_lossy(block);
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_str(name.trim()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

/// Reads one control line (during the handshake), leaving what follows it in `buffer`.
async fn read_line(
    stream: &mut Box<dyn Stream>,
    buffer: &mut BytesMut,
) -> Result<String, ConnectionError> {
    loop {
        if let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buffer[..end]).into_owned();
            buffer.advance(end + 2);
            return Ok(line);
        }
        if buffer.len() > MAX_CONTROL_LINE {
            return Err(ConnectionError::Protocol("control line too long"));
        }
        if stream.read_buf(buffer).await? == 0 {
            return Err(ConnectionError::Io(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
}

/// Upgrades `stream` to TLS for `host`, trusting the platform's roots (as async-nats does by default;
/// `SSL_CERT_FILE` adds a CA).
async fn tls(stream: Box<dyn Stream>, host: &str) -> Result<Box<dyn Stream>, ConnectionError> {
    let roots = rustls_native_certs::load_native_certs();
    let mut store = tokio_rustls::rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.certs);
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|error| ConnectionError::Tls(error.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = connector.connect(name, stream).await?;
    Ok(Box::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(input: &[u8]) -> (Vec<Op>, BytesMut) {
        let mut buffer = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buffer, 1024).unwrap() {
            ops.push(op);
        }
        (ops, buffer)
    }

    #[test]
    fn messages_with_and_without_headers_and_control_lines() {
        let input = b"PING\r\nMSG a.b 7 5\r\nhello\r\n+OK\r\nHMSG a.c 9 r.1 31 33\r\nNATS/1.0\r\nNats-Sequence: 42\r\n\r\nhi\r\nPONG\r\n-ERR 'Stale Connection'\r\n";
        let (ops, rest) = parsed(input);
        assert!(rest.is_empty());
        assert!(matches!(ops[0], Op::Ping));
        let Op::Message(7, ref m) = ops[1] else {
            panic!("{:?}", ops[1])
        };
        assert_eq!((&*m.subject, &m.payload[..]), ("a.b", &b"hello"[..]));
        assert!(m.headers.is_none());
        assert!(matches!(ops[2], Op::Other));
        let Op::Message(9, ref m) = ops[3] else {
            panic!("{:?}", ops[3])
        };
        assert_eq!(&m.payload[..], b"hi");
        assert_eq!(m.reply.as_deref(), Some("r.1"));
        let headers = m.headers.as_ref().unwrap();
        assert_eq!(
            headers.get("Nats-Sequence").map(HeaderValue::as_str),
            Some("42")
        );
        assert!(matches!(ops[4], Op::Pong));
        assert!(matches!(ops[5], Op::Error(ref e) if e == "Stale Connection"));
    }

    #[test]
    fn an_incomplete_message_waits_for_the_rest() {
        let mut buffer = BytesMut::from(&b"MSG a 1 10\r\nhello"[..]);
        assert!(parse(&mut buffer, 1024).unwrap().is_none());
        buffer.extend_from_slice(b"world\r\n");
        assert!(matches!(
            parse(&mut buffer, 1024).unwrap(),
            Some(Op::Message(1, _))
        ));
        assert!(buffer.is_empty());
    }

    #[test]
    fn malformed_lines_and_sizes_are_errors() {
        for bad in [
            &b"MSG a 1\r\n"[..],
            b"MSG a x 2\r\nhi\r\n",
            b"MSG a 1 2000\r\n",
            b"HMSG a 1 5 3\r\nabc\r\n",
        ] {
            let mut buffer = BytesMut::from(bad);
            assert!(
                parse(&mut buffer, 1024).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = BytesMut::from(&vec![b'x'; MAX_CONTROL_LINE + 1][..]);
        assert!(parse(&mut long, 1024).is_err());
    }
}
