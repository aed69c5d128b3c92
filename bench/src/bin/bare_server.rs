//! `bare_server`: the lower bound of `epoch-load`, the least a server must do to deliver what the gateway
//! delivers, with the same libraries, measured in the same run (`epoch-load --targets all`).
//!
//! NATS → one subscription on the gateway's core path, `<prefix>.user.*` → each message checked and encoded
//! once by the gateway's own ingress ([`ingress::decode`]) into the Phoenix frame
//! `[null,null,topic,event,payload]`, one allocation shared by every socket it reaches (a queue slot is one
//! pointer) → the socket's bounded queue (the gateway's default length; a full queue closes the socket as a
//! slow consumer, 4001, as the gateway does) → the socket's one task, which writes queued frames in batches
//! with one flush → the socket (axum, the gateway's WebSocket stack, with its 512-byte read and 8 KiB write
//! buffers, so that memory figures compare, on a listener bound like the gateway's).
//!
//! Nothing else: no authentication, no channels, no presence, no event stream, no metrics.
//! `GET /socket/websocket?user=<id>` subscribes the socket to `user:public`, `user:role` and `user:<id>` at
//! once; `phx_join` and heartbeats are answered ok so that the load tool's Phoenix client drives it
//! unchanged, and every other client frame is ignored.
//!
//! `bare_server --nats <url> --prefix <prefix> [--listen <addr>]` prints `listening on <addr>` once it
//! listens, and runs until killed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use clap::Parser;
use epoch_gateway::app::listen;
use epoch_gateway::broker::ingress;
use epoch_gateway::protocol::{self, CloseCode, EVENT_HEARTBEAT, EVENT_JOIN, Frame, PHOENIX_TOPIC};
use epoch_gateway::topic::Topic;
// The gateway's read and write buffers per socket, so that memory figures compare.
use epoch_gateway::ws::{READ_BUFFER_BYTES, WRITE_BUFFER_BYTES};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

/// The gateway's default `ws.max_message_bytes` and `nats.max_message_bytes`.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The gateway's default `ws.outbound_queue`: frames queued per socket before it is a slow consumer.
const QUEUE_FRAMES: usize = 1024;
/// The gateway's `MAX_BATCH`: most queued frames written before one flush.
const MAX_BATCH: usize = 64;
/// The gateway's `WRITE_TIMEOUT`: a write that cannot finish within it means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "bare_server",
    about = "The lower bound of epoch-load: NATS to Phoenix-framed WebSockets, nothing else"
)]
struct Args {
    /// The NATS server to subscribe on.
    #[arg(long)]
    nats: String,
    /// The subject prefix (the gateway's `nats.subject_prefix`).
    #[arg(long)]
    prefix: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// A socket's queue slot: the frame of one message, shared by every socket it reaches.
type Queued = Arc<Frame>;

/// A socket as the hub sees it: its queue. The hub holds the only sender, so dropping it tells the socket
/// that it was dropped as a slow consumer.
struct Conn {
    id: u64,
    queue: mpsc::Sender<Queued>,
}

/// Which sockets each user has; every socket gets `user:public` and `user:role`.
#[derive(Default)]
struct Hub {
    users: RwLock<HashMap<u64, Vec<Conn>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn add(&self, user: u64) -> (u64, mpsc::Receiver<Queued>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, rx) = mpsc::channel(QUEUE_FRAMES);
        self.users
            .write()
            .expect("no panics under this lock")
            .entry(user)
            .or_default()
            .push(Conn { id, queue });
        (id, rx)
    }

    fn remove(&self, user: u64, id: u64) {
        let mut users = self.users.write().expect("no panics under this lock");
        if let Some(conns) = users.get_mut(&user) {
            conns.retain(|c| c.id != id);
            if conns.is_empty() {
                users.remove(&user);
            }
        }
    }

    /// Offers `frame` to every socket of `topic`; a socket whose queue is full (or gone) is dropped.
    fn publish(&self, topic: Topic, frame: Frame) {
        let frame = Arc::new(frame);
        let mut slow = Vec::new();
        {
            let users = self.users.read().expect("no panics under this lock");
            let mut offer = |user: u64, conns: &Vec<Conn>| {
                for conn in conns {
                    if conn.queue.try_send(Arc::clone(&frame)).is_err() {
                        slow.push((user, conn.id));
                    }
                }
            };
            match topic {
                Topic::Public | Topic::Role => {
                    for (&user, conns) in users.iter() {
                        offer(user, conns);
                    }
                }
                Topic::User(user) => {
                    if let Some(conns) = users.get(&user.get()) {
                        offer(user.get(), conns);
                    }
                }
            }
        }
        for (user, id) in slow {
            self.remove(user, id);
        }
    }
}

/// `?user=<id>` (the load tool also sends `vsn`, which is ignored).
#[derive(Deserialize)]
struct Connect {
    user: u64,
}

async fn upgrade(
    State(hub): State<Arc<Hub>>,
    Query(connect): Query<Connect>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| session(socket, hub, connect.user))
}

/// One socket from upgrade to close: its queue's frames out in batches, its client frames answered.
async fn session(mut socket: WebSocket, hub: Arc<Hub>, user: u64) {
    let (id, mut queue) = hub.add(user);
    let slow = loop {
        tokio::select! {
            queued = queue.recv() => {
                // The hub dropped the sender: the queue overflowed.
                let Some(first) = queued.filter(|_| !queue.is_closed()) else {
                    break true;
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write_batch(&mut socket, first, &mut queue)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => break false,
                }
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = reply(&text)
                        && socket.send(Message::Text(reply)).await.is_err()
                    {
                        break false;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break false,
                Some(Ok(_)) => {}
            }
        }
    };
    hub.remove(user, id);
    if slow {
        let code = CloseCode::SlowConsumer;
        let frame = CloseFrame {
            code: code.code(),
            reason: code.reason().into(),
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
    }
}

/// Writes `first` and up to [`MAX_BATCH`] frames in all from the queue, with one flush.
async fn write_batch(
    socket: &mut WebSocket,
    first: Queued,
    queue: &mut mpsc::Receiver<Queued>,
) -> Result<(), axum::Error> {
    socket.feed(Message::Text(Frame::clone(&first))).await?;
    for _ in 1..MAX_BATCH {
        let Ok(queued) = queue.try_recv() else {
            break;
        };
        socket.feed(Message::Text(Frame::clone(&queued))).await?;
    }
    socket.flush().await
}

/// The ok reply a `phx_join` or a heartbeat gets; nothing for any other frame.
fn reply(text: &str) -> Option<Frame> {
    let frame = protocol::decode(text).ok()?;
    let heartbeat = frame.topic == PHOENIX_TOPIC && frame.event == EVENT_HEARTBEAT;
    (heartbeat || frame.event == EVENT_JOIN).then(|| {
        protocol::reply(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            protocol::Status::Ok,
            &serde_json::Map::new(),
        )
    })
}

/// The core NATS path: every message on `<prefix>.user.*` checked and encoded once, then fanned out.
async fn ingress(client: async_nats::Client, prefix: String, hub: Arc<Hub>) -> Result<()> {
    let mut messages = client.subscribe(format!("{prefix}.user.*")).await?;
    while let Some(message) = messages.next().await {
        let Some(topic) = ingress::subject_topic(&prefix, &message.subject) else {
            continue;
        };
        // A message the gateway would drop is dropped here too.
        if let Ok(broadcast) = ingress::decode(topic, &message.payload, MAX_MESSAGE_BYTES) {
            hub.publish(topic, broadcast.frame);
        }
    }
    anyhow::bail!("the NATS subscription ended")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let hub = Arc::new(Hub::default());
    let listener = listen(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    // Frames are batched and flushed; Nagle's algorithm would hold a small frame back (as in the gateway).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new()
        .route("/socket/websocket", get(upgrade))
        .with_state(Arc::clone(&hub));
    tokio::select! {
        result = ingress(client, args.prefix, hub) => result,
        result = axum::serve(listener, app).into_future() => result.context("serving sockets"),
    }
}
