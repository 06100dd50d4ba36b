//! Statistical tests, each checked against its reference implementation (scipy) on pasted values.
//!
//! Every test returns `Result<_, Unavailable>`: when the data cannot support the test (no
//! observations, a zero row or column, no variance), the caller gets the reason instead of NaN.

use statrs::distribution::{ChiSquared, ContinuousCDF, StudentsT};

/// Why a statistic is absent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

fn unavailable<T>(reason: impl Into<String>) -> Result<T, Unavailable> {
    Err(Unavailable(reason.into()))
}

/// A test statistic with its p-value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TestResult {
    /// The statistic (χ², t).
    pub statistic: f64,
    /// Degrees of freedom.
    pub dof: f64,
    /// Two-sided p-value (upper tail for χ²).
    pub p_value: f64,
}

fn chi2_sf(x: f64, dof: f64) -> f64 {
    let d = ChiSquared::new(dof).expect("dof > 0");
    d.sf(x).clamp(0.0, 1.0)
}

/// χ² test of independence on an r × c table of counts, as `scipy.stats.chi2_contingency` with
/// default arguments: Yates' continuity correction when there is one degree of freedom.
pub fn chi2_contingency(table: &[Vec<u64>]) -> Result<TestResult, Unavailable> {
    let rows = table.len();
    let cols = table.first().map(Vec::len).unwrap_or(0);
    if rows < 2 || cols < 2 {
        return unavailable("needs at least 2 rows and 2 columns");
    }
    if table.iter().any(|r| r.len() != cols) {
        return unavailable("rows of different lengths");
    }
    let row_sums: Vec<f64> = table.iter().map(|r| r.iter().sum::<u64>() as f64).collect();
    let col_sums: Vec<f64> = (0..cols)
        .map(|c| table.iter().map(|r| r[c]).sum::<u64>() as f64)
        .collect();
    let total: f64 = row_sums.iter().sum();
    if total == 0.0 {
        return unavailable("no observations");
    }
    if row_sums.contains(&0.0) {
        return unavailable("a row has no observations");
    }
    if col_sums.contains(&0.0) {
        return unavailable(
            "a column has no observations (e.g. no successes or no failures at all)",
        );
    }
    let dof = ((rows - 1) * (cols - 1)) as f64;
    let mut stat = 0.0;
    for (r, row) in table.iter().enumerate() {
        for (c, &o) in row.iter().enumerate() {
            let e = row_sums[r] * col_sums[c] / total;
            let mut diff = o as f64 - e;
            if dof == 1.0 {
                // Yates: move each observation half a unit towards its expectation, not past it.
                diff -= diff.signum() * diff.abs().min(0.5);
            }
            stat += diff * diff / e;
        }
    }
    Ok(TestResult {
        statistic: stat,
        dof,
        p_value: chi2_sf(stat, dof),
    })
}

/// χ² goodness of fit of observed counts against expected proportions (weights, normalised), as
/// `scipy.stats.chisquare(observed, total × weights / Σweights)`.
pub fn chisquare(observed: &[u64], weights: &[f64]) -> Result<TestResult, Unavailable> {
    if observed.len() < 2 || observed.len() != weights.len() {
        return unavailable("needs at least 2 categories, each with a weight");
    }
    let total: f64 = observed.iter().sum::<u64>() as f64;
    if total == 0.0 {
        return unavailable("no observations");
    }
    let wsum: f64 = weights.iter().sum();
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if !positive(wsum) || !weights.iter().all(|w| positive(*w)) {
        return unavailable("weights must be positive");
    }
    let stat = observed
        .iter()
        .zip(weights)
        .map(|(&o, w)| {
            let e = total * w / wsum;
            (o as f64 - e).powi(2) / e
        })
        .sum::<f64>();
    let dof = (observed.len() - 1) as f64;
    Ok(TestResult {
        statistic: stat,
        dof,
        p_value: chi2_sf(stat, dof),
    })
}

/// Wilson score interval of a proportion at 95% (as
/// `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`).
pub fn wilson_95(successes: u64, n: u64) -> Result<(f64, f64), Unavailable> {
    if n == 0 {
        return unavailable("no observations");
    }
    // The 97.5th percentile of the standard normal.
    const Z: f64 = 1.959_963_984_540_054;
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = Z * Z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = Z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    Ok(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// Count, mean and M2 (sum of squared deviations) of a sample: mergeable (Chan et al.) and
/// numerically stable (Welford), so it can live in a RocksDB merge operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Moments {
    /// Observations.
    pub n: u64,
    /// Mean.
    pub mean: f64,
    /// Σ (x − mean)².
    pub m2: f64,
}

impl Moments {
    /// One observation.
    pub fn of(x: f64) -> Self {
        Moments {
            n: 1,
            mean: x,
            m2: 0.0,
        }
    }

    /// Adds one observation.
    pub fn push(&mut self, x: f64) {
        *self = self.merge(&Moments::of(x));
    }

    /// The moments of both samples together.
    pub fn merge(&self, o: &Moments) -> Moments {
        if self.n == 0 {
            return *o;
        }
        if o.n == 0 {
            return *self;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        let mean = self.mean + delta * o.n as f64 / n as f64;
        let m2 = self.m2 + o.m2 + delta * delta * self.n as f64 * o.n as f64 / n as f64;
        Moments { n, mean, m2 }
    }

    /// Sample variance (n − 1 denominator).
    pub fn variance(&self) -> Option<f64> {
        (self.n >= 2).then(|| self.m2 / (self.n - 1) as f64)
    }
}

/// Welch's t-test (unequal variances), as `scipy.stats.ttest_ind(a, b, equal_var=False)`.
pub fn welch_t(a: &Moments, b: &Moments) -> Result<TestResult, Unavailable> {
    let (Some(va), Some(vb)) = (a.variance(), b.variance()) else {
        return unavailable("needs at least 2 numeric outcomes per variant");
    };
    let (na, nb) = (a.n as f64, b.n as f64);
    let (sa, sb) = (va / na, vb / nb);
    let se2 = sa + sb;
    if se2 <= 0.0 {
        return unavailable("the numeric outcomes have no variance");
    }
    let t = (a.mean - b.mean) / se2.sqrt();
    let dof = se2 * se2 / (sa * sa / (na - 1.0) + sb * sb / (nb - 1.0));
    let d = StudentsT::new(0.0, 1.0, dof).expect("dof > 0");
    let p = (2.0 * d.sf(t.abs())).clamp(0.0, 1.0);
    Ok(TestResult {
        statistic: t,
        dof,
        p_value: p,
    })
}

/// Always-valid p-value of a difference in means (mixture sequential probability ratio test,
/// Johari et al., "Always valid inference"), with a normal mixing distribution N(0, τ²) over the
/// effect. By Ville's inequality, min(1, 1/Λₙ) is a valid p-value at any time the data is looked
/// at, however often: peeking does not inflate false positives. τ is `tau_fraction` of the pooled
/// standard deviation of one observation.
pub fn msprt_p_value(a: &Moments, b: &Moments, tau_fraction: f64) -> Result<f64, Unavailable> {
    if a.n < 2 || b.n < 2 {
        return unavailable("needs at least 2 outcomes per variant");
    }
    let pooled = a.merge(b).variance().unwrap_or(0.0);
    let (va, vb) = (
        a.variance().unwrap_or(0.0).max(pooled * 1e-9),
        b.variance().unwrap_or(0.0).max(pooled * 1e-9),
    );
    let v = va / a.n as f64 + vb / b.n as f64;
    // NaN-safe: anything but a positive variance means no test.
    if v.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        || pooled.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
    {
        return unavailable("the outcomes have no variance yet");
    }
    let tau2 = pooled * tau_fraction * tau_fraction;
    let theta = b.mean - a.mean;
    let log_lambda = 0.5 * (v / (v + tau2)).ln() + tau2 * theta * theta / (2.0 * v * (v + tau2));
    Ok((-log_lambda).exp().min(1.0))
}

/// Chan et al.'s combination of (n, mean, M2) as stored tallies keep them: with a negative n it
/// removes observations (an outcome replaced), so n is signed.
pub fn combine_signed_moments(a: (i64, f64, f64), b: (i64, f64, f64)) -> (i64, f64, f64) {
    let n = a.0 + b.0;
    if n == 0 {
        return (0, 0.0, 0.0);
    }
    if a.0 == 0 {
        return b;
    }
    let delta = b.1 - a.1;
    let mean = a.1 + delta * b.0 as f64 / n as f64;
    let m2 = a.2 + b.2 + delta * delta * a.0 as f64 * b.0 as f64 / n as f64;
    (n, mean, m2.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300) || (a - b).abs() < 1e-15
    }

    /// scipy 1.17.1: `chi2_contingency(table)` → statistic, dof, pvalue.
    #[test]
    fn chi2_contingency_matches_scipy() {
        let cases: &[(&[&[u64]], f64, f64, f64)] = &[
            (
                &[&[10, 20], &[30, 40]],
                0.4464285714285714,
                1.0,
                0.5040358664525046,
            ),
            (
                &[&[120, 880], &[150, 850]],
                3.6009419824448727,
                1.0,
                0.057746841509689,
            ),
            (&[&[1, 2], &[3, 4]], 0.0, 1.0, 1.0),
            (
                &[&[12, 5], &[3, 9]],
                4.171457749766574,
                1.0,
                0.04111041419430694,
            ),
            (
                &[&[5, 0], &[3, 7]],
                4.051339285714286,
                1.0,
                0.04413631587401071,
            ),
            (
                &[&[30, 70], &[45, 55], &[25, 75]],
                9.75,
                2.0,
                0.007635094218859962,
            ),
            (
                &[&[200, 800], &[230, 770], &[260, 740]],
                10.163749294184077,
                2.0,
                0.006208259804085228,
            ),
            (
                &[&[3, 1], &[0, 4], &[2, 2]],
                4.799999999999999,
                2.0,
                0.09071795328941257,
            ),
        ];
        for (table, stat, dof, p) in cases {
            let t: Vec<Vec<u64>> = table.iter().map(|r| r.to_vec()).collect();
            let r = chi2_contingency(&t).unwrap();
            assert!(
                close(r.statistic, *stat, 1e-9),
                "{table:?}: {} vs {stat}",
                r.statistic
            );
            assert_eq!(r.dof, *dof);
            assert!(
                close(r.p_value, *p, 1e-9),
                "{table:?}: {} vs {p}",
                r.p_value
            );
        }
    }

    #[test]
    fn chi2_contingency_edge_cases_are_reasons() {
        assert!(chi2_contingency(&[vec![0, 0], vec![0, 0]]).is_err());
        assert!(chi2_contingency(&[vec![0, 0], vec![3, 4]])
            .unwrap_err()
            .0
            .contains("row"));
        assert!(chi2_contingency(&[vec![5, 0], vec![3, 0]])
            .unwrap_err()
            .0
            .contains("column"));
        assert!(chi2_contingency(&[vec![5, 1]]).is_err());
    }

    /// scipy 1.17.1: `chisquare(obs, f_exp=obs.sum() * w / w.sum())`.
    #[test]
    fn chisquare_matches_scipy() {
        let cases: &[(&[u64], &[f64], f64, f64)] = &[
            (&[480, 520], &[1.0, 1.0], 1.6, 0.20590321073206466),
            (&[600, 400], &[1.0, 1.0], 40.0, 2.5396285894708634e-10),
            (
                &[330, 340, 330],
                &[1.0, 1.0, 1.0],
                0.20000000000000004,
                0.9048374180359595,
            ),
            (&[5200, 4800], &[1.0, 1.0], 16.0, 6.334248366623988e-05),
            (
                &[100, 250],
                &[1.0, 3.0],
                2.380952380952381,
                0.12282264810139186,
            ),
        ];
        for (obs, w, stat, p) in cases {
            let r = chisquare(obs, w).unwrap();
            assert!(close(r.statistic, *stat, 1e-9), "{obs:?}");
            assert!(close(r.p_value, *p, 1e-9), "{obs:?}: {} vs {p}", r.p_value);
        }
        assert!(chisquare(&[0, 0], &[1.0, 1.0]).is_err());
    }

    /// scipy 1.17.1: `binomtest(k, n).proportion_ci(method="wilson")`.
    #[test]
    fn wilson_matches_scipy() {
        let cases = [
            (45, 100, 0.35614537979511984, 0.5475539700255787),
            (0, 10, 0.0, 0.27753279986288926),
            (10, 10, 0.7224672001371109, 1.0),
            (1, 3, 0.06149194472039626, 0.7923403991979523),
            (530, 1000, 0.49901030909301664, 0.5607600853978499),
        ];
        for (k, n, lo, hi) in cases {
            let (l, h) = wilson_95(k, n).unwrap();
            assert!(close(l, lo, 1e-9), "{k}/{n}: {l} vs {lo}");
            assert!(close(h, hi, 1e-9), "{k}/{n}: {h} vs {hi}");
        }
        assert!(wilson_95(0, 0).is_err());
    }

    fn moments(xs: &[f64]) -> Moments {
        let mut m = Moments::default();
        for &x in xs {
            m.push(x);
        }
        m
    }

    /// scipy 1.17.1: `ttest_ind(a, b, equal_var=False)` → statistic, pvalue, df.
    #[test]
    fn welch_matches_scipy() {
        let a = moments(&[12.1, 9.8, 11.5, 10.2, 13.3, 12.7, 9.9, 11.1]);
        let b = moments(&[14.2, 13.1, 15.5, 12.9, 14.8, 16.1]);
        let r = welch_t(&a, &b).unwrap();
        assert!(
            close(r.statistic, -4.4385445426997885, 1e-9),
            "{}",
            r.statistic
        );
        assert!(
            close(r.p_value, 0.0009823333793055745, 1e-9),
            "{}",
            r.p_value
        );
        assert!(close(r.dof, 11.06951085483079, 1e-9));
        let a = moments(&[1., 0., 0., 1., 1., 0., 1., 1., 1., 0., 0., 1.]);
        let b = moments(&[0., 0., 1., 0., 0., 0., 1., 0., 0., 0.]);
        let r = welch_t(&a, &b).unwrap();
        assert!(close(r.statistic, 1.9196988892026339, 1e-9));
        assert!(close(r.p_value, 0.0692762037782767, 1e-9));
        assert!(welch_t(&moments(&[1.0]), &b).is_err());
        assert!(welch_t(&moments(&[2.0, 2.0]), &moments(&[2.0, 2.0])).is_err());
    }

    #[test]
    fn moments_merge_like_one_sample() {
        let xs = [1.0, 4.0, 9.0, 16.0, 25.0, 1e9, 1e9 + 1.0];
        let whole = moments(&xs);
        let merged = moments(&xs[..3]).merge(&moments(&xs[3..]));
        assert_eq!(whole.n, merged.n);
        assert!(close(whole.mean, merged.mean, 1e-12));
        assert!(close(whole.m2, merged.m2, 1e-9));
    }

    /// Deterministic xorshift, for the simulation below.
    struct Rng(u64);
    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Peeking after every 100 observations per arm, 40 times, with no real difference: the
    /// always-valid p-value stays below 0.05 at some look in at most ~5% of experiments, while a
    /// fixed-horizon test peeked at the same way fails far more often.
    #[test]
    fn msprt_survives_peeking_where_fixed_tests_do_not() {
        let (runs, looks, step) = (400, 40, 100);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut msprt_false, mut naive_false) = (0, 0);
        for _ in 0..runs {
            let (mut a, mut b) = (Moments::default(), Moments::default());
            let (mut m_hit, mut n_hit) = (false, false);
            for _ in 0..looks {
                for _ in 0..step {
                    a.push(f64::from(u8::from(rng.next_f64() < 0.2)));
                    b.push(f64::from(u8::from(rng.next_f64() < 0.2)));
                }
                if msprt_p_value(&a, &b, 0.1)
                    .map(|p| p < 0.05)
                    .unwrap_or(false)
                {
                    m_hit = true;
                }
                if welch_t(&a, &b).map(|r| r.p_value < 0.05).unwrap_or(false) {
                    n_hit = true;
                }
            }
            msprt_false += usize::from(m_hit);
            naive_false += usize::from(n_hit);
        }
        let (m, n) = (
            msprt_false as f64 / runs as f64,
            naive_false as f64 / runs as f64,
        );
        assert!(m <= 0.06, "always-valid false-positive rate {m}");
        assert!(
            n > 0.15,
            "naive peeking should inflate false positives: {n}"
        );
        // And it still finds a real difference.
        let (mut a, mut b) = (Moments::default(), Moments::default());
        for _ in 0..5000 {
            a.push(f64::from(u8::from(rng.next_f64() < 0.20)));
            b.push(f64::from(u8::from(rng.next_f64() < 0.26)));
        }
        assert!(msprt_p_value(&a, &b, 0.1).unwrap() < 0.01);
    }
}
