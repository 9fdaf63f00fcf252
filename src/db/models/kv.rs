//! Small server-wide values.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::kv;
use crate::error::{Error, Result};
use crate::util;

const SERVER_SECRET: &str = "server_secret";

pub fn get(conn: &mut AnyConnection, key: &str) -> Result<Option<String>> {
    Ok(kv::table
        .find(key)
        .select(kv::value)
        .first(conn)
        .optional()?)
}

pub fn set(conn: &mut AnyConnection, key: &str, value: &str) -> Result<()> {
    let now = util::now();
    let n = diesel::update(kv::table.find(key))
        .set((kv::value.eq(value), kv::updated_at.eq(now)))
        .execute(conn)?;
    if n == 0 {
        diesel::insert_into(kv::table)
            .values((kv::key.eq(key), kv::value.eq(value), kv::updated_at.eq(now)))
            .execute(conn)?;
    }
    Ok(())
}

/// Creates the secret that status-page keys are derived from, once per database.
pub fn ensure_server_secret(conn: &mut AnyConnection) -> Result<()> {
    if get(conn, SERVER_SECRET)?.is_none() {
        set(conn, SERVER_SECRET, &util::random_secret())?;
    }
    Ok(())
}

pub fn server_secret(conn: &mut AnyConnection) -> Result<String> {
    get(conn, SERVER_SECRET)?
        .ok_or_else(|| Error::internal("server secret missing; run `weightgate migrate`"))
}
