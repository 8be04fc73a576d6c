//! The router's own state between requests (a canary's step, the active colour …), which
//! outlives plugin swaps; the router's state starts afresh when its configuration
//! changes, because a state written for other settings means nothing under new ones. The
//! state is also kept in the server's database, so a restart with the same router and
//! configuration continues where it stopped (a rolled-back canary stays rolled back).

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
    /// an older state than memory (a rollback racing a request's change).
    writing: Mutex<()>,
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
            writing: Mutex::new(()),
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
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let replaced = Arc::ptr_eq(&self.state.compare_and_swap(seen, new.clone()), seen);
        if replaced && let Some(kept) = &self.kept_as {
            kept.keep(new.to_string());
        }
        replaced
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
}
