//! Administrators: Argon2id passwords (hashed off the async threads) and API tokens that
//! start with `wg_admin_` so they are recognisable in leaked text; only their hash is stored.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use serde_json::json;

use crate::audit::{self, Event};
use crate::db::models::admins::{self, Admin, AdminToken};
use crate::db::{AnyConnection, Db};
use crate::error::{Error, Result};
use crate::util;

pub const ADMIN_TOKEN_PREFIX: &str = "wg_admin_";

/// An authenticated administrator.
#[derive(Debug, Clone)]
pub struct AdminPrincipal {
    pub admin_id: String,
    pub email: String,
}

impl AdminPrincipal {
    pub fn actor(&self) -> String {
        format!("admin:{}", self.admin_id)
    }
}

pub fn hash_password(password: &str) -> Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("argon2: {e}")))
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    match argon2::password_hash::phc::PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

pub fn validate_password(password: &str) -> Result<()> {
    let n = password.chars().count();
    if n < 12 {
        return Err(Error::invalid_field(
            "password",
            "must have at least 12 characters",
        ));
    }
    if n > 1024 {
        return Err(Error::invalid_field(
            "password",
            "must have at most 1024 characters",
        ));
    }
    Ok(())
}

/// Creates an administrator (the password is hashed here, so call it off the async threads).
pub fn create(c: &mut AnyConnection, email: &str, password: &str, actor: &str) -> Result<Admin> {
    let email = email.trim().to_ascii_lowercase();
    if email.parse::<lettre::Address>().is_err() {
        return Err(Error::invalid_field(
            "email",
            "is not a valid email address",
        ));
    }
    validate_password(password)?;
    if admins::find_by_email(c, &email)?.is_some() {
        return Err(Error::conflict(
            "admin_exists",
            format!("An administrator {email} already exists."),
        ));
    }
    let admin = Admin {
        id: util::random_hex(12),
        email,
        password_hash: hash_password(password)?,
        created_at: util::now(),
        disabled_at: None,
    };
    admins::insert(c, &admin)?;
    audit::append(
        c,
        &[Event::new("admin_created", "ok")
            .actor(actor)
            .detail(json!({"admin": admin.id}))],
    )?;
    Ok(admin)
}

/// Issues an API token for the admin with this email; the raw token is returned once.
pub fn issue_token(
    c: &mut AnyConnection,
    email: &str,
    label: &str,
    actor: &str,
) -> Result<(String, AdminToken)> {
    let email = email.trim().to_ascii_lowercase();
    let admin = admins::find_by_email(c, &email)?.ok_or_else(|| {
        Error::not_found(
            "admin_not_found",
            "No administrator with that email address.",
        )
    })?;
    let raw = format!("{ADMIN_TOKEN_PREFIX}{}", util::random_secret());
    let row = AdminToken {
        id: util::random_hex(8),
        admin_id: admin.id.clone(),
        token_hash: util::sha256_hex(&raw),
        label: label.to_string(),
        created_at: util::now(),
        last_used_at: None,
        revoked_at: None,
    };
    admins::insert_token(c, &row)?;
    audit::append(
        c,
        &[Event::new("admin_token_issued", "ok")
            .actor(actor)
            .detail(json!({"admin": admin.id, "token": row.id, "label": label}))],
    )?;
    Ok((raw, row))
}

/// Checks an `Authorization: Bearer wg_admin_…` value.
pub async fn authenticate(db: &Db, raw: Option<&str>) -> Result<AdminPrincipal> {
    let Some(raw) = raw.filter(|t| !t.is_empty()) else {
        return Err(Error::unauthorized(
            "admin_token_missing",
            "This API needs an administrator token: Authorization: Bearer wg_admin_…",
        ));
    };
    if !raw.starts_with(ADMIN_TOKEN_PREFIX) || raw.len() > 200 {
        return Err(Error::forbidden(
            "not_admin",
            "This API needs an administrator token (wg_admin_…); download tokens cannot manage access.",
        ));
    }
    let hash = util::sha256_hex(raw);
    let found = db.read(move |c| admins::find_token(c, &hash)).await?;
    match found {
        Some((_, admin)) => Ok(AdminPrincipal {
            admin_id: admin.id,
            email: admin.email,
        }),
        None => Err(Error::unauthorized(
            "invalid_admin_token",
            "This administrator token is not valid (unknown or revoked).",
        )),
    }
}
