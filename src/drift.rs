//! Data drift: sliding windows of live feature values, and the tests that compare them with a
//! reference sample — two-sample Kolmogorov–Smirnov (exact, as `scipy.stats.ks_2samp`), χ² on
//! category counts, the population stability index and the Wasserstein distance — with
//! Benjamini–Hochberg across features. Plain Rust.
//!
//! `ks_2samp` with `method="auto"` computes exact p-values when both samples have at most 10,000
//! values; modelgate caps references and windows at 10,000 ([`MAX_SAMPLE`]), so the exact path
//! is the one that always applies.

use std::collections::BTreeMap;

use crate::stats::{self, Unavailable};

/// Largest reference or window size (keeps every KS p-value on scipy's exact path).
pub const MAX_SAMPLE: usize = 10_000;
/// Bins of the population stability index for numeric features (reference deciles).
pub const PSI_BINS: usize = 10;

/// A fixed-size ring of the latest values of one feature. Pushing never allocates.
#[derive(Clone, Debug)]
pub struct Window {
    values: Vec<f64>,
    next: usize,
    filled: usize,
    /// NaN and infinite values seen (and excluded).
    pub non_finite: u64,
}

impl Window {
    /// A window of `size` values.
    pub fn new(size: usize) -> Self {
        Window {
            values: vec![0.0; size.max(1)],
            next: 0,
            filled: 0,
            non_finite: 0,
        }
    }

    /// Adds a value (non-finite values are counted and excluded).
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            self.non_finite += 1;
            return;
        }
        self.values[self.next] = x;
        self.next = (self.next + 1) % self.values.len();
        self.filled = (self.filled + 1).min(self.values.len());
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// A copy of the values held (unordered).
    pub fn snapshot(&self) -> Vec<f64> {
        self.values[..self.filled].to_vec()
    }
}

/// The result of a two-sample KS test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ks {
    /// Largest distance between the empirical CDFs.
    pub statistic: f64,
    /// Two-sided exact p-value.
    pub p_value: f64,
}

/// Two-sample two-sided Kolmogorov–Smirnov test, exact, as `scipy.stats.ks_2samp` (`auto` for
/// samples of at most [`MAX_SAMPLE`] values). Both inputs must be sorted and finite.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> Result<Ks, Unavailable> {
    let (n1, n2) = (a.len(), b.len());
    if n1 == 0 || n2 == 0 {
        return Err(Unavailable("a sample is empty".into()));
    }
    if n1.max(n2) > MAX_SAMPLE {
        return Err(Unavailable(format!(
            "samples above {MAX_SAMPLE} values are not supported"
        )));
    }
    // sup |F1 − F2| over every observed value, with right-continuous ECDFs (ties handled).
    let (mut i, mut j) = (0usize, 0usize);
    let mut d = 0f64;
    while i < n1 && j < n2 {
        let x = a[i].min(b[j]);
        while i < n1 && a[i] <= x {
            i += 1;
        }
        while j < n2 && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n1 as f64 - j as f64 / n2 as f64).abs());
    }
    let g = gcd(n1, n2);
    let lcm = (n1 / g) * n2;
    let h = (d * lcm as f64).round() as usize;
    let d = h as f64 / lcm as f64;
    if h == 0 {
        return Ok(Ks {
            statistic: d,
            p_value: 1.0,
        });
    }
    let p = if n1 == n2 {
        prob_outside_square(n1, h)
    } else {
        prob_outside_band(n1, n2, g, h)
    };
    Ok(Ks {
        statistic: d,
        p_value: p.clamp(0.0, 1.0),
    })
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// P(D ≥ h/n) for two samples of n: the alternating series of lattice-path reflections, each term
/// divided by binom(2n, n) and factored Horner-style to avoid cancellation.
fn prob_outside_square(n: usize, h: usize) -> f64 {
    let mut p = 0.0;
    let mut k = (n / h) as i64;
    while k >= 0 {
        let kh = k as usize * h;
        let mut term = 1.0;
        for j in 0..h {
            // n − kh − j may be negative for the largest k; the term is then 0.
            let num = n as f64 - kh as f64 - j as f64;
            term = num * term / (n + kh + j + 1) as f64;
        }
        p = term * (1.0 - p);
        k -= 1;
    }
    2.0 * p
}

/// P(D ≥ h/lcm) for samples of m and n: the share of monotone lattice paths from (0,0) to (m,n)
/// that leave the band |x/m − y/n| < h/lcm, computed column by column as a probability (the
/// "1 − p" form of Hodges' inside method, after Viehmann 2021), which never overflows.
fn prob_outside_band(m: usize, n: usize, g: usize, h: usize) -> f64 {
    let (m, n) = if m < n { (n, m) } else { (m, n) };
    let (mg, ng) = ((m / g) as i64, (n / g) as i64);
    let h = h as i64;
    let n_i = n as i64;
    let ceil_div = |a: i64, b: i64| -> i64 { (a + b - 1).div_euclid(b) };
    let mut minj: i64 = 0;
    let mut maxj: i64 = ceil_div(h, mg).min(n_i + 1);
    let mut curlen = maxj - minj;
    let len_a = (2 * maxj + 2).min(n_i + 1) as usize;
    // a[k] is the probability, for column x and row minj + k, that a path has already left the
    // band; cells outside the window count as 1 (left).
    let mut a = vec![1.0f64; len_a.max(1)];
    for cell in a.iter_mut().take(maxj as usize) {
        *cell = 0.0;
    }
    for i in 1..=(m as i64) {
        let (last_minj, last_len) = (minj, curlen);
        minj = ((ng * i - h).div_euclid(mg) + 1).clamp(0, n_i);
        maxj = ceil_div(ng * i + h, mg).min(n_i + 1);
        if maxj <= minj {
            return 1.0;
        }
        let mut val = if minj == 0 { 0.0 } else { 1.0 };
        for jj in 0..(maxj - minj) {
            let j = jj + minj;
            let prev = a[(jj + minj - last_minj) as usize];
            val = (prev * i as f64 + val * j as f64) / (i + j) as f64;
            a[jj as usize] = val;
        }
        curlen = maxj - minj;
        if last_len > curlen {
            for cell in a
                .iter_mut()
                .skip(curlen as usize)
                .take((last_len - curlen) as usize)
            {
                *cell = 1.0;
            }
        }
    }
    a[(maxj - minj - 1) as usize]
}

/// First Wasserstein distance between two samples, as `scipy.stats.wasserstein_distance(u, v)`:
/// the area between the two empirical CDFs. Inputs sorted and finite.
pub fn wasserstein(a: &[f64], b: &[f64]) -> Result<f64, Unavailable> {
    if a.is_empty() || b.is_empty() {
        return Err(Unavailable("a sample is empty".into()));
    }
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j) = (0usize, 0usize);
    let mut area = 0.0;
    let mut x = a[0].min(b[0]);
    while i < a.len() || j < b.len() {
        // Advance past every value equal to x, then integrate |F1 − F2| up to the next value.
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        let next = match (a.get(i), b.get(j)) {
            (Some(&p), Some(&q)) => p.min(q),
            (Some(&p), None) => p,
            (None, Some(&q)) => q,
            (None, None) => break,
        };
        area += (i as f64 / n1 - j as f64 / n2).abs() * (next - x);
        x = next;
    }
    Ok(area)
}

/// Population stability index Σ (w − r) · ln(w / r) over bins, with shares floored at 1e-4 so that
/// empty bins give a large finite value rather than infinity.
pub fn psi(reference_shares: &[f64], window_shares: &[f64]) -> f64 {
    const FLOOR: f64 = 1e-4;
    reference_shares
        .iter()
        .zip(window_shares)
        .map(|(&r, &w)| {
            let (r, w) = (r.max(FLOOR), w.max(FLOOR));
            (w - r) * (w / r).ln()
        })
        .sum()
}

/// Decile edges of a sorted reference (the inner 9 cut points).
pub fn decile_edges(sorted: &[f64]) -> Vec<f64> {
    if sorted.is_empty() {
        return Vec::new();
    }
    (1..PSI_BINS)
        .map(|k| sorted[(k * sorted.len() / PSI_BINS).min(sorted.len() - 1)])
        .collect()
}

/// Shares of `values` in the bins delimited by `edges` (value < edge → that bin).
pub fn bin_shares(values: &[f64], edges: &[f64]) -> Vec<f64> {
    let mut counts = vec![0u64; edges.len() + 1];
    for &v in values {
        counts[edges.partition_point(|&e| e <= v)] += 1;
    }
    let n = values.len().max(1) as f64;
    counts.iter().map(|&c| c as f64 / n).collect()
}

/// Benjamini–Hochberg adjusted p-values, as `scipy.stats.false_discovery_control(ps, method="bh")`.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&x, &y| p[x].total_cmp(&p[y]));
    let mut adjusted = vec![0.0; m];
    let mut running = 1.0f64;
    for rank in (0..m).rev() {
        let i = order[rank];
        running = running.min(p[i] * m as f64 / (rank + 1) as f64);
        adjusted[i] = running.min(1.0);
    }
    adjusted
}

/// What comparing one feature's window with its reference gives.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureDrift {
    /// Which test ran: `ks_2samp` or `chi2_contingency`.
    pub test: &'static str,
    /// Test statistic.
    pub statistic: f64,
    /// p-value.
    pub p_value: f64,
    /// Population stability index.
    pub psi: f64,
    /// Wasserstein distance (numeric features only).
    pub wasserstein: Option<f64>,
}

/// A numeric feature: KS, PSI over reference deciles, Wasserstein. `reference` sorted.
pub fn numeric_drift(reference: &[f64], window: &[f64]) -> Result<FeatureDrift, Unavailable> {
    let mut w = window.to_vec();
    w.sort_by(f64::total_cmp);
    let ks = ks_2samp(reference, &w)?;
    let edges = decile_edges(reference);
    Ok(FeatureDrift {
        test: "ks_2samp",
        statistic: ks.statistic,
        p_value: ks.p_value,
        psi: psi(&bin_shares(reference, &edges), &bin_shares(&w, &edges)),
        wasserstein: Some(wasserstein(reference, &w)?),
    })
}

/// A categorical feature: χ² test of independence on reference × window category counts (as
/// `scipy.stats.chi2_contingency` on the 2 × k table of categories seen in either), and PSI over
/// categories.
pub fn categorical_drift(
    reference: &BTreeMap<String, u64>,
    window: &BTreeMap<String, u64>,
) -> Result<FeatureDrift, Unavailable> {
    let categories: Vec<&String> = reference
        .keys()
        .chain(window.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if categories.len() < 2 {
        return Err(Unavailable("needs at least 2 categories".into()));
    }
    let row = |counts: &BTreeMap<String, u64>| -> Vec<u64> {
        categories
            .iter()
            .map(|c| counts.get(*c).copied().unwrap_or(0))
            .collect()
    };
    let (r, w) = (row(reference), row(window));
    let t = stats::chi2_contingency(&[r.clone(), w.clone()])?;
    let share = |v: &[u64]| {
        let n = v.iter().sum::<u64>().max(1) as f64;
        v.iter().map(|&c| c as f64 / n).collect::<Vec<_>>()
    };
    Ok(FeatureDrift {
        test: "chi2_contingency",
        statistic: t.statistic,
        p_value: t.p_value,
        psi: psi(&share(&r), &share(&w)),
        wasserstein: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(v: &[f64]) -> Vec<f64> {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-12)
    }

    const SHIFTED_A: [f64; 60] = [
        0.001, 0.299, -0.274, -0.891, -0.455, -0.992, 0.06, 1.34, -0.492, -0.62, 0.49, 0.357,
        0.105, -0.93, -0.029, 0.695, -1.344, -0.458, -1.901, -1.29, -1.842, -0.235, -1.267, 0.271,
        0.157, -0.187, -2.517, -0.539, -0.049, 0.113, -1.53, -0.478, -0.979, -0.809, 1.061, -0.808,
        -0.033, 0.884, -0.584, -0.112, 0.11, 0.064, -1.225, 0.076, 1.359, -1.547, 0.859, 0.119,
        -0.641, 2.0, 0.762, -1.199, 0.075, 0.577, -0.189, 0.683, -0.067, 0.667, 1.439, -0.676,
    ];
    const SHIFTED_B: [f64; 45] = [
        1.003, 0.337, 0.927, -0.387, 0.221, 0.604, 1.699, 1.945, -0.524, 0.005, 1.447, -1.192,
        0.337, 0.703, 2.057, 1.489, 0.473, 0.431, 0.55, 2.324, 0.372, 0.496, 1.153, 0.679, 0.603,
        -0.314, 0.788, 0.356, 1.966, 1.453, 0.776, 1.468, 0.46, 1.852, 0.795, 1.383, -0.491, 1.147,
        -0.888, -1.235, 0.496, -0.1, 0.964, 3.045, -0.032,
    ];

    /// scipy 1.17.1: `ks_2samp(a, b)` → statistic, pvalue; `wasserstein_distance(a, b)`.
    #[test]
    fn ks_and_wasserstein_match_scipy() {
        let cases: Vec<(Vec<f64>, Vec<f64>, f64, f64, f64)> = vec![
            (
                vec![1., 2., 2., 3., 3., 3., 4., 5.],
                vec![2., 3., 3., 4., 4., 5., 5., 6., 7.],
                0.4166666666666667,
                0.35170711641299884,
                1.4583333333333333,
            ),
            (
                vec![0.1, 0.4, 0.35, 0.8, 0.9, 0.25],
                vec![0.5, 0.6, 0.7, 0.95, 0.15, 0.55],
                0.5,
                0.474025974025974,
                0.1416666666666667,
            ),
            (vec![1., 2., 3., 4.], vec![1., 2., 3., 4.], 0.0, 1.0, 0.0),
            (
                SHIFTED_A.to_vec(),
                SHIFTED_B.to_vec(),
                0.5222222222222223,
                6.626161682548968e-07,
                0.9125666666666669,
            ),
            (
                (0..1000)
                    .map(|i| ((i * 7919) % 1000) as f64 / 1000.0)
                    .collect(),
                (0..800)
                    .map(|i| (((i * 104729) % 800) as f64 / 800.0).powf(1.3))
                    .collect(),
                0.09725,
                0.00041559232419430736,
                0.06534241882752992,
            ),
        ];
        for (a, b, d, p, w) in cases {
            let (a, b) = (sorted(&a), sorted(&b));
            let ks = ks_2samp(&a, &b).unwrap();
            assert!(close(ks.statistic, d, 1e-12), "{} vs {d}", ks.statistic);
            assert!(
                (ks.p_value - p).abs() <= 1e-6 * p.max(1e-300) || (ks.p_value - p).abs() < 1e-12,
                "{} vs {p}",
                ks.p_value
            );
            assert!(
                close(wasserstein(&a, &b).unwrap(), w, 1e-9),
                "{} vs {w}",
                wasserstein(&a, &b).unwrap()
            );
        }
        // Equal sizes, large: scipy 0.011, 0.9999999867571524.
        let a = sorted(
            &(0..1000)
                .map(|i| ((i * 7919) % 1000) as f64 / 1000.0)
                .collect::<Vec<_>>(),
        );
        let b = sorted(
            &(0..1000)
                .map(|i| ((i * 3083) % 1000) as f64 / 1000.0 + 0.01)
                .collect::<Vec<_>>(),
        );
        let ks = ks_2samp(&a, &b).unwrap();
        assert!(close(ks.statistic, 0.011, 1e-12));
        assert!(
            close(ks.p_value, 0.9999999867571524, 1e-9),
            "{}",
            ks.p_value
        );
        assert!(ks_2samp(&[], &a).is_err());
    }

    /// scipy 1.17.1: `false_discovery_control(ps, method="bh")`.
    #[test]
    fn benjamini_hochberg_matches_scipy() {
        let p = [0.01, 0.04, 0.03, 0.005, 0.2, 0.5, 0.9, 0.045];
        let want = [
            0.04,
            0.072,
            0.072,
            0.04,
            0.26666666666666666,
            0.5714285714285714,
            0.9,
            0.072,
        ];
        for (a, b) in benjamini_hochberg(&p).iter().zip(want) {
            assert!(close(*a, b, 1e-12), "{a} vs {b}");
        }
    }

    #[test]
    fn windows_roll_without_growing_and_skip_non_finite() {
        let mut w = Window::new(3);
        for x in [1.0, f64::NAN, 2.0, 3.0, f64::INFINITY, 4.0] {
            w.push(x);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.non_finite, 2);
        assert_eq!(sorted(&w.snapshot()), vec![2.0, 3.0, 4.0]);
    }

    #[test]
    fn psi_and_categorical_drift() {
        let r = sorted(&(0..1000).map(|i| i as f64).collect::<Vec<_>>());
        let same = numeric_drift(&r, &r).unwrap();
        assert!(same.psi.abs() < 1e-9 && same.p_value == 1.0);
        let shifted: Vec<f64> = (0..1000).map(|i| i as f64 + 300.0).collect();
        let d = numeric_drift(&r, &shifted).unwrap();
        assert!(d.psi > 0.5 && d.p_value < 1e-10, "{d:?}");
        let counts = |v: &[(&str, u64)]| {
            v.iter()
                .map(|(k, c)| (k.to_string(), *c))
                .collect::<BTreeMap<_, _>>()
        };
        let c = categorical_drift(
            &counts(&[("red", 30), ("blue", 70)]),
            &counts(&[("red", 45), ("blue", 55), ("green", 25)]),
        )
        .unwrap();
        // scipy: chi2_contingency([[30, 70, 0], [45, 55, 25]]) — checked in stats against scipy.
        assert_eq!(c.test, "chi2_contingency");
        assert!(c.p_value < 0.001);
        assert!(categorical_drift(&counts(&[("red", 3)]), &counts(&[("red", 5)])).is_err());
    }
}
