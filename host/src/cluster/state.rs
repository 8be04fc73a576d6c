//! What a replica keeps of the cluster: its name, the connection, the other replicas'
//! last reports, and the feedback it is waiting to hear about.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, oneshot};

use super::store::Store;
use crate::endpoint::{Feedback, Tally};
use crate::pipeline::Pipeline;
use crate::telemetry::{Telemetry, Throttle};

pub struct Cluster {
    /// This replica's name among the replicas.
    pub replica: String,
    pub(super) store: Store,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) interval: Duration,
    pub(super) retention: Duration,
    /// One sharing of router states at a time: the timer's and an operator's action's.
    pub(super) sharing: Mutex<()>,
    /// The other replicas' last reports, by replica: kept through an outage.
    pub(super) others: Mutex<HashMap<String, Report>>,
    /// Feedback passed on, waiting to hear what became of it.
    pub(super) waiting: Mutex<HashMap<u64, oneshot::Sender<Feedback>>>,
    pub(super) next_token: AtomicU64,
    /// Told when an exchange fails: the channels subscribe again.
    pub(super) lost: Notify,
    /// Told when another replica changed a router state: exchange states now.
    pub(super) nudged: Notify,
    /// Subscriptions made so far, and whether the last one still holds: a reply to
    /// feedback passed on can only be heard while it does.
    pub(super) subscriptions: AtomicU64,
    pub(super) listening: AtomicBool,
    /// Whether the last exchange succeeded, and the replicas it summed.
    pub(super) reachable: AtomicBool,
    /// Whether the first exchange has ended, well or not: a replica is ready once it has
    /// the shared state, or knows it cannot have it yet.
    pub(super) joined: AtomicBool,
    pub(super) replicas: AtomicUsize,
    /// The replicas that reported within the last few ticks, this one included: those
    /// feedback passed on should reach.
    pub(super) live: AtomicUsize,
    pub(super) outage_log: Throttle,
}

/// What a replica counted, as it sends it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Report {
    /// When it was sent, in Unix milliseconds.
    pub(super) at_ms: u64,
    /// By endpoint, then variant.
    pub(super) variants: BTreeMap<String, BTreeMap<String, Tally>>,
}
