//! The durable mail outbox: rows are written with the change that causes them and
//! delivered later by the mail worker.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::mail_outbox;
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = mail_outbox)]
pub struct OutboxMail {
    pub id: String,
    pub kind: String,
    pub to_addr: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    pub created_at: i64,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub sent_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub last_error: Option<String>,
}

pub fn insert(conn: &mut AnyConnection, mail: &OutboxMail) -> Result<()> {
    diesel::insert_into(mail_outbox::table)
        .values(mail)
        .execute(conn)?;
    Ok(())
}

/// Messages due for a delivery attempt, oldest first.
pub fn due(conn: &mut AnyConnection, now: i64, limit: i64) -> Result<Vec<OutboxMail>> {
    Ok(mail_outbox::table
        .filter(mail_outbox::sent_at.is_null())
        .filter(mail_outbox::failed_at.is_null())
        .filter(mail_outbox::next_attempt_at.le(now))
        .order((mail_outbox::created_at.asc(), mail_outbox::id.asc()))
        .limit(limit)
        .select(OutboxMail::as_select())
        .load(conn)?)
}

pub fn mark_sent(conn: &mut AnyConnection, id: &str, now: i64) -> Result<()> {
    diesel::update(mail_outbox::table.find(id))
        .set((
            mail_outbox::sent_at.eq(Some(now)),
            mail_outbox::attempts.eq(mail_outbox::attempts + 1),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn mark_retry(conn: &mut AnyConnection, id: &str, next_at: i64, error: &str) -> Result<()> {
    diesel::update(mail_outbox::table.find(id))
        .set((
            mail_outbox::attempts.eq(mail_outbox::attempts + 1),
            mail_outbox::next_attempt_at.eq(next_at),
            mail_outbox::last_error.eq(Some(error)),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn mark_failed(conn: &mut AnyConnection, id: &str, now: i64, error: &str) -> Result<()> {
    diesel::update(mail_outbox::table.find(id))
        .set((
            mail_outbox::attempts.eq(mail_outbox::attempts + 1),
            mail_outbox::failed_at.eq(Some(now)),
            mail_outbox::last_error.eq(Some(error)),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn list_all(conn: &mut AnyConnection) -> Result<Vec<OutboxMail>> {
    Ok(mail_outbox::table
        .order(mail_outbox::created_at.asc())
        .select(OutboxMail::as_select())
        .load(conn)?)
}

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

/// Claims up to `limit` due messages for this worker: their next attempt moves `lease`
/// seconds ahead, so no other worker (another replica, the CLI) takes them meanwhile. On
/// PostgreSQL rows another transaction is claiming are skipped (`FOR UPDATE SKIP LOCKED`);
/// SQLite's single writer already serialises claims.
pub fn claim(
    conn: &mut AnyConnection,
    now: i64,
    limit: i64,
    lease: i64,
) -> Result<Vec<OutboxMail>> {
    let ids: Vec<String> = match conn {
        AnyConnection::Postgresql(pg) => diesel::sql_query(
            "SELECT id FROM mail_outbox WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1 \
             ORDER BY created_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind::<diesel::sql_types::BigInt, _>(now)
        .bind::<diesel::sql_types::BigInt, _>(limit)
        .load::<IdRow>(pg)?
        .into_iter()
        .map(|r| r.id)
        .collect(),
        AnyConnection::Sqlite(_) => due(conn, now, limit)?.into_iter().map(|m| m.id).collect(),
    };
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    diesel::update(mail_outbox::table.filter(mail_outbox::id.eq_any(&ids)))
        .set(mail_outbox::next_attempt_at.eq(now + lease))
        .execute(conn)?;
    Ok(mail_outbox::table
        .filter(mail_outbox::id.eq_any(&ids))
        .order((mail_outbox::created_at.asc(), mail_outbox::id.asc()))
        .select(OutboxMail::as_select())
        .load(conn)?)
}

/// When the next pending message is due, if any.
pub fn next_due(conn: &mut AnyConnection) -> Result<Option<i64>> {
    Ok(mail_outbox::table
        .filter(mail_outbox::sent_at.is_null())
        .filter(mail_outbox::failed_at.is_null())
        .select(diesel::dsl::min(mail_outbox::next_attempt_at))
        .first::<Option<i64>>(conn)?)
}

/// Messages that could not be delivered, newest first (for administrators).
pub fn failed(conn: &mut AnyConnection, limit: i64) -> Result<Vec<OutboxMail>> {
    Ok(mail_outbox::table
        .filter(mail_outbox::failed_at.is_not_null())
        .order(mail_outbox::failed_at.desc())
        .limit(limit)
        .select(OutboxMail::as_select())
        .load(conn)?)
}

/// Messages not yet delivered nor given up on.
pub fn backlog(conn: &mut AnyConnection) -> Result<i64> {
    Ok(mail_outbox::table
        .filter(mail_outbox::sent_at.is_null())
        .filter(mail_outbox::failed_at.is_null())
        .count()
        .get_result(conn)?)
}
