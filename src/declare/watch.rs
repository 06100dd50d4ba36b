//! The poller: watches the state file and applies its content when it changes. A content that
//! fails is reported once (a warning and `state_file_rejected`) and the current state is kept; a
//! half-written file is given a second look before it is reported.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::control::ControlPlane;

use super::apply::{apply, ApplyError};
use super::format::DeclareError;
use super::parse::{from_bytes, read, sha256_hex, LoadError, Loaded};

/// Event published when a changed state file is refused at runtime; the current state is kept.
pub const REJECTED_EVENT: &str = "state_file_rejected";

/// Re-reads the file's content at least this often even when its modification time and size
/// look unchanged: some file systems keep times to the second, and an edit within that second
/// that keeps the size would otherwise go unseen.
const FORCED_READ_EVERY: u32 = 12;

/// What the poller last saw of the file.
#[derive(Default)]
struct Seen {
    /// Modification time and size at the last read.
    stamp: Option<(Option<SystemTime>, u64)>,
    /// Polls since the content was last read.
    polls: u32,
    /// A failure (its content hash, or the read error) seen once and waiting for a second look.
    pending: Option<String>,
    /// The failure already reported, so that it is reported once, not every poll.
    reported: Option<String>,
}

/// Polls `path` every `interval` and applies its content when it changes, until `stop`.
///
/// `applied` is the SHA-256 of the content in force. A content that fails to parse is reported
/// only when the next poll sees it again: an editor writing the file in place can be caught
/// half-way, and a Kubernetes ConfigMap (swapped atomically) never is. A reported failure keeps
/// the current state, logs a warning and publishes `state_file_rejected` once per content.
pub async fn watch(
    plane: std::sync::Arc<ControlPlane>,
    path: PathBuf,
    interval: Duration,
    mut applied: String,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the file was just applied
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        poll(&plane, &path, &mut applied, &mut seen).await;
    }
}

/// One look at the file: read it when its time or size moved (or every [`FORCED_READ_EVERY`]
/// polls), apply it when its content changed, report a failure once.
async fn poll(plane: &ControlPlane, path: &Path, applied: &mut String, seen: &mut Seen) {
    seen.polls += 1;
    let stamp = match tokio::fs::metadata(path).await {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(e) => {
            let reason = format!("cannot read it: {e}");
            failed(plane, path, seen, reason.clone(), reason, None, false).await;
            return;
        }
    };
    if seen.stamp == Some(stamp) && seen.polls < FORCED_READ_EVERY {
        return;
    }
    seen.polls = 0;
    let path_for_read = path.to_path_buf();
    let loaded = match tokio::task::spawn_blocking(move || read_and_parse(&path_for_read)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "state file read task failed");
            return;
        }
    };
    seen.stamp = Some(stamp);
    let loaded = match loaded {
        Ok(l) => l,
        Err(ReadFailure::Read(reason)) => {
            failed(plane, path, seen, reason.clone(), reason, None, false).await;
            return;
        }
        Err(ReadFailure::Invalid { sha256, error }) => {
            let reason = error.to_string();
            failed(
                plane,
                path,
                seen,
                sha256.clone(),
                reason,
                Some(sha256),
                false,
            )
            .await;
            return;
        }
    };
    if loaded.sha256 == *applied {
        seen.pending = None;
        seen.reported = None;
        return;
    }
    if seen.reported.as_deref() == Some(loaded.sha256.as_str()) {
        return;
    }
    match apply(plane, path, &loaded).await {
        Ok(report) => {
            tracing::info!(
                file = %path.display(), sha256 = %loaded.sha256,
                changes = report.changes.len(), conflicts = report.conflicts.len(),
                "state file changed and applied"
            );
            *applied = loaded.sha256;
            seen.pending = None;
            seen.reported = None;
        }
        Err(ApplyError::Refused(e)) => {
            // The rules refused a valid file: the same content will be refused again, so report
            // it now rather than after a second look.
            let sha = loaded.sha256.clone();
            failed(
                plane,
                path,
                seen,
                sha.clone(),
                e.to_string(),
                Some(sha),
                true,
            )
            .await;
        }
        Err(ApplyError::Control(e)) => {
            // Not durable, nothing changed: try again next poll.
            tracing::warn!(file = %path.display(), error = %e, "state file not applied; retrying");
            seen.stamp = None;
        }
    }
}

/// Why the poller could not use what it read.
enum ReadFailure {
    Read(String),
    Invalid { sha256: String, error: DeclareError },
}

/// Reads and parses the file, keeping the hash of a content that fails to parse.
fn read_and_parse(path: &Path) -> Result<Loaded, ReadFailure> {
    let bytes = match read(path) {
        Ok(b) => b,
        Err(LoadError::Read { source, .. }) => {
            return Err(ReadFailure::Read(format!("cannot read it: {source}")))
        }
        Err(e) => return Err(ReadFailure::Read(e.to_string())),
    };
    from_bytes(&bytes).map_err(|error| ReadFailure::Invalid {
        // The hash of what was read, so that the same bad content is reported once.
        sha256: sha256_hex(&bytes),
        error,
    })
}

/// Records a failure; reports it (warning and `state_file_rejected`) when it is seen a second
/// time in a row, or at once when `now`.
async fn failed(
    plane: &ControlPlane,
    path: &Path,
    seen: &mut Seen,
    key: String,
    reason: String,
    sha256: Option<String>,
    now: bool,
) {
    if seen.reported.as_deref() == Some(key.as_str()) {
        return;
    }
    if !now && seen.pending.as_deref() != Some(key.as_str()) {
        seen.pending = Some(key);
        // Read again next poll even if the file's time and size do not move.
        seen.stamp = None;
        return;
    }
    seen.pending = None;
    seen.reported = Some(key);
    let file = path.display().to_string();
    tracing::warn!(file = %file, error = %reason, "state file rejected; keeping the current state");
    let mut event = crate::events::event(
        REJECTED_EVENT,
        "",
        format!("state file {file} rejected, current state kept: {reason}"),
    );
    event.details = [
        ("file".to_string(), file),
        ("error".to_string(), reason),
        ("sha256".to_string(), sha256.unwrap_or_default()),
    ]
    .into();
    plane.publish(event).await;
}
