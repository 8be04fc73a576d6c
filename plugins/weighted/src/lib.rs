//! `weighted`: sends each request to a variant with probability proportional to its weight.
//! With a targeting key (a user or session id) the choice is a hash of the key, so the same
//! user stays on the same variant for as long as the weights stay; without one it follows
//! the host's per-request seed.
//!
//! ```toml
//! [endpoints.iris.router]
//! plugin = "weighted"
//! config = { weights = { stable = 90, candidate = 10 } }
//! ```

use std::collections::BTreeMap;

use modelyard_sdk::{Decision, Error, RequestContext, Router, VariantStats, fail};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Relative weight per variant name; variants not listed get no traffic.
    pub weights: BTreeMap<String, f64>,
}

pub struct Weighted {
    weights: BTreeMap<String, f64>,
}

impl Router for Weighted {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        if let Some((name, w)) = config
            .weights
            .iter()
            .find(|(_, w)| !w.is_finite() || **w < 0.0)
        {
            return fail!("weight of '{name}' is {w}; weights are finite and at least 0");
        }
        if !config.weights.values().any(|w| *w > 0.0) {
            return fail!("at least one variant needs a weight above 0");
        }
        Ok(Weighted {
            weights: config.weights,
        })
    }

    fn route(&self, ctx: &RequestContext, variants: &[VariantStats]) -> Result<Decision, Error> {
        let candidates: Vec<(&str, f64)> = variants
            .iter()
            .filter_map(|v| Some((v.name.as_str(), *self.weights.get(&v.name)?)))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        let total: f64 = candidates.iter().map(|(_, w)| w).sum();
        if candidates.is_empty() {
            return fail!("no variant of '{}' has a weight above 0", ctx.endpoint);
        }
        let (draw, why) = match &ctx.targeting_key {
            Some(key) => (mix(fnv1a(key.as_bytes())), "sticky by targeting key"),
            None => (mix(ctx.seed), "by request seed"),
        };
        // The top 53 bits give a uniform point in [0, total).
        let mut point = (draw >> 11) as f64 / (1u64 << 53) as f64 * total;
        for (name, weight) in &candidates {
            if point < *weight {
                return Ok(Decision::to(
                    *name,
                    format!("weight {weight} of {total}, {why}"),
                ));
            }
            point -= weight;
        }
        let (last, weight) = candidates[candidates.len() - 1];
        Ok(Decision::to(
            last,
            format!("weight {weight} of {total}, {why}"),
        ))
    }
}

modelyard_sdk::register!(router: Weighted);

/// FNV-1a: stable across builds and platforms, which a sticky assignment needs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: spreads nearby inputs over the whole range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(weights: &[(&str, f64)]) -> Result<Weighted, Error> {
        Weighted::new(Config {
            weights: weights.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
        })
    }

    fn variants() -> Vec<VariantStats> {
        vec![VariantStats::named("a"), VariantStats::named("b")]
    }

    #[test]
    fn traffic_follows_the_weights() {
        let r = router(&[("a", 1.0), ("b", 3.0)]).unwrap();
        let mut to_b = 0;
        for seed in 0..10_000 {
            let ctx = RequestContext {
                seed,
                ..Default::default()
            };
            if r.route(&ctx, &variants()).unwrap().primary == "b" {
                to_b += 1;
            }
        }
        assert!((7_200..7_800).contains(&to_b), "{to_b} of 10000 went to b");
    }

    #[test]
    fn a_targeting_key_is_sticky() {
        let r = router(&[("a", 1.0), ("b", 1.0)]).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..50 {
            let key = format!("user-{user}");
            let first = r
                .route(
                    &RequestContext {
                        targeting_key: Some(key.clone()),
                        seed: 1,
                        ..Default::default()
                    },
                    &variants(),
                )
                .unwrap();
            for seed in 2..20 {
                let again = r
                    .route(
                        &RequestContext {
                            targeting_key: Some(key.clone()),
                            seed,
                            ..Default::default()
                        },
                        &variants(),
                    )
                    .unwrap();
                assert_eq!(again.primary, first.primary, "{key} moved");
            }
            seen.insert(first.primary);
        }
        assert_eq!(seen.len(), 2, "50 users should land on both variants");
    }

    #[test]
    fn zero_weight_gets_nothing_and_bad_configs_are_refused() {
        let r = router(&[("a", 0.0), ("b", 2.0)]).unwrap();
        for seed in 0..100 {
            let ctx = RequestContext {
                seed,
                ..Default::default()
            };
            assert_eq!(r.route(&ctx, &variants()).unwrap().primary, "b");
        }
        assert!(router(&[("a", -1.0)]).is_err());
        assert!(router(&[("a", 0.0)]).is_err());
        let only_c = router(&[("c", 1.0)]).unwrap();
        assert!(
            only_c
                .route(&RequestContext::default(), &variants())
                .is_err()
        );
    }
}
