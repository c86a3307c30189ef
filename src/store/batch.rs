//! Group commit of status changes.
//!
//! [`Store::write_group`] applies several writes in one transaction, in the
//! order given, each still its own compare-and-set: `UPDATE webhooks …
//! WHERE id AND tenant_id AND status IN (from) [AND updated_at <= …]
//! RETURNING *`, and only when that matched, its event (and attempt or
//! dead-letter) rows. The event, attempt and dead-letter rows of the whole
//! group are inserted with one multi-row `INSERT` each. [`Store::transition`]
//! is a group of one; on PostgreSQL, a group of one transition that opens
//! or closes no dead letter is a single statement (see
//! `Store::transition_in_one_statement`); a larger group of transitions is
//! a single statement too (`multirow::write_whole`), and one with touches
//! makes one `UPDATE` for its compare-and-sets (see `multirow`). On SQLite
//! a group of distinct webhooks makes one `UPDATE` for its compare-and-sets
//! too (and a second for those whose callers want no row back), and,
//! without touches or a move out of DEAD_LETTER, goes to
//! SQLite's connection thread as at most two commands, its transaction's
//! `BEGIN` and `COMMIT` in them (see `sqlite`).
//!
//! A group may also insert new webhooks (`Write::Insert`, one multi-row
//! `INSERT` before the compare-and-sets); on SQLite the API's Creates
//! without an idempotency key are written that way.
//!
//! [`WriteBatcher`] is what the pipeline's jobs and the API's Confirms
//! (and Creates, on SQLite) write through: each caller sends its write over a channel and awaits
//! its own answer; one task takes whatever is waiting (up to `max`),
//! writes it as one group and answers each caller. It never waits for more work: when idle a write goes alone,
//! and while a group is being written the next one gathers. That makes it
//! the pipeline's only writer, so on SQLite the jobs no longer queue for
//! the write lock one transaction each.
//!
//! If a group fails (a deadlock, a constraint that one write breaks, a
//! lost connection), nothing of it was stored; each write is then tried on
//! its own, so that one bad write cannot fail the others, and each job gets
//! its own answer. Events are published to the bus after the commit that
//! stored them, in id order.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::NotSet,
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryTrait, RuntimeErr, Set,
    sea_query::{Expr, Query},
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

mod multirow;
mod sqlite;
use tracing::warn;

use super::{
    Changes, NewAttempt, RedriveSource, Result, Store, StoreError, Transition, Webhook, attempts,
    dead_letters, entities::events, event_on, webhooks,
};
use crate::{
    domain::{Status, TenantId, WebhookId},
    events::Event,
    metrics::METRICS,
};

/// A [`Transition`] that owns its data, so that it can wait in a queue.
pub(crate) struct OwnedTransition {
    tenant: TenantId,
    id: WebhookId,
    from: Vec<Status>,
    to: Status,
    event: &'static str,
    changes: Changes,
    attempt: Option<NewAttempt>,
    dead_letter: Option<String>,
    now: DateTime<Utc>,
    unchanged_since: Option<DateTime<Utc>>,
    redriven_by: Option<RedriveSource>,
    unexpired_at: Option<DateTime<Utc>>,
    through: Option<(Status, &'static str)>,
    /// Whether its caller wants the moved row back ([`WriteBatcher::moved`]
    /// does not). A write that wants none is answered [`Done::Moved`] and
    /// reads none of the row back, alone or in a group (but on the general
    /// path, whose `UPDATE`s return whole rows).
    wants_row: bool,
}

/// An event row to insert: the index of the write it comes from, its
/// type, the status it records, when.
type NewEvent = (usize, &'static str, Status, DateTime<Utc>);

impl OwnedTransition {
    /// One of the events this transition stored, `id` its row's.
    fn event(&self, id: i64, kind: &str, status: Status) -> Event {
        event_on(
            self.tenant.as_str(),
            self.id.as_str(),
            id,
            kind,
            status,
            self.now,
        )
    }

    /// The rows that record this transition (write `i` of its group), once
    /// its compare-and-set moved the webhook (whose id and tenant are this
    /// transition's: the compare-and-set matched them): its events (the
    /// `through` event first), its attempt, the dead letter it opens.
    fn rows_of_move(
        &self,
        i: usize,
        events: &mut Vec<NewEvent>,
        attempts: &mut Vec<attempts::ActiveModel>,
        dead_letters: &mut Vec<dead_letters::ActiveModel>,
    ) {
        if let Some((status, event)) = self.through {
            events.push((i, event, status, self.now));
        }
        events.push((i, self.event, self.to, self.now));
        if let Some(a) = &self.attempt {
            attempts.push(attempts::ActiveModel {
                id: NotSet,
                webhook_id: Set(self.id.as_str().to_string()),
                number: Set(a.number),
                started_at: Set(a.started_at),
                duration_ms: Set(a.duration_ms),
                response_status: Set(a.response_status),
                response_body: Set(a.response_body.clone()),
                error: Set(a.error.clone()),
            });
        }
        if let Some(reason) = &self.dead_letter {
            dead_letters.push(dead_letters::ActiveModel {
                id: NotSet,
                tenant_id: Set(self.tenant.as_str().to_string()),
                webhook_id: Set(self.id.as_str().to_string()),
                reason: Set(reason.clone()),
                created_at: Set(self.now),
                redriven_at: Set(None),
                redriven_by: Set(None),
            });
        }
    }
}

impl From<Transition<'_>> for Box<OwnedTransition> {
    fn from(t: Transition<'_>) -> Self {
        Box::new(t.into())
    }
}

impl From<Transition<'_>> for OwnedTransition {
    fn from(t: Transition<'_>) -> Self {
        Self {
            tenant: t.tenant.clone(),
            id: t.id.clone(),
            from: t.from.to_vec(),
            to: t.to,
            event: t.event,
            changes: t.changes,
            attempt: t.attempt,
            dead_letter: t.dead_letter,
            now: t.now,
            unchanged_since: t.unchanged_since,
            redriven_by: t.redriven_by,
            unexpired_at: t.unexpired_at,
            through: t.through,
            wants_row: true,
        }
    }
}

/// One write of a group.
pub(crate) enum Write {
    /// A status change (see [`Store::transition`]).
    Transition(Box<OwnedTransition>),
    /// `updated_at` only, while the status is `status` (see [`Store::touch`]).
    Touch {
        tenant: TenantId,
        id: WebhookId,
        status: Status,
        now: DateTime<Utc>,
    },
    /// A new webhook and its first event (see [`WriteBatcher::create`]):
    /// its row is the write's answer.
    Insert {
        row: Box<Webhook>,
        event: &'static str,
    },
}

impl Write {
    fn webhook(&self) -> &str {
        match self {
            Write::Transition(t) => t.id.as_str(),
            Write::Touch { id, .. } => id.as_str(),
            Write::Insert { row, .. } => row.id.as_str(),
        }
    }

    fn tenant(&self) -> &str {
        match self {
            Write::Transition(t) => t.tenant.as_str(),
            Write::Touch { tenant, .. } => tenant.as_str(),
            Write::Insert { row, .. } => row.tenant_id.as_str(),
        }
    }

    /// The event rows of `new_events` whose writes moved their webhooks
    /// (`rows`: what each write of `writes` did), to insert.
    fn event_items<'a>(
        writes: &'a [Write],
        rows: &[Done],
        new_events: &[NewEvent],
    ) -> Vec<EventItem<'a>> {
        new_events
            .iter()
            .filter(|(i, ..)| rows[*i].moved())
            .map(|&(i, kind, status, at)| {
                (writes[i].tenant(), writes[i].webhook(), kind, status, at)
            })
            .collect()
    }
}

/// An event row to insert: its webhook's tenant and id, its type, the
/// status it records, when.
pub(super) type EventItem<'a> = (&'a str, &'a str, &'static str, Status, DateTime<Utc>);

/// What a committed group did: per write, what it did ([`Done`]), and
/// the events it stored, in id order.
pub(crate) struct Applied {
    pub rows: Vec<Done>,
    pub events: Vec<Event>,
}

/// What one write did, as its caller hears it. The size of a row, as the
/// `Option<Webhook>` it replaced: a boxed row would cost an allocation per
/// answer.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "as large as Option<Webhook>; boxing allocates per answer"
)]
pub(crate) enum Done {
    /// Nothing moved: its compare-and-set did not match (someone else
    /// moved the webhook first), or it was a touch.
    Stayed,
    /// It moved the webhook; its row as stored.
    Row(Webhook),
    /// It moved the webhook; the row was not read back, as the write asked
    /// (its `UPDATE` returns none of its 41 columns, or they are not
    /// decoded).
    Moved,
}

impl Done {
    pub(crate) fn moved(&self) -> bool {
        !matches!(self, Done::Stayed)
    }

    #[cfg(test)]
    pub(crate) fn row(&self) -> Option<&Webhook> {
        match self {
            Done::Row(w) => Some(w),
            Done::Stayed | Done::Moved => None,
        }
    }

    /// The row, for a write that wanted it back.
    pub(crate) fn into_row(self) -> Result<Option<Webhook>> {
        match self {
            Done::Stayed => Ok(None),
            Done::Row(w) => Ok(Some(w)),
            Done::Moved => Err(StoreError::Corrupt(
                "a write that wanted its row back was answered without it".into(),
            )),
        }
    }
}

/// A connection a writer of the [`WriteBatcher`] keeps between its groups
/// on PostgreSQL. Taken from the pool for each group, a connection costs
/// a round trip more: sqlx pings every connection its pool takes back
/// (docs/benchmarks-history.md, "Session 22"). Empty until the writer's first group, and
/// again once its connection failed or outlived the pool's
/// `max_lifetime`; pinged first when it sat idle for
/// [`super::PING_IF_IDLE_FOR`], as the pool's own connections are.
#[derive(Default)]
pub(crate) struct Held(Option<Kept>);

struct Kept {
    conn: sea_orm::sqlx::pool::PoolConnection<sea_orm::sqlx::Postgres>,
    taken_at: Instant,
    used_at: Instant,
}

/// How long a kept connection that sat idle may take to answer its ping.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a group's single statement runs on PostgreSQL: on its writer's
/// kept connection ([`Held`]), or on a connection of the pool.
pub(crate) struct Pg<'a> {
    db: &'a sea_orm::DatabaseConnection,
    held: Option<&'a mut Held>,
}

impl Pg<'_> {
    pub(crate) async fn query_all(
        &mut self,
        stmt: sea_orm::Statement,
    ) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
        let Some(held) = self.held.as_deref_mut() else {
            return self.db.query_all_raw(stmt).await;
        };
        let pool = self.db.get_postgres_connection_pool();
        let values = stmt
            .values
            .unwrap_or_else(|| sea_orm::sea_query::Values(Vec::new()));
        let mut tries = 0;
        loop {
            tries += 1;
            // A kept connection past the pool's lifetime goes back (the
            // pool closes it); one that sat idle is pinged first, and goes
            // back if that fails (nothing was sent on it then).
            if let Some(k) = &mut held.0 {
                let expired = pool
                    .options()
                    .get_max_lifetime()
                    .is_some_and(|max| k.taken_at.elapsed() >= max);
                let dead = !expired
                    && k.used_at.elapsed() >= super::PING_IF_IDLE_FOR
                    && !matches!(
                        tokio::time::timeout(
                            PING_TIMEOUT,
                            sea_orm::sqlx::Connection::ping(&mut *k.conn)
                        )
                        .await,
                        Ok(Ok(()))
                    );
                if expired || dead {
                    held.0 = None;
                }
            }
            let reused = held.0.is_some();
            let k = match &mut held.0 {
                Some(k) => k,
                none @ None => {
                    let conn = pool
                        .acquire()
                        .await
                        .map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))))?;
                    let now = Instant::now();
                    none.insert(Kept {
                        conn,
                        taken_at: now,
                        used_at: now,
                    })
                }
            };
            k.used_at = Instant::now();
            // Prepared and cached on the connection, as sea-orm's own
            // queries are. The values are copied, since sqlx takes them
            // and a rerun (below) needs them again: a few kilobytes
            // against a round trip.
            let found = sea_orm::sqlx::query_with(
                sea_orm::sqlx::AssertSqlSafe(stmt.sql.as_str()),
                sea_query_sqlx::SqlxValues(values.clone()),
            )
            .fetch_all(&mut *k.conn)
            .await;
            let e = match found {
                Ok(rows) => return Ok(rows.into_iter().map(sea_orm::QueryResult::from).collect()),
                Err(e) => e,
            };
            match ended_by_server(&e) {
                // The database refused the statement (a conflict, a broken
                // constraint): the connection is as it was.
                None => return Err(sqlx_error(e)),
                // The server ended the session (a restart, a terminated
                // backend). On a connection kept from an earlier group that
                // is almost always from before it read the statement, and
                // a statement it was running is rolled back; so the
                // statement runs once more on another connection. (Only a
                // server stopped between its commit and its answer leaves
                // the rerun nothing to move: the caller then takes the
                // webhook as moved by another (a claim is left to the stale
                // sweep), and the events miss the live streams.)
                Some(true) => {
                    held.0 = None;
                    if !reused || tries > 1 {
                        return Err(sqlx_error(e));
                    }
                    warn!(error = %e, "a writer's kept connection was closed by the server; taking another");
                }
                // The connection failed some other way (the network): the
                // statement may or may not have run, so it is not run
                // again here; the caller gets the error, as from the pool.
                Some(false) => {
                    held.0 = None;
                    return Err(sqlx_error(e));
                }
            }
        }
    }
}

/// Whether `e` says the connection is gone (`Some`), rather than that the
/// database refused one statement (`None`); `Some(true)` when the server
/// said it had ended the session, so that the statement never ran:
/// SQLSTATE class 57P ("operator intervention": a shutdown, a terminated
/// backend, which the server sends before it closes the connection) or
/// class 08 (connection exceptions).
fn ended_by_server(e: &sea_orm::sqlx::Error) -> Option<bool> {
    match e {
        sea_orm::sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08"))
            .then_some(true),
        _ => Some(false),
    }
}

fn sqlx_error(e: sea_orm::sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))
}

impl Store {
    /// Applies `writes` in one transaction, in the given order for each
    /// webhook. Each write is its own compare-and-set, scoped by its
    /// tenant. On error nothing was stored. The caller publishes the
    /// events, after this returns.
    ///
    /// Rows are locked in webhook id order when written one by one, so two
    /// such groups never wait for each other in a cycle. A group of
    /// distinct webhooks makes one `UPDATE` for its compare-and-sets
    /// (`multirow`, PostgreSQL and SQLite; on PostgreSQL, without touches,
    /// the whole group is one statement; on SQLite the writes that want no
    /// row back have a second one, returning their ids). On PostgreSQL that
    /// locks its rows in one order of its own (see there): a deadlock is
    /// unlikely but possible. PostgreSQL detects it and fails one group,
    /// and the batcher writes that group's writes one by one.
    pub(crate) async fn write_group(&self, writes: &[Write]) -> Result<Applied> {
        self.write_group_on(writes, None).await
    }

    /// [`Store::write_group`], its single statement on PostgreSQL run on
    /// `held`, the writer's kept connection, when given.
    pub(crate) async fn write_group_on(
        &self,
        writes: &[Write],
        held: Option<&mut Held>,
    ) -> Result<Applied> {
        let mut pg = Pg {
            db: self.db.pool(),
            held,
        };
        if let [Write::Transition(t)] = writes
            && let Some(applied) = self.transition_in_one_statement(&mut pg, t).await?
        {
            return Ok(applied);
        }
        let mut order: Vec<usize> = (0..writes.len()).collect();
        // Stable: writes to one webhook keep their order.
        order.sort_by(|&a, &b| writes[a].webhook().cmp(writes[b].webhook()));
        let postgres = self.db.get_database_backend() == sea_orm::DatabaseBackend::Postgres;
        let distinct = order
            .windows(2)
            .all(|p| writes[p[0]].webhook() != writes[p[1]].webhook());
        // PostgreSQL, the usual group (transitions of distinct webhooks,
        // none leaving DEAD_LETTER): all of it in one statement. (A lone
        // transition has its own statement above: through this one it
        // cost PostgreSQL 1.3-1.4 instead of 0.8-1.0 ms per webhook at 8
        // in flight, measured.)
        if writes.len() > 1 && postgres && distinct {
            let ts: Option<Vec<(usize, &OwnedTransition)>> = order
                .iter()
                .map(|&i| match &writes[i] {
                    Write::Transition(t) if !t.from.contains(&Status::DeadLetter) => {
                        Some((i, &**t))
                    }
                    _ => None,
                })
                .collect();
            if let Some(ts) = ts
                && let Some(applied) = multirow::write_whole(&mut pg, &ts).await?
            {
                return Ok(applied);
            }
        }
        // SQLite, a group of distinct webhooks without touches: in one or
        // two commands to the connection's thread, its transaction
        // included (see `sqlite`).
        if distinct
            && self.db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite
            && let Some(applied) = sqlite::write(&self.db, writes, &order).await?
        {
            return Ok(applied);
        }
        let txn = self.db.begin().await?;
        let mut rows: Vec<Done> = vec![Done::Stayed; writes.len()];
        // The compare-and-sets in one statement, when the group allows
        // (see `multirow`; on SQLite too, where each statement is a round
        // trip to the connection's thread that the whole pipeline waits
        // for); their rows are then taken below instead of being written
        // one by one.
        let mut premoved: Option<Vec<Option<Done>>> = None;
        if writes.len() > 1 && distinct {
            let ts: Option<Vec<(usize, &OwnedTransition)>> = order
                .iter()
                .filter_map(|&i| match &writes[i] {
                    Write::Transition(t) => {
                        Some((!t.from.contains(&Status::DeadLetter)).then_some((i, &**t)))
                    }
                    Write::Touch { .. } | Write::Insert { .. } => None,
                })
                .collect();
            if let Some(ts) = ts {
                premoved = multirow::apply(&txn, &ts, writes.len()).await?;
            }
        }
        // In the order they happened.
        let mut new_events: Vec<NewEvent> = Vec::new();
        let mut new_attempts: Vec<attempts::ActiveModel> = Vec::new();
        let mut new_dead_letters: Vec<dead_letters::ActiveModel> = Vec::new();
        // The group's new webhooks first, with one multi-row INSERT; their
        // events go with the others'.
        let inserts: Vec<webhooks::ActiveModel> = order
            .iter()
            .filter_map(|&i| match &writes[i] {
                Write::Insert { row, event } => {
                    new_events.push((i, *event, Status::Pending, row.created_at));
                    rows[i] = Done::Row((**row).clone());
                    Some((**row).clone().into())
                }
                _ => None,
            })
            .collect();
        if !inserts.is_empty() {
            webhooks::Entity::insert_many(inserts)
                .exec_without_returning(&txn)
                .await?;
        }
        for i in order {
            let t = match &writes[i] {
                Write::Touch {
                    tenant,
                    id,
                    status,
                    now,
                } => {
                    touch_query(tenant, id, *status, *now).exec(&txn).await?;
                    continue;
                }
                Write::Insert { .. } => continue,
                Write::Transition(t) => t,
            };
            let done = match premoved.as_mut().and_then(|p| p[i].take()) {
                Some(Done::Stayed) => continue, // someone else moved it first
                Some(done) => done,
                None => {
                    let found = txn
                        .query_all(&update_query(t, Query::returning().all()))
                        .await?;
                    match found.as_slice() {
                        [] => continue, // someone else moved it first
                        [r] => Done::Row(super::decode::webhook(r)?),
                        _ => {
                            return Err(StoreError::Corrupt(format!(
                                "webhook id {} matched {} rows",
                                t.id,
                                found.len()
                            )));
                        }
                    }
                }
            };
            t.rows_of_move(i, &mut new_events, &mut new_attempts, &mut new_dead_letters);
            if t.from.contains(&Status::DeadLetter) && t.to != Status::DeadLetter {
                // Leaving DEAD_LETTER (a redrive, or a cancel): close the
                // open dead-letter rows, saying who redrove them. Rows an
                // earlier write of this group opened are written first.
                insert_dead_letters(&txn, &mut new_dead_letters).await?;
                dead_letters::Entity::update_many()
                    .col_expr(dead_letters::Column::RedrivenAt, Expr::value(t.now))
                    .col_expr(
                        dead_letters::Column::RedrivenBy,
                        Expr::value(t.redriven_by.map(|b| b.as_str().to_string())),
                    )
                    .filter(dead_letters::Column::WebhookId.eq(t.id.as_str()))
                    .filter(dead_letters::Column::RedrivenAt.is_null())
                    .exec(&txn)
                    .await?;
            }
            rows[i] = done;
        }
        if !new_attempts.is_empty() {
            attempts::Entity::insert_many(new_attempts)
                .exec_without_returning(&txn)
                .await?;
        }
        insert_dead_letters(&txn, &mut new_dead_letters).await?;
        let events = insert_events(&txn, &Write::event_items(writes, &rows, &new_events)).await?;
        txn.commit().await?;
        Ok(Applied { rows, events })
    }

    /// On PostgreSQL, one transition with no dead-letter row to open or
    /// close, as one statement (so one round trip and no `BEGIN` /
    /// `COMMIT`): the compare-and-set `UPDATE` and, from its `RETURNING`,
    /// the events and the attempt row, in data-modifying CTEs.
    /// `None`: the write needs the general path.
    async fn transition_in_one_statement(
        &self,
        pg: &mut Pg<'_>,
        t: &OwnedTransition,
    ) -> Result<Option<Applied>> {
        use sea_orm::sea_query::{PostgresQueryBuilder, Value};

        if self.db.get_database_backend() != sea_orm::DatabaseBackend::Postgres
            || t.dead_letter.is_some()
            || t.from.contains(&Status::DeadLetter)
        {
            return Ok(None);
        }
        // The columns the events and the attempt take from the row, when
        // the caller wants none of it.
        let returning = if t.wants_row {
            Query::returning().all()
        } else {
            Query::returning().columns([webhooks::Column::Id, webhooks::Column::TenantId])
        };
        let (update_sql, mut values) = update_query(t, returning).build(PostgresQueryBuilder);
        let mut param = |v: Value| {
            values.0.push(v);
            format!("${}", values.0.len())
        };
        let at = param(t.now.into());
        let mut rows = Vec::with_capacity(2);
        for (kind, status) in t
            .through
            .iter()
            .map(|&(s, k)| (k, s))
            .chain([(t.event, t.to)])
        {
            rows.push(format!(
                "({}, {}, {})",
                rows.len(),
                param(kind.into()),
                param(status.as_str().into())
            ));
        }
        let attempt = match &t.attempt {
            None => String::new(),
            Some(a) => format!(
                ", a AS (INSERT INTO attempts (webhook_id, number, started_at, duration_ms, \
                 response_status, response_body, error) \
                 SELECT u.id, {}, {}, {}, {}, {}, {} FROM u)",
                param(a.number.into()),
                param(a.started_at.into()),
                param(a.duration_ms.into()),
                param(a.response_status.into()),
                param(a.response_body.clone().into()),
                param(a.error.clone().into()),
            ),
        };
        // The events are inserted in the order of `rows` (ORDER BY feeds
        // the serial in that order) and come back with their ids, each
        // with the moved row if the caller wants it (a row per event:
        // there is one when the row moved, always).
        let row = if t.wants_row { "u.*, " } else { "" };
        let sql = format!(
            "WITH u AS ({update_sql}), \
             e AS (INSERT INTO events (tenant_id, webhook_id, \"type\", status, occurred_at) \
             SELECT u.tenant_id, u.id, v.kind, v.status, {at} \
             FROM u, (VALUES {}) AS v (ord, kind, status) ORDER BY v.ord \
             RETURNING id, \"type\", status){attempt} \
             SELECT {row}e.id AS event_id, e.\"type\" AS event_kind, e.status AS event_status \
             FROM u, e ORDER BY e.id",
            rows.join(", ")
        );
        let found = pg
            .query_all(sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Postgres,
                sql,
                values.0,
            ))
            .await?;
        let Some(first) = found.first() else {
            return Ok(Some(Applied {
                rows: vec![Done::Stayed],
                events: Vec::new(),
            }));
        };
        let done = if t.wants_row {
            Done::Row(super::decode::webhook(first)?)
        } else {
            Done::Moved
        };
        let events = found
            .iter()
            .map(|r| {
                let status: String = r.try_get("", "event_status")?;
                let kind: String = r.try_get("", "event_kind")?;
                let status = Status::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("event status {status}")))?;
                Ok(t.event(r.try_get("", "event_id")?, &kind, status))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Applied {
            rows: vec![done],
            events,
        }))
    }

    /// Publishes committed events to the bus, in order.
    pub(crate) fn publish_all(&self, events: Vec<Event>) {
        for ev in events {
            self.bus.publish(ev);
        }
    }

    /// One write in its own transaction, its events published after commit.
    async fn write_one(&self, write: &Write) -> Result<Done> {
        if let Write::Touch {
            tenant,
            id,
            status,
            now,
        } = write
        {
            // A single UPDATE needs no transaction of its own.
            touch_query(tenant, id, *status, *now)
                .exec(&self.db)
                .await?;
            return Ok(Done::Stayed);
        }
        let applied = self.write_group(std::slice::from_ref(write)).await?;
        self.publish_all(applied.events);
        Ok(applied.rows.into_iter().next().unwrap_or(Done::Stayed))
    }
}

/// The compare-and-set of a transition: `UPDATE webhooks … WHERE id AND
/// tenant_id AND status IN (from) [AND …] RETURNING …` (`returning`).
fn update_query(
    t: &OwnedTransition,
    returning: sea_orm::sea_query::ReturningClause,
) -> sea_orm::sea_query::UpdateStatement {
    let mut update = webhooks::Entity::update_many()
        .col_expr(webhooks::Column::Status, Expr::value(t.to.as_str()))
        .col_expr(webhooks::Column::UpdatedAt, Expr::value(t.now));
    for (col, value) in &t.changes.0 {
        update = update.col_expr(*col, Expr::value(value.clone()));
    }
    if let Some(at) = t.unchanged_since {
        update = update.filter(webhooks::Column::UpdatedAt.lte(at));
    }
    if let Some(at) = t.unexpired_at {
        update = update.filter(webhooks::Column::ExpiresAt.gt(at));
    }
    let mut update = update
        .filter(webhooks::Column::Id.eq(t.id.as_str()))
        .filter(webhooks::Column::TenantId.eq(t.tenant.as_str()))
        .filter(webhooks::Column::Status.is_in(t.from.iter().map(|s| s.as_str())))
        .into_query();
    update.returning(returning);
    update
}

pub(super) fn touch_query(
    tenant: &TenantId,
    id: &WebhookId,
    status: Status,
    now: DateTime<Utc>,
) -> sea_orm::UpdateMany<webhooks::Entity> {
    webhooks::Entity::update_many()
        .col_expr(webhooks::Column::UpdatedAt, Expr::value(now))
        .filter(webhooks::Column::Id.eq(id.as_str()))
        .filter(webhooks::Column::TenantId.eq(tenant.as_str()))
        .filter(webhooks::Column::Status.eq(status.as_str()))
}

async fn insert_dead_letters<C: ConnectionTrait>(
    conn: &C,
    rows: &mut Vec<dead_letters::ActiveModel>,
) -> Result<()> {
    if !rows.is_empty() {
        dead_letters::Entity::insert_many(std::mem::take(rows))
            .exec_without_returning(conn)
            .await?;
    }
    Ok(())
}

/// Inserts the event rows of `items` with one statement, and returns them
/// in id order, which is the order of `items`.
pub(super) async fn insert_events<C: ConnectionTrait>(
    conn: &C,
    items: &[EventItem<'_>],
) -> Result<Vec<Event>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let (insert, out) = events_insert(items)?;
    number_events(&conn.query_all(&insert).await?, out)
}

/// The `INSERT … RETURNING id, webhook_id` of the event rows of `items`
/// (see [`insert_events`]; at least one), and the events it stores, their
/// ids not yet known (see [`number_events`]).
fn events_insert(
    items: &[EventItem<'_>],
) -> Result<(sea_orm::sea_query::InsertStatement, Vec<Event>)> {
    let mut insert = Query::insert();
    insert.into_table(events::Entity).columns([
        events::Column::TenantId,
        events::Column::WebhookId,
        events::Column::Kind,
        events::Column::Status,
        events::Column::OccurredAt,
    ]);
    let mut out = Vec::with_capacity(items.len());
    for &(tenant, webhook, kind, status, at) in items {
        insert
            .values([
                Expr::value(tenant),
                Expr::value(webhook),
                Expr::value(kind),
                Expr::value(status.as_str()),
                Expr::value(at),
            ])
            .map_err(|e| DbErr::Custom(format!("building the events insert: {e}")))?;
        // The id is known once inserted.
        out.push(event_on(tenant, webhook, 0, kind, status, at));
    }
    insert.returning(Query::returning().columns([events::Column::Id, events::Column::WebhookId]));
    Ok((insert, out))
}

/// `out` (from [`events_insert`]) with the ids its insert returned
/// (`found`).
fn number_events(found: &[sea_orm::QueryResult], mut out: Vec<Event>) -> Result<Vec<Event>> {
    let mut ids = found
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<i64>("", "id")?,
                r.try_get::<String>("", "webhook_id")?,
            ))
        })
        .collect::<Result<Vec<_>, DbErr>>()?;
    // RETURNING does not promise an order; ids are given in insertion
    // order, which the webhook ids confirm. A group whose ids do not line
    // up is not committed (and its writes are retried one by one), except
    // on SQLite's two-command path, where this runs after the COMMIT (see
    // `sqlite`).
    ids.sort_unstable_by_key(|(id, _)| *id);
    if ids.len() != out.len()
        || ids
            .iter()
            .zip(&out)
            .any(|((_, wid), ev)| wid != ev.webhook_id.as_str())
    {
        return Err(
            DbErr::Custom("event ids were not assigned in insertion order".to_string()).into(),
        );
    }
    for (ev, (id, _)) in out.iter_mut().zip(ids) {
        ev.id = id;
    }
    Ok(out)
}

/// Whether an error says the database could not be reached at all (rather
/// than that one statement failed): trying the rest of a group one by one
/// would only fail the same way, slowly.
fn unreachable(e: &StoreError) -> bool {
    use sea_orm::sqlx::Error as X;
    match e {
        StoreError::Db(DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) => true,
        StoreError::Db(
            DbErr::Exec(RuntimeErr::SqlxError(x)) | DbErr::Query(RuntimeErr::SqlxError(x)),
        ) => {
            matches!(
                **x,
                X::Io(_) | X::Tls(_) | X::PoolTimedOut | X::PoolClosed | X::WorkerCrashed
            )
        }
        _ => false,
    }
}

fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Db(d) => StoreError::Db(d.clone()),
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        other => StoreError::Db(DbErr::Custom(other.to_string())),
    }
}

struct Pending {
    write: Write,
    reply: oneshot::Sender<Result<Done>>,
}

/// Writes jobs' status changes in groups (see the module doc). Cheap to
/// clone; the writing task stops when the last clone is dropped.
#[derive(Clone)]
pub struct WriteBatcher {
    tx: Option<mpsc::Sender<Pending>>,
    store: Store,
    counts: Arc<Counts>,
}

/// What the writing task has done, read by tests (figures come from the
/// write-group histogram in `/metrics`).
#[derive(Default)]
struct Counts {
    /// Groups begun.
    groups: AtomicU64,
    /// Writes taken from the channel (a lingering group's included).
    taken: AtomicU64,
}

impl WriteBatcher {
    /// Starts the writing task, which writes up to `max` writes per
    /// transaction, and up to `concurrency` transactions at once (always
    /// one on SQLite, which has one writer). `max` = 1 starts nothing: each
    /// write is then its own transaction, run by its caller (as
    /// `Store::transition` does).
    ///
    /// `linger` above zero lets a group wait that long for more writes
    /// before it is written, when writes are arriving: when the previous
    /// group began less than four lingers ago. A lone write after a quiet
    /// spell is written at once, and so is a group that gathered while
    /// every writer was busy (under load, grouping needs no wait).
    pub fn start(store: Store, max: usize, concurrency: usize, linger: Duration) -> Self {
        let counts = Arc::new(Counts::default());
        if max <= 1 {
            return Self {
                tx: None,
                store,
                counts,
            };
        }
        let concurrency = match store.db.get_database_backend() {
            sea_orm::DatabaseBackend::Sqlite => 1,
            _ => concurrency.max(1),
        };
        let (tx, rx) = mpsc::channel(max.saturating_mul(4));
        tokio::spawn(run(
            store.clone(),
            rx,
            Limits {
                max,
                concurrency,
                linger,
            },
            counts.clone(),
        ));
        Self {
            tx: Some(tx),
            store,
            counts,
        }
    }

    /// The store it writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many grouped transactions the writing task has begun.
    pub fn groups_written(&self) -> u64 {
        self.counts.groups.load(Ordering::Relaxed)
    }

    /// How many writes the writing task has taken from its channel.
    pub fn writes_taken(&self) -> u64 {
        self.counts.taken.load(Ordering::Relaxed)
    }

    /// [`Store::transition`], written in a group.
    pub async fn transition(&self, t: Transition<'_>) -> Result<Option<Webhook>> {
        self.submit(Write::Transition(t.into())).await?.into_row()
    }

    /// [`WriteBatcher::transition`] for a caller that needs only to know
    /// whether the webhook moved: `true` if it did. The write reads none of
    /// the row back, alone or in a group (a delivery's outcome, the last
    /// write of each webhook, needs nothing of it).
    pub async fn moved(&self, t: Transition<'_>) -> Result<bool> {
        let mut t = Box::new(OwnedTransition::from(t));
        t.wants_row = false;
        Ok(self.submit(Write::Transition(t)).await?.moved())
    }

    /// [`Store::create_webhook`]. On SQLite, a webhook without an
    /// idempotency key is inserted in a group: its `BEGIN`, two `INSERT`s
    /// and `COMMIT` otherwise take their turns on SQLite's one connection
    /// four times per Create. Elsewhere (PostgreSQL inserts a webhook and
    /// its event in one statement already), and with a key (which needs
    /// its lookups), it is written at once.
    pub async fn create(
        &self,
        row: Webhook,
        event: &'static str,
        keys_expired_at: DateTime<Utc>,
    ) -> Result<super::Created> {
        let grouped = self.tx.is_some()
            && row.idempotency_key.is_none()
            && self.store.db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite;
        if !grouped {
            return self.store.create_webhook(row, event, keys_expired_at).await;
        }
        let written = self
            .submit(Write::Insert {
                row: Box::new(row),
                event,
            })
            .await?;
        written
            .into_row()?
            .map(super::Created::New)
            .ok_or_else(|| StoreError::Corrupt("a grouped insert answered no row".into()))
    }

    /// [`Store::touch`], written in a group.
    pub async fn touch(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        status: Status,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.submit(Write::Touch {
            tenant: tenant.clone(),
            id: id.clone(),
            status,
            now,
        })
        .await
        .map(|_| ())
    }

    async fn submit(&self, write: Write) -> Result<Done> {
        let Some(tx) = &self.tx else {
            return self.store.write_one(&write).await;
        };
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(p)) = tx.send(Pending { write, reply }).await {
            // The writing task is gone (the runtime is stopping): write here.
            return self.store.write_one(&p.write).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(DbErr::Custom(
                "the write batcher stopped before answering; the write may not be stored".into(),
            )
            .into())
        })
    }
}

/// The writing task's bounds (see [`WriteBatcher::start`]).
struct Limits {
    max: usize,
    concurrency: usize,
    linger: Duration,
}

async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    Limits {
        max,
        concurrency,
        linger,
    }: Limits,
    counts: Arc<Counts>,
) {
    // The writers, each with the connection it keeps (PostgreSQL); an
    // idle one waits here.
    let (idle, mut writers) = mpsc::channel::<Held>(concurrency);
    // Only while the pool has more than twice as many connections as
    // writers: a writer whose group takes the general path (a transaction)
    // holds a second one meanwhile, and reads must still find one.
    let keep = store.db.get_database_backend() == sea_orm::DatabaseBackend::Postgres
        && store
            .db
            .pool()
            .get_postgres_connection_pool()
            .options()
            .get_max_connections() as usize
            > 2 * concurrency;
    for _ in 0..concurrency {
        let _ = idle.try_send(Held::default());
    }
    let mut batch = Vec::with_capacity(max);
    let mut last_began: Option<Instant> = None;
    loop {
        // A free writer first: while every writer is busy, the next group
        // gathers in the channel.
        let mut writer = writers.recv().await.expect("`idle` is held here");
        // Writes already waiting gathered while every writer was busy: that
        // group is written at once, without a linger.
        let gathered = !rx.is_empty();
        // Takes what is waiting, at least one.
        let n = rx.recv_many(&mut batch, max).await;
        if n == 0 {
            break;
        }
        counts.taken.fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        if !linger.is_zero() && !gathered && last_began.is_some_and(|t| now - t < linger * 4) {
            // Writes are arriving: wait a moment for more (a closed channel
            // ends the wait; the loop ends at the next turn).
            let until = now + linger;
            while batch.len() < max {
                let room = max - batch.len();
                match tokio::time::timeout_at(until, rx.recv_many(&mut batch, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        counts.taken.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        }
        last_began = Some(Instant::now());
        counts.groups.fetch_add(1, Ordering::Relaxed);
        let group = std::mem::take(&mut batch);
        if concurrency == 1 {
            flush(&store, group, keep.then_some(&mut writer)).await;
            let _ = idle.try_send(writer);
        } else {
            // Groups written at once lock their rows in webhook id order
            // (see `write_group`), so they never wait for each other in a
            // cycle; two jobs' writes to one webhook are compare-and-sets,
            // so whichever commits first wins, as without grouping.
            let store = store.clone();
            let mut loan = Loan {
                held: writer,
                idle: idle.clone(),
            };
            // A group's future is tens of kilobytes: made and boxed inside
            // the task, it is not copied into the task on spawn (three
            // copies, 7-11 % of the PostgreSQL processes' instructions;
            // BENCHMARKS.md, session 28).
            tokio::spawn(async move {
                Box::pin(flush(&store, group, keep.then_some(&mut loan.held))).await;
            });
        }
    }
}

/// A writer lent to a group's task: back with the idle ones when the task
/// ends, without its connection if the task panicked (the group may have
/// left it mid-statement).
struct Loan {
    held: Held,
    idle: mpsc::Sender<Held>,
}

impl Drop for Loan {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        let held = if std::thread::panicking() {
            Held::default()
        } else {
            held
        };
        // There is room: the channel holds as many as there are writers.
        let _ = self.idle.try_send(held);
    }
}

/// Writes `batch` as one group and answers each write; `writer`: the
/// writer's kept connection, if it keeps one.
async fn flush(store: &Store, batch: Vec<Pending>, writer: Option<&mut Held>) {
    METRICS.write_group(batch.len());
    let (writes, replies): (Vec<Write>, Vec<_>) =
        batch.into_iter().map(|p| (p.write, p.reply)).unzip();
    let err = match store.write_group_on(&writes, writer).await {
        Ok(applied) => {
            store.publish_all(applied.events);
            for (reply, row) in replies.into_iter().zip(applied.rows) {
                // A caller that went away (its task was cancelled) is fine:
                // its job runs again and finds the status moved.
                let _ = reply.send(Ok(row));
            }
            return;
        }
        Err(e) => e,
    };
    if writes.len() == 1 || unreachable(&err) {
        for reply in replies {
            let _ = reply.send(Err(same_error(&err)));
        }
        return;
    }
    METRICS.write_group_split();
    warn!(error = %err, writes = writes.len(), "a grouped write failed; writing each on its own");
    let mut down: Option<StoreError> = None;
    for (write, reply) in writes.iter().zip(replies) {
        let res = match &down {
            Some(e) => Err(same_error(e)),
            None => store.write_one(write).await,
        };
        if let Err(e) = &res
            && unreachable(e)
        {
            down = Some(same_error(e));
        }
        let _ = reply.send(res);
    }
}

#[cfg(test)]
mod tests {
    //! The batcher against a real database: a SQLite file always, and a
    //! fresh PostgreSQL database when `UPLOADHOOK_TEST_DATABASE_URL` is set
    //! (required when `UPLOADHOOK_REQUIRE_SERVICES=1`).

    use std::sync::Mutex;

    use sea_orm::{Database, DatabaseConnection, PaginatorTrait, QueryOrder, TransactionTrait};
    use tokio::sync::broadcast;

    use super::*;
    use crate::{
        domain::event_type,
        events::{EventBus, LocalEventBus},
        secrets::Keyring,
        store::webhooks::StoredSecret,
    };

    /// A database for one test; a PostgreSQL one is dropped at the end.
    struct TestDb {
        url: String,
        drop: Option<(String, String)>,
        _dir: Option<tempfile::TempDir>,
    }

    impl TestDb {
        fn sqlite() -> TestDb {
            let dir = tempfile::tempdir().unwrap();
            TestDb {
                url: format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display()),
                drop: None,
                _dir: Some(dir),
            }
        }

        async fn postgres() -> Option<TestDb> {
            let Ok(admin) = std::env::var("UPLOADHOOK_TEST_DATABASE_URL") else {
                assert!(
                    std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref() != Ok("1"),
                    "UPLOADHOOK_REQUIRE_SERVICES=1 but UPLOADHOOK_TEST_DATABASE_URL is not set"
                );
                eprintln!("skipping PostgreSQL: UPLOADHOOK_TEST_DATABASE_URL is not set");
                return None;
            };
            let name = format!("uh_test_{}", uuid::Uuid::new_v4().simple());
            let conn = Database::connect(&admin).await.unwrap();
            conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            conn.close().await.ok();
            let (base, query) = match admin.split_once('?') {
                Some((b, q)) => (b.to_string(), format!("?{q}")),
                None => (admin.clone(), String::new()),
            };
            let base = base
                .rsplit_once('/')
                .map_or(base.clone(), |(b, _)| b.to_string());
            Some(TestDb {
                url: format!("{base}/{name}{query}"),
                drop: Some((
                    admin,
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                )),
                _dir: None,
            })
        }

        async fn store(&self, bus: Arc<dyn EventBus>) -> Store {
            self.store_on(bus, 5).await
        }

        async fn store_on(&self, bus: Arc<dyn EventBus>, connections: u32) -> Store {
            let db = crate::store::connect(&self.url, connections).await.unwrap();
            crate::store::migrate(&db).await.unwrap();
            let keyring = Keyring::parse(&Keyring::generate_entry("t")).unwrap();
            Store::new(db, bus, Arc::new(keyring))
        }

        async fn cleanup(self) {
            if let Some((admin, sql)) = self.drop
                && let Ok(conn) = Database::connect(&admin).await
            {
                let _ = conn.execute_unprepared(&sql).await;
                let _ = conn.close().await;
            }
        }
    }

    /// PostgreSQL's plan for `sql` run as sqlx runs it, a prepared
    /// statement, under `plan_cache_mode = mode`. A generic plan knows
    /// nothing of the parameters' values (`EXPLAIN` of the query with bound
    /// values would plan for those values in either mode).
    async fn prepared_plan(
        store: &Store,
        sql: &str,
        params: &[sea_orm::Value],
        mode: &str,
    ) -> String {
        use sea_orm::sea_query::{PostgresQueryBuilder, QueryBuilder};
        let args: Vec<String> = params
            .iter()
            .map(|v| PostgresQueryBuilder.value_to_string(v))
            .collect();
        let txn = store.db.begin().await.unwrap();
        txn.execute_unprepared(&format!(
            "SET LOCAL plan_cache_mode = {mode}; PREPARE planned AS {sql}"
        ))
        .await
        .unwrap();
        let plan: Vec<String> = txn
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                format!("EXPLAIN EXECUTE planned({})", args.join(", ")),
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).unwrap())
            .collect();
        // Prepared statements outlive a transaction.
        txn.execute_unprepared("DEALLOCATE planned").await.unwrap();
        txn.rollback().await.unwrap();
        plan.join("\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storage_events_lookup_runs_on_the_partial_index() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        // 5,000 webhooks confirmed by hand, half of them still PENDING,
        // over ten objects; 200 AUTO ones of other objects, 100 of them
        // PENDING: only those 100 are in the index.
        store
            .db
            .execute_unprepared(&format!(
                "INSERT INTO webhooks (id, tenant_id, status, \"trigger\", provider, storage, \
                 bucket, object_key, filename, content_type, url, secret, metadata, created_at, \
                 updated_at, expires_at) \
                 SELECT 'wh_' || lpad(to_hex(g), 32, '0'), '{t}', \
                 CASE WHEN g % 2 = 0 THEN 'pending' ELSE 'completed' END, \
                 CASE WHEN g > 5000 THEN 'auto' ELSE 'manual' END, 's3', '', 'b', \
                 CASE WHEN g > 5000 THEN 'a/' || g ELSE 'k/' || (g % 10) END, 'f', 'text/plain', \
                 'http://127.0.0.1:9/', 'x', '{{}}', now(), now(), now() + interval '1 hour' \
                 FROM generate_series(1, 5200) AS g; \
                 ANALYZE webhooks"
            ))
            .await
            .unwrap();
        let size: i64 = store
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT pg_relation_size('idx_webhooks_object_key') AS n",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
        // Full, it would take about 20 pages.
        assert!(size <= 8192 * 4, "the index holds other rows: {size} bytes");
        let stmt = super::super::detect::pending_auto_query("", "b", "k/3", 100)
            .build(sea_orm::DatabaseBackend::Postgres);
        let params = stmt.values.map(|v| v.0).unwrap_or_default();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            let plan = prepared_plan(&store, &stmt.sql, &params, mode).await;
            assert!(
                plan.contains("idx_webhooks_object_key") && !plan.contains("Seq Scan"),
                "{mode}:\n{plan}"
            );
        }
        db.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storage_events_lookup_runs_on_the_partial_index_on_sqlite() {
        let db = TestDb::sqlite();
        let store = db.store(bus()).await;
        let stmt = super::super::detect::pending_auto_query("", "b", "k/3", 100)
            .build(sea_orm::DatabaseBackend::Sqlite);
        // The plan as the service's connection makes it (SQLite prepares
        // again with the bound values when one decides whether a partial
        // index applies, so the inline constants matter to PostgreSQL
        // only); a predicate the query does not prove, or a lost index,
        // would show here as another index or a scan.
        let plan: Vec<String> = store
            .db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Sqlite,
                format!("EXPLAIN QUERY PLAN {}", stmt.sql),
                stmt.values.map(|v| v.0).unwrap_or_default(),
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String>("", "detail").unwrap())
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("USING INDEX idx_webhooks_object_key"),
            "{plan}"
        );
        db.cleanup().await;
    }

    /// PostgreSQL guesses 100 rows for a `jsonb_to_recordset`: without the
    /// ids as an array, a group of two was joined by scanning the whole
    /// table (below some tens of thousands of rows), on every write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_group_finds_its_rows_through_the_primary_key() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let mut ids = [
            webhook(&store, &t, Status::Verified).await,
            webhook(&store, &t, Status::Verified).await,
        ];
        ids.sort();
        // Enough other rows that a scan is not the cheapest plan anyway.
        store
            .db
            .execute_unprepared(&format!(
                "INSERT INTO webhooks (id, tenant_id, status, \"trigger\", provider, storage, \
                 bucket, object_key, filename, content_type, url, secret, metadata, created_at, \
                 updated_at, expires_at) \
                 SELECT 'wh_' || lpad(to_hex(g), 32, '0'), '{t}', 'delivering', 'CONFIRM', 's3', \
                 '', 'b', 'k/' || g, 'f', 'text/plain', 'http://127.0.0.1:9/', 'x', '{{}}', now(), \
                 now(), now() + interval '1 hour' FROM generate_series(1, 5000) AS g; \
                 ANALYZE webhooks"
            ))
            .await
            .unwrap();
        let writes: Vec<Write> = ids.iter().map(|id| claim(&t, id)).collect();
        let ts: Vec<(usize, &OwnedTransition)> = writes
            .iter()
            .enumerate()
            .map(|(i, w)| match w {
                Write::Transition(t) => (i, &**t),
                _ => unreachable!("claims are transitions"),
            })
            .collect();
        for whole in [false, true] {
            let mut out = vec![None; ts.len()];
            let (sql, params) = multirow::update(&ts, whole, &mut out).unwrap();
            // Custom plans (the parameters' values known) and the generic
            // plan a prepared statement settles on after five runs.
            for mode in ["force_custom_plan", "force_generic_plan"] {
                let plan = prepared_plan(&store, &sql, &params, mode).await;
                assert!(
                    plan.contains("webhooks_pkey") && !plan.contains("Seq Scan on webhooks"),
                    "{mode}, whole = {whole}:\n{plan}"
                );
            }
        }
        db.cleanup().await;
    }

    /// The backend of the connection whose last statement was a group's
    /// (a writer's kept one), if any. (This query's own text holds the
    /// pattern, hence the second condition.)
    async fn writer_backend(store: &Store) -> Option<i32> {
        store
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE 'WITH u AS (UPDATE%' AND query NOT LIKE '%pg_stat_activity%'",
            ))
            .await
            .unwrap()
            .map(|r| r.try_get::<i32>("", "pid").unwrap())
    }

    /// On PostgreSQL a writer keeps its connection from one group to the
    /// next instead of giving it back to the pool after each (which pings
    /// it, a round trip more); one that broke while the writer was idle
    /// is replaced, and the write still goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_keeps_its_connection_and_replaces_a_broken_one() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let store = db.store_on(bus(), 4).await;
        let t = tenant(&store, "a").await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(webhook(&store, &t, Status::Verifying).await);
        }
        let batcher = WriteBatcher::start(store.clone(), 128, 1, Duration::ZERO);
        let moved = spawn_verified(&batcher, &t, &ids[0])
            .await
            .unwrap()
            .unwrap();
        assert!(moved.is_some());
        let first = writer_backend(&store).await.expect("the group's backend");
        // Every connection the pool has (4) runs a statement at once: had
        // the writer's gone back to the pool, its last statement would no
        // longer be the group's.
        let busy: Vec<_> = (0..4)
            .map(|_| {
                let db = store.db.clone();
                tokio::spawn(async move {
                    db.execute_unprepared("SELECT pg_sleep(0.05)")
                        .await
                        .unwrap();
                })
            })
            .collect();
        for b in busy {
            b.await.unwrap();
        }
        assert_eq!(
            writer_backend(&store).await,
            Some(first),
            "kept out of the pool"
        );
        let moved = spawn_verified(&batcher, &t, &ids[1])
            .await
            .unwrap()
            .unwrap();
        assert!(moved.is_some());
        assert_eq!(
            writer_backend(&store).await,
            Some(first),
            "the same connection"
        );
        // The server ends that connection while the writer is idle.
        store
            .db
            .execute_unprepared(&format!("SELECT pg_terminate_backend({first})"))
            .await
            .unwrap();
        // Gone from the server's list once it has exited.
        for _ in 0..500 {
            if writer_backend(&store).await != Some(first) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_ne!(writer_backend(&store).await, Some(first));
        let moved = spawn_verified(&batcher, &t, &ids[2])
            .await
            .unwrap()
            .unwrap();
        assert!(moved.is_some(), "written on another connection");
        let second = writer_backend(&store).await.expect("the new backend");
        assert_ne!(second, first);
        // Written once: one event.
        let events: i64 = store
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM events WHERE webhook_id = $1 AND \"type\" = $2",
                [ids[2].as_str().into(), event_type::VERIFIED.into()],
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
        assert_eq!(events, 1);
        db.cleanup().await;
    }

    /// A writer keeps no connection from a small pool (no more than
    /// twice as many connections as writers): from a pool of one, reads
    /// would find none at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_keeps_no_connection_from_a_small_pool() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let store = db.store_on(bus(), 1).await;
        let t = tenant(&store, "a").await;
        let id = webhook(&store, &t, Status::Verifying).await;
        let batcher = WriteBatcher::start(store.clone(), 128, 1, Duration::ZERO);
        let moved = spawn_verified(&batcher, &t, &id).await.unwrap().unwrap();
        assert!(moved.is_some());
        // A kept connection would leave the read waiting for sqlx's
        // acquire timeout (30 s).
        let read = tokio::time::timeout(Duration::from_secs(10), store.find_webhook(&t, &id))
            .await
            .expect("a read finds the connection")
            .unwrap()
            .unwrap();
        assert_eq!(read.status, Status::Verified.as_str());
        db.cleanup().await;
    }

    /// The store's PostgreSQL connections send without delay
    /// (`TCP_NODELAY`, which sqlx sets from 0.9.1 on). Without it a
    /// statement of more than one TLS record, such as a large write
    /// group's, waited 40 ms for the server's delayed ACK (docs/benchmarks-history.md,
    /// session 23).
    #[tokio::test]
    async fn postgres_connections_send_without_delay() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        // One connection, and its own ports as the server sees them.
        let store = db.store_on(bus(), 1).await;
        let row = store
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT inet_client_port() AS ours, inet_server_port() AS server",
            ))
            .await
            .unwrap()
            .unwrap();
        let ours: Option<i32> = row.try_get("", "ours").unwrap();
        let server: Option<i32> = row.try_get("", "server").unwrap();
        match ours.zip(server) {
            Some((ours, server)) => assert_eq!(
                crate::test_sockets::nodelay_between(ours as u16, server as u16),
                Some(true)
            ),
            None => eprintln!("skipping: the test database is reached over a Unix socket"),
        }
        db.cleanup().await;
    }

    /// A store on a fresh SQLite file with one connection (so that the
    /// statements and the transaction seen on it are all the store's), and
    /// a tenant.
    async fn one_sqlite_connection() -> (TestDb, Store, TenantId) {
        let db = TestDb::sqlite();
        let store = db.store_on(bus(), 1).await;
        assert!(matches!(store.db, crate::store::Db::Kept(_)));
        let t = tenant(&store, "a").await;
        (db, store, t)
    }

    /// Whether the store's one SQLite connection is inside a transaction
    /// (SQLite's autocommit is off).
    /// The webhook's status and number of attempts as the store's writer
    /// sees them, once its earlier uses (a rollback included) are done:
    /// the store's reads go to its reader, which never sees uncommitted
    /// rows.
    async fn on_writer(store: &Store, id: &WebhookId) -> (String, i64) {
        let id = id.as_str().to_owned();
        store
            .db
            .on_sqlite(|conn| {
                Box::pin(async move {
                    let status: String =
                        sea_orm::sqlx::query_scalar("SELECT status FROM webhooks WHERE id = ?")
                            .bind(&id)
                            .fetch_one(&mut *conn)
                            .await
                            .unwrap();
                    let attempts: i64 = sea_orm::sqlx::query_scalar(
                        "SELECT count(*) FROM attempts WHERE webhook_id = ?",
                    )
                    .bind(&id)
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                    (status, attempts)
                })
            })
            .await
            .unwrap()
            .unwrap()
    }

    async fn in_transaction(store: &Store) -> bool {
        store
            .db
            .on_sqlite(|conn| {
                Box::pin(async move {
                    let mut handle = conn.lock_handle().await.unwrap();
                    // SAFETY: the handle is locked for us; this only reads
                    // a flag.
                    unsafe {
                        libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) == 0
                    }
                })
            })
            .await
            .unwrap()
            .unwrap()
    }

    /// The prepared statements of the store's SQLite connection.
    async fn statements(store: &Store) -> Vec<crate::store::test_statements::Prepared> {
        store
            .db
            .on_sqlite(|conn| Box::pin(crate::store::test_statements::statements(conn)))
            .await
            .unwrap()
            .unwrap()
    }

    /// The number `sql` counts, on the store's SQLite writer.
    async fn count(store: &Store, sql: &'static str) -> i64 {
        store
            .db
            .on_sqlite(move |conn| {
                Box::pin(async move {
                    sea_orm::sqlx::query_scalar(sql)
                        .fetch_one(&mut *conn)
                        .await
                        .unwrap()
                })
            })
            .await
            .unwrap()
            .unwrap()
    }

    /// Each of `ids` has one attempt and ended COMPLETED.
    async fn delivered_once(store: &Store, t: &TenantId, ids: &[WebhookId]) {
        for id in ids {
            assert_eq!(store.attempts(t, id).await.unwrap().len(), 1);
            assert_eq!(
                stored_events(store, t, id).await.last().unwrap().1,
                Status::Completed
            );
        }
    }

    /// [`delivered`], for a caller that wants no row back.
    fn bare(tenant: &TenantId, id: &WebhookId) -> Write {
        let mut w = delivered(tenant, id);
        if let Write::Transition(t) = &mut w {
            t.wants_row = false;
        }
        w
    }

    /// On SQLite a lone write that wants no row back returns its id alone.
    #[tokio::test]
    async fn a_lone_write_on_sqlite_that_wants_no_row_returns_its_id_alone() {
        let (db, store, t) = one_sqlite_connection().await;
        let id = webhook(&store, &t, Status::Delivering).await;
        let applied = store.write_group(&[bare(&t, &id)]).await.unwrap();
        assert_eq!(applied.rows, [Done::Moved]);
        let stmts = statements(&store).await;
        let updates: Vec<&str> = stmts
            .iter()
            .map(|s| s.sql.as_str())
            .filter(|sql| sql.starts_with("UPDATE"))
            .collect();
        assert!(
            matches!(updates.as_slice(), [u] if u.ends_with("RETURNING \"id\"")),
            "{updates:?}"
        );
        db.cleanup().await;
    }

    /// On SQLite a group's writes that want no row back have an `UPDATE`
    /// of their own, returning their ids; those that want theirs, one
    /// returning whole rows.
    #[tokio::test]
    async fn a_group_on_sqlite_reads_back_only_the_rows_wanted() {
        let (db, store, t) = one_sqlite_connection().await;
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(webhook(&store, &t, Status::Delivering).await);
        }
        let writes = [
            bare(&t, &ids[0]),
            delivered(&t, &ids[1]),
            bare(&t, &ids[2]),
            delivered(&t, &ids[3]),
        ];
        let applied = store.write_group(&writes).await.unwrap();
        assert_eq!(applied.rows[0], Done::Moved);
        assert!(applied.rows[1].row().is_some());
        let stmts = statements(&store).await;
        let updates: Vec<&str> = stmts
            .iter()
            .map(|s| s.sql.as_str())
            .filter(|sql| sql.starts_with("UPDATE"))
            .collect();
        let returning = |end: &str| updates.iter().filter(|u| u.ends_with(end)).count();
        assert_eq!(
            (returning("RETURNING *"), returning("RETURNING \"id\"")),
            (1, 1),
            "{updates:?}"
        );
        db.cleanup().await;
    }

    fn delivered(tenant: &TenantId, id: &WebhookId) -> Write {
        let now = Utc::now();
        Write::Transition(
            Transition::new(
                tenant,
                id,
                &[Status::Delivering],
                Status::Completed,
                event_type::DELIVERED,
                now,
            )
            .attempt(NewAttempt {
                number: 1,
                started_at: now,
                duration_ms: 3,
                response_status: Some(200),
                response_body: None,
                error: None,
            })
            .into(),
        )
    }

    /// On SQLite a group's `BEGIN` and `COMMIT` travel in its commands (see
    /// `sqlite`): they are prepared statements there, run once per group,
    /// where sqlx's own transactions run them unprepared.
    #[tokio::test]
    async fn a_group_on_sqlite_carries_its_transaction_in_its_commands() {
        let (db, store, t) = one_sqlite_connection().await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(webhook(&store, &t, Status::Delivering).await);
        }
        let creates: Vec<Write> = (0..2)
            .map(|_| Write::Insert {
                row: Box::new(new_row(&t, Status::Pending)),
                event: event_type::CREATED,
            })
            .collect();
        let groups = [
            creates,
            vec![delivered(&t, &ids[0])],
            vec![delivered(&t, &ids[1]), delivered(&t, &ids[2])],
        ];
        for writes in &groups {
            let applied = store.write_group(writes).await.unwrap();
            assert!(applied.rows.iter().all(Done::moved));
            assert_eq!(applied.events.len(), writes.len());
        }
        let stmts = statements(&store).await;
        let runs =
            |sql: &str| -> i32 { stmts.iter().filter(|s| s.sql == sql).map(|s| s.runs).sum() };
        assert_eq!((runs("BEGIN"), runs("COMMIT")), (3, 3), "{stmts:#?}");
        assert!(!in_transaction(&store).await);
        delivered_once(&store, &t, &ids).await;
        db.cleanup().await;
    }

    /// On SQLite a group's multi-row `INSERT`s are padded (see
    /// `sqlite::padded`): groups of 5, 6 and 7 writes share one prepared
    /// text for each insert, never compiled again, and store exactly their
    /// own rows.
    #[tokio::test]
    async fn groups_of_sizes_in_one_bucket_share_their_prepared_inserts() {
        let (db, store, t) = one_sqlite_connection().await;
        let mut created = 0;
        for n in [3, 4] {
            let creates: Vec<Write> = (0..n)
                .map(|_| Write::Insert {
                    row: Box::new(new_row(&t, Status::Delivering)),
                    event: event_type::CREATED,
                })
                .collect();
            let applied = store.write_group(&creates).await.unwrap();
            assert_eq!(applied.events.len(), n);
            created += n;
        }
        let mut ids = Vec::new();
        for n in [5, 6, 7] {
            let mut group = Vec::new();
            for _ in 0..n {
                group.push(webhook(&store, &t, Status::Delivering).await);
            }
            let writes: Vec<Write> = group.iter().map(|id| delivered(&t, id)).collect();
            let applied = store.write_group(&writes).await.unwrap();
            assert!(applied.rows.iter().all(Done::moved));
            assert_eq!(applied.events.len(), n);
            ids.extend(group);
        }
        let stmts = statements(&store).await;
        let inserts = |table: &str| -> Vec<(i32, i32)> {
            stmts
                .iter()
                .filter(|s| s.sql.starts_with(&format!("INSERT INTO \"{table}\" (")))
                // Of several rows: not a lone write's, nor `create_webhook`'s.
                .filter(|s| s.sql.contains("), ("))
                .map(|s| (s.runs, s.recompiled))
                .collect()
        };
        // One text each, run by every group that has those rows, and never
        // compiled again.
        assert_eq!(inserts("webhooks"), [(2, 0)], "{stmts:#?}");
        assert_eq!(inserts("attempts"), [(3, 0)], "{stmts:#?}");
        let events = inserts("events");
        assert_eq!(events.len(), 2, "creates, then transitions: {stmts:#?}");
        assert!(events.iter().all(|&(_, again)| again == 0), "{stmts:#?}");
        // Exactly the rows given, no padding among them.
        assert_eq!(
            count(&store, "SELECT count(*) FROM webhooks").await,
            (created + ids.len()) as i64
        );
        assert_eq!(
            count(&store, "SELECT count(*) FROM attempts").await,
            ids.len() as i64
        );
        delivered_once(&store, &t, &ids).await;
        db.cleanup().await;
    }

    /// A large group on SQLite (300 Creates, padded to 512 rows of 41
    /// parameters each, and their 300 events) stores exactly its rows and
    /// one event for each, numbered in order.
    #[tokio::test]
    async fn a_large_group_on_sqlite_stores_exactly_its_rows() {
        let (db, store, t) = one_sqlite_connection().await;
        let creates: Vec<Write> = (0..300)
            .map(|_| Write::Insert {
                row: Box::new(new_row(&t, Status::Pending)),
                event: event_type::CREATED,
            })
            .collect();
        let applied = store.write_group(&creates).await.unwrap();
        assert_eq!(applied.events.len(), 300);
        assert!(applied.events.windows(2).all(|p| p[0].id < p[1].id));
        let mut given: Vec<&str> = creates.iter().map(Write::webhook).collect();
        let mut got: Vec<&str> = applied
            .events
            .iter()
            .map(|e| e.webhook_id.as_str())
            .collect();
        given.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, given);
        assert_eq!(count(&store, "SELECT count(*) FROM webhooks").await, 300);
        db.cleanup().await;
    }

    /// On SQLite a lone transition is one command, its inserts made only
    /// when its compare-and-set moved the row (see `sqlite::lone`): what it
    /// stores and answers is what the general path would.
    #[tokio::test]
    async fn a_lone_transition_on_sqlite_is_one_command() {
        let (db, store, t) = one_sqlite_connection().await;
        let verifying = webhook(&store, &t, Status::Verifying).await;
        let delivering = webhook(&store, &t, Status::Delivering).await;
        let now = Utc::now();
        // Through VERIFIED to DELIVERING: two events.
        let claim = Write::Transition(
            Transition::new(
                &t,
                &verifying,
                &[Status::Verifying],
                Status::Delivering,
                event_type::DELIVERING,
                now,
            )
            .through(Status::Verified, event_type::VERIFIED)
            .into(),
        );
        // Dead-lettered with its attempt.
        let dead = Write::Transition(
            Transition::new(
                &t,
                &delivering,
                &[Status::Delivering],
                Status::DeadLetter,
                event_type::DEAD_LETTERED,
                now,
            )
            .attempt(NewAttempt {
                number: 1,
                started_at: now,
                duration_ms: 4,
                response_status: Some(500),
                response_body: Some("no".into()),
                error: Some("receiver answered 500".into()),
            })
            .dead_letter_opt(Some("gave up".into()))
            .into(),
        );
        let applied = store.write_group(&[claim]).await.unwrap();
        assert_eq!(
            applied.rows[0].row().map(|w| w.status.as_str()),
            Some(Status::Delivering.as_str())
        );
        let kinds: Vec<(&str, Status)> = applied
            .events
            .iter()
            .map(|e| (e.kind.as_str(), e.status))
            .collect();
        assert_eq!(
            kinds,
            [
                (event_type::VERIFIED, Status::Verified),
                (event_type::DELIVERING, Status::Delivering)
            ]
        );
        let key = |e: &Event| (e.id, e.kind.clone(), e.status, e.occurred_at);
        let stored: Vec<_> = store
            .events_after(&t, Some(&verifying), 0, 10)
            .await
            .unwrap()
            .iter()
            .skip(1) // created
            .map(key)
            .collect();
        let answered: Vec<_> = applied.events.iter().map(key).collect();
        assert_eq!(stored, answered);
        let applied = store.write_group(&[dead]).await.unwrap();
        assert_eq!(
            applied.rows[0].row().map(|w| w.status.as_str()),
            Some(Status::DeadLetter.as_str())
        );
        assert_eq!(applied.events.len(), 1);
        let attempts = store.attempts(&t, &delivering).await.unwrap();
        assert_eq!(
            attempts
                .iter()
                .map(|a| (a.number, a.response_status, a.error.as_deref()))
                .collect::<Vec<_>>(),
            [(1, Some(500), Some("receiver answered 500"))]
        );
        let letters = store.dead_letters(&t, &delivering).await.unwrap();
        assert_eq!(
            letters
                .iter()
                .map(|l| l.reason.as_str())
                .collect::<Vec<_>>(),
            ["gave up"]
        );
        // No longer DELIVERING: nothing moves, nothing is stored.
        let again = delivered(&t, &delivering);
        let applied = store.write_group(&[again]).await.unwrap();
        assert!(applied.rows[0] == Done::Stayed && applied.events.is_empty());
        assert_eq!(store.attempts(&t, &delivering).await.unwrap().len(), 1);
        assert_eq!(store.dead_letters(&t, &delivering).await.unwrap().len(), 1);
        assert_eq!(stored_events(&store, &t, &delivering).await.len(), 2);

        let stmts = statements(&store).await;
        let runs = |f: &dyn Fn(&str) -> bool| -> i32 {
            stmts.iter().filter(|s| f(&s.sql)).map(|s| s.runs).sum()
        };
        assert_eq!(runs(&|sql| sql == "BEGIN"), 3, "{stmts:#?}");
        assert_eq!(
            runs(&|sql| sql.starts_with("INSERT INTO \"events\"") && sql.contains("changes()")),
            3,
            "{stmts:#?}"
        );
        assert!(!in_transaction(&store).await);
        db.cleanup().await;
    }

    /// A SQLite group whose command fails (either of a group's two, or a
    /// lone write's one) leaves nothing stored and no transaction open on
    /// the connection.
    #[tokio::test]
    async fn a_failed_group_on_sqlite_is_rolled_back() {
        let (db, store, t) = one_sqlite_connection().await;
        let verifying = webhook(&store, &t, Status::Verifying).await;
        let mut delivering = vec![
            webhook(&store, &t, Status::Delivering).await,
            webhook(&store, &t, Status::Delivering).await,
        ];
        delivering.sort();
        let new = new_row(&t, Status::Pending);
        let new_id = WebhookId::from_trusted(new.id.clone());
        // The first command's `UPDATE` fails after its `INSERT` ran.
        let first = || {
            vec![
                Write::Insert {
                    row: Box::new(new.clone()),
                    event: event_type::CREATED,
                },
                verified(&t, &verifying, 5),
            ]
        };
        // The second command's attempts fail after the first command moved
        // both webhooks.
        let second = || vec![delivered(&t, &delivering[0]), delivered(&t, &delivering[1])];
        // A lone write's one command fails after its `UPDATE` and events.
        let lone = || vec![delivered(&t, &delivering[0])];
        for (trigger, writes) in [
            ("BEFORE UPDATE ON webhooks", first()),
            ("BEFORE INSERT ON attempts", second()),
            ("BEFORE INSERT ON attempts", lone()),
        ] {
            store
                .db
                .execute_unprepared(&format!(
                    "CREATE TRIGGER refuse {trigger} BEGIN SELECT RAISE(ABORT, 'refused'); END"
                ))
                .await
                .unwrap();
            let err = store.write_group(&writes).await.err().unwrap();
            assert!(err.to_string().contains("refused"), "{err}");
            assert!(!in_transaction(&store).await, "{trigger}");
            store
                .db
                .execute_unprepared("DROP TRIGGER refuse")
                .await
                .unwrap();
        }
        assert!(store.find_webhook(&t, &new_id).await.unwrap().is_none());
        let status = |id| {
            let store = &store;
            let t = &t;
            async move { store.find_webhook(t, id).await.unwrap().unwrap().status }
        };
        assert_eq!(status(&verifying).await, Status::Verifying.as_str());
        for id in &delivering {
            assert_eq!(status(id).await, Status::Delivering.as_str());
            assert!(store.attempts(&t, id).await.unwrap().is_empty());
            assert_eq!(stored_events(&store, &t, id).await.len(), 1);
        }
        // The connection works on: the same groups, now allowed.
        for writes in [first(), second()] {
            let applied = store.write_group(&writes).await.unwrap();
            assert!(applied.rows.iter().all(Done::moved));
        }
        assert_eq!(status(&new_id).await, Status::Pending.as_str());
        assert_eq!(status(&verifying).await, Status::Verified.as_str());
        for id in &delivering {
            assert_eq!(status(id).await, Status::Completed.as_str());
        }
        // All five groups took this path (its `BEGIN` is a prepared
        // statement; sqlx's own is not).
        let stmts = statements(&store).await;
        let begun: i32 = stmts
            .iter()
            .filter(|s| s.sql == "BEGIN")
            .map(|s| s.runs)
            .sum();
        assert_eq!(begun, 5, "{stmts:#?}");
        db.cleanup().await;
    }

    /// A SQLite group whose task is aborted during its last command (a
    /// lone write's only one, a larger group's second) leaves nothing
    /// stored and no transaction open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_on_sqlite_aborted_during_its_last_command_is_rolled_back() {
        let (db, store, t) = one_sqlite_connection().await;
        // Each attempt takes a second or so: a trigger counts a cross join
        // of 400 rows three times over.
        for sql in [
            "CREATE TABLE slow (n INTEGER)",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400) \
             INSERT INTO slow SELECT x FROM c",
            "CREATE TRIGGER slow BEFORE INSERT ON attempts \
             BEGIN SELECT count(*) FROM slow a, slow b, slow c; END",
        ] {
            store.db.execute_unprepared(sql).await.unwrap();
        }
        for size in [1, 2] {
            let mut ids = Vec::new();
            for _ in 0..size {
                ids.push(webhook(&store, &t, Status::Delivering).await);
            }
            ids.sort();
            let writer = {
                let store = store.clone();
                let writes: Vec<Write> = ids.iter().map(|id| delivered(&t, id)).collect();
                tokio::spawn(async move { store.write_group(&writes).await.map(|_| ()) })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            writer.abort();
            let ended = writer.await;
            assert!(
                ended.as_ref().is_err_and(|e| e.is_cancelled()),
                "the group of {size} ended before it was aborted: {ended:?}"
            );
            // The store's one writer: back once rolled back.
            for id in &ids {
                assert_eq!(
                    on_writer(&store, id).await,
                    (Status::Delivering.as_str().to_owned(), 0)
                );
            }
            assert!(!in_transaction(&store).await, "a group of {size}");
        }
        db.cleanup().await;
    }

    /// A SQLite group dropped between its commands (its task cancelled) is
    /// rolled back before its connection is used again.
    #[tokio::test]
    async fn a_group_on_sqlite_dropped_between_its_commands_is_rolled_back() {
        let (db, store, t) = one_sqlite_connection().await;
        let id = webhook(&store, &t, Status::Verifying).await;
        let lease = store.db.sqlite().await.unwrap().unwrap();
        let mut open = crate::store::kept::Open::new(lease);
        let mut first = super::sqlite::Command::default();
        first.push_sql("BEGIN", []);
        first.push_sql("UPDATE webhooks SET status = 'VERIFIED'", []);
        super::sqlite::run(&mut open, first).await.unwrap();
        drop(open);
        // The store's one writer: back once rolled back.
        assert_eq!(
            on_writer(&store, &id).await,
            (Status::Verifying.as_str().to_owned(), 0)
        );
        assert!(!in_transaction(&store).await);
        db.cleanup().await;
    }

    /// On SQLite, a group's compare-and-sets are one `UPDATE … FROM
    /// jsonb_each(?)`, not one `UPDATE` each: every statement is a round
    /// trip to the connection's thread, which the embedded pipeline waits
    /// for. The times it writes are stored exactly as sqlx writes them
    /// (SQLite compares them as text).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_is_one_update_on_sqlite() {
        let db = TestDb::sqlite();
        // One connection: its statements are all the store's.
        let store = db.store_on(bus(), 1).await;
        let t = tenant(&store, "a").await;
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(webhook(&store, &t, Status::Verifying).await);
        }
        // Sub-second digits that sqlx writes in full.
        let at = DateTime::parse_from_rfc3339("2026-12-06T12:34:56.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let verified = |id: &WebhookId| {
            Write::Transition(
                Transition::new(
                    &t,
                    id,
                    &[Status::Verifying],
                    Status::Verified,
                    event_type::VERIFIED,
                    at,
                )
                .changes(Changes::new().set(webhooks::Column::VerifiedAt, Some(at)))
                .into(),
            )
        };
        // One alone (its own statement), four in a group.
        let alone = store.write_group(&[verified(&ids[0])]).await.unwrap();
        assert!(alone.rows[0].moved());
        let writes: Vec<Write> = ids[1..].iter().map(verified).collect();
        let applied = store.write_group(&writes).await.unwrap();
        assert!(applied.rows.iter().all(Done::moved));
        assert_eq!(applied.events.len(), 4);

        let stmts = statements(&store).await;
        let runs = |f: &dyn Fn(&str) -> bool| -> i32 {
            stmts.iter().filter(|s| f(&s.sql)).map(|s| s.runs).sum()
        };
        assert_eq!(
            runs(&|sql| sql.starts_with("UPDATE") && sql.contains("jsonb_each")),
            1,
            "{stmts:#?}"
        );
        assert_eq!(
            runs(&|sql| sql.starts_with("UPDATE") && !sql.contains("jsonb_each")),
            1,
            "only the lone write has an UPDATE of its own: {stmts:#?}"
        );
        assert!(
            stmts
                .iter()
                .filter(|s| s.sql.contains("jsonb_each"))
                .all(|s| s.recompiled == 0),
            "the group's UPDATE is compiled once: {stmts:#?}"
        );
        // The lone write's times (bound by sqlx) and the group's (from
        // the JSON records), as stored.
        let stored: Vec<(String, String, String)> = store
            .db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Sqlite,
                "SELECT id, updated_at, verified_at FROM webhooks",
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.try_get::<String>("", "id").unwrap(),
                    r.try_get::<String>("", "updated_at").unwrap(),
                    r.try_get::<String>("", "verified_at").unwrap(),
                )
            })
            .collect();
        assert_eq!(stored.len(), 5);
        let (_, by_sqlx, _) = stored
            .iter()
            .find(|(id, ..)| id == ids[0].as_str())
            .unwrap();
        for (_, updated_at, verified_at) in &stored {
            assert_eq!((updated_at, verified_at), (by_sqlx, by_sqlx));
        }
        for id in &ids {
            let w = store.find_webhook(&t, id).await.unwrap().unwrap();
            assert_eq!(w.verified_at, Some(at));
        }
        db.cleanup().await;
    }

    /// Runs a test body on SQLite, then on PostgreSQL when configured.
    macro_rules! on_both {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let db = super::TestDb::sqlite();
                        super::$name(&db).await;
                        db.cleanup().await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let Some(db) = super::TestDb::postgres().await else { return };
                        super::$name(&db).await;
                        db.cleanup().await;
                    }
                )*
            }
        };
    }

    on_both!(
        a_group_gives_each_write_its_own_result,
        shapes_in_one_group_each_keep_their_conditions,
        conflicting_writes_in_one_group_one_wins,
        writes_to_one_webhook_keep_their_order,
        one_failing_write_does_not_fail_the_others,
        what_waits_is_written_as_one_group,
        groups_are_written_at_once_on_postgres,
        writes_arriving_while_a_group_lingers_join_it,
        a_lingering_group_is_written_when_the_batcher_closes,
        a_write_through_a_status_stores_both_events,
        a_transition_alone_stores_its_events_and_attempt,
        a_group_stores_attempts_dead_letters_and_events,
        a_group_with_a_touch_writes_both,
        a_transition_alone_publishes_the_stored_ids,
        events_are_published_after_commit,
        rows_are_read_together_each_of_its_own_tenant,
        inserts_in_a_group_store_rows_and_events,
        inserts_beside_writes_that_want_no_row,
        creates_are_grouped_on_sqlite_only_without_a_key,
        rows_decode_as_sea_orm_decodes_them,
        a_write_that_wants_no_row_stores_all_and_reads_none,
    );

    /// [`WriteBatcher::moved`]'s write (a delivery's outcome) stores what
    /// [`WriteBatcher::transition`]'s does, and is answered without its
    /// row, alone (its `UPDATE` returns the id alone, or on PostgreSQL the
    /// two columns its inserts take) and in a group (SQLite gives such
    /// writes an `UPDATE` of their own returning their ids; PostgreSQL
    /// sends no rows for a group that wants none, and decodes only the
    /// wanted ones), beside writes answered with their rows. Another tenant's webhook, or one no longer in a `from`
    /// status, answers that nothing moved.
    async fn a_write_that_wants_no_row_stores_all_and_reads_none(db: &TestDb) {
        let store = db.store(bus()).await;
        let a = tenant(&store, "a").await;
        let b = tenant(&store, "b").await;
        let alone = webhook(&store, &a, Status::Delivering).await;
        let applied = store.write_group(&[bare(&a, &alone)]).await.unwrap();
        assert_eq!(applied.rows, [Done::Moved]);
        assert_eq!(applied.events.len(), 1);
        let ev = &applied.events[0];
        assert_eq!(
            (&ev.tenant_id, &ev.webhook_id, ev.kind.as_str(), ev.status),
            (&a, &alone, event_type::DELIVERED, Status::Completed)
        );
        let stored = store.events_after(&a, Some(&alone), 0, 10).await.unwrap();
        assert_eq!(stored.last().map(|e| e.id), Some(ev.id));
        let w = store.find_webhook(&a, &alone).await.unwrap().unwrap();
        assert_eq!(w.status, Status::Completed.as_str());
        let attempts = store.attempts(&a, &alone).await.unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].response_status, Some(200));
        // Moved already; another tenant's: nothing moves, nothing stored.
        let others = webhook(&store, &b, Status::Delivering).await;
        for (tenant, id) in [(&a, &alone), (&a, &others)] {
            let applied = store.write_group(&[bare(tenant, id)]).await.unwrap();
            assert_eq!(applied.rows, [Done::Stayed]);
            assert!(applied.events.is_empty());
        }
        assert_eq!(store.attempts(&a, &alone).await.unwrap().len(), 1);
        let w = store.find_webhook(&b, &others).await.unwrap().unwrap();
        assert_eq!(w.status, Status::Delivering.as_str());
        // In groups: with their rows, and without, beside writes that
        // do not match; then a group that wants no row at all.
        for mixed in [true, false] {
            let mut ids = Vec::new();
            for _ in 0..4 {
                ids.push(webhook(&store, &a, Status::Delivering).await);
            }
            let theirs = webhook(&store, &b, Status::Delivering).await;
            let write = |k: usize, id: &WebhookId| {
                if mixed && k % 2 == 1 {
                    delivered(&a, id)
                } else {
                    bare(&a, id)
                }
            };
            let mut writes: Vec<Write> =
                ids.iter().enumerate().map(|(k, id)| write(k, id)).collect();
            // Another tenant's webhook, named by tenant `a`.
            writes.push(bare(&a, &theirs));
            let applied = store.write_group(&writes).await.unwrap();
            for (k, (done, id)) in applied.rows.iter().zip(&ids).enumerate() {
                if mixed && k % 2 == 1 {
                    let row = done.row().expect("moved, with its row");
                    assert_eq!(
                        (row.id.as_str(), row.status.as_str()),
                        (id.as_str(), Status::Completed.as_str())
                    );
                } else {
                    assert_eq!(done, &Done::Moved, "write {k}, mixed {mixed}");
                }
            }
            assert_eq!(applied.rows[4], Done::Stayed);
            // Each moved webhook's event, published with its stored id,
            // and its attempt.
            assert_eq!(applied.events.len(), 4);
            for id in &ids {
                let ev = applied.events.iter().find(|e| &e.webhook_id == id).unwrap();
                assert_eq!((&ev.tenant_id, ev.status), (&a, Status::Completed));
                let stored = store.events_after(&a, Some(id), 0, 10).await.unwrap();
                assert_eq!(stored.last().map(|e| e.id), Some(ev.id));
                let w = store.find_webhook(&a, id).await.unwrap().unwrap();
                assert_eq!(w.status, Status::Completed.as_str());
                assert_eq!(store.attempts(&a, id).await.unwrap().len(), 1);
            }
            let w = store.find_webhook(&b, &theirs).await.unwrap().unwrap();
            assert_eq!(w.status, Status::Delivering.as_str());
            assert!(store.attempts(&b, &theirs).await.unwrap().is_empty());
        }
        // Through the batcher: whether it moved.
        let batcher = WriteBatcher::start(store.clone(), 8, 1, Duration::ZERO);
        let z = webhook(&store, &a, Status::Delivering).await;
        let outcome = || {
            Transition::new(
                &a,
                &z,
                &[Status::Delivering],
                Status::Completed,
                event_type::DELIVERED,
                Utc::now(),
            )
        };
        assert!(batcher.moved(outcome()).await.unwrap());
        assert!(!batcher.moved(outcome()).await.unwrap());
        assert_eq!(
            stored_events(&store, &a, &z).await.last(),
            Some(&(event_type::DELIVERED.to_string(), Status::Completed))
        );
    }

    /// `decode::webhook` reads every column as sea-orm's derived decoder
    /// does: a row with every optional column set (each to a value of its
    /// own, so two columns read in each other's place would show) and one
    /// with every optional column NULL.
    async fn rows_decode_as_sea_orm_decodes_them(db: &TestDb) {
        use chrono::TimeZone;
        use sea_orm::{ActiveModelTrait, FromQueryResult, QueryTrait};
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let at = |s: i64| Utc.timestamp_opt(1_760_000_000 + s, 123_456_000).unwrap();
        // Times in whole microseconds: PostgreSQL keeps no more.
        let sparse = Webhook {
            created_at: at(4),
            updated_at: at(5),
            expires_at: at(8),
            ..new_row(&t, Status::Pending)
        };
        let full = Webhook {
            expected_size: Some(11),
            size: Some(12),
            client_etag: Some("ce".into()),
            etag: Some("e".into()),
            object_last_modified: Some(at(1)),
            secret_generated: true,
            secret_key_id: Some("k1".into()),
            previous_secret: Some(StoredSecret("ps".into())),
            previous_secret_key_id: Some("k0".into()),
            previous_secret_until: Some(at(2)),
            request_fingerprint: Some("fp".into()),
            idempotency_key: Some("ik".into()),
            attempt_count: 3,
            attempt_base: 1,
            verify_attempts: 2,
            next_attempt_at: Some(at(3)),
            last_error: Some("le".into()),
            created_at: at(4),
            updated_at: at(5),
            verified_at: Some(at(6)),
            completed_at: Some(at(7)),
            expires_at: at(8),
            next_check_at: Some(at(9)),
            check_count: 4,
            seen_etag: Some("se".into()),
            seen_size: Some(13),
            traceparent: Some("00-tp".into()),
            ..new_row(&t, Status::Delivering)
        };
        for w in [sparse, full] {
            webhooks::ActiveModel::from(w.clone())
                .insert(&store.db)
                .await
                .unwrap();
            let select = webhooks::Entity::find_by_id(w.id.clone());
            let rows = store
                .db
                .query_all_raw(select.build(store.db.get_database_backend()))
                .await
                .unwrap();
            let ours = crate::store::decode::webhook(&rows[0]).unwrap();
            assert_eq!(ours, Webhook::from_query_result(&rows[0], "").unwrap());
            assert_eq!(ours, w);
        }
    }

    fn bus() -> Arc<dyn EventBus> {
        Arc::new(LocalEventBus::new(1024))
    }

    /// A webhook of a new tenant `tenant`, in `status`.
    async fn webhook(store: &Store, tenant: &TenantId, status: Status) -> WebhookId {
        let row = new_row(tenant, status);
        let id = WebhookId::from_trusted(row.id.clone());
        store
            .create_webhook(row, event_type::CREATED, Utc::now())
            .await
            .unwrap();
        id
    }

    /// The row of a new webhook of `tenant` in `status`, not stored.
    fn new_row(tenant: &TenantId, status: Status) -> Webhook {
        let id = WebhookId::generate();
        let now = Utc::now();
        Webhook {
            id: id.as_str().to_string(),
            tenant_id: tenant.as_str().to_string(),
            status: status.as_str().to_string(),
            trigger: "CONFIRM".into(),
            provider: "s3".into(),
            storage: String::new(),
            bucket: "b".into(),
            object_key: format!("k/{id}"),
            filename: "f.txt".into(),
            content_type: "text/plain".into(),
            expected_size: None,
            size: None,
            client_etag: None,
            etag: None,
            object_last_modified: None,
            url: "http://127.0.0.1:9/hook".into(),
            secret: StoredSecret("x".into()),
            secret_generated: false,
            secret_key_id: None,
            previous_secret: None,
            previous_secret_key_id: None,
            previous_secret_until: None,
            request_fingerprint: None,
            metadata: "{}".into(),
            idempotency_key: None,
            attempt_count: 0,
            attempt_base: 0,
            verify_attempts: 0,
            next_attempt_at: None,
            last_error: None,
            created_at: now,
            updated_at: now,
            verified_at: None,
            completed_at: None,
            expires_at: now + chrono::Duration::hours(1),
            priority: "NORMAL".into(),
            next_check_at: None,
            check_count: 0,
            seen_etag: None,
            seen_size: None,
            traceparent: None,
        }
    }

    async fn tenant(store: &Store, name: &str) -> TenantId {
        store.ensure_tenant(name, Utc::now()).await.unwrap()
    }

    fn verified(tenant: &TenantId, id: &WebhookId, size: i64) -> Write {
        Write::Transition(
            Transition::new(
                tenant,
                id,
                &[Status::Verifying],
                Status::Verified,
                event_type::VERIFIED,
                Utc::now(),
            )
            .changes(Changes::new().set(webhooks::Column::Size, Some(size)))
            .into(),
        )
    }

    fn claim(tenant: &TenantId, id: &WebhookId) -> Write {
        Write::Transition(
            Transition::new(
                tenant,
                id,
                &[Status::Verified],
                Status::Delivering,
                event_type::DELIVERING,
                Utc::now(),
            )
            .into(),
        )
    }

    /// A task that moves `id` VERIFYING → VERIFIED through `batcher`.
    fn spawn_verified(
        batcher: &WriteBatcher,
        t: &TenantId,
        id: &WebhookId,
    ) -> tokio::task::JoinHandle<Result<Option<Webhook>>> {
        let (b, t, id) = (batcher.clone(), t.clone(), id.clone());
        tokio::spawn(async move {
            b.transition(Transition::new(
                &t,
                &id,
                &[Status::Verifying],
                Status::Verified,
                event_type::VERIFIED,
                Utc::now(),
            ))
            .await
        })
    }

    /// A claim's webhook, and its row if the claim moved it.
    type Claimed = (WebhookId, Option<Webhook>);

    /// Two tasks per webhook, each claiming it (VERIFIED → DELIVERING)
    /// through `batcher`: their answers, with the webhook id.
    fn claim_each_twice(
        batcher: &WriteBatcher,
        t: &TenantId,
        ids: &[WebhookId],
    ) -> Vec<tokio::task::JoinHandle<Result<Claimed>>> {
        ids.iter()
            .chain(ids)
            .map(|id| {
                let (b, t, id) = (batcher.clone(), t.clone(), id.clone());
                tokio::spawn(async move {
                    b.transition(Transition::new(
                        &t,
                        &id,
                        &[Status::Verified],
                        Status::Delivering,
                        event_type::DELIVERING,
                        Utc::now(),
                    ))
                    .await
                    .map(|w| (id, w))
                })
            })
            .collect()
    }

    /// Events of a webhook as stored: (type, status), oldest first.
    async fn stored_events(
        store: &Store,
        tenant: &TenantId,
        id: &WebhookId,
    ) -> Vec<(String, Status)> {
        store
            .events_after(tenant, Some(id), 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.status))
            .collect()
    }

    /// Sends `writes` to `flush` as one batch; the answers in order.
    async fn flush_all(store: &Store, writes: Vec<Write>) -> Vec<Result<Option<Webhook>>> {
        let mut answers = Vec::new();
        let batch = writes
            .into_iter()
            .map(|write| {
                let (reply, rx) = oneshot::channel();
                answers.push(rx);
                Pending { write, reply }
            })
            .collect();
        flush(store, batch, None).await;
        let mut out = Vec::new();
        for a in answers {
            out.push(
                a.await
                    .expect("every write is answered")
                    .and_then(Done::into_row),
            );
        }
        out
    }

    async fn a_group_gives_each_write_its_own_result(db: &TestDb) {
        let store = db.store(bus()).await;
        let a = tenant(&store, "a").await;
        let b = tenant(&store, "b").await;
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(webhook(&store, &a, Status::Verifying).await);
        }
        let other = webhook(&store, &b, Status::Verifying).await;
        let pending = webhook(&store, &a, Status::Pending).await;
        let mut writes: Vec<Write> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| verified(&a, id, i as i64))
            .collect();
        // Another tenant's webhook answers like an unknown one.
        writes.push(verified(&a, &other, 1));
        writes.push(verified(&a, &WebhookId::generate(), 1));
        // Not in a `from` status.
        writes.push(verified(&a, &pending, 1));
        // One transaction for all of them.
        let applied = store.write_group(&writes).await.unwrap();
        assert_eq!(applied.rows.len(), writes.len());
        for (i, id) in ids.iter().enumerate() {
            let row = applied.rows[i].row().expect("moved");
            assert_eq!(row.id, id.as_str());
            assert_eq!(row.status, Status::Verified.as_str());
            assert_eq!(row.size, Some(i as i64));
        }
        assert!(applied.rows[40..].iter().all(|d| *d == Done::Stayed));
        // One event per moved webhook, in id order, naming its webhook.
        assert_eq!(applied.events.len(), 40);
        assert!(applied.events.windows(2).all(|w| w[0].id < w[1].id));
        for (ev, id) in applied.events.iter().zip(&ids) {
            assert_eq!(ev.webhook_id, *id);
            assert_eq!(ev.kind, event_type::VERIFIED);
            assert_eq!(ev.status, Status::Verified);
            assert_eq!(ev.tenant_id, a);
        }
        for (i, id) in ids.iter().enumerate() {
            let w = store.find_webhook(&a, id).await.unwrap().unwrap();
            assert_eq!(
                (w.status.as_str(), w.size),
                (Status::Verified.as_str(), Some(i as i64))
            );
        }
        let w = store.find_webhook(&b, &other).await.unwrap().unwrap();
        assert_eq!(w.status, Status::Verifying.as_str());
        assert_eq!(stored_events(&store, &b, &other).await.len(), 1);
        let w = store.find_webhook(&a, &pending).await.unwrap().unwrap();
        assert_eq!(w.status, Status::Pending.as_str());
    }

    /// Writes of several shapes in one group (on PostgreSQL, one statement
    /// for them all): each keeps its own conditions and values, NULLs
    /// included, and leaves alone the columns that only others change.
    async fn shapes_in_one_group_each_keep_their_conditions(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let now = Utc::now();
        let mut ids = Vec::new();
        for _ in 0..7 {
            ids.push(webhook(&store, &t, Status::Verifying).await);
        }
        let read = store.find_webhook(&t, &ids[0]).await.unwrap().unwrap();
        let since = |id: &WebhookId, at| -> Write {
            let t = Transition::new(
                &t,
                id,
                &[Status::Verifying, Status::Verified],
                Status::Retrying,
                event_type::RETRYING,
                now,
            )
            .changes(
                Changes::new()
                    .set(webhooks::Column::NextAttemptAt, Some(now))
                    .set(webhooks::Column::LastError, None::<String>),
            )
            .unchanged_since(Some(at));
            Write::Transition(t.into())
        };
        let unexpired = |id: &WebhookId, at| -> Write {
            let t = Transition::new(
                &t,
                id,
                &[Status::Verifying],
                Status::Failed,
                event_type::VERIFICATION_FAILED,
                now,
            )
            .changes(Changes::new().set(webhooks::Column::LastError, Some("x".to_string())))
            .unexpired_at(at);
            Write::Transition(t.into())
        };
        let writes: Vec<Write> = vec![
            // Unchanged since the read: moves.
            since(&ids[0], read.updated_at),
            // Changed after the time given: stays.
            since(&ids[1], read.updated_at - chrono::Duration::hours(1)),
            // Not expired at `now`: moves; expired: stays.
            unexpired(&ids[2], now),
            unexpired(&ids[3], now + chrono::Duration::days(30)),
            verified(&t, &ids[4], 4),
            verified(&t, &ids[5], 5),
            // The only write that changes the content type.
            Write::Transition(
                Transition::new(
                    &t,
                    &ids[6],
                    &[Status::Verifying],
                    Status::Verified,
                    event_type::VERIFIED,
                    now,
                )
                .changes(Changes::new().set(webhooks::Column::ContentType, "image/png"))
                .into(),
            ),
        ];
        let applied = store.write_group(&writes).await.unwrap();
        let moved: Vec<bool> = applied.rows.iter().map(Done::moved).collect();
        assert_eq!(moved, [true, false, true, false, true, true, true]);
        for (k, id) in ids.iter().enumerate() {
            let w = store.find_webhook(&t, id).await.unwrap().unwrap();
            let want = if k == 6 { "image/png" } else { "text/plain" };
            assert_eq!(w.content_type, want, "webhook {k}");
        }
        let w = store.find_webhook(&t, &ids[0]).await.unwrap().unwrap();
        assert_eq!(w.status, Status::Retrying.as_str());
        assert_eq!(w.last_error, None);
        assert!(w.next_attempt_at.is_some());
        let w = store.find_webhook(&t, &ids[2]).await.unwrap().unwrap();
        assert_eq!(
            (w.status.as_str(), w.last_error.as_deref()),
            (Status::Failed.as_str(), Some("x"))
        );
        for (id, status) in [(&ids[1], Status::Verifying), (&ids[3], Status::Verifying)] {
            let w = store.find_webhook(&t, id).await.unwrap().unwrap();
            assert_eq!(w.status, status.as_str());
        }
        for (k, id) in ids[4..6].iter().enumerate() {
            let w = store.find_webhook(&t, id).await.unwrap().unwrap();
            assert_eq!(w.size, Some(4 + k as i64));
        }
        assert_eq!(applied.events.len(), 5);
        assert!(applied.events.windows(2).all(|w| w[0].id < w[1].id));
    }

    async fn conflicting_writes_in_one_group_one_wins(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let id = webhook(&store, &t, Status::Verified).await;
        let answers = flush_all(&store, vec![claim(&t, &id), claim(&t, &id), claim(&t, &id)]).await;
        let won: Vec<bool> = answers
            .iter()
            .map(|a| a.as_ref().unwrap().is_some())
            .collect();
        assert_eq!(won, [true, false, false]);
        let events = stored_events(&store, &t, &id).await;
        assert_eq!(
            events,
            [
                (event_type::CREATED.to_string(), Status::Verified),
                (event_type::DELIVERING.to_string(), Status::Delivering),
            ]
        );
        // Outcomes racing on one attempt: only one completes it, with one
        // attempt row.
        let outcome = |to: Status, event: &'static str| {
            Write::Transition(
                Transition::new(&t, &id, &[Status::Delivering], to, event, Utc::now())
                    .attempt(NewAttempt {
                        number: 1,
                        started_at: Utc::now(),
                        duration_ms: 3,
                        response_status: Some(200),
                        response_body: None,
                        error: None,
                    })
                    .into(),
            )
        };
        let answers = flush_all(
            &store,
            vec![
                outcome(Status::Completed, event_type::DELIVERED),
                outcome(Status::Completed, event_type::DELIVERED),
            ],
        )
        .await;
        assert!(answers[0].as_ref().unwrap().is_some());
        assert!(answers[1].as_ref().unwrap().is_none());
        assert_eq!(store.attempts(&t, &id).await.unwrap().len(), 1);
        let completed = stored_events(&store, &t, &id)
            .await
            .into_iter()
            .filter(|(_, s)| *s == Status::Completed)
            .count();
        assert_eq!(completed, 1);
    }

    async fn writes_to_one_webhook_keep_their_order(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        // Other webhooks' writes around them: the group is written in
        // webhook id order, and the writes of `id` stay in theirs.
        let before = webhook(&store, &t, Status::Verifying).await;
        let id = webhook(&store, &t, Status::Verifying).await;
        let after = webhook(&store, &t, Status::Verifying).await;
        let dead = Write::Transition(
            Transition::new(
                &t,
                &id,
                &[Status::Verified],
                Status::DeadLetter,
                event_type::DEAD_LETTERED,
                Utc::now(),
            )
            .dead_letter_opt(Some("gave up".into()))
            .into(),
        );
        let redrive = Write::Transition(
            Transition::new(
                &t,
                &id,
                &[Status::DeadLetter],
                Status::Retrying,
                event_type::REDELIVER,
                Utc::now(),
            )
            .redriven_by(RedriveSource::Api)
            .into(),
        );
        let writes = vec![
            verified(&t, &after, 1),
            verified(&t, &id, 1),
            dead,
            verified(&t, &before, 1),
            redrive,
        ];
        let applied = store.write_group(&writes).await.unwrap();
        assert!(applied.rows.iter().all(Done::moved));
        let events = stored_events(&store, &t, &id).await;
        assert_eq!(
            events,
            [
                (event_type::CREATED.to_string(), Status::Verifying),
                (event_type::VERIFIED.to_string(), Status::Verified),
                (event_type::DEAD_LETTERED.to_string(), Status::DeadLetter),
                (event_type::REDELIVER.to_string(), Status::Retrying),
            ]
        );
        // The dead letter opened earlier in the group was closed by the
        // redrive after it.
        let dl = store.dead_letters(&t, &id).await.unwrap();
        assert_eq!(dl.len(), 1);
        assert!(dl[0].redriven_at.is_some());
        assert_eq!(dl[0].redriven_by.as_deref(), Some("api"));
        // The published order is the stored order.
        let ids: Vec<i64> = applied.events.iter().map(|e| e.id).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted);
    }

    async fn one_failing_write_does_not_fail_the_others(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let ok1 = webhook(&store, &t, Status::Verifying).await;
        let bad = webhook(&store, &t, Status::Verifying).await;
        let ok2 = webhook(&store, &t, Status::Verified).await;
        // `url` is NOT NULL: this write breaks a constraint.
        let breaks = || {
            Write::Transition(
                Transition::new(
                    &t,
                    &bad,
                    &[Status::Verifying],
                    Status::Verified,
                    event_type::VERIFIED,
                    Utc::now(),
                )
                .changes(Changes::new().set(webhooks::Column::Url, None::<String>))
                .into(),
            )
        };
        // As one transaction, nothing of the group is stored.
        let group = vec![verified(&t, &ok1, 7), breaks(), claim(&t, &ok2)];
        assert!(store.write_group(&group).await.is_err());
        assert_eq!(
            store.find_webhook(&t, &ok1).await.unwrap().unwrap().status,
            Status::Verifying.as_str()
        );
        // Through the batcher, each write gets its own answer.
        let answers = flush_all(&store, group).await;
        assert_eq!(answers[0].as_ref().unwrap().as_ref().unwrap().size, Some(7));
        assert!(
            matches!(&answers[1], Err(StoreError::Db(_))),
            "the bad write fails on its own"
        );
        assert_eq!(
            answers[2].as_ref().unwrap().as_ref().unwrap().status,
            Status::Delivering.as_str()
        );
        assert_eq!(
            store.find_webhook(&t, &bad).await.unwrap().unwrap().status,
            Status::Verifying.as_str()
        );
        assert_eq!(stored_events(&store, &t, &bad).await.len(), 1);
        assert_eq!(stored_events(&store, &t, &ok1).await.len(), 2);
        assert_eq!(stored_events(&store, &t, &ok2).await.len(), 2);
    }

    /// Holds the database's write lock (SQLite) or one webhook's row lock
    /// (PostgreSQL) until dropped through `release`.
    struct Blocker {
        conn: DatabaseConnection,
        txn: Option<sea_orm::DatabaseTransaction>,
    }

    impl Blocker {
        async fn hold(db: &TestDb, id: &WebhookId) -> Blocker {
            let conn = crate::store::connect(&db.url, 1).await.unwrap();
            if db.drop.is_none() {
                conn.execute_unprepared("BEGIN IMMEDIATE").await.unwrap();
                Blocker { conn, txn: None }
            } else {
                let txn = conn.begin().await.unwrap();
                txn.execute_unprepared(&format!(
                    "SELECT id FROM webhooks WHERE id = '{id}' FOR UPDATE"
                ))
                .await
                .unwrap();
                Blocker {
                    conn,
                    txn: Some(txn),
                }
            }
        }

        async fn release(self) {
            match self.txn {
                Some(txn) => txn.rollback().await.unwrap(),
                None => {
                    self.conn.execute_unprepared("ROLLBACK").await.unwrap();
                }
            }
        }
    }

    async fn what_waits_is_written_as_one_group(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let first = webhook(&store, &t, Status::Verifying).await;
        let mut ids = Vec::new();
        for _ in 0..60 {
            ids.push(webhook(&store, &t, Status::Verified).await);
        }
        // A linger the test would notice: a group that gathered while its
        // writer was busy is written at once.
        let batcher = WriteBatcher::start(store.clone(), 128, 1, Duration::from_secs(60));
        // The first group is stuck behind the lock while the rest arrive.
        let blocker = Blocker::hold(db, &first).await;
        let first_write = spawn_verified(&batcher, &t, &first);
        wait_until(|| batcher.groups_written() == 1).await;
        // Every id twice: two jobs racing to claim each webhook.
        let tasks = claim_each_twice(&batcher, &t, &ids);
        let tx = batcher.tx.clone().unwrap();
        wait_until(|| tx.max_capacity() - tx.capacity() == 120).await;
        blocker.release().await;
        assert!(first_write.await.unwrap().unwrap().is_some());
        let mut wins = std::collections::HashMap::<WebhookId, usize>::new();
        for task in tasks {
            let (id, moved) = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a group gathered behind a busy writer waited for more")
                .unwrap()
                .unwrap();
            if let Some(w) = moved {
                assert_eq!(w.id, id.as_str());
                assert_eq!(w.status, Status::Delivering.as_str());
                *wins.entry(id).or_default() += 1;
            }
        }
        // Each webhook claimed once, all 120 writes in one more group.
        assert_eq!(wins.len(), 60);
        assert!(wins.values().all(|n| *n == 1));
        assert_eq!(batcher.groups_written(), 2);
        for id in &ids {
            assert_eq!(stored_events(&store, &t, id).await.len(), 2);
        }
    }

    /// A write that passes through a status stores that status's event
    /// first, with the status it names, then its own.
    async fn a_write_through_a_status_stores_both_events(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let id = webhook(&store, &t, Status::Verifying).await;
        let other = webhook(&store, &t, Status::Pending).await;
        let claim = |id| {
            Write::Transition(
                Transition::new(
                    &t,
                    id,
                    &[Status::Verifying],
                    Status::Delivering,
                    event_type::DELIVERING,
                    Utc::now(),
                )
                .changes(Changes::new().set(webhooks::Column::Size, Some(7i64)))
                .through(Status::Verified, event_type::VERIFIED)
                .into(),
            )
        };
        let applied = store
            .write_group(&[claim(&id), claim(&other)])
            .await
            .unwrap();
        let row = applied.rows[0].row().expect("moved");
        assert_eq!(
            (row.status.as_str(), row.size),
            (Status::Delivering.as_str(), Some(7))
        );
        assert_eq!(
            applied.rows[1],
            Done::Stayed,
            "not VERIFYING: nothing stored"
        );
        let published: Vec<_> = applied
            .events
            .iter()
            .map(|e| (e.kind.as_str(), e.status))
            .collect();
        assert_eq!(
            published,
            [
                (event_type::VERIFIED, Status::Verified),
                (event_type::DELIVERING, Status::Delivering)
            ]
        );
        assert_eq!(
            stored_events(&store, &t, &id).await[1..],
            [
                (event_type::VERIFIED.to_string(), Status::Verified),
                (event_type::DELIVERING.to_string(), Status::Delivering)
            ]
        );
        assert_eq!(stored_events(&store, &t, &other).await.len(), 1);
    }

    /// A transition alone (one statement on PostgreSQL) stores the same
    /// rows as in a group: the moved webhook, both events in order with
    /// the ids it publishes, the attempt; and nothing when it does not
    /// match.
    async fn a_transition_alone_stores_its_events_and_attempt(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let id = webhook(&store, &t, Status::Verifying).await;
        let now = Utc::now();
        let claim = || {
            Transition::new(
                &t,
                &id,
                &[Status::Verifying],
                Status::Retrying,
                event_type::RETRYING,
                now,
            )
            .changes(Changes::new().set(webhooks::Column::AttemptCount, 1))
            .through(Status::Delivering, event_type::DELIVERING)
            .attempt(NewAttempt {
                number: 1,
                started_at: now,
                duration_ms: 12,
                response_status: Some(503),
                response_body: Some("busy".into()),
                error: None,
            })
        };
        let row = store.transition(claim()).await.unwrap().expect("moved");
        assert_eq!(
            (row.status.as_str(), row.attempt_count, row.id.as_str()),
            (Status::Retrying.as_str(), 1, id.as_str())
        );
        let stored = store.events_after(&t, Some(&id), 0, 100).await.unwrap();
        let kinds: Vec<_> = stored[1..]
            .iter()
            .map(|e| (e.kind.as_str(), e.status))
            .collect();
        assert_eq!(
            kinds,
            [
                (event_type::DELIVERING, Status::Delivering),
                (event_type::RETRYING, Status::Retrying)
            ]
        );
        let attempts = store.attempts(&t, &id).await.unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(
            (
                attempts[0].number,
                attempts[0].duration_ms,
                attempts[0].response_status,
                attempts[0].response_body.as_deref()
            ),
            (1, 12, Some(503), Some("busy"))
        );

        // The same compare-and-set again: no match, nothing more stored.
        let applied = store
            .write_group(&[Write::Transition(claim().into())])
            .await
            .unwrap();
        assert!(applied.rows[0] == Done::Stayed && applied.events.is_empty());
        assert_eq!(
            store
                .events_after(&t, Some(&id), 0, 100)
                .await
                .unwrap()
                .len(),
            3
        );
        assert_eq!(store.attempts(&t, &id).await.unwrap().len(), 1);
    }

    /// A group of outcomes (on PostgreSQL, one statement for all of it):
    /// each moved write stores its attempt, its dead letter and its events
    /// (a `through` event first), with ids in webhook id order; a write
    /// whose compare-and-set fails stores nothing.
    async fn a_group_stores_attempts_dead_letters_and_events(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let mut ids = vec![
            webhook(&store, &t, Status::Delivering).await,
            webhook(&store, &t, Status::Delivering).await,
            webhook(&store, &t, Status::Verifying).await,
            webhook(&store, &t, Status::Verified).await,
        ];
        ids.sort();
        let now = Utc::now();
        let attempt = |status: i32, body: &str| NewAttempt {
            number: 1,
            started_at: now,
            duration_ms: 7,
            response_status: Some(status),
            response_body: Some(body.into()),
            error: (status >= 300).then(|| format!("receiver answered {status}")),
        };
        let outcome = |id: &WebhookId,
                       to: Status,
                       event: &'static str,
                       attempt: NewAttempt,
                       dead_letter: Option<String>|
         -> Write {
            Write::Transition(
                Transition::new(&t, id, &[Status::Delivering], to, event, now)
                    .changes(Changes::new().set(webhooks::Column::AttemptCount, 1))
                    .attempt(attempt)
                    .dead_letter_opt(dead_letter)
                    .into(),
            )
        };
        // Listed out of id order: the group sorts them.
        let writes = vec![
            outcome(
                &ids[1],
                Status::DeadLetter,
                event_type::DEAD_LETTERED,
                attempt(500, "no"),
                Some("gave up".into()),
            ),
            outcome(
                &ids[0],
                Status::Completed,
                event_type::DELIVERED,
                attempt(200, "ok"),
                None,
            ),
            Write::Transition(
                Transition::new(
                    &t,
                    &ids[2],
                    &[Status::Verifying],
                    Status::Delivering,
                    event_type::DELIVERING,
                    now,
                )
                .through(Status::Verified, event_type::VERIFIED)
                .into(),
            ),
            // VERIFIED, not DELIVERING: no match, nothing stored.
            outcome(
                &ids[3],
                Status::Retrying,
                event_type::RETRYING,
                attempt(503, "busy"),
                None,
            ),
        ];
        let applied = store.write_group(&writes).await.unwrap();
        let moved: Vec<Option<&str>> = applied
            .rows
            .iter()
            .map(|r| r.row().map(|w| w.status.as_str()))
            .collect();
        assert_eq!(
            moved,
            [
                Some(Status::DeadLetter.as_str()),
                Some(Status::Completed.as_str()),
                Some(Status::Delivering.as_str()),
                None
            ]
        );
        let events: Vec<(&WebhookId, &str, Status)> = applied
            .events
            .iter()
            .map(|e| (&e.webhook_id, e.kind.as_str(), e.status))
            .collect();
        assert_eq!(
            events,
            [
                (&ids[0], event_type::DELIVERED, Status::Completed),
                (&ids[1], event_type::DEAD_LETTERED, Status::DeadLetter),
                (&ids[2], event_type::VERIFIED, Status::Verified),
                (&ids[2], event_type::DELIVERING, Status::Delivering),
            ]
        );
        assert!(applied.events.windows(2).all(|w| w[0].id < w[1].id));
        // What is stored is what the group answered, ids included.
        for id in &ids {
            let stored: Vec<(i64, String)> = store
                .events_after(&t, Some(id), 0, 100)
                .await
                .unwrap()
                .into_iter()
                .skip(1) // created
                .map(|e| (e.id, e.kind))
                .collect();
            let answered: Vec<(i64, String)> = applied
                .events
                .iter()
                .filter(|e| e.webhook_id == *id)
                .map(|e| (e.id, e.kind.clone()))
                .collect();
            assert_eq!(stored, answered, "{id}");
        }
        let attempts = |id| {
            let store = &store;
            let t = &t;
            async move {
                store
                    .attempts(t, id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|a| (a.number, a.response_status, a.response_body, a.error))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            attempts(&ids[0]).await,
            [(1, Some(200), Some("ok".to_string()), None)]
        );
        assert_eq!(
            attempts(&ids[1]).await,
            [(
                1,
                Some(500),
                Some("no".to_string()),
                Some("receiver answered 500".to_string())
            )]
        );
        assert!(attempts(&ids[2]).await.is_empty());
        assert!(attempts(&ids[3]).await.is_empty());
        let letters = store.dead_letters(&t, &ids[1]).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(
            (letters[0].reason.as_str(), letters[0].tenant_id.as_str()),
            ("gave up", t.as_str())
        );
        for id in [&ids[0], &ids[2], &ids[3]] {
            assert!(store.dead_letters(&t, id).await.unwrap().is_empty());
        }
    }

    /// A group with a touch among its transitions (on PostgreSQL, the
    /// transaction with one `UPDATE` for the transitions, then the touch).
    async fn a_group_with_a_touch_writes_both(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let ids = [
            webhook(&store, &t, Status::Verifying).await,
            webhook(&store, &t, Status::Verifying).await,
            webhook(&store, &t, Status::Retrying).await,
        ];
        let before = store.find_webhook(&t, &ids[2]).await.unwrap().unwrap();
        let later = before.updated_at + chrono::Duration::seconds(30);
        let writes = vec![
            verified(&t, &ids[0], 10),
            Write::Touch {
                tenant: t.clone(),
                id: ids[2].clone(),
                status: Status::Retrying,
                now: later,
            },
            verified(&t, &ids[1], 11),
        ];
        let applied = store.write_group(&writes).await.unwrap();
        let moved: Vec<bool> = applied.rows.iter().map(Done::moved).collect();
        assert_eq!(moved, [true, false, true]);
        assert_eq!(applied.events.len(), 2);
        for (id, size) in [(&ids[0], 10), (&ids[1], 11)] {
            let w = store.find_webhook(&t, id).await.unwrap().unwrap();
            assert_eq!(
                (w.status.as_str(), w.size),
                (Status::Verified.as_str(), Some(size))
            );
        }
        let w = store.find_webhook(&t, &ids[2]).await.unwrap().unwrap();
        assert_eq!(
            (w.status.as_str(), w.updated_at.timestamp_micros()),
            (Status::Retrying.as_str(), later.timestamp_micros())
        );
    }

    /// What a lone transition publishes is what it stored, ids included.
    async fn a_transition_alone_publishes_the_stored_ids(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let id = webhook(&store, &t, Status::Verifying).await;
        let applied = store
            .write_group(&[Write::Transition(
                Transition::new(
                    &t,
                    &id,
                    &[Status::Verifying],
                    Status::Delivering,
                    event_type::DELIVERING,
                    Utc::now(),
                )
                .through(Status::Verified, event_type::VERIFIED)
                .into(),
            )])
            .await
            .unwrap();
        let key = |e: &Event| (e.id, e.kind.clone(), e.status, e.webhook_id.clone());
        let stored = store.events_after(&t, Some(&id), 0, 100).await.unwrap();
        assert_eq!(
            applied.events.iter().map(key).collect::<Vec<_>>(),
            stored[1..].iter().map(key).collect::<Vec<_>>()
        );
        assert_eq!(applied.events[0].kind, event_type::VERIFIED);
        assert!(applied.events[0].id < applied.events[1].id);
    }

    /// New webhooks in a group with a transition: each row stored with its
    /// CREATED event, each write answered with its row, and the answered
    /// events the stored ones.
    async fn inserts_in_a_group_store_rows_and_events(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let moved = webhook(&store, &t, Status::Verifying).await;
        let new: Vec<Webhook> = (0..3).map(|_| new_row(&t, Status::Pending)).collect();
        let mut writes: Vec<Write> = new
            .iter()
            .map(|w| Write::Insert {
                row: Box::new(w.clone()),
                event: event_type::CREATED,
            })
            .collect();
        writes.insert(1, verified(&t, &moved, 5));
        let applied = store.write_group(&writes).await.unwrap();
        let answered: Vec<&str> = applied
            .rows
            .iter()
            .map(|r| r.row().unwrap().id.as_str())
            .collect();
        assert_eq!(
            answered,
            [
                new[0].id.as_str(),
                moved.as_str(),
                new[1].id.as_str(),
                new[2].id.as_str()
            ]
        );
        let mut stored = Vec::new();
        for w in &new {
            let id = WebhookId::from_trusted(w.id.clone());
            let row = store.find_webhook(&t, &id).await.unwrap().unwrap();
            assert_eq!(row.status, Status::Pending.as_str());
            assert_eq!(row.object_key, w.object_key);
            assert_eq!(
                stored_events(&store, &t, &id).await,
                [(event_type::CREATED.to_string(), Status::Pending)]
            );
            stored.extend(store.events_after(&t, Some(&id), 0, 10).await.unwrap());
        }
        stored.extend(store.events_after(&t, Some(&moved), 1, 10).await.unwrap());
        stored.sort_by_key(|e| e.id);
        let key = |e: &Event| (e.id, e.kind.clone(), e.status, e.webhook_id.clone());
        assert_eq!(
            applied.events.iter().map(key).collect::<Vec<_>>(),
            stored.iter().map(key).collect::<Vec<_>>()
        );
        assert_eq!(applied.events.len(), 4);
    }

    /// New webhooks beside transitions that want no row back (a Create
    /// grouped with a delivery's outcome, on SQLite): every write stored
    /// and recorded, each answered as it asked (on PostgreSQL a group with
    /// inserts takes the general path, whose rows come back whole).
    async fn inserts_beside_writes_that_want_no_row(db: &TestDb) {
        let store = db.store(bus()).await;
        let sqlite = store.db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite;
        let t = tenant(&store, "a").await;
        // One transition beside the inserts (its own `UPDATE`), then two,
        // one of which wants its row (the group's `UPDATE`s).
        for wanted in [0, 1] {
            let new = new_row(&t, Status::Pending);
            let bare_id = webhook(&store, &t, Status::Delivering).await;
            let mut writes = vec![
                Write::Insert {
                    row: Box::new(new.clone()),
                    event: event_type::CREATED,
                },
                bare(&t, &bare_id),
            ];
            let mut ids = vec![WebhookId::from_trusted(new.id.clone()), bare_id.clone()];
            if wanted == 1 {
                let id = webhook(&store, &t, Status::Delivering).await;
                writes.push(delivered(&t, &id));
                ids.push(id);
            }
            let applied = store.write_group(&writes).await.unwrap();
            assert_eq!(
                applied.rows[0].row().map(|w| w.id.as_str()),
                Some(new.id.as_str())
            );
            if sqlite {
                assert_eq!(applied.rows[1], Done::Moved);
            } else {
                assert!(applied.rows[1].moved());
            }
            if wanted == 1 {
                let row = applied.rows[2].row().expect("moved, with its row");
                assert_eq!(row.status, Status::Completed.as_str());
            }
            assert_eq!(store.attempts(&t, &bare_id).await.unwrap().len(), 1);
            let mut stored = Vec::new();
            for id in &ids {
                let evs = store.events_after(&t, Some(id), 0, 10).await.unwrap();
                stored.push(evs.last().cloned().unwrap());
            }
            stored.sort_by_key(|e| e.id);
            let key = |e: &Event| (e.id, e.kind.clone(), e.status, e.webhook_id.clone());
            assert_eq!(
                applied.events.iter().map(key).collect::<Vec<_>>(),
                stored.iter().map(key).collect::<Vec<_>>()
            );
            assert_eq!(applied.events.len(), 2 + wanted);
        }
    }

    /// Creates go through the batcher on SQLite (one connection), straight
    /// to the database on PostgreSQL and whenever an idempotency key needs
    /// its lookups; either way each is stored and answered as new.
    async fn creates_are_grouped_on_sqlite_only_without_a_key(db: &TestDb) {
        let store = db.store(bus()).await;
        let sqlite = store.db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite;
        let t = tenant(&store, "a").await;
        let batcher = WriteBatcher::start(store.clone(), 128, 1, Duration::ZERO);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (b, row) = (batcher.clone(), new_row(&t, Status::Pending));
                tokio::spawn(async move {
                    let id = row.id.clone();
                    match b.create(row, event_type::CREATED, Utc::now()).await {
                        Ok(crate::store::Created::New(w)) => assert_eq!(w.id, id),
                        Ok(crate::store::Created::Existing(_)) => panic!("not new"),
                        Err(e) => panic!("{e}"),
                    }
                    WebhookId::from_trusted(id)
                })
            })
            .collect();
        for task in tasks {
            let id = task.await.unwrap();
            assert_eq!(stored_events(&store, &t, &id).await.len(), 1);
        }
        let grouped = batcher.groups_written();
        assert_eq!(grouped > 0, sqlite, "{grouped} groups");
        // With a key: written at once, and a replay finds it.
        let mut keyed = new_row(&t, Status::Pending);
        keyed.idempotency_key = Some("k1".into());
        let replay = Webhook {
            id: WebhookId::generate().as_str().to_string(),
            ..keyed.clone()
        };
        let old = Utc::now() - chrono::Duration::hours(1);
        assert!(matches!(
            batcher
                .create(keyed.clone(), event_type::CREATED, old)
                .await
                .unwrap(),
            crate::store::Created::New(_)
        ));
        match batcher
            .create(replay, event_type::CREATED, old)
            .await
            .unwrap()
        {
            crate::store::Created::Existing(w) => assert_eq!(w.id, keyed.id),
            crate::store::Created::New(_) => panic!("the key was ignored"),
        }
        assert_eq!(batcher.groups_written(), grouped);
    }

    /// With a linger: a write after a quiet spell is written at once; a
    /// group begun right after another waits, a write sent meanwhile joins
    /// it, and a full group is written without waiting out the linger.
    async fn writes_arriving_while_a_group_lingers_join_it(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(webhook(&store, &t, Status::Verifying).await);
        }
        // A linger the test would notice: it fails rather than wait it out.
        let batcher = WriteBatcher::start(store.clone(), 2, 4, Duration::from_secs(60));
        let within = |task| tokio::time::timeout(Duration::from_secs(20), task);
        let first = spawn_verified(&batcher, &t, &ids[0]);
        let first = within(first).await.expect("a lone write waited for more");
        assert!(first.unwrap().unwrap().is_some());
        assert_eq!(batcher.groups_written(), 1);
        let second = spawn_verified(&batcher, &t, &ids[1]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = spawn_verified(&batcher, &t, &ids[2]);
        for task in [second, third] {
            let written = within(task).await.expect("a full group waited for more");
            assert!(written.unwrap().unwrap().is_some());
        }
        assert_eq!(batcher.groups_written(), 2);
        for id in &ids {
            let w = store.find_webhook(&t, id).await.unwrap().unwrap();
            assert_eq!(w.status, Status::Verified.as_str());
        }
    }

    /// The channel closes while a group lingers (every batcher dropped,
    /// the write's caller cancelled, as when the process stops): the wait
    /// ends and the write already taken is still written.
    async fn a_lingering_group_is_written_when_the_batcher_closes(db: &TestDb) {
        let store = db.store(bus()).await;
        let t = tenant(&store, "a").await;
        let first = webhook(&store, &t, Status::Verifying).await;
        let second = webhook(&store, &t, Status::Verifying).await;
        // A linger the test would notice: it fails rather than wait it out.
        let batcher = WriteBatcher::start(store.clone(), 8, 4, Duration::from_secs(60));
        spawn_verified(&batcher, &t, &first).await.unwrap().unwrap();
        // Begun right after the first group: this one lingers.
        let caller = spawn_verified(&batcher, &t, &second);
        // Taken from the channel (into the lingering group), not written.
        wait_until(|| batcher.writes_taken() == 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!caller.is_finished());
        let w = store.find_webhook(&t, &second).await.unwrap().unwrap();
        assert_eq!(w.status, Status::Verifying.as_str(), "it did not linger");
        let events_before = stored_events(&store, &t, &second).await.len();
        caller.abort();
        drop(batcher);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let w = store.find_webhook(&t, &second).await.unwrap().unwrap();
            if w.status == Status::Verified.as_str() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lingering write was not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            stored_events(&store, &t, &second).await.len(),
            events_before + 1
        );
    }

    /// PostgreSQL writes several groups at once: a group stuck behind a
    /// locked row does not hold up the others, and two jobs racing to claim
    /// one webhook from different groups still make one claim.
    async fn groups_are_written_at_once_on_postgres(db: &TestDb) {
        let store = db.store(bus()).await;
        if store.db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite {
            return; // one writer: the group of one is the test above
        }
        let t = tenant(&store, "a").await;
        let stuck = webhook(&store, &t, Status::Verifying).await;
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(webhook(&store, &t, Status::Verified).await);
        }
        let batcher = WriteBatcher::start(store.clone(), 8, 4, Duration::ZERO);
        let blocker = Blocker::hold(db, &stuck).await;
        let stuck_write = spawn_verified(&batcher, &t, &stuck);
        wait_until(|| batcher.groups_written() == 1).await;
        // Every id twice, from tasks of their own: groups of at most 8, on
        // the three free writers, while the first group waits for its row.
        let tasks = claim_each_twice(&batcher, &t, &ids);
        let mut wins = std::collections::HashMap::<WebhookId, usize>::new();
        for task in tasks {
            let (id, moved) = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("a locked row held up the other groups")
                .unwrap()
                .unwrap();
            if moved.is_some() {
                *wins.entry(id).or_default() += 1;
            }
        }
        assert_eq!(wins.len(), 40);
        assert!(wins.values().all(|n| *n == 1), "{wins:?}");
        assert!(!stuck_write.is_finished());
        blocker.release().await;
        assert!(stuck_write.await.unwrap().unwrap().is_some());
        for id in &ids {
            assert_eq!(stored_events(&store, &t, id).await.len(), 2);
        }
    }

    /// A bus that, when an event is published, reads it back through a
    /// connection of its own: a published event must already be committed.
    struct CheckingBus {
        ask: Mutex<std::sync::mpsc::Sender<(Event, std::sync::mpsc::Sender<bool>)>>,
        seen: Mutex<Vec<(Event, bool)>>,
        local: LocalEventBus,
    }

    impl CheckingBus {
        fn start(url: String) -> Arc<CheckingBus> {
            let (ask, questions) =
                std::sync::mpsc::channel::<(Event, std::sync::mpsc::Sender<bool>)>();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let conn = crate::store::connect(&url, 1).await.unwrap();
                    while let Ok((ev, answer)) = questions.recv() {
                        let stored = events::Entity::find_by_id(ev.id).one(&conn).await.unwrap();
                        let row = webhooks::Entity::find_by_id(ev.webhook_id.as_str())
                            .one(&conn)
                            .await
                            .unwrap();
                        let committed = stored.is_some_and(|s| s.kind == ev.kind)
                            && row.is_some_and(|w| w.status == ev.status.as_str());
                        let _ = answer.send(committed);
                    }
                });
            });
            Arc::new(CheckingBus {
                ask: Mutex::new(ask),
                seen: Mutex::new(Vec::new()),
                local: LocalEventBus::new(16),
            })
        }
    }

    impl EventBus for CheckingBus {
        fn publish(&self, event: Event) {
            let (answer, got) = std::sync::mpsc::channel();
            self.ask
                .lock()
                .unwrap()
                .send((event.clone(), answer))
                .unwrap();
            let committed = got.recv().unwrap();
            self.seen.lock().unwrap().push((event, committed));
        }

        fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
            self.local.subscribe()
        }
    }

    async fn events_are_published_after_commit(db: &TestDb) {
        // The schema first, so that the checker's connection sees it.
        db.store(bus()).await;
        let checking = CheckingBus::start(db.url.clone());
        let store = db.store(checking.clone()).await;
        let t = tenant(&store, "a").await;
        let mut ids = Vec::new();
        for _ in 0..30 {
            ids.push(webhook(&store, &t, Status::Verifying).await);
        }
        checking.seen.lock().unwrap().clear();
        let batcher = WriteBatcher::start(store.clone(), 128, 1, Duration::ZERO);
        let mut tasks = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let b = batcher.clone();
            let (t, id) = (t.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                let w = b
                    .transition(Transition::new(
                        &t,
                        &id,
                        &[Status::Verifying],
                        Status::Verified,
                        event_type::VERIFIED,
                        Utc::now(),
                    ))
                    .await?;
                b.transition(
                    Transition::new(
                        &t,
                        &id,
                        &[Status::Verified],
                        Status::Delivering,
                        event_type::DELIVERING,
                        Utc::now(),
                    )
                    .changes(Changes::new().set(webhooks::Column::AttemptCount, i as i32)),
                )
                .await
                .map(|d| (w, d))
            }));
        }
        for task in tasks {
            let (w, d) = task.await.unwrap().unwrap();
            assert!(w.is_some() && d.is_some());
        }
        let seen = checking.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 60);
        let early: Vec<&Event> = seen.iter().filter(|(_, c)| !c).map(|(e, _)| e).collect();
        assert!(
            early.is_empty(),
            "{} events published before commit, the first: {:?}",
            early.len(),
            early.first()
        );
        // Per webhook, VERIFIED was published before DELIVERING.
        for id in &ids {
            let kinds: Vec<&str> = seen
                .iter()
                .filter(|(e, _)| e.webhook_id == *id)
                .map(|(e, _)| e.kind.as_str())
                .collect();
            assert_eq!(kinds, [event_type::VERIFIED, event_type::DELIVERING]);
        }
        let n = events::Entity::find()
            .order_by_asc(events::Column::Id)
            .count(store.db())
            .await
            .unwrap();
        assert_eq!(n, 90);
    }

    async fn rows_are_read_together_each_of_its_own_tenant(db: &TestDb) {
        let store = db.store(bus()).await;
        let a = tenant(&store, "a").await;
        let b = tenant(&store, "b").await;
        let a1 = webhook(&store, &a, Status::Verifying).await;
        let a2 = webhook(&store, &a, Status::Verified).await;
        let b1 = webhook(&store, &b, Status::Verified).await;
        let unknown = WebhookId::generate();
        // b1 asked for as tenant a's: not returned, although tenant b is
        // named too (for b's other webhook).
        let b2 = webhook(&store, &b, Status::Pending).await;
        let keys = [(&a, &a1), (&a, &a2), (&a, &b1), (&b, &b2), (&a, &unknown)];
        let mut got: Vec<String> = store
            .find_webhooks(&keys)
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.id)
            .collect();
        got.sort();
        let mut want = vec![a1.to_string(), a2.to_string(), b2.to_string()];
        want.sort();
        assert_eq!(got, want);
        assert!(store.find_webhooks(&[]).await.unwrap().is_empty());
    }

    /// Polls `cond` (bounded: a hang fails the test instead of blocking).
    async fn wait_until(cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
