//! `bandit`: learns which variant earns the most reward and sends more traffic there,
//! exploring the others as it goes. Rewards are what clients send to
//! `POST /v2/models/{endpoint}/feedback`; the host hands each variant's reward count and sum
//! to every call, and the per-request seed drives every random choice, so a decision is
//! reproducible.
//!
//! ```toml
//! [endpoints.iris-bandit]
//! variants = { a = "iris@1", b = "iris@2" }
//! router = { plugin = "bandit", config = { algorithm = "thompson" } }   # or "ucb1",
//! # or { algorithm = "epsilon-greedy", epsilon = 0.1 }; rewards = "bernoulli" (0/1, the
//! # default) or "gaussian" (any number)
//! ```

use modelyard_sdk::{Decision, Error, RequestContext, Router, VariantStats, fail};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Beta, Distribution, Normal};

#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    EpsilonGreedy,
    Ucb1,
    Thompson,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rewards {
    /// 0 or 1 per answer: Thompson samples Beta posteriors.
    #[default]
    Bernoulli,
    /// Any number: Thompson samples Normal posteriors of the mean.
    Gaussian,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub algorithm: Algorithm,
    /// Share of requests explored at random (epsilon-greedy only).
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    #[serde(default)]
    pub rewards: Rewards,
}

fn default_epsilon() -> f64 {
    0.1
}

pub struct Bandit {
    config: Config,
}

impl Router for Bandit {
    type Config = Config;
    type State = ();

    fn new(config: Config) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&config.epsilon) {
            return fail!(
                "epsilon is {}; it is a share between 0 and 1",
                config.epsilon
            );
        }
        Ok(Bandit { config })
    }

    fn route(
        &self,
        ctx: &RequestContext,
        variants: &[VariantStats],
        _state: &mut (),
    ) -> Result<Decision, Error> {
        if variants.is_empty() {
            return fail!("endpoint '{}' has no variants", ctx.endpoint);
        }
        let mut rng = SmallRng::seed_from_u64(ctx.seed);
        let mean = |v: &VariantStats| v.reward_sum / v.reward_count.max(1) as f64;
        let (index, reason) = match self.config.algorithm {
            Algorithm::EpsilonGreedy => {
                if rng.random::<f64>() < self.config.epsilon {
                    (rng.random_range(0..variants.len()), "exploring".to_string())
                } else {
                    let best = argmax(variants.iter().map(mean));
                    (
                        best,
                        format!("best mean reward {:.3}", mean(&variants[best])),
                    )
                }
            }
            Algorithm::Ucb1 => match variants.iter().position(|v| v.reward_count == 0) {
                Some(untried) => (untried, "no reward yet".to_string()),
                None => {
                    let total: u64 = variants.iter().map(|v| v.reward_count).sum();
                    let bound = |v: &VariantStats| {
                        mean(v) + (2.0 * (total as f64).ln() / v.reward_count as f64).sqrt()
                    };
                    let best = argmax(variants.iter().map(bound));
                    (best, format!("upper bound {:.3}", bound(&variants[best])))
                }
            },
            Algorithm::Thompson => {
                let mut samples = Vec::with_capacity(variants.len());
                for v in variants {
                    samples.push(self.posterior_sample(v, &mut rng)?);
                }
                let best = argmax(samples.iter().copied());
                (best, format!("posterior sample {:.3}", samples[best]))
            }
        };
        Ok(Decision::to(variants[index].name.clone(), reason))
    }

    /// Per arm: pulls, mean reward and, for Thompson, the posterior it samples from.
    fn describe(&self, _state: &(), variants: &[VariantStats]) -> serde_json::Value {
        let arms: Vec<serde_json::Value> = variants
            .iter()
            .map(|v| {
                let n = v.reward_count as f64;
                let mean = (v.reward_count > 0).then(|| v.reward_sum / n);
                let posterior = match (self.config.algorithm, self.config.rewards) {
                    (Algorithm::Thompson, Rewards::Bernoulli) => {
                        let successes = v.reward_sum.clamp(0.0, n);
                        serde_json::json!({"beta": {"alpha": 1.0 + successes, "beta": 1.0 + n - successes}})
                    }
                    (Algorithm::Thompson, Rewards::Gaussian) => serde_json::json!({"normal": {
                        "mean": mean.unwrap_or(0.0), "sd": 1.0 / (n + 1.0).sqrt()
                    }}),
                    _ => serde_json::Value::Null,
                };
                serde_json::json!({
                    "variant": v.name, "pulls": v.reward_count, "mean_reward": mean,
                    "posterior": posterior,
                })
            })
            .collect();
        serde_json::json!({
            "strategy": "bandit",
            "algorithm": self.config.algorithm,
            "epsilon": (self.config.algorithm == Algorithm::EpsilonGreedy).then_some(self.config.epsilon),
            "arms": arms,
        })
    }
}

impl Bandit {
    fn posterior_sample(&self, v: &VariantStats, rng: &mut SmallRng) -> Result<f64, Error> {
        let n = v.reward_count as f64;
        match self.config.rewards {
            Rewards::Bernoulli => {
                let successes = v.reward_sum.clamp(0.0, n);
                let beta = Beta::new(1.0 + successes, 1.0 + n - successes)
                    .map_err(|e| Error::new(format!("variant '{}': {e}", v.name)))?;
                Ok(beta.sample(rng))
            }
            Rewards::Gaussian => {
                let mean = if n > 0.0 { v.reward_sum / n } else { 0.0 };
                let normal = Normal::new(mean, 1.0 / (n + 1.0).sqrt())
                    .map_err(|e| Error::new(format!("variant '{}': {e}", v.name)))?;
                Ok(normal.sample(rng))
            }
        }
    }
}

modelyard_sdk::register!(router: Bandit);

/// The best arm: the first of equals (the SDK's one tie rule); the first arm when every
/// figure is NaN.
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    modelyard_sdk::argmax(values).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays `rounds` requests against two arms that pay 1 with probabilities 0.2 and 0.8,
    /// as the host would count them; returns how often the better arm was chosen in the
    /// last 100 rounds.
    fn simulate(config: Config, rounds: u64) -> usize {
        let bandit = Bandit::new(config).unwrap();
        let mut arms = vec![VariantStats::named("worse"), VariantStats::named("better")];
        let pay = [0.2, 0.8];
        let mut world = SmallRng::seed_from_u64(42);
        let mut better_late = 0;
        for round in 0..rounds {
            let ctx = RequestContext {
                seed: round,
                ..Default::default()
            };
            let pick = bandit.route(&ctx, &arms, &mut ()).unwrap().primary;
            let i = arms.iter().position(|a| a.name == pick).unwrap();
            let reward = if world.random::<f64>() < pay[i] {
                1.0
            } else {
                0.0
            };
            arms[i].reward_count += 1;
            arms[i].reward_sum += reward;
            if round >= rounds - 100 && i == 1 {
                better_late += 1;
            }
        }
        better_late
    }

    #[test]
    fn every_algorithm_converges_on_the_better_arm() {
        for algorithm in [
            Algorithm::EpsilonGreedy,
            Algorithm::Ucb1,
            Algorithm::Thompson,
        ] {
            let better = simulate(
                Config {
                    algorithm,
                    epsilon: 0.1,
                    rewards: Rewards::Bernoulli,
                },
                400,
            );
            assert!(
                better >= 75,
                "{algorithm:?}: {better} of the last 100 to the better arm"
            );
        }
        let gaussian = simulate(
            Config {
                algorithm: Algorithm::Thompson,
                epsilon: 0.1,
                rewards: Rewards::Gaussian,
            },
            400,
        );
        assert!(gaussian >= 75, "gaussian thompson: {gaussian}");
    }

    #[test]
    fn the_same_seed_gives_the_same_decision() {
        let bandit = Bandit::new(Config {
            algorithm: Algorithm::Thompson,
            epsilon: 0.1,
            rewards: Rewards::Bernoulli,
        })
        .unwrap();
        let arms = vec![VariantStats::named("a"), VariantStats::named("b")];
        for seed in 0..20 {
            let ctx = RequestContext {
                seed,
                ..Default::default()
            };
            assert_eq!(
                bandit.route(&ctx, &arms, &mut ()).unwrap(),
                bandit.route(&ctx, &arms, &mut ()).unwrap()
            );
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(
            Bandit::new(Config {
                algorithm: Algorithm::EpsilonGreedy,
                epsilon: 1.5,
                rewards: Rewards::Bernoulli
            })
            .is_err()
        );
    }
}
