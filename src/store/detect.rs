//! Queries of detection without Confirm: expiry, AUTO checks, and the
//! lookup of a storage event's webhooks. Every one of them runs on an index
//! (`idx_webhooks_status_expires`, `idx_webhooks_status_next_check`,
//! `idx_webhooks_object_key`, partial: PENDING AUTO webhooks only).

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{Expr, ExprTrait},
};

use super::{Result, Store, Webhook, webhooks};
use crate::domain::{Status, TenantId, Trigger, WebhookId};

impl Store {
    /// PENDING webhooks whose `expires_at` has passed, oldest expiry first
    /// (every tenant: the expiry sweep).
    pub async fn expired_pending(&self, now: DateTime<Utc>, limit: u64) -> Result<Vec<Webhook>> {
        Ok(webhooks::Entity::find()
            .filter(webhooks::Column::Status.eq(Status::Pending.as_str()))
            .filter(webhooks::Column::ExpiresAt.lte(now))
            .order_by_asc(webhooks::Column::ExpiresAt)
            .limit(limit)
            .all(self.db())
            .await?)
    }

    /// PENDING webhooks owed a check that should have run before `before`
    /// and are not expired yet (their job was lost: the reconciler puts it
    /// back).
    pub async fn overdue_checks(
        &self,
        before: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<Webhook>> {
        Ok(webhooks::Entity::find()
            .filter(webhooks::Column::Status.eq(Status::Pending.as_str()))
            .filter(webhooks::Column::NextCheckAt.lt(before))
            .filter(webhooks::Column::ExpiresAt.gt(now))
            .order_by_asc(webhooks::Column::NextCheckAt)
            .limit(limit)
            .all(self.db())
            .await?)
    }

    /// A page of PENDING webhooks owed a check, by id after `after`
    /// (start-up recovery of the in-process queue).
    pub async fn pending_checks(&self, after: Option<&str>, limit: u64) -> Result<Vec<Webhook>> {
        let mut q = webhooks::Entity::find()
            .filter(webhooks::Column::Status.eq(Status::Pending.as_str()))
            .filter(webhooks::Column::NextCheckAt.is_not_null());
        if let Some(a) = after {
            q = q.filter(webhooks::Column::Id.gt(a));
        }
        Ok(q.order_by_asc(webhooks::Column::Id)
            .limit(limit)
            .all(self.db())
            .await?)
    }

    /// Claims check number `count + 1` of a PENDING webhook: only one of
    /// several copies of a check job gets `true` (compare-and-set on
    /// `check_count`), so one check makes one HEAD. Sets when the following
    /// check is due (`None`: no further check).
    pub async fn claim_check(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        count: i32,
        next: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let res = webhooks::Entity::update_many()
            .col_expr(webhooks::Column::CheckCount, Expr::value(count + 1))
            .col_expr(webhooks::Column::NextCheckAt, Expr::value(next))
            .filter(webhooks::Column::Id.eq(id.as_str()))
            .filter(webhooks::Column::TenantId.eq(tenant.as_str()))
            .filter(webhooks::Column::Status.eq(Status::Pending.as_str()))
            .filter(webhooks::Column::CheckCount.eq(count))
            .exec(self.db())
            .await?;
        Ok(res.rows_affected == 1)
    }

    /// Records what check number `count` saw, and moves the next check,
    /// while no other check has been claimed since.
    pub async fn record_seen(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        count: i32,
        etag: &str,
        size: i64,
        next: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let res = webhooks::Entity::update_many()
            .col_expr(webhooks::Column::SeenEtag, Expr::value(etag))
            .col_expr(webhooks::Column::SeenSize, Expr::value(size))
            .col_expr(webhooks::Column::NextCheckAt, Expr::value(next))
            .filter(webhooks::Column::Id.eq(id.as_str()))
            .filter(webhooks::Column::TenantId.eq(tenant.as_str()))
            .filter(webhooks::Column::Status.eq(Status::Pending.as_str()))
            .filter(webhooks::Column::CheckCount.eq(count))
            .exec(self.db())
            .await?;
        Ok(res.rows_affected == 1)
    }

    /// A storage event saw the object of a PENDING AUTO webhook: its check
    /// is due now, and what the event saw counts as the previous sight (so
    /// that a HEAD showing the same ETag and size finds it stable at once).
    /// False when the webhook is no longer PENDING.
    pub async fn check_now(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        etag: Option<&str>,
        size: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let res = webhooks::Entity::update_many()
            .col_expr(webhooks::Column::NextCheckAt, Expr::value(Some(now)))
            .col_expr(
                webhooks::Column::SeenEtag,
                Expr::value(etag.map(str::to_string)),
            )
            .col_expr(webhooks::Column::SeenSize, Expr::value(size))
            // A check in flight must not overwrite this with its own next
            // time: its compare-and-set on the count fails.
            .col_expr(
                webhooks::Column::CheckCount,
                Expr::col(webhooks::Column::CheckCount).add(1),
            )
            .filter(webhooks::Column::Id.eq(id.as_str()))
            .filter(webhooks::Column::TenantId.eq(tenant.as_str()))
            .filter(webhooks::Column::Status.eq(Status::Pending.as_str()))
            .exec(self.db())
            .await?;
        Ok(res.rows_affected == 1)
    }

    /// PENDING AUTO webhooks of one object (every tenant: a storage event
    /// names a bucket and a key, and each row it matches carries its own
    /// tenant).
    pub async fn pending_auto_for_object(
        &self,
        storage: &str,
        bucket: &str,
        key: &str,
        limit: u64,
    ) -> Result<Vec<Webhook>> {
        Ok(pending_auto_query(storage, bucket, key, limit)
            .all(self.db())
            .await?)
    }
}

/// [`Store::pending_auto_for_object`]'s query. The status and the trigger
/// are constants written inline, not bound: the planner then proves
/// `idx_webhooks_object_key`'s predicate (the same two comparisons) with a
/// prepared statement's generic plan too.
pub(crate) fn pending_auto_query(
    storage: &str,
    bucket: &str,
    key: &str,
    limit: u64,
) -> sea_orm::Select<webhooks::Entity> {
    let constant = |s: &str| Expr::Constant(s.into());
    webhooks::Entity::find()
        .filter(webhooks::Column::ObjectKey.eq(key))
        .filter(webhooks::Column::Bucket.eq(bucket))
        .filter(webhooks::Column::Storage.eq(storage))
        .filter(Expr::col(webhooks::Column::Status).eq(constant(Status::Pending.as_str())))
        .filter(Expr::col(webhooks::Column::Trigger).eq(constant(Trigger::Auto.as_str())))
        .limit(limit)
}
