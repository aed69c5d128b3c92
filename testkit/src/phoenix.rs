//! A Phoenix Channels V2 client over a real WebSocket (tokio-tungstenite).
//!
//! Tests use the methods that panic with what went wrong (`join_ok`, `frame`, `push`); programs use the
//! ones that return errors (`connect_with`, `connect_over`, `join_all`, `request`) and may take the socket
//! itself (`into_inner`) to drive it on their own.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// The client end of a socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server did next on a socket.
#[derive(Debug, PartialEq)]
pub enum Next {
    Frame(Value),
    Closed(Option<u16>),
}

/// A Phoenix V2 client over a real WebSocket.
pub struct PhxClient {
    ws: Ws,
    next_ref: u64,
}

impl PhxClient {
    pub async fn connect(url: &str) -> Result<Self, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self::over(ws))
    }

    /// Connects with `config` (a program holding thousands of sockets wants small buffers), Nagle off.
    pub async fn connect_with(
        url: &str,
        config: WebSocketConfig,
    ) -> Result<Self, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        Ok(Self::over(ws))
    }

    /// The WebSocket handshake over `stream`, a TCP connection the caller opened (from a source address
    /// of its choosing, say).
    pub async fn connect_over(
        url: &str,
        stream: TcpStream,
        config: WebSocketConfig,
    ) -> Result<Self, tungstenite::Error> {
        let stream = MaybeTlsStream::Plain(stream);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        Ok(Self::over(ws))
    }

    fn over(ws: Ws) -> Self {
        Self { ws, next_ref: 1 }
    }

    /// The socket, for a program that reads and writes it on its own from here on.
    pub fn into_inner(self) -> Ws {
        self.ws
    }

    pub fn make_ref(&mut self) -> String {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        r
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends without panicking; false once the server has closed the socket.
    pub async fn try_send(&mut self, frame: Value) -> bool {
        self.ws.send(Message::text(frame.to_string())).await.is_ok()
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next frame or close, skipping pings; panics after [`WAIT`].
    pub async fn next(&mut self) -> Next {
        self.next_within(WAIT)
            .await
            .expect("the server sent nothing in time")
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(Next::Frame(serde_json::from_str(&text).unwrap()));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Next::Closed(frame.map(|f: CloseFrame| f.code.into())));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                None | Some(Err(_)) => return Some(Next::Closed(None)),
            }
        }
    }

    pub async fn frame(&mut self) -> Value {
        match self.next().await {
            Next::Frame(frame) => frame,
            Next::Closed(code) => panic!("socket closed ({code:?}) while a frame was expected"),
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn silent_for(&mut self, wait: Duration) {
        if let Some(next) = self.next_within(wait).await {
            panic!("expected silence, got {next:?}");
        }
    }

    /// Joins `topic` and returns the reply frame.
    pub async fn join(&mut self, topic: &str) -> Value {
        let r = self.make_ref();
        self.send(json!([r, r, topic, "phx_join", {}])).await;
        self.frame().await
    }

    pub async fn join_ok(&mut self, topic: &str) -> String {
        let reply = self.join(topic).await;
        assert_eq!(
            reply[4],
            json!({"status": "ok", "response": {}}),
            "join {topic}: {reply}"
        );
        reply[0].as_str().unwrap().to_owned()
    }

    /// Pushes `event` on a joined topic and returns the reply frame.
    pub async fn push(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Value {
        let r = self.make_ref();
        self.send(json!([join_ref, r, topic, event, payload])).await;
        let reply = self.frame().await;
        assert_eq!(reply[1], json!(r), "reply to the push: {reply}");
        reply
    }

    /// Joins every topic at once, as phoenix.js does on connect (the joins written together, then the
    /// replies awaited), and fails unless every reply is ok.
    pub async fn join_all(&mut self, topics: &[&str]) -> anyhow::Result<()> {
        for topic in topics {
            let r = self.make_ref();
            let frame = json!([r, r, topic, "phx_join", {}]).to_string();
            self.ws.feed(Message::text(frame)).await?;
        }
        self.ws.flush().await?;
        let mut ok = 0;
        while ok < topics.len() {
            let reply = self.reply().await?;
            if reply[3] == "phx_reply" {
                ensure!(reply[4]["status"] == "ok", "join refused: {reply}");
                ok += 1;
            }
        }
        Ok(())
    }

    /// Sends `frame` and returns the `phx_reply` with the same ref, skipping anything else; fails when the
    /// socket closes or no reply comes `within`.
    pub async fn request(&mut self, frame: &Value, within: Duration) -> anyhow::Result<Value> {
        self.ws.send(Message::text(frame.to_string())).await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let reply = tokio::time::timeout_at(deadline, self.reply())
                .await
                .context("no reply in time")??;
            if reply[1] == frame[1] && reply[3] == "phx_reply" {
                return Ok(reply);
            }
        }
    }

    /// The next text frame, decoded.
    async fn reply(&mut self) -> anyhow::Result<Value> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(close))) => bail!("socket closed: {close:?}"),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => bail!("socket closed"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The frame a NATS message for `topic` arrives as.
pub fn broadcast(topic: &str, event: &str, payload: Value) -> Value {
    json!([null, null, topic, event, payload])
}
