//! Administrator web sessions: login with Argon2id (off the async threads), per-IP and
//! per-account lockout, session cookies stored only as hashes, CSRF tokens, and the one-time
//! setup code that creates the first administrator.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use super::admin;
use crate::audit::{self, Event};
use crate::db::Db;
use crate::db::models::{admins, kv, sessions};
use crate::error::{Error, Result};
use crate::util;

pub const COOKIE: &str = "wg_session";
const SETUP_KEY: &str = "setup_code_hash";

/// A logged-in administrator.
#[derive(Debug, Clone)]
pub struct WebSession {
    pub admin_id: String,
    pub email: String,
    pub csrf: String,
}

impl WebSession {
    pub fn actor(&self) -> String {
        format!("admin:{}", self.admin_id)
    }

    /// Whether a submitted CSRF token is this session's.
    pub fn csrf_ok(&self, submitted: &str) -> bool {
        util::ct_eq(self.csrf.as_bytes(), submitted.as_bytes())
    }
}

/// Failed logins per IP and per account within a window; past the limit, logins are refused
/// until the window has passed.
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
    window: Duration,
    per_ip: usize,
    per_account: usize,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            failures: Mutex::new(HashMap::new()),
            window: Duration::from_secs(15 * 60),
            per_ip: 20,
            per_account: 5,
        }
    }
}

impl LoginLimiter {
    fn keys(ip: Option<IpAddr>, email: &str) -> [(String, bool); 2] {
        [
            (
                format!("ip:{}", ip.map(|i| i.to_string()).unwrap_or_default()),
                true,
            ),
            (format!("acct:{email}"), false),
        ]
    }

    /// Reserves an attempt before the password is checked, so that parallel guesses count
    /// at once; returns when it was reserved, or the seconds to wait when locked.
    pub fn begin(&self, ip: Option<IpAddr>, email: &str) -> std::result::Result<Instant, u64> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() > 100_000 {
            // Forget expired entries; if that is not enough, drop per-address ones first so
            // that many addresses cannot wipe an account's lockout.
            map.retain(|_, v| {
                v.last()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
            if map.len() > 100_000 {
                map.retain(|k, _| k.starts_with("acct:"));
            }
        }
        let keys = Self::keys(ip, email);
        let mut wait = None;
        for (key, is_ip) in &keys {
            if let Some(v) = map.get_mut(key) {
                v.retain(|t| now.duration_since(*t) < self.window);
                let limit = if *is_ip {
                    self.per_ip
                } else {
                    self.per_account
                };
                if v.len() >= limit {
                    let oldest = v[0];
                    let left = self
                        .window
                        .saturating_sub(now.duration_since(oldest))
                        .as_secs()
                        .max(1);
                    wait = Some(wait.map_or(left, |w: u64| w.max(left)));
                }
            }
        }
        if let Some(w) = wait {
            return Err(w);
        }
        for (key, _) in keys {
            map.entry(key).or_default().push(now);
        }
        Ok(now)
    }

    /// A reserved attempt that succeeded: it does not count, and the account starts afresh.
    pub fn succeeded(&self, ip: Option<IpAddr>, email: &str, at: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let [(ip_key, _), (acct_key, _)] = Self::keys(ip, email);
        map.remove(&acct_key);
        if let Some(v) = map.get_mut(&ip_key)
            && let Some(i) = v.iter().position(|t| *t == at)
        {
            v.remove(i);
        }
    }
}

/// An Argon2id hash of a random password, to spend the same time on unknown accounts.
static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Checks email and password; on success opens a session and returns its raw id (for the
/// cookie). Every attempt is audited without the password.
pub async fn login(
    db: &Db,
    limiter: &LoginLimiter,
    email: &str,
    password: &str,
    ip: Option<IpAddr>,
    ttl: Duration,
) -> Result<(String, WebSession)> {
    let email = email.trim().to_ascii_lowercase();
    let attempt = match limiter.begin(ip, &email) {
        Ok(at) => at,
        Err(wait) => {
            return Err(Error::new(
                actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                "login_locked",
                format!(
                    "Too many failed logins. Try again in {} minutes.",
                    wait.div_ceil(60)
                ),
            ));
        }
    };
    let e = email.clone();
    let found = db.read(move |c| admins::find_by_email(c, &e)).await?;
    let hash = match &found {
        Some(a) if a.disabled_at.is_none() => a.password_hash.clone(),
        _ => DUMMY_HASH
            .get_or_init(|| admin::hash_password(&util::random_secret()).unwrap_or_default())
            .clone(),
    };
    let pw = password.to_string();
    let ok = tokio::task::spawn_blocking(move || admin::verify_password(&hash, &pw))
        .await
        .unwrap_or(false);
    let admin = found.filter(|a| ok && a.disabled_at.is_none());
    let client = ip.map(|i| i.to_string());
    let Some(admin) = admin else {
        // The attempt reserved above stays counted as a failure.
        db.write(move |c| {
            audit::append(
                c,
                &[Event::new("admin_login", "failure").detail(json!({"client": client}))],
            )
        })
        .await?;
        return Err(Error::unauthorized(
            "login_failed",
            "Wrong email or password.",
        ));
    };
    limiter.succeeded(ip, &email, attempt);
    let raw = util::random_secret();
    let csrf = util::random_secret();
    let (id_hash, admin_id, c2) = (util::sha256_hex(&raw), admin.id.clone(), csrf.clone());
    let expires = util::now() + ttl.as_secs() as i64;
    db.write(move |c| {
        sessions::insert(c, &id_hash, &admin_id, &c2, util::now(), expires)?;
        audit::append(
            c,
            &[Event::new("admin_login", "ok")
                .actor(format!("admin:{admin_id}"))
                .detail(json!({"client": client}))],
        )
    })
    .await?;
    Ok((
        raw,
        WebSession {
            admin_id: admin.id,
            email: admin.email,
            csrf,
        },
    ))
}

/// The live session behind a cookie value.
pub async fn lookup(db: &Db, raw: &str) -> Result<Option<WebSession>> {
    if raw.len() > 100 {
        return Ok(None);
    }
    let hash = util::sha256_hex(raw);
    let found = db
        .read(move |c| sessions::find_live(c, &hash, util::now()))
        .await?;
    Ok(found.map(|(s, a)| WebSession {
        admin_id: a.id,
        email: a.email,
        csrf: s.csrf_token,
    }))
}

pub async fn logout(db: &Db, raw: &str) -> Result<()> {
    let hash = util::sha256_hex(raw);
    db.write(move |c| sessions::delete(c, &hash)).await
}

/// When there is no administrator yet, makes a fresh one-time setup code and returns it.
pub async fn setup_code(db: &Db) -> Result<Option<String>> {
    db.write(|c| {
        if admins::count(c)? > 0 {
            return Ok(None);
        }
        let code = util::random_secret();
        kv::set(c, SETUP_KEY, &util::sha256_hex(&code))?;
        Ok(Some(code))
    })
    .await
}

/// Creates the first administrator with the setup code; the code dies with it.
pub async fn complete_setup(db: &Db, code: &str, email: &str, password: &str) -> Result<()> {
    let (code, email, password) = (code.to_string(), email.to_string(), password.to_string());
    db.write(move |c| {
        let stored = kv::get(c, SETUP_KEY)?;
        let valid = stored.is_some_and(|h| util::ct_eq(h.as_bytes(), util::sha256_hex(&code).as_bytes()));
        if !valid || admins::count(c)? > 0 {
            return Err(Error::forbidden("setup_closed", "This setup link is not valid (an administrator exists already, or the server restarted with a new link)."));
        }
        admin::create(c, &email, &password, "setup")?;
        kv::set(c, SETUP_KEY, "")?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_before_the_password_is_checked() {
        let l = LoginLimiter::default();
        // Five guesses in flight at once, from five addresses: the sixth is refused even
        // though none of them has finished.
        for i in 0..5u8 {
            let ip = Some(IpAddr::from([10, 0, 0, i]));
            assert!(l.begin(ip, "root@example.org").is_ok());
        }
        let sixth = l.begin(Some(IpAddr::from([10, 0, 0, 9])), "root@example.org");
        assert!(sixth.is_err_and(|wait| wait > 0));
        assert!(l.begin(None, "other@example.org").is_ok());
    }

    #[test]
    fn successful_logins_do_not_use_up_an_address() {
        let l = LoginLimiter::default();
        let ip = Some(IpAddr::from([192, 0, 2, 1]));
        for _ in 0..50 {
            let at = l.begin(ip, "ada@example.org").unwrap();
            l.succeeded(ip, "ada@example.org", at);
        }
        // Failures still add up per address across accounts.
        for i in 0..20 {
            l.begin(ip, &format!("u{i}@example.org")).unwrap();
        }
        assert!(l.begin(ip, "ada@example.org").is_err());
    }
}
