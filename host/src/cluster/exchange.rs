//! The exchange with Redis: every `sync_interval_ms`, and the router states also as soon as
//! one changes here or another replica says one changed there. A replica
//!
//! 1. brings each router's state in step with the shared copy: a newer copy is taken over
//!    (a change made here on an older one loses, as it would to an operator's action on
//!    one server), a change made here is sent with a compare-and-set on the version it
//!    was made from, and a copy Redis lost (restarted empty) is written back;
//! 2. sends its own counts of every variant (whole, not increments: sending them again
//!    after an outage or to an emptied Redis loses nothing and counts nothing twice) and
//!    reads the other replicas', which its counters then add to their own.
//!
//! A replica that stops reporting keeps its counts in the sums for
//! `replica_retention_seconds`; one missing from a read (Redis restarted, not reported
//! yet) keeps the last counts read.

use std::sync::atomic::Ordering;

use redis::aio::MultiplexedConnection;

use super::state::{Cluster, Report};
use super::store::ClusterError;
use crate::endpoint::{Elsewhere, Endpoint, Tally};
use crate::telemetry::{Change, now_ms};

/// Writes a router's state unless the shared copy moved on since it was read: KEYS[1] the
/// router's hash; ARGV the version read (`""`: none), the new version, the state, the
/// replica.
const SHARE: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'state', ARGV[3], 'by', ARGV[4])
return 1
";

/// Where a router's state stands after an exchange.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Reconciled {
    /// As shared; nothing to do.
    InStep,
    /// This replica's change (or the copy Redis had lost) is the shared copy now.
    Sent,
    /// Another replica's newer copy replaced the state here.
    Adopted,
    /// Another replica changed the shared copy between the read and the write.
    Refused,
}

/// A router's shared copy as read: version, state, the replica that wrote it.
type Remote = (u64, String, String);

impl Cluster {
    /// One exchange: router states, then, when `counts`, counts. The replicas whose counts
    /// are summed, this one included.
    pub(super) async fn exchange(&self, counts: bool) -> Result<usize, ClusterError> {
        let mut connection = self.store.connection().await?;
        self.share_states(&mut connection, None).await?;
        if counts {
            self.exchange_reports(&mut connection).await
        } else {
            Ok(self.replicas.load(Ordering::Relaxed))
        }
    }

    /// Brings every router's state, or `only` that endpoint's, in step with the shared
    /// copy.
    pub(super) async fn share_states(
        &self,
        connection: &mut MultiplexedConnection,
        only: Option<&str>,
    ) -> Result<Vec<(String, Reconciled)>, ClusterError> {
        let _sharing = self.sharing.lock().await;
        let set = self.pipeline.endpoints();
        let routed: Vec<(&Endpoint, String)> = set
            .endpoints
            .values()
            .filter(|e| only.is_none_or(|name| name == e.name))
            .filter_map(|e| {
                let identity = e.strategy.router()?;
                Some((e.as_ref(), self.store.router(&e.name, identity)))
            })
            .collect();
        if routed.is_empty() {
            return Ok(Vec::new());
        }
        let mut read = redis::pipe();
        for (_, key) in &routed {
            read.cmd("HMGET").arg(key).arg("v").arg("state").arg("by");
        }
        let copies: Vec<(Option<u64>, Option<String>, Option<String>)> =
            read.query_async(connection).await?;
        let mut outcomes = Vec::with_capacity(routed.len());
        for ((endpoint, key), (version, state, by)) in routed.iter().zip(copies) {
            let remote = version
                .zip(state)
                .map(|(v, s)| (v, s, by.unwrap_or_default()));
            let outcome = self.reconcile(connection, endpoint, key, remote).await?;
            outcomes.push((endpoint.name.clone(), outcome));
        }
        if outcomes.iter().any(|(_, o)| *o == Reconciled::Sent) {
            self.announce_change(connection).await?;
        }
        Ok(outcomes)
    }

    async fn reconcile(
        &self,
        connection: &mut MultiplexedConnection,
        endpoint: &Endpoint,
        key: &str,
        remote: Option<Remote>,
    ) -> Result<Reconciled, ClusterError> {
        let (state, synced) = endpoint.strategy.synced();
        match &remote {
            Some((version, theirs, by)) if *version > synced.version => {
                if let Some(before) = endpoint.strategy.adopt(theirs.clone(), *version) {
                    tracing::info!(endpoint = %endpoint.name, replica = %by, version, state = %theirs, "router state taken from the cluster");
                    endpoint.telemetry.audit(Change {
                        kind: "endpoint.state",
                        actor: format!("replica:{by}"),
                        subject: endpoint.name.clone(),
                        endpoint: Some(endpoint.name.clone()),
                        from: Some(before.to_string()),
                        to: Some(theirs.clone()),
                        detail: Some(format!("the cluster's shared state, version {version}")),
                    });
                }
                return Ok(Reconciled::Adopted);
            }
            Some((version, _, _)) if *version == synced.version && !synced.changed => {
                return Ok(Reconciled::InStep);
            }
            None if !synced.changed && state.is_empty() => return Ok(Reconciled::InStep),
            _ => {}
        }
        let read = remote.as_ref().map(|r| r.0.to_string()).unwrap_or_default();
        let next = synced.version + u64::from(synced.changed);
        let written: i64 = redis::Script::new(SHARE)
            .key(key)
            .arg(read)
            .arg(next)
            .arg(state.as_str())
            .arg(&self.replica)
            .invoke_async(connection)
            .await?;
        if written == 1 {
            endpoint.strategy.shared(&state, next);
            Ok(Reconciled::Sent)
        } else {
            Ok(Reconciled::Refused)
        }
    }

    /// Sends this replica's counts and reads the others'; adds theirs to every variant's
    /// counters here.
    async fn exchange_reports(
        &self,
        connection: &mut MultiplexedConnection,
    ) -> Result<usize, ClusterError> {
        let counters = self.pipeline.stats().all();
        let mut mine = Report {
            at_ms: now_ms(),
            ..Report::default()
        };
        for ((endpoint, variant), c) in &counters {
            mine.variants
                .entry(endpoint.clone())
                .or_default()
                .insert(variant.clone(), c.tally());
        }
        let since = mine.at_ms.saturating_sub(self.retention.as_millis() as u64);
        let replicas = self.store.replicas();
        let (members,): (Vec<String>,) = redis::pipe()
            .set_ex(
                self.store.report(&self.replica),
                serde_json::to_string(&mine)?,
                self.retention.as_secs(),
            )
            .ignore()
            .zadd(&replicas, &self.replica, mine.at_ms)
            .ignore()
            .zrembyscore(&replicas, "-inf", format!("({since}"))
            .ignore()
            .zrangebyscore(&replicas, since, "+inf")
            .query_async(connection)
            .await?;
        let others: Vec<&String> = members.iter().filter(|m| **m != self.replica).collect();
        let reports: Vec<Option<String>> = if others.is_empty() {
            Vec::new()
        } else {
            let keys: Vec<String> = others.iter().map(|o| self.store.report(o)).collect();
            redis::cmd("MGET").arg(keys).query_async(connection).await?
        };
        let mut known = self.others.lock().await;
        for (replica, report) in others.into_iter().zip(reports) {
            let Some(text) = report else { continue };
            match serde_json::from_str::<Report>(&text) {
                Ok(report) => {
                    known.insert(replica.clone(), report);
                }
                Err(error) => {
                    tracing::warn!(replica = %replica, %error, "a replica's report cannot be read; its last one stays in the sums (are all replicas the same release?)");
                }
            }
        }
        known.retain(|_, report| report.at_ms >= since);
        let recent = mine
            .at_ms
            .saturating_sub(4 * self.interval.as_millis() as u64);
        let live = known.values().filter(|r| r.at_ms >= recent).count();
        self.live.store(live + 1, Ordering::Relaxed);
        for ((endpoint, variant), c) in &counters {
            let Some(own) = mine.variants.get(endpoint).and_then(|v| v.get(variant)) else {
                continue;
            };
            let theirs: Vec<&Tally> = known
                .values()
                .filter_map(|r| r.variants.get(endpoint)?.get(variant))
                .collect();
            c.set_elsewhere(Elsewhere::merge(own, &theirs));
        }
        Ok(known.len() + 1)
    }
}
