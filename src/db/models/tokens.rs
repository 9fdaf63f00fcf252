//! Issued download tokens: their `jti`, a hash of the raw token, and revocation.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::tokens;
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = tokens)]
pub struct TokenRow {
    pub jti: String,
    #[serde(skip)]
    pub token_hash: String,
    pub kid: String,
    pub grant_id: String,
    pub user_id: String,
    pub model_id: String,
    pub label: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub max_downloads: Option<i64>,
}

pub fn insert(conn: &mut AnyConnection, row: &TokenRow) -> Result<()> {
    diesel::insert_into(tokens::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

pub fn find(conn: &mut AnyConnection, jti: &str) -> Result<Option<TokenRow>> {
    Ok(tokens::table
        .find(jti)
        .select(TokenRow::as_select())
        .first(conn)
        .optional()?)
}

/// Revokes one token; returns false when it was unknown or already revoked.
pub fn revoke(conn: &mut AnyConnection, jti: &str, now: i64) -> Result<bool> {
    let n = diesel::update(tokens::table.find(jti).filter(tokens::revoked_at.is_null()))
        .set(tokens::revoked_at.eq(Some(now)))
        .execute(conn)?;
    Ok(n == 1)
}

pub fn list_for_grant(conn: &mut AnyConnection, grant_id: &str) -> Result<Vec<TokenRow>> {
    Ok(tokens::table
        .filter(tokens::grant_id.eq(grant_id))
        .order(tokens::issued_at.desc())
        .select(TokenRow::as_select())
        .load(conn)?)
}
