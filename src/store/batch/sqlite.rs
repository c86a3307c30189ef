//! SQLite: a write group in at most two commands to the connection's
//! thread instead of one per statement.
//!
//! sqlx runs a SQLite connection on a thread of its own; every command it
//! sends there (a statement, a `BEGIN`, a `COMMIT`) is a hand-off: that
//! thread wakes, runs it and wakes the task that waits for the answer.
//! Through sea-orm's transaction a group of transitions was five commands
//! (`BEGIN`, the compare-and-sets' `UPDATE`, the attempts' and the events'
//! `INSERT`s, `COMMIT`) and a group of Creates four. Here the group's
//! transaction travels inside its statements, one command carrying
//! several statements (sqlx runs them in order, binding the parameters in
//! order):
//!
//! 1. `BEGIN; [INSERT INTO webhooks …;] UPDATE webhooks … RETURNING *`:
//!    the new webhooks, then the compare-and-sets (one `UPDATE` for the
//!    group, see [`super::multirow`], or the plain one for a transition
//!    beside new webhooks), whose rows say which writes moved; the writes
//!    whose callers want no row (a delivery's outcome) have an `UPDATE` of
//!    their own that returns their ids alone (`[UPDATE … RETURNING *;]
//!    [UPDATE … RETURNING "id"]`);
//! 2. `[INSERT INTO attempts …;] [INSERT INTO dead_letters …;] INSERT INTO
//!    events … RETURNING id, webhook_id; COMMIT`: the rows that record the
//!    writes that moved.
//!
//! A group of Creates only is one command (its events are known
//! beforehand), and so is a lone transition, the usual group below
//! saturation ([`lone`]: its inserts are conditional on its `UPDATE`
//! having moved the row). The two commands' statements are the general
//! path's, built by the same code. A group with a touch, two writes to
//! one webhook, or a transition out of DEAD_LETTER (which closes dead
//! letters between its writes) takes the general path.
//!
//! sqlx does not know of this transaction, so it is ended here: a command
//! that fails leaves it open, and it is rolled back before the connection
//! is used again; so is a group dropped during or between its commands (a
//! cancelled task), by a task spawned for it ([`Open`], in
//! [`crate::store::kept`], which also keeps the connection between uses).

use sea_orm::{
    DbBackend, EntityTrait, QueryResult, QueryTrait, Statement, Value,
    sea_query::{Query, ReturningClause, SqliteQueryBuilder},
    sqlx::{Row, sqlite::SqliteRow},
};
use tracing::error;

use super::{
    Applied, Done, NewEvent, OwnedTransition, Write, events_insert, multirow, number_events,
    update_query,
};
use crate::{
    domain::Status,
    events::Event,
    store::{
        Result, StoreError, attempts, dead_letters, decode,
        kept::{Db, Lease, Open},
        webhooks,
    },
};

/// The statements of one command, and their parameters in order.
#[derive(Default)]
pub(super) struct Command {
    sql: String,
    values: Vec<Value>,
}

impl Command {
    pub(super) fn push_sql(&mut self, sql: &str, values: impl IntoIterator<Item = Value>) {
        if !self.sql.is_empty() {
            self.sql.push_str("; ");
        }
        self.sql.push_str(sql);
        let before = self.values.len();
        self.values.extend(values);
        // sqlx binds the parameters of all the statements in order, and
        // NULL to a `?` left without a value.
        debug_assert_eq!(
            sql.matches('?').count(),
            self.values.len() - before,
            "{sql}"
        );
    }

    fn push(&mut self, s: Statement) {
        self.push_sql(&s.sql, s.values.into_iter().flat_map(|v| v.0));
    }
}

/// Writes the group `writes` (`order`: their indexes in webhook id order,
/// no webhook twice) as described in the module's documentation. `None`
/// when the group needs the general path: nothing was sent then.
pub(super) async fn write(db: &Db, writes: &[Write], order: &[usize]) -> Result<Option<Applied>> {
    let mut rows: Vec<Done> = vec![Done::Stayed; writes.len()];
    let mut new_events: Vec<NewEvent> = Vec::new();
    let mut inserts: Vec<webhooks::ActiveModel> = Vec::new();
    let mut ts: Vec<(usize, &OwnedTransition)> = Vec::new();
    for &i in order {
        match &writes[i] {
            Write::Insert { row, event } => {
                new_events.push((i, *event, Status::Pending, row.created_at));
                rows[i] = Done::Row((**row).clone());
                inserts.push((**row).clone().into());
            }
            Write::Transition(t) if !t.from.contains(&Status::DeadLetter) => ts.push((i, &**t)),
            Write::Transition(_) | Write::Touch { .. } => return Ok(None),
        }
    }
    if let ([(i, t)], true) = (ts.as_slice(), inserts.is_empty()) {
        let open = Open::new(acquire(db).await?);
        return lone(open, *i, t, rows).await.map(Some);
    }
    let mut first = Command::default();
    first.push_sql("BEGIN", []);
    if !inserts.is_empty() {
        first.push(webhooks::Entity::insert_many(inserts).build(DbBackend::Sqlite));
    }
    // By write index: `Some(done)` for each transition once its `UPDATE`
    // ran (`Done::Stayed`: its compare-and-set did not match). A write
    // whose caller wants no row returns its id alone.
    let mut moved: Vec<Option<Done>> = vec![None; writes.len()];
    match ts.as_slice() {
        [] => {}
        [(i, t)] => {
            moved[*i] = Some(Done::Stayed);
            let (sql, values) = update_query(t, returning(t)).build(SqliteQueryBuilder);
            first.push_sql(&sql, values.0);
        }
        _ => {
            let Some((sql, params)) = multirow::update_sqlite(&ts, true, &mut moved) else {
                return Ok(None);
            };
            first.push_sql(&sql, params);
        }
    }
    let mut open = Open::new(acquire(db).await?);
    let mut last = Command::default();
    if !ts.is_empty() {
        let found = match run(&mut open, first).await {
            Ok(found) => found,
            Err(e) => return Err(open.rollback(e).await),
        };
        if let Err(e) = place(found, &ts, &mut moved) {
            return Err(open.rollback(e).await);
        }
        let mut new_attempts: Vec<attempts::ActiveModel> = Vec::new();
        let mut new_dead_letters: Vec<dead_letters::ActiveModel> = Vec::new();
        for &(i, t) in &ts {
            if let Some(done) = moved[i].take()
                && done.moved()
            {
                t.rows_of_move(i, &mut new_events, &mut new_attempts, &mut new_dead_letters);
                rows[i] = done;
            }
        }
        if !new_attempts.is_empty() {
            last.push(attempts::Entity::insert_many(new_attempts).build(DbBackend::Sqlite));
        }
        if !new_dead_letters.is_empty() {
            last.push(dead_letters::Entity::insert_many(new_dead_letters).build(DbBackend::Sqlite));
        }
    } else {
        // Creates only: everything goes in one command.
        last = first;
    }
    let items = Write::event_items(writes, &rows, &new_events);
    let mut events = Vec::new();
    if !items.is_empty() {
        let (insert, out) = match events_insert(&items) {
            Ok(built) => built,
            Err(e) => return Err(open.rollback(e).await),
        };
        last.push(DbBackend::Sqlite.build(&insert));
        events = out;
    }
    last.push_sql("COMMIT", []);
    let found = match run(&mut open, last).await {
        Ok(found) => rows_of(found),
        Err(e) => return Err(open.rollback(e).await),
    };
    // Committed: the connection goes back.
    open.committed();
    let events = numbered(found, events);
    Ok(Some(Applied { rows, events }))
}

/// The store's SQLite connection (see [`crate::store::kept`]).
async fn acquire(db: &Db) -> Result<Lease> {
    match db.sqlite().await {
        Some(lease) => Ok(lease?),
        None => Err(StoreError::Corrupt(
            "a SQLite write group on another database".into(),
        )),
    }
}

/// A lone transition (no new webhook beside it) as ONE command: its
/// compare-and-set, then the rows that record it, each inserted only if
/// the row moved, then `COMMIT`:
///
/// ```sql
/// BEGIN; UPDATE webhooks … RETURNING * (or "id", if the caller wants no row);
/// INSERT INTO events … SELECT ?, … WHERE changes() = 1
///     [UNION ALL SELECT ?, … WHERE changes() = 1] RETURNING id, webhook_id;
/// [INSERT INTO attempts … SELECT ?, … WHERE changes() > 0;]
/// [INSERT INTO dead_letters … SELECT ?, … WHERE changes() > 0;]
/// COMMIT
/// ```
///
/// SQLite's `changes()` is the number of rows the last statement that
/// ended changed: the `UPDATE`'s for the events (whose rows are all
/// known beforehand), then each insert's for the next, which is one or
/// more exactly when the row moved. Below saturation most groups are a
/// lone write (a Confirm, a job's verified or outcome write), so this is
/// most groups' one hand-off. Everything after the command ends is read
/// from rows already committed.
async fn lone(
    mut open: Open,
    i: usize,
    t: &OwnedTransition,
    mut rows: Vec<Done>,
) -> Result<Applied> {
    let mut command = Command::default();
    command.push_sql("BEGIN", []);
    // All of the row, or its id alone: one column, where the events' rows
    // have two.
    let (sql, values) = update_query(t, returning(t)).build(SqliteQueryBuilder);
    command.push_sql(&sql, values.0);
    let kinds: Vec<(&'static str, Status)> = t
        .through
        .iter()
        .map(|&(status, kind)| (kind, status))
        .chain([(t.event, t.to)])
        .collect();
    let mut values: Vec<Value> = Vec::with_capacity(kinds.len() * 5);
    for (kind, status) in &kinds {
        values.extend([
            t.tenant.as_str().into(),
            t.id.as_str().into(),
            (*kind).into(),
            status.as_str().into(),
            t.now.into(),
        ]);
    }
    command.push_sql(
        &format!(
            "INSERT INTO \"events\" (\"tenant_id\", \"webhook_id\", \"type\", \"status\", \
             \"occurred_at\") {} RETURNING \"id\", \"webhook_id\"",
            vec!["SELECT ?, ?, ?, ?, ? WHERE changes() = 1"; kinds.len()].join(" UNION ALL ")
        ),
        values,
    );
    if let Some(a) = &t.attempt {
        command.push_sql(
            "INSERT INTO \"attempts\" (\"webhook_id\", \"number\", \"started_at\", \
             \"duration_ms\", \"response_status\", \"response_body\", \"error\") \
             SELECT ?, ?, ?, ?, ?, ?, ? WHERE changes() > 0",
            [
                t.id.as_str().into(),
                a.number.into(),
                a.started_at.into(),
                a.duration_ms.into(),
                a.response_status.into(),
                a.response_body.clone().into(),
                a.error.clone().into(),
            ],
        );
    }
    if let Some(reason) = &t.dead_letter {
        command.push_sql(
            "INSERT INTO \"dead_letters\" (\"tenant_id\", \"webhook_id\", \"reason\", \
             \"created_at\") SELECT ?, ?, ?, ? WHERE changes() > 0",
            [
                t.tenant.as_str().into(),
                t.id.as_str().into(),
                reason.clone().into(),
                t.now.into(),
            ],
        );
    }
    command.push_sql("COMMIT", []);
    let found = match run(&mut open, command).await {
        Ok(found) => found,
        Err(e) => return Err(open.rollback(e).await),
    };
    // Committed: the connection goes back.
    open.committed();
    // The moved row first (all of the webhook's columns, or its id), then
    // the events' ids (two columns).
    let mut found = found.into_iter().peekable();
    let Some(moved) = found.next_if(|r| r.columns().len() != 2) else {
        if found.peek().is_some() {
            error!(webhook = %t.id, "a lone SQLite write stored events without moving its row");
        }
        return Ok(Applied {
            rows,
            events: Vec::new(),
        });
    };
    // A row that does not decode is stored but cannot be answered: the
    // caller gets the error (and a retry finds the row moved), as when
    // the answer to a committed statement is lost.
    rows[i] = if t.wants_row {
        Done::Row(decode::webhook(&QueryResult::from(moved))?)
    } else {
        Done::Moved
    };
    let events = kinds
        .iter()
        .map(|(kind, status)| t.event(0, kind, *status))
        .collect();
    let events = numbered(rows_of(found.collect()), events);
    Ok(Applied { rows, events })
}

fn rows_of(found: Vec<SqliteRow>) -> Vec<QueryResult> {
    found.into_iter().map(QueryResult::from).collect()
}

/// `events` with the ids a committed group's insert returned (`found`;
/// see [`number_events`]). The group stands whatever this finds: an error
/// now would have each of its writes tried again and found already moved.
fn numbered(found: Vec<QueryResult>, events: Vec<Event>) -> Vec<Event> {
    if events.is_empty() {
        return events;
    }
    number_events(&found, events).unwrap_or_else(|e| {
        error!(
            error = %e,
            "a committed SQLite write group's event ids did not line up; \
             its events are stored but not published to live streams"
        );
        Vec::new()
    })
}

/// What a transition's `UPDATE` returns: all of the row, or, when its
/// caller wants none, its id alone (one column, where a row has all of
/// the table's).
fn returning(t: &OwnedTransition) -> ReturningClause {
    if t.wants_row {
        Query::returning().all()
    } else {
        Query::returning().column(webhooks::Column::Id)
    }
}

/// The rows the compare-and-sets returned, whole or their ids alone (see
/// [`returning`]), put in `moved` at their writes' indexes.
fn place(
    found: Vec<SqliteRow>,
    ts: &[(usize, &OwnedTransition)],
    moved: &mut [Option<Done>],
) -> Result<()> {
    let mut whole = Vec::with_capacity(found.len());
    let mut ids = Vec::new();
    for r in found {
        if r.columns().len() == 1 {
            let id: String = r.try_get(0).map_err(|e| {
                StoreError::Corrupt(format!("the id a compare-and-set returned: {e}"))
            })?;
            ids.push(id);
        } else {
            whole.push(QueryResult::from(r));
        }
    }
    multirow::place_sqlite(&whole, &ids, ts, moved)
}

/// Runs `command` on `open`'s connection.
pub(super) async fn run(open: &mut Open, command: Command) -> Result<Vec<SqliteRow>> {
    // A command's text varies with the number of rows of each of its
    // `INSERT`s, as those statements' texts did alone, and with their
    // combination: more texts share sqlx's statement cache of 100 (a cache
    // of 1,000 measured no different, BENCHMARKS.md, "What limits", item
    // 1).
    Ok(open.run(command.sql, command.values).await?)
}
