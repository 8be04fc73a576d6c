//! Sampled requests as CloudEvents over HTTP, for teams that collect centrally (the way
//! KServe's payload logger sends them): binary content mode, the record as a JSON body and
//! the event's attributes in `ce-*` headers. One thread posts them behind a bounded queue;
//! a sink that is down or slow costs dropped events (counted), never a slower request.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::clock::rfc3339;
use super::store::RequestRecord;

/// Events waiting for the sink at most.
const QUEUE: usize = 1024;

/// The CloudEvents `type` of a sampled request.
const EVENT_TYPE: &str = "dev.modelyard.inference.request";

pub struct Sink {
    events: SyncSender<RequestRecord>,
}

impl Sink {
    /// Starts the thread that posts to `url`; events it cannot deliver count in `dropped`.
    pub fn start(url: String, dropped: Option<Counter>) -> std::io::Result<Sink> {
        let (events, queue) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("modelyard-cloudevents".to_string())
            .spawn(move || post(&url, &queue, dropped.as_ref()))?;
        Ok(Sink { events })
    }

    /// `false` when the event was dropped because the sink is behind.
    pub fn send(&self, record: RequestRecord) -> bool {
        !matches!(
            self.events.try_send(record),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
        )
    }
}

fn post(url: &str, queue: &Receiver<RequestRecord>, dropped: Option<&Counter>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(true)
        .build()
        .into();
    // One warning per outage, not one per event.
    let mut failing = false;
    while let Ok(record) = queue.recv() {
        let body = match serde_json::to_vec(&record) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(%error, "cannot encode a request record as JSON");
                continue;
            }
        };
        let sent = agent
            .post(url)
            .header("ce-specversion", "1.0")
            .header("ce-id", &record.id)
            .header("ce-source", format!("/modelyard/{}", record.endpoint))
            .header("ce-type", EVENT_TYPE)
            .header("ce-time", rfc3339(record.at_ms as i64))
            .header(
                "ce-subject",
                record.variant.as_deref().unwrap_or(&record.endpoint),
            )
            .header("content-type", "application/json")
            .send(&body[..]);
        if sent.is_err()
            && let Some(dropped) = dropped
        {
            dropped.inc();
        }
        match sent {
            Ok(_) if failing => {
                failing = false;
                tracing::info!(%url, "the CloudEvents sink accepts events again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%url, %error, "the CloudEvents sink refused an event; sampled requests are still kept in the database");
            }
            Err(_) => {}
        }
    }
}
