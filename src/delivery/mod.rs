//! Delivery guarantees (CONTRACT §8): nothing lost for a connected socket, positions, recovery after `since`.
//!
//! The pieces, from NATS towards the socket:
//!
//! ```text
//! publisher ─► <prefix>.user.<t> ─► event stream ─(republish)─► <prefix>.delivery.user.<t> ─► ingress
//!                                       │                                                     │
//!                                       └──── reader (gap fill, replay) ◄── tracker: gap? ────┤
//!                                                                                             ▼
//!                                                                  window (hot topics) ─► hub ─► sockets
//! ```
//!
//! - [`stream`]: the event stream's settings, its epoch, the subjects, the republish headers ([`stream::Stored`]).
//! - [`position`]: the opaque `<epoch>.<seq>` strings clients see and send back.
//! - [`tracker`]: per topic, whether a live event is next, a duplicate, or after a gap.
//! - [`reader`]: reading a range of stored events back, retried until it is proven complete.
//! - [`window`]: recent events of hot topics in memory, for reconnect storms.
//! - [`recovery`]: whether a join with `since` can be replayed, and why not.
//! - [`live`]: the stream at run time: the ingress that follows it, the state joins read, recoveries.
//! - [`publish`]: one event stored with an acknowledgement (the `publish` command).
//!
//! [`stream`], [`reader`], [`live`] and [`publish`] talk to NATS; the others are pure.

pub mod live;
pub mod position;
pub mod publish;
pub mod reader;
pub mod recovery;
pub mod stream;
pub mod tracker;
pub mod window;
