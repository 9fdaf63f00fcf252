//! The audit table: appending chained rows, reading them back in order.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::audit_events;
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
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

/// Serialises appenders across processes and replicas: PostgreSQL takes a transaction-scoped
/// advisory lock; SQLite already holds its single write lock inside `Db::write`.
pub fn lock_chain(conn: &mut AnyConnection) -> Result<()> {
    if let AnyConnection::Postgresql(c) = conn {
        diesel::sql_query("SELECT pg_advisory_xact_lock(7745321)").execute(c)?;
    }
    Ok(())
}

/// The newest row's sequence number and hash, if any.
pub fn head(conn: &mut AnyConnection) -> Result<Option<(i64, String)>> {
    Ok(audit_events::table
        .order(audit_events::seq.desc())
        .select((audit_events::seq, audit_events::hash))
        .first(conn)
        .optional()?)
}

pub fn insert(conn: &mut AnyConnection, rows: &[AuditRow]) -> Result<()> {
    // MultiConnection has no multi-row INSERT; rows go one by one inside the caller's transaction.
    for row in rows {
        diesel::insert_into(audit_events::table)
            .values(row)
            .execute(conn)?;
    }
    Ok(())
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
