//! The baseline's sockets: the NATS text protocol over nats-server's WebSocket listener. Each sends
//! `CONNECT`, `SUB`s to the subjects of its user's three topics and `PING`; the `PONG` plays the part of
//! the join replies. Server `PING`s are answered with `PONG`; in the is-online scenario the control frame
//! is a client `PING`, timed to its `PONG`.

use std::collections::VecDeque;
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use epoch_testkit::Ws;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

use crate::stats::{Stats, now_us};

/// Subscribes the socket of `user` over `stream` to `<prefix>.user.public`, `.role` and `.<user>`.
pub(crate) async fn open(
    stream: TcpStream,
    addr: SocketAddr,
    prefix: &str,
    user: u64,
) -> Result<Ws> {
    let url = format!("ws://{addr}/");
    let stream = MaybeTlsStream::Plain(stream);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(super::ws_config())).await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\n\
         SUB {prefix}.user.public 1\r\nSUB {prefix}.user.role 2\r\nSUB {prefix}.user.{user} 3\r\nPING\r\n"
    );
    ws.send(Message::binary(hello.into_bytes())).await?;
    let mut parser = Parser::default();
    loop {
        let data = match ws.next().await {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Text(t))) => Bytes::from(t.as_str().to_owned()),
            Some(Ok(Message::Close(close))) => bail!("closed while subscribing: {close:?}"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error.into()),
            None => bail!("closed while subscribing"),
        };
        let mut pong = false;
        parser.feed(&data, |event| match event {
            Event::Pong => pong = true,
            Event::Err(e) => eprintln!("nats-ws error: {e}"),
            _ => {}
        })?;
        if pong {
            return Ok(ws);
        }
    }
}

/// A held baseline socket's protocol state.
#[derive(Default)]
pub(crate) struct Session {
    parser: Parser,
    /// Send times of the `PING`s not answered yet (the server answers them in order).
    pings: VecDeque<u64>,
}

impl Session {
    /// The is-online scenario's control frame: a `PING`, timed to its `PONG`.
    pub(crate) fn ping(&mut self) -> Message {
        self.pings.push_back(now_us());
        Message::binary(&b"PING\r\n"[..])
    }

    /// WebSocket payload from the server to socket `socket`: deliveries are timed, `PONG`s matched with
    /// `PING`s. Returns the reply the server's own `PING`s need, if any.
    pub(crate) fn on_data(
        &mut self,
        data: &[u8],
        socket: u64,
        stats: &Stats,
    ) -> Result<Option<Message>> {
        let mut server_pings = 0;
        let pings = &mut self.pings;
        self.parser.feed(data, |event| match event {
            Event::Msg(body) => stats.on_delivery(socket, body),
            Event::Ping => server_pings += 1,
            Event::Pong => {
                if let Some(sent) = pings.pop_front() {
                    stats.on_reply(sent);
                }
            }
            Event::Err(_) => {}
        })?;
        Ok((server_pings > 0)
            .then(|| Message::binary("PONG\r\n".repeat(server_pings).into_bytes())))
    }
}

enum Event<'a> {
    Msg(&'a [u8]),
    Ping,
    Pong,
    Err(String),
}

/// The server side of the NATS text protocol, fed with WebSocket payloads (which need not align with
/// protocol messages).
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    fn feed(&mut self, data: &[u8], mut on: impl FnMut(Event<'_>)) -> Result<()> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some(eol) = self.buf[at..].windows(2).position(|w| w == b"\r\n") {
            let line = &self.buf[at..at + eol];
            if line.starts_with(b"MSG ") {
                let size: usize = std::str::from_utf8(line)?
                    .split_whitespace()
                    .last()
                    .context("MSG without size")?
                    .parse()?;
                let body = at + eol + 2;
                if self.buf.len() < body + size + 2 {
                    break;
                }
                on(Event::Msg(&self.buf[body..body + size]));
                at = body + size + 2;
                continue;
            }
            if line == b"PING" {
                on(Event::Ping);
            } else if line == b"PONG" {
                on(Event::Pong);
            } else if line.starts_with(b"-ERR") {
                on(Event::Err(String::from_utf8_lossy(line).into_owned()));
            }
            at += eol + 2;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Event, Parser};

    /// What the parser saw, as text.
    fn events(parser: &mut Parser, data: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        parser
            .feed(data, |event| {
                seen.push(match event {
                    Event::Msg(body) => format!("MSG {}", String::from_utf8_lossy(body)),
                    Event::Ping => "PING".to_owned(),
                    Event::Pong => "PONG".to_owned(),
                    Event::Err(e) => e,
                });
            })
            .unwrap();
        seen
    }

    #[test]
    fn messages_split_across_payloads_come_out_whole() {
        let mut parser = Parser::default();
        assert_eq!(
            events(&mut parser, b"PONG\r\nMSG load.user.1 3 5\r\nhel"),
            ["PONG"]
        );
        assert!(events(&mut parser, b"lo").is_empty());
        assert_eq!(
            events(&mut parser, b"\r\nPING\r\n-ERR 'x'\r\n"),
            ["MSG hello", "PING", "-ERR 'x'"]
        );
    }
}
