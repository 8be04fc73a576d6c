//! `canary`: sends a small share of traffic to a new variant and raises it in steps while
//! the canary behaves; when its error rate or p99 latency goes past a bound relative to the
//! stable variant, it rolls back to 0 % on its own. Operators promote (straight to 100 %)
//! or roll back by hand through the admin API. With a targeting key the split is sticky:
//! a user in the canary stays in it as the share grows.
//!
//! ```toml
//! [endpoints.iris-canary]
//! variants = { stable = "iris@2", canary = "iris@1" }
//! default_variant = "stable"
//! [endpoints.iris-canary.router]
//! plugin = "canary"
//! config = { stable = "stable", canary = "canary", steps = [5, 25, 50, 100], step_requests = 500, max_error_rate_increase = 0.02, max_p99_ratio = 2.0 }
//! ```
//!
//! A step ends after `step_requests` requests to the endpoint or `step_seconds` seconds,
//! whichever comes first (give at least one); passing the last step promotes the canary.

use modelyard_sdk::{Action, Decision, Error, RequestContext, Router, VariantStats, fail};

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub stable: String,
    pub canary: String,
    /// The canary's share in percent at each step, rising.
    pub steps: Vec<f64>,
    pub step_requests: Option<u64>,
    pub step_seconds: Option<u64>,
    /// How far the canary's error rate may exceed the stable one's (0.02 = 2 points).
    #[serde(default = "default_error_increase")]
    pub max_error_rate_increase: f64,
    /// How many times the stable p99 latency the canary's may reach …
    #[serde(default = "default_p99_ratio")]
    pub max_p99_ratio: f64,
    /// … counted only once it is also this many microseconds above it: on sub-millisecond
    /// models a ratio alone trips on scheduling jitter.
    #[serde(default = "default_p99_slack")]
    pub min_p99_increase_us: u64,
    /// Canary requests needed before the bounds are judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

fn default_error_increase() -> f64 {
    0.01
}
fn default_p99_ratio() -> f64 {
    2.0
}
fn default_p99_slack() -> u64 {
    1_000
}
fn default_min_requests() -> u64 {
    20
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    Progressing,
    Promoted,
    RolledBack,
}

/// Counters when the rollout started: the bounds judge what happened since.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Baseline {
    pub canary_requests: u64,
    pub canary_errors: u64,
    pub stable_requests: u64,
    pub stable_errors: u64,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct State {
    pub status: Status,
    /// Index into `steps`.
    pub step: usize,
    /// When the current step began, and the endpoint's request count then; `None` until
    /// the first request.
    pub step_started: Option<(u64, u64)>,
    pub baseline: Baseline,
    /// Why the rollout is where it is.
    pub reason: String,
}

pub struct Canary {
    config: Config,
}

/// Requests and errors of the canary and the stable variant since the rollout began.
struct Since {
    canary: (u64, u64),
    stable: (u64, u64),
}

fn rate((requests, errors): (u64, u64)) -> f64 {
    if requests == 0 {
        0.0
    } else {
        errors as f64 / requests as f64
    }
}

impl Canary {
    fn pair<'a>(
        &self,
        variants: &'a [VariantStats],
    ) -> Result<(&'a VariantStats, &'a VariantStats), Error> {
        Ok((
            VariantStats::find(variants, &self.config.stable)?,
            VariantStats::find(variants, &self.config.canary)?,
        ))
    }

    fn since(state: &State, stable: &VariantStats, canary: &VariantStats) -> Since {
        let b = state.baseline;
        Since {
            canary: (
                canary.requests.saturating_sub(b.canary_requests),
                canary.errors.saturating_sub(b.canary_errors),
            ),
            stable: (
                stable.requests.saturating_sub(b.stable_requests),
                stable.errors.saturating_sub(b.stable_errors),
            ),
        }
    }

    /// Why the canary must go back, if it must.
    fn breach(
        &self,
        state: &State,
        stable: &VariantStats,
        canary: &VariantStats,
    ) -> Option<String> {
        let since = Self::since(state, stable, canary);
        if since.canary.0 < self.config.min_requests {
            return None;
        }
        let (c, s) = (rate(since.canary), rate(since.stable));
        if c - s > self.config.max_error_rate_increase {
            return Some(format!(
                "canary error rate {c:.3} exceeds stable {s:.3} by more than {}",
                self.config.max_error_rate_increase
            ));
        }
        let bound = self.config.max_p99_ratio * stable.latency_p99_us.max(1) as f64;
        let slower = canary.latency_p99_us.saturating_sub(stable.latency_p99_us);
        if since.stable.0 >= self.config.min_requests
            && canary.latency_p99_us as f64 > bound
            && slower > self.config.min_p99_increase_us
        {
            return Some(format!(
                "canary p99 {} µs exceeds {} × stable p99 {} µs",
                canary.latency_p99_us, self.config.max_p99_ratio, stable.latency_p99_us
            ));
        }
        None
    }

    fn share(&self, state: &State) -> f64 {
        match state.status {
            Status::Progressing => self.config.steps.get(state.step).copied().unwrap_or(100.0),
            Status::Promoted => 100.0,
            Status::RolledBack => 0.0,
        }
    }

    /// Moves the rollout on: rollback on a breach, the next step when this one is done.
    fn advance(
        &self,
        state: &mut State,
        stable: &VariantStats,
        canary: &VariantStats,
        now_ms: u64,
    ) {
        let total = stable.requests + canary.requests;
        let Some((started_ms, started_requests)) = state.step_started else {
            state.step_started = Some((now_ms, total));
            state.baseline = Baseline {
                canary_requests: canary.requests,
                canary_errors: canary.errors,
                stable_requests: stable.requests,
                stable_errors: stable.errors,
            };
            state.reason = format!("started at {}%", self.share(state));
            return;
        };
        if state.status != Status::Progressing {
            return;
        }
        if let Some(why) = self.breach(state, stable, canary) {
            modelyard_sdk::log(modelyard_sdk::Level::Warn, &format!("rolling back: {why}"));
            state.status = Status::RolledBack;
            state.reason = format!("rolled back automatically: {why}");
            return;
        }
        let by_requests = self
            .config
            .step_requests
            .is_some_and(|n| total.saturating_sub(started_requests) >= n);
        let by_time = self
            .config
            .step_seconds
            .is_some_and(|s| now_ms.saturating_sub(started_ms) >= s.saturating_mul(1000));
        if by_requests || by_time {
            state.step += 1;
            state.step_started = Some((now_ms, total));
            if state.step >= self.config.steps.len() {
                state.status = Status::Promoted;
                state.reason = "promoted: every step passed within bounds".to_string();
            } else {
                state.reason = format!("step {} at {}%", state.step + 1, self.share(state));
            }
        }
    }
}

impl Router for Canary {
    type Config = Config;
    type State = State;

    fn new(config: Config) -> Result<Self, Error> {
        if config.stable == config.canary {
            return fail!("stable and canary are both '{}'", config.stable);
        }
        if config.steps.is_empty() {
            return fail!(
                "steps is empty; give the canary's share per step, e.g. [5, 25, 50, 100]"
            );
        }
        if let Some(bad) = config.steps.iter().find(|s| !(0.0..=100.0).contains(*s)) {
            return fail!("step {bad} is not a percentage between 0 and 100");
        }
        if config.steps.windows(2).any(|w| w[1] < w[0]) {
            return fail!("steps must rise: {:?}", config.steps);
        }
        if config.step_requests == Some(0) || config.step_seconds == Some(0) {
            return fail!("a step of 0 requests or 0 seconds would skip straight to the end");
        }
        if config.step_requests.is_none() && config.step_seconds.is_none() {
            return fail!("say when a step ends: step_requests, step_seconds or both");
        }
        if config.max_error_rate_increase < 0.0 || config.max_p99_ratio < 1.0 {
            return fail!(
                "max_error_rate_increase must be at least 0 and max_p99_ratio at least 1"
            );
        }
        Ok(Canary { config })
    }

    fn route(
        &self,
        ctx: &RequestContext,
        variants: &[VariantStats],
        state: &mut State,
    ) -> Result<Decision, Error> {
        let (stable, canary) = self.pair(variants)?;
        self.advance(state, stable, canary, ctx.now_ms);
        let share = self.share(state);
        let (draw, how) = ctx.draw();
        let (variant, side) = if draw * 100.0 < share {
            (&self.config.canary, "canary")
        } else {
            (&self.config.stable, "stable")
        };
        let status = match state.status {
            Status::Progressing => format!("step {}/{}", state.step + 1, self.config.steps.len()),
            Status::Promoted => "promoted".to_string(),
            Status::RolledBack => "rolled back".to_string(),
        };
        Ok(Decision::to(
            variant.clone(),
            format!("{side}: canary {status} at {share}%, {how}"),
        ))
    }

    fn act(
        &self,
        action: Action,
        state: &mut State,
        variants: &[VariantStats],
        now_ms: u64,
    ) -> Result<(), Error> {
        let (stable, canary) = self.pair(variants)?;
        match action {
            Action::Promote { to } => {
                if let Some(to) = to.filter(|t| *t != self.config.canary) {
                    return fail!("a canary promotes '{}', not '{to}'", self.config.canary);
                }
                state.status = Status::Promoted;
                state.reason = "promoted by an operator".to_string();
            }
            Action::Rollback {} => {
                state.status = Status::RolledBack;
                state.reason = "rolled back by an operator".to_string();
            }
            Action::Weights { .. } => {
                return fail!(
                    "a canary moves in its configured steps; promote, roll back, or edit the steps"
                );
            }
        }
        if state.step_started.is_none() {
            state.step_started = Some((now_ms, stable.requests + canary.requests));
        }
        Ok(())
    }

    fn describe(&self, state: &State, variants: &[VariantStats]) -> serde_json::Value {
        let judged = self.pair(variants).ok().map(|(stable, canary)| {
            let since = Self::since(state, stable, canary);
            serde_json::json!({
                "canary_requests": since.canary.0, "canary_error_rate": rate(since.canary),
                "stable_requests": since.stable.0, "stable_error_rate": rate(since.stable),
                "canary_p99_us": canary.latency_p99_us, "stable_p99_us": stable.latency_p99_us,
            })
        });
        serde_json::json!({
            "strategy": "canary",
            "stable": self.config.stable,
            "canary": self.config.canary,
            "status": state.status,
            "step": state.step + 1,
            "steps": self.config.steps,
            "share_percent": self.share(state),
            "reason": state.reason,
            "since_start": judged,
        })
    }
}

modelyard_sdk::register!(router: Canary);

#[cfg(test)]
mod tests {
    use super::*;

    fn canary() -> Canary {
        Canary::new(Config {
            stable: "stable".into(),
            canary: "canary".into(),
            steps: vec![10.0, 50.0, 100.0],
            step_requests: Some(100),
            step_seconds: None,
            max_error_rate_increase: 0.05,
            max_p99_ratio: 2.0,
            min_p99_increase_us: 1_000,
            min_requests: 20,
        })
        .unwrap()
    }

    /// Plays `n` requests, counting them as the host would; `canary_fails` makes every
    /// canary answer an error. Returns how many went to the canary.
    fn play(
        router: &Canary,
        state: &mut State,
        arms: &mut [VariantStats],
        n: u64,
        canary_fails: bool,
    ) -> u64 {
        let mut to_canary = 0;
        for seed in 0..n {
            let ctx = RequestContext {
                seed: seed * 7919 + arms[0].requests,
                now_ms: 1_000,
                ..Default::default()
            };
            let pick = router.route(&ctx, arms, state).unwrap().primary;
            let arm = arms.iter_mut().find(|a| a.name == pick).unwrap();
            arm.requests += 1;
            if pick == "canary" {
                to_canary += 1;
                arm.errors += u64::from(canary_fails);
            }
        }
        to_canary
    }

    fn arms() -> Vec<VariantStats> {
        vec![VariantStats::named("stable"), VariantStats::named("canary")]
    }

    #[test]
    fn a_healthy_canary_climbs_every_step_to_promotion() {
        let router = canary();
        let (mut state, mut arms) = (State::default(), arms());
        // A step ends on the request after 100 have been counted.
        let first = play(&router, &mut state, &mut arms, 100, false);
        assert!((3..=20).contains(&first), "{first} of 100 at 10%");
        assert_eq!(state.step, 0);
        let second = play(&router, &mut state, &mut arms, 100, false);
        assert!((35..=65).contains(&second), "{second} of 100 at 50%");
        assert_eq!(state.step, 1);
        play(&router, &mut state, &mut arms, 101, false);
        assert_eq!(state.status, Status::Promoted);
        assert_eq!(play(&router, &mut state, &mut arms, 50, false), 50);
    }

    #[test]
    fn a_failing_canary_rolls_back_on_its_own_and_stays_back() {
        let router = canary();
        let (mut state, mut arms) = (State::default(), arms());
        play(&router, &mut state, &mut arms, 100, false);
        play(&router, &mut state, &mut arms, 100, true);
        assert_eq!(state.status, Status::RolledBack, "{state:?}");
        assert!(state.reason.contains("error rate"), "{}", state.reason);
        assert_eq!(play(&router, &mut state, &mut arms, 200, false), 0);
    }

    #[test]
    fn a_slow_canary_rolls_back() {
        let router = canary();
        let (mut state, mut arms) = (State::default(), arms());
        play(&router, &mut state, &mut arms, 50, false);
        // 2.5 times slower but only 150 µs: jitter, not a regression.
        arms[0].latency_p99_us = 100;
        arms[1].latency_p99_us = 250;
        arms[1].requests += 20;
        play(&router, &mut state, &mut arms, 1, false);
        assert_eq!(state.status, Status::Progressing);
        arms[0].latency_p99_us = 1_000;
        arms[1].latency_p99_us = 2_500;
        arms[1].requests += 20;
        play(&router, &mut state, &mut arms, 1, false);
        assert_eq!(state.status, Status::RolledBack);
        assert!(state.reason.contains("p99"), "{}", state.reason);
    }

    #[test]
    fn operators_promote_and_roll_back() {
        let router = canary();
        let (mut state, mut arms) = (State::default(), arms());
        router
            .act(Action::Promote { to: None }, &mut state, &arms, 5)
            .unwrap();
        assert_eq!(play(&router, &mut state, &mut arms, 20, false), 20);
        router
            .act(Action::Rollback {}, &mut state, &arms, 6)
            .unwrap();
        assert_eq!(play(&router, &mut state, &mut arms, 20, false), 0);
        assert!(
            router
                .act(
                    Action::Promote {
                        to: Some("stable".into())
                    },
                    &mut state,
                    &arms,
                    7
                )
                .is_err()
        );
        assert_eq!(router.describe(&state, &arms)["status"], "rolled-back");
    }

    #[test]
    fn time_ends_a_step_too() {
        let router = Canary::new(Config {
            step_requests: None,
            step_seconds: Some(60),
            ..canary().config
        })
        .unwrap();
        let (mut state, arms) = (State::default(), arms());
        let at = |ms| RequestContext {
            now_ms: ms,
            ..Default::default()
        };
        router.route(&at(1_000), &arms, &mut state).unwrap();
        router.route(&at(30_000), &arms, &mut state).unwrap();
        assert_eq!(state.step, 0);
        router.route(&at(61_000), &arms, &mut state).unwrap();
        assert_eq!(state.step, 1);
    }

    #[test]
    fn bad_configs_are_refused() {
        let base = canary().config;
        for bad in [
            Config {
                steps: vec![],
                ..base.clone()
            },
            Config {
                steps: vec![50.0, 10.0],
                ..base.clone()
            },
            Config {
                steps: vec![150.0],
                ..base.clone()
            },
            Config {
                step_requests: None,
                ..base.clone()
            },
            Config {
                canary: "stable".into(),
                ..base.clone()
            },
        ] {
            assert!(Canary::new(bad).is_err());
        }
    }
}
