//! `modelgate.v1.Predictions`, `modelgate.v1.Outcomes` and `modelgate.v1.Features`: thin adapters
//! over the store, the recorder and the domain rules in `record`, `outcome` and `feature_store`.

use crate::convert::records::{def_to_pb, figures};
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::registry::timestamp;
use super::{registry_status, ControlPlane};
use crate::app::outcomes::{self, NewOutcome, OutcomeError};
use crate::app::reports;
use crate::convert::actual_from_pb;
use crate::convert::spec::duration_from_pb;
use crate::feature_store::{self, FeatureCatalog, FeatureDef, FeatureKind};
use crate::ids::{ModelName, RequestId, Version};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::{
    features_server::Features, outcomes_server::Outcomes, predictions_server::Predictions,
};
use crate::record::FeatureValue;
use crate::storage::{self, RecordWrites, Storage, StoreError};
use crate::store::records::{feature_value_from_pb, feature_value_to_pb};

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

fn request_id(id: &str) -> Result<RequestId, Status> {
    RequestId::parse(id, "request_id").map_err(|e| invalid(e.field, e.reason))
}

/// Unix milliseconds of a protobuf timestamp.
pub fn timestamp_ms(t: &prost_types::Timestamp, field: &'static str) -> Result<u64, Status> {
    crate::convert::timestamp_ms(t, field).map_err(|(f, e)| invalid(f, e))
}

/// Everything the record services share.
#[derive(Clone)]
pub struct RecordServices {
    storage: Storage,
    outcomes: outcomes::Outcomes,
    plane: Arc<ControlPlane>,
    catalog: Arc<FeatureCatalog>,
}

impl RecordServices {
    /// Reads the feature definitions again when `names` holds one this replica does not know
    /// (or, for `None`, always): in a fleet another replica may have registered it. Without a
    /// fleet the store holds nothing the catalog lacks, and this is only a local read.
    async fn learn_features(&self, names: Option<&[&String]>) {
        if names.is_some_and(|n| n.iter().all(|n| self.catalog.contains(n))) {
            return;
        }
        let (store, catalog) = (self.storage.features.clone(), self.catalog.clone());
        let _ = storage::blocking(move || {
            for d in store.load_feature_defs()? {
                catalog.upsert(d);
            }
            Ok(())
        })
        .await;
    }

    /// Services over the outcome use case (and its storage) and the control plane.
    pub fn new(
        outcomes: outcomes::Outcomes,
        catalog: Arc<FeatureCatalog>,
        plane: Arc<ControlPlane>,
    ) -> Self {
        RecordServices {
            storage: outcomes.storage().clone(),
            outcomes,
            plane,
            catalog,
        }
    }

    /// The oldest time `keep` retains, now.
    fn cutoff(&self, keep: std::time::Duration) -> u64 {
        storage::cutoff(self.plane.now_ms(), keep)
    }

    /// A request's record: still queued (pending), or stored and not expired.
    fn find_prediction(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<pb::PredictionRecord>, Status> {
        self.outcomes.prediction(request_id).map_err(unavailable)
    }

    fn not_found(&self, request_id: &RequestId) -> Status {
        outcome_status(self.outcomes.unknown(request_id))
    }

    fn with_outcomes(&self, mut rec: pb::PredictionRecord) -> Result<pb::PredictionRecord, Status> {
        rec.outcomes = self
            .storage
            .records
            .outcomes_of(&rec.request_id)
            .map_err(unavailable)?;
        Ok(rec)
    }

    /// Records one outcome (blocking: runs on a blocking thread).
    fn record_outcome(&self, r: pb::RecordOutcomeRequest) -> Result<pb::OutcomeRecord, Status> {
        let request_id = request_id(&r.request_id)?;
        let actual = actual_from_pb(r.actual.as_ref()).map_err(|(f, e)| invalid(f, e))?;
        let time_ms = r
            .time
            .as_ref()
            .map(|t| timestamp_ms(t, "time"))
            .transpose()?;
        self.outcomes
            .record(NewOutcome {
                request_id,
                row: r.row,
                actual,
                time_ms,
                overwrite: r.overwrite,
            })
            .map_err(outcome_status)
    }
}

/// The status of a report that could not be made.
pub fn report_status(e: reports::ReportError) -> Status {
    match e {
        reports::ReportError::Registry(e) => registry_status(e),
        reports::ReportError::Experiment(e) => super::experiment_status(e),
        reports::ReportError::Storage(e) => unavailable(e),
    }
}

/// The status of an outcome the use case refused.
fn outcome_status(e: OutcomeError) -> Status {
    let msg = e.to_string();
    match e {
        OutcomeError::UnknownRequest { .. } => Status::not_found(msg),
        OutcomeError::RowOutOfRange { .. } | OutcomeError::Mismatch(_) => {
            Status::invalid_argument(msg)
        }
        OutcomeError::AlreadyRecorded { .. } => Status::already_exists(msg),
        OutcomeError::NoPrediction(_) => Status::failed_precondition(msg),
        OutcomeError::Storage(e) => unavailable(e),
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
        let id = request_id(&request.into_inner().request_id)?;
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
        .max(self.cutoff(self.storage.retention.predictions));
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
                .storage
                .records
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
        let model = ModelName::parse(&r.model, "model").map_err(|e| invalid(e.field, e.reason))?;
        let version =
            Version::parse(&r.version, "version").map_err(|e| invalid(e.field, e.reason))?;
        let (state, tallies) = (self.plane.state(), self.storage.tallies.clone());
        let perf = blocking(move || {
            reports::model_performance(&state, &*tallies, &model, &version, window as usize)
                .map_err(report_status)
        })
        .await?;
        Ok(Response::new(pb::ModelPerformance {
            model: r.model,
            version: perf.version,
            all_time: Some(figures(&perf.all_time)),
            recent: Some(figures(&perf.recent)),
            window,
        }))
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
        let ttl_ms = match &r.ttl {
            None => None,
            Some(d) => {
                let ms = duration_from_pb(d)
                    .map_err(|e| invalid("ttl", e))?
                    .as_millis() as u64;
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
        let store = self.storage.features.clone();
        let d = def.clone();
        storage::blocking(move || store.put_feature_defs(&[d]))
            .await
            .map_err(unavailable)?;
        self.catalog.upsert(def.clone());
        Ok(Response::new(def_to_pb(&def)))
    }

    async fn list_features(
        &self,
        _: Request<pb::ListFeaturesRequest>,
    ) -> Result<Response<pb::ListFeaturesResponse>, Status> {
        self.learn_features(None).await;
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
        let names: Vec<&String> = rows.iter().flat_map(|r| r.values.keys()).collect();
        self.learn_features(Some(&names)).await;
        let now = self.plane.now_ms();
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
            let records = self.storage.records.clone();
            storage::blocking(move || {
                let mut batch = RecordWrites::default();
                for (entity, time, values) in &accepted {
                    batch.add_features(entity, *time, values.iter().map(|(n, v)| (n.as_str(), v)));
                }
                records.commit(batch, false)
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
        let names: Vec<&String> = r.feature_names.iter().collect();
        self.learn_features(Some(&names)).await;
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
            None => self.plane.now_ms(),
        };
        let store = self.storage.features.clone();
        let entities = r.entity_ids.clone();
        let cells = storage::blocking(move || store.get_features(&entities, &features, as_of))
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
