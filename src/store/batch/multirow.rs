//! The compare-and-sets of a write group in one `UPDATE` instead of one per
//! write, on PostgreSQL and SQLite ([`apply`]); on PostgreSQL, for a group
//! of transitions only, that `UPDATE` and the inserts of their events,
//! attempts and dead letters in one statement ([`write_whole`]). The SQL
//! below is PostgreSQL's; SQLite's (`update_sqlite`) reads the same
//! records with `jsonb_each`.
//!
//! Each write brings its own values, target status, `from` statuses and
//! optional conditions as one record; a column that some write of the
//! group changes is set, in each row, only where that row's write changes
//! it:
//!
//! ```sql
//! UPDATE webhooks AS w SET status = v.to_status, updated_at = v.now,
//!     size = CASE WHEN v.s0 THEN v.c0 ELSE w.size END, …
//! FROM jsonb_to_recordset($1::text::jsonb) AS v (idx int4, id text,
//!     tenant_id text, now timestamptz, to_status text, from_statuses text[],
//!     s0 bool, c0 int8, …, unchanged_since timestamptz, unexpired_at timestamptz)
//! WHERE w.id = ANY (string_to_array($2, ','))
//!   AND w.id = v.id AND w.tenant_id = v.tenant_id AND w.status = ANY (v.from_statuses)
//!   [AND (v.unchanged_since IS NULL OR w.updated_at <= v.unchanged_since)]
//!   [AND (v.unexpired_at IS NULL OR w.expires_at > v.unexpired_at)]
//! RETURNING v.idx AS uh_write, w.*
//! ```
//!
//! The values travel as one JSON array, so the statement's text depends
//! only on which columns the group changes (sorted) and which conditions
//! it uses, a handful of variants that stay prepared on the connection (a
//! `VALUES` list would make a new statement for each group size; measured
//! slower). Each row still moves only if its own compare-and-set holds,
//! scoped by its tenant.
//!
//! The ids also travel as a second parameter, `$2` (comma-separated; a
//! webhook id is `wh_` and 32 hex digits), for the `w.id = ANY (…)` condition. It
//! says nothing the join does not, but it is what the planner needs:
//! PostgreSQL guesses that a `jsonb_to_recordset` yields 100 rows, and
//! below some tens of thousands of webhooks it then joined them by
//! scanning the whole table (a group of 2 cost 1.4 ms for 6,000 rows, and
//! 9 ms on average once updates had left their dead row versions there,
//! measured). With the ids as an array it looks them up in the primary
//! key, whatever the table's size (0.35 ms).
//!
//! One statement for the whole group also takes the group's row locks in
//! one order: the records (listed in webhook id order) are joined to the
//! rows found through the primary key, locking in id order. That makes a
//! deadlock between two groups sharing webhooks unlikely, not impossible:
//! a group's touches are written after this statement, and another plan
//! may lock in another order. (One statement per kind of write, as
//! before, locked each kind's rows in order but the kinds one after the
//! other.)
//!
//! Used only for groups without two writes to one webhook (one statement
//! cannot update a row twice) and without a dead letter to close (that
//! needs its own statement between the writes); the caller falls back to
//! one `UPDATE` per write otherwise, or for a value this encoding does not
//! know.

use chrono::SecondsFormat;
use sea_orm::{ConnectionTrait, IdenStatic, QueryResult, Statement, Value};
use serde_json::{Map, Value as Json};

use super::{Applied, OwnedTransition};
use crate::store::{Result, StoreError, Webhook, decode, event_on};

/// The database a statement is written for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    /// SQLite has `UPDATE … FROM` (3.33) and `RETURNING` (3.35), but its
    /// `RETURNING` may not name the `FROM` side, and it stores times as
    /// text (compared as text, in the form sqlx writes them).
    Sqlite,
}

/// The SQL type (PostgreSQL's name) and JSON form of a value, if this
/// encoding knows it.
fn encode(v: &Value, d: Dialect) -> Option<(&'static str, Json)> {
    Some(match v {
        Value::String(s) => ("text", s.clone().map_or(Json::Null, Json::String)),
        Value::BigInt(n) => ("int8", n.map_or(Json::Null, Json::from)),
        Value::Int(n) => ("int4", n.map_or(Json::Null, Json::from)),
        Value::Bool(b) => ("bool", b.map_or(Json::Null, Json::Bool)),
        Value::ChronoDateTimeUtc(t) => ("timestamptz", t.map_or(Json::Null, |t| timestamp(t, d))),
        _ => return None,
    })
}

fn timestamp(t: chrono::DateTime<chrono::Utc>, d: Dialect) -> Json {
    Json::String(match d {
        Dialect::Postgres => t.to_rfc3339_opts(SecondsFormat::Micros, true),
        // Exactly as sqlx-sqlite encodes a `DateTime`: the column's other
        // values are compared with it as text.
        Dialect::Sqlite => t.to_rfc3339_opts(SecondsFormat::AutoSi, false),
    })
}

/// The records of a group's writes (see the module's documentation), and
/// what the statement needs to know of them.
struct Records {
    /// Every column some write changes, sorted, with its SQL type.
    columns: Vec<(&'static str, &'static str)>,
    json: Vec<Json>,
    unchanged_since: bool,
    unexpired_at: bool,
    attempts: bool,
    dead_letters: bool,
}

/// Each write of `ts` as one JSON record; `None` when some value cannot be
/// encoded. `out` gets `Some(None)` at each write's index. With `whole`,
/// each record also carries its events, attempt and dead letter.
fn records(
    ts: &[(usize, &OwnedTransition)],
    whole: bool,
    d: Dialect,
    out: &mut [Option<Option<Webhook>>],
) -> Option<Records> {
    debug_assert!(
        ts.windows(2)
            .all(|p| p[0].1.id.as_str() < p[1].1.id.as_str())
    );
    // Every column some write changes, with its SQL type (one per column),
    // and each write's changes encoded once.
    let mut columns: Vec<(&'static str, &'static str)> = Vec::new();
    let mut encoded: Vec<Vec<(&'static str, Json)>> = Vec::with_capacity(ts.len());
    for (_, t) in ts {
        let mut changes = Vec::with_capacity(t.changes.0.len());
        for (col, v) in &t.changes.0 {
            let (ty, json) = encode(v, d)?;
            match columns.iter().find(|(c, _)| *c == col.as_str()) {
                Some((_, known)) if *known != ty => return None,
                Some(_) => {}
                None => columns.push((col.as_str(), ty)),
            }
            changes.push((col.as_str(), json));
        }
        encoded.push(changes);
    }
    columns.sort_unstable();
    let unchanged_since = ts.iter().any(|(_, t)| t.unchanged_since.is_some());
    let unexpired_at = ts.iter().any(|(_, t)| t.unexpired_at.is_some());
    let attempts = whole && ts.iter().any(|(_, t)| t.attempt.is_some());
    let dead_letters = whole && ts.iter().any(|(_, t)| t.dead_letter.is_some());

    let text = |s: &str| Json::String(s.to_string());
    let json: Vec<Json> = ts
        .iter()
        .zip(encoded)
        .map(|((i, t), mut changes)| {
            out[*i] = Some(None);
            let mut r = Map::new();
            r.insert("idx".into(), Json::from(*i));
            r.insert("id".into(), text(t.id.as_str()));
            r.insert("tenant_id".into(), text(t.tenant.as_str()));
            r.insert("now".into(), timestamp(t.now, d));
            r.insert("to_status".into(), text(t.to.as_str()));
            r.insert(
                "from_statuses".into(),
                Json::Array(t.from.iter().map(|s| text(s.as_str())).collect()),
            );
            for (k, (col, _)) in columns.iter().enumerate() {
                let change = changes.iter().position(|(c, _)| c == col);
                r.insert(format!("s{k}"), Json::Bool(change.is_some()));
                if let Some(at) = change {
                    r.insert(format!("c{k}"), changes.swap_remove(at).1);
                }
            }
            if let Some(at) = t.unchanged_since {
                r.insert("unchanged_since".into(), timestamp(at, d));
            }
            if let Some(at) = t.unexpired_at {
                r.insert("unexpired_at".into(), timestamp(at, d));
            }
            if whole {
                r.insert("ev_kind".into(), text(t.event));
                if let Some((status, kind)) = t.through {
                    r.insert("th_kind".into(), text(kind));
                    r.insert("th_status".into(), text(status.as_str()));
                }
            }
            if let (true, Some(a)) = (attempts, &t.attempt) {
                r.insert("a_number".into(), Json::from(a.number));
                r.insert("a_started_at".into(), timestamp(a.started_at, d));
                r.insert("a_duration_ms".into(), Json::from(a.duration_ms));
                r.insert(
                    "a_status".into(),
                    a.response_status.map_or(Json::Null, Json::from),
                );
                r.insert(
                    "a_body".into(),
                    a.response_body.as_deref().map_or(Json::Null, text),
                );
                r.insert(
                    "a_error".into(),
                    a.error.as_deref().map_or(Json::Null, text),
                );
            }
            if let (true, Some(reason)) = (dead_letters, &t.dead_letter) {
                r.insert("dl_reason".into(), text(reason));
            }
            Json::Object(r)
        })
        .collect();
    Some(Records {
        columns,
        json,
        unchanged_since,
        unexpired_at,
        attempts,
        dead_letters,
    })
}

/// The group's `UPDATE … RETURNING v.idx AS uh_write, [extra,] w.*` and
/// its two parameters: the records as JSON text, and their webhook ids
/// separated by commas. With `whole`, each record
/// also carries its events, attempt and dead letter, returned as `uh_…`
/// columns for the inserts that follow in [`write_whole`]. `None` when
/// some value cannot be encoded. `out` gets `Some(None)` at each write's
/// index.
pub(super) fn update(
    ts: &[(usize, &OwnedTransition)],
    whole: bool,
    out: &mut [Option<Option<Webhook>>],
) -> Option<(String, [Value; 2])> {
    let Records {
        columns,
        json: records,
        unchanged_since,
        unexpired_at,
        attempts,
        dead_letters,
    } = records(ts, whole, Dialect::Postgres, out)?;
    let mut set = String::from("\"status\" = v.to_status, \"updated_at\" = v.now");
    let mut record = String::from(
        "idx int4, id text, tenant_id text, now timestamptz, to_status text, from_statuses text[]",
    );
    for (k, (col, ty)) in columns.iter().enumerate() {
        // Column names are the entity's own, plain identifiers.
        set.push_str(&format!(
            ", \"{col}\" = CASE WHEN v.s{k} THEN v.c{k} ELSE w.\"{col}\" END"
        ));
        record.push_str(&format!(", s{k} bool, c{k} {ty}"));
    }
    let mut filter = String::from(
        "w.\"id\" = ANY (string_to_array($2, ',')) AND w.\"id\" = v.id \
         AND w.\"tenant_id\" = v.tenant_id AND w.\"status\" = ANY (v.from_statuses)",
    );
    if unchanged_since {
        record.push_str(", unchanged_since timestamptz");
        filter
            .push_str(" AND (v.unchanged_since IS NULL OR w.\"updated_at\" <= v.unchanged_since)");
    }
    if unexpired_at {
        record.push_str(", unexpired_at timestamptz");
        filter.push_str(" AND (v.unexpired_at IS NULL OR w.\"expires_at\" > v.unexpired_at)");
    }
    let mut returning = String::from("v.idx AS uh_write");
    if whole {
        record.push_str(", ev_kind text, th_kind text, th_status text");
        returning.push_str(
            ", v.ev_kind AS uh_ev_kind, v.th_kind AS uh_th_kind, v.th_status AS uh_th_status",
        );
    }
    if attempts {
        record.push_str(
            ", a_number int4, a_started_at timestamptz, a_duration_ms int8, a_status int4, \
             a_body text, a_error text",
        );
        returning.push_str(
            ", v.a_number AS uh_a_number, v.a_started_at AS uh_a_started_at, \
             v.a_duration_ms AS uh_a_duration_ms, v.a_status AS uh_a_status, \
             v.a_body AS uh_a_body, v.a_error AS uh_a_error",
        );
    }
    if dead_letters {
        record.push_str(", dl_reason text");
        returning.push_str(", v.dl_reason AS uh_dl_reason");
    }
    let sql = format!(
        "UPDATE \"webhooks\" AS w SET {set} \
         FROM jsonb_to_recordset($1::text::jsonb) AS v ({record}) \
         WHERE {filter} RETURNING {returning}, w.*"
    );
    let ids = ts
        .iter()
        .map(|(_, t)| t.id.as_str())
        .collect::<Vec<_>>()
        .join(",");
    Some((
        sql,
        [
            Value::from(Json::Array(records).to_string()),
            Value::from(ids),
        ],
    ))
}

/// SQLite: the group's compare-and-sets as one `UPDATE … FROM` over the
/// records (one JSON parameter, read with `jsonb_each`, whose `value` is
/// binary JSON: with `json_each` it was text, parsed again for each field
/// read from it, 10 % of the embedded process's CPU), `RETURNING` the
/// moved rows (found by id: SQLite's `RETURNING` may not name the
/// records). Each row moves only where its own id, tenant, `from` statuses
/// and conditions match, as on PostgreSQL; SQLite looks each record's row
/// up in the primary key. `None` when some value cannot be encoded.
pub(super) fn update_sqlite(
    ts: &[(usize, &OwnedTransition)],
    out: &mut [Option<Option<Webhook>>],
) -> Option<(String, Value)> {
    let r = records(ts, false, Dialect::Sqlite, out)?;
    let mut set = String::from("\"status\" = v.to_status, \"updated_at\" = v.now");
    let mut fields = String::from(
        "value ->> 'id' AS id, value ->> 'tenant_id' AS tenant_id, value ->> 'now' AS now, \
         value ->> 'to_status' AS to_status, value -> 'from_statuses' AS from_statuses",
    );
    for (k, (col, _)) in r.columns.iter().enumerate() {
        // Column names are the entity's own, plain identifiers.
        set.push_str(&format!(
            ", \"{col}\" = CASE WHEN v.s{k} THEN v.c{k} ELSE w.\"{col}\" END"
        ));
        fields.push_str(&format!(
            ", value ->> 's{k}' AS s{k}, value ->> 'c{k}' AS c{k}"
        ));
    }
    let mut filter = String::from(
        "w.\"id\" = v.id AND w.\"tenant_id\" = v.tenant_id \
         AND w.\"status\" IN (SELECT value FROM json_each(v.from_statuses))",
    );
    if r.unchanged_since {
        fields.push_str(", value ->> 'unchanged_since' AS unchanged_since");
        filter
            .push_str(" AND (v.unchanged_since IS NULL OR w.\"updated_at\" <= v.unchanged_since)");
    }
    if r.unexpired_at {
        fields.push_str(", value ->> 'unexpired_at' AS unexpired_at");
        filter.push_str(" AND (v.unexpired_at IS NULL OR w.\"expires_at\" > v.unexpired_at)");
    }
    let sql = format!(
        "UPDATE \"webhooks\" AS w SET {set} \
         FROM (SELECT {fields} FROM jsonb_each(?)) AS v WHERE {filter} RETURNING *"
    );
    Some((sql, Value::from(Json::Array(r.json).to_string())))
}

/// The write index of a row the statement returned, checked against the
/// writes it was given (each at most once).
fn slot<'a>(
    r: &QueryResult,
    out: &'a mut [Option<Option<Webhook>>],
) -> Result<(usize, &'a mut Option<Option<Webhook>>)> {
    let i = usize::try_from(r.try_get::<i32>("", "uh_write")?).ok();
    match i.and_then(|i| out.get_mut(i).map(|s| (i, s))) {
        Some((i, slot @ Some(None))) => Ok((i, slot)),
        _ => Err(StoreError::Corrupt(
            "a multi-row update returned a write it was not given, or twice".into(),
        )),
    }
}

/// The rows SQLite's `UPDATE` from [`update_sqlite`] returned (`found`),
/// each put in `out` at its write's index (each write of `ts` at most once).
pub(super) fn place_sqlite(
    found: &[QueryResult],
    ts: &[(usize, &OwnedTransition)],
    out: &mut [Option<Option<Webhook>>],
) -> Result<()> {
    for r in found {
        let row = decode::webhook(r)?;
        let at = ts
            .binary_search_by(|(_, t)| t.id.as_str().cmp(row.id.as_str()))
            .ok();
        match at.and_then(|at| out.get_mut(ts[at].0)) {
            Some(slot @ Some(None)) => *slot = Some(Some(row)),
            _ => {
                return Err(StoreError::Corrupt(
                    "a multi-row update returned a webhook it was not given, or twice".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Applies the compare-and-sets of `ts` (write index below `writes`,
/// transition; webhook ids all different, in id order as `write_group`
/// lists them) in one statement. Returns, by
/// write index, `Some(row)` for each write given (`row` `None`: its
/// compare-and-set did not match) and `None` for the others. `None` when
/// some value cannot be encoded: nothing was written then.
pub(super) async fn apply(
    txn: &impl ConnectionTrait,
    ts: &[(usize, &OwnedTransition)],
    writes: usize,
) -> Result<Option<Vec<Option<Option<Webhook>>>>> {
    let mut out: Vec<Option<Option<Webhook>>> = vec![None; writes];
    if txn.get_database_backend() == sea_orm::DatabaseBackend::Sqlite {
        let Some((sql, param)) = update_sqlite(ts, &mut out) else {
            return Ok(None);
        };
        let found = txn
            .query_all_raw(Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Sqlite,
                sql,
                [param],
            ))
            .await?;
        place_sqlite(&found, ts, &mut out)?;
        return Ok(Some(out));
    }
    let Some((sql, params)) = update(ts, false, &mut out) else {
        return Ok(None);
    };
    let found = txn
        .query_all_raw(Statement::from_sql_and_values(
            sea_orm::DatabaseBackend::Postgres,
            sql,
            params,
        ))
        .await?;
    for r in &found {
        let (_, slot) = slot(r, &mut out)?;
        *slot = Some(Some(decode::webhook(r)?));
    }
    Ok(Some(out))
}

/// A whole group of two or more transitions (`ts`: every write of the
/// group, webhook ids all different, in id order; none leaves
/// DEAD_LETTER, which closes dead letters) in ONE statement, so one round trip and no
/// `BEGIN` / `COMMIT`, and just as atomic: the multi-row `UPDATE` in a
/// CTE, and from its `RETURNING`, in data-modifying CTEs, the events (in
/// webhook id order, a write's `through` event first, so their serial ids
/// follow that order), the attempts and the dead letters it opens:
///
/// ```sql
/// WITH u AS (UPDATE … RETURNING v.idx AS uh_write, v.ev_kind AS uh_ev_kind, …, w.*),
/// e AS (INSERT INTO events … SELECT … FROM u, LATERAL (VALUES (0, through), (1, event))
///       … ORDER BY u.id, ord RETURNING id, webhook_id),
/// a AS (INSERT INTO attempts … FROM u WHERE u.uh_a_number IS NOT NULL),
/// d AS (INSERT INTO dead_letters … FROM u WHERE u.uh_dl_reason IS NOT NULL)
/// SELECT u.*, ids.uh_event_ids FROM u LEFT JOIN (ids of e by webhook) ids …
/// ```
///
/// `None` when some value cannot be encoded: nothing was written then.
pub(super) async fn write_whole(
    pg: &mut super::Pg<'_>,
    ts: &[(usize, &OwnedTransition)],
) -> Result<Option<Applied>> {
    let mut out: Vec<Option<Option<Webhook>>> = vec![None; ts.len()];
    let Some((update, params)) = update(ts, true, &mut out) else {
        return Ok(None);
    };
    let mut sql = format!(
        "WITH u AS ({update}), \
         e AS (INSERT INTO \"events\" (\"tenant_id\", \"webhook_id\", \"type\", \"status\", \"occurred_at\") \
         SELECT u.\"tenant_id\", u.\"id\", x.kind, x.status, u.\"updated_at\" \
         FROM u CROSS JOIN LATERAL (VALUES (0, u.uh_th_kind, u.uh_th_status), \
         (1, u.uh_ev_kind, u.\"status\")) AS x (ord, kind, status) \
         WHERE x.kind IS NOT NULL ORDER BY u.\"id\", x.ord RETURNING \"id\", \"webhook_id\")"
    );
    if ts.iter().any(|(_, t)| t.attempt.is_some()) {
        sql.push_str(
            ", a AS (INSERT INTO \"attempts\" (\"webhook_id\", \"number\", \"started_at\", \
             \"duration_ms\", \"response_status\", \"response_body\", \"error\") \
             SELECT u.\"id\", u.uh_a_number, u.uh_a_started_at, u.uh_a_duration_ms, \
             u.uh_a_status, u.uh_a_body, u.uh_a_error FROM u WHERE u.uh_a_number IS NOT NULL)",
        );
    }
    if ts.iter().any(|(_, t)| t.dead_letter.is_some()) {
        sql.push_str(
            ", d AS (INSERT INTO \"dead_letters\" (\"tenant_id\", \"webhook_id\", \"reason\", \
             \"created_at\") SELECT u.\"tenant_id\", u.\"id\", u.uh_dl_reason, u.\"updated_at\" \
             FROM u WHERE u.uh_dl_reason IS NOT NULL)",
        );
    }
    sql.push_str(
        " SELECT u.*, ids.uh_event_ids FROM u LEFT JOIN \
         (SELECT \"webhook_id\", array_to_string(array_agg(\"id\" ORDER BY \"id\"), ',') AS uh_event_ids \
         FROM e GROUP BY \"webhook_id\") AS ids ON ids.\"webhook_id\" = u.\"id\"",
    );
    let found = pg
        .query_all(Statement::from_sql_and_values(
            sea_orm::DatabaseBackend::Postgres,
            sql,
            params,
        ))
        .await?;
    // Where each write index is in `ts`.
    let mut position = vec![0; ts.len()];
    for (p, (i, _)) in ts.iter().enumerate() {
        position[*i] = p;
    }
    let mut events = Vec::with_capacity(found.len() * 2);
    for r in &found {
        let (i, slot) = slot(r, &mut out)?;
        let row = decode::webhook(r)?;
        let t = ts[position[i]].1;
        let ids: String = r.try_get("", "uh_event_ids")?;
        let ids = ids
            .split(',')
            .map(|id| id.parse::<i64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("event ids of a group: {e}")))?;
        let kinds = t
            .through
            .iter()
            .map(|&(s, k)| (k, s))
            .chain([(t.event, t.to)]);
        if ids.len() != kinds.clone().count() {
            return Err(StoreError::Corrupt(format!(
                "webhook {} got {} events in its group, not {}",
                row.id,
                ids.len(),
                kinds.count()
            )));
        }
        for (id, (kind, status)) in ids.into_iter().zip(kinds) {
            events.push(event_on(&row, id, kind, status, t.now));
        }
        *slot = Some(Some(row));
    }
    events.sort_unstable_by_key(|e| e.id);
    Ok(Some(Applied {
        rows: out.into_iter().map(Option::flatten).collect(),
        events,
    }))
}
