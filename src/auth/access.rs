//! May this request read this model's files? And issuing the tokens that say so.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;

use super::keys::Keyring;
use super::links;
use super::tokens::{self, Claims};
use crate::audit::{self, Event};
use crate::db::models::access as people;
use crate::db::models::tokens::{self as token_rows, TokenRow};
use crate::db::{AnyConnection, Db};
use crate::error::{Error, HubCode, Result};
use crate::util;

/// The token settings a check needs.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    pub issuer: String,
    pub audience: String,
    pub leeway: u64,
    pub public_url: String,
    /// How long a verified token is trusted before its signature, grant and revocation are
    /// checked again; the bound on how late another process's revocation takes effect.
    pub refresh: Duration,
}

/// Who a request acts for, once its token checked out.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub jti: String,
    pub grant_id: String,
    pub grant_expires_at: Option<i64>,
    pub token_expires_at: i64,
    pub max_downloads: Option<i64>,
}

fn gated(status: actix_web::http::StatusCode, code: &'static str, msg: String) -> Error {
    Error::new(status, code, msg).hub(HubCode::GatedRepo)
}

struct Cached {
    models: Vec<String>,
    principal: Principal,
    checked: Instant,
}

/// Verified tokens by the BLAKE3 hash of their text, so steady-state requests do neither a
/// signature check nor a database read. Entries live `policy.refresh`; a revocation made by
/// this process clears the cache at once. (BLAKE3 is collision-resistant like the SHA-256
/// the database keys tokens by, and several times cheaper on CPUs without SHA instructions,
/// where hashing each request's token with SHA-256 took 4 % of the server's CPU.)
#[derive(Default)]
pub struct TokenCache {
    map: RwLock<HashMap<CacheKey, Cached>>,
    /// Bumped by every `clear`, so a check that started before a revocation cannot put its
    /// stale result back afterwards.
    generation: std::sync::atomic::AtomicU64,
}

const CACHE_MAX: usize = 100_000;

/// A cache entry's key: the BLAKE3 hash of the token's text.
type CacheKey = [u8; 32];

fn cache_key(raw: &str) -> CacheKey {
    *blake3::hash(raw.as_bytes()).as_bytes()
}

impl TokenCache {
    /// The cached principal for this token, if it is fresh and the token covers `model`.
    fn get(&self, key: &CacheKey, refresh: Duration, model: &str) -> Option<Principal> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let hit = map.get(key)?;
        (hit.checked.elapsed() < refresh && hit.models.iter().any(|m| m == model))
            .then(|| hit.principal.clone())
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn put(&self, key: CacheKey, models: Vec<String>, principal: Principal, generation: u64) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.generation() != generation {
            return;
        }
        if map.len() >= CACHE_MAX {
            map.clear();
        }
        map.insert(
            key,
            Cached {
                models,
                principal,
                checked: Instant::now(),
            },
        );
    }

    /// Forgets everything (after any revocation, grant change or user deletion here).
    pub fn clear(&self) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        map.clear();
    }
}

/// The download gate: token checks with their cache, and signed links.
#[derive(Clone)]
pub struct Gate {
    pub db: Db,
    pub keys: Keyring,
    pub policy: TokenPolicy,
    pub cache: Arc<TokenCache>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Gate {
    pub fn new(
        db: Db,
        keys: Keyring,
        policy: TokenPolicy,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Gate {
        Gate {
            db,
            keys,
            policy,
            cache: Arc::new(TokenCache::default()),
            metrics,
        }
    }

    fn apply_url(&self, model: &str) -> String {
        format!("{}/models/{model}", self.policy.public_url)
    }

    /// Checks `raw` (the bearer token, if any) for reading `model`: signature, times,
    /// audience, scope, then the token's row and its grant (from the cache while fresh).
    pub async fn authorize(&self, raw: Option<&str>, model: &str) -> Result<Principal> {
        use actix_web::http::StatusCode;
        let apply_url = self.apply_url(model);
        let Some(raw) = raw.filter(|t| !t.is_empty()) else {
            return Err(gated(
                StatusCode::UNAUTHORIZED,
                "token_missing",
                format!(
                    "Access to model {model} is restricted. You must have access to it and be authenticated to access it. Send your weightgate token as 'Authorization: Bearer <token>' (or HF_TOKEN). Apply for access at {apply_url}"
                ),
            ));
        };
        if raw.len() > tokens::MAX_TOKEN_LEN {
            return Err(
                Error::unauthorized("invalid_token", tokens::INVALID_CREDENTIALS)
                    .hub(HubCode::GatedRepo),
            );
        }
        let key = cache_key(raw);
        let now = util::now();
        if let Some(p) = self.cache.get(&key, self.policy.refresh, model)
            && p.token_expires_at + self.policy.leeway as i64 > now
            && p.grant_expires_at.is_none_or(|e| e > now)
        {
            crate::metrics::Metrics::add(&self.metrics.token_cache_hits, 1);
            return Ok(p);
        }
        crate::metrics::Metrics::add(&self.metrics.token_cache_misses, 1);
        let generation = self.cache.generation();
        let claims = tokens::verify(
            &self.keys,
            raw,
            &self.policy.issuer,
            &self.policy.audience,
            self.policy.leeway,
        )
        .map_err(|e| e.hub(HubCode::GatedRepo))?;
        let jti = claims.jti.clone();
        let m = model.to_string();
        // The database keys tokens by the SHA-256 of their text.
        let h = util::sha256_hex(raw);
        let c2 = claims.clone();
        let principal = self
            .db
            .read(move |c| {
                if !c2.models.contains(&m) {
                    // A genuine token for another model: say where this researcher stands here.
                    token_row(c, &c2, &jti, &h, &m, &apply_url)?;
                    return Err(standing(c, &c2.sub, &m, &apply_url)?);
                }
                check_rows(c, &c2, &jti, &h, &m, &apply_url)
            })
            .await?;
        self.cache
            .put(key, claims.models, principal.clone(), generation);
        // Remember when the token was last used, off the request path.
        let (db, jti) = (self.db.clone(), principal.jti.clone());
        tokio::spawn(async move {
            let _ = db
                .write(move |c| token_rows::touch(c, &jti, util::now()))
                .await;
        });
        Ok(principal)
    }

    /// Checks a signed link (`?link=`) for this exact model, commit and path; it is honoured
    /// only while the token that minted it still is.
    pub async fn authorize_link(
        &self,
        link: &str,
        model: &str,
        commit: &str,
        path: &str,
    ) -> Result<Principal> {
        let claims = links::verify(&self.keys, link, &self.policy)?;
        if claims.model != model || claims.rev != commit || claims.path != path {
            return Err(gated(
                actix_web::http::StatusCode::FORBIDDEN,
                "link_scope",
                "This signed link is for another file; mint one for this file.".into(),
            ));
        }
        let (tok, m, apply_url) = (claims.tok.clone(), model.to_string(), self.apply_url(model));
        self.db
            .read(move |c| {
                let row = token_rows::find(c, &tok)?.ok_or_else(|| Error::unauthorized("invalid_link", "This signed link is not valid.").hub(HubCode::GatedRepo))?;
                let parent = Claims {
                    iss: String::new(), aud: String::new(), sub: row.user_id.clone(), iat: 0, nbf: 0,
                    exp: row.expires_at, jti: row.jti.clone(), models: vec![row.model_id.clone()], max_downloads: row.max_downloads,
                };
                if row.expires_at <= util::now() {
                    return Err(gated(actix_web::http::StatusCode::UNAUTHORIZED, "token_expired", "The token that made this link has expired; issue a new one and mint a new link.".into()));
                }
                check_rows(c, &parent, &row.jti, &row.token_hash, &m, &apply_url)
            })
            .await
    }

    /// Whether this principal may start (or continue) downloading the file `sha256`: a file
    /// it completed, or is in the middle of, is free; a new one takes a place in the quota
    /// (reserved at once, so parallel requests cannot overrun it). Returns the places left,
    /// for tokens that have a quota.
    pub async fn check_quota(
        &self,
        p: &Principal,
        sha256: &str,
        model: &str,
    ) -> Result<Option<i64>> {
        let Some(max) = p.max_downloads else {
            return Ok(None);
        };
        let (jti, sha) = (p.jti.clone(), sha256.to_string());
        let left = self
            .db
            .write(move |c| token_rows::reserve(c, &jti, &sha, max, util::now()))
            .await?;
        left.map(Some).ok_or_else(|| {
            gated(
                actix_web::http::StatusCode::FORBIDDEN,
                "quota_exhausted",
                format!(
                    "This token's quota of {max} file downloads for model {model} is used up (files already downloaded, or being downloaded, can be fetched again). Issue a new token from your application's status page."
                ),
            )
        })
    }
}

/// Why a researcher with no token for `model` cannot read it, in the Hub's words where the
/// Hub has words for it.
fn standing(c: &mut AnyConnection, user_id: &str, model: &str, apply_url: &str) -> Result<Error> {
    use actix_web::http::StatusCode;
    let apps = people::applications_of(c, user_id, model)?;
    let (code, msg) = match apps.first().map(|a| a.status.as_str()) {
        None | Some(people::WITHDRAWN) => (
            "not_applied",
            format!(
                "Access to model {model} is restricted and you are not in the authorized list. Visit {apply_url} to ask for access."
            ),
        ),
        Some(people::UNVERIFIED) => (
            "application_unconfirmed",
            format!(
                "Your request to access model {model} is waiting for you to confirm your email address: use the link in the email we sent."
            ),
        ),
        Some(people::PENDING) => (
            "application_pending",
            format!(
                "Your request to access model {model} is awaiting a review from the repo authors."
            ),
        ),
        Some(people::REJECTED) => {
            let reason = apps[0].reason.clone().unwrap_or_default();
            (
                "application_rejected",
                format!(
                    "Your request to access model {model} has been rejected by the repo's authors. Reason: {reason}"
                ),
            )
        }
        Some(_) => (
            "token_scope",
            format!(
                "You have access to model {model}, but this token is for another model. Issue a token for {model} from your application's status page."
            ),
        ),
    };
    Ok(gated(StatusCode::FORBIDDEN, code, msg))
}

/// The token's own row: known, the same secret, not revoked.
fn token_row(
    c: &mut AnyConnection,
    claims: &Claims,
    jti: &str,
    hash: &str,
    model: &str,
    apply_url: &str,
) -> Result<TokenRow> {
    use actix_web::http::StatusCode;
    let row = token_rows::find(c, jti)?
        .filter(|r| {
            util::ct_eq(r.token_hash.as_bytes(), hash.as_bytes()) && r.user_id == claims.sub
        })
        .ok_or_else(|| {
            Error::unauthorized("invalid_token", tokens::INVALID_CREDENTIALS)
                .hub(HubCode::GatedRepo)
        })?;
    if row.revoked_at.is_some() {
        return Err(gated(
            StatusCode::FORBIDDEN,
            "token_revoked",
            format!(
                "Your token for model {model} has been revoked. Issue a new one from your application's status page, or apply again at {apply_url}"
            ),
        ));
    }
    Ok(row)
}

/// The token and then its grant and user, as they stand now.
fn check_rows(
    c: &mut AnyConnection,
    claims: &Claims,
    jti: &str,
    hash: &str,
    model: &str,
    apply_url: &str,
) -> Result<Principal> {
    use actix_web::http::StatusCode;
    let now = util::now();
    let row = token_row(c, claims, jti, hash, model, apply_url)?;
    let grant = people::find_grant(c, &row.grant_id)?
        .ok_or_else(|| Error::internal("token without grant"))?;
    let user = people::find_user(c, &row.user_id)?;
    if user.is_none_or(|u| u.deleted_at.is_some()) {
        return Err(gated(
            StatusCode::FORBIDDEN,
            "user_deleted",
            format!("Access to model {model} is restricted: this account no longer exists."),
        ));
    }
    if grant.revoked_at.is_some() {
        return Err(gated(
            StatusCode::FORBIDDEN,
            "grant_revoked",
            format!(
                "Your access to model {model} has been revoked{}. Apply again at {apply_url}",
                grant
                    .revoked_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        ));
    }
    if grant.expires_at.is_some_and(|e| e <= now) {
        return Err(gated(
            StatusCode::FORBIDDEN,
            "grant_expired",
            format!(
                "Your access to model {model} expired on {}. Apply again at {apply_url}",
                util::rfc3339(grant.expires_at.unwrap_or(now))
            ),
        ));
    }
    Ok(Principal {
        user_id: row.user_id,
        jti: row.jti,
        grant_id: grant.id,
        grant_expires_at: grant.expires_at,
        token_expires_at: row.expires_at,
        max_downloads: row.max_downloads,
    })
}

/// A freshly issued token: the raw text is shown once and never stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub token: String,
    pub jti: String,
    pub model: String,
    pub expires_at: i64,
    pub max_downloads: Option<i64>,
}

pub struct IssueRequest {
    pub user_id: String,
    pub model: String,
    pub ttl: Duration,
    pub max_downloads: Option<i64>,
    pub label: String,
    pub actor: String,
}

/// Issues a token for the user's active grant, inside the caller's transaction; its expiry
/// never outlives the grant.
pub fn issue(
    c: &mut AnyConnection,
    keys: &Keyring,
    policy: &TokenPolicy,
    req: &IssueRequest,
) -> Result<Issued> {
    let now = util::now();
    if req.max_downloads.is_some_and(|n| n < 1) {
        return Err(Error::invalid_field("max_downloads", "must be at least 1"));
    }
    let grant = people::active_grant(c, &req.user_id, &req.model, now)?.ok_or_else(|| {
        Error::forbidden(
            "no_grant",
            format!(
                "There is no active grant for model {}: the application must be approved first.",
                req.model
            ),
        )
    })?;
    let mut exp = now.saturating_add(req.ttl.as_secs().min(i64::MAX as u64) as i64);
    if let Some(g) = grant.expires_at {
        exp = exp.min(g);
    }
    let claims = Claims {
        iss: policy.issuer.clone(),
        aud: policy.audience.clone(),
        sub: req.user_id.clone(),
        iat: now,
        nbf: now,
        exp,
        jti: util::random_hex(16),
        models: vec![req.model.clone()],
        max_downloads: req.max_downloads,
    };
    let (token, kid) = tokens::sign(keys, &claims)?;
    token_rows::insert(
        c,
        &TokenRow {
            jti: claims.jti.clone(),
            token_hash: util::sha256_hex(&token),
            kid,
            grant_id: grant.id.clone(),
            user_id: req.user_id.clone(),
            model_id: req.model.clone(),
            label: req.label.clone(),
            issued_at: now,
            expires_at: exp,
            revoked_at: None,
            max_downloads: req.max_downloads,
            last_used_at: None,
        },
    )?;
    audit::append(c, &[Event::new("token_issued", "ok")
        .actor(&req.actor)
        .model(&req.model)
        .detail(json!({"jti": claims.jti, "user": req.user_id, "grant": grant.id, "exp": exp, "max_downloads": req.max_downloads}))])?;
    Ok(Issued {
        token,
        jti: claims.jti,
        model: req.model.clone(),
        expires_at: exp,
        max_downloads: req.max_downloads,
    })
}

/// Revokes a token by `jti`, inside the caller's transaction.
pub fn revoke(c: &mut AnyConnection, jti: &str, actor: &str) -> Result<TokenRow> {
    let row = token_rows::find(c, jti)?
        .ok_or_else(|| Error::not_found("token_not_found", format!("No token with jti {jti}.")))?;
    if !token_rows::revoke(c, jti, util::now())? {
        return Err(Error::conflict(
            "already_revoked",
            format!("Token {jti} was already revoked."),
        ));
    }
    audit::append(
        c,
        &[Event::new("token_revoked", "ok")
            .actor(actor)
            .model(&row.model_id)
            .detail(json!({"jti": jti, "user": row.user_id}))],
    )?;
    Ok(row)
}

/// Deletes a researcher (an admin's decision): their grants and tokens stop working, and
/// their email address is freed (replaced by a placeholder) so the row keeps no personal data.
pub fn delete_user(c: &mut AnyConnection, email: &str, actor: &str) -> Result<()> {
    let email = email.trim().to_ascii_lowercase();
    let user = people::find_user_by_email(c, &email)?.ok_or_else(|| {
        Error::not_found("user_not_found", "No researcher with that email address.")
    })?;
    let now = util::now();
    let (grants, toks) = people::erase_user(c, &user.id, now)?;
    audit::append(
        c,
        &[Event::new("user_deleted", "ok")
            .actor(actor)
            .detail(json!({"user": user.id, "grants_revoked": grants, "tokens_revoked": toks}))],
    )?;
    Ok(())
}
