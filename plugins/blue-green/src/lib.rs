//! `blue-green`: two full variants, all traffic on the active one. Switching is one state
//! change in the host — atomic and instant, for every request after it — whether through
//! `POST /admin/endpoints/{e}/promote` (to the other variant, or `{"to": "<name>"}`),
//! `POST …/rollback` (back to the one before), or an edit of `active` in the
//! configuration. With `shadow_idle` the idle variant sees every request in the shadow, to
//! be compared before it takes over.
//!
//! ```toml
//! [endpoints.iris-bg]
//! variants = { blue = "iris@1", green = "iris@2" }
//! router = { plugin = "blue-green", config = { active = "blue", shadow_idle = true } }
//! ```

use modelyard_sdk::{Action, Decision, Error, RequestContext, Router, VariantStats, fail};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub active: String,
    #[serde(default)]
    pub shadow_idle: bool,
}

/// A switch made through the admin API; none means the configuration's `active` holds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    #[serde(default)]
    pub switched_at_ms: u64,
}

pub struct BlueGreen {
    config: Config,
}

impl BlueGreen {
    fn active<'a>(&'a self, state: &'a State) -> &'a str {
        state.active.as_deref().unwrap_or(&self.config.active)
    }

    fn switch(&self, state: &mut State, to: String, now_ms: u64) {
        state.previous = Some(self.active(state).to_string());
        state.active = Some(to);
        state.switched_at_ms = now_ms;
    }
}

impl Router for BlueGreen {
    type Config = Config;
    type State = State;

    fn new(config: Config) -> Result<Self, Error> {
        Ok(BlueGreen { config })
    }

    fn route(
        &self,
        _ctx: &RequestContext,
        variants: &[VariantStats],
        state: &mut State,
    ) -> Result<Decision, Error> {
        let active = VariantStats::find(variants, self.active(state))?
            .name
            .as_str();
        let shadows = if self.config.shadow_idle {
            variants
                .iter()
                .filter(|v| v.name != active)
                .map(|v| v.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        Ok(Decision {
            shadows,
            ..Decision::to(active, format!("active: {active}"))
        })
    }

    fn act(
        &self,
        action: Action,
        state: &mut State,
        variants: &[VariantStats],
        now_ms: u64,
    ) -> Result<(), Error> {
        let active = self.active(state).to_string();
        match action {
            Action::Promote { to } => {
                let to = match to {
                    Some(to) => VariantStats::find(variants, &to)?.name.clone(),
                    None => {
                        let others: Vec<&VariantStats> =
                            variants.iter().filter(|v| v.name != active).collect();
                        match others.as_slice() {
                            [other] => other.name.clone(),
                            _ => {
                                return fail!(
                                    "say which variant to switch to: {{\"to\": \"<name>\"}}"
                                );
                            }
                        }
                    }
                };
                self.switch(state, to, now_ms);
            }
            Action::Rollback {} => {
                let Some(previous) = state.previous.clone() else {
                    return fail!(
                        "nothing to roll back to: '{active}' has been active from the start"
                    );
                };
                self.switch(state, previous, now_ms);
            }
            Action::Weights { .. } => {
                return fail!(
                    "blue-green sends everything to one variant; switch with promote or rollback"
                );
            }
        }
        Ok(())
    }

    fn describe(&self, state: &State, _variants: &[VariantStats]) -> serde_json::Value {
        serde_json::json!({
            "strategy": "blue-green",
            "active": self.active(state),
            "previous": state.previous,
            "active_from": if state.active.is_some() { "admin API" } else { "configuration" },
            "switched_at_ms": state.switched_at_ms,
            "shadow_idle": self.config.shadow_idle,
        })
    }
}

modelyard_sdk::register!(router: BlueGreen);

#[cfg(test)]
mod tests {
    use super::*;

    fn variants() -> Vec<VariantStats> {
        vec![VariantStats::named("blue"), VariantStats::named("green")]
    }

    fn primary(router: &BlueGreen, state: &mut State) -> String {
        router
            .route(&RequestContext::default(), &variants(), state)
            .unwrap()
            .primary
    }

    #[test]
    fn switches_and_switches_back() {
        let router = BlueGreen::new(Config {
            active: "blue".into(),
            shadow_idle: true,
        })
        .unwrap();
        let mut state = State::default();
        let decision = router
            .route(&RequestContext::default(), &variants(), &mut state)
            .unwrap();
        assert_eq!(
            (decision.primary.as_str(), decision.shadows),
            ("blue", vec!["green".to_string()])
        );
        assert!(
            router
                .act(Action::Rollback {}, &mut state, &variants(), 1)
                .is_err()
        );
        router
            .act(Action::Promote { to: None }, &mut state, &variants(), 2)
            .unwrap();
        assert_eq!(primary(&router, &mut state), "green");
        router
            .act(Action::Rollback {}, &mut state, &variants(), 3)
            .unwrap();
        assert_eq!(primary(&router, &mut state), "blue");
        router
            .act(
                Action::Promote {
                    to: Some("green".into()),
                },
                &mut state,
                &variants(),
                4,
            )
            .unwrap();
        assert_eq!(router.describe(&state, &variants())["active"], "green");
        assert!(
            router
                .act(
                    Action::Promote {
                        to: Some("red".into())
                    },
                    &mut state,
                    &variants(),
                    5
                )
                .is_err()
        );
    }
}
