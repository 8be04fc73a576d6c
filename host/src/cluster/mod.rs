//! Replicas that behave as one endpoint. With `[cluster] redis_url` set, replicas share
//! through Redis what their routers judge by and decide: every variant's counts and
//! rewards (routers and operators see the sums over all replicas), each router's state
//! (a canary's step, a rollback, the active colour, an operator's weights), and feedback
//! for any replica's answer. Without it, nothing here runs.
//!
//! Nothing on the request path waits for Redis: counts are sent and read on a timer
//! (`sync_interval_ms`), so the others' share of the sums is that much behind; a change of
//! a router's state (a request's or an operator's) is sent as soon as it is made, in the
//! background for a request, and the other replicas are told on a channel to take it. When Redis is away a
//! replica serves on the last shared state and its own counts, logs and counts the
//! outage, and sends everything counted meanwhile when Redis is back (it always sends its
//! whole counts, so an emptied Redis is filled again by the replicas).
//!
//! Owns: the exchange with Redis and passing feedback between replicas. Must not touch:
//! how a request is answered or routed (pipeline) or what is counted (endpoint); it reads
//! the endpoints' counters and states and writes back what the other replicas did.
//! Per replica, and not shared: the audit trail and the request log (collect them through
//! the CloudEvents sink), the last decisions, shadow comparisons, accuracy by segment.

mod channels;
mod exchange;
mod state;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::config::ClusterConfig;
use crate::pipeline::Pipeline;
use crate::telemetry::{Telemetry, Throttle};
use exchange::Reconciled;
pub use state::Cluster;
pub use store::ClusterError;
use store::Store;

/// The cluster's background work, stopped with the server.
pub struct Running {
    pub cluster: Arc<Cluster>,
    tasks: Vec<JoinHandle<()>>,
}

/// Refuses a `redis_url` that is no Redis URL, before anything starts.
pub fn check(config: &ClusterConfig) -> Result<(), ClusterError> {
    match &config.redis_url {
        Some(url) => Store::open(url, &config.namespace, Duration::from_secs(1)).map(drop),
        None => Ok(()),
    }
}

impl Cluster {
    /// Joins the cluster `config` names, if it names one, as `replica` (see
    /// [`Cluster::replica_name`]).
    pub fn start(
        config: &ClusterConfig,
        replica: Option<String>,
        pipeline: Arc<Pipeline>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Option<Running>, ClusterError> {
        let (Some(url), Some(replica)) = (&config.redis_url, replica) else {
            return Ok(None);
        };
        let interval = Duration::from_millis(config.sync_interval_ms);
        let cluster = Arc::new(Cluster {
            replica,
            store: Store::open(url, &config.namespace, outage_after(interval))?,
            pipeline,
            telemetry,
            interval,
            retention: Duration::from_secs(config.replica_retention_seconds),
            sharing: Mutex::new(()),
            others: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
            lost: Notify::new(),
            nudged: Notify::new(),
            subscriptions: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            reachable: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            replicas: AtomicUsize::new(1),
            live: AtomicUsize::new(1),
            outage_log: Throttle::default(),
        });
        tracing::info!(replica = %cluster.replica, namespace = %config.namespace, interval_ms = config.sync_interval_ms, "sharing strategy state with the other replicas through Redis");
        let tasks = vec![
            tokio::spawn(cluster.clone().keep_in_step()),
            tokio::spawn(cluster.clone().listen()),
        ];
        Ok(Some(Running { cluster, tasks }))
    }

    /// This replica's name in the cluster `config` names: `cluster.replica`, or the host
    /// name (the pod's name on Kubernetes) and a suffix new at every start, so that a
    /// restarted replica's counts start afresh beside its old ones. `None` without a
    /// cluster.
    pub fn replica_name(config: &ClusterConfig) -> Option<String> {
        config.redis_url.as_ref()?;
        if let Some(replica) = &config.replica {
            return Some(replica.clone());
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "replica".to_string());
        Some(format!("{host}-{:06x}", fastrand::u32(..0x100_0000)))
    }

    /// Shares an operator's change of `endpoint`'s router state at once: `Ok(true)` when
    /// it is the shared copy now, `Ok(false)` when another replica's change came first
    /// (the state here is that one now; act on it again).
    pub async fn share_now(&self, endpoint: &str) -> Result<bool, ClusterError> {
        let shared = async {
            let mut connection = self.store.connection().await?;
            self.share_states(&mut connection, Some(endpoint)).await
        }
        .await;
        match shared {
            Ok(outcomes) => Ok(outcomes
                .iter()
                .all(|(_, o)| matches!(o, Reconciled::Sent | Reconciled::InStep))),
            Err(error) => {
                self.store.failed().await;
                Err(error)
            }
        }
    }

    /// Exchanges with Redis every tick, for as long as the server runs.
    async fn keep_in_step(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reachable = true;
        loop {
            // Counts on the tick; router states also as soon as one changes, here or on
            // another replica.
            let counts = tokio::select! {
                _ = ticks.tick() => true,
                () = self.telemetry.router_state_kept() => false,
                () = self.nudged.notified() => false,
            };
            let exchange = self.exchange(counts);
            let exchanged = match tokio::time::timeout(self.store_timeout(), exchange).await {
                Ok(exchanged) => exchanged,
                Err(_) => Err(ClusterError::TimedOut),
            };
            let metrics = self.telemetry.metrics();
            match exchanged {
                Ok(replicas) => {
                    if !reachable {
                        tracing::info!(replica = %self.replica, replicas, "the cluster's Redis is back: counts and router states are shared again");
                    }
                    reachable = true;
                    self.replicas.store(replicas, Ordering::Relaxed);
                    if let Some(metrics) = metrics {
                        metrics.cluster_synced(true, Some(replicas));
                    }
                }
                Err(error) => {
                    self.store.failed().await;
                    self.lost.notify_waiters();
                    if let Some(metrics) = metrics {
                        metrics.cluster_synced(false, None);
                    }
                    if let Some(unlogged) = self.outage_log.pass() {
                        tracing::warn!(replica = %self.replica, %error, unlogged, "cannot exchange with the cluster's Redis; serving on the last shared state and counting here until it is back");
                    }
                    if reachable {
                        self.telemetry
                            .note_error("cluster", format!("replica {}: {error}", self.replica));
                    }
                    reachable = false;
                }
            }
            self.reachable.store(reachable, Ordering::Relaxed);
            self.joined.store(true, Ordering::Release);
        }
    }

    /// Whether the first exchange with Redis has ended (well or not).
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    /// For `/admin/status`: this replica, whether Redis answered the last exchange, and
    /// the replicas in the sums.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "replica": self.replica,
            "redis_reachable": self.reachable.load(Ordering::Relaxed),
            "replicas": self.replicas.load(Ordering::Relaxed),
            "sync_interval_ms": self.interval.as_millis() as u64,
        })
    }

    fn store_timeout(&self) -> Duration {
        outage_after(self.interval)
    }
}

impl Running {
    /// Stops the exchange after a last one, so that what this replica counted until it
    /// stopped stays in the sums.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        let last =
            tokio::time::timeout(self.cluster.store_timeout(), self.cluster.exchange(true)).await;
        if !matches!(last, Ok(Ok(_))) {
            tracing::warn!(replica = %self.cluster.replica, "could not send the last counts to the cluster's Redis; the sums miss what this replica counted since its last exchange");
        }
    }
}

/// How long an exchange may take: a reply slower than a few ticks is an outage, not a slow
/// Redis.
fn outage_after(interval: Duration) -> Duration {
    (interval * 4).max(Duration::from_secs(1))
}
