//! What the host remembers of an endpoint's routing between requests: the router's own
//! state (a canary's step, the active colour …) and the last decisions, for operators.
//! Both outlive plugin swaps; the router's state starts afresh when its configuration
//! changes, because a state written for other settings means nothing under new ones. The
//! state is also kept in the server's database, so a restart with the same router and
//! configuration continues where it stopped (a rolled-back canary stays rolled back).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use super::endpoints::Endpoint;
use crate::plugins::{FlagInfo, PluginError, VariantStats};
use crate::telemetry;

/// The router's state as it last returned it (JSON; empty at first).
#[derive(Default)]
pub struct StrategyState {
    state: ArcSwap<String>,
    /// The endpoint and the router (plugin, configuration, variants) it is kept under.
    kept_as: Option<(String, String)>,
    /// Orders each change with its write to the database, so the database never ends on
    /// an older state than memory (a rollback racing a request's change).
    writing: Mutex<()>,
}

impl StrategyState {
    /// The state of `endpoint`'s `router`, kept in the database as it changes; with
    /// `resume`, starting from what the database kept for exactly that router, otherwise
    /// empty (written so, so that a restart does not bring back an older router's state).
    pub fn kept(endpoint: &str, router: String, resume: bool) -> StrategyState {
        let kept = resume
            .then(|| telemetry::kept_router_state(endpoint, &router))
            .flatten()
            .filter(|state| !state.is_empty());
        match &kept {
            Some(state) => {
                tracing::info!(endpoint, %state, "the router continues from the state kept before the restart");
            }
            None => keep(endpoint, &router, String::new()),
        }
        StrategyState {
            state: ArcSwap::from_pointee(kept.unwrap_or_default()),
            kept_as: Some((endpoint.to_string(), router)),
            writing: Mutex::new(()),
        }
    }

    pub fn load(&self) -> Arc<String> {
        self.state.load_full()
    }

    /// The router the state belongs to; `None` for an endpoint without one.
    pub fn router(&self) -> Option<&str> {
        self.kept_as.as_ref().map(|(_, router)| router.as_str())
    }

    /// Replaces `seen` with `new` unless someone replaced it meanwhile (an operator's
    /// rollback must not be undone by a request that routed on the state before it);
    /// whether it did.
    pub fn replace(&self, seen: &Arc<String>, new: String) -> bool {
        let new = Arc::new(new);
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let replaced = Arc::ptr_eq(&self.state.compare_and_swap(seen, new.clone()), seen);
        if replaced && let Some((endpoint, router)) = &self.kept_as {
            keep(endpoint, router, new.to_string());
        }
        replaced
    }
}

/// Writes `endpoint`'s router state to the database, for a restart to continue from.
fn keep(endpoint: &str, router: &str, state: String) {
    telemetry::keep_router_state(telemetry::RouterState {
        endpoint: endpoint.to_string(),
        router: router.to_string(),
        state,
    });
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(
        "endpoint '{0}' has no router to take that; configure one under [endpoints.{0}.router]"
    )]
    NoRouter(String),
    /// The router refused the action; its message says why.
    #[error("endpoint '{endpoint}': {message}")]
    Refused { endpoint: String, message: String },
    #[error("endpoint '{endpoint}': {source}")]
    Plugin {
        endpoint: String,
        source: PluginError,
    },
    #[error("endpoint '{0}': the routing state kept changing under the action; try again")]
    Contended(String),
}

impl Endpoint {
    /// Applies an operator's `action` (JSON `args`) through the router; returns the router's
    /// description of the new state.
    pub fn act(&self, action: &str, args: &str) -> Result<serde_json::Value, ActError> {
        let router = self
            .router
            .as_ref()
            .ok_or_else(|| ActError::NoRouter(self.name.clone()))?;
        for _ in 0..8 {
            let stats = self.stats();
            let seen = self.strategy.load();
            let new = router
                .pool
                .act(action, args, &seen, &stats, super::now_ms())
                .map_err(|error| match error {
                    PluginError::Failed { message, .. } => ActError::Refused {
                        endpoint: self.name.clone(),
                        message,
                    },
                    source => ActError::Plugin {
                        endpoint: self.name.clone(),
                        source,
                    },
                })?;
            if self.strategy.replace(&seen, new) {
                return Ok(self.describe_strategy().unwrap_or_default());
            }
        }
        Err(ActError::Contended(self.name.clone()))
    }

    /// The router's account of its state; `None` without a router.
    pub fn describe_strategy(&self) -> Option<serde_json::Value> {
        let router = self.router.as_ref()?;
        let described = router
            .pool
            .describe(&self.strategy.load(), &self.stats())
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
        Some(described.unwrap_or_else(|error| serde_json::json!({ "error": error })))
    }

    /// Each flags plugin's flags, or why it cannot say.
    pub fn flag_infos(&self) -> Vec<(String, Result<Vec<FlagInfo>, String>)> {
        self.flags
            .iter()
            .map(|f| {
                let infos = f.pool.describe(super::now_ms()).map_err(|e| e.to_string());
                (f.plugin.clone(), infos)
            })
            .collect()
    }

    /// Every variant's statistics, as routers see them.
    pub(super) fn stats(&self) -> Vec<VariantStats> {
        self.variants
            .iter()
            .map(super::context::variant_stats)
            .collect()
    }
}

/// One routing decision, as operators see it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecisionRecord {
    pub id: String,
    pub at_ms: u64,
    pub variant: String,
    pub reason: String,
    pub shadows: Vec<String>,
    pub fallback: bool,
    pub ok: bool,
}

/// The most recent decisions of an endpoint, newest last.
pub struct Recent {
    records: Mutex<VecDeque<DecisionRecord>>,
}

const KEPT: usize = 20;

impl Default for Recent {
    fn default() -> Recent {
        Recent {
            records: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }
}

impl Recent {
    pub fn push(&self, record: DecisionRecord) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.len() == KEPT {
            records.pop_front();
        }
        records.push_back(record);
    }

    pub fn list(&self) -> Vec<DecisionRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_based_on_a_stale_state_loses() {
        let state = StrategyState::default();
        let seen = state.load();
        assert!(state.replace(&seen, "a".to_string()));
        // `seen` is stale now: a request that routed on it cannot overwrite "a".
        assert!(!state.replace(&seen, "b".to_string()));
        assert_eq!(state.load().as_str(), "a");
    }

    #[test]
    fn only_the_last_decisions_are_kept() {
        let recent = Recent::default();
        for i in 0..30 {
            recent.push(DecisionRecord {
                id: i.to_string(),
                at_ms: i,
                variant: "a".to_string(),
                reason: String::new(),
                shadows: vec![],
                fallback: false,
                ok: true,
            });
        }
        let list = recent.list();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[KEPT - 1].id, "29");
    }
}
