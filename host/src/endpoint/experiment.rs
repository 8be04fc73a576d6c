//! Whether one variant's rewards differ from another's by more than chance: a
//! two-proportion z-test when every reward so far is 0 or 1, Welch's t-test otherwise, with
//! the p-value and the 95 % confidence interval of the difference in mean reward.

use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

use super::stats::StatsSnapshot;

/// One treatment compared with the control.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Comparison {
    pub test: &'static str,
    /// Treatment mean reward minus control mean reward.
    pub difference: f64,
    pub p_value: f64,
    pub ci95: [f64; 2],
}

/// `None` until both sides have at least two rewards (and some spread, for the t-test).
pub fn compare(control: &StatsSnapshot, treatment: &StatsSnapshot) -> Option<Comparison> {
    let (n1, n2) = (control.reward_count as f64, treatment.reward_count as f64);
    if n1 < 2.0 || n2 < 2.0 {
        return None;
    }
    let (m1, m2) = (control.reward_sum / n1, treatment.reward_sum / n2);
    let difference = m2 - m1;
    // For 0/1 rewards the sum of squares equals the sum.
    let binary = [control, treatment].iter().all(|s| {
        (s.reward_sum - s.reward_sum_squares).abs() < 1e-9 && s.reward_sum <= s.reward_count as f64
    });
    let normal = Normal::new(0.0, 1.0).ok()?;
    if binary {
        let pooled = (control.reward_sum + treatment.reward_sum) / (n1 + n2);
        let se_pooled = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
        let se = (m1 * (1.0 - m1) / n1 + m2 * (1.0 - m2) / n2).sqrt();
        if se_pooled == 0.0 {
            return None;
        }
        let z = difference / se_pooled;
        let p_value = 2.0 * (1.0 - normal.cdf(z.abs()));
        let margin = normal.inverse_cdf(0.975) * se;
        return Some(Comparison {
            test: "two-proportion z-test",
            difference,
            p_value,
            ci95: [difference - margin, difference + margin],
        });
    }
    let variance =
        |s: &StatsSnapshot, n: f64, m: f64| (s.reward_sum_squares - n * m * m) / (n - 1.0);
    let (a, b) = (
        variance(control, n1, m1) / n1,
        variance(treatment, n2, m2) / n2,
    );
    let se = (a + b).sqrt();
    // Zero or NaN spread: nothing to test.
    if se.is_nan() || se <= 0.0 {
        return None;
    }
    let df = (a + b).powi(2) / (a * a / (n1 - 1.0) + b * b / (n2 - 1.0));
    let t = StudentsT::new(0.0, 1.0, df).ok()?;
    let p_value = 2.0 * (1.0 - t.cdf((difference / se).abs()));
    let margin = t.inverse_cdf(0.975) * se;
    Some(Comparison {
        test: "Welch's t-test",
        difference,
        p_value,
        ci95: [difference - margin, difference + margin],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(rewards: &[f64]) -> StatsSnapshot {
        StatsSnapshot {
            reward_count: rewards.len() as u64,
            reward_sum: rewards.iter().sum(),
            reward_sum_squares: rewards.iter().map(|r| r * r).sum(),
            ..StatsSnapshot::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn proportions_match_the_textbook() {
        // 200 of 1000 against 250 of 1000 (reference values from Python's statistics module).
        let mut control = vec![0.0; 800];
        control.extend([1.0; 200]);
        let mut treatment = vec![0.0; 750];
        treatment.extend([1.0; 250]);
        let c = compare(&arm(&control), &arm(&treatment)).unwrap();
        assert_eq!(c.test, "two-proportion z-test");
        assert!(close(c.difference, 0.05));
        assert!(close(c.p_value, 0.007419649261025674), "{c:?}");
        assert!(
            close(c.ci95[0], 0.01346362168753984) && close(c.ci95[1], 0.08653637831246014),
            "{c:?}"
        );
    }

    #[test]
    fn continuous_rewards_use_welch() {
        // Reference values from scipy.stats.ttest_ind(b, a, equal_var=False).
        let c = compare(
            &arm(&[1.0, 2.0, 3.0, 4.0, 5.0]),
            &arm(&[2.0, 4.0, 6.0, 8.0, 10.0, 12.0]),
        )
        .unwrap();
        assert_eq!(c.test, "Welch's t-test");
        assert!(close(c.p_value, 0.04928433820673053), "{c:?}");
        assert!(
            close(c.ci95[0], 0.016531304371169675) && close(c.ci95[1], 7.98346869562883),
            "{c:?}"
        );
    }

    #[test]
    fn too_few_rewards_compare_nothing() {
        assert_eq!(compare(&arm(&[1.0]), &arm(&[0.0, 1.0])), None);
    }
}
