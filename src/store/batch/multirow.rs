//! PostgreSQL: the compare-and-sets of a write group in one `UPDATE`
//! instead of one per write.
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
//! WHERE w.id = v.id AND w.tenant_id = v.tenant_id AND w.status = ANY (v.from_statuses)
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
//! One statement for the whole group also takes the group's row locks in
//! one order: on a large table PostgreSQL joins from the records (listed
//! in webhook id order) into the primary key, locking in id order; on a
//! small one (a few thousand rows) it scans the table whole, locking in
//! the table's physical order, the same for every statement of this form.
//! That makes a deadlock between two groups sharing webhooks unlikely, not
//! impossible: a group's touches are written after this statement, and a
//! group written one `UPDATE` per write locks in id order while a scan
//! locks in physical order. (One statement per kind of write, as before,
//! locked each kind's rows in order but the kinds one after the other.)
//!
//! Used only for groups without two writes to one webhook (one statement
//! cannot update a row twice) and without a dead letter to close (that
//! needs its own statement between the writes); the caller falls back to
//! one `UPDATE` per write otherwise, or for a value this encoding does not
//! know.

use chrono::SecondsFormat;
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, FromQueryResult, IdenStatic, Statement, Value,
};
use serde_json::{Map, Value as Json};

use super::OwnedTransition;
use crate::store::{Result, StoreError, Webhook};

/// The SQL type and JSON form of a value, if this encoding knows it.
fn encode(v: &Value) -> Option<(&'static str, Json)> {
    Some(match v {
        Value::String(s) => ("text", s.clone().map_or(Json::Null, Json::String)),
        Value::BigInt(n) => ("int8", n.map_or(Json::Null, Json::from)),
        Value::Int(n) => ("int4", n.map_or(Json::Null, Json::from)),
        Value::Bool(b) => ("bool", b.map_or(Json::Null, Json::Bool)),
        Value::ChronoDateTimeUtc(t) => ("timestamptz", t.map_or(Json::Null, timestamp)),
        _ => return None,
    })
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Json {
    Json::String(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Applies the compare-and-sets of `ts` (write index below `writes`,
/// transition; webhook ids all different, in id order as `write_group`
/// lists them) in one statement. Returns, by
/// write index, `Some(row)` for each write given (`row` `None`: its
/// compare-and-set did not match) and `None` for the others. `None` when
/// some value cannot be encoded: nothing was written then.
pub(super) async fn apply(
    txn: &DatabaseTransaction,
    ts: &[(usize, &OwnedTransition)],
    writes: usize,
) -> Result<Option<Vec<Option<Option<Webhook>>>>> {
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
            let Some((ty, json)) = encode(v) else {
                return Ok(None);
            };
            match columns.iter().find(|(c, _)| *c == col.as_str()) {
                Some((_, known)) if *known != ty => return Ok(None),
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

    let mut out: Vec<Option<Option<Webhook>>> = vec![None; writes];
    let records: Vec<Json> = ts
        .iter()
        .zip(encoded)
        .map(|((i, t), mut changes)| {
            out[*i] = Some(None);
            let mut r = Map::new();
            r.insert("idx".into(), Json::from(*i));
            r.insert("id".into(), Json::String(t.id.as_str().to_string()));
            r.insert(
                "tenant_id".into(),
                Json::String(t.tenant.as_str().to_string()),
            );
            r.insert("now".into(), timestamp(t.now));
            r.insert("to_status".into(), Json::String(t.to.as_str().into()));
            r.insert(
                "from_statuses".into(),
                Json::Array(
                    t.from
                        .iter()
                        .map(|s| Json::String(s.as_str().into()))
                        .collect(),
                ),
            );
            for (k, (col, _)) in columns.iter().enumerate() {
                let change = changes.iter().position(|(c, _)| c == col);
                r.insert(format!("s{k}"), Json::Bool(change.is_some()));
                if let Some(at) = change {
                    r.insert(format!("c{k}"), changes.swap_remove(at).1);
                }
            }
            if let Some(at) = t.unchanged_since {
                r.insert("unchanged_since".into(), timestamp(at));
            }
            if let Some(at) = t.unexpired_at {
                r.insert("unexpired_at".into(), timestamp(at));
            }
            Json::Object(r)
        })
        .collect();

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
        "w.\"id\" = v.id AND w.\"tenant_id\" = v.tenant_id AND w.\"status\" = ANY (v.from_statuses)",
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
    let sql = format!(
        "UPDATE \"webhooks\" AS w SET {set} \
         FROM jsonb_to_recordset($1::text::jsonb) AS v ({record}) \
         WHERE {filter} RETURNING v.idx AS uh_write, w.*"
    );
    let found = txn
        .query_all_raw(Statement::from_sql_and_values(
            sea_orm::DatabaseBackend::Postgres,
            sql,
            [Value::from(Json::Array(records).to_string())],
        ))
        .await?;
    for r in &found {
        let slot = usize::try_from(r.try_get::<i32>("", "uh_write")?)
            .ok()
            .and_then(|i| out.get_mut(i));
        match slot {
            Some(slot @ Some(None)) => *slot = Some(Some(Webhook::from_query_result(r, "")?)),
            _ => {
                return Err(StoreError::Corrupt(
                    "a multi-row update returned a write it was not given, or twice".into(),
                ));
            }
        }
    }
    Ok(Some(out))
}
