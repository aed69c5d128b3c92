//! JetStream KV plumbing shared by presence and revocation: opening a bucket, records with a per-message
//! TTL (`Nats-TTL`, nats-server ≥ 2.11), purges that expire themselves, and the subjects and key tokens of
//! `$KV.<bucket>.<key>` (the token check itself lives in [`crate::topic`], which configuration uses too).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};

pub use crate::topic::is_key_token;

/// How long purge and expiry markers stay in a bucket: long enough for any watcher to see them, short
/// enough that markers of instances that are gone do not pile up.
pub const MARKER_TTL: Duration = Duration::from_secs(5);

/// Why a bucket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bucket '{0}' does not exist")]
    Missing(String),
    #[error("JetStream did not answer for bucket '{bucket}'")]
    JetStream {
        bucket: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("bucket '{bucket}' cannot be opened")]
    Open {
        bucket: String,
        #[source]
        source: jetstream::context::KeyValueError,
    },
    #[error("bucket '{bucket}' cannot be created")]
    Create {
        bucket: String,
        #[source]
        source: jetstream::context::CreateKeyValueError,
    },
}

/// The stream behind `bucket`, or [`OpenError::Missing`].
///
/// # Errors
/// [`OpenError::Missing`] when there is no such bucket, [`OpenError::JetStream`] when JetStream fails.
pub async fn bucket_stream(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<jetstream::stream::Stream, OpenError> {
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(stream) => Ok(stream),
        Err(error)
            if matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Err(OpenError::Missing(bucket.to_owned()))
        }
        Err(source) => Err(OpenError::JetStream {
            bucket: bucket.to_owned(),
            source,
        }),
    }
}

/// Opens `config.bucket`, creating it with `config` when it is missing. An existing bucket is opened as it
/// is; `check` sees its stream settings first and may refuse them.
///
/// # Errors
/// Any [`OpenError`] but `Missing`, or what `check` returns.
pub async fn open_or_create<E: From<OpenError>>(
    js: &jetstream::Context,
    config: kv::Config,
    check: impl FnOnce(&jetstream::stream::Config) -> Result<(), E>,
) -> Result<kv::Store, E> {
    let bucket = config.bucket.clone();
    match bucket_stream(js, &bucket).await {
        Ok(stream) => {
            check(&stream.cached_info().config)?;
            js.get_key_value(&bucket)
                .await
                .map_err(|source| OpenError::Open { bucket, source }.into())
        }
        Err(OpenError::Missing(_)) => {
            tracing::info!(bucket = %bucket, replicas = config.num_replicas, "creating KV bucket");
            js.create_key_value(config)
                .await
                .map_err(|source| OpenError::Create { bucket, source }.into())
        }
        Err(error) => Err(error.into()),
    }
}

/// The subject a record of `key` in `bucket` is published on.
pub fn key_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Headers of a record that expires `ttl` after its last write. The server counts whole seconds.
pub fn ttl_headers(ttl: Duration) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
    headers
}

/// Headers of a purge that removes the record's history and expires itself after [`MARKER_TTL`].
pub fn purge_headers() -> HeaderMap {
    let mut headers = ttl_headers(MARKER_TTL);
    headers.insert("KV-Operation", "PURGE");
    headers.insert("Nats-Rollup", "sub");
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_tokens_and_subjects() {
        assert!(is_key_token("gw-01_a"));
        assert!(!is_key_token("gw.01"));
        assert!(!is_key_token("gw/01"));
        assert!(!is_key_token(""));
        assert_eq!(key_subject("b", "1.n"), "$KV.b.1.n");
    }

    #[test]
    fn ttl_and_purge_headers() {
        let headers = ttl_headers(Duration::from_secs(30));
        assert_eq!(headers.get("Nats-TTL").map(|v| v.as_str()), Some("30s"));
        let purge = purge_headers();
        assert_eq!(purge.get("Nats-TTL").map(|v| v.as_str()), Some("5s"));
        assert_eq!(purge.get("KV-Operation").map(|v| v.as_str()), Some("PURGE"));
    }
}
