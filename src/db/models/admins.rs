//! Administrators and their API tokens (for automation and `HfApi`).

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{admin_api_tokens, admins};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = admins)]
pub struct Admin {
    pub id: String,
    pub email: String,
    pub password_hash: String,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = admin_api_tokens)]
pub struct AdminToken {
    pub id: String,
    pub admin_id: String,
    #[serde(skip)]
    pub token_hash: String,
    pub label: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

pub fn insert(conn: &mut AnyConnection, admin: &Admin) -> Result<()> {
    diesel::insert_into(admins::table)
        .values(admin)
        .execute(conn)?;
    Ok(())
}

pub fn find_by_email(conn: &mut AnyConnection, email: &str) -> Result<Option<Admin>> {
    Ok(admins::table
        .filter(admins::email.eq(email))
        .select(Admin::as_select())
        .first(conn)
        .optional()?)
}

pub fn count(conn: &mut AnyConnection) -> Result<i64> {
    Ok(admins::table.count().get_result(conn)?)
}

pub fn insert_token(conn: &mut AnyConnection, t: &AdminToken) -> Result<()> {
    diesel::insert_into(admin_api_tokens::table)
        .values(t)
        .execute(conn)?;
    Ok(())
}

/// The live token with this hash and its enabled admin.
pub fn find_token(conn: &mut AnyConnection, hash: &str) -> Result<Option<(AdminToken, Admin)>> {
    Ok(admin_api_tokens::table
        .inner_join(admins::table.on(admins::id.eq(admin_api_tokens::admin_id)))
        .filter(admin_api_tokens::token_hash.eq(hash))
        .filter(admin_api_tokens::revoked_at.is_null())
        .filter(admins::disabled_at.is_null())
        .select((AdminToken::as_select(), Admin::as_select()))
        .first(conn)
        .optional()?)
}

pub fn revoke_token(conn: &mut AnyConnection, id: &str, now: i64) -> Result<bool> {
    let n = diesel::update(
        admin_api_tokens::table
            .find(id)
            .filter(admin_api_tokens::revoked_at.is_null()),
    )
    .set(admin_api_tokens::revoked_at.eq(Some(now)))
    .execute(conn)?;
    Ok(n == 1)
}
