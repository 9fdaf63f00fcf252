//! Administrator web sessions (stored by the hash of their cookie).

use diesel::prelude::*;

use super::admins::Admin;
use crate::db::AnyConnection;
use crate::db::schema::{admin_sessions, admins};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = admin_sessions)]
pub struct SessionRow {
    pub id_hash: String,
    pub admin_id: String,
    pub csrf_token: String,
    pub created_at: i64,
    pub expires_at: i64,
}

pub fn insert(
    conn: &mut AnyConnection,
    id_hash: &str,
    admin_id: &str,
    csrf: &str,
    now: i64,
    expires: i64,
) -> Result<()> {
    diesel::insert_into(admin_sessions::table)
        .values((
            admin_sessions::id_hash.eq(id_hash),
            admin_sessions::admin_id.eq(admin_id),
            admin_sessions::csrf_token.eq(csrf),
            admin_sessions::created_at.eq(now),
            admin_sessions::expires_at.eq(expires),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn find_live(
    conn: &mut AnyConnection,
    id_hash: &str,
    now: i64,
) -> Result<Option<(SessionRow, Admin)>> {
    Ok(admin_sessions::table
        .inner_join(admins::table.on(admins::id.eq(admin_sessions::admin_id)))
        .filter(admin_sessions::id_hash.eq(id_hash))
        .filter(admin_sessions::expires_at.gt(now))
        .filter(admins::disabled_at.is_null())
        .select((SessionRow::as_select(), Admin::as_select()))
        .first(conn)
        .optional()?)
}

pub fn delete(conn: &mut AnyConnection, id_hash: &str) -> Result<()> {
    diesel::delete(admin_sessions::table.find(id_hash)).execute(conn)?;
    Ok(())
}
