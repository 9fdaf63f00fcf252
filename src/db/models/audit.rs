//! The audit table: appending chained rows, reading them back in order.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{audit_events, open_downloads};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize, serde::Deserialize)]
#[diesel(table_name = audit_events)]
// Every column is written as given, so SQLite's batch insert is one multi-row statement
// rather than one INSERT per row.
#[diesel(treat_none_as_default_value = false)]
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

/// Serialises appenders across processes and replicas: PostgreSQL takes a transaction-scoped
/// advisory lock; SQLite already holds its single write lock inside `Db::write`.
pub fn lock_chain(conn: &mut AnyConnection) -> Result<()> {
    if let AnyConnection::Postgresql(c) = conn {
        diesel::sql_query("SELECT pg_advisory_xact_lock(7745321)").execute(c)?;
    }
    Ok(())
}

/// Where the log continues after rows were archived (kept in `kv`).
const ARCHIVE_BASE: &str = "audit_archived_through";

/// The newest row's sequence number and hash; after an archive that took every row, the
/// archive's last row.
pub fn head(conn: &mut AnyConnection) -> Result<Option<(i64, String)>> {
    let newest = audit_events::table
        .order(audit_events::seq.desc())
        .select((audit_events::seq, audit_events::hash))
        .first(conn)
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

/// Rows per INSERT statement (9 bound values each, far below either backend's limit).
const ROWS_PER_INSERT: usize = 64;

/// Inserts rows with one multi-row statement per `ROWS_PER_INSERT` (a batch of downloads is
/// then a few statements, not one per event). diesel's `MultiConnection` has no multi-row
/// INSERT, so each backend gets its own: SQLite diesel's batch insert on the inner
/// connection, whose prepared statement is cached per row count (a boxed `sql_query` is
/// parsed again every time, which was 15 % of the audit writer's time); PostgreSQL a boxed
/// query with its own placeholders (one round trip matters more there than parsing).
pub fn insert(conn: &mut AnyConnection, rows: &[AuditRow]) -> Result<()> {
    for part in rows.chunks(ROWS_PER_INSERT) {
        match conn {
            AnyConnection::Sqlite(c) => {
                diesel::insert_into(audit_events::table)
                    .values(part)
                    .execute(c)?;
            }
            AnyConnection::Postgresql(c) => {
                let sql = insert_sql(part.len(), |i| format!("${}", i + 1));
                bind_rows(diesel::sql_query(sql).into_boxed(), part).execute(c)?;
            }
        }
    }
    Ok(())
}

/// `INSERT INTO audit_events (…) VALUES (…), (…)` for `n` rows; `mark(i)` is the i-th
/// placeholder.
fn insert_sql(n: usize, mark: impl Fn(usize) -> String) -> String {
    let mut sql = String::from(
        "INSERT INTO audit_events (seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash) VALUES ",
    );
    for r in 0..n {
        if r > 0 {
            sql.push_str(", ");
        }
        let marks: Vec<String> = (0..9).map(|c| mark(r * 9 + c)).collect();
        sql.push('(');
        sql.push_str(&marks.join(", "));
        sql.push(')');
    }
    sql
}

fn bind_rows<'f, DB>(
    mut q: diesel::query_builder::BoxedSqlQuery<'f, DB, diesel::query_builder::SqlQuery>,
    rows: &'f [AuditRow],
) -> diesel::query_builder::BoxedSqlQuery<'f, DB, diesel::query_builder::SqlQuery>
where
    DB: diesel::backend::Backend
        + diesel::sql_types::HasSqlType<diesel::sql_types::BigInt>
        + diesel::sql_types::HasSqlType<diesel::sql_types::Text>,
    i64: diesel::serialize::ToSql<diesel::sql_types::BigInt, DB>,
    str: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
    Option<&'f str>:
        diesel::serialize::ToSql<diesel::sql_types::Nullable<diesel::sql_types::Text>, DB>,
{
    use diesel::sql_types::{BigInt, Nullable, Text};
    for r in rows {
        q = q
            .bind::<BigInt, _>(r.seq)
            .bind::<BigInt, _>(r.ts_ms)
            .bind::<Text, _>(r.kind.as_str())
            .bind::<Text, _>(r.outcome.as_str())
            .bind::<Nullable<Text>, _>(r.actor.as_deref())
            .bind::<Nullable<Text>, _>(r.model_id.as_deref())
            .bind::<Text, _>(r.detail.as_str())
            .bind::<Text, _>(r.prev_hash.as_str())
            .bind::<Text, _>(r.hash.as_str());
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
