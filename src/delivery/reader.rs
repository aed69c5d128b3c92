//! Reading stored events back from the event stream: a gap fill (the events before a live one that never
//! arrived), a replay after a client's `since`, or a catch-up of every topic after a NATS reconnect.
//!
//! A read asks for the events of a subject (or of `<prefix>.user.>`) with sequences after `after`, in order,
//! up to a target ([`Until`]), and gets all of them or an error, never a silently shortened list. It uses
//! an ordered pull consumer starting at `after + 1`, whose creation also reports how many events are
//! pending (the cap check of [`Until::Head`] reads).
//!
//! Right after a node fails, JetStream requests time out or fail while a leader is elected, and a replica
//! that is behind may answer; a read that ended at the first failed or empty answer skipped events. So a
//! read retries failed steps with backoff within one overall deadline, and ends only when its target is
//! proven reached:
//! - an event at or after the target was delivered (deliveries are in stream order), or
//! - the stream's first sequence is past the target (everything up to it aged out), or
//! - for [`Until::Seq`], the stream leader has stored the target and holds no event of the filter after the
//!   cursor (the target was not an event of the filter).
//!
//! [`Until::Head`] fixes its target once: the leader's last event of the filter when the read starts.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{self, DeliverPolicy, pull};
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use async_nats::jetstream::{self, ErrorCode, context};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::position::Epoch;
use super::stream::{epoch_of, is_stream_not_found, system_time};

/// Overall time a read may take by default, retries included; long enough to ride out a leader election.
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_secs(10);
/// Most events a read returns by default.
pub const DEFAULT_MAX_READ: usize = 1000;
/// Longest wait for the next event of a read whose target is not reached; then the consumer is recreated
/// from the cursor (its server may have died, or be a replica that is behind).
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause before retrying a failed step; doubled after each failure without progress.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long removing a finished read's consumer may delay the read's result; a consumer not removed expires
/// on its own after 30 s of inactivity.
const CONSUMER_DELETE_TIMEOUT: Duration = Duration::from_millis(500);

/// Where a read ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// At this sequence, included: typically an event of the filter, such as the `Nats-Last-Sequence` of a
    /// live event, but any sequence works.
    Seq(u64),
    /// At the leader's last event of the filter when the read starts.
    Head,
}

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The event stream's name.
    pub stream: String,
    /// A subject of the stream, or a wildcard over them (`<prefix>.user.>`).
    pub filter: String,
    /// Events with greater sequences are read.
    pub after: u64,
    pub until: Until,
    /// Most events returned; [`ReadError::Exceeded`] when there are more.
    pub max: usize,
    /// Overall time the read may take.
    pub deadline: Duration,
    /// When set, the read fails with [`ReadError::Recreated`] if the stream is another incarnation.
    pub epoch: Option<Epoch>,
}

impl ReadRequest {
    /// A read of `filter` after `after` until `until`, with the default cap and deadline.
    pub fn new(stream: &str, filter: &str, after: u64, until: Until) -> Self {
        Self {
            stream: stream.to_owned(),
            filter: filter.to_owned(),
            after,
            until,
            max: DEFAULT_MAX_READ,
            deadline: DEFAULT_READ_DEADLINE,
            epoch: None,
        }
    }

    pub fn max(self, max: usize) -> Self {
        Self { max, ..self }
    }

    pub fn deadline(self, deadline: Duration) -> Self {
        Self { deadline, ..self }
    }

    pub fn epoch(self, epoch: Epoch) -> Self {
        Self {
            epoch: Some(epoch),
            ..self
        }
    }
}

/// One event read back from the stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub seq: u64,
    /// The subject it was published on.
    pub subject: String,
    /// When the stream stored it.
    pub time: SystemTime,
    /// The publisher's headers (`traceparent`, `Nats-Msg-Id`).
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// Why a read returned no events.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("more than {max} stored events to read (at least {at_least})")]
    Exceeded { max: usize, at_least: u64 },
    #[error("stream {stream} does not exist")]
    StreamGone { stream: String },
    #[error("stream {stream} was recreated: epoch {found}, not {expected}")]
    Recreated {
        stream: String,
        expected: Epoch,
        found: Epoch,
    },
    #[error("read of {filter} reached {reached}, not its target {target:?}, within {deadline:?}")]
    Timeout {
        filter: String,
        reached: u64,
        target: Until,
        deadline: Duration,
        /// The last failed step, when one failed (none when the time ran out while waiting).
        #[source]
        last_failure: Option<AttemptError>,
    },
    #[error("invalid read: {reason}")]
    Invalid { reason: &'static str },
}

/// A step of a read that failed and was retried.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("stream info request failed")]
    Info(#[source] context::GetStreamError),
    #[error("looking up the last event of the filter failed")]
    Head(#[source] stream::LastRawMessageError),
    #[error("creating the read's consumer failed")]
    Consumer(#[source] stream::ConsumerError),
    #[error("starting the read's consumer failed")]
    Start(#[source] consumer::StreamError),
    #[error("the read's consumer failed")]
    Delivery(#[source] pull::OrderedError),
    #[error("a delivered event has no stream metadata")]
    Metadata(#[source] async_nats::Error),
    #[error("no event within {0:?}")]
    Idle(Duration),
    #[error("the read's consumer ended")]
    Ended,
    #[error("the consumer's server reports nothing pending before the target")]
    Behind,
}

/// How an attempt ended, short of success.
enum Stop {
    /// Give up the read.
    Fatal(ReadError),
    /// Try again from the cursor.
    Retry(AttemptError),
}

impl From<AttemptError> for Stop {
    fn from(err: AttemptError) -> Self {
        Self::Retry(err)
    }
}

/// What survives from one attempt to the next.
struct Progress {
    /// Every event of the filter up to here is in `events`.
    cursor: u64,
    /// The resolved target of an [`Until::Head`] read.
    head: Option<u64>,
    events: Vec<StoredMessage>,
}

/// Reads the stored events of `request.filter` after `request.after`, in order, up to `request.until`.
pub async fn read(
    js: &jetstream::Context,
    request: &ReadRequest,
) -> Result<Vec<StoredMessage>, ReadError> {
    if request.filter.is_empty() || request.stream.is_empty() {
        return Err(ReadError::Invalid {
            reason: "stream and filter must not be empty",
        });
    }
    if let Until::Seq(target) = request.until
        && target <= request.after
    {
        return Ok(Vec::new());
    }
    let deadline = Instant::now() + request.deadline;
    let mut progress = Progress {
        cursor: request.after,
        head: None,
        events: Vec::new(),
    };
    let mut backoff = FIRST_BACKOFF;
    let mut last_failure = None;
    loop {
        let before = progress.cursor;
        match tokio::time::timeout_at(deadline, attempt(js, request, &mut progress)).await {
            Ok(Ok(())) => return Ok(progress.events),
            Ok(Err(Stop::Fatal(err))) => return Err(err),
            Ok(Err(Stop::Retry(err))) => {
                let source = std::error::Error::source(&err);
                tracing::debug!(
                    stream = %request.stream,
                    filter = %request.filter,
                    cursor = progress.cursor,
                    error = %err,
                    source = ?source,
                    "stream read retries"
                );
                last_failure = Some(err);
            }
            Err(_elapsed) => break,
        }
        if progress.cursor > before {
            backoff = FIRST_BACKOFF;
        }
        if Instant::now() + backoff >= deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Err(ReadError::Timeout {
        filter: request.filter.clone(),
        reached: progress.cursor,
        target: request.until,
        deadline: request.deadline,
        last_failure,
    })
}

async fn attempt(
    js: &jetstream::Context,
    request: &ReadRequest,
    progress: &mut Progress,
) -> Result<(), Stop> {
    let stream = js.get_stream(&request.stream).await.map_err(|err| {
        if is_stream_not_found(&err) {
            Stop::Fatal(ReadError::StreamGone {
                stream: request.stream.clone(),
            })
        } else {
            Stop::Retry(AttemptError::Info(err))
        }
    })?;
    let info = stream.cached_info();
    if let Some(expected) = &request.epoch {
        let found = epoch_of(info);
        if found != *expected {
            return Err(Stop::Fatal(ReadError::Recreated {
                stream: request.stream.clone(),
                expected: expected.clone(),
                found,
            }));
        }
    }
    let target = match (request.until, progress.head) {
        (Until::Seq(target), _) | (Until::Head, Some(target)) => target,
        (Until::Head, None) => {
            let head = last_of_filter(&stream, &request.filter).await?;
            progress.head = Some(head);
            head
        }
    };
    if progress.cursor >= target || info.state.first_sequence > target {
        return Ok(());
    }

    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: request.filter.clone(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: progress.cursor.saturating_add(1),
            },
            ..pull::OrderedConfig::default()
        })
        .await
        .map_err(AttemptError::Consumer)?;
    let name = consumer.cached_info().name.clone();
    let pending = consumer.cached_info().num_pending;
    let result = drain(consumer, request, progress, target, pending).await;
    let result = match result {
        // The consumer's server has nothing more; only the leader can tell whether that is the end.
        Err(Stop::Retry(AttemptError::Behind)) if matches!(request.until, Until::Seq(_)) => {
            match last_of_filter(&stream, &request.filter).await {
                Ok(last) if info.state.last_sequence >= target && last <= progress.cursor => Ok(()),
                Ok(_) => Err(Stop::Retry(AttemptError::Behind)),
                Err(err) => Err(Stop::Retry(err)),
            }
        }
        other => other,
    };
    // Best effort: an ordered consumer left behind expires after 30 s without pulls.
    let _ = tokio::time::timeout(CONSUMER_DELETE_TIMEOUT, stream.delete_consumer(&name)).await;
    result
}

/// Delivers the consumer's events into `progress` until `target` is reached.
async fn drain(
    consumer: consumer::Consumer<pull::OrderedConfig>,
    request: &ReadRequest,
    progress: &mut Progress,
    target: u64,
    pending: u64,
) -> Result<(), Stop> {
    let held = progress.events.len() as u64;
    if request.until == Until::Head && held + pending > request.max as u64 {
        // Counts events stored since the head was fixed too: a read on the edge of its cap is refused.
        return Err(Stop::Fatal(ReadError::Exceeded {
            max: request.max,
            at_least: held + pending,
        }));
    }
    if pending == 0 {
        return Err(Stop::Retry(AttemptError::Behind));
    }
    let mut messages = consumer.messages().await.map_err(AttemptError::Start)?;
    loop {
        let message = match tokio::time::timeout(IDLE_TIMEOUT, messages.next()).await {
            Err(_) => return Err(AttemptError::Idle(IDLE_TIMEOUT).into()),
            Ok(None) => return Err(AttemptError::Ended.into()),
            Ok(Some(Err(err))) => return Err(AttemptError::Delivery(err).into()),
            Ok(Some(Ok(message))) => message,
        };
        let (seq, remaining, published) = {
            let info = message.info().map_err(AttemptError::Metadata)?;
            (info.stream_sequence, info.pending, info.published)
        };
        if seq <= progress.cursor {
            continue;
        }
        if matches!(request.until, Until::Seq(limit) if seq > limit) {
            return Ok(());
        }
        if progress.events.len() >= request.max {
            return Err(Stop::Fatal(ReadError::Exceeded {
                max: request.max,
                at_least: progress.events.len() as u64 + 1 + remaining,
            }));
        }
        let message = message.message;
        progress.events.push(StoredMessage {
            seq,
            subject: message.subject.to_string(),
            time: system_time(published.unix_timestamp_nanos()),
            headers: message.headers,
            payload: message.payload,
        });
        progress.cursor = seq;
        if seq >= target {
            return Ok(());
        }
        if remaining == 0 {
            // Caught up on the consumer's server, short of the target.
            return Err(AttemptError::Behind.into());
        }
    }
}

/// The sequence of the leader's last event of `filter`; 0 when it has none.
async fn last_of_filter(stream: &stream::Stream, filter: &str) -> Result<u64, AttemptError> {
    match stream.get_last_raw_message_by_subject(filter).await {
        Ok(message) => Ok(message.sequence),
        Err(err) if matches!(err.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(0),
        Err(err) => Err(AttemptError::Head(err)),
    }
}

/// How many stored events of `filter` have sequences after `after`: the `num_pending` of a consumer created
/// to start there (and removed at once). Failed steps are retried until `deadline`.
///
/// The count comes from the server hosting that consumer, which after a failure may be a replica that is
/// behind; a recovery decision takes it after the replay was read (see [`super::recovery`]).
pub async fn count_after(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    after: u64,
    deadline: Duration,
) -> Result<u64, ReadError> {
    let until = Instant::now() + deadline;
    let mut backoff = FIRST_BACKOFF;
    let mut last_failure = None;
    loop {
        let attempt = async {
            let handle = js.get_stream_no_info(stream).await.map_err(|_| {
                Stop::Fatal(ReadError::Invalid {
                    reason: "invalid stream name",
                })
            })?;
            let consumer = handle
                .create_consumer(pull::OrderedConfig {
                    filter_subject: filter.to_owned(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: after.saturating_add(1),
                    },
                    ..pull::OrderedConfig::default()
                })
                .await
                .map_err(|err| {
                    if matches!(err.kind(), stream::ConsumerErrorKind::JetStream(e)
                        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
                    {
                        Stop::Fatal(ReadError::StreamGone {
                            stream: stream.to_owned(),
                        })
                    } else {
                        Stop::Retry(AttemptError::Consumer(err))
                    }
                })?;
            let info = consumer.cached_info();
            let _ =
                tokio::time::timeout(CONSUMER_DELETE_TIMEOUT, handle.delete_consumer(&info.name))
                    .await;
            Ok::<u64, Stop>(info.num_pending)
        };
        match tokio::time::timeout_at(until, attempt).await {
            Ok(Ok(count)) => return Ok(count),
            Ok(Err(Stop::Fatal(err))) => return Err(err),
            Ok(Err(Stop::Retry(err))) => last_failure = Some(err),
            Err(_elapsed) => break,
        }
        if Instant::now() + backoff >= until {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Err(ReadError::Timeout {
        filter: filter.to_owned(),
        reached: after,
        target: Until::Head,
        deadline,
        last_failure,
    })
}

/// The stream's extent and incarnation, as its leader reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// The first sequence still stored (`last_seq + 1` when everything aged out, 0 when it never held one).
    pub first_seq: u64,
    /// The last sequence assigned.
    pub last_seq: u64,
    pub epoch: Epoch,
}

/// Why [`stream_state`] has no answer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("stream {stream} does not exist")]
    StreamGone { stream: String },
    #[error("cannot read the state of stream {stream}")]
    Request {
        stream: String,
        #[source]
        source: context::GetStreamError,
    },
}

/// The stream's first and last sequences and its epoch: the stream-wide facts of a recovery decision.
pub async fn stream_state(js: &jetstream::Context, name: &str) -> Result<StreamState, StateError> {
    let stream = js.get_stream(name).await.map_err(|source| {
        if is_stream_not_found(&source) {
            StateError::StreamGone {
                stream: name.to_owned(),
            }
        } else {
            StateError::Request {
                stream: name.to_owned(),
                source,
            }
        }
    })?;
    let info = stream.cached_info();
    Ok(StreamState {
        first_seq: info.state.first_sequence,
        last_seq: info.state.last_sequence,
        epoch: epoch_of(info),
    })
}
