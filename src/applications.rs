//! The application lifecycle: submit → confirm email → pending → approved | rejected,
//! with auto-approval by the model's gating mode. Every transition commits its audit event
//! and its emails in the same transaction.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit::{self, Event};
use crate::db::models::access::{
    self as people, APPROVED, Application, Grant, PENDING, REJECTED, UNVERIFIED, User, WITHDRAWN,
};
use crate::db::models::catalog::{self, Model};
use crate::db::models::kv;
use crate::db::{AnyConnection, Db};
use crate::error::{Error, Result};
use crate::mail::{self, templates};
use crate::util;

/// What a researcher sends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationForm {
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub affiliation: String,
    pub country: String,
    pub intended_use: String,
    #[serde(default)]
    pub accept_license: bool,
    #[serde(default)]
    pub answers: serde_json::Map<String, Value>,
}

/// Server facts the lifecycle needs for links and notifications.
#[derive(Debug, Clone)]
pub struct Context {
    pub public_url: String,
    pub admin_emails: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Submitted {
    pub id: String,
    pub status: String,
    pub status_url: String,
}

fn text_field(field: &str, value: &str, min: usize, max: usize) -> Result<String> {
    let v = value.trim();
    let n = v.chars().count();
    if n < min {
        return Err(Error::invalid_field(
            field,
            if min == 1 {
                "is required".to_string()
            } else {
                format!("needs at least {min} characters")
            },
        ));
    }
    if n > max {
        return Err(Error::invalid_field(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(Error::invalid_field(
            field,
            "must not contain control characters",
        ));
    }
    Ok(v.to_string())
}

/// Checks every field; returns the cleaned form (trimmed, email lower-cased).
pub fn validate(form: &ApplicationForm) -> Result<ApplicationForm> {
    let name = text_field("name", &form.name, 1, 200)?;
    if name.contains(['\n', '\r']) {
        return Err(Error::invalid_field("name", "must be one line"));
    }
    let email = form.email.trim().to_ascii_lowercase();
    if email.len() > 254 || email.parse::<lettre::Address>().is_err() {
        return Err(Error::invalid_field(
            "email",
            "is not a valid email address",
        ));
    }
    let affiliation = text_field("affiliation", &form.affiliation, 1, 200)?;
    let country = form.country.trim().to_ascii_uppercase();
    if !crate::countries::is_code(&country) {
        return Err(Error::invalid_field(
            "country",
            "must be an ISO 3166-1 alpha-2 code such as FR or US",
        ));
    }
    let intended_use = text_field("intended_use", &form.intended_use, 1, 5000)?;
    if !form.accept_license {
        return Err(Error::invalid_field(
            "accept_license",
            "the licence must be accepted (true)",
        ));
    }
    if form.answers.len() > 50 {
        return Err(Error::invalid_field("answers", "at most 50 answers"));
    }
    let mut answers = serde_json::Map::new();
    for (k, v) in &form.answers {
        let key = text_field("answers", k, 1, 100)?;
        let value = match v {
            Value::String(s) => Value::String(text_field(&format!("answers.{key}"), s, 0, 2000)?),
            Value::Bool(_) | Value::Number(_) => v.clone(),
            _ => {
                return Err(Error::invalid_field(
                    &format!("answers.{key}"),
                    "must be a string, number or boolean",
                ));
            }
        };
        answers.insert(key, value);
    }
    Ok(ApplicationForm {
        name,
        email,
        affiliation,
        country,
        intended_use,
        accept_license: true,
        answers,
    })
}

/// The status-page key of an application: derived from a server secret, so every email can
/// carry the link while the database stores only its hash.
pub fn status_key(c: &mut AnyConnection, id: &str) -> Result<String> {
    let secret = kv::server_secret(c)?;
    Ok(util::sha256_hex(format!("status-key\0{secret}\0{id}"))[..40].to_string())
}

fn status_url(c: &mut AnyConnection, ctx: &Context, id: &str) -> Result<String> {
    Ok(format!(
        "{}/applications/{id}?key={}",
        ctx.public_url,
        status_key(c, id)?
    ))
}

pub async fn submit(
    db: &Db,
    ctx: &Context,
    model_id: &str,
    form: ApplicationForm,
) -> Result<Submitted> {
    let form = validate(&form)?;
    let ctx = ctx.clone();
    let model_id = model_id.to_string();
    db.write(move |c| {
        let model = catalog::find_model(c, &model_id)?
            .ok_or_else(|| Error::not_found("model_not_found", format!("Model {model_id} does not exist on this server.")))?;
        check_answers(&model, &form.answers)?;
        let now = util::now();
        let user = match people::find_user_by_email(c, &form.email)? {
            Some(u) => u,
            None => {
                let u = User {
                    id: util::random_hex(12),
                    email: form.email.clone(),
                    name: form.name.clone(),
                    affiliation: form.affiliation.clone(),
                    country: form.country.clone(),
                    created_at: now,
                    deleted_at: None,
                };
                people::insert_user(c, &u)?;
                u
            }
        };
        if people::active_grant(c, &user.id, &model.id, now)?.is_some() {
            return Err(Error::conflict("already_approved", format!("You already have access to {}. Your approval email links to your status page.", model.id)));
        }
        let previous = people::applications_of(c, &user.id, &model.id)?;
        if let Some(open) = previous.iter().find(|a| a.status == UNVERIFIED || a.status == PENDING) {
            let what = if open.status == UNVERIFIED { "is waiting for you to confirm your email address" } else { "is awaiting review" };
            return Err(Error::conflict("application_open", format!("Your earlier application for {} {what}; you can apply again once it is decided or withdrawn.", model.id)));
        }
        if !model.allow_reapply && previous.iter().any(|a| a.status == REJECTED) {
            return Err(Error::forbidden("reapply_not_allowed", format!("Your application for {} was rejected and this model does not accept another.", model.id)));
        }
        let id = util::random_hex(16);
        let code = util::random_secret();
        let key = status_key(c, &id)?;
        people::insert_application(c, &Application {
            id: id.clone(),
            model_id: model.id.clone(),
            user_id: user.id.clone(),
            status: UNVERIFIED.into(),
            name: form.name.clone(),
            email: form.email.clone(),
            affiliation: form.affiliation.clone(),
            country: form.country.clone(),
            intended_use: form.intended_use.clone(),
            answers: Value::Object(form.answers.clone()).to_string(),
            confirm_hash: Some(util::sha256_hex(&code)),
            status_key_hash: util::sha256_hex(&key),
            reason: None,
            decided_by: None,
            decided_at: None,
            created_at: now,
            confirmed_at: None,
            updated_at: now,
        })?;
        let status_url = format!("{}/applications/{id}?key={key}", ctx.public_url);
        let confirm_url = format!("{}/applications/confirm?code={code}", ctx.public_url);
        mail::queue(c, &form.email, &templates::confirm_email(&model.id, &form.name, &confirm_url, &status_url))?;
        audit::append(c, &[Event::new("application_submitted", "ok")
            .actor(format!("user:{}", user.id))
            .model(&model.id)
            .detail(json!({"application": id, "country": form.country}))])?;
        Ok(Submitted { id, status: UNVERIFIED.into(), status_url })
    })
    .await
}

/// With custom questions defined, answers must be to those questions, of the right kind, and
/// the required ones present. Without any, free answers are kept as they are.
fn check_answers(model: &Model, answers: &serde_json::Map<String, Value>) -> Result<()> {
    let questions = model.questions();
    if questions.is_empty() {
        return Ok(());
    }
    for key in answers.keys() {
        if !questions.iter().any(|q| &q.label == key) {
            return Err(Error::invalid_field(
                &format!("answers.{key}"),
                "is not a question of this model",
            ));
        }
    }
    for q in &questions {
        let field = format!("answers.{}", q.label);
        let value = match answers.get(&q.label) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(s.trim().to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            Some(other) => Some(other.to_string()),
        };
        let Some(v) = value else {
            if q.required && q.kind != "checkbox" {
                return Err(Error::invalid_field(&field, "is required"));
            }
            if q.required {
                return Err(Error::invalid_field(&field, "must be ticked"));
            }
            continue;
        };
        let ok = match q.kind.as_str() {
            "select" => q.options.contains(&v),
            "checkbox" => v == "true" || v == "false",
            "date" => chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d").is_ok(),
            "country" => crate::countries::is_code(&v.to_ascii_uppercase()),
            _ => true,
        };
        if !ok {
            return Err(Error::invalid_field(
                &field,
                format!("is not a valid {}", q.kind.replace('_', " ")),
            ));
        }
        if q.required && q.kind == "checkbox" && v != "true" {
            return Err(Error::invalid_field(&field, "must be ticked"));
        }
    }
    Ok(())
}

/// Whether the model's gating approves this application at confirmation time.
fn auto_approves(model: &Model, app: &Application) -> bool {
    match model.gating.as_str() {
        "auto" => true,
        "domain" => {
            let domain = app.email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            model
                .allowed_domains()
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
        }
        _ => false,
    }
}

/// Confirms the email behind `code`; idempotent. Returns the application as it now stands.
pub async fn confirm(db: &Db, ctx: &Context, code: &str) -> Result<Application> {
    let hash = util::sha256_hex(code.trim());
    let ctx = ctx.clone();
    db.write(move |c| {
        let app = people::find_application_by_confirm_hash(c, &hash)?.ok_or_else(|| {
            Error::not_found(
                "bad_code",
                "This confirmation link is not valid. Use the link from your most recent email.",
            )
        })?;
        if app.status != UNVERIFIED {
            return Ok(app);
        }
        let now = util::now();
        if !people::transition(c, &app.id, UNVERIFIED, PENDING, now)? {
            return people::find_application(c, &app.id)?
                .ok_or_else(|| Error::internal("application vanished"));
        }
        people::mark_confirmed(c, &app.id, now)?;
        let model = catalog::require_model(c, &app.model_id)?;
        audit::append(
            c,
            &[Event::new("application_confirmed", "ok")
                .actor(format!("user:{}", app.user_id))
                .model(&app.model_id)
                .detail(json!({"application": app.id}))],
        )?;
        if auto_approves(&model, &app) {
            approve_in(c, &ctx, &app.id, &format!("auto:{}", model.gating), None)?;
        } else {
            let url = status_url(c, &ctx, &app.id)?;
            mail::queue(
                c,
                &app.email,
                &templates::application_received(&app.model_id, &url),
            )?;
            let admin_url = format!("{}/admin/applications?status=pending", ctx.public_url);
            // Models on a daily digest are announced by the digest job instead.
            let admins: &[String] = if model.notify == "digest" {
                &[]
            } else {
                &ctx.admin_emails
            };
            for admin in admins {
                mail::queue(
                    c,
                    admin,
                    &templates::new_application(
                        &app.model_id,
                        &app.name,
                        &app.affiliation,
                        &admin_url,
                    ),
                )?;
            }
        }
        people::find_application(c, &app.id)?.ok_or_else(|| Error::internal("application vanished"))
    })
    .await
}

/// Approves a pending application inside the caller's transaction, creating its grant.
pub fn approve_in(
    c: &mut AnyConnection,
    ctx: &Context,
    id: &str,
    actor: &str,
    expires: Option<Duration>,
) -> Result<Grant> {
    let now = util::now();
    let app = people::find_application(c, id)?.ok_or_else(|| {
        Error::not_found("application_not_found", format!("No application {id}."))
    })?;
    if people::active_grant(c, &app.user_id, &app.model_id, now)?.is_some() {
        return Err(Error::conflict(
            "already_approved",
            format!(
                "{} already has an active grant for {}.",
                app.email, app.model_id
            ),
        ));
    }
    if !people::transition(c, id, PENDING, APPROVED, now)? {
        return Err(Error::conflict(
            "not_pending",
            format!("Application {id} is {}, not pending.", app.status),
        ));
    }
    people::record_decision(c, id, actor, None, now)?;
    let grant = Grant {
        id: util::random_hex(16),
        user_id: app.user_id.clone(),
        model_id: app.model_id.clone(),
        application_id: Some(app.id.clone()),
        created_at: now,
        expires_at: expires.map(|d| now.saturating_add(d.as_secs().min(i64::MAX as u64) as i64)),
        revoked_at: None,
        revoked_reason: None,
    };
    people::insert_grant(c, &grant)?;
    audit::append(c, &[Event::new("application_approved", "ok")
        .actor(actor)
        .model(&app.model_id)
        .detail(json!({"application": id, "user": app.user_id, "grant": grant.id, "expires_at": grant.expires_at}))])?;
    let url = status_url(c, ctx, id)?;
    let expires = grant.expires_at.map(util::rfc3339);
    mail::queue(
        c,
        &app.email,
        &templates::approved(&app.model_id, &url, &ctx.public_url, expires.as_deref()),
    )?;
    Ok(grant)
}

pub async fn approve(
    db: &Db,
    ctx: &Context,
    id: &str,
    actor: &str,
    expires: Option<Duration>,
) -> Result<Grant> {
    let (ctx, id, actor) = (ctx.clone(), id.to_string(), actor.to_string());
    db.write(move |c| approve_in(c, &ctx, &id, &actor, expires))
        .await
}

/// Rejects an application inside the caller's transaction. A pending one is simply decided;
/// an approved one loses its grant too (an admin changing their mind).
pub fn reject_in(
    c: &mut AnyConnection,
    ctx: &Context,
    id: &str,
    actor: &str,
    reason: &str,
) -> Result<Application> {
    let reason = text_field("reason", reason, 1, 1000)?;
    let now = util::now();
    let app = people::find_application(c, id)?.ok_or_else(|| {
        Error::not_found("application_not_found", format!("No application {id}."))
    })?;
    let from = match app.status.as_str() {
        PENDING => PENDING,
        APPROVED => {
            revoke_grants_of(c, ctx, &app, actor, "rejected after approval")?;
            APPROVED
        }
        other => {
            return Err(Error::conflict(
                "not_pending",
                format!("Application {id} is {other}, not pending."),
            ));
        }
    };
    if !people::transition(c, id, from, REJECTED, now)? {
        return Err(Error::conflict(
            "not_pending",
            format!("Application {id} changed meanwhile; try again."),
        ));
    }
    people::record_decision(c, id, actor, Some(&reason), now)?;
    let model = catalog::require_model(c, &app.model_id)?;
    audit::append(
        c,
        &[Event::new("application_rejected", "ok")
            .actor(actor)
            .model(&app.model_id)
            .detail(json!({"application": id, "user": app.user_id, "reason": reason}))],
    )?;
    let url = status_url(c, ctx, id)?;
    mail::queue(
        c,
        &app.email,
        &templates::rejected(&app.model_id, &reason, model.allow_reapply, &url),
    )?;
    people::find_application(c, id)?.ok_or_else(|| Error::internal("application vanished"))
}

pub async fn reject(
    db: &Db,
    ctx: &Context,
    id: &str,
    actor: &str,
    reason: &str,
) -> Result<Application> {
    let (ctx, id, actor, reason) = (
        ctx.clone(),
        id.to_string(),
        actor.to_string(),
        reason.to_string(),
    );
    db.write(move |c| reject_in(c, &ctx, &id, &actor, &reason))
        .await
}

/// Revokes the active grant an application created, with its audit event.
fn revoke_grants_of(
    c: &mut AnyConnection,
    ctx: &Context,
    app: &Application,
    actor: &str,
    reason: &str,
) -> Result<()> {
    let now = util::now();
    for g in people::grants_of_application(c, &app.id)? {
        if people::revoke_grant(c, &g.id, reason, now)? {
            // The researcher hears of it (the application's status page says why).
            let url = status_url(c, ctx, &app.id)?;
            mail::queue(
                c,
                &app.email,
                &templates::grant_revoked(&app.model_id, reason, &url),
            )?;
            audit::append(
                c,
                &[Event::new("grant_revoked", "ok")
                    .actor(actor)
                    .model(&app.model_id)
                    .detail(json!({"grant": g.id, "user": app.user_id, "reason": reason}))],
            )?;
        }
    }
    Ok(())
}

/// Puts a decided application back in the review queue (`cancel_access_request`), revoking
/// the grant an approval made.
pub fn reopen_in(
    c: &mut AnyConnection,
    ctx: &Context,
    id: &str,
    actor: &str,
) -> Result<Application> {
    let now = util::now();
    let app = people::find_application(c, id)?.ok_or_else(|| {
        Error::not_found("application_not_found", format!("No application {id}."))
    })?;
    match app.status.as_str() {
        APPROVED => revoke_grants_of(c, ctx, &app, actor, "moved back to review")?,
        REJECTED => {}
        other => {
            return Err(Error::not_found(
                "not_decided",
                format!("Application {id} is {other}; only decided ones can go back to pending."),
            ));
        }
    }
    if !people::transition(c, id, &app.status, PENDING, now)? {
        return Err(Error::conflict(
            "changed",
            format!("Application {id} changed meanwhile; try again."),
        ));
    }
    audit::append(
        c,
        &[Event::new("application_reopened", "ok")
            .actor(actor)
            .model(&app.model_id)
            .detail(json!({"application": id, "from": app.status}))],
    )?;
    people::find_application(c, id)?.ok_or_else(|| Error::internal("application vanished"))
}

/// Accepts an application whatever its decided state (`accept_access_request`): a rejected
/// one goes back through pending so the approval is recorded like any other.
pub fn accept_in(c: &mut AnyConnection, ctx: &Context, id: &str, actor: &str) -> Result<Grant> {
    let app = people::find_application(c, id)?.ok_or_else(|| {
        Error::not_found("application_not_found", format!("No application {id}."))
    })?;
    match app.status.as_str() {
        PENDING => {}
        REJECTED => {
            reopen_in(c, ctx, id, actor)?;
        }
        APPROVED => {
            return Err(Error::not_found(
                "already_accepted",
                format!("Application {id} is already accepted."),
            ));
        }
        other => {
            return Err(Error::conflict(
                "not_pending",
                format!(
                    "Application {id} is {other}: the researcher must confirm their email first."
                ),
            ));
        }
    }
    approve_in(c, ctx, id, actor, None)
}

/// Grants access directly to an email address (`grant_access`): the researcher gets an
/// approved application of its own, so every list and email treats them like the others.
pub fn grant_in(
    c: &mut AnyConnection,
    ctx: &Context,
    model_id: &str,
    email: &str,
    actor: &str,
) -> Result<Grant> {
    let email = email.trim().to_ascii_lowercase();
    if email.len() > 254 || email.parse::<lettre::Address>().is_err() {
        return Err(Error::invalid_field(
            "user",
            "must be the researcher's email address",
        ));
    }
    let model = catalog::require_model(c, model_id)?;
    let now = util::now();
    let user = match people::find_user_by_email(c, &email)? {
        Some(u) => u,
        None => {
            let u = User {
                id: util::random_hex(12),
                email: email.clone(),
                name: String::new(),
                affiliation: String::new(),
                country: String::new(),
                created_at: now,
                deleted_at: None,
            };
            people::insert_user(c, &u)?;
            u
        }
    };
    if people::active_grant(c, &user.id, &model.id, now)?.is_some() {
        return Err(Error::bad_request(
            "already_granted",
            format!("{email} already has access to {}.", model.id),
        ));
    }
    // An application already on file is decided rather than duplicated.
    if let Some(existing) = people::applications_of(c, &user.id, &model.id)?
        .into_iter()
        .next()
        && matches!(existing.status.as_str(), PENDING | REJECTED)
    {
        return accept_in(c, ctx, &existing.id, actor);
    }
    let id = util::random_hex(16);
    let key = status_key(c, &id)?;
    people::insert_application(
        c,
        &Application {
            id: id.clone(),
            model_id: model.id.clone(),
            user_id: user.id.clone(),
            status: PENDING.into(),
            name: if user.name.is_empty() {
                email.clone()
            } else {
                user.name.clone()
            },
            email: email.clone(),
            affiliation: user.affiliation.clone(),
            country: user.country.clone(),
            intended_use: "Access granted directly by an administrator.".into(),
            answers: "{}".into(),
            confirm_hash: None,
            status_key_hash: util::sha256_hex(&key),
            reason: None,
            decided_by: None,
            decided_at: None,
            created_at: now,
            confirmed_at: Some(now),
            updated_at: now,
        },
    )?;
    approve_in(c, ctx, &id, actor, None)
}

/// What the researcher's status page shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub id: String,
    pub model: String,
    pub status: String,
    pub reason: Option<String>,
    pub may_reapply: bool,
    pub grant_expires_at: Option<i64>,
    pub grant_active: bool,
    pub tokens: Vec<TokenView>,
}

/// One token as its owner sees it (never the token itself).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenView {
    pub jti: String,
    pub label: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub max_downloads: Option<i64>,
    /// Files downloaded completely with this token.
    pub downloads_completed: i64,
    pub downloads_remaining: Option<i64>,
}

/// The application behind `id`, if `key` is its status key.
pub fn authenticate(c: &mut AnyConnection, id: &str, key: &str) -> Result<Application> {
    let app = people::find_application(c, id)?;
    match app {
        Some(app)
            if util::ct_eq(
                app.status_key_hash.as_bytes(),
                util::sha256_hex(key).as_bytes(),
            ) =>
        {
            Ok(app)
        }
        _ => Err(Error::not_found(
            "application_not_found",
            "No application matches this link. Use the link from your email.",
        )),
    }
}

pub async fn status(db: &Db, id: &str, key: &str) -> Result<Status> {
    let (id, key) = (id.to_string(), key.to_string());
    db.read(move |c| {
        let app = authenticate(c, &id, &key)?;
        let model = catalog::require_model(c, &app.model_id)?;
        let now = util::now();
        let grant = people::active_grant(c, &app.user_id, &app.model_id, now)?
            .filter(|g| g.application_id.as_deref() == Some(app.id.as_str()));
        let rows = match &grant {
            Some(g) => crate::db::models::tokens::list_for_grant(c, &g.id)?,
            None => Vec::new(),
        };
        let mut tokens = Vec::with_capacity(rows.len());
        for t in rows {
            let done = crate::db::models::tokens::completed_count(c, &t.jti)?;
            tokens.push(TokenView {
                downloads_remaining: t.max_downloads.map(|m| (m - done).max(0)),
                downloads_completed: done,
                jti: t.jti,
                label: t.label,
                issued_at: t.issued_at,
                expires_at: t.expires_at,
                last_used_at: t.last_used_at,
                revoked_at: t.revoked_at,
                max_downloads: t.max_downloads,
            });
        }
        Ok(Status {
            id: app.id.clone(),
            model: app.model_id.clone(),
            may_reapply: app.status == WITHDRAWN || (app.status == REJECTED && model.allow_reapply),
            reason: app.reason.clone(),
            grant_expires_at: grant.as_ref().and_then(|g| g.expires_at),
            grant_active: grant.is_some(),
            status: app.status,
            tokens,
        })
    })
    .await
}

/// The researcher withdraws an application that is not decided yet.
pub async fn withdraw(db: &Db, id: &str, key: &str) -> Result<Application> {
    let (id, key) = (id.to_string(), key.to_string());
    db.write(move |c| {
        let app = authenticate(c, &id, &key)?;
        let now = util::now();
        let from = match app.status.as_str() {
            UNVERIFIED => UNVERIFIED,
            PENDING => PENDING,
            other => {
                return Err(Error::conflict(
                    "not_open",
                    format!("This application is {other}; only an open one can be withdrawn."),
                ));
            }
        };
        if !people::transition(c, &id, from, WITHDRAWN, now)? {
            return Err(Error::conflict(
                "changed",
                "The application changed meanwhile; reload its status.",
            ));
        }
        audit::append(
            c,
            &[Event::new("application_withdrawn", "ok")
                .actor(format!("user:{}", app.user_id))
                .model(&app.model_id)
                .detail(json!({"application": id}))],
        )?;
        people::find_application(c, &id)?.ok_or_else(|| Error::internal("application vanished"))
    })
    .await
}

/// Revokes one grant (an administrator's decision) with its audit event and the researcher's email.
pub fn revoke_grant_in(
    c: &mut AnyConnection,
    ctx: &Context,
    grant_id: &str,
    actor: &str,
    reason: &str,
) -> Result<()> {
    let g = people::find_grant(c, grant_id)?
        .ok_or_else(|| Error::not_found("grant_not_found", "No such grant."))?;
    if !people::revoke_grant(c, grant_id, reason, util::now())? {
        return Err(Error::conflict(
            "already_revoked",
            "This grant was already revoked.",
        ));
    }
    audit::append(
        c,
        &[Event::new("grant_revoked", "ok")
            .actor(actor)
            .model(&g.model_id)
            .detail(json!({"grant": grant_id, "user": g.user_id, "reason": reason}))],
    )?;
    if let (Some(app_id), Some(user)) = (&g.application_id, people::find_user(c, &g.user_id)?) {
        let url = status_url(c, ctx, app_id)?;
        mail::queue(
            c,
            &user.email,
            &templates::grant_revoked(&g.model_id, reason, &url),
        )?;
    }
    Ok(())
}

/// Revokes a token; when someone other than its owner did it, the owner is told.
pub fn revoke_token_in(
    c: &mut AnyConnection,
    ctx: &Context,
    jti: &str,
    actor: &str,
) -> Result<crate::db::models::tokens::TokenRow> {
    let row = crate::auth::access::revoke(c, jti, actor)?;
    if actor != format!("user:{}", row.user_id)
        && let Some(user) = people::find_user(c, &row.user_id)?
        && let Some(g) = people::find_grant(c, &row.grant_id)?
        && let Some(app_id) = g.application_id
    {
        let url = status_url(c, ctx, &app_id)?;
        mail::queue(
            c,
            &user.email,
            &templates::token_revoked(&row.model_id, &row.label, &url),
        )?;
    }
    Ok(row)
}

/// Warns researchers whose access ends within 7 days, and tells those whose access has
/// ended; each once, with an audit event (which also reaches webhooks). Returns how many.
pub fn expiry_notices(c: &mut AnyConnection, ctx: &Context, now: i64) -> Result<usize> {
    let mut n = 0;
    for g in people::grants_to_warn(c, now, 7 * 86400)? {
        people::mark_grant_warned(c, &g.id, now)?;
        let ends = util::rfc3339(g.expires_at.unwrap_or(now));
        audit::append(
            c,
            &[Event::new("grant_expiring", "ok")
                .actor("system")
                .model(&g.model_id)
                .detail(json!({"grant": g.id, "user": g.user_id, "expires_at": g.expires_at}))],
        )?;
        if let (Some(app_id), Some(user)) = (&g.application_id, people::find_user(c, &g.user_id)?) {
            let url = status_url(c, ctx, app_id)?;
            mail::queue(
                c,
                &user.email,
                &templates::grant_expiring(&g.model_id, &ends, &url),
            )?;
        }
        n += 1;
    }
    for g in people::grants_expired_unnoticed(c, now)? {
        people::mark_grant_noticed(c, &g.id, now)?;
        audit::append(
            c,
            &[Event::new("grant_expired", "ok")
                .actor("system")
                .model(&g.model_id)
                .detail(json!({"grant": g.id, "user": g.user_id, "expires_at": g.expires_at}))],
        )?;
        if let (Some(app_id), Some(user)) = (&g.application_id, people::find_user(c, &g.user_id)?) {
            let url = status_url(c, ctx, app_id)?;
            mail::queue(c, &user.email, &templates::grant_expired(&g.model_id, &url))?;
        }
        n += 1;
    }
    Ok(n)
}

/// One message per administrator listing the applications of digest models that arrived
/// since the last digest. Returns how many applications it listed.
pub fn send_digest(c: &mut AnyConnection, ctx: &Context, now: i64) -> Result<usize> {
    let apps = people::awaiting_digest(c)?;
    if apps.is_empty() || ctx.admin_emails.is_empty() {
        return Ok(0);
    }
    let items: Vec<(String, String, String)> = apps
        .iter()
        .map(|a| (a.model_id.clone(), a.name.clone(), a.affiliation.clone()))
        .collect();
    let msg = templates::digest(
        &items,
        &format!("{}/admin/applications?status=pending", ctx.public_url),
    );
    for admin in &ctx.admin_emails {
        mail::queue(c, admin, &msg)?;
    }
    people::mark_digested(
        c,
        &apps.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
        now,
    )?;
    Ok(apps.len())
}
