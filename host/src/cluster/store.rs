//! Where the shared state lives in Redis, and the connections to it: one multiplexed
//! connection for commands, opened again after a failure, and one for the feedback
//! channels. Every key starts with the namespace.

use std::time::Duration;

use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cluster.redis_url '{url}' is not a Redis URL (redis://[user:password@]host:port[/db]): {problem}"
    )]
    Url {
        url: String,
        problem: redis::RedisError,
    },
    #[error("the cluster's Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the cluster's Redis did not answer in time")]
    TimedOut,
    #[error("Redis went away, or a replica is still joining")]
    Interrupted,
    #[error("cannot encode what is shared: {0}")]
    Encode(#[from] serde_json::Error),
}

pub(super) struct Store {
    client: Client,
    namespace: String,
    /// Bounds every connect and every reply: a partitioned Redis answers nothing at all.
    timeout: Duration,
    connection: Mutex<Option<MultiplexedConnection>>,
}

impl Store {
    pub(super) fn open(
        url: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Store, ClusterError> {
        let client = Client::open(url).map_err(|problem| ClusterError::Url {
            url: redacted(url),
            problem,
        })?;
        Ok(Store {
            client,
            namespace: namespace.to_string(),
            timeout,
            connection: Mutex::new(None),
        })
    }

    /// The command connection, opened afresh after a failure.
    pub(super) async fn connection(&self) -> Result<MultiplexedConnection, ClusterError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref() {
            return Ok(connection.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Drops the command connection after a failure: a restarted Redis needs a new one.
    pub(super) async fn failed(&self) {
        *self.connection.lock().await = None;
    }

    /// A connection subscribed to `channels`.
    pub(super) async fn subscribe(&self, channels: &[String]) -> Result<PubSub, ClusterError> {
        let subscribing = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            for channel in channels {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.timeout, subscribing).await {
            Ok(subscribed) => Ok(subscribed?),
            Err(_) => Err(ClusterError::TimedOut),
        }
    }

    /// The sorted set of replicas, scored by when each last reported.
    pub(super) fn replicas(&self) -> String {
        format!("{}:replicas", self.namespace)
    }

    /// What a replica counted, by endpoint and variant.
    pub(super) fn report(&self, replica: &str) -> String {
        format!("{}:report:{replica}", self.namespace)
    }

    /// The shared state of `endpoint`'s router with these settings (`identity`): replicas
    /// configured alike share it, and one configured otherwise during a rollout keeps
    /// apart.
    pub(super) fn router(&self, endpoint: &str, identity: &str) -> String {
        let settings = xxhash_rust::xxh3::xxh3_64(identity.as_bytes());
        format!("{}:router:{endpoint}:{settings:016x}", self.namespace)
    }

    /// Where a replica says it changed a router state.
    pub(super) fn states_channel(&self) -> String {
        format!("{}:states", self.namespace)
    }

    /// Where replicas ask for the replica that gave an answer to take its feedback.
    pub(super) fn feedback_channel(&self) -> String {
        format!("{}:feedback", self.namespace)
    }

    /// Where `replica` hears back about the feedback it passed on.
    pub(super) fn reply_channel(&self, replica: &str) -> String {
        format!("{}:feedback:{replica}", self.namespace)
    }
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("redis://user:secret@redis:6379/0"),
            "redis://…@redis:6379/0"
        );
        assert_eq!(redacted("redis://redis:6379"), "redis://redis:6379");
        let refused = Store::open("http://nope", "m", Duration::from_secs(1));
        assert!(matches!(refused, Err(ClusterError::Url { .. })));
    }
}
