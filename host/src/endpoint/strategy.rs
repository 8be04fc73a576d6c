//! The router's own state between requests (a canary's step, the active colour …), which
//! outlives plugin swaps; the router's state starts afresh when its configuration
//! changes, because a state written for other settings means nothing under new ones. The
//! state is also kept in the server's database, so a restart with the same router and
//! configuration continues where it stopped (a rolled-back canary stays rolled back).
//!
//! In a cluster the state is also the replicas' shared copy's: each state carries the
//! version of the shared copy it was made from, so that a change made on a stale state
//! loses to the one already shared, as a request's does to an operator's here.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::plugins::PluginError;
use crate::telemetry::{RouterState, Telemetry};

/// The router's state as it last returned it (JSON; empty at first).
#[derive(Default)]
pub struct StrategyState {
    state: ArcSwap<String>,
    /// Where the state is kept, for an endpoint with a router.
    kept_as: Option<Kept>,
    /// Orders each change with its write to the database, so the database never ends on
    /// an older state than memory (a rollback racing a request's change); and with where
    /// the state stands with the cluster's copy.
    writing: Mutex<Synced>,
}

/// Where the state stands with the cluster's shared copy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Synced {
    /// The version of the shared copy the state is, or was made from.
    pub version: u64,
    /// Changed here since: to be shared.
    pub changed: bool,
}

/// The endpoint and the router (plugin, configuration, variants) a state is kept under.
struct Kept {
    endpoint: String,
    router: String,
    telemetry: Arc<Telemetry>,
}

impl Kept {
    /// Writes the state to the database, for a restart to continue from.
    fn keep(&self, state: String) {
        self.telemetry.keep_router_state(RouterState {
            endpoint: self.endpoint.clone(),
            router: self.router.clone(),
            state,
        });
    }
}

impl StrategyState {
    /// The state of `endpoint`'s `router`, kept in the database as it changes; with
    /// `resume`, starting from what the database kept for exactly that router, otherwise
    /// empty (written so, so that a restart does not bring back an older router's state).
    pub fn kept(
        telemetry: Arc<Telemetry>,
        endpoint: &str,
        router: String,
        resume: bool,
    ) -> StrategyState {
        let state = resume
            .then(|| telemetry.kept_router_state(endpoint, &router))
            .flatten()
            .filter(|state| !state.is_empty());
        let kept = Kept {
            endpoint: endpoint.to_string(),
            router,
            telemetry,
        };
        match &state {
            Some(state) => {
                tracing::info!(endpoint, %state, "the router continues from the state kept before the restart");
            }
            None => kept.keep(String::new()),
        }
        StrategyState {
            state: ArcSwap::from_pointee(state.unwrap_or_default()),
            kept_as: Some(kept),
            writing: Mutex::new(Synced::default()),
        }
    }

    pub fn load(&self) -> Arc<String> {
        self.state.load_full()
    }

    /// The router the state belongs to; `None` for an endpoint without one.
    pub fn router(&self) -> Option<&str> {
        self.kept_as.as_ref().map(|kept| kept.router.as_str())
    }

    /// Replaces `seen` with `new` unless someone replaced it meanwhile (an operator's
    /// rollback must not be undone by a request that routed on the state before it);
    /// whether it did.
    pub fn replace(&self, seen: &Arc<String>, new: String) -> bool {
        let new = Arc::new(new);
        let mut synced = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let replaced = Arc::ptr_eq(&self.state.compare_and_swap(seen, new.clone()), seen);
        if replaced {
            synced.changed = true;
            if let Some(kept) = &self.kept_as {
                kept.keep(new.to_string());
            }
        }
        replaced
    }

    /// The state, and where it stands with the cluster's copy.
    pub fn synced(&self) -> (Arc<String>, Synced) {
        let synced = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        (self.state.load_full(), *synced)
    }

    /// `sent` is the shared copy's `version` now: the state is in step with it unless it
    /// changed again meanwhile.
    pub fn shared(&self, sent: &Arc<String>, version: u64) {
        let mut synced = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        synced.version = version;
        synced.changed = !Arc::ptr_eq(&self.state.load(), sent);
    }

    /// Takes the shared copy's `state` at `version` over whatever is here, a change not
    /// shared yet included (it lost: it was made on an older state); the state before,
    /// when that differed.
    pub fn adopt(&self, state: String, version: u64) -> Option<Arc<String>> {
        let mut synced = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        *synced = Synced {
            version,
            changed: false,
        };
        let before = self.state.load_full();
        if *before == state {
            return None;
        }
        self.state.store(Arc::new(state.clone()));
        if let Some(kept) = &self.kept_as {
            kept.keep(state);
        }
        Some(before)
    }
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
    fn a_shared_state_is_in_step_until_it_changes_and_a_newer_copy_wins() {
        let state = StrategyState::default();
        let seen = state.load();
        assert!(state.replace(&seen, "a".to_string()));
        let at = |version, changed| Synced { version, changed };
        let (sent, synced) = state.synced();
        assert_eq!(synced, at(0, true));
        // Changed again while it was being sent: still to be shared.
        assert!(state.replace(&sent, "b".to_string()));
        state.shared(&sent, 1);
        assert_eq!(state.synced().1, at(1, true));
        let (sent, _) = state.synced();
        state.shared(&sent, 2);
        assert_eq!(state.synced().1, at(2, false));
        // Another replica's newer copy replaces a change not shared yet.
        let seen = state.load();
        assert!(state.replace(&seen, "mine".to_string()));
        assert_eq!(
            state
                .adopt("theirs".to_string(), 3)
                .as_deref()
                .map(String::as_str),
            Some("mine")
        );
        assert_eq!(
            state.synced(),
            (
                Arc::new("theirs".to_string()),
                Synced {
                    version: 3,
                    changed: false
                }
            )
        );
        assert_eq!(state.adopt("theirs".to_string(), 3), None);
    }
}
