//! Applying a loaded file through the control plane: one [`ControlPlane::update_state`] per apply
//! (reconciled under its write lock, one synced write, one routing snapshot), then the events the
//! gRPC services publish for the same changes, and `state_file_applied`.

use std::path::Path;

use crate::control::{ControlError, ControlPlane, Update};
use crate::experiment::ExperimentState;

use super::format::DeclareError;
use super::parse::Loaded;
use super::reconcile::{reconcile, Change, Report};

/// Event published when a state file changed something (or had items it could not apply).
pub const APPLIED_EVENT: &str = "state_file_applied";

/// Why an apply changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The current state and the file disagree in a way the rules refuse (a promotion policy set
    /// by hand, say). Names the item.
    #[error("{0}")]
    Refused(DeclareError),
    /// The change could not be made durable (worth retrying).
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Applies a loaded state file: reconciles under the control plane's write lock, makes the whole
/// change durable in one synced write, publishes the routing snapshot, then the events the gRPC
/// services would have published for the same changes and `state_file_applied`. All or nothing,
/// except experiments that conflict with existing ones (reported in the result).
pub async fn apply(
    plane: &ControlPlane,
    path: &Path,
    loaded: &Loaded,
) -> Result<Report, ApplyError> {
    let file = &loaded.file;
    let now = plane.now_ms();
    let result = plane
        .update_state(|s| {
            Ok(match reconcile(file, s, now) {
                Ok((report, update)) => (Ok(report), update),
                // An empty update: `update_state` discards the half-reconciled copy.
                Err(e) => (Err(e), Update::default()),
            })
        })
        .await?;
    let mut report = result.map_err(|e| ApplyError::Refused(loaded.locate(e)))?;
    report.conflicts = report
        .conflicts
        .into_iter()
        .map(|c| loaded.locate(c))
        .collect();
    let file_name = path.display().to_string();
    for c in &report.changes {
        tracing::info!(file = %file_name, "state file: {c}");
        publish_change(plane, c).await;
    }
    for c in &report.conflicts {
        tracing::warn!(file = %file_name, "state file item not applied: {c}");
    }
    if report.is_noop() {
        tracing::info!(file = %file_name, sha256 = %loaded.sha256, "state file: nothing to change");
        return Ok(report);
    }
    let mut message = format!(
        "state file {file_name} applied: {} change(s)",
        report.changes.len()
    );
    if !report.conflicts.is_empty() {
        message.push_str(&format!(
            ", {} item(s) not applied: {}",
            report.conflicts.len(),
            report
                .conflicts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut event = crate::events::event(APPLIED_EVENT, "", message);
    event.details = [
        ("file".to_string(), file_name),
        ("sha256".to_string(), loaded.sha256.clone()),
        ("changes".to_string(), report.changes.len().to_string()),
        ("conflicts".to_string(), report.conflicts.len().to_string()),
    ]
    .into();
    plane.publish(event).await;
    Ok(report)
}

/// The event the gRPC service publishes for the same change.
async fn publish_change(plane: &ControlPlane, c: &Change) {
    use crate::control::registry::{publish_transition, version_event};
    match c {
        Change::Registered { key, version, .. } => {
            plane
                .publish(version_event(
                    "version_registered",
                    version,
                    format!(
                        "model '{}' version {} registered ({}) from the state file as '{key}'",
                        version.model, version.version, version.endpoint
                    ),
                ))
                .await
        }
        Change::StageChanged {
            version, archived, ..
        } => publish_transition(plane, version, archived).await,
        Change::ExperimentCreated(e) => {
            plane
                .publish(crate::events::experiment_event("experiment_created", e))
                .await
        }
        Change::ExperimentChanged(e) if e.state == ExperimentState::Stopped => {
            plane
                .publish(crate::events::experiment_event("experiment_stopped", e))
                .await
        }
        // The services publish nothing for these either.
        Change::ExperimentChanged(_)
        | Change::PolicySet { .. }
        | Change::ShadowSet(_)
        | Change::ShadowRemoved(_) => {}
    }
}
