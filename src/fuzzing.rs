//! Fuzz entry points: one plain function per `cargo fuzz` target (see `fuzz/` and
//! `docs/reliability.md`). Each takes arbitrary bytes, runs the code that sees hostile input on
//! them and panics when an invariant breaks; returning normally means the input was fine. The
//! same functions run every checked-in seed under `cargo test` (`tests/fuzz_corpus.rs`).
//!
//! Not product API.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::experiment::{self, Experiments, NewExperiment, NewVariant};
use crate::feature_store;
use crate::oip::{self, Tensor};
use crate::pb::inference::{ModelInferRequest, ModelInferResponse};
use crate::protocol::{oip_grpc, Wanted};
use crate::proxy::body;
use crate::record::{self, Prediction};
use crate::registry::{self, NewVersion, PredictionSpec, PromotionPolicy, Registry, Stage};
use crate::shadow::{self, Answer, Comparison, ShadowSpec, Shadows};
use crate::store::keys;

/// Element limit used by the tensor targets: small, so that the fuzzer explores shapes rather
/// than large allocations.
pub const MAX_ELEMENTS: usize = 4096;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("oip_request", oip_request),
    ("oip_response", oip_response),
    ("grpc_frame", grpc_frame),
    ("control_args", control_args),
    ("keys", keys),
];

/// Runs the target called `name`; `false` when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}

fn check_tensor(t: &Tensor) {
    let n: usize = t.shape.iter().product();
    assert_eq!(t.values.len(), n, "tensor '{}' {:?}", t.name, t.shape);
    assert!(n <= MAX_ELEMENTS);
    assert!(
        t.shape.iter().all(|&d| d <= MAX_ELEMENTS),
        "a dimension of {:?} exceeds the element limit",
        t.shape
    );
    if t.rows() > 0 {
        assert_eq!(t.rows() * t.cols(), n, "{:?}", t.shape);
    }
}

/// Decodes a `ModelInferRequest`, its tensors and its feature table.
pub fn oip_request(data: &[u8]) {
    let Ok(req) = ModelInferRequest::decode(data) else {
        return;
    };
    if let Ok(tensors) = oip::request_inputs(&req, MAX_ELEMENTS) {
        assert_eq!(tensors.len(), req.inputs.len());
        tensors.iter().for_each(check_tensor);
    }
    for key in req.parameters.keys() {
        let _ = oip::parameter(&req.parameters, key);
    }
    // Registered names for the first input (fewer, as many or more than its columns), and the
    // entity taken from nothing, a parameter, or the last input.
    let mut names = BTreeMap::new();
    if let Some(first) = req.inputs.first() {
        names.insert(first.name.clone(), vec!["a".to_string(), "b".to_string()]);
    }
    let last = req
        .inputs
        .last()
        .map(|t| t.name.clone())
        .unwrap_or_default();
    let Ok(inputs) = oip_grpc::inputs(&req, MAX_ELEMENTS) else {
        return;
    };
    for entity_key in ["", "entity_id", last.as_str()] {
        let extract = |previous| {
            record::extract_features(&inputs, &names, entity_key, Some("unit"), previous)
        };
        let Ok(table) = extract(None) else {
            continue;
        };
        // Given its own names back, a table names its columns the same.
        let again = extract(Some(&table.columns())).expect("extracted once");
        assert_eq!(again.names, table.names);
        assert!(
            table.rows.len() <= MAX_ELEMENTS,
            "{} rows",
            table.rows.len()
        );
        assert_eq!(table.entities.len(), table.rows.len());
        for row in &table.rows {
            assert_eq!(row.len(), table.names.len(), "a row of inconsistent length");
        }
    }
}

/// The prediction specs tried on each response: every kind, on the first output and by name.
fn specs(resp: &ModelInferResponse) -> Vec<PredictionSpec> {
    let mut outputs = vec![String::new(), "missing".to_string()];
    outputs.extend(resp.outputs.iter().take(2).map(|o| o.name.clone()));
    let mut v = Vec::new();
    for output in outputs {
        v.push(PredictionSpec::Argmax {
            output: output.clone(),
            labels: vec!["cat".into(), "dog".into()],
        });
        v.push(PredictionSpec::Threshold {
            output: output.clone(),
            threshold: 0.5,
            positive_label: "yes".into(),
            negative_label: "no".into(),
        });
        v.push(PredictionSpec::Label {
            output: output.clone(),
        });
        v.push(PredictionSpec::Value { output });
    }
    v
}

/// Decodes a `ModelInferResponse` and reads predictions and output rows from it.
pub fn oip_response(data: &[u8]) {
    let Ok(resp) = ModelInferResponse::decode(data) else {
        return;
    };
    if let Ok(tensors) = oip::response_outputs(&resp, MAX_ELEMENTS) {
        tensors.iter().for_each(check_tensor);
    }
    let mut predictions = Vec::new();
    for spec in specs(&resp) {
        let output = record::prediction_output(&spec);
        let Ok(p) = oip_grpc::outputs(&resp, Wanted::One(output), MAX_ELEMENTS)
            .and_then(|outputs| record::extract_predictions(&outputs, &spec))
        else {
            continue;
        };
        let t = oip::response_output(&resp, output, MAX_ELEMENTS)
            .expect("predictions were read from it")
            .expect("it exists");
        let rows = t.shape.first().copied().unwrap_or(1);
        assert_eq!(p.len(), rows, "one prediction per row of {:?}", t.shape);
        if let PredictionSpec::Threshold { .. } = spec {
            assert!(p
                .iter()
                .all(|x| matches!(x, Prediction::Label(l) if l == "yes" || l == "no")));
        }
        predictions = p;
    }
    let rows = oip_grpc::outputs(&resp, Wanted::All, MAX_ELEMENTS)
        .map(|outputs| record::output_rows(&outputs))
        .unwrap_or_default();
    assert!(rows.len() <= MAX_ELEMENTS, "{} output rows", rows.len());
    // An answer always agrees with itself (rows holding NaN excepted: NaN is no number).
    let answer = Answer {
        bytes: Bytes::copy_from_slice(data),
        predictions,
        rows,
    };
    for c in [
        Comparison::Bytes,
        Comparison::Label,
        Comparison::Tolerance {
            absolute: 0.0,
            relative: 0.0,
        },
    ] {
        let v = shadow::compare(&c, &answer, &answer);
        assert!(v.agreed <= v.compared);
        let nan = answer.rows.iter().flatten().any(|x| !x.is_finite());
        if !(nan && matches!(c, Comparison::Tolerance { .. })) {
            assert_eq!(v.agreed, v.compared, "{c:?}: {v:?}");
        }
    }
}

/// Extracts the message of a unary gRPC body, and frames messages back.
pub fn grpc_frame(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    let Ok(msg) = body::unary_message(&body) else {
        return;
    };
    // It succeeded: the body was exactly one uncompressed message.
    assert_eq!(data[0], 0);
    assert_eq!(msg.len() + 5, data.len());
    assert_eq!(
        u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize,
        msg.len()
    );
    assert_eq!(&msg[..], &data[5..]);
    // Messages that decode frame back to a body that unframes to their encoding.
    if let Ok(req) = ModelInferRequest::decode(msg.clone()) {
        round_trip(&req);
    }
    if let Ok(resp) = ModelInferResponse::decode(msg.clone()) {
        round_trip(&resp);
    }
    // Anything after one whole message is refused.
    let mut longer = data.to_vec();
    longer.push(0);
    assert_eq!(
        body::unary_message(&Bytes::from(longer)),
        Err(body::FrameError::Trailing)
    );
}

fn round_trip<M: Message + Default>(m: &M) {
    let framed = body::frame(m);
    let inner = body::unary_message(&framed).expect("a framed message unframes");
    assert_eq!(
        inner,
        m.encode_to_vec(),
        "frame/unframe changed the message"
    );
    let back = M::decode(inner).expect("an encoded message decodes");
    assert_eq!(back.encoded_len(), m.encoded_len());
}

/// Turns fuzz bytes into values. Exhausted input reads as zeros and empty strings.
pub struct Reader<'a> {
    data: &'a [u8],
}

/// Strings a [`Reader`] picks with a length byte of `0xE0 + i`.
pub const DICTIONARY: &[&str] = &[
    "iris",
    "http://127.0.0.1:8001",
    "127.0.0.1:8002",
    "1",
    "2",
    "prod",
    "x-user-id",
    "[::1]:9000",
    "",
    "control",
    "treatment",
    "https://h:1",
    "h:0",
    "0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef",
    "accuracy",
    "input",
];

/// Numbers a [`Reader`] picks with a selector byte below their count.
pub const NUMBERS: &[f64] = &[
    0.0,
    -0.0,
    1.0,
    0.5,
    -1.0,
    0.05,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::MAX,
    f64::MIN_POSITIVE,
    5e-324,
    1e-9,
    0.999_999_999,
];

impl<'a> Reader<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// A little-endian u64 of up to 8 bytes.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let t = self.take(8);
        b[..t.len()].copy_from_slice(t);
        u64::from_le_bytes(b)
    }

    /// A little-endian u32 of up to 4 bytes.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(b)
    }

    /// A number: a selector byte below `NUMBERS.len()` picks one of [`NUMBERS`], anything else
    /// is followed by 8 raw bytes.
    pub fn f64(&mut self) -> f64 {
        let s = self.byte() as usize;
        match NUMBERS.get(s) {
            Some(&x) => x,
            None => f64::from_bits(self.u64()),
        }
    }

    /// A string: a length byte below 0xE0 and that many bytes (lossy UTF-8), or `0xE0 + i` for
    /// [`DICTIONARY`]`[i]`.
    pub fn string(&mut self) -> String {
        let n = self.byte();
        if n >= 0xE0 {
            return DICTIONARY
                .get((n - 0xE0) as usize)
                .copied()
                .unwrap_or("")
                .to_string();
        }
        String::from_utf8_lossy(self.take(n as usize)).into_owned()
    }

    /// An optional u64 (a flag byte, then the value).
    pub fn opt_u64(&mut self) -> Option<u64> {
        (self.byte() & 1 == 1).then(|| self.u64())
    }
}

/// Writes bytes that a [`Reader`] reads back as the given values (for seeds).
#[derive(Default)]
pub struct Writer {
    /// The bytes so far.
    pub data: Vec<u8>,
}

impl Writer {
    /// A byte.
    pub fn byte(&mut self, b: u8) -> &mut Self {
        self.data.push(b);
        self
    }

    /// A u64, 8 bytes.
    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.data.extend_from_slice(&x.to_le_bytes());
        self
    }

    /// A u32, 4 bytes.
    pub fn u32(&mut self, x: u32) -> &mut Self {
        self.data.extend_from_slice(&x.to_le_bytes());
        self
    }

    /// A number, as raw bits.
    pub fn f64(&mut self, x: f64) -> &mut Self {
        self.byte(0xFF).u64(x.to_bits())
    }

    /// A string (at most 0xDF bytes).
    pub fn string(&mut self, s: &str) -> &mut Self {
        assert!(s.len() < 0xE0);
        self.byte(s.len() as u8);
        self.data.extend_from_slice(s.as_bytes());
        self
    }

    /// An optional u64.
    pub fn opt_u64(&mut self, x: Option<u64>) -> &mut Self {
        match x {
            Some(x) => self.byte(1).u64(x),
            None => self.byte(0),
        }
    }
}

/// The control operations of [`control_args`], by opcode (the first byte of each operation,
/// modulo their count).
pub mod op {
    /// Plain validators on one string.
    pub const VALIDATE: u8 = 0;
    /// `Registry::register`.
    pub const REGISTER: u8 = 1;
    /// `Registry::transition`.
    pub const TRANSITION: u8 = 2;
    /// `Registry::set_alias` / `delete_alias`.
    pub const ALIAS: u8 = 3;
    /// `Registry::set_policy`.
    pub const POLICY: u8 = 4;
    /// `Registry::delete_version`.
    pub const DELETE: u8 = 5;
    /// `Experiments::create`.
    pub const EXPERIMENT: u8 = 6;
    /// `Shadows::set`.
    pub const SHADOW: u8 = 7;
    /// Number of operations.
    pub const COUNT: u8 = 8;
}

fn check_validators(s: &str) {
    if registry::validate_model_name(s, "model").is_ok() {
        assert!(!s.is_empty() && s.len() <= registry::MAX_MODEL_NAME);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
        // Model names key RocksDB records: they round-trip through every key that holds one.
        assert_eq!(
            keys::decode_registry_key(&keys::registry_key(s, 7)),
            Ok((s.to_string(), 7))
        );
        assert_eq!(
            keys::decode_policy_key(&keys::policy_key(s)).as_deref(),
            Ok(s)
        );
    }
    if registry::validate_alias(s).is_ok() {
        assert!(
            s.parse::<u32>().is_err(),
            "alias '{s}' looks like a version"
        );
        assert!(s.len() <= registry::MAX_ALIAS);
    }
    if let Ok(e) = registry::normalize_endpoint(s) {
        assert_eq!(
            registry::normalize_endpoint(&e).as_ref(),
            Ok(&e),
            "normalisation is idempotent"
        );
        // What the upstream pool needs to dial it.
        let uri: http::Uri = e
            .parse()
            .unwrap_or_else(|err| panic!("accepted endpoint {e:?} is no URI: {err}"));
        assert!(matches!(uri.scheme_str(), Some("http" | "https")), "{e}");
        assert!(
            uri.authority().and_then(|a| a.port_u16()).is_some(),
            "accepted endpoint {e:?} has no port"
        );
    }
    if let Ok(h) = registry::normalize_sha256(s) {
        assert_eq!(h.len(), 64);
        assert_eq!(h, s.to_ascii_lowercase());
    }
    if record::validate_request_id(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= record::MAX_REQUEST_ID && !s.contains('\0'));
        assert_eq!(
            keys::decode_outcome_key(&keys::outcome_key(s, 3)),
            Ok((s.to_string(), 3))
        );
    }
    if feature_store::validate_feature_name(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= feature_store::MAX_FEATURE_NAME);
    }
    if feature_store::validate_entity_id(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= feature_store::MAX_ENTITY_ID);
        assert!(!s.contains('\0'));
        assert_eq!(
            keys::feature_row_time(&keys::feature_row_key(s, 42, 1)),
            Ok(42)
        );
    }
    if experiment::validate_unit_key(s).is_ok() {
        assert!(http::HeaderName::from_bytes(s.as_bytes()).is_ok(), "{s:?}");
    }
}

fn check_registry(r: &Registry) {
    for m in r.models() {
        let production = m
            .versions
            .values()
            .filter(|v| v.stage == Stage::Production)
            .count();
        assert!(
            production <= 1,
            "model '{}' has {production} production versions",
            m.meta.name
        );
        for (alias, v) in &m.meta.aliases {
            assert!(
                m.versions.contains_key(v),
                "alias '{alias}' points at nothing"
            );
        }
        for (n, v) in &m.versions {
            assert_eq!(*n, v.version);
            assert!(*n >= 1 && *n <= m.meta.last_version);
            assert_eq!(
                registry::normalize_endpoint(&v.endpoint).as_ref(),
                Ok(&v.endpoint)
            );
            assert!(v.metrics.values().all(|x| x.is_finite()));
        }
    }
}

fn stage(b: u8) -> Stage {
    match b % 3 {
        0 => Stage::Staging,
        1 => Stage::Production,
        _ => Stage::Archived,
    }
}

fn metrics(r: &mut Reader) -> BTreeMap<String, f64> {
    (0..r.byte() % 3).map(|_| (r.string(), r.f64())).collect()
}

fn prediction_spec(r: &mut Reader) -> Option<PredictionSpec> {
    Some(match r.byte() % 5 {
        0 => return None,
        1 => PredictionSpec::Argmax {
            output: r.string(),
            labels: (0..r.byte() % 3).map(|_| r.string()).collect(),
        },
        2 => PredictionSpec::Threshold {
            output: r.string(),
            threshold: r.f64(),
            positive_label: r.string(),
            negative_label: r.string(),
        },
        3 => PredictionSpec::Label { output: r.string() },
        _ => PredictionSpec::Value { output: r.string() },
    })
}

/// Runs a sequence of control-plane operations (registration, stages, aliases, policies,
/// experiments, shadows, and the plain validators) on values read from the bytes, checking the
/// registry's invariants after each and what each accepted value must satisfy.
pub fn control_args(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut reg = Registry::default();
    let mut experiments = Experiments::default();
    let mut shadows = Shadows::default();
    let mut steps = 0;
    while !r.is_empty() && steps < 64 {
        steps += 1;
        let now = r.u32() as u64;
        match r.byte() % op::COUNT {
            op::VALIDATE => check_validators(&r.string()),
            op::REGISTER => {
                let new = NewVersion {
                    model: r.string(),
                    endpoint: r.string(),
                    backend_model: r.string(),
                    artifact_sha256: r.string(),
                    metrics: metrics(&mut r),
                    tags: (0..r.byte() % 2)
                        .map(|_| (r.string(), r.string()))
                        .collect(),
                    prediction: prediction_spec(&mut r),
                    feature_names: (0..r.byte() % 2)
                        .map(|_| (r.string(), (0..r.byte() % 3).map(|_| r.string()).collect()))
                        .collect(),
                    ..Default::default()
                };
                let model = new.model.clone();
                let before = reg.model(&model).map(|m| m.meta.last_version).unwrap_or(0);
                if let Ok((v, update)) = reg.register(new, now) {
                    assert_eq!(v.version, before + 1);
                    assert_eq!(v.stage, Stage::Staging);
                    assert!(!update.is_empty());
                    assert!(registry::validate_model_name(&v.model, "model").is_ok());
                    if let PredictionSpec::Threshold { threshold, .. } = v.prediction {
                        assert!(threshold.is_finite());
                    }
                }
            }
            op::TRANSITION => {
                let (model, version, to, force) =
                    (r.string(), r.string(), stage(r.byte()), r.byte() & 1 == 1);
                if let Ok(((v, archived), _)) = reg.transition(&model, &version, to, force, now) {
                    assert_eq!(v.stage, to);
                    assert!(archived.iter().all(|a| a.stage == Stage::Archived));
                }
            }
            op::ALIAS => {
                let (model, alias, version) = (r.string(), r.string(), r.string());
                if r.byte() & 1 == 0 {
                    if let Ok(((n, _), _)) = reg.set_alias(&model, &alias, &version) {
                        assert_eq!(reg.resolve(&model, &alias), Ok(n));
                    }
                } else if reg.delete_alias(&model, &alias).is_ok() {
                    assert!(reg.resolve(&model, &alias).is_err());
                }
            }
            op::POLICY => {
                let model = r.string();
                let policy = PromotionPolicy {
                    minimum: metrics(&mut r),
                    maximum: metrics(&mut r),
                };
                if reg.set_policy(&model, policy).is_ok() {
                    let p = reg.policy(&model);
                    assert!(p
                        .minimum
                        .values()
                        .chain(p.maximum.values())
                        .all(|x| x.is_finite()));
                }
            }
            op::DELETE => {
                let (model, version) = (r.string(), r.string());
                if let Ok(((v, _), _)) = reg.delete_version(&model, &version) {
                    assert_ne!(v.stage, Stage::Production);
                }
            }
            op::EXPERIMENT => {
                let new = NewExperiment {
                    name: r.string(),
                    model: r.string(),
                    variants: (0..r.byte() % 4)
                        .map(|_| NewVariant {
                            name: r.string(),
                            version: r.string(),
                            weight: r.f64(),
                        })
                        .collect(),
                    unit_key: r.string(),
                    salt: r.string(),
                    coverage: r.f64(),
                    alpha: r.f64(),
                    start_ms: r.opt_u64(),
                    end_ms: r.opt_u64(),
                };
                let unit = r.string();
                if let Ok(e) = experiments.create(new, &reg, now) {
                    check_experiment(&e, &unit);
                }
            }
            op::SHADOW => {
                let (model, version) = (r.string(), r.string());
                let comparison = match r.byte() % 4 {
                    0 => None,
                    1 => Some(Comparison::Label),
                    2 => Some(Comparison::Bytes),
                    _ => Some(Comparison::Tolerance {
                        absolute: r.f64(),
                        relative: r.f64(),
                    }),
                };
                let spec = ShadowSpec {
                    sample_fraction: r.f64(),
                    comparison,
                    timeout: (r.byte() & 1 == 1).then(|| Duration::from_nanos(r.u64())),
                };
                let key = r.string();
                if let Ok(s) = shadows.set(&reg, &model, &version, spec, now) {
                    assert!(s.sample_fraction > 0.0 && s.sample_fraction <= 1.0);
                    assert!(
                        (1..=shadow::MAX_TIMEOUT.as_millis() as u64).contains(&s.timeout_ms),
                        "shadow timeout of {} ms",
                        s.timeout_ms
                    );
                    if let Comparison::Tolerance { absolute, relative } = s.comparison {
                        assert!(absolute.is_finite() && absolute >= 0.0);
                        assert!(relative.is_finite() && relative >= 0.0);
                    }
                    if s.sample_fraction == 1.0 {
                        assert!(shadow::sampled(&s.model, &key, s.sample_fraction));
                    }
                }
            }
            _ => unreachable!("opcodes are reduced modulo their count"),
        }
        check_registry(&reg);
    }
}

fn check_experiment(e: &experiment::Experiment, unit: &str) {
    assert!(e.variants.len() >= 2);
    assert!(e.coverage > 0.0 && e.coverage <= 1.0);
    assert!(e.alpha > 0.0 && e.alpha < 0.5);
    assert!(experiment::validate_unit_key(&e.unit_key).is_ok());
    let cumulative = e.cumulative();
    assert_eq!(cumulative.len(), e.variants.len());
    assert_eq!(cumulative.last(), Some(&1.0));
    assert!(
        cumulative.windows(2).all(|w| w[0] <= w[1]),
        "{cumulative:?}"
    );
    // Each variant gets its weight's share of the units (computed without overflow).
    let max = e.variants.iter().map(|v| v.weight).fold(0.0, f64::max);
    let total: f64 = e.variants.iter().map(|v| v.weight / max).sum();
    let mut previous = 0.0;
    for (v, c) in e.variants.iter().zip(&cumulative) {
        let share = c - previous;
        let expected = v.weight / max / total;
        assert!(
            (share - expected).abs() <= 1e-9,
            "variant '{}' (weight {}) gets {share} of the units, not {expected}: {cumulative:?}",
            v.name,
            v.weight
        );
        previous = *c;
    }
    if let Some(i) = e.assign(unit) {
        assert!(i < e.variants.len());
    }
    let u = experiment::bucket(&e.salt, &e.name, unit);
    assert!((0.0..1.0).contains(&u));
}

/// Every key decoder on arbitrary bytes (a decoded key encodes back to the same bytes), then
/// encode → decode round trips and sort orders of keys built from values read from the bytes.
pub fn keys(data: &[u8]) {
    if let Ok((model, version)) = keys::decode_registry_key(data) {
        assert_eq!(keys::registry_key(&model, version), data);
    }
    if let Ok(model) = keys::decode_policy_key(data) {
        assert_eq!(keys::policy_key(&model), data);
    }
    if let Ok((model, time, id)) = keys::decode_prediction_index_key(data) {
        assert_eq!(keys::prediction_index_key(&model, time, &id), data);
        assert!(data.starts_with(&keys::prediction_index_prefix(&model)));
    }
    if let Ok((id, row)) = keys::decode_outcome_key(data) {
        assert_eq!(keys::outcome_key(&id, row), data);
    }
    if let Ok(t) = keys::outcome_index_time(data) {
        let sep = data.iter().position(|&b| b == 0).expect("has a separator");
        assert_eq!(data[sep + 5..sep + 13], t.to_be_bytes());
    }
    if let Ok(t) = keys::feature_row_time(data) {
        let n = data.len();
        assert_eq!(data[n - 12..n - 4], (u64::MAX - t).to_be_bytes());
    }
    if let Ok((t, rest)) = keys::split_timed_value("fuzz", data) {
        assert_eq!(keys::timed_value(t, rest), data);
    }

    // Round trips of keys built from values the registry and the record path accept.
    let mut r = Reader::new(data);
    let (model, other) = (r.string(), r.string());
    let (id, entity) = (r.string(), r.string());
    let (v1, v2, t1, t2, seq) = (r.u32(), r.u32(), r.u64(), r.u64(), r.u32());
    let model_ok = |m: &str| registry::validate_model_name(m, "model").is_ok();
    if model_ok(&model) {
        assert_eq!(
            keys::decode_registry_key(&keys::registry_key(&model, v1)),
            Ok((model.clone(), v1))
        );
        // A model's versions sort by number.
        assert_eq!(
            keys::registry_key(&model, v1).cmp(&keys::registry_key(&model, v2)),
            v1.cmp(&v2)
        );
        let shadow = keys::shadow_counter_key(&model, v1, "agreed");
        assert!(shadow.starts_with(&keys::shadow_counter_prefix(&model, v1)));
        let log = keys::shadow_log_key(&model, v1, t1, &id);
        assert!(log.starts_with(&keys::outcome_index_prefix(&model, v1)));
        assert_eq!(keys::outcome_index_time(&log), Ok(t1));
        if model_ok(&other) && other != model {
            // Different models never share a prefix.
            assert!(
                !keys::registry_key(&other, v1).starts_with(&keys::prediction_index_prefix(&model))
            );
            assert!(!keys::prediction_index_key(&other, t1, &id)
                .starts_with(&keys::prediction_index_prefix(&model)));
        }
        if record::validate_request_id(&id).is_ok() {
            let k = keys::prediction_index_key(&model, t1, &id);
            assert_eq!(
                keys::decode_prediction_index_key(&k),
                Ok((model.clone(), t1, id.clone()))
            );
            // Records of a model sort by time.
            if t1 < t2 {
                assert!(k < keys::prediction_index_key(&model, t2, &id));
            }
            let oi = keys::outcome_index_key(&model, v1, t1, &id, seq);
            assert!(oi.starts_with(&keys::outcome_index_prefix(&model, v1)));
            assert_eq!(keys::outcome_index_time(&oi), Ok(t1));
            assert_eq!(
                keys::decode_outcome_key(&oi[model.len() + 13..]),
                Ok((id.clone(), seq))
            );
        }
    }
    if record::validate_request_id(&id).is_ok() {
        assert_eq!(
            keys::decode_outcome_key(&keys::outcome_key(&id, seq)),
            Ok((id.clone(), seq))
        );
        assert!(keys::outcome_key(&id, seq).starts_with(&keys::outcome_prefix(&id)));
    }
    if feature_store::validate_entity_id(&entity).is_ok() {
        let k = keys::feature_row_key(&entity, t1, seq);
        assert!(k.starts_with(&keys::feature_row_prefix(&entity)));
        assert_eq!(keys::feature_row_time(&k), Ok(t1));
        // Newest first.
        if t1 < t2 {
            assert!(keys::feature_row_key(&entity, t2, 0) < k);
        }
        if feature_store::validate_entity_id(&other).is_ok() && other != entity {
            assert!(!keys::feature_row_key(&other, t2, seq)
                .starts_with(&keys::feature_row_prefix(&entity)));
        }
    }
    let body = r.string();
    assert_eq!(
        keys::split_timed_value("fuzz", &keys::timed_value(t1, body.as_bytes())),
        Ok((t1, body.as_bytes()))
    );
}
