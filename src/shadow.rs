//! Shadow deployments: which versions receive a copy of production's traffic, which requests are
//! mirrored, and when a shadow's answer agrees with production's. Plain Rust.
//!
//! **Sampling** is a pure function of (model, key), where the key is the unit id when the request
//! has one, else the request id: XXH3-64 of `shadow/<model>/<key>`, top 53 bits → u ∈ [0, 1),
//! mirrored when u < sample_fraction. The shadow version is not in the hash, so every shadow of a
//! model mirrors the same users (a 10% shadow's users are a subset of a 20% shadow's).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::record::{format_number, Prediction};
use crate::registry::{Registry, RegistryError};

/// Default deadline of a shadow call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest deadline a shadow call may have.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest deadline a shadow call may have (deadlines are kept in milliseconds).
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

pub use crate::spec::Comparison;

/// A shadow of one model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    /// Model.
    pub model: String,
    /// The shadow version.
    pub version: u32,
    /// Share of requests mirrored, (0, 1].
    pub sample_fraction: f64,
    /// Agreement rule.
    pub comparison: Comparison,
    /// Deadline of each shadow call, ms.
    pub timeout_ms: u64,
    /// When it was set.
    pub created_at_ms: u64,
}

/// What `SetShadow` asks for; `None` means the default.
#[derive(Clone, Debug, Default)]
pub struct ShadowSpec {
    /// Share of requests mirrored.
    pub sample_fraction: f64,
    /// Agreement rule (default: same label).
    pub comparison: Option<Comparison>,
    /// Deadline of each copy (default 1 s).
    pub timeout: Option<Duration>,
}

/// Why a shadow operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShadowError {
    /// A field is missing or malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Field.
        field: &'static str,
        /// Reason.
        reason: String,
    },
    /// No shadow for that version.
    #[error("model '{model}' has no shadow version {version}")]
    NotFound {
        /// Model.
        model: String,
        /// Version.
        version: u32,
    },
    /// Unknown model or version.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ShadowError {
    ShadowError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Every shadow, by model and version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shadows {
    by_key: BTreeMap<(String, u32), Shadow>,
}

impl Shadows {
    /// From stored records.
    pub fn from_records(list: Vec<Shadow>) -> Self {
        Shadows {
            by_key: list
                .into_iter()
                .map(|s| ((s.model.clone(), s.version), s))
                .collect(),
        }
    }

    /// Every shadow.
    pub fn all(&self) -> impl Iterator<Item = &Shadow> {
        self.by_key.values()
    }

    /// One model's shadows.
    pub fn of(&self, model: &str) -> impl Iterator<Item = &Shadow> {
        let model = model.to_string();
        self.by_key.values().filter(move |s| s.model == model)
    }

    /// Sets (or replaces) the shadow of a version.
    pub fn set(
        &mut self,
        registry: &Registry,
        model: &str,
        version: &str,
        spec: ShadowSpec,
        now_ms: u64,
    ) -> Result<Shadow, ShadowError> {
        let ShadowSpec {
            sample_fraction,
            comparison,
            timeout,
        } = spec;
        let n = registry.resolve(model, version)?;
        if !(sample_fraction > 0.0 && sample_fraction <= 1.0) {
            return Err(invalid(
                "sample_fraction",
                format!("{sample_fraction} is outside (0, 1]"),
            ));
        }
        let comparison = comparison.unwrap_or(Comparison::Label);
        if let Comparison::Tolerance { absolute, relative } = comparison {
            if !(absolute.is_finite() && absolute >= 0.0 && relative.is_finite() && relative >= 0.0)
            {
                return Err(invalid(
                    "comparison.tolerance",
                    "absolute and relative must be finite and not negative",
                ));
            }
        }
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        // Stored in whole milliseconds: anything shorter would become a deadline of 0.
        if timeout < MIN_TIMEOUT || timeout > MAX_TIMEOUT {
            return Err(invalid(
                "timeout",
                format!("{timeout:?} is outside [{MIN_TIMEOUT:?}, {MAX_TIMEOUT:?}]"),
            ));
        }
        let s = Shadow {
            model: model.to_string(),
            version: n,
            sample_fraction,
            comparison,
            timeout_ms: timeout.as_millis() as u64,
            created_at_ms: now_ms,
        };
        self.by_key.insert((s.model.clone(), n), s.clone());
        Ok(s)
    }

    /// Removes the shadow of a version.
    pub fn remove(
        &mut self,
        registry: &Registry,
        model: &str,
        version: &str,
    ) -> Result<Shadow, ShadowError> {
        let n = registry.resolve(model, version)?;
        self.by_key
            .remove(&(model.to_string(), n))
            .ok_or_else(|| ShadowError::NotFound {
                model: model.to_string(),
                version: n,
            })
    }

    /// The shadow of a version, if any.
    pub fn get(&self, model: &str, version: u32) -> Option<&Shadow> {
        self.by_key.get(&(model.to_string(), version))
    }
}

/// Whether a request keyed by `key` (unit id, else request id) is mirrored at `fraction`.
pub fn sampled(model: &str, key: &str, fraction: f64) -> bool {
    let mut k = Vec::with_capacity(model.len() + key.len() + 8);
    k.extend_from_slice(b"shadow/");
    k.extend_from_slice(model.as_bytes());
    k.push(b'/');
    k.extend_from_slice(key.as_bytes());
    let u = (xxhash_rust::xxh3::xxh3_64(&k) >> 11) as f64 / (1u64 << 53) as f64;
    u < fraction
}

/// Stops sending copies to a shadow that is down, so a dead shadow costs (almost) nothing.
///
/// A copy that cannot reach the shadow (UNAVAILABLE) or misses its deadline opens the breaker for
/// 100 ms, doubling with each consecutive failure up to 30 s; while open, requests are not copied
/// (counted as suppressed). The first copy after that is a probe: success closes the breaker.
#[derive(Debug, Default)]
pub struct Breaker {
    open_until_ms: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU32,
}

impl Breaker {
    /// Whether copies may be sent at `now_ms`.
    pub fn allows(&self, now_ms: u64) -> bool {
        now_ms
            >= self
                .open_until_ms
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a copy that could not reach the shadow.
    pub fn failed(&self, now_ms: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.failures.fetch_add(1, Relaxed).min(20);
        let backoff = (100u64 << n).min(30_000);
        self.open_until_ms.store(now_ms + backoff, Relaxed);
    }

    /// Records a copy that reached the shadow.
    pub fn succeeded(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }
}

/// One side's answer, as far as comparison needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    /// The response message bytes.
    pub bytes: bytes::Bytes,
    /// Predictions per row (when read).
    pub predictions: Vec<Prediction>,
    /// Every output's values per row, row-major by output (when read).
    pub rows: Vec<Vec<f64>>,
}

/// The result of comparing one answer pair: per compared unit (row, or the whole message for
/// byte equality) whether it agreed, and the first disagreement.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Units compared.
    pub compared: u64,
    /// Units that agreed.
    pub agreed: u64,
    /// First disagreeing row and both sides, as text.
    pub first_disagreement: Option<(u32, String, String)>,
}

fn show(p: Option<&Prediction>) -> String {
    match p {
        Some(Prediction::Label(l)) => l.clone(),
        Some(Prediction::Value(v)) => format_number(*v),
        None => "(none)".into(),
    }
}

fn show_row(r: Option<&Vec<f64>>) -> String {
    match r {
        Some(v) => format!(
            "[{}]",
            v.iter()
                .map(|x| format_number(*x))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "(none)".into(),
    }
}

/// Compares a shadow's answer with production's.
pub fn compare(c: &Comparison, production: &Answer, shadow: &Answer) -> Verdict {
    let mut v = Verdict::default();
    // Both sides are written out only for the first disagreement: formatting them for every
    // row compared was most of what comparing cost.
    let note = |v: &mut Verdict, row: usize, agree: bool, sides: &dyn Fn() -> (String, String)| {
        v.compared += 1;
        if agree {
            v.agreed += 1;
        } else if v.first_disagreement.is_none() {
            let (p, s) = sides();
            v.first_disagreement = Some((row as u32, p, s));
        }
    };
    match c {
        Comparison::Bytes => {
            let agree = production.bytes == shadow.bytes;
            note(&mut v, 0, agree, &|| {
                (
                    format!("{} bytes", production.bytes.len()),
                    format!("{} bytes", shadow.bytes.len()),
                )
            });
        }
        Comparison::Label => {
            let rows = production.predictions.len().max(shadow.predictions.len());
            for r in 0..rows {
                let (p, s) = (production.predictions.get(r), shadow.predictions.get(r));
                let agree = match (p, s) {
                    // Two numbers agree when they are written alike, which for `format_number`
                    // is when they are equal (0 and -0 included), or both NaN.
                    (Some(Prediction::Value(a)), Some(Prediction::Value(b))) => {
                        a == b || (a.is_nan() && b.is_nan())
                    }
                    (Some(a), Some(b)) => show(Some(a)) == show(Some(b)),
                    _ => false,
                };
                note(&mut v, r, agree, &|| (show(p), show(s)));
            }
        }
        Comparison::Tolerance { absolute, relative } => {
            let rows = production.rows.len().max(shadow.rows.len());
            for r in 0..rows {
                let (p, s) = (production.rows.get(r), shadow.rows.get(r));
                let agree = match (p, s) {
                    (Some(a), Some(b)) => {
                        a.len() == b.len()
                            && a.iter()
                                .zip(b)
                                .all(|(x, y)| (x - y).abs() <= absolute + relative * x.abs())
                    }
                    _ => false,
                };
                note(&mut v, r, agree, &|| (show_row(p), show_row(s)));
            }
        }
    }
    v
}

/// Production and shadow latencies of one shadow, in microseconds.
#[derive(Clone, Debug)]
pub struct ShadowLatency {
    /// Production's upstream latency for the mirrored requests.
    pub production: Histogram<u64>,
    /// The shadow's latency.
    pub shadow: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs … 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

impl Default for ShadowLatency {
    fn default() -> Self {
        ShadowLatency {
            production: histogram(),
            shadow: histogram(),
        }
    }
}

impl ShadowLatency {
    /// Records one pair.
    pub fn record(&mut self, production: Duration, shadow: Duration) {
        let us = |d: Duration| (d.as_micros() as u64).clamp(1, 600_000_000);
        let _ = self.production.record(us(production));
        let _ = self.shadow.record(us(shadow));
    }
}

/// A logged disagreement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Disagreement {
    /// Request id.
    pub request_id: String,
    /// Time of the original request.
    pub time_ms: u64,
    /// First row that disagreed.
    pub row: u32,
    /// Production's answer for it.
    pub production: String,
    /// The shadow's answer for it.
    pub shadow: String,
}

/// The counters of one shadow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowCounts {
    /// Copies sent.
    pub mirrored: u64,
    /// Requests not sampled.
    pub skipped: u64,
    /// Copies dropped at the in-flight cap.
    pub dropped: u64,
    /// Copies past their deadline.
    pub timeouts: u64,
    /// Copies not sent because the shadow was down (breaker open).
    pub suppressed: u64,
    /// Failed copies by gRPC status name.
    pub errors: BTreeMap<String, u64>,
    /// Rows (or messages) compared.
    pub compared: u64,
    /// Of which agreed.
    pub agreed: u64,
}

/// A counter of a shadow: what happened to the copies of production's requests. Stored under
/// [`ShadowCounter::key`] (the names are on-disk keys and must not change).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShadowCounter {
    /// Copies sent.
    Mirrored,
    /// Requests the shadow's sample left out.
    Skipped,
    /// Copies dropped at the in-flight cap.
    Dropped,
    /// Copies not sent because the shadow was down (breaker open).
    Suppressed,
    /// Copies past their deadline.
    Timeouts,
    /// Copies that failed, by the canonical name of their gRPC status (`UNAVAILABLE`…).
    Error(&'static str),
    /// Rows (or messages) compared.
    Compared,
    /// Of which agreed.
    Agreed,
}

impl ShadowCounter {
    /// The counter's stored name: `mirrored`, `error.UNAVAILABLE`….
    pub fn key(self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow;
        match self {
            ShadowCounter::Mirrored => Cow::Borrowed("mirrored"),
            ShadowCounter::Skipped => Cow::Borrowed("skipped"),
            ShadowCounter::Dropped => Cow::Borrowed("dropped"),
            ShadowCounter::Suppressed => Cow::Borrowed("suppressed"),
            ShadowCounter::Timeouts => Cow::Borrowed("timeouts"),
            ShadowCounter::Error(code) => Cow::Owned(format!("error.{code}")),
            ShadowCounter::Compared => Cow::Borrowed("compared"),
            ShadowCounter::Agreed => Cow::Borrowed("agreed"),
        }
    }
}

impl ShadowCounts {
    /// Adds another shadow's counters (another replica's share of the same shadow).
    pub fn merge(&mut self, o: &ShadowCounts) {
        self.mirrored += o.mirrored;
        self.skipped += o.skipped;
        self.dropped += o.dropped;
        self.timeouts += o.timeouts;
        self.suppressed += o.suppressed;
        for (code, n) in &o.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        self.compared += o.compared;
        self.agreed += o.agreed;
    }

    /// Adds `n` to `counter` (a stored name that is not a counter's is ignored: see
    /// [`ShadowCounts::add_stored`]).
    pub fn add(&mut self, counter: ShadowCounter, n: u64) {
        match counter {
            ShadowCounter::Mirrored => self.mirrored += n,
            ShadowCounter::Skipped => self.skipped += n,
            ShadowCounter::Dropped => self.dropped += n,
            ShadowCounter::Suppressed => self.suppressed += n,
            ShadowCounter::Timeouts => self.timeouts += n,
            ShadowCounter::Error(code) => *self.errors.entry(code.to_string()).or_default() += n,
            ShadowCounter::Compared => self.compared += n,
            ShadowCounter::Agreed => self.agreed += n,
        }
    }

    /// Adds `n` to the counter stored under `key` ([`ShadowCounter::key`]); other keys are not
    /// counters and are ignored.
    pub fn add_stored(&mut self, key: &str, n: u64) {
        let counter = match key {
            "mirrored" => ShadowCounter::Mirrored,
            "skipped" => ShadowCounter::Skipped,
            "dropped" => ShadowCounter::Dropped,
            "timeouts" => ShadowCounter::Timeouts,
            "suppressed" => ShadowCounter::Suppressed,
            "compared" => ShadowCounter::Compared,
            "agreed" => ShadowCounter::Agreed,
            other => match other.strip_prefix("error.") {
                Some(code) => {
                    *self.errors.entry(code.to_string()).or_default() += n;
                    return;
                }
                None => return,
            },
        };
        self.add(counter, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewVersion;

    fn registry() -> Registry {
        let mut r = Registry::default();
        for _ in 0..2 {
            r.register(
                NewVersion {
                    model: "m".into(),
                    endpoint: "h:1".into(),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        }
        r
    }

    #[test]
    fn sub_millisecond_timeouts_are_refused() {
        // Found by fuzzing (control_args): a 500 µs timeout passed the "not zero" check and
        // was stored as timeout_ms = 0, a deadline every shadow call misses.
        let reg = registry();
        let mut s = Shadows::default();
        let spec = |t: Duration| ShadowSpec {
            sample_fraction: 1.0,
            comparison: None,
            timeout: Some(t),
        };
        for t in [
            Duration::ZERO,
            Duration::from_micros(500),
            Duration::from_nanos(999_999),
        ] {
            let err = s.set(&reg, "m", "2", spec(t), 0).unwrap_err();
            assert!(
                matches!(
                    err,
                    ShadowError::InvalidArgument {
                        field: "timeout",
                        ..
                    }
                ),
                "{t:?}: {err}"
            );
        }
        let ok = s
            .set(&reg, "m", "2", spec(Duration::from_millis(1)), 0)
            .unwrap();
        assert_eq!(ok.timeout_ms, 1);
    }

    #[test]
    fn set_validates_and_replaces() {
        let reg = registry();
        let mut s = Shadows::default();
        let sh = s
            .set(
                &reg,
                "m",
                "2",
                ShadowSpec {
                    sample_fraction: 0.5,
                    comparison: None,
                    timeout: None,
                },
                1,
            )
            .unwrap();
        assert_eq!(sh.comparison, Comparison::Label);
        assert_eq!(sh.timeout_ms, 1000);
        let spec = |f: f64, c: Option<Comparison>, t: Option<Duration>| ShadowSpec {
            sample_fraction: f,
            comparison: c,
            timeout: t,
        };
        s.set(
            &reg,
            "m",
            "2",
            spec(
                1.0,
                Some(Comparison::Bytes),
                Some(Duration::from_millis(50)),
            ),
            2,
        )
        .unwrap();
        assert_eq!(s.of("m").count(), 1, "replaced, not added");
        let field = |e: ShadowError| match e {
            ShadowError::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(
                s.set(
                    &reg,
                    "m",
                    "2",
                    ShadowSpec {
                        sample_fraction: 0.0,
                        comparison: None,
                        timeout: None
                    },
                    0
                )
                .unwrap_err()
            ),
            "sample_fraction"
        );
        assert_eq!(
            field(
                s.set(
                    &reg,
                    "m",
                    "2",
                    ShadowSpec {
                        sample_fraction: 1.5,
                        comparison: None,
                        timeout: None
                    },
                    0
                )
                .unwrap_err()
            ),
            "sample_fraction"
        );
        assert_eq!(
            field(
                s.set(
                    &reg,
                    "m",
                    "2",
                    spec(
                        1.0,
                        Some(Comparison::Tolerance {
                            absolute: -1.0,
                            relative: 0.0
                        }),
                        None
                    ),
                    0
                )
                .unwrap_err()
            ),
            "comparison.tolerance"
        );
        assert_eq!(
            field(
                s.set(
                    &reg,
                    "m",
                    "2",
                    ShadowSpec {
                        sample_fraction: 1.0,
                        comparison: None,
                        timeout: Some(Duration::from_secs(61))
                    },
                    0
                )
                .unwrap_err()
            ),
            "timeout"
        );
        assert!(matches!(
            s.set(
                &reg,
                "m",
                "9",
                ShadowSpec {
                    sample_fraction: 1.0,
                    comparison: None,
                    timeout: None
                },
                0
            ),
            Err(ShadowError::Registry(RegistryError::VersionNotFound { .. }))
        ));
        assert!(matches!(
            s.remove(&reg, "m", "1"),
            Err(ShadowError::NotFound { .. })
        ));
        s.remove(&reg, "m", "2").unwrap();
        assert_eq!(s.of("m").count(), 0);
    }

    #[test]
    fn sampling_is_deterministic_nested_and_accurate() {
        let n = 100_000;
        let at = |f: f64| (0..n).filter(|i| sampled("m", &format!("u{i}"), f)).count();
        let (ten, twenty) = (at(0.1), at(0.2));
        assert!((ten as f64 / n as f64 - 0.1).abs() < 0.005, "{ten}");
        assert!((twenty as f64 / n as f64 - 0.2).abs() < 0.005, "{twenty}");
        for i in 0..1000 {
            let k = format!("u{i}");
            if sampled("m", &k, 0.1) {
                assert!(sampled("m", &k, 0.2), "the 10% are inside the 20%");
            }
        }
        assert!((0..1000).all(|i| sampled("m", &format!("u{i}"), 1.0)));
    }

    #[test]
    fn breakers_back_off_and_close_on_success() {
        let b = Breaker::default();
        assert!(b.allows(0));
        b.failed(1000);
        assert!(!b.allows(1099) && b.allows(1100));
        b.failed(1100);
        assert!(!b.allows(1299) && b.allows(1300), "doubles");
        for _ in 0..30 {
            b.failed(5000);
        }
        assert!(!b.allows(34_999) && b.allows(35_000), "capped at 30 s");
        b.succeeded();
        b.failed(40_000);
        assert!(b.allows(40_100), "back to 100 ms after a success");
    }

    #[test]
    fn comparisons() {
        let labels = |l: &[&str]| Answer {
            predictions: l.iter().map(|s| Prediction::Label(s.to_string())).collect(),
            ..Default::default()
        };
        let v = compare(
            &Comparison::Label,
            &labels(&["a", "b", "c", "d"]),
            &labels(&["a", "x", "c", "y"]),
        );
        assert_eq!((v.compared, v.agreed), (4, 2));
        assert_eq!(v.first_disagreement, Some((1, "b".into(), "x".into())));
        let short = compare(&Comparison::Label, &labels(&["a", "b"]), &labels(&["a"]));
        assert_eq!((short.compared, short.agreed), (2, 1));
        let rows = |r: &[&[f64]]| Answer {
            rows: r.iter().map(|x| x.to_vec()).collect(),
            ..Default::default()
        };
        let tol = Comparison::Tolerance {
            absolute: 0.01,
            relative: 0.1,
        };
        let v = compare(
            &tol,
            &rows(&[&[1.0, 10.0], &[0.0]]),
            &rows(&[&[1.005, 10.9], &[0.02]]),
        );
        assert_eq!((v.compared, v.agreed), (2, 1));
        let b = |s: &'static str| Answer {
            bytes: bytes::Bytes::from_static(s.as_bytes()),
            ..Default::default()
        };
        assert_eq!(compare(&Comparison::Bytes, &b("x"), &b("x")).agreed, 1);
        assert_eq!(compare(&Comparison::Bytes, &b("x"), &b("y")).agreed, 0);
    }

    /// Numbers read as predictions agree exactly when they are written alike, as labels: what
    /// comparing them as numbers, without writing them, must keep.
    #[test]
    fn numeric_predictions_agree_when_written_alike() {
        let values = [
            0.0,
            -0.0,
            1.0,
            2.0,
            0.1,
            0.1f32 as f64,
            1e15,
            1e15 + 2.0,
            -7.5,
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
        ];
        let one = |p: Prediction| Answer {
            predictions: vec![p],
            ..Default::default()
        };
        for a in values {
            for b in values {
                let v = compare(
                    &Comparison::Label,
                    &one(Prediction::Value(a)),
                    &one(Prediction::Value(b)),
                );
                let alike = format_number(a) == format_number(b);
                assert_eq!(v.agreed == 1, alike, "{a} and {b}");
                if !alike {
                    let written = Some((0, format_number(a), format_number(b)));
                    assert_eq!(v.first_disagreement, written);
                }
            }
        }
        let mixed = compare(
            &Comparison::Label,
            &one(Prediction::Value(2.0)),
            &one(Prediction::Label("2".into())),
        );
        assert_eq!(mixed.agreed, 1, "a number and a label compare as text");
    }
}
