//! `weighted`: sends each request to a variant with probability proportional to its weight
//! — an A/B test, or a fixed canary share. With a targeting key (a user or session id) the
//! choice is a hash of the key, so the same user stays on the same variant for as long as
//! the weights stay; without one it follows the host's per-request seed. Variants listed
//! under `shadows` also see every request, in the shadow. Operators change the weights at
//! run time with `POST /admin/endpoints/{e}/weights`; editing the configuration brings the
//! configured weights back.
//!
//! ```toml
//! [endpoints.iris.router]
//! plugin = "weighted"
//! config = { weights = { stable = 90, candidate = 10 }, shadows = ["next"] }
//! ```

use std::collections::BTreeMap;

use modelyard_sdk::{Action, Decision, Error, RequestContext, Router, VariantStats, fail};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Relative weight per variant name; variants not listed get no traffic.
    pub weights: BTreeMap<String, f64>,
    /// Variants that get a copy of every request after the answer has gone.
    #[serde(default)]
    pub shadows: Vec<String>,
}

/// Weights an operator set through the admin API, in force until the configuration changes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BTreeMap<String, f64>>,
}

pub struct Weighted {
    weights: BTreeMap<String, f64>,
    shadows: Vec<String>,
}

fn check(weights: &BTreeMap<String, f64>) -> Result<(), Error> {
    if let Some((name, w)) = weights.iter().find(|(_, w)| !w.is_finite() || **w < 0.0) {
        return fail!("weight of '{name}' is {w}; weights are finite and at least 0");
    }
    if !weights.values().any(|w| *w > 0.0) {
        return fail!("at least one variant needs a weight above 0");
    }
    Ok(())
}

impl Router for Weighted {
    type Config = Config;
    type State = State;

    fn new(config: Config) -> Result<Self, Error> {
        check(&config.weights)?;
        Ok(Weighted {
            weights: config.weights,
            shadows: config.shadows,
        })
    }

    fn route(
        &self,
        ctx: &RequestContext,
        variants: &[VariantStats],
        state: &mut State,
    ) -> Result<Decision, Error> {
        let weights = state.weights.as_ref().unwrap_or(&self.weights);
        let candidates: Vec<(&str, f64)> = variants
            .iter()
            .filter_map(|v| Some((v.name.as_str(), *weights.get(&v.name)?)))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        let total: f64 = candidates.iter().map(|(_, w)| w).sum();
        let Some(&(last, last_weight)) = candidates.last() else {
            return fail!("no variant of '{}' has a weight above 0", ctx.endpoint);
        };
        let (draw, why) = ctx.draw();
        let mut point = draw * total;
        let (name, weight) = candidates
            .iter()
            .find(|(_, weight)| {
                let inside = point < *weight;
                point -= weight;
                inside
            })
            .copied()
            .unwrap_or((last, last_weight));
        Ok(Decision {
            shadows: self
                .shadows
                .iter()
                .filter(|s| s.as_str() != name)
                .cloned()
                .collect(),
            ..Decision::to(name, format!("weight {weight} of {total}, {why}"))
        })
    }

    fn act(
        &self,
        action: Action,
        state: &mut State,
        variants: &[VariantStats],
        _now_ms: u64,
    ) -> Result<(), Error> {
        let Action::Weights { weights } = action else {
            return fail!(
                "a weighted split takes new weights (POST …/weights), not '{}'",
                action.name()
            );
        };
        check(&weights)?;
        for name in weights.keys() {
            VariantStats::find(variants, name)?;
        }
        state.weights = Some(weights);
        Ok(())
    }

    fn describe(&self, state: &State, _variants: &[VariantStats]) -> serde_json::Value {
        serde_json::json!({
            "strategy": "weighted",
            "weights": state.weights.as_ref().unwrap_or(&self.weights),
            "weights_from": if state.weights.is_some() { "admin API" } else { "configuration" },
            "shadows": self.shadows,
        })
    }
}

modelyard_sdk::register!(router: Weighted);

#[cfg(test)]
mod tests {
    use super::*;

    fn router(weights: &[(&str, f64)]) -> Result<Weighted, Error> {
        Weighted::new(Config {
            weights: weights.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            shadows: vec!["b".to_string()],
        })
    }

    fn variants() -> Vec<VariantStats> {
        vec![VariantStats::named("a"), VariantStats::named("b")]
    }

    fn primary(r: &Weighted, ctx: &RequestContext, state: &mut State) -> String {
        r.route(ctx, &variants(), state).unwrap().primary
    }

    #[test]
    fn traffic_follows_the_weights() {
        let r = router(&[("a", 1.0), ("b", 3.0)]).unwrap();
        let mut state = State::default();
        let to_b = (0..10_000)
            .filter(|&seed| {
                let ctx = RequestContext {
                    seed,
                    ..Default::default()
                };
                primary(&r, &ctx, &mut state) == "b"
            })
            .count();
        assert!((7_200..7_800).contains(&to_b), "{to_b} of 10000 went to b");
    }

    #[test]
    fn a_targeting_key_is_sticky() {
        let r = router(&[("a", 1.0), ("b", 1.0)]).unwrap();
        let mut state = State::default();
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..50 {
            let ctx = |seed| RequestContext {
                targeting_key: Some(format!("user-{user}")),
                seed,
                ..Default::default()
            };
            let first = primary(&r, &ctx(1), &mut state);
            for seed in 2..20 {
                assert_eq!(
                    primary(&r, &ctx(seed), &mut state),
                    first,
                    "user {user} moved"
                );
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 2, "50 users should land on both variants");
    }

    #[test]
    fn shadows_never_include_the_primary() {
        let r = router(&[("a", 1.0), ("b", 1.0)]).unwrap();
        let mut state = State::default();
        for seed in 0..50 {
            let ctx = RequestContext {
                seed,
                ..Default::default()
            };
            let decision = r.route(&ctx, &variants(), &mut state).unwrap();
            let expected: Vec<String> = if decision.primary == "b" {
                vec![]
            } else {
                vec!["b".to_string()]
            };
            assert_eq!(decision.shadows, expected);
        }
    }

    #[test]
    fn operators_override_the_weights_until_the_configuration_changes() {
        let r = router(&[("a", 1.0), ("b", 0.0)]).unwrap();
        let mut state = State::default();
        let weights = BTreeMap::from([("a".to_string(), 0.0), ("b".to_string(), 1.0)]);
        r.act(Action::Weights { weights }, &mut state, &variants(), 0)
            .unwrap();
        assert_eq!(primary(&r, &RequestContext::default(), &mut state), "b");
        let unknown = BTreeMap::from([("zz".to_string(), 1.0)]);
        assert!(
            r.act(
                Action::Weights { weights: unknown },
                &mut state,
                &variants(),
                0
            )
            .is_err()
        );
        assert!(
            r.act(Action::Rollback {}, &mut state, &variants(), 0)
                .is_err()
        );
        assert_eq!(r.describe(&state, &variants())["weights"]["b"], 1.0);
    }

    #[test]
    fn zero_weight_gets_nothing_and_bad_configs_are_refused() {
        let r = router(&[("a", 0.0), ("b", 2.0)]).unwrap();
        let mut state = State::default();
        for seed in 0..100 {
            let ctx = RequestContext {
                seed,
                ..Default::default()
            };
            assert_eq!(primary(&r, &ctx, &mut state), "b");
        }
        assert!(router(&[("a", -1.0)]).is_err());
        assert!(router(&[("a", 0.0)]).is_err());
        let only_c = router(&[("c", 1.0)]).unwrap();
        assert!(
            only_c
                .route(&RequestContext::default(), &variants(), &mut state)
                .is_err()
        );
    }
}
