//! Data drift: sliding windows of live feature values, and the tests that compare them with a
//! reference sample — two-sample Kolmogorov–Smirnov (exact, as `scipy.stats.ks_2samp`), χ² on
//! category counts, the population stability index and the Wasserstein distance — with
//! Benjamini–Hochberg across features. Plain Rust.
//!
//! `ks_2samp` with `method="auto"` computes exact p-values when both samples have at most 10,000
//! values; modelgate caps references and windows at 10,000 ([`MAX_SAMPLE`]), so the exact path
//! is the one that always applies.
//!
//! Live values are compared with the reference at the precision they travel in (a window
//! remembers its tensors' [`Precision`]; the reference is rounded to it at each evaluation), and
//! drift comes in episodes with hysteresis ([`Episode`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::record::Precision;
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
    /// The coarsest precision its values arrived in.
    pub precision: Precision,
}

impl Window {
    /// A window of `size` values.
    pub fn new(size: usize) -> Self {
        Window {
            values: vec![0.0; size.max(1)],
            next: 0,
            filled: 0,
            non_finite: 0,
            precision: Precision::F64,
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

/// The least share a PSI bin counts with, so that an empty bin gives a large finite value rather
/// than infinity.
pub const PSI_FLOOR: f64 = 1e-4;

/// Population stability index Σ (w − r) · ln(w / r) over bins, with shares floored at
/// [`PSI_FLOOR`].
pub fn psi(reference_shares: &[f64], window_shares: &[f64]) -> f64 {
    reference_shares
        .iter()
        .zip(window_shares)
        .map(|(&r, &w)| {
            let (r, w) = (r.max(PSI_FLOOR), w.max(PSI_FLOOR));
            (w - r) * (w / r).ln()
        })
        .sum()
}

/// Decile edges of a sorted reference (the inner 9 cut points): the values at positions
/// ⌊k·n/10⌋, k = 1…9, without interpolation.
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

/// A live window of a categorical feature: a ring of category ids with their counts. Only a new
/// category allocates.
#[derive(Clone, Debug, Default)]
pub struct CategoryWindow {
    ring: Vec<u32>,
    next: usize,
    filled: usize,
    names: Vec<String>,
    ids: std::collections::HashMap<String, u32>,
    counts: Vec<u64>,
    /// The coarsest precision its numbers arrived in.
    pub precision: Precision,
}

impl CategoryWindow {
    /// A window of `size` values.
    pub fn new(size: usize) -> Self {
        CategoryWindow {
            ring: vec![0; size.max(1)],
            ..Default::default()
        }
    }

    /// Adds one value.
    pub fn push(&mut self, category: &str) {
        let id = match self.ids.get(category) {
            Some(&id) => id,
            None => {
                let id = self.names.len() as u32;
                self.names.push(category.to_string());
                self.ids.insert(category.to_string(), id);
                self.counts.push(0);
                id
            }
        };
        if self.filled == self.ring.len() {
            self.counts[self.ring[self.next] as usize] -= 1;
        }
        self.ring[self.next] = id;
        self.counts[id as usize] += 1;
        self.next = (self.next + 1) % self.ring.len();
        self.filled = (self.filled + 1).min(self.ring.len());
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Category → count of the values held.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.names
            .iter()
            .zip(&self.counts)
            .filter(|(_, &c)| c > 0)
            .map(|(n, &c)| (n.clone(), c))
            .collect()
    }
}

/// A feature's reference data.
#[derive(Clone, Debug, PartialEq)]
pub enum ReferenceData {
    /// Sorted finite values.
    Numeric(Vec<f64>),
    /// Category → count.
    Categorical(BTreeMap<String, u64>),
}

impl ReferenceData {
    /// Values in the reference.
    pub fn len(&self) -> usize {
        match self {
            ReferenceData::Numeric(v) => v.len(),
            ReferenceData::Categorical(c) => c.values().sum::<u64>() as usize,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A feature of a reference.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceFeature {
    /// Feature name.
    pub name: String,
    /// Its data.
    pub data: ReferenceData,
    /// NaN and infinite values seen (excluded).
    pub non_finite: u64,
}

/// A model's reference sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// Features, in order.
    pub features: Vec<ReferenceFeature>,
    /// Rows kept.
    pub rows: u64,
    /// Rows received.
    pub received: u64,
    /// Whether the rows were uniformly sampled down.
    pub sampled: bool,
    /// "uploaded" or "captured".
    pub source: String,
    /// When it was made.
    pub created_at_ms: u64,
}

/// Builds a reference from rows (values in the order of `names`). More than `max` rows are
/// uniformly sampled (a seeded shuffle, so the same upload gives the same reference). A feature
/// is categorical when declared so or when any of its values is a string.
pub fn build_reference(
    names: &[String],
    rows: Vec<Vec<crate::record::FeatureValue>>,
    categorical: &[String],
    max: usize,
    source: &str,
    now_ms: u64,
) -> Result<Reference, String> {
    use crate::record::{format_number, FeatureValue};
    use rand::seq::SliceRandom;
    if names.is_empty() {
        return Err("feature_names: required".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        crate::feature_store::validate_feature_name(n)
            .map_err(|e| format!("feature_names: {e}"))?;
        if !seen.insert(n) {
            return Err(format!("feature_names: '{n}' is listed twice"));
        }
    }
    for c in categorical {
        if !names.contains(c) {
            return Err(format!(
                "categorical_features: '{c}' is not in feature_names"
            ));
        }
    }
    if rows.is_empty() {
        return Err("rows: required".into());
    }
    if let Some((i, r)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() != names.len())
    {
        return Err(format!(
            "rows[{i}]: {} values for {} feature names",
            r.len(),
            names.len()
        ));
    }
    let received = rows.len() as u64;
    let mut rows = rows;
    let sampled = rows.len() > max;
    if sampled {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x5eed);
        rows.shuffle(&mut rng);
        rows.truncate(max);
    }
    let features = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let is_cat = categorical.contains(name)
                || rows.iter().any(|r| matches!(r[i], FeatureValue::Text(_)));
            let mut non_finite = 0;
            let data = if is_cat {
                let mut counts = BTreeMap::new();
                for r in &rows {
                    let key = match &r[i] {
                        FeatureValue::Text(s) => s.clone(),
                        FeatureValue::Number(x) => format_number(*x),
                    };
                    *counts.entry(key).or_insert(0) += 1;
                }
                ReferenceData::Categorical(counts)
            } else {
                let mut v: Vec<f64> = rows
                    .iter()
                    .filter_map(|r| match r[i] {
                        FeatureValue::Number(x) if x.is_finite() => Some(x),
                        _ => {
                            non_finite += 1;
                            None
                        }
                    })
                    .collect();
                v.sort_by(f64::total_cmp);
                ReferenceData::Numeric(v)
            };
            ReferenceFeature {
                name: name.clone(),
                data,
                non_finite,
            }
        })
        .collect();
    Ok(Reference {
        features,
        rows: rows.len() as u64,
        received,
        sampled,
        source: source.to_string(),
        created_at_ms: now_ms,
    })
}

/// A live window, numeric or categorical, matching its reference feature.
#[derive(Clone, Debug)]
pub enum LiveWindow {
    /// Numbers.
    Numeric(Window),
    /// Categories.
    Categorical(CategoryWindow),
}

impl LiveWindow {
    /// An empty window of `size` for `feature`.
    pub fn for_feature(feature: &ReferenceFeature, size: usize) -> Self {
        match feature.data {
            ReferenceData::Numeric(_) => LiveWindow::Numeric(Window::new(size)),
            ReferenceData::Categorical(_) => LiveWindow::Categorical(CategoryWindow::new(size)),
        }
    }

    /// Adds a live value that travelled at `precision`.
    pub fn push(&mut self, v: &crate::record::FeatureValue, precision: Precision) {
        use crate::record::FeatureValue;
        match (self, v) {
            (LiveWindow::Numeric(w), FeatureValue::Number(x)) => {
                w.precision = w.precision.join(precision);
                w.push(*x)
            }
            // A string where numbers are expected cannot be compared: count it as non-finite.
            (LiveWindow::Numeric(w), FeatureValue::Text(_)) => w.non_finite += 1,
            (LiveWindow::Categorical(w), FeatureValue::Text(s)) => w.push(s),
            (LiveWindow::Categorical(w), FeatureValue::Number(x)) => {
                w.precision = w.precision.join(precision);
                w.push(&precision.category(*x))
            }
        }
    }

    /// The precision the window's values are compared at.
    pub fn precision(&self) -> Precision {
        match self {
            LiveWindow::Numeric(w) => w.precision,
            LiveWindow::Categorical(w) => w.precision,
        }
    }
}

/// `values` at `precision` (a copy only when rounding can change them). Rounding is monotone, so
/// sorted values stay sorted.
fn at_precision(values: &[f64], precision: Precision) -> Cow<'_, [f64]> {
    if precision == Precision::F64 {
        Cow::Borrowed(values)
    } else {
        Cow::Owned(values.iter().map(|&x| precision.round(x)).collect())
    }
}

/// Category counts with every category written as a number ([`format_number`]'s form) renamed to
/// that number at `precision`, merging those that become one: a reference's `0.123456789` meets
/// the FP32 window's `0.12345679`. Text that merely looks like a number in another form (`0.10`,
/// `1e5`) stays as it is.
///
/// [`format_number`]: crate::record::format_number
fn categories_at(
    counts: &BTreeMap<String, u64>,
    precision: Precision,
) -> Cow<'_, BTreeMap<String, u64>> {
    if precision == Precision::F64 {
        return Cow::Borrowed(counts);
    }
    let mut out = BTreeMap::new();
    for (k, &c) in counts {
        let key = match k.parse::<f64>() {
            Ok(x) if x.is_finite() && crate::record::format_number(x) == *k => {
                precision.category(x)
            }
            _ => k.clone(),
        };
        *out.entry(key).or_insert(0) += c;
    }
    Cow::Owned(out)
}

/// A feature's evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureResult {
    /// Name.
    pub name: String,
    /// Categorical feature.
    pub categorical: bool,
    /// Reference values.
    pub reference_size: u64,
    /// Window values.
    pub window_size: u64,
    /// Non-finite live values.
    pub non_finite: u64,
    /// The test, or why not.
    pub result: Result<FeatureDrift, Unavailable>,
    /// Benjamini–Hochberg adjusted p-value.
    pub adjusted: Option<f64>,
    /// Adjusted p-value below the false discovery rate, at this evaluation.
    pub alarm: bool,
    /// In a drift episode (set by [`update_episodes`]; false before).
    pub drifted: bool,
    /// While drifted: evaluations in a row above the exit level (set by [`update_episodes`]).
    pub quiet_evaluations: u32,
    /// The precision the window and the reference were compared at.
    pub precision: Precision,
}

/// Evaluates every feature's window against the reference, both at the window's precision, then
/// adjusts the p-values across features (Benjamini–Hochberg) and raises the alarm for those below
/// `fdr`.
pub fn evaluate(reference: &Reference, windows: &[LiveWindow], fdr: f64) -> Vec<FeatureResult> {
    let mut out: Vec<FeatureResult> = reference
        .features
        .iter()
        .zip(windows)
        .map(|(f, w)| {
            let precision = w.precision();
            let (result, window_size, non_finite) = match (&f.data, w) {
                (ReferenceData::Numeric(r), LiveWindow::Numeric(w)) => (
                    if w.is_empty() {
                        Err(Unavailable("no live values yet".into()))
                    } else {
                        numeric_drift(
                            &at_precision(r, precision),
                            &at_precision(&w.snapshot(), precision),
                        )
                    },
                    w.len(),
                    w.non_finite,
                ),
                (ReferenceData::Categorical(r), LiveWindow::Categorical(w)) => (
                    if w.is_empty() {
                        Err(Unavailable("no live values yet".into()))
                    } else {
                        categorical_drift(
                            &categories_at(r, precision),
                            &categories_at(&w.counts(), precision),
                        )
                    },
                    w.len(),
                    0,
                ),
                _ => (
                    Err(Unavailable("window and reference differ in kind".into())),
                    0,
                    0,
                ),
            };
            FeatureResult {
                name: f.name.clone(),
                categorical: matches!(f.data, ReferenceData::Categorical(_)),
                reference_size: f.data.len() as u64,
                window_size: window_size as u64,
                non_finite,
                result,
                adjusted: None,
                alarm: false,
                drifted: false,
                quiet_evaluations: 0,
                precision,
            }
        })
        .collect();
    let tested: Vec<usize> = (0..out.len()).filter(|&i| out[i].result.is_ok()).collect();
    let p: Vec<f64> = tested
        .iter()
        .map(|&i| out[i].result.as_ref().map(|d| d.p_value).unwrap_or(1.0))
        .collect();
    for (&i, adj) in tested.iter().zip(benjamini_hochberg(&p)) {
        out[i].adjusted = Some(adj);
        out[i].alarm = adj < fdr;
    }
    out
}

/// Where one evaluation puts a feature (or a version's performance) against the two levels of
/// its hysteresis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Beyond the alarm level (adjusted p below the false discovery rate; degradation above the
    /// threshold): starts an episode.
    Alarm,
    /// Between the levels, or not testable: keeps an episode going and restarts its count.
    Between,
    /// Beyond the exit level (adjusted p above it; degradation at most it): counts towards the
    /// end of an episode.
    Quiet,
}

/// A drift episode with hysteresis: it starts at the first [`Level::Alarm`] and ends only after
/// `exit_after` [`Level::Quiet`] evaluations in a row. A statistic that hovers at the alarm
/// level therefore starts one episode, not one per crossing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Episode {
    /// In an episode.
    pub drifted: bool,
    /// While drifted: quiet evaluations in a row.
    pub quiet: u32,
}

impl Episode {
    /// Moves the episode on by one evaluation. True when it started or ended.
    pub fn step(&mut self, level: Level, exit_after: u32) -> bool {
        match (self.drifted, level) {
            (false, Level::Alarm) => {
                *self = Episode {
                    drifted: true,
                    quiet: 0,
                };
                true
            }
            (false, _) => false,
            (true, Level::Quiet) => {
                self.quiet += 1;
                if self.quiet >= exit_after.max(1) {
                    *self = Episode::default();
                    true
                } else {
                    false
                }
            }
            (true, _) => {
                self.quiet = 0;
                false
            }
        }
    }
}

/// The levels of data drift's hysteresis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hysteresis {
    /// Adjusted p-value below which a feature starts drifting (the false discovery rate).
    pub fdr: f64,
    /// Adjusted p-value above which an evaluation is quiet.
    pub exit_p_value: f64,
    /// Quiet evaluations in a row that end a feature's drift.
    pub exit_evaluations: u32,
}

impl Hysteresis {
    /// Where an adjusted p-value (none: the feature could not be tested) stands.
    pub fn level(&self, adjusted: Option<f64>) -> Level {
        match adjusted {
            Some(p) if p < self.fdr => Level::Alarm,
            Some(p) if p > self.exit_p_value => Level::Quiet,
            _ => Level::Between,
        }
    }
}

/// Moves each feature's episode on by one evaluation. `episodes` holds the features in an
/// episode with their quiet evaluations in a row, and is updated; features it names that the
/// evaluation does not (no longer in the reference) are dropped from it. Sets `drifted` and
/// `quiet_evaluations` on the results.
pub fn update_episodes(
    results: &mut [FeatureResult],
    episodes: &mut BTreeMap<String, u32>,
    h: &Hysteresis,
) {
    let mut next = BTreeMap::new();
    for f in results.iter_mut() {
        let mut e = match episodes.get(&f.name) {
            Some(&quiet) => Episode {
                drifted: true,
                quiet,
            },
            None => Episode::default(),
        };
        e.step(h.level(f.adjusted), h.exit_evaluations);
        f.drifted = e.drifted;
        f.quiet_evaluations = e.quiet;
        if e.drifted {
            next.insert(f.name.clone(), e.quiet);
        }
    }
    *episodes = next;
}

/// The metric of a version's concept-drift window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConceptMetric {
    /// Share of right outcomes (higher is better).
    Accuracy,
    /// Mean absolute error (lower is better).
    Mae,
}

impl ConceptMetric {
    /// The metric name, as registered metrics use it.
    pub fn as_str(self) -> &'static str {
        match self {
            ConceptMetric::Accuracy => "accuracy",
            ConceptMetric::Mae => "mae",
        }
    }

    /// How much worse `current` is than `baseline` (positive = worse).
    pub fn degradation(self, baseline: f64, current: f64) -> f64 {
        match self {
            ConceptMetric::Accuracy => baseline - current,
            ConceptMetric::Mae => current - baseline,
        }
    }
}

/// The last N outcomes of a model version: 1/0 for right/wrong, or the absolute error.
#[derive(Clone, Debug)]
pub struct ConceptWindow {
    /// Which metric.
    pub metric: ConceptMetric,
    ring: Vec<f64>,
    next: usize,
    filled: usize,
    sum: f64,
}

impl ConceptWindow {
    /// An empty window of `size`.
    pub fn new(metric: ConceptMetric, size: usize) -> Self {
        ConceptWindow {
            metric,
            ring: vec![0.0; size.max(1)],
            next: 0,
            filled: 0,
            sum: 0.0,
        }
    }

    /// Adds one outcome's value.
    pub fn push(&mut self, x: f64) {
        if self.filled == self.ring.len() {
            self.sum -= self.ring[self.next];
        }
        self.ring[self.next] = x;
        self.sum += x;
        self.next = (self.next + 1) % self.ring.len();
        self.filled = (self.filled + 1).min(self.ring.len());
    }

    /// Outcomes held.
    pub fn fill(&self) -> usize {
        self.filled
    }

    /// Window size.
    pub fn size(&self) -> usize {
        self.ring.len()
    }

    /// The metric over a full window (`None` until it is full).
    pub fn current(&self) -> Option<f64> {
        (self.filled == self.ring.len()).then(|| self.sum / self.filled as f64)
    }
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
        // (a, b, statistic, p-value, Wasserstein)
        type Case = (Vec<f64>, Vec<f64>, f64, f64, f64);
        let cases: Vec<Case> = vec![
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

    /// The numpy `psi` of docs/drift-and-events.md (reference deciles without interpolation,
    /// `searchsorted(side="right")`, shares floored at 1e-4) gives these.
    #[test]
    fn psi_is_the_documented_one() {
        let d = numeric_drift(&sorted(&SHIFTED_A), &SHIFTED_B).unwrap();
        assert!(close(d.psi, 2.168681562259346, 1e-12), "{}", d.psi);
        // Ties: repeated edges leave bins empty on both sides.
        let r = sorted(&[1., 1., 1., 2., 2., 3., 4., 5., 5., 5.]);
        let d = numeric_drift(&r, &[5., 5., 5., 5., 6.]).unwrap();
        assert!(close(d.psi, 6.143480502969557, 1e-12), "{}", d.psi);
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

    /// 50 features, no drift, 100 evaluations: Benjamini–Hochberg keeps false alarms to a few
    /// percent of evaluations, where testing each feature at 0.05 would alarm in nearly all.
    #[test]
    fn no_drift_rarely_alarms_across_many_features() {
        struct Rng(u64);
        impl Rng {
            fn normal(&mut self) -> f64 {
                // Box–Muller on a xorshift.
                let mut u = || {
                    self.0 ^= self.0 << 13;
                    self.0 ^= self.0 >> 7;
                    self.0 ^= self.0 << 17;
                    ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
                };
                let (a, b) = (u(), u());
                (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
            }
        }
        let mut rng = Rng(42);
        let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        let rows: Vec<Vec<crate::record::FeatureValue>> = (0..1000)
            .map(|_| {
                (0..50)
                    .map(|_| crate::record::FeatureValue::Number(rng.normal()))
                    .collect()
            })
            .collect();
        let reference = build_reference(&names, rows, &[], MAX_SAMPLE, "uploaded", 0).unwrap();
        let mut windows: Vec<LiveWindow> = reference
            .features
            .iter()
            .map(|f| LiveWindow::for_feature(f, 300))
            .collect();
        let (mut alarms, mut naive) = (0, 0);
        for _ in 0..100 {
            // 100 new rows between evaluations, like --drift-every.
            for _ in 0..100 {
                for w in windows.iter_mut() {
                    w.push(
                        &crate::record::FeatureValue::Number(rng.normal()),
                        Precision::F64,
                    );
                }
            }
            let r = evaluate(&reference, &windows, 0.05);
            alarms += usize::from(r.iter().any(|f| f.alarm));
            naive += usize::from(
                r.iter()
                    .any(|f| f.result.as_ref().is_ok_and(|d| d.p_value < 0.05)),
            );
        }
        assert!(alarms <= 8, "{alarms} of 100 evaluations alarmed");
        assert!(
            naive >= 50,
            "uncorrected tests alarm most of the time: {naive}"
        );
    }

    /// A decimal grid uploaded as float64 and FP32 live values in the same shares: compared at
    /// FP32 there is no difference at all, as scipy finds on the decimal values. Compared at
    /// float64, 0.1f widened (0.10000000149…) is not 0.1, and scipy 1.17.1 on the widened values
    /// agrees with what modelgate used to answer: `ks_2samp(ref, [float(np.float32(v)) …])` →
    /// D = 0.1, p = 0.42832150746897646; the categories split in two, p = 2.4e-82.
    #[test]
    fn float32_traffic_is_compared_at_float32() {
        use crate::record::FeatureValue::Number;
        let names = vec!["x".to_string(), "c".to_string()];
        let grid = |i: usize| ((i % 10) + 1) as f64 / 10.0;
        let rows: Vec<_> = (0..300)
            .map(|i| vec![Number(grid(i)), Number(((i % 4) + 1) as f64 / 10.0)])
            .collect();
        let reference = build_reference(&names, rows, &["c".into()], MAX_SAMPLE, "u", 0).unwrap();
        let mut windows: Vec<LiveWindow> = reference
            .features
            .iter()
            .map(|f| LiveWindow::for_feature(f, 100))
            .collect();
        for i in 0..100 {
            let x = grid(i * 7) as f32;
            let c = (((i * 3) % 4) + 1) as f32 / 10.0;
            windows[0].push(&Number(f64::from(x)), Precision::F32);
            windows[1].push(&Number(f64::from(c)), Precision::F32);
        }
        let r = evaluate(&reference, &windows, 0.05);
        assert_eq!(r[0].precision, Precision::F32);
        let ks = r[0].result.as_ref().unwrap();
        // scipy: ks_2samp on the decimal values → 0.0, 1.0
        assert_eq!((ks.statistic, ks.p_value), (0.0, 1.0), "{ks:?}");
        let chi = r[1].result.as_ref().unwrap();
        // scipy: chi2_contingency([[75, 75, 75, 75], [25, 25, 25, 25]]) → 0.0, 1.0
        assert_eq!((chi.statistic, chi.p_value), (0.0, 1.0), "{chi:?}");
        assert!(r.iter().all(|f| !f.alarm));
        // The same windows taken as float64 (as before): every grid point splits in two.
        let mut wide: Vec<LiveWindow> = reference
            .features
            .iter()
            .map(|f| LiveWindow::for_feature(f, 100))
            .collect();
        for i in 0..100 {
            let x = grid(i * 7) as f32;
            let c = (((i * 3) % 4) + 1) as f32 / 10.0;
            wide[0].push(&Number(f64::from(x)), Precision::F64);
            wide[1].push(&Number(f64::from(c)), Precision::F64);
        }
        let r = evaluate(&reference, &wide, 0.05);
        let ks = r[0].result.as_ref().unwrap();
        assert!(close(ks.statistic, 0.1, 1e-12), "{ks:?}");
        assert!(close(ks.p_value, 0.42832150746897646, 1e-6), "{ks:?}");
        assert!(r[1].alarm, "{r:?}");
    }

    #[test]
    fn categories_meet_at_the_coarser_precision() {
        let counts = |v: &[(&str, u64)]| {
            v.iter()
                .map(|(k, c)| (k.to_string(), *c))
                .collect::<BTreeMap<_, _>>()
        };
        let reference = counts(&[("0.123456789", 3), ("0.1", 2), ("0.10", 1), ("red", 4)]);
        let at32 = categories_at(&reference, Precision::F32);
        assert_eq!(
            *at32,
            counts(&[("0.12345679", 3), ("0.1", 2), ("0.10", 1), ("red", 4)]),
            "numbers in format_number's form are renamed; text stays"
        );
        assert!(matches!(
            categories_at(&reference, Precision::F64),
            Cow::Borrowed(_)
        ));
        // 1.0001 and 1.0002 are one number in FP16 (spacing 2^-10 near 1).
        let close_by = counts(&[("1.0001", 1), ("1.0002", 2)]);
        let merged = categories_at(&close_by, Precision::F16);
        assert_eq!(*merged, counts(&[("1", 3)]));
    }

    #[test]
    fn episodes_start_at_the_alarm_and_end_after_quiet_evaluations() {
        let h = Hysteresis {
            fdr: 0.05,
            exit_p_value: 0.2,
            exit_evaluations: 3,
        };
        let result = |adjusted: Option<f64>| FeatureResult {
            name: "x".into(),
            categorical: false,
            reference_size: 1,
            window_size: 1,
            non_finite: 0,
            result: Err(Unavailable(String::new())),
            adjusted,
            alarm: false,
            drifted: false,
            quiet_evaluations: 0,
            precision: Precision::F64,
        };
        let mut episodes = BTreeMap::new();
        let mut run = |p: Option<f64>| {
            let mut r = [result(p)];
            update_episodes(&mut r, &mut episodes, &h);
            (r[0].drifted, r[0].quiet_evaluations)
        };
        assert_eq!(run(Some(0.1)), (false, 0), "between the levels: no episode");
        assert_eq!(run(Some(0.04)), (true, 0), "below the rate: starts");
        assert_eq!(run(Some(0.06)), (true, 0), "hovering: goes on");
        assert_eq!(run(Some(0.5)), (true, 1));
        assert_eq!(run(Some(0.9)), (true, 2));
        assert_eq!(
            run(Some(0.15)),
            (true, 0),
            "between: the count starts again"
        );
        assert_eq!(run(None), (true, 0), "untestable: likewise");
        assert_eq!(run(Some(0.3)), (true, 1));
        assert_eq!(run(Some(0.3)), (true, 2));
        assert_eq!(
            run(Some(0.2)),
            (true, 0),
            "at the exit level is not above it"
        );
        for _ in 0..2 {
            assert!(run(Some(1.0)).0);
        }
        assert_eq!(run(Some(1.0)), (false, 0), "three in a row: ends");
        let mut stale = BTreeMap::from([("gone".to_string(), 1)]);
        update_episodes(&mut [result(Some(0.9))], &mut stale, &h);
        assert!(stale.is_empty(), "features no longer tested leave");
        let mut e = Episode::default();
        assert!(!e.step(Level::Quiet, 0));
        assert!(e.step(Level::Alarm, 0));
        assert!(e.step(Level::Quiet, 0), "an exit count of 0 acts as 1");
    }

    #[test]
    fn category_windows_forget_old_values() {
        let mut w = CategoryWindow::new(3);
        for c in ["a", "a", "b", "c", "c"] {
            w.push(c);
        }
        let counts = w.counts();
        assert_eq!(counts.get("a"), None);
        assert_eq!(counts.get("c"), Some(&2));
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn references_sample_large_uploads_and_detect_categories() {
        use crate::record::FeatureValue::{Number, Text};
        let names = vec!["x".to_string(), "colour".to_string(), "zip".to_string()];
        let rows: Vec<_> = (0..50)
            .map(|i| {
                vec![
                    Number(i as f64),
                    Text(if i % 2 == 0 { "red" } else { "blue" }.into()),
                    Number((i % 3) as f64),
                ]
            })
            .collect();
        let r = build_reference(&names, rows.clone(), &["zip".into()], 20, "uploaded", 0).unwrap();
        assert!(r.sampled);
        assert_eq!((r.rows, r.received), (20, 50));
        assert!(matches!(r.features[0].data, ReferenceData::Numeric(ref v) if v.len() == 20));
        assert!(matches!(r.features[1].data, ReferenceData::Categorical(_)));
        assert!(matches!(r.features[2].data, ReferenceData::Categorical(ref c) if c.len() == 3));
        assert_eq!(
            build_reference(&names, rows.clone(), &[], 20, "uploaded", 0),
            build_reference(&names, rows, &[], 20, "uploaded", 0),
            "deterministic"
        );
        assert!(
            build_reference(&names, vec![vec![Number(1.0)]], &[], 10, "u", 0)
                .unwrap_err()
                .starts_with("rows[0]")
        );
        assert!(build_reference(&names, vec![], &[], 10, "u", 0)
            .unwrap_err()
            .starts_with("rows"));
        assert!(
            build_reference(&names, vec![], &["nope".into()], 10, "u", 0)
                .unwrap_err()
                .starts_with("categorical_features")
        );
    }

    #[test]
    fn concept_windows() {
        let mut w = ConceptWindow::new(ConceptMetric::Accuracy, 4);
        for x in [1.0, 1.0, 0.0] {
            w.push(x);
        }
        assert_eq!(w.current(), None, "insufficient data until full");
        w.push(1.0);
        assert_eq!(w.current(), Some(0.75));
        w.push(0.0);
        assert_eq!(w.current(), Some(0.5));
        assert!((ConceptMetric::Accuracy.degradation(0.9, 0.75) - 0.15).abs() < 1e-12);
        assert!((ConceptMetric::Mae.degradation(1.0, 1.5) - 0.5).abs() < 1e-12);
    }
}
