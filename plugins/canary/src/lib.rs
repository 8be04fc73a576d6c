//! `canary`: sends a small share of traffic to a new variant and raises it in steps while
//! the canary behaves; when repeated analyses find it worse than the stable variant, it
//! rolls back to 0 % on its own. Operators promote (straight to 100 %) or roll back by hand
//! through the admin API. With a targeting key the split is sticky: a user in the canary
//! stays in it as the share grows.
//!
//! ```toml
//! [endpoints.iris-canary]
//! variants = { stable = "iris@2", canary = "iris@1" }
//! default_variant = "stable"
//! [endpoints.iris-canary.router]
//! plugin = "canary"
//! config = { stable = "stable", canary = "canary", steps = [5, 25, 50, 100], step_requests = 2000 }
//! ```
//!
//! A step ends after `step_requests` requests to the endpoint or `step_seconds` seconds,
//! whichever comes first (give at least one); passing the last step promotes the canary.
//!
//! # Analysis
//!
//! As in Kayenta, Argo Rollouts and Flagger, the canary is compared with the stable variant
//! since the rollout began by statistical tests, so that a busy hour or a cold cache, which
//! slows both, is not blamed on the canary (at a small share the canary's latest answers
//! span longer than the stable variant's; the latency margin below absorbs a change of
//! load between them). An analysis runs
//! each time the canary has answered another `analysis_interval` requests (default 10),
//! once each variant has answered `min_requests` (50) since the rollout began; the
//! judgement covers every step so far, so a short first step is judged in the next. Both
//! tests are one-sided (is the canary worse?) at alpha = 1 − `confidence` (0.999):
//!
//! - **error rate** (Fisher's exact test on the requests and errors since the start):
//!   fails when the canary's error rate exceeds the stable one's by more than
//!   `max_error_rate_increase` (0.01, one point) and the test says that is not chance.
//! - **latency** (Mann-Whitney U on the latest `window` (200) successful latencies of each
//!   variant since the start): fails when the test finds the canary slower and its median
//!   exceeds the stable one's by more than `max_latency_increase_us` (500) and by more than
//!   (`max_latency_ratio` (1.5) − 1) × the stable median. A rank test, because latencies
//!   are heavy-tailed: a few scheduling stalls move a mean or a p99 of 200 samples, not
//!   ranks. The margin, because with a few hundred samples the test finds any difference
//!   significant, a 90 µs and a 110 µs model among them; it says how much slower is a
//!   regression.
//!
//! An analysis fails when either metric fails; `failure_limit` (3) failing analyses in a
//! row roll the canary back, so that one slow burst or one unlucky window does not. Each
//! failing analysis is logged at info, the rollback at warn with the test, the figures
//! and the p-values; the state keeps the last failing verdict, and `describe` shows it
//! beside an analysis of the figures as they stand.

use std::sync::atomic::{AtomicU64, Ordering};

use modelyard_sdk::{
    Action, Decision, Error, Level, RECENT_LATENCIES, RequestContext, Router, VariantStats, fail,
};
use statrs::distribution::{ContinuousCDF, DiscreteCDF, Hypergeometric, Normal};

const FISHER: &str = "Fisher's exact test, one-sided";
const MANN_WHITNEY: &str = "Mann-Whitney U, one-sided, normal approximation";

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub stable: String,
    pub canary: String,
    /// The canary's share in percent at each step, rising.
    pub steps: Vec<f64>,
    pub step_requests: Option<u64>,
    pub step_seconds: Option<u64>,
    /// Requests each variant must have answered since the rollout began before an analysis
    /// judges them: fewer say too little either way.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// How many of each variant's latest successful latencies since the rollout began the
    /// latency test compares: 10 to 256, the most the host keeps.
    #[serde(default = "default_window")]
    pub window: usize,
    /// How sure an analysis must be that the canary is worse before a metric fails: both
    /// tests are one-sided at alpha = 1 − confidence. Between 0.5 and 1. Every analysis
    /// looks again at much the same counts, so a rollout's chance of a false rollback is
    /// well above alpha: with 0.5 % errors on both sides, some 1.5 % of 2,000-request
    /// rollouts at 0.99, none in 1,000 at 0.999 (the default), which catches +5 points of
    /// errors a few requests later.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// Canary requests between analyses: each sorts up to 2 × `window` latencies, too much
    /// to do on every request.
    #[serde(default = "default_analysis_interval")]
    pub analysis_interval: u64,
    /// Failing analyses in a row that roll the canary back.
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
    /// How far the canary's error rate may exceed the stable one's (0.01 = 1 point) before
    /// a significant excess fails.
    #[serde(default = "default_error_increase")]
    pub max_error_rate_increase: f64,
    /// How many microseconds the canary's median latency may exceed the stable one's …
    #[serde(default = "default_latency_increase")]
    pub max_latency_increase_us: u64,
    /// … or how many times the stable median it may reach, whichever allows more: the fixed
    /// margin keeps jitter on sub-millisecond models from counting, the ratio scales to
    /// slow ones.
    #[serde(default = "default_latency_ratio")]
    pub max_latency_ratio: f64,
}

fn default_min_requests() -> u64 {
    50
}
fn default_window() -> usize {
    200
}
fn default_confidence() -> f64 {
    0.999
}
fn default_analysis_interval() -> u64 {
    10
}
fn default_failure_limit() -> u32 {
    3
}
fn default_error_increase() -> f64 {
    0.01
}
fn default_latency_increase() -> u64 {
    500
}
fn default_latency_ratio() -> f64 {
    1.5
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    Progressing,
    Promoted,
    RolledBack,
}

/// Counters when the rollout started: the analyses judge what happened since.
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
    /// Failing analyses in a row.
    pub failures: u32,
    /// The canary's requests since the start at the last failure counted: instances serving
    /// at the same time may each analyse the same interval, and that is one failure, not
    /// two.
    pub last_failed_at: u64,
    /// The last failing analysis (the rollback's, after one). Passing ones are not kept: the
    /// host audits every change of state, and a healthy canary would change it every
    /// `analysis_interval` requests.
    pub verdict: Option<Verdict>,
}

/// One analysis: the canary against the stable variant on each metric.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// The canary's requests since the rollout began when it was taken.
    pub canary_requests: u64,
    pub metrics: Vec<Judgement>,
}

impl Verdict {
    pub fn failed(&self) -> bool {
        self.metrics.iter().any(|m| m.failed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    ErrorRate,
    Latency,
}

/// One metric's test.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Judgement {
    pub metric: Metric,
    pub test: String,
    /// The canary's error rate, or its median latency in µs.
    pub canary: f64,
    pub stable: f64,
    /// How far `canary` may exceed `stable` before a significant difference fails.
    pub allowed: f64,
    /// The chance of a difference at least this much in the canary's disfavour were both
    /// variants alike.
    pub p_value: f64,
    /// Canary then stable: requests for the error rate, latencies for latency.
    pub samples: [u64; 2],
    pub failed: bool,
}

pub struct Canary {
    config: Config,
    /// The interval (canary requests since the start ÷ `analysis_interval`) of this
    /// instance's last analysis. The count stands still while the stable variant serves
    /// (some 20 requests in a row at a 5 % share), and each interval needs analysing once.
    analysed: AtomicU64,
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

/// Fisher's exact test, one-sided: the chance that the canary has at least its `ce`
/// errors of all errors were errors spread over both variants' requests alike (with the
/// margins fixed, the canary's errors are hypergeometric). As scipy's
/// `fisher_exact([[ce, cn - ce], [se, sn - se]], alternative="greater")`.
fn fisher_greater((cn, ce): (u64, u64), (sn, se): (u64, u64)) -> f64 {
    if ce == 0 {
        return 1.0;
    }
    let Ok(errors) = Hypergeometric::new(cn + sn, ce + se, cn) else {
        // Only when the counts contradict each other (more errors than requests).
        return 1.0;
    };
    // P(X ≥ ce) = P(X > ce − 1). statrs sums one term per count on the side it is asked
    // for, thousands on a long rollout at a small share; from below when the canary has no
    // more errors than expected, where p is near 1/2 or more and 1 − cdf loses nothing.
    let expected = cn as f64 * (ce + se) as f64 / (cn + sn) as f64;
    let p = if ce as f64 <= expected {
        1.0 - errors.cdf(ce - 1)
    } else {
        errors.sf(ce - 1)
    };
    p.clamp(0.0, 1.0)
}

/// The Mann-Whitney U test, one-sided: the chance of ranks at least this much in favour
/// of `x` (sorted) being larger than `y` (sorted) were both drawn from one distribution.
/// Normal approximation with tie and continuity corrections, as scipy's
/// `mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True)`.
fn mann_whitney_greater(x: &[u32], y: &[u32]) -> f64 {
    if x.is_empty() || y.is_empty() {
        return 1.0;
    }
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    let n = n1 + n2;
    // Merging the sorted samples ranks the pool: each run of equal values shares the
    // average of the ranks it spans.
    let (mut i, mut j) = (0, 0);
    let (mut below, mut x_ranks, mut ties) = (0.0, 0.0, 0.0);
    while let Some(v) = match (x.get(i), y.get(j)) {
        (Some(a), Some(b)) => Some(*a.min(b)),
        (a, b) => a.or(b).copied(),
    } {
        let in_x = x[i..].iter().take_while(|u| **u == v).count();
        let in_y = y[j..].iter().take_while(|u| **u == v).count();
        (i, j) = (i + in_x, j + in_y);
        let t = (in_x + in_y) as f64;
        x_ranks += in_x as f64 * (below + (t + 1.0) / 2.0);
        ties += t * t * t - t;
        below += t;
    }
    let u = x_ranks - n1 * (n1 + 1.0) / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    // All values tied: nothing tells the samples apart.
    if variance <= 0.0 {
        return 1.0;
    }
    Normal::standard().sf((u - n1 * n2 / 2.0 - 0.5) / variance.sqrt())
}

fn median(sorted: &[u32]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => (f64::from(sorted[n / 2]) + f64::from(sorted[(n - 1) / 2])) / 2.0,
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

    fn alpha(&self) -> f64 {
        1.0 - self.config.confidence
    }

    /// The variant's latest successful latencies since the rollout began, at most `window`
    /// of them, sorted. The host keeps successes only, and `requests − errors` since the
    /// start says how many of those it keeps came after it.
    fn window(&self, variant: &VariantStats, (requests, errors): (u64, u64)) -> Vec<u32> {
        let successes = usize::try_from(requests.saturating_sub(errors)).unwrap_or(usize::MAX);
        let recent = &variant.recent_latency_us;
        let take = successes.min(self.config.window).min(recent.len());
        let mut window = recent[recent.len() - take..].to_vec();
        window.sort_unstable();
        window
    }

    /// Tests both metrics now, or says what the sample still lacks.
    fn analyse(
        &self,
        state: &State,
        stable: &VariantStats,
        canary: &VariantStats,
    ) -> Result<Verdict, String> {
        let since = Self::since(state, stable, canary);
        let min = self.config.min_requests;
        if since.canary.0 < min || since.stable.0 < min {
            return Err(format!(
                "canary {} of {min} requests, stable {} of {min}",
                since.canary.0, since.stable.0
            ));
        }
        let alpha = self.alpha();
        let (c, s) = (rate(since.canary), rate(since.stable));
        let p_value = fisher_greater(since.canary, since.stable);
        let allowed = self.config.max_error_rate_increase;
        let mut metrics = vec![Judgement {
            metric: Metric::ErrorRate,
            test: FISHER.to_string(),
            canary: c,
            stable: s,
            allowed,
            p_value,
            samples: [since.canary.0, since.stable.0],
            failed: c - s > allowed && p_value < alpha,
        }];
        let (x, y) = (
            self.window(canary, since.canary),
            self.window(stable, since.stable),
        );
        // A variant that has hardly answered has no latency to judge; its errors are.
        if x.len() >= 2 && y.len() >= 2 {
            let (c, s) = (median(&x), median(&y));
            let allowed = (self.config.max_latency_increase_us as f64)
                .max((self.config.max_latency_ratio - 1.0) * s);
            let p_value = mann_whitney_greater(&x, &y);
            metrics.push(Judgement {
                metric: Metric::Latency,
                test: MANN_WHITNEY.to_string(),
                canary: c,
                stable: s,
                allowed,
                p_value,
                samples: [x.len() as u64, y.len() as u64],
                failed: c - s > allowed && p_value < alpha,
            });
        }
        Ok(Verdict {
            canary_requests: since.canary.0,
            metrics,
        })
    }

    /// The failing metrics of `verdict`, with their figures, for operators.
    fn explain(&self, verdict: &Verdict) -> String {
        // 1 − 0.99 is 0.010000000000000009 in binary.
        let alpha = (self.alpha() * 1e9).round() / 1e9;
        let failed = verdict.metrics.iter().filter(|m| m.failed).map(|m| {
            let [nc, ns] = m.samples;
            match m.metric {
                Metric::ErrorRate => format!(
                    "error rate: canary {:.2} % vs stable {:.2} % ({:+.2} points, allowed +{:.2}), \
                     Fisher's exact test p = {:.1e} < {alpha}, n = {nc}/{ns}",
                    m.canary * 100.0,
                    m.stable * 100.0,
                    (m.canary - m.stable) * 100.0,
                    m.allowed * 100.0,
                    m.p_value,
                ),
                Metric::Latency => format!(
                    "latency: canary median {:.0} µs vs stable {:.0} µs ({:+.0} µs, allowed +{:.0} µs), \
                     Mann-Whitney U p = {:.1e} < {alpha}, n = {nc}/{ns}",
                    m.canary,
                    m.stable,
                    m.canary - m.stable,
                    m.allowed,
                    m.p_value,
                ),
            }
        });
        failed.collect::<Vec<_>>().join("; ")
    }

    /// Runs the analysis when one is due and counts its outcome; true when that rolls the
    /// canary back.
    fn judge(&self, state: &mut State, stable: &VariantStats, canary: &VariantStats) -> bool {
        let at = canary
            .requests
            .saturating_sub(state.baseline.canary_requests);
        // One analysis per `analysis_interval` canary requests: the first call that sees a
        // new interval's count runs it, even when concurrent requests moved the count past
        // the interval's first value.
        let interval = at / self.config.analysis_interval;
        if interval == 0 {
            return false;
        }
        if self.analysed.swap(interval, Ordering::Relaxed) == interval {
            return false;
        }
        let Ok(verdict) = self.analyse(state, stable, canary) else {
            return false;
        };
        if !verdict.failed() {
            // A no-op, so no change of state, unless failures were counting.
            state.failures = 0;
            return false;
        }
        if state.last_failed_at / self.config.analysis_interval == interval {
            return false;
        }
        let why = self.explain(&verdict);
        state.failures = state.failures.saturating_add(1);
        state.last_failed_at = at;
        state.verdict = Some(verdict);
        if state.failures < self.config.failure_limit {
            modelyard_sdk::log(
                Level::Info,
                &format!(
                    "analysis failed at {at} canary requests ({} of {} in a row before a \
                     rollback): {why}",
                    state.failures, self.config.failure_limit
                ),
            );
            return false;
        }
        state.status = Status::RolledBack;
        state.reason = format!(
            "rolled back automatically after {} failed analyses: {why}",
            state.failures
        );
        modelyard_sdk::log(Level::Warn, &state.reason);
        true
    }

    fn share(&self, state: &State) -> f64 {
        match state.status {
            Status::Progressing => self.config.steps.get(state.step).copied().unwrap_or(100.0),
            Status::Promoted => 100.0,
            Status::RolledBack => 0.0,
        }
    }

    /// Moves the rollout on: rollback after failed analyses, the next step when this one is
    /// done. True when it rolled back now.
    fn advance(
        &self,
        state: &mut State,
        stable: &VariantStats,
        canary: &VariantStats,
        now_ms: u64,
    ) -> bool {
        let total = stable.requests + canary.requests;
        let baseline = Baseline {
            canary_requests: canary.requests,
            canary_errors: canary.errors,
            stable_requests: stable.requests,
            stable_errors: stable.errors,
        };
        let Some((started_ms, started_requests)) = state.step_started else {
            state.step_started = Some((now_ms, total));
            state.baseline = baseline;
            state.reason = format!("started at {}%", self.share(state));
            return false;
        };
        // Counters below the baseline: the host restarted, keeping this state but not its
        // counters. The rollout goes on at its step, judged from here on.
        if canary.requests < state.baseline.canary_requests
            || stable.requests < state.baseline.stable_requests
            || total < started_requests
        {
            state.baseline = baseline;
            state.step_started = Some((now_ms, total));
            state.failures = 0;
            state.last_failed_at = 0;
            return false;
        }
        if state.status != Status::Progressing {
            return false;
        }
        if self.judge(state, stable, canary) {
            return true;
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
                state.reason = "promoted: every step passed its analyses".to_string();
            } else {
                state.reason = format!("step {} at {}%", state.step + 1, self.share(state));
            }
        }
        false
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
        if !(0.0..).contains(&config.max_error_rate_increase) {
            return fail!(
                "max_error_rate_increase must be at least 0, got {}",
                config.max_error_rate_increase
            );
        }
        if !(1.0..).contains(&config.max_latency_ratio) {
            return fail!(
                "max_latency_ratio must be at least 1 (1.5 allows a median 50 % slower), got {}",
                config.max_latency_ratio
            );
        }
        if !(10..=RECENT_LATENCIES).contains(&config.window) {
            return fail!(
                "window must be 10 to {RECENT_LATENCIES} latencies (fewer show no difference, the \
                 host keeps no more), got {}",
                config.window
            );
        }
        if !(config.confidence > 0.5 && config.confidence < 1.0) {
            return fail!(
                "confidence must be above 0.5 and below 1 (0.99 tests at alpha = 0.01), got {}",
                config.confidence
            );
        }
        if config.analysis_interval == 0 {
            return fail!("analysis_interval must be at least 1 canary request");
        }
        if config.failure_limit == 0 {
            return fail!("failure_limit must be at least 1 failing analysis");
        }
        Ok(Canary {
            config,
            analysed: AtomicU64::new(u64::MAX),
        })
    }

    fn route(
        &self,
        ctx: &RequestContext,
        variants: &[VariantStats],
        state: &mut State,
    ) -> Result<Decision, Error> {
        let (stable, canary) = self.pair(variants)?;
        let rolled_back = self.advance(state, stable, canary, ctx.now_ms);
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
        let mut reason = format!("{side}: canary {status} at {share}%, {how}");
        if rolled_back {
            reason = format!("{reason}; {}", state.reason);
        }
        Ok(Decision::to(variant.clone(), reason))
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
        let pair = self.pair(variants).ok();
        let since_start = pair.map(|(stable, canary)| {
            let since = Self::since(state, stable, canary);
            serde_json::json!({
                "canary_requests": since.canary.0, "canary_error_rate": rate(since.canary),
                "stable_requests": since.stable.0, "stable_error_rate": rate(since.stable),
            })
        });
        let analysis = pair.map(
            |(stable, canary)| match self.analyse(state, stable, canary) {
                Ok(verdict) => serde_json::to_value(verdict).unwrap_or_default(),
                Err(waiting) => serde_json::json!({ "waiting": waiting }),
            },
        );
        serde_json::json!({
            "strategy": "canary",
            "stable": self.config.stable,
            "canary": self.config.canary,
            "status": state.status,
            "step": state.step + 1,
            "steps": self.config.steps,
            "share_percent": self.share(state),
            "reason": state.reason,
            "since_start": since_start,
            "analysis": analysis,
            "failures": state.failures,
            "failure_limit": self.config.failure_limit,
            "confidence": self.config.confidence,
            "last_failed_verdict": state.verdict,
        })
    }
}

modelyard_sdk::register!(router: Canary);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            stable: "stable".into(),
            canary: "canary".into(),
            steps: vec![10.0, 50.0, 100.0],
            step_requests: Some(100),
            step_seconds: None,
            min_requests: 20,
            window: 200,
            confidence: 0.99,
            analysis_interval: 10,
            failure_limit: 3,
            max_error_rate_increase: 0.05,
            max_latency_increase_us: 500,
            max_latency_ratio: 1.5,
        }
    }

    fn canary() -> Canary {
        Canary::new(config()).unwrap()
    }

    /// The configuration as an operator would write it: everything else at its default.
    fn written(steps: &[f64], step_requests: u64) -> Canary {
        let config = serde_json::from_value(serde_json::json!({
            "stable": "stable", "canary": "canary", "steps": steps, "step_requests": step_requests,
        }))
        .unwrap();
        Canary::new(config).unwrap()
    }

    fn arms() -> Vec<VariantStats> {
        vec![VariantStats::named("stable"), VariantStats::named("canary")]
    }

    /// SplitMix64: deterministic across platforms, and no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn between(&mut self, low: f64, high: f64) -> f64 {
            low + (high - low) * self.unit()
        }
    }

    /// How a variant answers in a simulation: latencies uniform within ±20 % of `base_us`,
    /// 2 % of them 5 to 20 times slower (scheduling stalls on a shared host), plus
    /// `extra_us`; `errors` of the answers fail.
    #[derive(Clone, Copy, Debug)]
    struct Model {
        errors: f64,
        base_us: f64,
        extra_us: f64,
    }

    const HEALTHY: Model = Model {
        errors: 0.0,
        base_us: 100.0,
        extra_us: 0.0,
    };

    impl Model {
        fn errors(self, errors: f64) -> Model {
            Model { errors, ..self }
        }

        fn slower_by(self, extra_us: f64) -> Model {
            Model { extra_us, ..self }
        }

        fn scaled(self, factor: f64) -> Model {
            Model {
                base_us: self.base_us * factor,
                ..self
            }
        }

        /// The latency of a success, `None` for an error.
        fn answer(self, rng: &mut Rng) -> Option<u32> {
            if rng.unit() < self.errors {
                return None;
            }
            let mut us = self.base_us * rng.between(0.8, 1.2);
            if rng.unit() < 0.02 {
                us *= rng.between(5.0, 20.0);
            }
            Some((us + self.extra_us) as u32)
        }
    }

    /// An endpoint served through the router, its variants counted as the host counts them.
    struct Sim {
        router: Canary,
        state: State,
        arms: Vec<VariantStats>,
        rng: Rng,
        /// Requests on which the router changed its state.
        changes: u32,
        /// Analyses that failed.
        failed: u32,
        /// The decision's reason on the request that rolled back.
        rollback_reason: Option<String>,
    }

    impl Sim {
        fn new(router: Canary, seed: u64) -> Sim {
            Sim {
                router,
                state: State::default(),
                arms: arms(),
                rng: Rng(seed),
                changes: 0,
                failed: 0,
                rollback_reason: None,
            }
        }

        /// Plays `n` requests; returns how many went to the canary.
        fn play(&mut self, n: u64, stable: Model, canary: Model) -> u64 {
            let mut to_canary = 0;
            for _ in 0..n {
                let ctx = RequestContext {
                    seed: self.rng.next(),
                    now_ms: 1_000,
                    ..Default::default()
                };
                let before = self.state.clone();
                let decision = self
                    .router
                    .route(&ctx, &self.arms, &mut self.state)
                    .unwrap();
                self.changes += u32::from(self.state != before);
                self.failed += u32::from(self.state.failures > before.failures);
                if self.state.status == Status::RolledBack && before.status != Status::RolledBack {
                    self.rollback_reason = Some(decision.reason);
                }
                let model = if decision.primary == "canary" {
                    to_canary += 1;
                    canary
                } else {
                    stable
                };
                let arm = self
                    .arms
                    .iter_mut()
                    .find(|a| a.name == decision.primary)
                    .unwrap();
                arm.requests += 1;
                match model.answer(&mut self.rng) {
                    None => arm.errors += 1,
                    Some(us) => {
                        if arm.recent_latency_us.len() == RECENT_LATENCIES {
                            arm.recent_latency_us.remove(0);
                        }
                        arm.recent_latency_us.push(us);
                    }
                }
            }
            to_canary
        }

        /// Plays until the canary rolls back (or `limit` requests, so a miss ends);
        /// returns the canary's requests since the start at the analysis that rolled back.
        fn until_rollback(&mut self, canary: Model, limit: u64) -> Option<u64> {
            for _ in 0..limit {
                self.play(1, HEALTHY, canary);
                if self.state.status == Status::RolledBack {
                    return self.state.verdict.as_ref().map(|v| v.canary_requests);
                }
            }
            None
        }
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 1e-6 * expected.abs()
    }

    /// Reference values from scipy 1.17.1:
    /// `scipy.stats.mannwhitneyu(x, y, alternative='greater', method='asymptotic',
    /// use_continuity=True).pvalue` and
    /// `scipy.stats.fisher_exact(table, alternative='greater').pvalue`.
    #[test]
    fn the_tests_agree_with_scipy() {
        let spread = |n: u32, step: u32, modulus: u32, offset: u32| -> Vec<u32> {
            (0..n).map(|i| (i * step) % modulus + offset).collect()
        };
        for (mut x, mut y, expected) in [
            (
                vec![5, 7, 7, 9, 12, 15, 15, 20],
                vec![3, 5, 6, 7, 8, 8, 10],
                0.05150772516710901,
            ),
            (
                vec![110, 120, 130, 140, 150],
                vec![100, 105, 115, 125, 135, 145],
                0.20565689588812947,
            ),
            (
                vec![100, 100, 100, 101],
                vec![100, 100, 100, 100, 99],
                0.12021039318421761,
            ),
            (vec![1, 2, 3], vec![4, 5, 6], 0.9854518341293739),
            // x = [(i * 37) % 101 + 30 for i in range(60)], y = [(i * 53) % 97 for i in range(80)]
            (
                spread(60, 37, 101, 30),
                spread(80, 53, 97, 0),
                1.4114452991564624e-08,
            ),
            // All tied: scipy's z is −0.5 / 0, p = 1.
            (vec![7; 10], vec![7; 12], 1.0),
        ] {
            x.sort_unstable();
            y.sort_unstable();
            let p = mann_whitney_greater(&x, &y);
            assert!(close(p, expected), "{x:?} {y:?}: {p} vs {expected}");
        }
        // fisher_exact([[ce, cn - ce], [se, sn - se]]).
        for (canary, stable, expected) in [
            ((50, 5), (150, 2), 0.011454387564884054),
            ((50, 3), (950, 0), 0.00011795362496765303),
            ((50, 0), (1000, 10), 1.0),
            ((200, 12), (1800, 20), 2.6901734991716813e-05),
            ((100, 1), (100, 1), 0.7512562814070352),
            ((1_000, 5), (19_000, 95), 0.5644474370424566),
            ((1_000, 9), (19_000, 95), 0.07615456236189143),
            ((100_000, 500), (1_900_000, 9_500), 0.5064502311722251),
        ] {
            let p = fisher_greater(canary, stable);
            assert!(
                close(p, expected),
                "{canary:?} {stable:?}: {p} vs {expected}"
            );
        }
        assert_eq!(median(&[1, 2, 3, 10]), 2.5);
        assert_eq!(median(&[1, 2, 30]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn a_healthy_canary_climbs_every_step_to_promotion() {
        let mut sim = Sim::new(canary(), 1);
        // A step ends on the request after 100 have been counted.
        let first = sim.play(100, HEALTHY, HEALTHY);
        assert!((3..=20).contains(&first), "{first} of 100 at 10%");
        assert_eq!(sim.state.step, 0);
        let second = sim.play(100, HEALTHY, HEALTHY);
        assert!((35..=65).contains(&second), "{second} of 100 at 50%");
        assert_eq!(sim.state.step, 1);
        sim.play(101, HEALTHY, HEALTHY);
        assert_eq!(sim.state.status, Status::Promoted);
        assert_eq!(sim.play(50, HEALTHY, HEALTHY), 50);
        // Started, two steps, promoted: the analyses in between changed nothing.
        assert_eq!(sim.changes, 4);
    }

    #[test]
    fn a_failing_canary_rolls_back_on_its_own_and_stays_back() {
        let mut sim = Sim::new(canary(), 2);
        sim.play(100, HEALTHY, HEALTHY);
        sim.play(100, HEALTHY, HEALTHY.errors(1.0));
        assert_eq!(sim.state.status, Status::RolledBack, "{:?}", sim.state);
        assert!(
            sim.state.reason.contains("error rate"),
            "{}",
            sim.state.reason
        );
        assert!(sim.state.reason.contains("Fisher"), "{}", sim.state.reason);
        assert_eq!(sim.failed, 3);
        assert_eq!(sim.play(200, HEALTHY, HEALTHY), 0);
    }

    #[test]
    fn a_slow_canary_rolls_back() {
        let router = Canary::new(Config {
            steps: vec![50.0, 100.0],
            step_requests: Some(100_000),
            ..config()
        })
        .unwrap();
        let mut sim = Sim::new(router, 3);
        // 2.5 times slower but only 150 µs: within the margin on a fast model.
        sim.play(600, HEALTHY, HEALTHY.slower_by(150.0));
        assert_eq!(sim.state.status, Status::Progressing);
        assert_eq!(sim.failed, 0);
        let at = sim.until_rollback(HEALTHY.slower_by(1_000.0), 1_000);
        assert!(at.is_some(), "{:?}", sim.state);
        let reason = &sim.state.reason;
        assert!(
            reason.starts_with(
                "rolled back automatically after 3 failed analyses: latency: canary median"
            ),
            "{reason}"
        );
        assert!(reason.contains("Mann-Whitney U p = "), "{reason}");
        let decided = sim.rollback_reason.clone().unwrap_or_default();
        assert!(decided.contains(reason.as_str()), "{decided}");
    }

    #[test]
    fn failed_analyses_count_in_a_row_and_once_each() {
        let router = canary();
        let (mut state, mut arms) = (State::default(), arms());
        let spread = |n: u32, us: u32| -> Vec<u32> { (0..n).map(|i| us + i % 7).collect() };
        router
            .route(&RequestContext::default(), &arms, &mut state)
            .unwrap();
        arms[0].requests = 100;
        arms[0].recent_latency_us = spread(100, 100);
        arms[1].requests = 20;
        arms[1].recent_latency_us = spread(20, 2_000);
        router
            .route(&RequestContext::default(), &arms, &mut state)
            .unwrap();
        assert_eq!((state.failures, state.last_failed_at), (1, 20));
        let failing = state.verdict.clone().unwrap();
        assert_eq!(failing.canary_requests, 20);
        assert_eq!(failing.metrics[1].metric, Metric::Latency);
        assert_eq!(failing.metrics[1].samples, [20, 100]);
        assert!(failing.metrics[1].failed && !failing.metrics[0].failed);
        // The same count again, on this instance or another: still one failure.
        router
            .route(&RequestContext::default(), &arms, &mut state)
            .unwrap();
        canary()
            .route(&RequestContext::default(), &arms, &mut state)
            .unwrap();
        assert_eq!(state.failures, 1);
        // One slow answer among fast ones is no regression; passing resets the count …
        arms[1].requests = 30;
        arms[1].recent_latency_us = spread(30, 100);
        arms[1].recent_latency_us[5] = 50_000;
        router
            .route(&RequestContext::default(), &arms, &mut state)
            .unwrap();
        assert_eq!(state.failures, 0);
        assert_eq!(state.verdict, Some(failing));
        // … and a passing analysis after that leaves the state as it was.
        let before = state.clone();
        arms[1].requests = 40;
        arms[1].recent_latency_us = spread(40, 100);
        router
            .route(&RequestContext::default(), &arms, &mut state)
            .unwrap();
        assert_eq!(state, before);
    }

    #[test]
    fn describe_shows_a_fresh_analysis() {
        let router = canary();
        let (state, arms) = (State::default(), arms());
        let described = router.describe(&state, &arms);
        assert_eq!(
            described["analysis"]["waiting"],
            "canary 0 of 20 requests, stable 0 of 20"
        );
        let mut sim = Sim::new(canary(), 4);
        sim.play(150, HEALTHY, HEALTHY);
        let described = sim.router.describe(&sim.state, &sim.arms);
        let metrics = &described["analysis"]["metrics"];
        assert_eq!(metrics[0]["metric"], "error_rate");
        assert_eq!(metrics[1]["metric"], "latency");
        assert_eq!(metrics[1]["failed"], false);
        assert_eq!(described["failures"], 0);
        assert_eq!(described["failure_limit"], 3);
        assert_eq!(described["last_failed_verdict"], serde_json::Value::Null);
    }

    /// Both variants alike (no errors, or 0.5 % each) and two healthy models 20 % apart,
    /// through every step to promotion.
    #[test]
    fn healthy_noise_does_not_roll_back() {
        let steps = [5.0, 25.0, 50.0, 100.0];
        let (alike, errors) = (HEALTHY, HEALTHY.errors(0.005));
        let cases = [
            ("alike, no errors", alike, alike, None, 0),
            ("canary 20 % slower", alike, alike.scaled(1.2), None, 0),
            ("alike, 0.5 % errors", errors, errors, None, 0),
            // Some 85 analyses per rollout each test the errors since the start; at alpha =
            // 0.01 they overlap, so one unlucky run of errors fails several in a row and
            // failure_limit does not stop it: 15 of 1,000 rollouts rolled back, measured.
            // Why the default is 0.999.
            ("alike, 0.5 % errors", errors, errors, Some(0.99), 6),
        ];
        for (name, stable, canary, confidence, allowed) in cases {
            let (mut rollbacks, mut failed) = (0, 0);
            for seed in 0..200 {
                let mut router = written(&steps, 500);
                if let Some(confidence) = confidence {
                    router = Canary::new(Config {
                        confidence,
                        ..router.config
                    })
                    .unwrap();
                }
                let mut sim = Sim::new(router, seed);
                sim.play(2_001, stable, canary);
                rollbacks += u32::from(sim.state.status == Status::RolledBack);
                failed += sim.failed;
                if sim.failed == 0 {
                    assert_eq!(sim.state.status, Status::Promoted);
                    // Started, three more steps, promoted: passing analyses wrote nothing.
                    assert_eq!(sim.changes, 5, "{name}, seed {seed}");
                }
            }
            let confidence = confidence.unwrap_or(default_confidence());
            eprintln!(
                "{name}, confidence {confidence}: {rollbacks} rollbacks, {failed} failed analyses in 200 rollouts"
            );
            assert!(
                rollbacks <= allowed,
                "{name}, confidence {confidence}: {rollbacks}"
            );
        }
    }

    /// A canary 1 ms slower, or failing 5 % of its answers, at the first step (5 %).
    #[test]
    fn regressions_roll_back_within_a_bound() {
        let cases = [
            // The first analysis (at min_requests 50) and each after fail: 50 + 2 × 10.
            ("+1 ms latency", HEALTHY.slower_by(1_000.0), 70),
            // With the stable variant at 19 times the canary's requests and no errors, two
            // canary errors give p ≈ (1/20)² < 0.01 while 2/n > 1 point (n < 200); fewer
            // than 2 errors in 200 answers at 5 % has a chance of 4e-4, 2 % that one of 50
            // seeds misses (one of 200 seeds tried needed 370). Then two more analyses.
            ("+5 points of errors", HEALTHY.errors(0.05), 220),
        ];
        for (name, canary, bound) in cases {
            let mut at: Vec<u64> = (0..50)
                .map(|seed| {
                    let mut sim = Sim::new(written(&[5.0, 100.0], 1_000_000), seed);
                    sim.until_rollback(canary, 100_000).unwrap_or(u64::MAX)
                })
                .collect();
            at.sort_unstable();
            let (median, max) = (at[at.len() / 2], at[at.len() - 1]);
            eprintln!(
                "{name} at 5 %: rolled back after {median} canary requests (median), {max} at most"
            );
            assert!(max <= bound, "{name}: {at:?}");
        }
    }

    #[test]
    fn a_restart_that_reset_the_counters_keeps_the_step_and_judges_afresh() {
        let router = canary();
        let (mut state, mut arms) = (State::default(), arms());
        arms[0].requests = 900;
        arms[1].requests = 100;
        let ctx = RequestContext::default();
        router.route(&ctx, &arms, &mut state).unwrap();
        state.step = 1;
        state.failures = 2;
        // The host restarted: its counters begin again at 0, the kept state does not.
        let fresh = self::arms();
        router.route(&ctx, &fresh, &mut state).unwrap();
        assert_eq!((state.step, state.failures), (1, 0), "{state:?}");
        assert_eq!(state.baseline, Baseline::default());
        assert_eq!(state.status, Status::Progressing);

        // A rollout that began with the server (a baseline of zeros) tells a restart by
        // the endpoint's count falling below where its step began.
        let mut state = State {
            step_started: Some((0, 500)),
            last_failed_at: 40,
            ..State::default()
        };
        let mut arms = self::arms();
        arms[0].requests = 8;
        arms[1].requests = 2;
        router.route(&ctx, &arms, &mut state).unwrap();
        assert_eq!(state.step_started, Some((0, 10)), "{state:?}");
        assert_eq!(state.last_failed_at, 0);
    }

    #[test]
    fn operators_promote_and_roll_back() {
        let router = canary();
        let mut sim = Sim::new(canary(), 5);
        router
            .act(Action::Promote { to: None }, &mut sim.state, &sim.arms, 5)
            .unwrap();
        assert_eq!(sim.play(20, HEALTHY, HEALTHY), 20);
        router
            .act(Action::Rollback {}, &mut sim.state, &sim.arms, 6)
            .unwrap();
        assert_eq!(sim.play(20, HEALTHY, HEALTHY), 0);
        assert!(
            router
                .act(
                    Action::Promote {
                        to: Some("stable".into())
                    },
                    &mut sim.state,
                    &sim.arms,
                    7
                )
                .is_err()
        );
        assert_eq!(
            router.describe(&sim.state, &sim.arms)["status"],
            "rolled-back"
        );
    }

    #[test]
    fn time_ends_a_step_too() {
        let router = Canary::new(Config {
            step_requests: None,
            step_seconds: Some(60),
            ..config()
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
        let base = config();
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
            Config {
                window: 9,
                ..base.clone()
            },
            Config {
                window: 257,
                ..base.clone()
            },
            Config {
                confidence: 0.5,
                ..base.clone()
            },
            Config {
                confidence: 1.0,
                ..base.clone()
            },
            Config {
                confidence: f64::NAN,
                ..base.clone()
            },
            Config {
                analysis_interval: 0,
                ..base.clone()
            },
            Config {
                failure_limit: 0,
                ..base.clone()
            },
            Config {
                max_latency_ratio: 0.9,
                ..base.clone()
            },
            Config {
                max_error_rate_increase: -0.01,
                ..base.clone()
            },
        ] {
            assert!(Canary::new(bad).is_err());
        }
        let unknown = serde_json::json!({
            "stable": "a", "canary": "b", "steps": [5], "step_requests": 10, "max_p99_ratio": 2.0,
        });
        assert!(serde_json::from_value::<Config>(unknown).is_err());
        let message = Canary::new(Config {
            window: 300,
            ..base
        })
        .err()
        .unwrap();
        assert!(message.0.contains("window must be 10 to 256"), "{message}");
    }
}
