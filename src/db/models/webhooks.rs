//! Webhook endpoints and their delivery outbox.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{webhook_outbox, webhooks};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = webhooks)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    #[serde(skip)]
    pub secret: String,
    /// JSON array of event names, or `["*"]`.
    pub events: String,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

impl Webhook {
    pub fn wants(&self, event: &str) -> bool {
        let list: Vec<String> = serde_json::from_str(&self.events).unwrap_or_default();
        list.iter().any(|e| e == "*" || e == event)
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = webhook_outbox)]
pub struct Delivery {
    pub id: String,
    pub webhook_id: String,
    pub event: String,
    pub payload: String,
    pub created_at: i64,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub sent_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub last_error: Option<String>,
    pub seq: i64,
    pub last_status: Option<i32>,
}

pub fn insert(conn: &mut AnyConnection, w: &Webhook) -> Result<()> {
    diesel::insert_into(webhooks::table)
        .values(w)
        .execute(conn)?;
    Ok(())
}

pub fn active(conn: &mut AnyConnection) -> Result<Vec<Webhook>> {
    Ok(webhooks::table
        .filter(webhooks::disabled_at.is_null())
        .order(webhooks::created_at.asc())
        .select(Webhook::as_select())
        .load(conn)?)
}

pub fn list(conn: &mut AnyConnection) -> Result<Vec<Webhook>> {
    Ok(webhooks::table
        .order(webhooks::created_at.asc())
        .select(Webhook::as_select())
        .load(conn)?)
}

pub fn disable(conn: &mut AnyConnection, id: &str, now: i64) -> Result<bool> {
    let n = diesel::update(
        webhooks::table
            .find(id)
            .filter(webhooks::disabled_at.is_null()),
    )
    .set(webhooks::disabled_at.eq(Some(now)))
    .execute(conn)?;
    Ok(n == 1)
}

pub fn enqueue(conn: &mut AnyConnection, d: &Delivery) -> Result<()> {
    diesel::insert_into(webhook_outbox::table)
        .values(d)
        .execute(conn)?;
    Ok(())
}

pub fn deliveries(conn: &mut AnyConnection, webhook_id: &str, limit: i64) -> Result<Vec<Delivery>> {
    Ok(webhook_outbox::table
        .filter(webhook_outbox::webhook_id.eq(webhook_id))
        .order(webhook_outbox::seq.desc())
        .limit(limit)
        .select(Delivery::as_select())
        .load(conn)?)
}

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

/// Claims the oldest undelivered delivery of a webhook when it is due. Deliveries of one
/// endpoint go strictly in order: while the head keeps failing, the ones behind it wait.
pub fn claim_head(
    conn: &mut AnyConnection,
    webhook_id: &str,
    now: i64,
    lease: i64,
) -> Result<Option<Delivery>> {
    let head: Option<Delivery> = webhook_outbox::table
        .filter(webhook_outbox::webhook_id.eq(webhook_id))
        .filter(webhook_outbox::sent_at.is_null())
        .filter(webhook_outbox::failed_at.is_null())
        .order(webhook_outbox::seq.asc())
        .select(Delivery::as_select())
        .first(conn)
        .optional()?;
    let Some(head) = head.filter(|h| h.next_attempt_at <= now) else {
        return Ok(None);
    };
    if let AnyConnection::Postgresql(pg) = conn {
        let locked = diesel::sql_query("SELECT id FROM webhook_outbox WHERE id = $1 AND next_attempt_at <= $2 FOR UPDATE SKIP LOCKED")
            .bind::<diesel::sql_types::Text, _>(&head.id)
            .bind::<diesel::sql_types::BigInt, _>(now)
            .load::<IdRow>(pg)?;
        if locked.first().map(|r| r.id.as_str()) != Some(head.id.as_str()) {
            return Ok(None);
        }
    }
    diesel::update(webhook_outbox::table.find(&head.id))
        .set(webhook_outbox::next_attempt_at.eq(now + lease))
        .execute(conn)?;
    Ok(Some(head))
}

/// How a delivery attempt ended.
pub struct Outcome<'a> {
    pub sent: bool,
    pub failed: bool,
    pub next_at: i64,
    pub status: Option<i32>,
    pub error: Option<&'a str>,
}

pub fn mark(conn: &mut AnyConnection, id: &str, o: &Outcome, now: i64) -> Result<()> {
    diesel::update(webhook_outbox::table.find(id))
        .set((
            webhook_outbox::attempts.eq(webhook_outbox::attempts + 1),
            webhook_outbox::sent_at.eq(o.sent.then_some(now)),
            webhook_outbox::failed_at.eq(o.failed.then_some(now)),
            webhook_outbox::next_attempt_at.eq(o.next_at),
            webhook_outbox::last_status.eq(o.status),
            webhook_outbox::last_error.eq(o.error),
        ))
        .execute(conn)?;
    Ok(())
}

/// Deliveries not yet made nor given up on.
pub fn backlog(conn: &mut AnyConnection) -> Result<i64> {
    Ok(webhook_outbox::table
        .filter(webhook_outbox::sent_at.is_null())
        .filter(webhook_outbox::failed_at.is_null())
        .count()
        .get_result(conn)?)
}
