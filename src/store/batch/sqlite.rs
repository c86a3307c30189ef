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
//! path's, built by the same code, their multi-row `INSERT`s padded so
//! that one text serves groups of several sizes ([`padded`]). A group with a touch, two writes to
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

    /// Pushes `s`, an `INSERT` of `rows` rows as sea-query builds it,
    /// in the form [`padded`] gives it.
    fn push_rows(&mut self, s: Statement, rows: usize) {
        let (sql, values) = padded(s.sql, s.values.map(|v| v.0).unwrap_or_default(), rows);
        self.push_sql(&sql, values);
    }
}

/// SQLite's limit on a statement's parameters (`SQLITE_MAX_VARIABLE_NUMBER`).
const MAX_PARAMETERS: usize = 32_766;

/// `sql`, an `INSERT INTO t (…) VALUES (…), … [RETURNING …]` of `rows`
/// rows with parameters `values`, as `INSERT INTO t (…) SELECT * FROM
/// (VALUES (…), …) WHERE column1 IS NOT NULL [RETURNING …]`, its `VALUES`
/// padded with rows of NULL to the next power of two, which the filter
/// leaves out.
///
/// sqlx keeps a command prepared under its whole text, and the text of a
/// multi-row `INSERT` varies with its number of rows: unpadded, nearly
/// every group's commands were compiled anew (sqlite3Prepare was 3.5 % of
/// the service's instructions at saturation). Padded, a few texts serve
/// every group size (BENCHMARKS.md, "What limits", item 23). The rows go
/// in in the order given (the `VALUES` are read in order), as
/// `number_events` checks. The filter is not `LIMIT ?`: SQLite compiles a
/// statement again whenever a parameter its plan read changes, and a bound
/// `LIMIT` is read (beyond the 31st parameter, any rebinding counts).
///
/// Left as it is when it cannot be padded: no `VALUES`, values that do not
/// make whole rows, a row whose first value is NULL (the filter would drop
/// it), or more parameters padded than SQLite takes. A single row is
/// padded too (a bucket of one), so that it shares its text with other
/// single rows of other statements' commands.
fn padded(sql: String, mut values: Vec<Value>, rows: usize) -> (String, Vec<Value>) {
    let Some(at) = sql.find(" VALUES (") else {
        return (sql, values);
    };
    let bucket = rows.next_power_of_two();
    let per = values.len() / rows.max(1);
    if rows == 0
        || per == 0
        || per * rows != values.len()
        || bucket * per > MAX_PARAMETERS
        || !values.iter().step_by(per).all(Value::is_some)
    {
        return (sql, values);
    }
    let end = sql.find(" RETURNING ").unwrap_or(sql.len());
    let row = format!("({})", vec!["?"; per].join(", "));
    let mut out = String::with_capacity(sql.len() + bucket * (row.len() + 2) + 48);
    out.push_str(&sql[..at]);
    out.push_str(" SELECT * FROM (VALUES ");
    out.push_str(&vec![row.as_str(); bucket].join(", "));
    out.push_str(") WHERE column1 IS NOT NULL");
    out.push_str(&sql[end..]);
    values.extend(std::iter::repeat_n(Value::Int(None), (bucket - rows) * per));
    (out, values)
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
        let n = inserts.len();
        first.push_rows(
            webhooks::Entity::insert_many(inserts).build(DbBackend::Sqlite),
            n,
        );
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
            let n = new_attempts.len();
            last.push_rows(
                attempts::Entity::insert_many(new_attempts).build(DbBackend::Sqlite),
                n,
            );
        }
        if !new_dead_letters.is_empty() {
            let n = new_dead_letters.len();
            last.push_rows(
                dead_letters::Entity::insert_many(new_dead_letters).build(DbBackend::Sqlite),
                n,
            );
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
        last.push_rows(DbBackend::Sqlite.build(&insert), out.len());
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
    // Prepared and kept in sqlx's statement cache (100 commands) under
    // the command's whole text: its `INSERT`s are padded (see `padded`)
    // so that groups of other sizes find it there.
    Ok(open.run(command.sql, command.values).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::from(s)
    }

    #[test]
    fn an_insert_is_padded_to_the_next_power_of_two() {
        let sql = "INSERT INTO \"e\" (\"a\", \"b\") VALUES (?, ?), (?, ?), (?, ?) \
                   RETURNING \"id\""
            .to_string();
        let values = vec![
            text("1"),
            Value::Int(None),
            text("2"),
            text("x"),
            text("3"),
            text("y"),
        ];
        let (sql, out) = padded(sql, values.clone(), 3);
        assert_eq!(
            sql,
            "INSERT INTO \"e\" (\"a\", \"b\") SELECT * FROM (VALUES (?, ?), (?, ?), (?, ?), \
             (?, ?)) WHERE column1 IS NOT NULL RETURNING \"id\""
        );
        assert_eq!(out[..6], values[..]);
        assert_eq!(out[6..], [Value::Int(None), Value::Int(None)]);
        // Without RETURNING; four rows need no padding, and share the
        // text of three.
        let insert = |rows: usize| {
            let sql = format!(
                "INSERT INTO \"e\" (\"a\") VALUES {}",
                vec!["(?)"; rows].join(", ")
            );
            padded(sql, (0..rows).map(|i| text(&i.to_string())).collect(), rows)
        };
        let (sql, out) = insert(4);
        assert_eq!(
            sql,
            "INSERT INTO \"e\" (\"a\") SELECT * FROM (VALUES (?), (?), (?), (?)) \
             WHERE column1 IS NOT NULL"
        );
        assert_eq!(out.len(), 4);
        assert_eq!(insert(3).0, sql);
        assert_eq!(insert(3).1.len(), 4);
        // Five to eight rows share the next text.
        assert_ne!(insert(5).0, sql);
        assert_eq!(insert(5).0, insert(8).0);
    }

    #[test]
    fn an_insert_that_cannot_be_padded_is_left_as_it_is() {
        let sql = "INSERT INTO \"e\" (\"a\", \"b\") VALUES (?, ?), (?, ?)".to_string();
        let unchanged = |values: Vec<Value>, rows| {
            let (out, got) = padded(sql.clone(), values.clone(), rows);
            assert_eq!((out, got), (sql.clone(), values));
        };
        // A first value NULL: the filter would drop its row.
        unchanged(
            vec![text("1"), text("x"), Value::String(None), text("y")],
            2,
        );
        // Values that are not rows of one width.
        unchanged(vec![text("1"), text("x"), text("2")], 2);
        unchanged(Vec::new(), 0);
        // No VALUES.
        let select = "INSERT INTO \"e\" (\"a\") SELECT ?".to_string();
        assert_eq!(padded(select.clone(), vec![text("1")], 1).0, select);
        // More parameters, padded, than SQLite takes (9,000 rows of 2 are
        // 18,000 parameters; padded to 16,384 rows, 32,768).
        let rows = 9_000;
        let wide = format!(
            "INSERT INTO \"e\" (\"a\", \"b\") VALUES {}",
            vec!["(?, ?)"; rows].join(", ")
        );
        let values: Vec<Value> = (0..rows * 2).map(|_| text("v")).collect();
        assert_eq!(padded(wide.clone(), values, rows).0, wide);
    }
}
