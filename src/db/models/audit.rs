//! The audit table: appending chained rows, reading them back in order.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{audit_events, open_downloads};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize, serde::Deserialize)]
#[diesel(table_name = audit_events)]
pub struct AuditRow {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: String,
    pub outcome: String,
    pub actor: Option<String>,
    pub model_id: Option<String>,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A row as written by the appender, borrowing from the event it records.
#[derive(Debug, Clone, Copy, Insertable)]
#[diesel(table_name = audit_events)]
// Every column is written as given, so the statement is the same for every row and stays
// prepared.
#[diesel(treat_none_as_default_value = false)]
pub struct NewRow<'a> {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: &'a str,
    pub outcome: &'a str,
    pub actor: Option<&'a str>,
    pub model_id: Option<&'a str>,
    pub detail: &'a str,
    pub prev_hash: &'a str,
    pub hash: &'a str,
}

impl AuditRow {
    pub fn as_new(&self) -> NewRow<'_> {
        NewRow {
            seq: self.seq,
            ts_ms: self.ts_ms,
            kind: &self.kind,
            outcome: &self.outcome,
            actor: self.actor.as_deref(),
            model_id: self.model_id.as_deref(),
            detail: &self.detail,
            prev_hash: &self.prev_hash,
            hash: &self.hash,
        }
    }
}

/// Serialises appenders across processes and replicas: PostgreSQL takes a transaction-scoped
/// advisory lock; SQLite already holds its single write lock inside `Db::write`.
pub fn lock_chain(conn: &mut AnyConnection) -> Result<()> {
    if let AnyConnection::Postgresql(c) = conn {
        diesel::sql_query(CHAIN_LOCK_SQL).execute(c)?;
    }
    Ok(())
}

/// The statement that takes the chain's lock until the transaction ends (PostgreSQL).
pub const CHAIN_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(7745321)";

/// Where the log continues after rows were archived (kept in `kv`).
const ARCHIVE_BASE: &str = "audit_archived_through";

/// The newest row's sequence number and hash; after an archive that took every row, the
/// archive's last row.
pub fn head(conn: &mut AnyConnection) -> Result<Option<(i64, String)>> {
    // No bound value (`.first()` would bind its LIMIT): SQLite's STAT4 planner prepares a
    // statement with bound values again on every run, this one stays prepared.
    let all = diesel::alias!(audit_events as all_events);
    let newest = audit_events::table
        .filter(
            audit_events::seq.nullable().eq(all
                .select(diesel::dsl::max(all.field(audit_events::seq)))
                .single_value()),
        )
        .select((audit_events::seq, audit_events::hash))
        .get_result(conn)
        .optional()?;
    if newest.is_some() {
        return Ok(newest);
    }
    Ok(super::kv::get(conn, ARCHIVE_BASE)?.and_then(|v| {
        let (seq, hash) = v.split_once(' ')?;
        Some((seq.parse().ok()?, hash.to_string()))
    }))
}

/// Records where the archived part of the log ends.
pub fn set_archive_base(conn: &mut AnyConnection, seq: i64, hash: &str) -> Result<()> {
    super::kv::set(conn, ARCHIVE_BASE, &format!("{seq} {hash}"))
}

/// Rows per PostgreSQL INSERT statement (9 bound values each, far below its limit).
const ROWS_PER_INSERT: usize = 64;

/// Inserts rows. diesel's `MultiConnection` has no multi-row INSERT, so each backend gets
/// its own way:
/// - SQLite: one single-row INSERT per row, through diesel's statement cache, so the
///   statement is prepared once per connection. (diesel never caches a multi-row INSERT
///   built from a `Vec`, and parsing one each batch cost more than stepping a prepared
///   statement per row, which inside one transaction is cheap.)
/// - PostgreSQL: one multi-row statement per `ROWS_PER_INSERT` rows, since each statement
///   is a round trip to the server.
pub fn insert(conn: &mut AnyConnection, rows: &[NewRow<'_>]) -> Result<()> {
    match conn {
        AnyConnection::Sqlite(c) => {
            for row in rows {
                diesel::insert_into(audit_events::table)
                    .values(row)
                    .execute(c)?;
            }
        }
        AnyConnection::Postgresql(c) => {
            for part in rows.chunks(ROWS_PER_INSERT) {
                let sql = insert_sql(part.len());
                bind_rows(diesel::sql_query(sql).into_boxed(), part).execute(c)?;
            }
        }
    }
    Ok(())
}

/// `INSERT INTO audit_events (…) VALUES ($1, …), (…)` for `n` rows.
fn insert_sql(n: usize) -> String {
    use std::fmt::Write;
    let mut sql = String::from(
        "INSERT INTO audit_events (seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash) VALUES ",
    );
    for r in 0..n {
        sql.push_str(if r > 0 { ", (" } else { "(" });
        for c in 0..9 {
            let sep = if c > 0 { ", " } else { "" };
            let _ = write!(sql, "{sep}${}", r * 9 + c + 1);
        }
        sql.push(')');
    }
    sql
}

fn bind_rows<'f>(
    mut q: diesel::query_builder::BoxedSqlQuery<
        'f,
        diesel::pg::Pg,
        diesel::query_builder::SqlQuery,
    >,
    rows: &'f [NewRow<'f>],
) -> diesel::query_builder::BoxedSqlQuery<'f, diesel::pg::Pg, diesel::query_builder::SqlQuery> {
    use diesel::sql_types::{BigInt, Nullable, Text};
    for r in rows {
        q = q
            .bind::<BigInt, _>(r.seq)
            .bind::<BigInt, _>(r.ts_ms)
            .bind::<Text, _>(r.kind)
            .bind::<Text, _>(r.outcome)
            .bind::<Nullable<Text>, _>(r.actor)
            .bind::<Nullable<Text>, _>(r.model_id)
            .bind::<Text, _>(r.detail)
            .bind::<Text, _>(r.prev_hash)
            .bind::<Text, _>(r.hash);
    }
    q
}

/// Up to `limit` rows with `seq > after`, in chain order.
pub fn page(conn: &mut AnyConnection, after: i64, limit: i64) -> Result<Vec<AuditRow>> {
    Ok(audit_events::table
        .filter(audit_events::seq.gt(after))
        .order(audit_events::seq.asc())
        .limit(limit)
        .select(AuditRow::as_select())
        .load(conn)?)
}

pub fn open_download(
    conn: &mut AnyConnection,
    id: &str,
    instance: &str,
    started_ms: i64,
    model: Option<&str>,
    detail: &str,
) -> Result<()> {
    diesel::insert_into(open_downloads::table)
        .values((
            open_downloads::id.eq(id),
            open_downloads::instance.eq(instance),
            open_downloads::started_ms.eq(started_ms),
            open_downloads::model_id.eq(model),
            open_downloads::detail.eq(detail),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn close_download(conn: &mut AnyConnection, id: &str) -> Result<()> {
    diesel::delete(open_downloads::table.find(id)).execute(conn)?;
    Ok(())
}

/// Every download this instance left open: `(id, model, detail of its started event)`.
pub fn open_downloads(
    conn: &mut AnyConnection,
    instance: &str,
) -> Result<Vec<(String, Option<String>, String)>> {
    Ok(open_downloads::table
        .filter(open_downloads::instance.eq(instance))
        .order(open_downloads::started_ms.asc())
        .select((
            open_downloads::id,
            open_downloads::model_id,
            open_downloads::detail,
        ))
        .load(conn)?)
}

pub fn by_seq(conn: &mut AnyConnection, seq: i64) -> Result<Option<AuditRow>> {
    Ok(audit_events::table
        .find(seq)
        .select(AuditRow::as_select())
        .first(conn)
        .optional()?)
}

/// Removes archived rows (only `audit archive` calls this, after the archive is safe).
pub fn delete_through(conn: &mut AnyConnection, seq: i64) -> Result<usize> {
    Ok(diesel::delete(audit_events::table.filter(audit_events::seq.le(seq))).execute(conn)?)
}

/// The newest row at or before a time (for `--before`).
pub fn last_seq_before(conn: &mut AnyConnection, ts_ms: i64) -> Result<Option<i64>> {
    Ok(audit_events::table
        .filter(audit_events::ts_ms.lt(ts_ms))
        .select(diesel::dsl::max(audit_events::seq))
        .first::<Option<i64>>(conn)?)
}

/// Up to `limit` rows after `after`, optionally only from `since_ms` on and for one model.
pub fn page_filtered(
    conn: &mut AnyConnection,
    after: i64,
    limit: i64,
    since_ms: Option<i64>,
    model: Option<&str>,
) -> Result<Vec<AuditRow>> {
    let mut q = audit_events::table
        .filter(audit_events::seq.gt(after))
        .into_boxed();
    if let Some(t) = since_ms {
        q = q.filter(audit_events::ts_ms.ge(t));
    }
    if let Some(m) = model {
        q = q.filter(audit_events::model_id.eq(m.to_string()));
    }
    Ok(q.order(audit_events::seq.asc())
        .limit(limit)
        .select(AuditRow::as_select())
        .load(conn)?)
}

/// Newest first: up to `limit` rows before `before` (exclusive), optionally filtered.
pub fn page_desc(
    conn: &mut AnyConnection,
    before: i64,
    limit: i64,
    kind: Option<&str>,
    model: Option<&str>,
    since_ms: Option<i64>,
) -> Result<Vec<AuditRow>> {
    let mut q = audit_events::table
        .filter(audit_events::seq.lt(before))
        .into_boxed();
    if let Some(k) = kind {
        q = q.filter(audit_events::kind.eq(k.to_string()));
    }
    if let Some(m) = model {
        q = q.filter(audit_events::model_id.eq(m.to_string()));
    }
    if let Some(t) = since_ms {
        q = q.filter(audit_events::ts_ms.ge(t));
    }
    Ok(q.order(audit_events::seq.desc())
        .limit(limit)
        .select(AuditRow::as_select())
        .load(conn)?)
}

/// Completed and partial downloads of a model since a time: `(ts_ms, path, bytes_sent)`.
pub fn downloads_since(
    conn: &mut AnyConnection,
    model: &str,
    since_ms: i64,
) -> Result<Vec<(i64, String)>> {
    Ok(audit_events::table
        .filter(audit_events::model_id.eq(model))
        .filter(audit_events::kind.eq("file_download"))
        .filter(audit_events::outcome.eq_any(["complete", "partial"]))
        .filter(audit_events::ts_ms.ge(since_ms))
        .order(audit_events::seq.asc())
        .limit(500_000)
        .select((audit_events::ts_ms, audit_events::detail))
        .load(conn)?)
}
