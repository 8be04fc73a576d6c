//! What replicas tell each other at once, on Redis channels: that a router state changed
//! (the others exchange states then rather than at their next tick), and feedback for an
//! answer another replica gave. Answers stay in the memory of the replica that gave them
//! (bounded by `server.feedback_memory`, as on one server): a replica that does not know
//! an id asks the others, and the one that knows it takes the feedback, credits it and
//! says what it made of it. Nothing about answers crosses Redis on the request path, and
//! nothing is kept there to lose.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;

use super::state::Cluster;
use super::store::ClusterError;
use crate::endpoint::Feedback;

/// How long a replica waits for the one that gave an answer: a channel delivers in
/// milliseconds, so a longer wait means no replica knows the id.
const ANSWER_WAIT: Duration = Duration::from_millis(500);

/// Feedback passed on to the replica that gave the answer.
#[derive(serde::Serialize, serde::Deserialize)]
struct Passed {
    endpoint: String,
    id: String,
    reward: Option<f64>,
    labels: Option<Vec<String>>,
    /// The replica that passed it on, and its number for it.
    from: String,
    token: u64,
}

/// What the replica that gave the answer made of the feedback.
#[derive(serde::Serialize, serde::Deserialize)]
struct Taken {
    token: u64,
    by: String,
    outcome: Feedback,
}

impl Cluster {
    /// Passes feedback for an answer this replica does not know to the replica that gave
    /// it; what that one made of it, or `None` when no replica knows the id.
    pub async fn pass_feedback(
        &self,
        endpoint: &str,
        id: &str,
        reward: Option<f64>,
        labels: Option<&[String]>,
    ) -> Result<Option<Feedback>, ClusterError> {
        // Without a subscription no reply could be heard: a wait would end in a false 404.
        let subscription = self.subscriptions.load(Ordering::Acquire);
        if !self.listening.load(Ordering::Acquire) {
            self.count_feedback("failed");
            return Err(ClusterError::Interrupted);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (answered, answer) = tokio::sync::oneshot::channel();
        self.waiting.lock().await.insert(token, answered);
        let passed = Passed {
            endpoint: endpoint.to_string(),
            id: id.to_string(),
            reward,
            labels: labels.map(<[String]>::to_vec),
            from: self.replica.clone(),
            token,
        };
        let sent = async {
            let mut connection = self.store.connection().await?;
            let message = serde_json::to_string(&passed)?;
            let reached: usize = connection
                .publish(self.store.feedback_channel(), message)
                .await?;
            Ok::<_, ClusterError>(reached)
        }
        .await;
        let (outcome, reached) = match sent {
            Ok(reached) => {
                let heard = tokio::time::timeout(ANSWER_WAIT, answer).await;
                (heard.ok().and_then(Result::ok), reached)
            }
            Err(error) => {
                self.waiting.lock().await.remove(&token);
                self.count_feedback("failed");
                return Err(error);
            }
        };
        self.waiting.lock().await.remove(&token);
        // No reply, and not every live replica was listening (one still joining, or the
        // subscription broke meanwhile and a reply may have been lost): say so rather than
        // "unknown". Sending it again is safe: taken feedback is never taken twice.
        let interrupted = reached < self.live.load(Ordering::Relaxed)
            || !self.listening.load(Ordering::Acquire)
            || self.subscriptions.load(Ordering::Acquire) != subscription;
        if outcome.is_none() && interrupted {
            self.count_feedback("failed");
            return Err(ClusterError::Interrupted);
        }
        self.count_feedback(if outcome.is_some() {
            "sent"
        } else {
            "unanswered"
        });
        Ok(outcome)
    }

    /// Tells the other replicas that a router state changed here.
    pub(super) async fn announce_change(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
    ) -> Result<(), ClusterError> {
        let _: i64 = connection
            .publish(self.store.states_channel(), &self.replica)
            .await?;
        Ok(())
    }

    /// Listens on the states channel, the feedback channel and this replica's reply
    /// channel, subscribing again after Redis goes away.
    pub(super) async fn listen(self: Arc<Self>) {
        let states = self.store.states_channel();
        let feedback = self.store.feedback_channel();
        let channels = [
            states.clone(),
            feedback.clone(),
            self.store.reply_channel(&self.replica),
        ];
        loop {
            match self.store.subscribe(&channels).await {
                Ok(mut pubsub) => {
                    self.subscriptions.fetch_add(1, Ordering::AcqRel);
                    self.listening.store(true, Ordering::Release);
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(message) if message.get_channel_name() == states => {
                                    if message.get_payload_bytes() != self.replica.as_bytes() {
                                        self.nudged.notify_one();
                                    }
                                }
                                Some(message) if message.get_channel_name() == feedback => {
                                    self.take(message.get_payload_bytes()).await;
                                }
                                Some(message) => self.hear(message.get_payload_bytes()).await,
                                None => break,
                            },
                            // The exchange found Redis gone: this connection may hang on a
                            // partition rather than end.
                            () = self.lost.notified() => break,
                        }
                    }
                    self.listening.store(false, Ordering::Release);
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot subscribe to the cluster's feedback channels yet");
                }
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Another replica's feedback: taken if the answer is this replica's.
    async fn take(&self, payload: &[u8]) {
        let Ok(passed) = serde_json::from_slice::<Passed>(payload) else {
            tracing::warn!(
                "unreadable feedback on the cluster's channel (are all replicas the same release?)"
            );
            return;
        };
        if passed.from == self.replica {
            return;
        }
        let outcome = self.pipeline.feedback().score(
            &passed.endpoint,
            &passed.id,
            passed.reward,
            passed.labels.as_deref(),
        );
        if outcome == Feedback::Unknown {
            return;
        }
        self.count_feedback("taken");
        let taken = Taken {
            token: passed.token,
            by: self.replica.clone(),
            outcome,
        };
        let replied = async {
            let mut connection = self.store.connection().await?;
            let _: i64 = connection
                .publish(
                    self.store.reply_channel(&passed.from),
                    serde_json::to_string(&taken)?,
                )
                .await?;
            Ok::<_, ClusterError>(())
        }
        .await;
        if let Err(error) = replied {
            tracing::warn!(endpoint = %passed.endpoint, id = %passed.id, replica = %passed.from, %error, "feedback taken here, but the replica that passed it on cannot be told; it answers 404");
        }
    }

    /// What another replica made of feedback this one passed on.
    async fn hear(&self, payload: &[u8]) {
        let Ok(taken) = serde_json::from_slice::<Taken>(payload) else {
            tracing::warn!("unreadable reply on the cluster's feedback channel");
            return;
        };
        if let Some(waiting) = self.waiting.lock().await.remove(&taken.token) {
            tracing::debug!(replica = %taken.by, "feedback taken by the replica that gave the answer");
            let _ = waiting.send(taken.outcome);
        }
    }

    fn count_feedback(&self, outcome: &'static str) {
        if let Some(metrics) = self.telemetry.metrics() {
            metrics.cluster_feedback(outcome);
        }
    }
}
