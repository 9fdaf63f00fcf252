//! Researchers, their applications and the grants an approval creates.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{applications, grants, tokens, users};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = users)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub affiliation: String,
    pub country: String,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = applications)]
pub struct Application {
    pub id: String,
    pub model_id: String,
    pub user_id: String,
    pub status: String,
    pub name: String,
    pub email: String,
    pub affiliation: String,
    pub country: String,
    pub intended_use: String,
    pub answers: String,
    #[serde(skip)]
    pub confirm_hash: Option<String>,
    #[serde(skip)]
    pub status_key_hash: String,
    pub reason: Option<String>,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    pub created_at: i64,
    pub confirmed_at: Option<i64>,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = grants)]
pub struct Grant {
    pub id: String,
    pub user_id: String,
    pub model_id: String,
    pub application_id: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
}

impl Grant {
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

pub const UNVERIFIED: &str = "unverified";
pub const PENDING: &str = "pending";
pub const APPROVED: &str = "approved";
pub const REJECTED: &str = "rejected";
pub const WITHDRAWN: &str = "withdrawn";

pub fn find_user_by_email(conn: &mut AnyConnection, email: &str) -> Result<Option<User>> {
    Ok(users::table
        .filter(users::email.eq(email))
        .filter(users::deleted_at.is_null())
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn find_user(conn: &mut AnyConnection, id: &str) -> Result<Option<User>> {
    Ok(users::table
        .find(id)
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn insert_user(conn: &mut AnyConnection, user: &User) -> Result<()> {
    diesel::insert_into(users::table)
        .values(user)
        .execute(conn)?;
    Ok(())
}

pub fn insert_application(conn: &mut AnyConnection, app: &Application) -> Result<()> {
    diesel::insert_into(applications::table)
        .values(app)
        .execute(conn)?;
    Ok(())
}

pub fn find_application(conn: &mut AnyConnection, id: &str) -> Result<Option<Application>> {
    Ok(applications::table
        .find(id)
        .select(Application::as_select())
        .first(conn)
        .optional()?)
}

pub fn find_application_by_confirm_hash(
    conn: &mut AnyConnection,
    hash: &str,
) -> Result<Option<Application>> {
    Ok(applications::table
        .filter(applications::confirm_hash.eq(hash))
        .select(Application::as_select())
        .first(conn)
        .optional()?)
}

/// The user's applications for one model, newest first.
pub fn applications_of(
    conn: &mut AnyConnection,
    user_id: &str,
    model_id: &str,
) -> Result<Vec<Application>> {
    Ok(applications::table
        .filter(applications::user_id.eq(user_id))
        .filter(applications::model_id.eq(model_id))
        .order(applications::created_at.desc())
        .select(Application::as_select())
        .load(conn)?)
}

pub fn list_applications(
    conn: &mut AnyConnection,
    status: Option<&str>,
    model: Option<&str>,
) -> Result<Vec<Application>> {
    let mut q = applications::table.into_boxed();
    if let Some(s) = status {
        q = q.filter(applications::status.eq(s.to_string()));
    }
    if let Some(m) = model {
        q = q.filter(applications::model_id.eq(m.to_string()));
    }
    Ok(
        q.order((applications::created_at.asc(), applications::id.asc()))
            .select(Application::as_select())
            .load(conn)?,
    )
}

/// Moves an application from `from` to `to`; returns false when it was not in `from`
/// (so two concurrent decisions cannot both win).
pub fn transition(
    conn: &mut AnyConnection,
    id: &str,
    from: &str,
    to: &str,
    now: i64,
) -> Result<bool> {
    let n = diesel::update(
        applications::table
            .find(id)
            .filter(applications::status.eq(from)),
    )
    .set((
        applications::status.eq(to),
        applications::updated_at.eq(now),
    ))
    .execute(conn)?;
    Ok(n == 1)
}

/// Records the confirmation; the code stays valid so a second click shows the status.
pub fn mark_confirmed(conn: &mut AnyConnection, id: &str, now: i64) -> Result<()> {
    diesel::update(applications::table.find(id))
        .set(applications::confirmed_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}

pub fn record_decision(
    conn: &mut AnyConnection,
    id: &str,
    by: &str,
    reason: Option<&str>,
    now: i64,
) -> Result<()> {
    diesel::update(applications::table.find(id))
        .set((
            applications::decided_by.eq(Some(by)),
            applications::decided_at.eq(Some(now)),
            applications::reason.eq(reason),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn insert_grant(conn: &mut AnyConnection, grant: &Grant) -> Result<()> {
    diesel::insert_into(grants::table)
        .values(grant)
        .execute(conn)?;
    Ok(())
}

pub fn find_grant(conn: &mut AnyConnection, id: &str) -> Result<Option<Grant>> {
    Ok(grants::table
        .find(id)
        .select(Grant::as_select())
        .first(conn)
        .optional()?)
}

/// The newest unrevoked, unexpired grant of a user for a model.
pub fn active_grant(
    conn: &mut AnyConnection,
    user_id: &str,
    model_id: &str,
    now: i64,
) -> Result<Option<Grant>> {
    Ok(grants::table
        .filter(grants::user_id.eq(user_id))
        .filter(grants::model_id.eq(model_id))
        .filter(grants::revoked_at.is_null())
        .filter(grants::expires_at.is_null().or(grants::expires_at.gt(now)))
        .order(grants::created_at.desc())
        .select(Grant::as_select())
        .first(conn)
        .optional()?)
}

pub fn revoke_grant(conn: &mut AnyConnection, id: &str, reason: &str, now: i64) -> Result<bool> {
    let n = diesel::update(grants::table.find(id).filter(grants::revoked_at.is_null()))
        .set((
            grants::revoked_at.eq(Some(now)),
            grants::revoked_reason.eq(Some(reason)),
        ))
        .execute(conn)?;
    Ok(n == 1)
}

/// Marks a user deleted, frees their email address, and revokes their grants and tokens;
/// returns how many grants and tokens were revoked.
pub fn erase_user(conn: &mut AnyConnection, user_id: &str, now: i64) -> Result<(usize, usize)> {
    diesel::update(users::table.find(user_id))
        .set((
            users::deleted_at.eq(Some(now)),
            users::email.eq(format!("deleted+{user_id}@deleted.invalid")),
            users::name.eq(""),
            users::affiliation.eq(""),
        ))
        .execute(conn)?;
    let g = diesel::update(
        grants::table
            .filter(grants::user_id.eq(user_id))
            .filter(grants::revoked_at.is_null()),
    )
    .set((
        grants::revoked_at.eq(Some(now)),
        grants::revoked_reason.eq(Some("account deleted")),
    ))
    .execute(conn)?;
    let t = diesel::update(
        tokens::table
            .filter(tokens::user_id.eq(user_id))
            .filter(tokens::revoked_at.is_null()),
    )
    .set(tokens::revoked_at.eq(Some(now)))
    .execute(conn)?;
    Ok((g, t))
}

/// The grants an application created.
pub fn grants_of_application(conn: &mut AnyConnection, application_id: &str) -> Result<Vec<Grant>> {
    Ok(grants::table
        .filter(grants::application_id.eq(application_id))
        .select(Grant::as_select())
        .load(conn)?)
}

/// A grant with who holds it, for the admin console.
pub fn list_grants(conn: &mut AnyConnection, model: Option<&str>) -> Result<Vec<(Grant, String)>> {
    let mut q = grants::table
        .inner_join(users::table.on(users::id.eq(grants::user_id)))
        .select((Grant::as_select(), users::email))
        .order(grants::created_at.desc())
        .into_boxed();
    if let Some(m) = model {
        q = q.filter(grants::model_id.eq(m.to_string()));
    }
    Ok(q.load(conn)?)
}

pub fn set_grant_expiry(
    conn: &mut AnyConnection,
    id: &str,
    expires_at: Option<i64>,
) -> Result<bool> {
    let n = diesel::update(grants::table.find(id).filter(grants::revoked_at.is_null()))
        .set((
            grants::expires_at.eq(expires_at),
            // A new end date gets its own warning and notice.
            grants::expiry_warned_at.eq(None::<i64>),
            grants::expiry_noticed_at.eq(None::<i64>),
        ))
        .execute(conn)?;
    Ok(n == 1)
}

/// Active grants ending within `within` seconds that were not warned yet.
pub fn grants_to_warn(conn: &mut AnyConnection, now: i64, within: i64) -> Result<Vec<Grant>> {
    Ok(grants::table
        .filter(grants::revoked_at.is_null())
        .filter(grants::expiry_warned_at.is_null())
        .filter(grants::expires_at.gt(now))
        .filter(grants::expires_at.le(now + within))
        .select(Grant::as_select())
        .load(conn)?)
}

/// Grants that have run out and were not announced as ended yet.
pub fn grants_expired_unnoticed(conn: &mut AnyConnection, now: i64) -> Result<Vec<Grant>> {
    Ok(grants::table
        .filter(grants::revoked_at.is_null())
        .filter(grants::expiry_noticed_at.is_null())
        .filter(grants::expires_at.le(now))
        .select(Grant::as_select())
        .load(conn)?)
}

pub fn mark_grant_warned(conn: &mut AnyConnection, id: &str, now: i64) -> Result<()> {
    diesel::update(grants::table.find(id))
        .set(grants::expiry_warned_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}

pub fn mark_grant_noticed(conn: &mut AnyConnection, id: &str, now: i64) -> Result<()> {
    diesel::update(grants::table.find(id))
        .set(grants::expiry_noticed_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}

/// Confirmed, still pending applications of digest models that no digest listed yet.
pub fn awaiting_digest(conn: &mut AnyConnection) -> Result<Vec<Application>> {
    use crate::db::schema::models;
    Ok(applications::table
        .inner_join(models::table.on(models::id.eq(applications::model_id)))
        .filter(models::notify.eq("digest"))
        .filter(applications::status.eq(PENDING))
        .filter(applications::digest_sent_at.is_null())
        .order(applications::created_at.asc())
        .select(Application::as_select())
        .load(conn)?)
}

pub fn mark_digested(conn: &mut AnyConnection, ids: &[String], now: i64) -> Result<()> {
    diesel::update(applications::table.filter(applications::id.eq_any(ids)))
        .set(applications::digest_sent_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}
