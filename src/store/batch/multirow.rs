//! PostgreSQL: the compare-and-sets of a write group, one `UPDATE` per
//! shape instead of one per write.
//!
//! Writes of one shape (same `from` statuses, same target status, same
//! changed columns, same optional conditions) differ only in their values,
//! so they go in one statement:
//!
//! ```sql
//! UPDATE webhooks AS w SET status = $2, updated_at = v.now, size = v.c0, …
//! FROM jsonb_to_recordset($1::jsonb) AS v (idx int4, id text, tenant_id text,
//!                                         now timestamptz, c0 int8, …)
//! WHERE w.id = v.id AND w.tenant_id = v.tenant_id AND w.status IN ($3, …)
//!   [AND w.updated_at <= v.unchanged_since] [AND w.expires_at > v.unexpired_at]
//! RETURNING v.idx AS uh_write, w.*
//! ```
//!
//! The values travel as one JSON array, so the statement's text depends on
//! the shape only and stays prepared on the connection (a `VALUES` list
//! would make a new statement for each group size; measured slower). Each
//! row still moves only if its own compare-and-set holds, scoped by its
//! tenant. The rows of a statement are listed in webhook id order.
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
        Value::ChronoDateTimeUtc(t) => (
            "timestamptz",
            t.map_or(Json::Null, |t| {
                Json::String(t.to_rfc3339_opts(SecondsFormat::Micros, true))
            }),
        ),
        _ => return None,
    })
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Json {
    Json::String(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// What makes two transitions one statement.
#[derive(PartialEq)]
struct Shape {
    from: Vec<&'static str>,
    to: &'static str,
    /// Column name, SQL type.
    columns: Vec<(&'static str, &'static str)>,
    unchanged_since: bool,
    unexpired_at: bool,
}

fn shape_of(t: &OwnedTransition) -> Option<Shape> {
    let mut columns = Vec::with_capacity(t.changes.0.len());
    for (col, v) in &t.changes.0 {
        columns.push((col.as_str(), encode(v)?.0));
    }
    Some(Shape {
        from: t.from.iter().map(|s| s.as_str()).collect(),
        to: t.to.as_str(),
        columns,
        unchanged_since: t.unchanged_since.is_some(),
        unexpired_at: t.unexpired_at.is_some(),
    })
}

/// Applies the compare-and-sets of `ts` (write index below `writes`,
/// transition; webhook ids all different), one statement per shape, in
/// webhook id order within each. Returns, by write index, `Some(row)` for
/// each write given (`row` `None`: its compare-and-set did not match) and
/// `None` for the others. `None` when some value cannot be encoded:
/// nothing was written then.
pub(super) async fn apply(
    txn: &DatabaseTransaction,
    ts: &[(usize, &OwnedTransition)],
    writes: usize,
) -> Result<Option<Vec<Option<Option<Webhook>>>>> {
    let mut shapes: Vec<(Shape, Vec<(usize, &OwnedTransition)>)> = Vec::new();
    for &(i, t) in ts {
        let Some(shape) = shape_of(t) else {
            return Ok(None);
        };
        match shapes.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, members)) => members.push((i, t)),
            None => shapes.push((shape, vec![(i, t)])),
        }
    }
    let mut out: Vec<Option<Option<Webhook>>> = vec![None; writes];
    for (shape, mut members) in shapes {
        for (i, _) in &members {
            out[*i] = Some(None);
        }
        members.sort_by(|a, b| a.1.id.as_str().cmp(b.1.id.as_str()));
        let records: Vec<Json> = members
            .iter()
            .map(|(i, t)| {
                let mut r = Map::new();
                r.insert("idx".into(), Json::from(*i));
                r.insert("id".into(), Json::String(t.id.as_str().to_string()));
                r.insert(
                    "tenant_id".into(),
                    Json::String(t.tenant.as_str().to_string()),
                );
                r.insert("now".into(), timestamp(t.now));
                for (k, (_, v)) in t.changes.0.iter().enumerate() {
                    let (_, json) = encode(v).expect("encoded when shaped");
                    r.insert(format!("c{k}"), json);
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
        let mut values: Vec<Value> = vec![Json::Array(records).to_string().into(), shape.to.into()];
        let mut set = String::from("\"status\" = $2, \"updated_at\" = v.now");
        let mut record = String::from("idx int4, id text, tenant_id text, now timestamptz");
        for (k, (col, ty)) in shape.columns.iter().enumerate() {
            // Column names are the entity's own, plain identifiers.
            set.push_str(&format!(", \"{col}\" = v.c{k}"));
            record.push_str(&format!(", c{k} {ty}"));
        }
        let mut filter = String::from("w.\"id\" = v.id AND w.\"tenant_id\" = v.tenant_id");
        let from: Vec<String> = shape
            .from
            .iter()
            .map(|s| {
                values.push((*s).into());
                format!("${}", values.len())
            })
            .collect();
        filter.push_str(&format!(" AND w.\"status\" IN ({})", from.join(", ")));
        if shape.unchanged_since {
            record.push_str(", unchanged_since timestamptz");
            filter.push_str(" AND w.\"updated_at\" <= v.unchanged_since");
        }
        if shape.unexpired_at {
            record.push_str(", unexpired_at timestamptz");
            filter.push_str(" AND w.\"expires_at\" > v.unexpired_at");
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
                values,
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
    }
    Ok(Some(out))
}
