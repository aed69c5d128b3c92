//! The one retry loop of the start-up tasks: try, and on failure wait with a doubling delay, until the
//! attempt succeeds, an error is final, or the instance stops.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// First pause after a failed attempt.
pub const FIRST_DELAY: Duration = Duration::from_millis(200);
/// Longest pause between attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Wait, then try again.
    Retry,
    /// The error is final: return it.
    GiveUp,
}

/// Why [`with_backoff`] returned without a value.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped<E> {
    /// `stop` was cancelled first.
    Cancelled,
    /// An error the caller called final.
    Final(E),
}

/// Runs `attempt` until it succeeds. After each error, `on_error` sees it (to log it) and says whether to
/// go on; pauses double from [`FIRST_DELAY`] to [`MAX_DELAY`].
///
/// # Errors
/// [`Stopped::Cancelled`] when `stop` is cancelled, [`Stopped::Final`] with the error `on_error` gave up on.
pub async fn with_backoff<T, E, Fut>(
    stop: &CancellationToken,
    mut attempt: impl FnMut() -> Fut,
    mut on_error: impl FnMut(&E) -> OnError,
) -> Result<T, Stopped<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = FIRST_DELAY;
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return Err(Stopped::Cancelled),
            result = attempt() => result,
        };
        match result {
            Ok(value) => return Ok(value),
            Err(error) if on_error(&error) == OnError::GiveUp => return Err(Stopped::Final(error)),
            Err(_) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return Err(Stopped::Cancelled),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_and_stops_on_a_final_error() {
        let stop = CancellationToken::new();
        let mut calls = 0;
        let value = with_backoff(
            &stop,
            || {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err(n) } else { Ok(n) } }
            },
            |_| OnError::Retry,
        )
        .await;
        assert_eq!(value, Ok(3));

        let value: Result<(), _> =
            with_backoff(&stop, || async { Err("bad") }, |_| OnError::GiveUp).await;
        assert_eq!(value, Err(Stopped::Final("bad")));

        stop.cancel();
        let value: Result<(), Stopped<&str>> =
            with_backoff(&stop, || async { Err("down") }, |_| OnError::Retry).await;
        assert_eq!(value, Err(Stopped::Cancelled));
    }
}
