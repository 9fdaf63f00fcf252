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
