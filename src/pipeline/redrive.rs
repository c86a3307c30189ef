//! Redrive: a finished or failed webhook goes round again. One step shared
//! by the `Redeliver` RPC, the automatic redrive of dead letters and the
//! bulk redrive of the CLI, so that all three move the same columns.

use chrono::{DateTime, Utc};

use super::queue::{Job, JobKind};
use crate::{
    domain::{Status, TenantId, WebhookId, event_type},
    store::{
        Changes, RedriveSource, Store, StoreError, Transition, Webhook, priority_of, status_of,
        webhooks::Column as C,
    },
};

/// The statuses a redrive starts from.
pub const REDRIVABLE: [Status; 3] = [Status::DeadLetter, Status::Failed, Status::Completed];

#[derive(Debug)]
pub enum Outcome {
    /// Moved, and its job is due now (the caller enqueues it; see
    /// [`super::queue::enqueue_logged`]).
    Redriven(Box<Webhook>, Job),
    /// Not in a status a redrive starts from.
    NotRedrivable(Status),
    /// Its status changed while this ran (compare-and-set lost).
    MovedOn,
}

/// Moves `w` back into the pipeline. Delivery restarts its attempt count
/// (`attempt_base`), keeping the history; a failed verification starts
/// verifying again. Open dead letters are marked redriven by `by`.
pub async fn redrive(
    store: &Store,
    w: &Webhook,
    by: RedriveSource,
    now: DateTime<Utc>,
) -> Result<Outcome, StoreError> {
    let status = status_of(w)?;
    let (to, kind, changes) = match status {
        Status::Completed | Status::DeadLetter => (
            Status::Retrying,
            JobKind::Deliver,
            Changes::new()
                .set(C::AttemptBase, w.attempt_count)
                .set(C::NextAttemptAt, Some(now))
                .set(C::CompletedAt, None::<DateTime<Utc>>),
        ),
        Status::Failed => (
            Status::Verifying,
            JobKind::Verify,
            Changes::new().set(C::VerifyAttempts, 0),
        ),
        other => return Ok(Outcome::NotRedrivable(other)),
    };
    let tenant = TenantId::from_trusted(w.tenant_id.clone());
    let id = WebhookId::from_trusted(w.id.clone());
    let moved = store
        .transition(
            Transition::new(&tenant, &id, &[status], to, event_type::REDELIVER, now)
                .changes(changes)
                .redriven_by(by),
        )
        .await?;
    Ok(match moved {
        Some(moved) => {
            let job = Job {
                kind,
                priority: priority_of(&moved),
                tenant,
                webhook: id,
            };
            Outcome::Redriven(Box::new(moved), job)
        }
        None => Outcome::MovedOn,
    })
}
