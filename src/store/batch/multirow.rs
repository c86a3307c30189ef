//! The compare-and-sets of a write group in one `UPDATE` instead of one per
//! write, on PostgreSQL and SQLite ([`apply`]); on PostgreSQL, for a group
//! of transitions only, that `UPDATE` and the inserts of their events,
//! attempts and dead letters in one statement ([`write_whole`]). The SQL
//! below is PostgreSQL's; SQLite's (`update_sqlite`) reads the same
//! records with `jsonb_each`, sent as SQLite's binary JSON, each an array
//! of its values by position.
//!
//! Each write brings its own values, target status, `from` statuses and
//! optional conditions as one record; a column that some write of the
//! group changes is set, in each row, only where that row's write changes
//! it, as bit `k` of the record's mask `m` says for the group's `k`th
//! column (one field, however many columns the group's writes change
//! between them: read field by field on SQLite, a flag per column was
//! the records' largest part there):
//!
//! ```sql
//! UPDATE webhooks AS w SET status = v.to_status, updated_at = v.now,
//!     size = CASE WHEN (v.m & 1) <> 0 THEN v.c0 ELSE w.size END, …
//! FROM jsonb_to_recordset($1::text::jsonb) AS v (idx int4, id text,
//!     tenant_id text, now timestamptz, to_status text, from_statuses text[],
//!     m int8, c0 int8, …, unchanged_since timestamptz, unexpired_at timestamptz)
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
use serde_json::Value as Json;

use super::{Applied, Done, OwnedTransition};
use crate::store::{Result, StoreError, decode};

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
    Json::String(timestamp_text(t, d))
}

fn timestamp_text(t: chrono::DateTime<chrono::Utc>, d: Dialect) -> String {
    match d {
        Dialect::Postgres => t.to_rfc3339_opts(SecondsFormat::Micros, true),
        // Exactly as sqlx-sqlite encodes a `DateTime`: the column's other
        // values are compared with it as text.
        Dialect::Sqlite => t.to_rfc3339_opts(SecondsFormat::AutoSi, false),
    }
}

/// SQLite's binary JSON (JSONB, SQLite 3.45; <https://sqlite.org/jsonb.html>):
/// each element is a header, its type in the low four bits and its
/// payload's size in the high four (0-11: the size itself; 12, 13, 14:
/// the size follows in 1, 2, 4 bytes, big-endian), then the payload.
mod jsonb {
    pub const NULL: u8 = 0;
    pub const TRUE: u8 = 1;
    pub const FALSE: u8 = 2;
    /// An integer, its payload in decimal ASCII digits.
    pub const INT: u8 = 3;
    /// Text that SQLite escapes itself wherever it writes it as JSON.
    pub const TEXT_RAW: u8 = 10;
    pub const ARRAY: u8 = 11;

    /// An element whose payload is `payload`, with the smallest header.
    pub fn element(out: &mut Vec<u8>, ty: u8, payload: &[u8]) {
        header(out, ty, payload.len());
        out.extend_from_slice(payload);
    }

    /// The smallest header of an element of type `ty` whose payload, `n`
    /// bytes, the caller writes next.
    pub fn header(out: &mut Vec<u8>, ty: u8, n: usize) {
        if n <= 11 {
            out.push((n as u8) << 4 | ty);
        } else if let Ok(n) = u8::try_from(n) {
            out.extend_from_slice(&[12 << 4 | ty, n]);
        } else if let Ok(n) = u16::try_from(n) {
            out.push(13 << 4 | ty);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            out.push(14 << 4 | ty);
            // Payloads here are far below 4 GiB (SQLite's own limit is 2).
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }

    /// Opens a container: a header with a four-byte size (a header may be
    /// larger than needed), filled in by [`close`]. Returns where it is.
    pub fn open(out: &mut Vec<u8>) -> usize {
        let at = out.len();
        out.extend_from_slice(&[0; 5]);
        at
    }

    /// Closes the container opened at `at` as a `ty`.
    pub fn close(out: &mut [u8], at: usize, ty: u8) {
        let size = (out.len() - at - 5) as u32;
        out[at] = 14 << 4 | ty;
        out[at + 1..at + 5].copy_from_slice(&size.to_be_bytes());
    }
}

/// One record of [`records`], written into the group's JSON, opened by
/// [`Record::new`], closed by [`Record::close`]: as text, an object (for
/// PostgreSQL), or as JSONB, an array of the same values by position, the
/// keys left out (for SQLite, see [`update_sqlite_one`]).
struct Record<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    /// JSONB: where the array begins; `None`: text.
    jsonb: Option<usize>,
}

impl<'a> Record<'a> {
    fn new(out: &'a mut Vec<u8>, jsonb: bool) -> Self {
        let jsonb = if jsonb {
            Some(jsonb::open(out))
        } else {
            out.push(b'{');
            None
        };
        Record {
            out,
            first: true,
            jsonb,
        }
    }

    fn close(self) {
        match self.jsonb {
            Some(at) => jsonb::close(self.out, at, jsonb::ARRAY),
            None => self.out.push(b'}'),
        }
    }

    /// A comma before every key but the first.
    fn separate(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
    }

    /// `"name":` (JSONB: nothing, the value's position says it).
    fn key(&mut self, name: &str) {
        if self.jsonb.is_some() {
            return;
        }
        self.separate();
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// `"c3":`, the key of the group's `k`th changed column.
    fn column(&mut self, k: usize) {
        if self.jsonb.is_some() {
            return;
        }
        self.separate();
        self.out.extend_from_slice(b"\"c");
        self.out
            .extend_from_slice(itoa::Buffer::new().format(k).as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn null(&mut self) {
        match self.jsonb {
            Some(_) => self.out.push(jsonb::NULL),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    fn integer(&mut self, n: i64) {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(n);
        match self.jsonb {
            Some(_) => jsonb::element(self.out, jsonb::INT, digits.as_bytes()),
            None => self.out.extend_from_slice(digits.as_bytes()),
        }
    }

    /// A JSON string, escaped as serde_json escapes it (JSONB: as it is).
    fn string(&mut self, s: &str) {
        if self.jsonb.is_some() {
            return jsonb::element(self.out, jsonb::TEXT_RAW, s.as_bytes());
        }
        // Writing to a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, s);
    }

    fn text(&mut self, name: &str, s: &str) {
        self.key(name);
        self.string(s);
    }

    fn optional_text(&mut self, name: &str, s: Option<&str>) {
        self.key(name);
        match s {
            Some(s) => self.string(s),
            None => self.null(),
        }
    }

    fn number(&mut self, name: &str, n: i64) {
        self.key(name);
        self.integer(n);
    }

    fn time(&mut self, name: &str, t: chrono::DateTime<chrono::Utc>, d: Dialect) {
        self.key(name);
        self.string(&timestamp_text(t, d));
    }

    /// An encoded value; `None` if it cannot be written: serde_json
    /// refusing it, or, as JSONB, a number that is not an `i64` or an
    /// array or object (neither happens: [`encode`] makes only strings,
    /// integers, booleans and null).
    fn value(&mut self, v: &Json) -> Option<()> {
        if self.jsonb.is_none() {
            return serde_json::to_writer(&mut *self.out, v).ok();
        }
        match v {
            Json::Null => self.null(),
            Json::Bool(b) => self.out.push(if *b { jsonb::TRUE } else { jsonb::FALSE }),
            Json::Number(n) => self.integer(n.as_i64()?),
            Json::String(s) => self.string(s),
            Json::Array(_) | Json::Object(_) => return None,
        }
        Some(())
    }
}

/// The records of a group's writes (see the module's documentation), and
/// what the statement needs to know of them.
struct Records {
    /// Every column some write changes, sorted, with its SQL type.
    columns: Vec<(&'static str, &'static str)>,
    /// The records, a JSON array: as text, or, for SQLite, as JSONB.
    json: Vec<u8>,
    unchanged_since: bool,
    unexpired_at: bool,
    attempts: bool,
    dead_letters: bool,
}

/// Each write of `ts` as one JSON record; `None` when some value cannot be
/// encoded. `out` gets `Some(Done::Stayed)` at each write's index (given,
/// not yet moved). With `whole`, each record also carries its events,
/// attempt and dead letter.
fn records(
    ts: &[(usize, &OwnedTransition)],
    whole: bool,
    d: Dialect,
    out: &mut [Option<Done>],
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
    // A bit of the mask per column (an `int8`, whose sign bit stays clear).
    if columns.len() > 62 {
        return None;
    }
    let unchanged_since = ts.iter().any(|(_, t)| t.unchanged_since.is_some());
    let unexpired_at = ts.iter().any(|(_, t)| t.unexpired_at.is_some());
    let attempts = whole && ts.iter().any(|(_, t)| t.attempt.is_some());
    let dead_letters = whole && ts.iter().any(|(_, t)| t.dead_letter.is_some());

    // The records written as JSON text directly: a `Map` per record (a
    // B-tree of allocated keys) then its `Display` cost more than the
    // statement's execution on SQLite (BENCHMARKS.md, session 28).
    // SQLite: JSONB, which it reads without parsing text, each record an
    // array read by position (BENCHMARKS.md, "What limits", item 24).
    let binary = d == Dialect::Sqlite;
    if binary && whole {
        return None;
    }
    let mut json = Vec::with_capacity(64 + ts.len() * (160 + 24 * columns.len()));
    let array = if binary {
        jsonb::open(&mut json)
    } else {
        json.push(b'[');
        0
    };
    for (n, ((i, t), mut changes)) in ts.iter().zip(encoded).enumerate() {
        out[*i] = Some(Done::Stayed);
        if n > 0 && !binary {
            json.push(b',');
        }
        let mut r = Record::new(&mut json, binary);
        r.number("idx", *i as i64);
        r.text("id", t.id.as_str());
        r.text("tenant_id", t.tenant.as_str());
        r.time("now", t.now, d);
        r.text("to_status", t.to.as_str());
        r.key("from_statuses");
        match d {
            Dialect::Postgres => {
                r.out.push(b'[');
                for (k, s) in t.from.iter().enumerate() {
                    if k > 0 {
                        r.out.push(b',');
                    }
                    r.string(s.as_str());
                }
                r.out.push(b']');
            }
            // One text, `,verified,verifying,`, that SQLite searches for
            // `,status,` (a `json_each` per record cost more than
            // everything else it reads of the record).
            // Always JSONB (see `binary`): a text whose header holds its
            // length, counted first.
            Dialect::Sqlite => {
                let n = 1 + t.from.iter().map(|s| s.as_str().len() + 1).sum::<usize>();
                jsonb::header(r.out, jsonb::TEXT_RAW, n);
                r.out.push(b',');
                for s in &t.from {
                    r.out.extend_from_slice(s.as_str().as_bytes());
                    r.out.push(b',');
                }
            }
        }
        let mask = columns
            .iter()
            .enumerate()
            .filter(|(_, (col, _))| changes.iter().any(|(c, _)| c == col))
            .fold(0_i64, |m, (k, _)| m | 1 << k);
        r.number("m", mask);
        // By position (JSONB), a value absent from a record is a null;
        // as text, the key is left out.
        for (k, (col, _)) in columns.iter().enumerate() {
            if let Some(at) = changes.iter().position(|(c, _)| c == col) {
                let value = changes.swap_remove(at).1;
                r.column(k);
                r.value(&value)?;
            } else if binary {
                r.null();
            }
        }
        for (name, at, any) in [
            ("unchanged_since", t.unchanged_since, unchanged_since),
            ("unexpired_at", t.unexpired_at, unexpired_at),
        ] {
            match at {
                Some(at) => r.time(name, at, d),
                None if binary && any => r.null(),
                None => {}
            }
        }
        if whole {
            r.text("ev_kind", t.event);
            if let Some((status, kind)) = t.through {
                r.text("th_kind", kind);
                r.text("th_status", status.as_str());
            }
        }
        if let (true, Some(a)) = (attempts, &t.attempt) {
            r.number("a_number", i64::from(a.number));
            r.time("a_started_at", a.started_at, d);
            r.number("a_duration_ms", a.duration_ms);
            r.key("a_status");
            match a.response_status {
                Some(s) => r.integer(i64::from(s)),
                None => r.null(),
            }
            r.optional_text("a_body", a.response_body.as_deref());
            r.optional_text("a_error", a.error.as_deref());
        }
        if let (true, Some(reason)) = (dead_letters, &t.dead_letter) {
            r.text("dl_reason", reason);
        }
        r.close();
    }
    if binary {
        jsonb::close(&mut json, array, jsonb::ARRAY);
    } else {
        json.push(b']');
    }
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
/// some value cannot be encoded. `out` gets `Some(Done::Stayed)` at each
/// write's index.
pub(super) fn update(
    ts: &[(usize, &OwnedTransition)],
    whole: bool,
    out: &mut [Option<Done>],
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
    record.push_str(", m int8");
    for (k, (col, ty)) in columns.iter().enumerate() {
        // Column names are the entity's own, plain identifiers.
        set.push_str(&format!(
            ", \"{col}\" = CASE WHEN (v.m & {}) <> 0 THEN v.c{k} ELSE w.\"{col}\" END",
            1_i64 << k
        ));
        record.push_str(&format!(", c{k} {ty}"));
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
    // Text: keys are ASCII and serde_json writes valid UTF-8.
    let records = String::from_utf8(records).ok()?;
    Some((sql, [Value::from(records), Value::from(ids)]))
}

/// SQLite: the group's compare-and-sets as one `UPDATE … FROM` over the
/// records (one JSON parameter, read with `jsonb_each`, whose `value` is
/// binary JSON: with `json_each` it was text, parsed again for each field
/// read from it, 10 % of the embedded process's CPU). The parameter is
/// JSONB itself, built here (SQLite no longer parses a text), each record
/// an array read by position (`value ->> 3`: an object's keys were
/// compared one by one for each field read); together about 3 % of the
/// embedded process's instructions at saturation (BENCHMARKS.md, "What
/// limits", item 24). `RETURNING` the
/// moved rows (found by id: SQLite's `RETURNING` may not name the
/// records). Each row moves only where its own id, tenant, `from` statuses
/// (one text between commas, which no status holds) and conditions match,
/// as on PostgreSQL; SQLite looks each record's row up in the primary key.
///
/// With `split`, the writes whose callers want no row (a delivery's
/// outcome) get an `UPDATE` of their own that returns only their ids, one
/// column where a whole row has all of the table's (`sqlite::place` tells
/// them apart by that): SQLite building, sqlx copying and the store
/// decoding the outcomes' whole rows were 8 % of the embedded process's
/// instructions at saturation (BENCHMARKS.md, "What limits", item 21).
/// The statements are returned as one text, their parameters in order.
/// `None` when some value cannot be encoded.
pub(super) fn update_sqlite(
    ts: &[(usize, &OwnedTransition)],
    split: bool,
    out: &mut [Option<Done>],
) -> Option<(String, Vec<Value>)> {
    if !split || ts.iter().all(|(_, t)| t.wants_row) {
        let (sql, param) = update_sqlite_one(ts, "*", out)?;
        return Some((sql, vec![param]));
    }
    let (rows, ids): (Vec<_>, Vec<_>) = ts.iter().partition(|(_, t)| t.wants_row);
    let mut sql = String::new();
    let mut params = Vec::with_capacity(2);
    for (part, returning) in [(rows, "*"), (ids, "\"id\"")] {
        if part.is_empty() {
            continue;
        }
        let (one, param) = update_sqlite_one(&part, returning, out)?;
        if !sql.is_empty() {
            sql.push_str("; ");
        }
        sql.push_str(&one);
        params.push(param);
    }
    Some((sql, params))
}

/// One `UPDATE` of [`update_sqlite`], for the writes `ts`, returning
/// `returning`.
fn update_sqlite_one(
    ts: &[(usize, &OwnedTransition)],
    returning: &str,
    out: &mut [Option<Done>],
) -> Option<(String, Value)> {
    let r = records(ts, false, Dialect::Sqlite, out)?;
    let mut set = String::from("\"status\" = v.to_status, \"updated_at\" = v.now");
    // Each record's values by position (see `records`; 0 is its write's
    // index, which SQLite's `RETURNING` cannot name).
    let mut fields = String::from(
        "value ->> 1 AS id, value ->> 2 AS tenant_id, value ->> 3 AS now, \
         value ->> 4 AS to_status, value ->> 5 AS from_statuses, value ->> 6 AS m",
    );
    let mut at = 6;
    let mut field = |fields: &mut String, name: &str| {
        at += 1;
        fields.push_str(&format!(", value ->> {at} AS {name}"));
    };
    for (k, (col, _)) in r.columns.iter().enumerate() {
        // Column names are the entity's own, plain identifiers.
        set.push_str(&format!(
            ", \"{col}\" = CASE WHEN (v.m & {}) <> 0 THEN v.c{k} ELSE w.\"{col}\" END",
            1_i64 << k
        ));
        field(&mut fields, &format!("c{k}"));
    }
    let mut filter = String::from(
        "w.\"id\" = v.id AND w.\"tenant_id\" = v.tenant_id \
         AND instr(v.from_statuses, ',' || w.\"status\" || ',') > 0",
    );
    if r.unchanged_since {
        field(&mut fields, "unchanged_since");
        filter
            .push_str(" AND (v.unchanged_since IS NULL OR w.\"updated_at\" <= v.unchanged_since)");
    }
    if r.unexpired_at {
        field(&mut fields, "unexpired_at");
        filter.push_str(" AND (v.unexpired_at IS NULL OR w.\"expires_at\" > v.unexpired_at)");
    }
    let sql = format!(
        "UPDATE \"webhooks\" AS w SET {set} \
         FROM (SELECT {fields} FROM jsonb_each(?)) AS v WHERE {filter} RETURNING {returning}"
    );
    Some((sql, Value::Bytes(Some(r.json))))
}

/// The write index of a row the statement returned, checked against the
/// writes it was given (each at most once).
fn slot<'a>(r: &QueryResult, out: &'a mut [Option<Done>]) -> Result<(usize, &'a mut Option<Done>)> {
    let i = usize::try_from(r.try_get::<i32>("", "uh_write")?).ok();
    match i.and_then(|i| out.get_mut(i).map(|s| (i, s))) {
        Some((i, slot @ Some(Done::Stayed))) => Ok((i, slot)),
        _ => Err(StoreError::Corrupt(
            "a multi-row update returned a write it was not given, or twice".into(),
        )),
    }
}

/// What SQLite's `UPDATE`s from [`update_sqlite`] returned: the whole
/// rows (`found`) and the ids of the moved rows returned without theirs
/// (`moved`), each put in `out` at its write's index (each write of `ts`
/// at most once).
pub(super) fn place_sqlite(
    found: &[QueryResult],
    moved: &[String],
    ts: &[(usize, &OwnedTransition)],
    out: &mut [Option<Done>],
) -> Result<()> {
    for r in found {
        let row = decode::webhook(r)?;
        let slot = given(ts, out, &row.id)?;
        *slot = Some(Done::Row(row));
    }
    for id in moved {
        *given(ts, out, id)? = Some(Done::Moved);
    }
    Ok(())
}

/// The slot in `out` of the write of `ts` to webhook `id`, if it was given
/// and not yet answered.
fn given<'a>(
    ts: &[(usize, &OwnedTransition)],
    out: &'a mut [Option<Done>],
    id: &str,
) -> Result<&'a mut Option<Done>> {
    let at = ts.binary_search_by(|(_, t)| t.id.as_str().cmp(id)).ok();
    match at.and_then(|at| out.get_mut(ts[at].0)) {
        Some(slot @ Some(Done::Stayed)) => Ok(slot),
        _ => Err(StoreError::Corrupt(
            "a multi-row update returned a webhook it was not given, or twice".into(),
        )),
    }
}

/// Applies the compare-and-sets of `ts` (write index below `writes`,
/// transition; webhook ids all different, in id order as `write_group`
/// lists them) in one statement, for the general path. Returns, by write
/// index, `Some(done)` for each write given (`Done::Row`, whether its
/// caller wants the row or not, or `Done::Stayed`: its compare-and-set
/// did not match) and `None` for the others. `None` when some value
/// cannot be encoded: nothing was written then.
pub(super) async fn apply(
    txn: &impl ConnectionTrait,
    ts: &[(usize, &OwnedTransition)],
    writes: usize,
) -> Result<Option<Vec<Option<Done>>>> {
    let mut out: Vec<Option<Done>> = vec![None; writes];
    if txn.get_database_backend() == sea_orm::DatabaseBackend::Sqlite {
        // Whole rows for every write: only `sqlite::place`, which sees
        // sqlx's rows, tells an id alone from a row.
        let Some((sql, params)) = update_sqlite(ts, false, &mut out) else {
            return Ok(None);
        };
        let found = txn
            .query_all_raw(Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Sqlite,
                sql,
                params,
            ))
            .await?;
        place_sqlite(&found, &[], ts, &mut out)?;
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
        *slot = Some(Done::Row(decode::webhook(r)?));
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
/// When no write of the group wants its row back (a group of delivery
/// outcomes), the last `SELECT` takes `u.uh_write` instead of `u.*`: the
/// rows are neither sent nor decoded. In a group where some do, every row
/// is sent and only the wanted ones decoded (a column each as `CASE WHEN
/// wanted …` would cost PostgreSQL a branch per column of every row).
///
/// `None` when some value cannot be encoded: nothing was written then.
pub(super) async fn write_whole(
    pg: &mut super::Pg<'_>,
    ts: &[(usize, &OwnedTransition)],
) -> Result<Option<Applied>> {
    let mut out: Vec<Option<Done>> = vec![None; ts.len()];
    // A delivery's outcome wants no row; its claim, often in the same
    // group, does.
    let rows = ts.iter().any(|(_, t)| t.wants_row);
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
    sql.push_str(if rows {
        " SELECT u.*,"
    } else {
        " SELECT u.uh_write,"
    });
    sql.push_str(
        " ids.uh_event_ids FROM u LEFT JOIN \
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
                t.id,
                ids.len(),
                kinds.count()
            )));
        }
        for (id, (kind, status)) in ids.into_iter().zip(kinds) {
            events.push(t.event(id, kind, status));
        }
        *slot = Some(if t.wants_row {
            Done::Row(decode::webhook(r)?)
        } else {
            Done::Moved
        });
    }
    events.sort_unstable_by_key(|e| e.id);
    Ok(Some(Applied {
        rows: out.into_iter().map(|o| o.unwrap_or(Done::Stayed)).collect(),
        events,
    }))
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;
    use crate::{
        domain::{Status, TenantId, WebhookId, event_type},
        store::{Changes, NewAttempt, Transition, webhooks::Column as C},
    };

    /// Three writes of one group: through a status, with changes, an
    /// attempt and a dead letter, and one column of the three.
    fn three() -> [OwnedTransition; 3] {
        let (tenant, a, b, c) = (
            TenantId::from_trusted("t_1".into()),
            WebhookId::from_trusted("wh_a".into()),
            WebhookId::from_trusted("wh_b".into()),
            WebhookId::from_trusted("wh_c".into()),
        );
        let at = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 123_456_000).unwrap();
        let first: OwnedTransition = Transition::new(
            &tenant,
            &a,
            &[Status::Verified, Status::Verifying],
            Status::Delivering,
            event_type::DELIVERING,
            at(0),
        )
        .through(Status::Verified, event_type::VERIFIED)
        .unchanged_since(Some(at(1)))
        .into();
        let second: OwnedTransition = Transition::new(
            &tenant,
            &b,
            &[Status::Delivering],
            Status::Retrying,
            event_type::RETRYING,
            at(2),
        )
        .changes(
            Changes::new()
                .set(C::LastError, Some("a \"quoted\" \\ é\n\u{1}".to_string()))
                .set(C::AttemptCount, 3)
                .set(C::CompletedAt, None::<chrono::DateTime<Utc>>),
        )
        .attempt(NewAttempt {
            number: 3,
            started_at: at(3),
            duration_ms: 12,
            response_status: None,
            response_body: Some("<h1>\"no\"</h1>".into()),
            error: None,
        })
        .dead_letter_opt(Some("gave up: \"x\"".into()))
        .into();
        // One column of the group's three: bit 2 alone.
        let third: OwnedTransition = Transition::new(
            &tenant,
            &c,
            &[Status::Delivering],
            Status::Completed,
            event_type::DELIVERED,
            at(4),
        )
        .changes(Changes::new().set(C::LastError, None::<String>))
        .into();
        [first, second, third]
    }

    /// SQLite's records are JSONB that SQLite itself finds well formed:
    /// arrays of each write's values by position, the group's every
    /// column and condition present in each (null where absent), texts as
    /// they are, times as sqlx writes them.
    #[tokio::test]
    async fn sqlite_records_are_jsonb_arrays_by_position() {
        use sea_orm::sqlx::{Connection, sqlite::SqliteConnection};

        let [first, second, third] = three();
        let ts = [(1, &first), (0, &second), (2, &third)];
        let mut out = vec![None; 3];
        let r = records(&ts, false, Dialect::Sqlite, &mut out).unwrap();
        assert_eq!(out, vec![Some(Done::Stayed); 3]);
        assert!(r.unchanged_since && !r.unexpired_at);
        assert!(records(&ts, true, Dialect::Sqlite, &mut out).is_none());
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        // 8: strictly well-formed JSONB.
        let (valid, text): (i64, String) =
            sea_orm::sqlx::query_as("SELECT json_valid(?1, 8), json(?1)")
                .bind(&r.json)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(valid, 1);
        let t = |s: u32| json!(format!("2023-11-14T22:13:2{s}.123456+00:00"));
        // idx, id, tenant, now, to, from, mask, the columns attempt_count,
        // completed_at and last_error, then unchanged_since.
        assert_eq!(
            serde_json::from_str::<Json>(&text).unwrap(),
            json!([
                [
                    1,
                    "wh_a",
                    "t_1",
                    t(0),
                    "delivering",
                    ",verified,verifying,",
                    0,
                    null,
                    null,
                    null,
                    t(1)
                ],
                [
                    0,
                    "wh_b",
                    "t_1",
                    t(2),
                    "retrying",
                    ",delivering,",
                    7,
                    3,
                    null,
                    "a \"quoted\" \\ é\n\u{1}",
                    null
                ],
                [
                    2,
                    "wh_c",
                    "t_1",
                    t(4),
                    "completed",
                    ",delivering,",
                    4,
                    null,
                    null,
                    null,
                    null
                ],
            ])
        );
        // What the statement reads by position is what was written.
        let (id, last_error, m): (String, String, i64) = sea_orm::sqlx::query_as(
            "SELECT value ->> 1, value ->> 9, value ->> 6 FROM jsonb_each(?) WHERE key = 1",
        )
        .bind(&r.json)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            (id.as_str(), last_error.as_str(), m),
            ("wh_b", "a \"quoted\" \\ é\n\u{1}", 7)
        );
        // Each size of header: payloads of 0-11 bytes, under 256, under
        // 65,536 and beyond.
        for n in [0, 11, 12, 255, 256, 65_535, 65_536, 70_000] {
            let text = "x".repeat(n);
            let mut blob = Vec::new();
            let at = jsonb::open(&mut blob);
            jsonb::element(&mut blob, jsonb::TEXT_RAW, text.as_bytes());
            jsonb::element(&mut blob, jsonb::INT, b"-12");
            jsonb::close(&mut blob, at, jsonb::ARRAY);
            let (valid, back, int): (i64, String, i64) =
                sea_orm::sqlx::query_as("SELECT json_valid(?1, 8), ?1 ->> 0, ?1 ->> 1")
                    .bind(&blob)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            assert_eq!((valid, back.len(), int), (1, n, -12), "{n}");
        }
    }

    /// What SQLite's `UPDATE` reads of each record, by the positions
    /// `update_sqlite_one` gives its fields, is each write's own values,
    /// for each combination of the two conditions, with an integer, a
    /// time, a text and a boolean changed.
    #[tokio::test]
    async fn sqlite_update_reads_each_field_where_the_records_put_it() {
        use sea_orm::sqlx::{Connection, Row, sqlite::SqliteConnection};

        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let tenant = TenantId::from_trusted("t_1".into());
        let (a, b) = (
            WebhookId::from_trusted("wh_a".into()),
            WebhookId::from_trusted("wh_b".into()),
        );
        let at = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 123_456_000).unwrap();
        let text = |s: i64| Some(timestamp_text(at(s), Dialect::Sqlite));
        for (since, unexpired) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut first = Transition::new(
                &tenant,
                &a,
                &[Status::Delivering],
                Status::Retrying,
                event_type::RETRYING,
                at(0),
            )
            .changes(
                Changes::new()
                    .set(C::AttemptCount, 3)
                    .set(C::SecretGenerated, true),
            );
            if since {
                first = first.unchanged_since(Some(at(1)));
            }
            let mut second = Transition::new(
                &tenant,
                &b,
                &[Status::Pending, Status::Verifying],
                Status::Verified,
                event_type::VERIFIED,
                at(2),
            )
            .changes(
                Changes::new()
                    .set(C::LastError, Some("e".to_string()))
                    .set(C::CompletedAt, Some(at(3))),
            );
            if unexpired {
                second = second.unexpired_at(at(4));
            }
            let (first, second): (OwnedTransition, OwnedTransition) = (first.into(), second.into());
            let ts = [(0, &first), (1, &second)];
            let mut out = vec![None; 2];
            let (sql, params) = update_sqlite_one(&ts, "*", &mut out).unwrap();
            let Value::Bytes(Some(records)) = &params else {
                panic!("{params:?}");
            };
            // The statement's own fields, read over its own records.
            let from = sql.find("FROM (SELECT ").unwrap() + "FROM (SELECT ".len();
            let fields = &sql[from..sql.find(" FROM jsonb_each(?)").unwrap()];
            let select = format!("SELECT {fields} FROM jsonb_each(?)");
            let rows = sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(select))
                .bind(records)
                .fetch_all(&mut conn)
                .await
                .unwrap();
            let texts = |name: &str| -> Vec<Option<String>> {
                rows.iter().map(|r| r.try_get(name).unwrap()).collect()
            };
            let ints = |name: &str| -> Vec<Option<i64>> {
                rows.iter().map(|r| r.try_get(name).unwrap()).collect()
            };
            let given = (since, unexpired);
            assert_eq!(
                texts("id"),
                [Some("wh_a".into()), Some("wh_b".into())],
                "{given:?}"
            );
            assert_eq!(texts("tenant_id"), [Some("t_1".into()), Some("t_1".into())]);
            assert_eq!(texts("now"), [text(0), text(2)]);
            assert_eq!(
                texts("to_status"),
                [Some("retrying".into()), Some("verified".into())]
            );
            assert_eq!(
                texts("from_statuses"),
                [
                    Some(",delivering,".into()),
                    Some(",pending,verifying,".into())
                ]
            );
            // Columns in sorted order: attempt_count, completed_at,
            // last_error, secret_generated.
            assert_eq!(ints("m"), [Some(0b1001), Some(0b0110)], "{given:?}");
            assert_eq!(ints("c0"), [Some(3), None]);
            assert_eq!(texts("c1"), [None, text(3)]);
            assert_eq!(texts("c2"), [None, Some("e".into())]);
            assert_eq!(ints("c3"), [Some(1), None]);
            assert_eq!(sql.contains("unchanged_since"), since);
            assert_eq!(sql.contains("unexpired_at"), unexpired);
            if since {
                assert_eq!(texts("unchanged_since"), [text(1), None], "{given:?}");
            }
            if unexpired {
                assert_eq!(texts("unexpired_at"), [None, text(4)], "{given:?}");
            }
        }
    }

    /// The records written directly as JSON text are what the old
    /// `serde_json::Value` records were: every key, each value escaped
    /// (quotes, backslashes, control characters, non-ASCII), the changed
    /// columns numbered in sorted order, nulls where a value is absent.
    #[test]
    fn records_are_the_json_of_each_write() {
        let [first, second, third] = three();
        let ts = [(1, &first), (0, &second), (2, &third)];
        {
            let (time, from) = (
                "2023-11-14T22:13:2{}.123456Z",
                [json!(["verified", "verifying"]), json!(["delivering"])],
            );
            let t = |s: u32| json!(time.replace("{}", &s.to_string()));
            let mut out = vec![None; 3];
            let r = records(&ts, true, Dialect::Postgres, &mut out).unwrap();
            assert_eq!(out, vec![Some(Done::Stayed); 3]);
            assert_eq!(
                r.columns,
                [
                    ("attempt_count", "int4"),
                    ("completed_at", "timestamptz"),
                    ("last_error", "text")
                ]
            );
            let parsed: Json = serde_json::from_slice(&r.json).unwrap();
            assert_eq!(
                parsed,
                json!([
                    {
                        "idx": 1, "id": "wh_a", "tenant_id": "t_1", "now": t(0),
                        "to_status": "delivering", "from_statuses": from[0],
                        "m": 0,
                        "unchanged_since": t(1), "ev_kind": event_type::DELIVERING,
                        "th_kind": event_type::VERIFIED, "th_status": "verified",
                    },
                    {
                        "idx": 0, "id": "wh_b", "tenant_id": "t_1", "now": t(2),
                        "to_status": "retrying", "from_statuses": from[1],
                        "m": 7, "c0": 3, "c1": null, "c2": "a \"quoted\" \\ é\n\u{1}",
                        "ev_kind": event_type::RETRYING,
                        "a_number": 3, "a_started_at": t(3), "a_duration_ms": 12,
                        "a_status": null, "a_body": "<h1>\"no\"</h1>", "a_error": null,
                        "dl_reason": "gave up: \"x\"",
                    },
                    {
                        "idx": 2, "id": "wh_c", "tenant_id": "t_1", "now": t(4),
                        "to_status": "completed", "from_statuses": from[1],
                        "m": 4, "c2": null, "ev_kind": event_type::DELIVERED,
                    },
                ])
            );
            assert!(r.unchanged_since && !r.unexpired_at && r.attempts && r.dead_letters);
        }
    }
}
