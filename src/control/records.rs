//! `modelgate.v1.Predictions`, `modelgate.v1.Outcomes` and `modelgate.v1.Features`: thin adapters
//! over the store, the recorder and the domain rules in `record`, `outcome` and `feature_store`.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::registry::timestamp;
use super::{registry_status, ControlPlane};
use crate::feature_store::{self, FeatureCatalog, FeatureDef, FeatureKind};
use crate::outcome::{self, Actual, JudgeError, Judgement, Tally};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::{
    features_server::Features, outcomes_server::Outcomes, predictions_server::Predictions,
};
use crate::record::{self, FeatureValue, Prediction};
use crate::recorder::{self, prediction_from_pb, Recorder};
use crate::store::records::{cutoff, feature_value_from_pb, feature_value_to_pb, now_ms};
use crate::store::{self, Store, StoreError};

/// Default page size of ListPredictions.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page of ListPredictions.
pub const MAX_PAGE: u32 = 1000;
/// Default window of GetModelPerformance.
pub const DEFAULT_WINDOW: u32 = 1000;

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(format!("storage: {e}"))
}

fn check_request_id(id: &str) -> Result<(), Status> {
    record::validate_request_id(id).map_err(|e| invalid("request_id", e))
}

/// Unix milliseconds of a protobuf timestamp.
pub fn timestamp_ms(t: &prost_types::Timestamp, field: &str) -> Result<u64, Status> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(field, "must be a valid time after 1970"));
    }
    Ok(t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

/// Everything the record services share.
#[derive(Clone)]
pub struct RecordServices {
    store: Store,
    recorder: Arc<Recorder>,
    plane: Arc<ControlPlane>,
    catalog: Arc<FeatureCatalog>,
    /// Outcome writes for one request are serialised (duplicate checks, counter deltas).
    stripes: Arc<[Mutex<()>; 64]>,
    monitor: Option<Arc<crate::monitor::Monitor>>,
}

impl RecordServices {
    /// Services over the given state.
    pub fn new(store: Store, recorder: Arc<Recorder>, plane: Arc<ControlPlane>) -> Self {
        let catalog = recorder.catalog().clone();
        RecordServices {
            store,
            recorder,
            plane,
            catalog,
            stripes: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
            monitor: None,
        }
    }

    /// Feeds recorded outcomes to the concept-drift monitor.
    pub fn with_monitor(mut self, monitor: Arc<crate::monitor::Monitor>) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// A request's record: still queued (pending), or stored and not expired.
    fn find_prediction(&self, request_id: &str) -> Result<Option<pb::PredictionRecord>, Status> {
        if let Some(raw) = self.recorder.pending(request_id) {
            return Ok(Some(
                recorder::prepare(&raw, self.recorder.settings()).record,
            ));
        }
        let not_before = cutoff(self.store.retention().predictions);
        Ok(self
            .store
            .get_prediction(request_id, not_before)
            .map_err(unavailable)?
            .map(|(_, r)| r))
    }

    fn not_found(&self, request_id: &str) -> Status {
        Status::not_found(format!(
            "no prediction record for request id '{request_id}': unknown, older than the {} retention, or dropped under load",
            humantime::format_duration(self.store.retention().predictions)
        ))
    }

    fn with_outcomes(&self, mut rec: pb::PredictionRecord) -> Result<pb::PredictionRecord, Status> {
        rec.outcomes = self
            .store
            .outcomes_of(&rec.request_id)
            .map_err(unavailable)?;
        Ok(rec)
    }

    /// Records one outcome (blocking: runs on a blocking thread).
    fn record_outcome(&self, r: pb::RecordOutcomeRequest) -> Result<pb::OutcomeRecord, Status> {
        check_request_id(&r.request_id)?;
        let actual = actual_from_pb(r.actual.as_ref())?;
        let time_ms = match &r.time {
            Some(t) => timestamp_ms(t, "time")?,
            None => now_ms(),
        };
        let stripe = &self.stripes[stripe_of(&r.request_id)];
        let _serialised = stripe.lock();
        let rec = self
            .find_prediction(&r.request_id)?
            .ok_or_else(|| self.not_found(&r.request_id))?;
        let rows = rec.predictions.len().max(rec.rows.len()).max(1);
        if r.row as usize >= rows {
            return Err(invalid(
                "row",
                format!(
                    "{} is out of range: request '{}' had {rows} row(s)",
                    r.row, r.request_id
                ),
            ));
        }
        let previous = self
            .store
            .get_outcome(&r.request_id, r.row)
            .map_err(unavailable)?;
        if previous.is_some() && !r.overwrite {
            return Err(Status::already_exists(format!(
                "request '{}' row {} already has an outcome; set overwrite to replace it",
                r.request_id, r.row
            )));
        }
        let prediction: Option<Prediction> = rec
            .predictions
            .get(r.row as usize)
            .and_then(prediction_from_pb);
        let judgement = outcome::judge(prediction.as_ref(), &actual).map_err(|e| match e {
            JudgeError::Mismatch(_) => Status::invalid_argument(e.to_string()),
            JudgeError::NoPrediction => Status::failed_precondition(e.to_string()),
        })?;
        let out = pb::OutcomeRecord {
            request_id: r.request_id.clone(),
            row: r.row,
            model: rec.model.clone(),
            version: rec.version,
            actual: r.actual.clone(),
            prediction: prediction.as_ref().map(recorder::prediction_to_pb),
            success: judgement.success,
            error: judgement.error,
            time: Some(timestamp(time_ms)),
            experiment: rec.experiment.clone(),
            variant: rec.variant.clone(),
        };
        let replaced = previous.as_ref().map(|(t, old)| {
            (
                *t,
                old,
                Judgement {
                    success: old.success,
                    error: old.error,
                },
            )
        });
        self.store
            .write_outcome(&out, time_ms, &judgement, replaced, !rec.variant_forced)
            .map_err(unavailable)?;
        if let Some(m) = &self.monitor {
            m.observe_outcome(&out.model, out.version, &judgement);
        }
        Ok(out)
    }
}

fn stripe_of(request_id: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(request_id);
    (h % 64) as usize
}

fn actual_from_pb(a: Option<&pb::Actual>) -> Result<Actual, Status> {
    use pb::actual::Kind;
    match a.and_then(|a| a.kind.as_ref()) {
        Some(Kind::Label(s)) => Ok(Actual::Label(s.clone())),
        Some(Kind::IntLabel(i)) => Ok(Actual::IntLabel(*i)),
        Some(Kind::Number(x)) if x.is_finite() => Ok(Actual::Number(*x)),
        Some(Kind::Number(x)) => Err(invalid(
            "actual.number",
            format!("{x} is not a finite number"),
        )),
        Some(Kind::Success(b)) => Ok(Actual::Success(*b)),
        None => Err(invalid(
            "actual",
            "required: one of label, int_label, number or success",
        )),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

#[tonic::async_trait]
impl Predictions for RecordServices {
    async fn get_prediction(
        &self,
        request: Request<pb::GetPredictionRequest>,
    ) -> Result<Response<pb::PredictionRecord>, Status> {
        let id = request.into_inner().request_id;
        check_request_id(&id)?;
        let me = self.clone();
        let rec = blocking(move || {
            let rec = me.find_prediction(&id)?.ok_or_else(|| me.not_found(&id))?;
            me.with_outcomes(rec)
        })
        .await?;
        Ok(Response::new(rec))
    }

    async fn list_predictions(
        &self,
        request: Request<pb::ListPredictionsRequest>,
    ) -> Result<Response<pb::ListPredictionsResponse>, Status> {
        let r = request.into_inner();
        crate::registry::validate_model_name(&r.model, "model").map_err(registry_status)?;
        let limit = match r.limit {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => return Err(invalid("limit", format!("{n} is above {MAX_PAGE}"))),
            n => n,
        } as usize;
        let start = match &r.start_time {
            Some(t) => timestamp_ms(t, "start_time")?,
            None => 0,
        }
        .max(cutoff(self.store.retention().predictions));
        let end = match &r.end_time {
            Some(t) => timestamp_ms(t, "end_time")?,
            None => u64::MAX,
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            let bad = || {
                invalid(
                    "page_token",
                    "not a token from a previous ListPredictions answer",
                )
            };
            let (t, id) = r.page_token.split_once('.').ok_or_else(bad)?;
            Some((t.parse::<u64>().map_err(|_| bad())?, id.to_string()))
        };
        let me = self.clone();
        let page = blocking(move || {
            let page = me
                .store
                .list_predictions(&r.model, r.version, start, end, limit, after)
                .map_err(unavailable)?;
            let records = page
                .records
                .into_iter()
                .map(|rec| me.with_outcomes(rec))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((records, page.next))
        })
        .await?;
        Ok(Response::new(pb::ListPredictionsResponse {
            predictions: page.0,
            next_page_token: page
                .1
                .map(|(t, id)| format!("{t}.{id}"))
                .unwrap_or_default(),
        }))
    }
}

fn figures(t: &Tally) -> pb::PerformanceFigures {
    pb::PerformanceFigures {
        outcomes: t.outcomes,
        judged: t.judged,
        successes: t.successes,
        accuracy: t.accuracy(),
        regression_outcomes: t.regression,
        mae: t.mae(),
        rmse: t.rmse(),
    }
}

fn item_result(
    index: u32,
    r: &pb::RecordOutcomeRequest,
    res: Result<pb::OutcomeRecord, Status>,
) -> pb::OutcomeResult {
    match res {
        Ok(o) => pb::OutcomeResult {
            index,
            request_id: r.request_id.clone(),
            row: r.row,
            accepted: true,
            code: 0,
            message: String::new(),
            outcome: Some(o),
        },
        Err(s) => pb::OutcomeResult {
            index,
            request_id: r.request_id.clone(),
            row: r.row,
            accepted: false,
            code: s.code() as i32,
            message: s.message().to_string(),
            outcome: None,
        },
    }
}

#[tonic::async_trait]
impl Outcomes for RecordServices {
    async fn record_outcome(
        &self,
        request: Request<pb::RecordOutcomeRequest>,
    ) -> Result<Response<pb::OutcomeRecord>, Status> {
        let r = request.into_inner();
        let me = self.clone();
        Ok(Response::new(blocking(move || me.record_outcome(r)).await?))
    }

    async fn record_outcomes(
        &self,
        request: Request<Streaming<pb::RecordOutcomesRequest>>,
    ) -> Result<Response<pb::RecordOutcomesResponse>, Status> {
        let mut stream = request.into_inner();
        let mut out = pb::RecordOutcomesResponse::default();
        let mut index = 0u32;
        while let Some(msg) = stream.next().await {
            let items = msg?.outcomes;
            let me = self.clone();
            let first = index;
            let results = blocking(move || {
                Ok(items
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let res = me.record_outcome(r.clone());
                        item_result(first + i as u32, &r, res)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
            index += results.len() as u32;
            for res in results {
                if res.accepted {
                    out.accepted += 1;
                } else {
                    out.rejected += 1;
                }
                out.results.push(res);
            }
        }
        Ok(Response::new(out))
    }

    async fn get_model_performance(
        &self,
        request: Request<pb::GetModelPerformanceRequest>,
    ) -> Result<Response<pb::ModelPerformance>, Status> {
        let r = request.into_inner();
        let window = match r.window {
            0 => DEFAULT_WINDOW,
            n if n > 1_000_000 => return Err(invalid("window", format!("{n} is above 1000000"))),
            n => n,
        };
        let version = self
            .plane
            .state()
            .registry
            .resolve(&r.model, &r.version)
            .map_err(registry_status)?;
        let store = self.store.clone();
        let model = r.model.clone();
        let (all, recent) = blocking(move || {
            let all = store.tally(&model, version).map_err(unavailable)?;
            let recent = store
                .recent_tally(&model, version, window as usize)
                .map_err(unavailable)?;
            Ok((all, recent))
        })
        .await?;
        Ok(Response::new(pb::ModelPerformance {
            model: r.model,
            version,
            all_time: Some(figures(&all)),
            recent: Some(figures(&recent)),
            window,
        }))
    }
}

fn kind_to_pb(k: FeatureKind) -> pb::FeatureType {
    match k {
        FeatureKind::Number => pb::FeatureType::Number,
        FeatureKind::Text => pb::FeatureType::String,
    }
}

fn def_to_pb(d: &FeatureDef) -> pb::FeatureDefinition {
    pb::FeatureDefinition {
        name: d.name.clone(),
        description: d.description.clone(),
        r#type: kind_to_pb(d.kind) as i32,
        ttl: d.ttl_ms.map(|ms| prost_types::Duration {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        from_traffic: d.from_traffic,
    }
}

/// Checks one PutFeatures row against the catalog; returns its values and time.
#[allow(clippy::type_complexity)]
fn check_row(
    catalog: &FeatureCatalog,
    row: pb::FeatureRowInput,
    now: u64,
) -> Result<(String, u64, Vec<(String, FeatureValue)>), Status> {
    feature_store::validate_entity_id(&row.entity_id).map_err(|e| invalid("entity_id", e))?;
    if row.values.is_empty() {
        return Err(invalid("values", "required: at least one feature"));
    }
    let time = match &row.event_time {
        Some(t) => timestamp_ms(t, "event_time")?,
        None => now,
    };
    let mut values = Vec::with_capacity(row.values.len());
    let mut names: Vec<_> = row.values.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in names {
        let def = catalog.get(&name).ok_or_else(|| {
            invalid(
                "values",
                format!("unknown feature '{name}'; register it with RegisterFeature first"),
            )
        })?;
        let value = feature_value_from_pb(v)
            .ok_or_else(|| invalid("values", format!("feature '{name}' has no value")))?;
        if FeatureKind::of(&value) != def.kind {
            return Err(invalid(
                "values",
                format!(
                    "feature '{name}' is a {}; got a {}",
                    def.kind.as_str(),
                    FeatureKind::of(&value).as_str()
                ),
            ));
        }
        if let FeatureValue::Number(x) = value {
            if !x.is_finite() {
                return Err(invalid(
                    "values",
                    format!("feature '{name}' is {x}; numbers must be finite"),
                ));
            }
        }
        values.push((name, value));
    }
    Ok((row.entity_id, time, values))
}

#[tonic::async_trait]
impl Features for RecordServices {
    async fn register_feature(
        &self,
        request: Request<pb::RegisterFeatureRequest>,
    ) -> Result<Response<pb::FeatureDefinition>, Status> {
        let r = request.into_inner();
        feature_store::validate_feature_name(&r.name).map_err(|e| invalid("name", e))?;
        let kind = match pb::FeatureType::try_from(r.r#type) {
            Ok(pb::FeatureType::Number) => FeatureKind::Number,
            Ok(pb::FeatureType::String) => FeatureKind::Text,
            _ => {
                return Err(invalid(
                    "type",
                    "required: FEATURE_TYPE_NUMBER or FEATURE_TYPE_STRING",
                ))
            }
        };
        let ttl_ms = match r.ttl {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(invalid("ttl", "must not be negative"))
            }
            Some(d) => {
                let ms = d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000;
                (ms > 0).then_some(ms)
            }
        };
        let def = FeatureDef {
            name: r.name,
            description: r.description,
            kind,
            ttl_ms,
            from_traffic: false,
        };
        let store = self.store.clone();
        let d = def.clone();
        store::blocking(move || store.put_feature_defs(&[d]))
            .await
            .map_err(unavailable)?;
        self.catalog.upsert(def.clone());
        Ok(Response::new(def_to_pb(&def)))
    }

    async fn list_features(
        &self,
        _: Request<pb::ListFeaturesRequest>,
    ) -> Result<Response<pb::ListFeaturesResponse>, Status> {
        Ok(Response::new(pb::ListFeaturesResponse {
            features: self.catalog.list().iter().map(def_to_pb).collect(),
        }))
    }

    async fn put_features(
        &self,
        request: Request<pb::PutFeaturesRequest>,
    ) -> Result<Response<pb::PutFeaturesResponse>, Status> {
        let rows = request.into_inner().rows;
        if rows.is_empty() {
            return Err(invalid("rows", "required: at least one row"));
        }
        let now = now_ms();
        let mut results = Vec::with_capacity(rows.len());
        let mut accepted = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            let index = i as u32;
            match check_row(&self.catalog, row, now) {
                Ok(ok) => {
                    accepted.push(ok);
                    results.push(pb::PutFeaturesResult {
                        index,
                        accepted: true,
                        code: 0,
                        message: String::new(),
                    });
                }
                Err(s) => results.push(pb::PutFeaturesResult {
                    index,
                    accepted: false,
                    code: s.code() as i32,
                    message: s.message().to_string(),
                }),
            }
        }
        let n = accepted.len() as u32;
        if !accepted.is_empty() {
            let store = self.store.clone();
            store::blocking(move || {
                let mut batch = store.record_batch();
                for (entity, time, values) in &accepted {
                    batch.add_features(entity, *time, values.iter().map(|(n, v)| (n.as_str(), v)));
                }
                batch.commit(false)
            })
            .await
            .map_err(unavailable)?;
        }
        Ok(Response::new(pb::PutFeaturesResponse {
            results,
            accepted: n,
        }))
    }

    async fn get_features(
        &self,
        request: Request<pb::GetFeaturesRequest>,
    ) -> Result<Response<pb::GetFeaturesResponse>, Status> {
        let r = request.into_inner();
        if r.entity_ids.is_empty() {
            return Err(invalid("entity_ids", "required: at least one entity"));
        }
        if r.feature_names.is_empty() {
            return Err(invalid("feature_names", "required: at least one feature"));
        }
        if r.entity_ids.len() * r.feature_names.len() > 1_000_000 {
            return Err(invalid(
                "entity_ids",
                "entities × features is above 1000000; split the lookup",
            ));
        }
        for e in &r.entity_ids {
            feature_store::validate_entity_id(e).map_err(|m| invalid("entity_ids", m))?;
        }
        let unknown: Vec<String> = r
            .feature_names
            .iter()
            .filter(|n| !self.catalog.contains(n))
            .map(|n| format!("'{n}'"))
            .collect();
        if !unknown.is_empty() {
            return Err(invalid(
                "feature_names",
                format!("unknown feature(s) {}", unknown.join(", ")),
            ));
        }
        let features: Vec<(String, Option<u64>)> = r
            .feature_names
            .iter()
            .map(|n| (n.clone(), self.catalog.get(n).and_then(|d| d.ttl_ms)))
            .collect();
        let as_of = match &r.as_of {
            Some(t) => timestamp_ms(t, "as_of")?,
            None => now_ms(),
        };
        let store = self.store.clone();
        let entities = r.entity_ids.clone();
        let cells = store::blocking(move || store.get_features(&entities, &features, as_of))
            .await
            .map_err(unavailable)?;
        Ok(Response::new(pb::GetFeaturesResponse {
            feature_names: r.feature_names,
            entities: r
                .entity_ids
                .into_iter()
                .zip(cells)
                .map(|(entity_id, row)| pb::EntityFeatures {
                    entity_id,
                    cells: row
                        .into_iter()
                        .map(|c| match c {
                            Some((t, v)) => pb::FeatureCell {
                                value: Some(feature_value_to_pb(&v)),
                                event_time: Some(timestamp(t)),
                            },
                            None => pb::FeatureCell::default(),
                        })
                        .collect(),
                })
                .collect(),
        }))
    }
}
